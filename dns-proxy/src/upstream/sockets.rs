//! The sockets hickory's resolver talks to the upstream through.
//!
//! hickory asks its [`RuntimeProvider`] for a UDP socket per upstream
//! exchange. [`UpstreamRuntime`] binds each on a fresh random port, as
//! hickory's own does, and counts it in a [`SocketPool`] while it is open.
//! Sockets are never reused: a new random source port per question is half
//! of what an off-path attacker must guess to spoof an answer (RFC 5452), and
//! the answers a proxy caches serve every pod. hickory checks every answer
//! (source address, ID and question) before taking it.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// UDP sockets towards the upstream, counted while open.
#[derive(Debug, Default)]
pub(crate) struct SocketPool {
    /// Sockets open now.
    open: AtomicUsize,
}

impl SocketPool {
    /// Sockets open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A new socket bound to `local` (its port chosen at random by the
    /// kernel when `local`'s is 0), counted until dropped.
    async fn take(self: Arc<Self>, local: SocketAddr) -> io::Result<PooledSocket> {
        let socket = UdpSocket::bind(local).await?;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(PooledSocket {
            socket: Some(socket),
            pool: self,
        })
    }
}

/// A socket counted in its [`SocketPool`]; closed when dropped.
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
            .ok_or_else(|| io::Error::other("socket already closed"))
    }
}

impl Drop for PooledSocket {
    fn drop(&mut self) {
        if self.socket.take().is_some() {
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
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
    async fn every_exchange_gets_a_fresh_socket_counted_while_open() {
        let pool = Arc::new(SocketPool::default());
        let first = pool.clone().take(localhost()).await.unwrap();
        let port = first.socket().unwrap().local_addr().unwrap().port();
        assert_eq!(pool.open(), 1);
        drop(first);
        assert_eq!(pool.open(), 0, "closed, not kept");
        // A socket bound while the first still held its port gets another:
        // none is ever handed out twice.
        let held = pool.clone().take(localhost()).await.unwrap();
        let next = pool.clone().take(localhost()).await.unwrap();
        assert_ne!(
            held.socket().unwrap().local_addr().unwrap().port(),
            next.socket().unwrap().local_addr().unwrap().port()
        );
        assert_eq!(pool.open(), 2);
        drop((held, next));
        assert_eq!(pool.open(), 0);
        let _ = port;
    }
}
