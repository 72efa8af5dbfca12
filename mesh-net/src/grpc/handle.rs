//! A gRPC server on its own task, with the handle shape of every podless
//! component ([`crate::lifecycle`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;

use super::server::{OpenConnections, serve_router};
use crate::lifecycle::Drained;
use crate::listen::HandshakeLimits;

/// Why a server is not ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerNotReady {
    /// It has stopped (drained, shut down, or failed).
    #[error("the server has stopped")]
    Stopped,
}

/// A gRPC server running on its own task, with the handle shape of every
/// podless component ([`crate::lifecycle`]): its address, readiness,
/// drain, shutdown and join.
#[derive(Debug)]
pub struct ServerHandle<E> {
    local_addr: SocketAddr,
    stopping: CancellationToken,
    finished: CancellationToken,
    open: OpenConnections,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E> ServerHandle<E>
where
    E: From<tonic::transport::Error> + From<tokio::task::JoinError> + Send + 'static,
{
    /// Serves `router` on `listener` (see [`serve_router`]) on a task of the
    /// current runtime.
    pub fn spawn(
        router: Router,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: HandshakeLimits,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let stopping = CancellationToken::new();
        let finished = CancellationToken::new();
        let open = OpenConnections::default();
        let serve = serve_router(
            router,
            listener,
            tls,
            limits,
            open.clone(),
            stopping.clone(),
        );
        // Finished however the task ends: returned, failed or panicked.
        let done = finished.clone().drop_guard();
        let task = tokio::spawn(async move {
            let _done = done;
            serve.await.map_err(E::from)
        });
        Ok(Self {
            local_addr,
            stopping,
            finished,
            open,
            task,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Cancelled once the server is asked to stop (drain or shutdown): to
    /// end what it serves that does not end with its calls (open streams).
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.count()
    }

    /// Ready once spawned (the listener was bound by the caller) until it
    /// stops; `wait` is not needed and not spent.
    pub async fn ready(&self, _wait: Duration) -> Result<(), ServerNotReady> {
        if self.finished.is_cancelled() || self.stopping.is_cancelled() {
            return Err(ServerNotReady::Stopped);
        }
        Ok(())
    }

    /// Stops accepting; calls in progress finish for up to `deadline`, then
    /// the server stops and closes what is left.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.stopping.cancel();
        if tokio::time::timeout(deadline, self.finished.cancelled())
            .await
            .is_ok()
        {
            return Drained::Complete;
        }
        let left = self.open.count();
        self.open.close_all();
        self.task.abort();
        Drained::TimedOut { left }
    }

    /// Stops now, closing every connection. Idempotent.
    pub fn shutdown(&self) {
        self.stopping.cancel();
        self.open.close_all();
        self.task.abort();
    }

    /// Waits until the server has stopped; never stops it. A server stopped
    /// by [`ServerHandle::drain`] or [`ServerHandle::shutdown`] ends `Ok`.
    pub async fn join(self) -> Result<(), E> {
        match self.task.await {
            Ok(served) => served,
            Err(err) if err.is_cancelled() => Ok(()),
            Err(err) => Err(E::from(err)),
        }
    }
}
