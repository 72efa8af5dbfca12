//! A directory of Kubernetes manifests (`*.yaml`, `*.yml`, `*.json`, searched
//! recursively), watched by polling: a changed file is re-read within one poll
//! interval (250 ms by default), a removed file's objects are deleted.
//!
//! A file that does not parse, or holds a document with wrong fields, is
//! reported (see [`ManifestProblems`]) and skipped as a whole: what it provided
//! before stays loaded until the file is fixed. When several files define the
//! same object, the last one read wins, and the object stays while any file
//! still defines it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{ConfigSource, SourceError};
use crate::object::{Object, ObjectKey, parse_manifest};
use crate::store::Store;

/// The default poll interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A watched manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    interval: Duration,
    files: BTreeMap<PathBuf, FileState>,
    owners: HashMap<ObjectKey, Vec<PathBuf>>,
    problems: ManifestProblems,
}

/// What a file looked like when last read, and what it defined.
#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    objects: BTreeMap<ObjectKey, Object>,
}

/// Enough of a file's metadata to notice a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// A problem with one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, one line per problem.
    pub problems: Vec<String>,
}

/// The current problems of a [`ManifestDir`], shared with whoever watches it.
#[derive(Clone, Debug, Default)]
pub struct ManifestProblems {
    current: Arc<Mutex<BTreeMap<PathBuf, Vec<String>>>>,
}

