//! The sockets hickory's resolver talks to the upstream through.
//!
//! hickory asks its [`RuntimeProvider`] for a UDP socket per upstream
//! exchange (bound to a random port) and drops it when the exchange ends.
//! [`UpstreamRuntime`] hands out sockets from a [`SocketPool`] instead: a
//! dropped socket goes back to the pool and the next exchange reuses it, so a
//! steady stream of forwarded questions does not bind a socket each. At most
//! [`KEEP_IDLE`] sockets wait in the pool, none much longer than [`IDLE_FOR`]
//! (the server closes expired ones every [`IDLE_FOR`] as well), so after a
//! burst the pool empties. hickory still checks every answer
//! (source address, ID and question) before taking it, and a reused socket's
//! leftover datagrams are discarded before it is handed out again.
//!
//! [`UpstreamConnections`] builds hickory's connections on that runtime, with
//! one UDP send per exchange (no retransmission from a second socket while the
//! first waits: a retry is the resolver's next attempt). So an exchange holds
//! at most one socket, and the sockets in use never outnumber the forwarded
//! questions in flight. TCP is hickory's own: one connection per upstream,
//! reused, with its queries multiplexed.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, ProtocolConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::{
    DnsUdpSocket, RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use hickory_resolver::net::tcp::TcpClientStream;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::net::xfer::DnsExchange;
use hickory_resolver::{ConnectionProvider, PoolContext};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// The most idle sockets kept for reuse.
pub(crate) const KEEP_IDLE: usize = 32;

/// How long an idle socket is kept.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(10);

/// UDP sockets towards the upstream: those in use and those kept for reuse.
#[derive(Debug, Default)]
pub(crate) struct SocketPool {
    idle: Mutex<Vec<Idle>>,
    /// Sockets open, in use or idle.
    open: AtomicUsize,
}

#[derive(Debug)]
struct Idle {
    socket: UdpSocket,
    /// The address it is bound to (only its IP matters for reuse).
    local: IpAddr,
    since: Instant,
}

impl SocketPool {
    /// Sockets open now, in use or idle.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// An idle socket bound to `local`'s IP (its port, random, does not
    /// matter), or a new one bound to `local`.
    async fn take(self: Arc<Self>, local: SocketAddr) -> io::Result<PooledSocket> {
        let reused = {
            let mut idle = self.lock();
            self.expire(&mut idle, Instant::now());
            idle.iter()
                .rposition(|entry| entry.local == local.ip())
                .map(|at| idle.swap_remove(at).socket)
        };
        let socket = match reused {
            Some(socket) => {
                // Late answers to an earlier exchange are of no use to the next.
                let mut scratch = [0u8; 1];
                while socket.try_recv_from(&mut scratch).is_ok() {}
                socket
            }
            None => {
                let socket = UdpSocket::bind(local).await?;
                self.open.fetch_add(1, Ordering::Relaxed);
                socket
            }
        };
        Ok(PooledSocket {
            socket: Some(socket),
            pool: self,
        })
    }

    /// Keeps `socket` for reuse, or closes it when enough are kept.
    fn give_back(&self, socket: UdpSocket) {
        let Ok(local) = socket.local_addr() else {
            self.closed(1);
            return;
        };
        let now = Instant::now();
        let mut idle = self.lock();
        self.expire(&mut idle, now);
        if idle.len() < KEEP_IDLE {
            idle.push(Idle {
                socket,
                local: local.ip(),
                since: now,
            });
        } else {
            drop(idle);
            drop(socket);
            self.closed(1);
        }
    }

    /// Closes the sockets idle for [`IDLE_FOR`] or longer; run every
    /// [`IDLE_FOR`] too, so they go even when no question comes.
    pub(crate) fn close_idle(&self) {
        self.expire(&mut self.lock(), Instant::now());
    }

    /// Closes the sockets idle for [`IDLE_FOR`] or longer.
    fn expire(&self, idle: &mut Vec<Idle>, now: Instant) {
        let before = idle.len();
        idle.retain(|entry| now.saturating_duration_since(entry.since) < IDLE_FOR);
        self.closed(before - idle.len());
    }

