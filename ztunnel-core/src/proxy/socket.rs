//! Socket options the proxy needs from the OS: the original destination of a
//! redirected connection, the mark that keeps the proxy's own connections out
//! of the redirect rules (WIRE.md §6), `TCP_NODELAY`, and resets.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The mark on the proxy's own sockets (0x539), excluded by the redirect rules.
pub const PROXY_MARK: u32 = 1337;

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

/// Connects to `address` from a socket carrying `mark` (when set), with
/// `TCP_NODELAY`.
pub async fn connect(address: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    connect_from(address, None, mark).await
}

/// [`connect`] from the local address `source` (when set). The port is
/// chosen at connect time (`IP_BIND_ADDRESS_NO_PORT`), per destination, so
/// many connections from one address do not exhaust the ephemeral ports.
pub async fn connect_from(
    address: SocketAddr,
    source: Option<IpAddr>,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        setsockopt(&socket, sockopt::Mark, &mark).map_err(io::Error::from)?;
    }
    if let Some(source) = source.filter(|source| source.is_ipv4() == address.is_ipv4()) {
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(address).await
}

/// Sets `TCP_NODELAY` on `listener`, which the connections it accepts
/// inherit (Linux copies the listener's options into each accepted socket):
/// one syscall for the listener rather than one per connection. `false` if
/// it could not be set; each connection then needs [`TcpStream::set_nodelay`].
pub fn nodelay_for_accepted(listener: &TcpListener) -> bool {
    setsockopt(listener, sockopt::TcpNoDelay, &true).is_ok()
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
    async fn accepted_connections_inherit_the_listeners_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(
            !accept_one(&listener).await.nodelay().unwrap(),
            "off by default"
        );
        assert!(nodelay_for_accepted(&listener));
        assert!(accept_one(&listener).await.nodelay().unwrap());
    }
}