impl ManifestProblems {
    /// Files with problems now (fixed files drop out).
    pub fn current(&self) -> Vec<FileProblem> {
        self.lock()
            .iter()
            .map(|(path, problems)| FileProblem {
                path: path.clone(),
                problems: problems.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Vec<String>>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ManifestDir {
    /// A source reading `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            interval: DEFAULT_POLL_INTERVAL,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            problems: ManifestProblems::default(),
        }
    }

    /// How often the directory is checked for changes.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// A handle on the current problems.
    pub fn problems(&self) -> ManifestProblems {
        self.problems.clone()
    }

    /// Reads what changed since the last call into `store`. Fails only when the
    /// directory itself cannot be read.
    pub fn sync(&mut self, store: &Store) -> Result<(), SourceError> {
        let found = self.list().map_err(|message| SourceError::Unavailable {
            source_name: self.describe(),
            message,
        })?;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !found.contains_key(*path))
            .cloned()
            .collect();
        for path in gone {
            tracing::info!(path = %path.display(), "manifest removed");
            self.problems.lock().remove(&path);
            if let Some(state) = self.files.remove(&path) {
                self.withdraw(&path, state.objects.keys(), store);
            }
        }
        for (path, stamp) in found {
            if self
                .files
                .get(&path)
                .is_some_and(|state| state.stamp == stamp)
            {
                continue;
            }
            self.read_file(&path, stamp, store);
        }
        Ok(())
    }

    fn read_file(&mut self, path: &Path, stamp: Stamp, store: &Store) {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                self.report(path, vec![format!("cannot read: {err}")]);
                return;
            }
        };
        let manifest = match parse_manifest(&text) {
            Ok(manifest) if manifest.errors.is_empty() => manifest,
            Ok(manifest) => {
                let problems = manifest.errors.iter().map(ToString::to_string).collect();
                self.skip(path, stamp, problems);
                return;
            }
            Err(err) => {
                self.skip(path, stamp, vec![err.to_string()]);
                return;
            }
        };
        let mut objects = BTreeMap::new();
        for object in manifest.objects {
            objects.insert(object.key(), object);
        }
        let mut problems = Vec::new();
        let previous = self.files.remove(path);
        store.batch(|batch| {
            for (key, object) in &objects {
                if let Err(err) = batch.apply(object.clone()) {
                    problems.push(err.to_string());
                    continue;
                }
                let owners = self.owners.entry(key.clone()).or_default();
                owners.retain(|owner| owner != path);
                owners.push(path.to_path_buf());
            }
        });
        if let Some(previous) = previous {
            let dropped: Vec<ObjectKey> = previous
                .objects
                .keys()
                .filter(|key| !objects.contains_key(*key))
                .cloned()
                .collect();
            self.withdraw(path, dropped.iter(), store);
        }
        tracing::info!(path = %path.display(), objects = objects.len(), "manifest loaded");
        self.files
            .insert(path.to_path_buf(), FileState { stamp, objects });
        if problems.is_empty() {
            self.problems.lock().remove(path);
        } else {
            self.report(path, problems);
        }
    }

    /// Keeps what the file provided before, and remembers the broken version so
    /// it is not re-read until it changes again.
    fn skip(&mut self, path: &Path, stamp: Stamp, problems: Vec<String>) {
        self.report(path, problems);
        match self.files.get_mut(path) {
            Some(state) => state.stamp = stamp,
            None => {
                self.files.insert(
                    path.to_path_buf(),
                    FileState {
                        stamp,
                        objects: BTreeMap::new(),
                    },
                );
            }
        }
    }

    fn report(&self, path: &Path, problems: Vec<String>) {
        for problem in &problems {
            tracing::warn!(path = %path.display(), %problem, "manifest skipped");
        }
        self.problems.lock().insert(path.to_path_buf(), problems);
    }

    /// `path` no longer defines `keys`: delete those no other file defines,
    /// restore the others' version.
    fn withdraw<'a>(
        &mut self,
        path: &Path,
        keys: impl Iterator<Item = &'a ObjectKey>,
        store: &Store,
    ) {
        let keys: Vec<ObjectKey> = keys.cloned().collect();
        store.batch(|batch| {
            for key in &keys {
                let Some(owners) = self.owners.get_mut(key) else {
                    continue;
                };
                owners.retain(|owner| owner != path);
                let restored = owners
                    .last()
                    .and_then(|owner| self.files.get(owner))
                    .and_then(|state| state.objects.get(key));
                match restored {
                    Some(object) => {
                        if let Err(err) = batch.apply(object.clone()) {
                            tracing::warn!(object = %key, error = %err, "could not restore");
                        }
                    }
                    None => {
                        self.owners.remove(key);
                        batch.delete(key);
                    }
                }
            }
        });
    }

    /// Manifest files under the root, with their stamps.
    fn list(&self) -> Result<BTreeMap<PathBuf, Stamp>, String> {
        let mut found = BTreeMap::new();
        let mut directories = vec![self.root.clone()];
        let mut first = true;
        while let Some(directory) = directories.pop() {
            let entries = match std::fs::read_dir(&directory) {
                Ok(entries) => entries,
                Err(err) if first => return Err(format!("cannot read the directory: {err}")),
                Err(_) => continue, // a subdirectory that vanished meanwhile
            };
            first = false;
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(metadata) = std::fs::metadata(&path) else {
                    continue;
                };
                if metadata.is_dir() {
                    directories.push(path);
                } else if is_manifest(&path) {
                    found.insert(
                        path,
                        Stamp {
                            modified: metadata.modified().ok(),
                            len: metadata.len(),
                        },
                    );
                }
            }
        }
        Ok(found)
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with('.'));
    !hidden
        && matches!(
            path.extension().and_then(|ext| ext.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

impl ConfigSource for ManifestDir {
    fn describe(&self) -> String {
        format!("manifests in {}", self.root.display())
    }

    fn run(
        mut self: Box<Self>,
        store: Store,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let mut ticks = tokio::time::interval(self.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = ticks.tick() => {}
                }
                let store = store.clone();
                let (returned, result) = tokio::task::spawn_blocking(move || {
                    let result = self.sync(&store);
                    (self, result)
                })
                .await
                .map_err(|err| SourceError::Unavailable {
                    source_name: "manifest directory".into(),
                    message: err.to_string(),
                })?;
                self = returned;
                if let Err(err) = result {
                    tracing::warn!(error = %err, "manifest directory unavailable; retrying");
                }
            }
        })
    }
}
