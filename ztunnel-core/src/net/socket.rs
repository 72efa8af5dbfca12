//! Socket options the proxy needs from the OS: the original destination of a
//! redirected connection, the mark that keeps the proxy's own connections out
//! of the redirect rules (WIRE.md §6), `TCP_NODELAY`, and resets; and the
//! network namespace sockets are made in ([`SocketNamespace`]: the process's,
//! or in node mode the served pod's).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

use mesh_net::netns::Netns;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

pub use mesh_net::PROXY_MARK;

/// Where a redirected connection was going: `SO_ORIGINAL_DST`, else (not
/// redirected) the address it reached. The family is the client's (`source`,
/// from `accept`), so a redirected connection costs one syscall here.
pub fn original_destination(stream: &TcpStream, source: SocketAddr) -> io::Result<SocketAddr> {
    let ipv4 = match source {
        SocketAddr::V4(_) => true,
        // A dual-stack listener's IPv4 clients are conntracked as IPv4.
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4 {
        getsockopt(stream, sockopt::OriginalDst).map(|addr| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            ))
        })
    } else {
        getsockopt(stream, sockopt::Ip6tOriginalDst).map(|addr| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                0,
                addr.sin6_scope_id,
            ))
        })
    };
    original.or_else(|_| stream.local_addr())
}

/// Where a proxy instance makes its sockets: in the process's own network
/// namespace (dedicated mode: the process runs in its workload's), or inside
/// the served pod's (node mode: listeners, connections to peers and to the
/// application all start in the pod, as if the proxy ran there). Cheap to
/// clone.
#[derive(Clone, Debug, Default)]
pub struct SocketNamespace {
    pod: Option<Arc<PodNamespace>>,
}

#[derive(Debug)]
struct PodNamespace {
    pod: Netns,
    /// The namespace the process's threads are in (they never leave it but
    /// for a socket's creation).
    home: Netns,
}

impl SocketNamespace {
    /// The process's own namespace.
    pub fn process() -> Self {
        Self::default()
    }

    /// Inside `pod`; the calling thread's namespace is where every thread
    /// of the process returns after making a socket.
    pub fn pod(pod: Netns) -> io::Result<Self> {
        Ok(Self {
            pod: Some(Arc::new(PodNamespace {
                pod,
                home: Netns::current()?,
            })),
        })
    }

    /// The pod's namespace, if not the process's.
    pub fn netns(&self) -> Option<&Netns> {
        self.pod.as_ref().map(|inside| &inside.pod)
    }

    /// Runs `make` (which creates a socket) in this namespace.
    pub fn make<T>(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.pod {
            None => make(),
            Some(inside) => inside.pod.enter_from(&inside.home, make)?,
        }
    }

    /// A TCP socket of `address`'s family, in this namespace.
    pub fn tcp_socket_for(&self, address: SocketAddr) -> io::Result<TcpSocket> {
        self.make(|| tcp_socket_for(address))
    }

    /// [`listen_with_nodelay`], in this namespace.
    pub fn listen(&self, address: SocketAddr) -> io::Result<TcpListener> {
        self.make(|| listen_with_nodelay(address))
    }

    /// A UDP socket bound to `address`, in this namespace (needs a tokio
    /// runtime).
    pub fn udp(&self, address: SocketAddr) -> io::Result<UdpSocket> {
        let socket = self.make(|| std::net::UdpSocket::bind(address))?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    }
}

/// Connects to `address` from a socket carrying `mark` (when set), with
/// `TCP_NODELAY`.
pub async fn connect(address: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    connect_from(address, None, mark).await
}

/// [`connect`] from a socket made in `namespace`.
pub async fn connect_in(
    namespace: &SocketNamespace,
    address: SocketAddr,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    connect_from_in(namespace, address, None, mark).await
}

/// [`connect`] from the local address `source` (when set). The port is
/// chosen at connect time (`IP_BIND_ADDRESS_NO_PORT`), per destination, so
/// many connections from one address do not exhaust the ephemeral ports.
pub async fn connect_from(
    address: SocketAddr,
    source: Option<IpAddr>,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    connect_from_in(&SocketNamespace::process(), address, source, mark).await
}

/// [`connect_from`] with a socket made in `namespace`.
pub async fn connect_from_in(
    namespace: &SocketNamespace,
    address: SocketAddr,
    source: Option<IpAddr>,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    let socket = namespace.tcp_socket_for(address)?;
    if let Some(mark) = mark {
        mesh_net::set_mark(&socket, mark)?;
    }
    if let Some(source) = source.filter(|source| source.is_ipv4() == address.is_ipv4()) {
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(address).await
}

/// A listener on `address` whose accepted connections have `TCP_NODELAY`
/// from the start: set on the socket before it listens, so every connection
/// inherits it (Linux copies a listener's options into each socket it
/// accepts) and none needs a syscall of its own. Otherwise as
/// [`TcpListener::bind`] (`SO_REUSEADDR`, a backlog of 1024).
pub fn listen_with_nodelay(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = tcp_socket_for(address)?;
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// Whether the connections `listener` accepts inherit `TCP_NODELAY`: it was
/// set on the listener (before it listened, as [`listen_with_nodelay`] does;
/// set later, connections already queued would miss it). If not, each
/// accepted connection needs [`TcpStream::set_nodelay`].
pub fn accepted_have_nodelay(listener: &TcpListener) -> bool {
    getsockopt(listener, sockopt::TcpNoDelay).unwrap_or(false)
}

/// A TCP socket of `address`'s family.
fn tcp_socket_for(address: SocketAddr) -> io::Result<TcpSocket> {
    match address {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

/// Drops `stream` with a TCP reset (linger 0) rather than a FIN, so the
/// client sees the connection fail.
pub fn reset(stream: TcpStream) {
    // Best effort: if linger cannot be set the drop still closes it.
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accept_one(listener: &TcpListener) -> TcpStream {
        let address = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        accepted.unwrap().0
    }

    #[tokio::test]
    async fn connections_accepted_by_a_nodelay_listener_have_nodelay() {
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(!accepted_have_nodelay(&plain));
        assert!(
            !accept_one(&plain).await.nodelay().unwrap(),
            "off by default"
        );
        let listener = listen_with_nodelay("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(accepted_have_nodelay(&listener));
        // Queued before anyone accepts: inherited all the same.
        let queued = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(queued);
        assert!(accept_one(&listener).await.nodelay().unwrap());
    }
}
