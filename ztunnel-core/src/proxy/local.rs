//! The same-node shortcut: when the destination workload is served by another
//! instance of the same node proxy, an outbound connection skips TLS and
//! HTTP/2. Both identities are the node proxy's own to vouch for and no byte
//! leaves the process, so the destination's instance lets the connection in
//! as if it had come over HBONE from the source's identity (the same checks:
//! [`super::inbound::admit`], its policy, its live-connection registry that
//! policy changes revoke), counts and logs it as the destination reporter,
//! and the bytes go from the client's socket to the application's directly.
//!
//! Instances find each other through a [`SameNode`] registry a node proxy
//! gives each of its instances; one not given a registry (dedicated mode)
//! never takes the shortcut.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock, Weak};

use mesh_api::Identity;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::authorize::Registered;
use super::context::Context;
use super::error::ConnectionError;
use super::inbound::admit;
use crate::telemetry::{ByteCounts, ConnectionRecord, Direction, Recorder};
use crate::tls::check_server_identity;

/// The instances of one node proxy, by the uid of the workload each serves.
/// Cheap to clone; clones share the registry.
#[derive(Clone, Debug, Default)]
pub struct SameNode {
    instances: Arc<RwLock<HashMap<String, Weak<Context>>>>,
}

impl SameNode {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lists a running instance (dropped entries are pruned as others come).
    pub(super) fn register(&self, ctx: &Arc<Context>) {
        let mut instances = self
            .instances
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        instances.retain(|_, instance| instance.strong_count() > 0);
        instances.insert(ctx.served_uid.clone(), Arc::downgrade(ctx));
    }

    /// The running instance serving `uid`, if this node has one that takes
    /// connections (not draining, not stopped).
    pub(super) fn get(&self, uid: &str) -> Option<Arc<Context>> {
        let instance = self
            .instances
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uid)?
            .upgrade()?;
        let taking = !instance.shutdown.is_cancelled() && !instance.tasks.is_closed();
        taking.then_some(instance)
    }

    /// How many instances are listed (some perhaps stopped).
    pub fn len(&self) -> usize {
        self.instances
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether none is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection let in by the destination's instance: the application's
/// side, the destination's record of it, and what ends it there. Its record
/// is finished when the connection is (or, dropped unfinished, as closed by
/// the source's instance); its task token keeps the destination's drain
/// waiting for it, as an HBONE stream would.
pub(super) struct LocalLink {
    pub(super) upstream: TcpStream,
    recorder: Option<Recorder>,
    pub(super) registered: Registered,
    /// Cancelled when the destination's instance closes its connections.
    pub(super) closed: CancellationToken,
    _drain: TaskTrackerToken,
}

impl LocalLink {
    /// The destination's record: the connection moved `bytes`, and failed
    /// with `error` if it did.
    pub(super) fn finish(&mut self, bytes: ByteCounts, error: Option<&ConnectionError>) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(bytes, error);
        }
    }
}

impl Drop for LocalLink {
    fn drop(&mut self) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(
                ByteCounts::default(),
                Some(&"closed by the source's proxy instance"),
            );
        }
    }
}

/// Lets a connection from `source` (the client of the instance `from`, with
/// the source workload's `identity`) to `destination` into the instance `to`,
/// as an HBONE stream would be, with the same requirements: both ends hold
/// the certificates the CA issued them, the destination is one of the
/// identities the client expects (`expected`: the workload's, or one its
/// service vouches for), and the destination's own checks
/// ([`admit`]). Refused: the destination has recorded why (when it got that
/// far); the source gets the error to record its side.
pub(super) async fn connect(
    from: &Context,
    to: Arc<Context>,
    identity: Identity,
    expected: &[Identity],
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<LocalLink, ConnectionError> {
    let refused = |problem: String| ConnectionError::LocalPeer {
        destination,
        problem,
    };
    from.certificate(&identity, from.certificate_wait)
        .await
        .map_err(|source| ConnectionError::Identity {
            destination,
            source,
        })?;
    let served = to
        .served_identity()
        .map_err(|err| refused(err.to_string()))?;
    check_server_identity(&served, expected).map_err(|err| refused(err.to_string()))?;
    to.certificate(&served, to.certificate_wait)
        .await
        .map_err(|err| refused(err.to_string()))?;
    // Held from here: a drain of the destination waits for the connection.
    let drain = to.tasks.token();
    if to.tasks.is_closed() || to.force_close.is_cancelled() {
        return Err(refused("its proxy instance is stopping".into()));
    }
    let mut recorder = Recorder::new(ConnectionRecord::new(
        Direction::Inbound,
        source,
        Some(identity.clone()),
    ));
    match admit(
        &to,
        Some(identity),
        source,
        destination,
        &mut recorder.record,
    )
    .await
    {
        Ok(admitted) => {
            recorder.opened(to.metrics.as_ref());
            Ok(LocalLink {
                upstream: admitted.upstream,
                recorder: Some(recorder),
                registered: admitted.registered,
                closed: to.force_close.clone(),
                _drain: drain,
            })
        }
        Err((_, error)) => {
            let summary = error.to_string();
            recorder.failed(&error);
            Err(match error {
                ConnectionError::Denied {
                    destination,
                    reason,
                } => ConnectionError::Denied {
                    destination,
                    reason,
                },
                _ => refused(summary),
            })
        }
    }
}
