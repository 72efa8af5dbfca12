//! Inbound authorization: which local workload a connection is for, what
//! policy says of it, and the live connections that are checked again when
//! policies change (those now denied are closed).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use authz::{Connection, Decision};
use mesh_api::Identity;
use mesh_api::workload::Workload;
use tokio_util::sync::CancellationToken;

use crate::state::{ProxyState, SharedState};

/// What an inbound connection is: who from, to which workload and port.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// The verified peer; `None` for plaintext.
    pub peer: Option<Identity>,
    /// The peer's address.
    pub source: SocketAddr,
    /// The target (workload IP and port).
    pub destination: SocketAddr,
}

impl Inbound {
    /// What policy says of this connection to `workload`.
    pub fn evaluate(&self, state: &ProxyState, workload: &Workload) -> Decision {
        state.policies().evaluate(&Connection {
            source: self.peer.as_ref(),
            source_ip: self.source.ip(),
            destination_ip: self.destination.ip(),
            destination_port: self.destination.port(),
            destination_namespace: &workload.namespace,
            destination_labels: None,
            destination_policies: &workload.authorization_policies,
        })
    }
}

/// The local workload at `ip`, if this proxy serves it.
pub fn local_workload(
    state: &ProxyState,
    served_uid: &str,
    network: &str,
    ip: IpAddr,
) -> Option<Arc<Workload>> {
    state
        .workload_by_ip(network, ip)
        .filter(|workload| workload.uid == served_uid)
        .cloned()
}

/// Live inbound connections, each with the token that closes it.
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: AtomicU64,
    live: Mutex<HashMap<u64, (Inbound, CancellationToken)>>,
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<LiveConnections>,
    id: u64,
    /// Cancelled when a policy change denies the connection.
    pub revoked: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl LiveConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Inbound, CancellationToken)>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an admitted connection.
    pub fn register(self: &Arc<Self>, inbound: Inbound) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.lock().insert(id, (inbound, revoked.clone()));
        Registered {
            registry: self.clone(),
            id,
            revoked,
        }
    }

    /// How many are live.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every live connection again; revokes those now denied (or whose
    /// workload is gone). Returns how many were revoked.
    pub fn recheck(&self, state: &ProxyState, served_uid: &str, network: &str) -> usize {
        let live = self.lock();
        let mut revoked = 0;
        for (inbound, token) in live.values() {
            let allowed = local_workload(state, served_uid, network, inbound.destination.ip())
                .is_some_and(|workload| inbound.evaluate(state, &workload).is_allowed());
            if !allowed && !token.is_cancelled() {
                token.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    /// Re-checks after every state change, until `shutdown`.
    pub async fn watch(
        self: Arc<Self>,
        state: SharedState,
        served_uid: String,
        network: String,
        shutdown: CancellationToken,
    ) {
        let mut changes = state.changes();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            let revoked = self.recheck(&state.read(), &served_uid, &network);
            if revoked > 0 {
                tracing::info!(revoked, "closed connections that policy now denies");
            }
        }
    }
}
