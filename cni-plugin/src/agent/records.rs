//! What the node agent remembers across its own restarts: one small JSON file
//! per pod it was given by the CNI plugin (its attachment, its network
//! namespace's path, whether it was captured), in a state directory. On
//! start the agent reads them back, reopens each namespace that still
//! exists and reconciles it with the pod source, so pods stay captured
//! while the agent restarts.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plugin::PodRef;
use crate::protocol::Attachment;

/// How many records a start reads at most, and how long one may be: the
/// state directory is the agent's own, but a bound costs nothing.
const MAX_RECORDS: usize = 10_000;
const MAX_RECORD_SIZE: u64 = 64 * 1024;

/// One pod the agent holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PodRecord {
    /// The uid the data plane knows it by.
    pub(crate) uid: String,
    /// The network it is attached to.
    #[serde(default)]
    pub(crate) network: String,
    /// The runtime's attachment.
    pub(crate) attachment: Attachment,
    /// The pod.
    pub(crate) pod: PodRef,
    /// Its network namespace's path.
    pub(crate) netns: String,
    /// Its service account, as last known.
    #[serde(default)]
    pub(crate) service_account: String,
    /// Whether its traffic is captured.
    pub(crate) captured: bool,
}

/// The state directory, or none (then nothing survives a restart).
#[derive(Clone, Debug)]
pub(crate) struct Records {
    dir: Option<PathBuf>,
}

impl Records {
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// A file name for `uid` whatever it holds (`/`, dots, any length):
    /// its FNV-1a hash; the record itself names the uid.
    fn path(dir: &Path, uid: &str) -> PathBuf {
        let hash = uid.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        dir.join(format!("{hash:016x}.json"))
    }

    /// Writes (replaces) a record atomically.
    pub(crate) fn save(&self, record: &PodRecord) -> io::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let path = Self::path(dir, &record.uid);
        let partial = path.with_extension("json.partial");
        std::fs::write(
            &partial,
            serde_json::to_vec(record).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&partial, &path)
    }

    /// Forgets a pod.
    pub(crate) fn remove(&self, uid: &str) -> io::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        match std::fs::remove_file(Self::path(dir, uid)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// Every record, and a line for each file that could not be read (left
    /// in place for a person to look at).
    pub(crate) fn load(&self) -> (Vec<PodRecord>, Vec<String>) {
        let mut records = Vec::new();
        let mut problems = Vec::new();
        let Some(dir) = &self.dir else {
            return (records, problems);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return (records, problems),
            Err(err) => {
                problems.push(format!("{}: {err}", dir.display()));
                return (records, problems);
            }
        };
        for entry in entries.take(MAX_RECORDS) {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(err) => {
                    problems.push(format!("{}: {err}", dir.display()));
                    continue;
                }
            };
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            match read_record(&path) {
                Ok(record) => records.push(record),
                Err(err) => problems.push(format!("{}: {err}", path.display())),
            }
        }
        records.sort_by(|a, b| a.uid.cmp(&b.uid));
        (records, problems)
    }
}

fn read_record(path: &Path) -> Result<PodRecord, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_RECORD_SIZE + 1).read_to_end(&mut bytes))
        .map_err(|err| err.to_string())?;
    if bytes.len() as u64 > MAX_RECORD_SIZE {
        return Err(format!("longer than {MAX_RECORD_SIZE} bytes"));
    }
    serde_json::from_slice(&bytes).map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            network: "podnet".into(),
            attachment: Attachment {
                container_id: format!("c-{uid}"),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "default".into(),
                name: "shell".into(),
                uid: uid.into(),
            },
            netns: "/var/run/netns/x".into(),
            service_account: "shell".into(),
            captured: true,
        }
    }

    #[test]
    fn records_survive_and_bad_files_are_reported() {
        let dir = tempfile::tempdir().expect("dir");
        let records = Records::new(Some(dir.path().join("pods")));
        records.save(&record("a/b")).expect("save");
        records.save(&record("c")).expect("save");
        records.save(&record(&"x".repeat(300))).expect("a long uid");
        records.remove(&"x".repeat(300)).expect("remove");
        records.remove("c").expect("remove");
        records.remove("never").expect("remove twice is fine");
        std::fs::write(dir.path().join("pods/bad.json"), "{").expect("write");
        let (loaded, problems) = records.load();
        assert_eq!(loaded, vec![record("a/b")]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("bad.json"), "{problems:?}");
        assert_eq!(Records::new(None).load(), (Vec::new(), Vec::new()));
    }
}
