//! The instance context: what every connection of one proxy instance
//! shares (the state, the served workload and its certificate lease, TLS,
//! the HBONE pool, the live inbound connections, metrics), and the tasks it
//! tracks for a drain.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_api::Identity;
use mesh_api::workload::Workload;
use mesh_ca::WorkloadCertificate;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::authorize::LiveConnections;
use super::baggage::BaggageCache;
use super::local::SameNode;
use super::route::workload_identity;
use crate::certs::{CertError, CertLease, CertManager};
use crate::hbone::HbonePool;
use crate::net::socket::SocketNamespace;
use crate::state::SharedState;
use crate::telemetry::metrics::Metrics;
use crate::tls::{TlsConfigs, TlsError, WorkloadTls};
use crate::xds::Demander;

/// Why the served workload cannot use TLS yet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The served workload is not in the state (not synced yet, or unknown).
    #[error("workload {0} is not known (yet)")]
    UnknownWorkload(String),
    /// Its identity is not valid.
    #[error("workload {0} has no valid identity")]
    NoIdentity(String),
    /// No certificate.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// The certificate cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The instance was shut down or drained.
    #[error("the proxy instance has stopped")]
    Stopped,
}

/// What every connection of an instance shares.
#[derive(Debug)]
pub(super) struct Context {
    pub(super) state: SharedState,
    pub(super) certs: CertManager,
    pub(super) served_uid: String,
    pub(super) identity: Option<Identity>,
    pub(super) network: String,
    pub(super) mark: Option<u32>,
    /// Where its sockets are made (node mode: in the served pod).
    pub(super) sockets: SocketNamespace,
    /// The other instances of its node proxy, for the same-node shortcut.
    pub(super) same_node: Option<SameNode>,
    pub(super) tls: TlsConfigs,
    pub(super) certificate_wait: Duration,
    pub(super) hbone_port: u16,
    pub(super) pool: HbonePool,
    pub(super) live: Arc<LiveConnections>,
    pub(super) baggage: BaggageCache,
    pub(super) metrics: Option<Metrics>,
    pub(super) demander: Option<Demander>,
    /// Connection tasks, waited for by a drain.
    pub(super) tasks: TaskTracker,
    /// Ends every connection (drain deadline, shutdown).
    pub(super) force_close: CancellationToken,
    /// Ends everything.
    pub(super) shutdown: CancellationToken,
    /// The served identity's certificate, held while the instance runs
    /// (taken on first use; released when it stops).
    pub(super) lease: Mutex<Option<Arc<CertLease>>>,
    /// The ports of the instance's own listeners (and of HBONE): never a
    /// destination, or one request would loop the proxy into itself.
    pub(super) own_ports: Vec<u16>,
}

impl Context {
    /// Whether `port` is one the proxy itself listens on: a connection
    /// there through the proxy would come back to it (a "self call").
    pub(super) fn is_own_port(&self, port: u16) -> bool {
        self.own_ports.contains(&port)
    }

    /// The served workload's identity.
    pub(super) fn served_identity(&self) -> Result<Identity, IdentityError> {
        self.identity_of(self.state.read().workload(&self.served_uid).map(|w| &**w))
    }

    /// The served workload's identity, given the workload as the state knows
    /// it (`None`: not known): the configured one, else the workload's.
    pub(super) fn identity_of(&self, served: Option<&Workload>) -> Result<Identity, IdentityError> {
        if let Some(identity) = &self.identity {
            return Ok(identity.clone());
        }
        let workload =
            served.ok_or_else(|| IdentityError::UnknownWorkload(self.served_uid.clone()))?;
        workload_identity(workload)
            .ok_or_else(|| IdentityError::NoIdentity(self.served_uid.clone()))
    }

    /// Runs a connection's work, made by `make`, as a task a drain waits for
    /// and a forced close ends.
    ///
    /// The work is made inside the task rather than passed in: a future
    /// captured by the task and then raced would be stored twice in it, and
    /// each connection's task lives as long as the connection.
    pub(super) fn spawn_tracked<Work>(&self, make: impl FnOnce() -> Work + Send + 'static)
    where
        Work: Future<Output = ()> + Send,
    {
        let force_close = self.force_close.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = make() => {}
                () = force_close.cancelled() => {}
            }
        });
    }

    /// TLS with the served workload's current certificate.
    pub(super) async fn workload_tls(&self) -> Result<WorkloadTls, IdentityError> {
        self.tls_for(&self.served_identity()?).await
    }

    /// TLS with the served `identity`'s current certificate.
    pub(super) async fn tls_for(&self, identity: &Identity) -> Result<WorkloadTls, IdentityError> {
        let certificate = self.certificate(identity, self.certificate_wait).await?;
        Ok(self.tls.for_certificate(&certificate)?)
    }

    /// The served `identity`'s current certificate, waiting up to `wait` for
    /// the first, through the instance's lease on it.
    pub(super) async fn certificate(
        &self,
        identity: &Identity,
        wait: Duration,
    ) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        // The lease is held while waiting, so a stop meanwhile cannot leave
        // a certificate nobody holds.
        let lease = self.lease_for(identity)?;
        Ok(lease.certificate(wait).await?)
    }

    /// The instance's lease on `identity`: taken on first use, replaced if
    /// the served workload's identity changed; none once stopped.
    pub(super) fn lease_for(&self, identity: &Identity) -> Result<Arc<CertLease>, IdentityError> {
        let mut held = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock: `stop` cancels before it takes the lease.
        if self.shutdown.is_cancelled() {
            return Err(IdentityError::Stopped);
        }
        if let Some(lease) = held.as_ref().filter(|lease| lease.identity() == identity) {
            return Ok(lease.clone());
        }
        let lease = Arc::new(self.certs.lease(identity)?);
        *held = Some(lease.clone());
        Ok(lease)
    }

    /// Stops everything at once: listeners, connections, the policy watch;
    /// gives back the certificate lease (connections still closing hold it
    /// until they end).
    pub(super) fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let lease = self
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(lease);
    }
}
