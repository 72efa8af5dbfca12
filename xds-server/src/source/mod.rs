//! Config sources: where the store's objects come from.
//!
//! Three ways in, one store:
//! - the in-memory API: [`Store::apply`], [`Store::delete`] and [`Store::batch`],
//!   called by an embedding binary (a k3s fork feeding its own informers' objects);
//! - [`ManifestDir`]: Kubernetes YAML files in a directory, watched;
//! - `KubeWatcher` (cargo feature `kube`): a cluster's API server, through kube-rs.
//!
//! Sources that run on their own implement [`ConfigSource`].

#[cfg(feature = "kube")]
mod kube;
mod manifests;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "kube")]
pub use kube::KubeWatcher;
pub use manifests::{DEFAULT_POLL_INTERVAL, FileProblem, ManifestDir, ManifestProblems};

use crate::store::Store;

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The source's root (a directory, a cluster) cannot be read at all.
    #[error("{source_name}: {message}")]
    Unavailable {
        /// The source.
        source_name: String,
        /// What failed.
        message: String,
    },
}

/// A source that feeds a [`Store`] until shut down.
pub trait ConfigSource: Send + 'static {
    /// A short description for logs (`manifests in /etc/podless`).
    fn describe(&self) -> String;

    /// Feeds `store` until `shutdown` is cancelled.
    fn run(
        self: Box<Self>,
        store: Store,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}
