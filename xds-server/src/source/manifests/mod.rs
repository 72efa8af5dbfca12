//! A directory of Kubernetes manifests (`*.yaml`, `*.yml`, `*.json`, searched
//! recursively), watched by polling: a changed file is re-read within one poll
//! interval (250 ms by default), a removed file's objects are deleted.
//!
//! The walk reads every real directory once: a symlink loop is reported once
//! and not followed, and the rest of the directory is served. Hidden files and
//! directories (`.git`, a ConfigMap volume's `..data`) are skipped; symlinks to
//! files and to directories elsewhere are followed (a ConfigMap volume's
//! `<key>.yaml` symlinks are read, each once). The walk goes at most
//! [`ManifestDir::DEFAULT_MAX_DEPTH`] directories deep and reads at most
//! [`ManifestDir::DEFAULT_MAX_FILES`] files (see [`ManifestDir::max_depth`] and
//! [`ManifestDir::max_files`]).
//!
//! A file that does not parse (invalid YAML, more than
//! [`MAX_DOCUMENTS`](crate::object::MAX_DOCUMENTS) documents) is reported
//! (see [`ManifestProblems`]) and skipped as a whole: what it provided before
//! stays loaded until the file is fixed. A document with wrong fields skips only
//! its object: the file's other documents are applied, the document is reported
//! by position, kind and name, and the object's version loaded before stays.
//! While any of its documents fails, a file withdraws nothing: objects it no
//! longer defines go once it reads cleanly. When several files define the same
//! object, the last one read wins, and the object stays while any file still
//! defines it.
//!
//! When the directory itself cannot be read (deleted, unmounted, permissions),
//! the objects it provided stay loaded, as with k3s's manifest directory, and
//! polling goes on: the failure is logged at once, then at growing intervals,
//! and the recovery once. When the directory is back, what it then holds is
//! the truth: files missing from it are withdrawn.

mod outage;
mod walk;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use self::outage::{Outage, Report};
use self::walk::{Limits, Stamp};
use super::{ConfigSource, SourceError};
use crate::object::{Object, ObjectError, ObjectKey, read_documents};
use crate::store::Store;

/// The default poll interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A watched manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    interval: Duration,
    limits: Limits,
    files: BTreeMap<PathBuf, FileState>,
    owners: HashMap<ObjectKey, Vec<PathBuf>>,
    /// What the last walk did not read, and why: reported when it appears.
    walk_notes: BTreeMap<PathBuf, String>,
    problems: ManifestProblems,
}

/// What a file looked like when last read, and what it provides.
#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    objects: BTreeMap<ObjectKey, Object>,
}

