//! A running instance's handle ([`ZtunnelHandle`], the verbs of
//! [`mesh_net::lifecycle`]) and the supervision of its long-running tasks:
//! the first that fails stops the instance and is what `join` returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_net::Drained;
use prometheus_client::registry::Registry;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admin::Admin;
use super::context::{Context, IdentityError};

/// Why a running instance stopped other than by `drain` or `shutdown`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// One of its tasks (a listener's, or the policy watch) failed; the
    /// instance was stopped.
    #[error("the proxy instance's {task} task failed: {reason}")]
    Task {
        /// Which: `"outbound"`, `"inbound plaintext"`, `"HBONE"`, `"SOCKS5"`,
        /// `"policy watch"`.
        task: &'static str,
        /// What happened (a panic's message).
        reason: String,
    },
}

/// The long-running tasks of an instance, by name.
#[derive(Default)]
pub(super) struct Tasks {
    set: JoinSet<()>,
    names: Vec<(tokio::task::Id, &'static str)>,
}

impl Tasks {
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.set.spawn(task).id();
        self.names.push((id, name));
    }

    /// Waits for every task to end; the first that fails stops the instance
    /// and is the outcome. Then waits for the connections to end (a stopped
    /// instance has closed them).
    async fn supervise(mut self, ctx: Arc<Context>) -> Result<(), ServeError> {
        let mut failure = None;
        while let Some(ended) = self.set.join_next().await {
            let Err(err) = ended else { continue };
            let task = self
                .names
                .iter()
                .find(|(id, _)| *id == err.id())
                .map_or("background", |(_, name)| *name);
            tracing::error!(task, error = %err, "a proxy task failed; stopping the instance");
            ctx.stop();
            failure.get_or_insert(ServeError::Task {
                task,
                reason: err.to_string(),
            });
        }
        ctx.tasks.close();
        ctx.tasks.wait().await;
        failure.map_or(Ok(()), Err)
    }
}

/// A running instance: its addresses, readiness and lifecycle, as every
/// component's handle ([`mesh_net::lifecycle`]). Dropping it leaves the
/// instance running.
#[derive(Debug)]
pub struct ZtunnelHandle {
    ctx: Arc<Context>,
    addresses: [SocketAddr; 3],
    socks5: Option<SocketAddr>,
    /// Stops the listeners (a drain).
    accepting: CancellationToken,
    /// Empty once the instance has stopped.
    stopped: TaskTracker,
    supervisor: JoinHandle<Result<(), ServeError>>,
}

impl ZtunnelHandle {
    /// The handle of the instance `ctx` whose long-running `tasks` were just
    /// spawned: supervised from now on.
    pub(super) fn supervise(
        ctx: Arc<Context>,
        tasks: Tasks,
        addresses: [SocketAddr; 3],
        socks5: Option<SocketAddr>,
        accepting: CancellationToken,
    ) -> Self {
        let stopped = TaskTracker::new();
        let supervisor = stopped.spawn(tasks.supervise(ctx.clone()));
        stopped.close();
        Self {
            ctx,
            addresses,
            socks5,
            accepting,
            stopped,
            supervisor,
        }
    }

    /// What peers reach the instance on: its HBONE listener's address (as
    /// [`ZtunnelHandle::hbone_addr`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.hbone_addr()
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.addresses[0]
    }

    /// The plaintext inbound listener's address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.addresses[1]
    }

    /// The HBONE listener's address.
    pub fn hbone_addr(&self) -> SocketAddr {
        self.addresses[2]
    }

    /// The SOCKS5 listener's address, if it has one.
    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        self.socks5
    }

    /// The admin endpoints of this instance, with `registry` (the one given
    /// to [`ZtunnelBuilder::metrics`](super::ZtunnelBuilder::metrics)) for
    /// `/metrics`. Serve them with
    /// [`Admin::serve`].
    pub fn admin(&self, registry: Option<Arc<Registry>>) -> Admin {
        Admin::new(self.ctx.clone(), registry)
    }

    /// Inbound connections open now.
    pub fn live_inbound(&self) -> usize {
        self.ctx.live.len()
    }

    /// Pooled outbound HBONE connections open now.
    pub fn pooled_connections(&self) -> usize {
        self.ctx.pool.connection_count()
    }

    /// Starts fetching the served workload's certificate now, in the
    /// background, rather than on its first connection (a node proxy does
    /// so as a pod is added, as ztunnel does). Nothing happens if the
    /// served identity is not known yet; a failure is the first
    /// connection's to report.
    pub fn prefetch_certificate(&self) {
        let ctx = self.ctx.clone();
        if let Ok(identity) = ctx.served_identity() {
            tokio::spawn(async move {
                let _ = ctx.certificate(&identity, ctx.certificate_wait).await;
            });
        }
    }

    /// Waits up to `wait` until the served workload is known and has its
    /// certificate: the instance can then carry traffic both ways. Otherwise
    /// why not (unknown workload, no identity, no certificate, stopped).
    pub async fn ready(&self, wait: Duration) -> Result<(), IdentityError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.ctx.state.changes();
        if let (Err(IdentityError::UnknownWorkload(uid)), Some(demander)) =
            (self.ctx.served_identity(), &self.ctx.demander)
        {
            demander.demand(&uid, wait).await;
        }
        let identity = loop {
            match self.ctx.served_identity() {
                Ok(identity) => break identity,
                Err(err) => {
                    if tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_err()
                    {
                        return Err(err);
                    }
                }
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.ctx.certificate(&identity, left).await?;
        Ok(())
    }

    /// Stops accepting, lets open connections (and HBONE streams) finish for
    /// up to `deadline`, then closes what is left and stops, as
    /// [`ZtunnelHandle::shutdown`]. Returns once the instance has stopped:
    /// [`Drained::TimedOut`] counts what was closed at the deadline:
    /// connections, and each HBONE connection's open streams too.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.accepting.cancel();
        self.ctx.tasks.close();
        let drained = match tokio::time::timeout(deadline, self.ctx.tasks.wait()).await {
            Ok(()) => Drained::Complete,
            Err(_) => match self.ctx.tasks.len() {
                // The last ended as the deadline passed.
                0 => Drained::Complete,
                left => Drained::TimedOut { left },
            },
        };
        self.shutdown();
        self.stopped.wait().await;
        drained
    }

    /// Stops now: closes the listeners and every connection, and gives back
    /// the served identity's certificate lease (the certificate manager
    /// drops the certificate once no running instance serves that
    /// identity). Idempotent; returns at once (see [`ZtunnelHandle::join`]).
    pub fn shutdown(&self) {
        self.ctx.stop();
    }

    /// Waits until the instance has stopped (after [`ZtunnelHandle::drain`]
    /// or [`ZtunnelHandle::shutdown`], or when one of its tasks failed, which
    /// is the error). Never stops it.
    pub async fn join(self) -> Result<(), ServeError> {
        match self.supervisor.await {
            Ok(outcome) => outcome,
            Err(err) => Err(ServeError::Task {
                task: "supervisor",
                reason: err.to_string(),
            }),
        }
    }
}