    fn closed(&self, count: usize) {
        if count > 0 {
            self.open.fetch_sub(count, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        match self.idle.lock() {
            Ok(idle) => idle,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A socket from the pool, given back when dropped.
#[derive(Debug)]
pub(crate) struct PooledSocket {
    /// Always `Some` until dropped.
    socket: Option<UdpSocket>,
    pool: Arc<SocketPool>,
}

impl PooledSocket {
    fn socket(&self) -> io::Result<&UdpSocket> {
        self.socket
            .as_ref()
            .ok_or_else(|| io::Error::other("pooled socket already given back"))
    }
}

impl Drop for PooledSocket {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            self.pool.give_back(socket);
        }
    }
}

impl DnsUdpSocket for PooledSocket {
    type Time = TokioTime;

    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        match self.socket() {
            Ok(socket) => DnsUdpSocket::poll_recv_from(socket, cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        match self.socket() {
            Ok(socket) => DnsUdpSocket::poll_send_to(socket, cx, buf, target),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

/// hickory's Tokio runtime with UDP sockets from a [`SocketPool`].
#[derive(Clone)]
pub(crate) struct UpstreamRuntime {
    tokio: TokioRuntimeProvider,
    pool: Arc<SocketPool>,
}

impl std::fmt::Debug for UpstreamRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamRuntime")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl UpstreamRuntime {
    pub(crate) fn new(pool: Arc<SocketPool>) -> Self {
        Self {
            tokio: TokioRuntimeProvider::new(),
            pool,
        }
    }
}

impl RuntimeProvider for UpstreamRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = PooledSocket;
    type Tcp = <TokioRuntimeProvider as RuntimeProvider>::Tcp;

    fn create_handle(&self) -> Self::Handle {
        self.tokio.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = Result<Self::Tcp, io::Error>>>> {
        self.tokio.connect_tcp(server_addr, bind_addr, timeout)
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = Result<Self::Udp, io::Error>>>> {
        Box::pin(self.pool.clone().take(local_addr))
    }
}

/// Builds hickory's upstream connections on an [`UpstreamRuntime`]: UDP
/// exchanges of one send each, and hickory's multiplexed TCP.
#[derive(Clone, Debug)]
pub(crate) struct UpstreamConnections {
    runtime: UpstreamRuntime,
}

impl UpstreamConnections {
    pub(crate) fn new(runtime: UpstreamRuntime) -> Self {
        Self { runtime }
    }
}

impl ConnectionProvider for UpstreamConnections {
    type Conn = DnsExchange<UpstreamRuntime>;
    type FutureConn = Pin<Box<dyn Future<Output = Result<Self::Conn, NetError>> + Send>>;
    type RuntimeProvider = UpstreamRuntime;

    fn new_connection(
        &self,
        ip: IpAddr,
        config: &ConnectionConfig,
        cx: &PoolContext,
    ) -> Result<Self::FutureConn, NetError> {
        let remote = SocketAddr::new(ip, config.port);
        let runtime = self.runtime.clone();
        let options = &cx.options;
        match &config.protocol {
            ProtocolConfig::Udp => {
                let exchange = UdpClientStream::builder(remote, runtime)
                    .with_timeout(Some(options.timeout))
                    .with_max_retries(1)
                    .with_os_port_selection(options.os_port_selection)
                    .avoid_local_ports(options.avoid_local_udp_ports.clone())
                    .with_bind_addr(config.bind_addr);
                Ok(Box::pin(async move { Ok(exchange.exchange()) }))
            }
            ProtocolConfig::Tcp => Ok(Box::pin(TcpClientStream::exchange(
                remote,
                config.bind_addr,
                options.timeout,
                Some(options.max_active_requests),
                runtime,
            ))),
            #[allow(unreachable_patterns)]
            other => Err(NetError::from(format!(
                "upstream protocol {other:?} is not supported"
            ))),
        }
    }

    fn runtime_provider(&self) -> &Self::RuntimeProvider {
        &self.runtime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn a_dropped_socket_is_reused() {
        let pool = Arc::new(SocketPool::default());
        let first = pool.clone().take(localhost()).await.unwrap();
        let port = first.socket().unwrap().local_addr().unwrap().port();
        assert_eq!(pool.open(), 1);
        drop(first);
        assert_eq!(pool.open(), 1, "kept for reuse");
        let again = pool.clone().take(localhost()).await.unwrap();
        assert_eq!(again.socket().unwrap().local_addr().unwrap().port(), port);
        assert_eq!(pool.open(), 1);
        let second = pool.clone().take(localhost()).await.unwrap();
        assert_eq!(pool.open(), 2, "one in use: another is bound");
        drop((again, second));
        assert_eq!(pool.open(), 2);
    }

    #[tokio::test]
    async fn at_most_keep_idle_sockets_wait() {
        let pool = Arc::new(SocketPool::default());
        let mut taken = Vec::new();
        for _ in 0..KEEP_IDLE + 10 {
            taken.push(pool.clone().take(localhost()).await.unwrap());
        }
        assert_eq!(pool.open(), KEEP_IDLE + 10);
        drop(taken);
        assert_eq!(pool.open(), KEEP_IDLE);
    }

    #[tokio::test]
    async fn idle_sockets_expire() {
        let pool = Arc::new(SocketPool::default());
        drop(pool.clone().take(localhost()).await.unwrap());
        assert_eq!(pool.open(), 1);
        let later = Instant::now() + IDLE_FOR;
        pool.expire(&mut pool.lock(), later);
        assert_eq!(pool.open(), 0, "closed after IDLE_FOR");
        assert!(pool.lock().is_empty());
    }

    #[tokio::test]
    async fn leftover_datagrams_are_discarded() {
        let pool = Arc::new(SocketPool::default());
        let sender = UdpSocket::bind(localhost()).await.unwrap();
        let socket = pool.clone().take(localhost()).await.unwrap();
        let address = socket.socket().unwrap().local_addr().unwrap();
        let to = SocketAddr::new("127.0.0.1".parse().unwrap(), address.port());
        // A late answer arrives after its exchange gave the socket back.
        sender.send_to(b"late", to).await.unwrap();
        socket.socket().unwrap().readable().await.unwrap();
        drop(socket);
        let socket = pool.clone().take(localhost()).await.unwrap();
        assert_eq!(socket.socket().unwrap().local_addr().unwrap(), address);
        sender.send_to(b"next", to).await.unwrap();
        let mut buffer = [0u8; 16];
        let (len, _) = socket
            .socket()
            .unwrap()
            .recv_from(&mut buffer)
            .await
            .unwrap();
        assert_eq!(&buffer[..len], b"next");
    }
}