/// A problem with one file, or with a directory entry the walk did not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    /// The file (or directory, or symlink).
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
    /// Files with problems now (fixed files drop out), and what the walk did
    /// not read (symlink loops, entries beyond the limits, unreadable
    /// directories).
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
    /// How many directories below the root are read by default.
    pub const DEFAULT_MAX_DEPTH: usize = 16;
    /// How many manifest files are read at most by default.
    pub const DEFAULT_MAX_FILES: usize = 10_000;

    /// A source reading `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            interval: DEFAULT_POLL_INTERVAL,
            limits: Limits {
                max_depth: Self::DEFAULT_MAX_DEPTH,
                max_files: Self::DEFAULT_MAX_FILES,
            },
            files: BTreeMap::new(),
            owners: HashMap::new(),
            walk_notes: BTreeMap::new(),
            problems: ManifestProblems::default(),
        }
    }

    /// How often the directory is checked for changes.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How many levels of directories below the root are read (default
    /// [`Self::DEFAULT_MAX_DEPTH`]; 0: the root's own files only). Deeper
    /// directories are reported and skipped.
    pub fn max_depth(mut self, levels: usize) -> Self {
        self.limits.max_depth = levels;
        self
    }

    /// How many manifest files are read at most (default
    /// [`Self::DEFAULT_MAX_FILES`]). Beyond it the walk stops, reports it, and
    /// files loaded before keep what they provided.
    pub fn max_files(mut self, files: usize) -> Self {
        self.limits.max_files = files;
        self
    }

    /// A handle on the current problems.
    pub fn problems(&self) -> ManifestProblems {
        self.problems.clone()
    }

    /// The manifest files read, in path order (a file is read at one path,
    /// however many lead to it through symlinked directories).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(PathBuf::as_path)
    }

    /// Reads what changed since the last call into `store`. Fails only when the
    /// directory itself cannot be read; then nothing changes.
    pub fn sync(&mut self, store: &Store) -> Result<(), SourceError> {
        let listing =
            walk::list(&self.root, self.limits).map_err(|message| SourceError::Unavailable {
                source_name: self.describe(),
                message,
            })?;
        self.note(listing.notes);
        // New and changed files first, so that an object moving from one file
        // to another (a rename, a ConfigMap update) is replaced, never deleted
        // in between.
        for (path, stamp) in &listing.files {
            if self
                .files
                .get(path)
                .is_some_and(|state| state.stamp == *stamp)
            {
                continue;
            }
            self.read_file(path, *stamp, store);
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !listing.files.contains_key(*path))
            // A walk cut short (a limit, an unreadable directory) did not see
            // everything: only a file that is no longer there is gone.
            .filter(|path| {
                listing.complete
                    || std::fs::metadata(path)
                        .is_err_and(|err| err.kind() == std::io::ErrorKind::NotFound)
            })
            .cloned()
            .collect();
        for path in gone {
            tracing::info!(path = %path.display(), "manifest removed");
            self.problems.lock().remove(&path);
            if let Some(state) = self.files.remove(&path) {
                self.withdraw(&path, state.objects.keys(), store);
            }
        }
        Ok(())
    }

    /// Reports what the walk newly did not read, and forgets what it reads
    /// again: each loop is logged once, not once a poll.
    fn note(&mut self, notes: BTreeMap<PathBuf, String>) {
        let mut problems = self.problems.lock();
        for (path, note) in &notes {
            if self.walk_notes.get(path) != Some(note) {
                tracing::warn!(path = %path.display(), problem = %note, "manifest directory entry skipped");
                problems.insert(path.clone(), vec![note.clone()]);
            }
        }
        for path in self.walk_notes.keys() {
            if !notes.contains_key(path) {
                tracing::info!(path = %path.display(), "manifest directory entry no longer skipped");
                problems.remove(path);
            }
        }
        self.walk_notes = notes;
    }

    fn read_file(&mut self, path: &Path, stamp: Stamp, store: &Store) {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) => {
                self.skip(path, stamp, vec![format!("cannot read: {err}")]);
                return;
            }
        };
        let documents = match read_documents(&text) {
            Ok(documents) => documents,
            Err(err) => {
                self.skip(path, stamp, vec![err.message]);
                return;
            }
        };
        let previous = self.files.remove(path);
        // What the file provides after this read.
        let mut objects = BTreeMap::new();
        // The documents that failed, with the object each names if known.
        let mut failed: Vec<(Option<ObjectKey>, ObjectError)> = Vec::new();
        let mut good = Vec::new();
        for document in documents {
            match document.read {
                Ok(object) => good.push((document.position, object)),
                Err(bad) => {
                    failed.extend(bad.errors.into_iter().map(|error| (bad.key.clone(), error)));
                }
            }
        }
        store.batch(|batch| {
            for (position, object) in good {
                let key = object.key();
                if let Err(mut err) = batch.apply(object.clone()) {
                    err.document = Some(position);
                    failed.push((Some(key), err));
                    continue;
                }
                let owners = self.owners.entry(key.clone()).or_default();
                owners.retain(|owner| owner != path);
                owners.push(path.to_path_buf());
                objects.insert(key, object);
            }
        });
        // A failed document keeps the version of its object loaded before, and
        // while any document fails the file withdraws nothing: an object it no
        // longer defines goes once the file reads cleanly (a broken document
        // may be that object, its name unreadable).
        failed.sort_by_key(|(_, error)| error.document);
        let problems: Vec<String> = failed
            .iter()
            .map(|(key, error)| {
                let kept = key.as_ref().is_some_and(|key| {
                    !objects.contains_key(key)
                        && previous
                            .as_ref()
                            .is_some_and(|previous| previous.objects.contains_key(key))
                });
                if kept {
                    format!("{error}; the version loaded before stays")
                } else {
                    error.to_string()
                }
            })
            .collect();
        let mut dropped: Vec<ObjectKey> = Vec::new();
        for (key, object) in previous.into_iter().flat_map(|previous| previous.objects) {
            if objects.contains_key(&key) {
                continue;
            }
            if failed.is_empty() {
                dropped.push(key);
            } else {
                objects.insert(key, object);
            }
        }
        self.withdraw(path, dropped.iter(), store);
        tracing::info!(
            path = %path.display(),
            objects = objects.len(),
            problems = problems.len(),
            "manifest loaded"
        );
        self.files
            .insert(path.to_path_buf(), FileState { stamp, objects });
        if problems.is_empty() {
            self.problems.lock().remove(path);
        } else {
            for problem in &problems {
                tracing::warn!(
                    path = %path.display(),
                    %problem,
                    "manifest document skipped; the file's other documents are loaded"
                );
            }
            self.problems.lock().insert(path.to_path_buf(), problems);
        }
    }

    /// Keeps what the file provided before, and remembers the broken version so
    /// it is not re-read (nor reported again) until it changes again.
    fn skip(&mut self, path: &Path, stamp: Stamp, problems: Vec<String>) {
        for problem in &problems {
            tracing::warn!(path = %path.display(), %problem, "manifest skipped");
        }
        self.problems.lock().insert(path.to_path_buf(), problems);
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

    /// `path` no longer defines `keys`: delete those no other file defines,
    /// restore the others' version.
    fn withdraw<'a>(
        &mut self,
        path: &Path,
        keys: impl Iterator<Item = &'a ObjectKey>,
        store: &Store,
    ) {
        let keys: Vec<ObjectKey> = keys.cloned().collect();
        if keys.is_empty() {
            return;
        }
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
            let mut outage: Option<Outage> = None;
            // The blocking thread logs where this task logs.
            let dispatch = tracing::dispatcher::get_default(Clone::clone);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = ticks.tick() => {}
                }
                let store = store.clone();
                let dispatch = dispatch.clone();
                let (returned, result) = tokio::task::spawn_blocking(move || {
                    let result = tracing::dispatcher::with_default(&dispatch, || self.sync(&store));
                    (self, result)
                })
                .await
                .map_err(|err| SourceError::Unavailable {
                    source_name: "manifest directory".into(),
                    message: err.to_string(),
                })?;
                self = returned;
                let now = Instant::now();
                match (result, &mut outage) {
                    (Ok(()), None) => {}
                    (Ok(()), Some(ended)) => {
                        let (failures, duration) = ended.ended(now);
                        tracing::info!(
                            source = %self.describe(),
                            failed_polls = failures,
                            unavailable_for = ?duration,
                            "manifest directory readable again"
                        );
                        outage = None;
                    }
                    (Err(err), None) => {
                        tracing::warn!(
                            error = %err,
                            "manifest directory unavailable; what it provided stays loaded; retrying"
                        );
                        outage = Some(Outage::start(err.to_string(), now));
                    }
                    (Err(err), Some(current)) => match current.failed(err.to_string(), now) {
                        Report::First => tracing::warn!(
                            error = %err,
                            "manifest directory unavailable; what it provided stays loaded; retrying"
                        ),
                        Report::Still {
                            failures,
                            duration,
                            next,
                        } => tracing::warn!(
                            error = %err,
                            failed_polls = failures,
                            unavailable_for = ?duration,
                            next_report_in = ?next,
                            "manifest directory still unavailable; what it provided stays loaded; retrying"
                        ),
                        Report::Quiet => {}
                    },
                }
            }
        })
    }
}
