//! Serving gRPC services on a listener the caller bound, with or without TLS,
//! telling each request which peer it came from ([`PeerInfo`]: address and TLS
//! client certificates).
//!
//! Connections are accepted through [`crate::Acceptor`]: the TLS handshake
//! and the HTTP/2 preface must arrive within the [`HandshakeLimits`]' deadline
//! (10 s by default), at most 1024 connections may be in handshake at once
//! (64 from one address; a newer one ends the oldest), and a process out of
//! file descriptors backs off instead of spinning.
//!
//! The CA and xDS servers serve through this, and so does any binary that
//! mounts several services (the CA and xDS, say) on one port.
//! [`super::ServerHandle`] is the handle of a server spawned on its own task.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use crate::listen::{Acceptor, Handshake, HandshakeEnded, HandshakeLimits};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Router;

use rustls_pki_types::CertificateDer;

/// What a gRPC request knows of the connection it came on: in the request's
/// extensions (`request.extensions().get::<PeerInfo>()`).
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The client's TLS certificate chain, leaf first.
    pub certificates: Option<Arc<[CertificateDer<'static>]>>,
}

/// The HTTP/2 client preface's length (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

/// Connections accepted but not yet taken by the gRPC server.
const ACCEPT_BACKLOG: usize = 64;

/// A server's open connections: counted while they live (a drain reports
/// how many it had to close), and closed all at once by
/// [`OpenConnections::close_all`] (a shutdown, or a drain past its deadline:
/// tonic lets each connection finish its calls, which a client can keep
/// open). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct OpenConnections {
    count: Arc<AtomicUsize>,
    kill: CancellationToken,
}

impl OpenConnections {
    /// Connections open now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Fails every connection's reads and writes from now on, new ones too:
    /// each ends at once, whatever its calls are doing.
    pub fn close_all(&self) {
        self.kill.cancel();
    }
}

/// One connection, counted in [`OpenConnections`] until dropped, and ended
/// by its `close_all`.
struct Counted {
    count: Arc<AtomicUsize>,
    killed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted").finish_non_exhaustive()
    }
}

impl Counted {
    fn new(open: &OpenConnections) -> Self {
        open.count.fetch_add(1, Ordering::Relaxed);
        Self {
            count: open.count.clone(),
            killed: Box::pin(open.kill.clone().cancelled_owned()),
        }
    }

    /// An error once the connection is to be closed (and a wake-up then).
    fn check(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.killed.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server closed the connection",
            )
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets
/// in-flight calls finish. With `tls`, connections are TLS (its ALPN should
/// include `h2`); without, plaintext HTTP/2. Each client must finish its TLS
/// handshake and send the HTTP/2 preface within `limits`. Connections are
/// counted in `open`.
pub async fn serve_router(
    router: Router,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: HandshakeLimits,
    open: OpenConnections,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (connections, incoming) = mpsc::channel::<io::Result<Connection>>(ACCEPT_BACKLOG);
    let accept = accept_loop(
        Acceptor::new(listener, "gRPC", limits),
        tls.map(TlsAcceptor::from),
        connections,
        open,
        shutdown.clone(),
    );
    let server = router
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown.cancelled_owned());
    let ((), served) = tokio::join!(accept, server);
    served
}

async fn accept_loop(
    mut acceptor: Acceptor,
    tls: Option<TlsAcceptor>,
    connections: mpsc::Sender<io::Result<Connection>>,
    open: OpenConnections,
    shutdown: CancellationToken,
) {
    let handshakes = TaskTracker::new();
    loop {
        let (tcp, remote, handshake) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        // Small gRPC messages must not wait for delayed ACKs.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%remote, error = %err, "could not set TCP_NODELAY");
        }
        let counted = Counted::new(&open);
        let Some(tls) = tls.clone() else {
            let connection = Connection::new(Stream::Plain(tcp), remote, handshake, counted);
            if connections.send(Ok(connection)).await.is_err() {
                break;
            }
            continue;
        };
        let connections = connections.clone();
        let stop = shutdown.clone();
        handshakes.spawn(async move {
            let accepted = tokio::select! {
                accepted = handshake.within(tls.accept(tcp)) => accepted,
                // The server no longer takes connections.
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok(Ok(stream)) => {
                    let stream = Stream::Tls(Box::new(stream));
                    let connection = Connection::new(stream, remote, handshake, counted);
                    let _ = connections.send(Ok(connection)).await;
                }
                Ok(Err(err)) => tracing::debug!(%remote, error = %err, "TLS handshake failed"),
                Err(ended) => tracing::debug!(%remote, error = %ended, "TLS handshake given up"),
            }
        });
    }
    // No new connections queue up while the handshakes end.
    drop(acceptor);
    handshakes.close();
    handshakes.wait().await;
}

/// An accepted connection with the facts services need about it.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    remote: SocketAddr,
    /// Until the HTTP/2 preface has arrived: its deadline.
    preface: Option<Preface>,
    counted: Counted,
}

impl Connection {
    fn new(stream: Stream, remote: SocketAddr, handshake: Handshake, counted: Counted) -> Self {
        let preface = Preface {
            ended: Box::pin(handshake.ended()),
            missing: PREFACE_LEN,
            _handshake: handshake,
        };
        Self {
            stream,
            remote,
            preface: Some(preface),
            counted,
        }
    }
}

/// The HTTP/2 preface a connection still owes, and until when: the
/// connection's place among those in handshake is held until it arrives.
struct Preface {
    ended: Pin<Box<dyn Future<Output = HandshakeEnded> + Send>>,
    missing: usize,
    _handshake: Handshake,
}

impl std::fmt::Debug for Preface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preface")
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let certificates = match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(stream) => stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect()),
        };
        PeerInfo {
            remote_addr: Some(self.remote),
            certificates,
        }
    }
}

/// Runs `$body` on the stream, TLS or plain, unless the server has closed
/// the connection (then that error, at once).
macro_rules! both {
    ($self:ident, $cx:ident, $stream:ident => $body:expr) => {{
        let this = $self.get_mut();
        if let Some(closed) = this.counted.check($cx) {
            return Poll::Ready(Err(closed));
        }
        match &mut this.stream {
            Stream::Plain($stream) => {
                let $stream = Pin::new($stream);
                $body
            }
            Stream::Tls($stream) => {
                let $stream = Pin::new(&mut **$stream);
                $body
            }
        }
    }};
}

impl AsyncRead for Connection {
    /// Fails once the handshake's deadline passes with the preface still
    /// incomplete.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(closed) = this.counted.check(cx) {
            return Poll::Ready(Err(closed));
        }
        if let Some(preface) = &mut this.preface
            && let Poll::Ready(ended) = preface.ended.as_mut().poll(cx)
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("waiting for the HTTP/2 preface: {ended}"),
            )));
        }
        let before = buf.filled().len();
        let read = match &mut this.stream {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(&mut **stream).poll_read(cx, buf),
        };
        if let (Poll::Ready(Ok(())), Some(preface)) = (&read, &mut this.preface) {
            let got = buf.filled().len() - before;
            preface.missing = preface.missing.saturating_sub(got);
            if preface.missing == 0 || got == 0 {
                this.preface = None;
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        both!(self, cx, stream => stream.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, cx, stream => stream.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, cx, stream => stream.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, cx, stream => stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}
