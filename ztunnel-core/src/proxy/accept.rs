//! How the proxy's listeners take connections: the accept loops (through
//! [`mesh_net::Acceptor`], with `TCP_NODELAY`, each connection a task the
//! instance tracks), and the two stages of a connection, setting up and then
//! carrying bytes ([`Established`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use mesh_net::{Acceptor, Handshake};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::context::Context;
use super::error::ConnectionError;
use crate::net::socket::accepted_have_nodelay;
use crate::telemetry::ByteCounts;

/// The next connection `acceptor` admits, with `TCP_NODELAY`, or `None`
/// once `stop` is cancelled.
async fn next_connection(
    acceptor: &mut Acceptor,
    inherits_nodelay: bool,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, Handshake)> {
    let (tcp, peer, handshake) = tokio::select! {
        () = stop.cancelled() => return None,
        accepted = acceptor.accept() => accepted,
    };
    if !inherits_nodelay {
        let _ = tcp.set_nodelay(true);
    }
    Some((tcp, peer, handshake))
}

/// Accepts until `stop`; each connection runs `handle` as a task the
/// instance tracks (a drain waits for it) and a forced close ends. For
/// listeners whose clients owe no handshake: each connection's place among
/// those in handshake is given back at once.
pub(super) async fn accept_loop<F, Fut>(
    ctx: Arc<Context>,
    mut acceptor: Acceptor,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(Arc<Context>, TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let inherits_nodelay = accepted_have_nodelay(acceptor.listener());
    while let Some((tcp, peer, handshake)) =
        next_connection(&mut acceptor, inherits_nodelay, &stop).await
    {
        drop(handshake);
        let connection = ctx.clone();
        let handle = handle.clone();
        ctx.spawn_tracked(move || handle(connection, tcp, peer));
    }
}

/// [`accept_loop`] for listeners whose clients owe a handshake (TLS,
/// SOCKS5): `handle` gets the [`Handshake`], runs the client's handshake
/// within its deadline, and drops it when done.
pub(super) async fn accept_handshakes<F, Fut>(
    ctx: Arc<Context>,
    mut acceptor: Acceptor,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(Arc<Context>, TcpStream, SocketAddr, Handshake) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let inherits_nodelay = accepted_have_nodelay(acceptor.listener());
    while let Some((tcp, peer, handshake)) =
        next_connection(&mut acceptor, inherits_nodelay, &stop).await
    {
        let connection = ctx.clone();
        let handle = handle.clone();
        ctx.spawn_tracked(move || handle(connection, tcp, peer, handshake));
    }
}

/// The outcome of carrying a connection: the bytes it moved (request,
/// response: client to destination and back), also when it failed, and what
/// went wrong if it did.
#[derive(Debug)]
pub(super) struct Carried {
    pub(super) bytes: ByteCounts,
    pub(super) error: Option<ConnectionError>,
}

impl Carried {
    pub(super) fn is_err(&self) -> bool {
        self.error.is_some()
    }
}

/// A connection past its setup: all that carrying its bytes needs.
pub(super) trait Established: Send {
    /// Copies both ways until both ends closed. Borrowed, so the future holds
    /// no second copy of the connection.
    fn carry(&mut self) -> impl Future<Output = Carried> + Send;

    /// Hands its record to telemetry; an error resets it.
    fn finish(self, outcome: &Carried);
}

/// Runs a connection. Setting up (routing, lookups, certificates, policy,
/// the CONNECT) takes far more state than carrying bytes: `setup` comes boxed
/// and is freed once established, so a connection's task stays small while
/// it lives.
pub(super) async fn run_connection<E: Established>(
    setup: Pin<Box<impl Future<Output = Option<E>>>>,
) {
    let Some(mut established) = setup.await else {
        return;
    };
    let outcome = established.carry().await;
    established.finish(&outcome);
}
