//! Listing a manifest directory: every real directory read once, however many
//! paths lead to it.
//!
//! Directories are recognised by device and inode, so a symlink (or bind mount)
//! back to a directory above it is a loop, noted and not followed, and a second
//! path to a directory already read (a symlink beside its target) is not read
//! again. Real subdirectories are read before symlinked ones, so a directory's
//! files keep their real paths when it is also linked to. Symlinks to files and
//! to directories elsewhere are followed. Hidden entries (`.git`, a ConfigMap
//! volume's `..data` and `..<timestamp>` directories) are skipped: a ConfigMap
//! volume's `<key>.yaml` symlinks are read, each once. The walk goes at most
//! [`Limits::max_depth`] directories deep and lists at most
//! [`Limits::max_files`] manifest files.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bounds on one walk.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Directories below the root read, at most this many levels down.
    pub(super) max_depth: usize,
    /// Manifest files listed at most.
    pub(super) max_files: usize,
}

/// Enough of a file's metadata to notice a change: a new version written in
/// place (length, modification time), permissions changed (change time), or
/// another file put in its place (device and inode, as when a ConfigMap volume
/// swaps its `..data` symlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    pub(super) fn of(metadata: &Metadata) -> Self {
        Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// What a walk found.
#[derive(Debug, Default)]
pub(super) struct Listing {
    /// Manifest files, with their stamps.
    pub(super) files: BTreeMap<PathBuf, Stamp>,
    /// Whether the walk saw everything it was meant to: false when a directory
    /// could not be read or the file limit was reached, so that a file not
    /// listed may still be there.
    pub(super) complete: bool,
    /// What the walk did not read, and why (loops, limits, unreadable
    /// directories), by path.
    pub(super) notes: BTreeMap<PathBuf, String>,
    /// Directories read (each once).
    pub(super) directories: usize,
}

/// A directory's identity: device and inode.
type DirId = (u64, u64);

/// A directory to read.
struct Pending {
    path: PathBuf,
    id: DirId,
    /// How many levels below the root.
    depth: usize,
    /// The directory whose entry it is.
    parent: DirId,
    /// Whether the entry is a symlink.
    linked: bool,
}

/// A directory read: the one it was reached from, and its path.
struct Visited {
    parent: Option<DirId>,
    path: PathBuf,
}

/// Lists the manifest files under `root`. Fails only when `root` itself
/// cannot be read.
pub(super) fn list(root: &Path, limits: Limits) -> Result<Listing, String> {
    let metadata =
        std::fs::metadata(root).map_err(|err| format!("cannot read the directory: {err}"))?;
    if !metadata.is_dir() {
        return Err("not a directory".into());
    }
    let root_id = (metadata.dev(), metadata.ino());
    let entries = read_sorted(root).map_err(|err| format!("cannot read the directory: {err}"))?;
    let mut walk = Walk {
        limits,
        listing: Listing {
            complete: true,
            ..Listing::default()
        },
        visited: HashMap::from([(
            root_id,
            Visited {
                parent: None,
                path: root.to_path_buf(),
            },
        )]),
        real: Vec::new(),
        linked: VecDeque::new(),
        root: root.to_path_buf(),
    };
    walk.listing.directories = 1;
    if !walk.entries(root_id, 0, entries) {
        return Ok(walk.listing);
    }
    // Real directories first (depth first, in name order), then symlinked ones
    // in the order found: a directory reachable both ways is read at its real
    // path.
    while let Some(pending) = walk.real.pop().or_else(|| walk.linked.pop_front()) {
        if let Some(first) = walk.visited.get(&pending.id) {
            if walk.is_ancestor(pending.id, pending.parent) {
                let what = if pending.linked {
                    "a symlink"
                } else {
                    "a mount"
                };
                walk.listing.notes.insert(
                    pending.path,
                    format!(
                        "{what} back to {}, a directory above it: a loop, not followed",
                        first.path.display()
                    ),
                );
            } else {
                tracing::debug!(
                    path = %pending.path.display(),
                    read_as = %first.path.display(),
                    "directory already read through another path"
                );
            }
            continue;
        }
        let entries = match read_sorted(&pending.path) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue, // gone meanwhile
            Err(err) => {
                walk.listing.complete = false;
                walk.listing
                    .notes
                    .insert(pending.path, format!("cannot read the directory: {err}"));
                continue;
            }
        };
        walk.visited.insert(
            pending.id,
            Visited {
                parent: Some(pending.parent),
                path: pending.path,
            },
        );
        walk.listing.directories += 1;
        if !walk.entries(pending.id, pending.depth, entries) {
            break;
        }
    }
    Ok(walk.listing)
}

struct Walk {
    limits: Limits,
    listing: Listing,
    visited: HashMap<DirId, Visited>,
    real: Vec<Pending>,
    linked: VecDeque<Pending>,
    root: PathBuf,
}

impl Walk {
    /// Takes in one directory's entries; false when the file limit stops the
    /// walk.
    fn entries(&mut self, directory: DirId, depth: usize, entries: Vec<(PathBuf, bool)>) -> bool {
        let mut subdirectories = Vec::new();
        for (path, symlink) in entries {
            let hidden = path
                .file_name()
                .is_none_or(|name| name.as_encoded_bytes().starts_with(b"."));
            if hidden {
                continue;
            }
            // Follows symlinks; a dangling one is skipped.
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                if depth + 1 > self.limits.max_depth {
                    self.listing.notes.insert(
                        path,
                        format!(
                            "more than {} directories below the manifest root: not read",
                            self.limits.max_depth
                        ),
                    );
                    continue;
                }
                let pending = Pending {
                    path,
                    id: (metadata.dev(), metadata.ino()),
                    depth: depth + 1,
                    parent: directory,
                    linked: symlink,
                };
                if symlink {
                    self.linked.push_back(pending);
                } else {
                    subdirectories.push(pending);
                }
            } else if metadata.is_file() && is_manifest(&path) {
                if self.listing.files.len() >= self.limits.max_files {
                    self.listing.complete = false;
                    self.listing.notes.insert(
                        self.root.clone(),
                        format!(
                            "more than {} manifest files: the rest are not read",
                            self.limits.max_files
                        ),
                    );
                    return false;
                }
                self.listing.files.insert(path, Stamp::of(&metadata));
            }
        }
        // Popped in name order.
        self.real.extend(subdirectories.into_iter().rev());
        true
    }

    /// Whether `id` is `from` or a directory above it (as walked).
    fn is_ancestor(&self, id: DirId, from: DirId) -> bool {
        let mut current = Some(from);
        while let Some(directory) = current {
            if directory == id {
                return true;
            }
            current = self
                .visited
                .get(&directory)
                .and_then(|visited| visited.parent);
        }
        false
    }
}

/// A directory's entries in name order, each with whether it is a symlink.
fn read_sorted(directory: &Path) -> io::Result<Vec<(PathBuf, bool)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        let Ok(entry) = entry else { continue };
        let symlink = entry.file_type().is_ok_and(|kind| kind.is_symlink());
        entries.push((entry.path(), symlink));
    }
    entries.sort();
    Ok(entries)
}

/// Whether a file's name makes it a manifest.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|ext| ext.to_str()),
        Some("yaml" | "yml" | "json")
    )
}
