//! SOCKS5 (RFC 1928), off by default: for clients whose connections cannot be
//! captured by redirect rules. Only what a proxy client needs: no
//! authentication, the CONNECT command, IPv4, IPv6 and domain-name targets
//! (mesh hostnames resolve to their service VIP from the state; other names
//! through the system resolver). The destination then goes through the same
//! path as a captured outbound connection.
//!
//! The parsing is sans-IO ([`parse_greeting`], [`parse_request`]): it takes
//! bytes, says whether more are needed, and names what was wrong.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
/// The largest request: header, a 255-byte name, the port.
const MAX_REQUEST: usize = 4 + 1 + 255 + 2;

/// Reply codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// Succeeded.
    Succeeded = 0,
    /// General failure.
    GeneralFailure = 1,
    /// Host unreachable (a name that does not resolve).
    HostUnreachable = 4,
    /// Command not supported.
    CommandNotSupported = 7,
    /// Address type not supported.
    AddressTypeNotSupported = 8,
}

/// What was wrong with a SOCKS5 message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Socks5Error {
    /// Not SOCKS version 5.
    #[error("SOCKS version {0}, expected 5")]
    Version(u8),
    /// A greeting offering no methods.
    #[error("the greeting offers no authentication method")]
    NoMethods,
    /// The client does not offer "no authentication".
    #[error("the client offers no method without authentication")]
    NoAcceptableMethod,
    /// A command other than CONNECT.
    #[error("command {0} is not supported (only CONNECT)")]
    Command(u8),
    /// The reserved byte is not zero.
    #[error("reserved byte {0:#04x}, expected 0")]
    Reserved(u8),
    /// An unknown address type.
    #[error("address type {0} is not supported")]
    AddressType(u8),
    /// An empty or non-UTF-8 domain name.
    #[error("the domain name is empty or not UTF-8")]
    DomainName,
}

impl Socks5Error {
    /// The reply that tells the client.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Command(_) => Reply::CommandNotSupported,
            Self::AddressType(_) | Self::DomainName => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        }
    }
}

/// Where the client wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An address.
    Address(SocketAddr),
    /// A name and port.
    Domain(String, u16),
}

/// Reads a greeting: `Ok(None)` if more bytes are needed, else the bytes it
/// took. Fails unless "no authentication" is offered.
pub fn parse_greeting(bytes: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let [version, count, rest @ ..] = bytes else {
        return Ok(None);
    };
    if *version != VERSION {
        return Err(Socks5Error::Version(*version));
    }
    let count = usize::from(*count);
    if count == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let Some(methods) = rest.get(..count) else {
        return Ok(None);
    };
    if !methods.contains(&NO_AUTHENTICATION) {
        return Err(Socks5Error::NoAcceptableMethod);
    }
    Ok(Some(2 + count))
}

/// Reads a CONNECT request: `Ok(None)` if more bytes are needed, else the
/// target and the bytes it took.
pub fn parse_request(bytes: &[u8]) -> Result<Option<(Target, usize)>, Socks5Error> {
    let [version, command, reserved, address_type, rest @ ..] = bytes else {
        return Ok(None);
    };
    if *version != VERSION {
        return Err(Socks5Error::Version(*version));
    }
    if *command != CONNECT {
        return Err(Socks5Error::Command(*command));
    }
    if *reserved != 0 {
        return Err(Socks5Error::Reserved(*reserved));
    }
    let port = |at: &[u8]| at.get(..2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    let parsed = match address_type {
        1 => rest.get(..4).and_then(|ip| {
            let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
            port(&rest[4..]).map(|port| {
                (
                    Target::Address(SocketAddr::new(IpAddr::V4(ip), port)),
                    4 + 4 + 2,
                )
            })
        }),
        4 => rest.get(..16).and_then(|ip| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(ip);
            let ip = Ipv6Addr::from(octets);
            port(&rest[16..]).map(|port| {
                (
                    Target::Address(SocketAddr::new(IpAddr::V6(ip), port)),
                    4 + 16 + 2,
                )
            })
        }),
        3 => {
            let Some((&length, after)) = rest.split_first() else {
                return Ok(None);
            };
            let length = usize::from(length);
            let Some(name) = after.get(..length) else {
                return Ok(None);
            };
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|name| !name.is_empty())
                .ok_or(Socks5Error::DomainName)?;
            port(&after[length..])
                .map(|port| (Target::Domain(name.to_owned(), port), 4 + 1 + length + 2))
        }
        other => return Err(Socks5Error::AddressType(*other)),
    };
    Ok(parsed)
}

/// The reply message (bound address 0.0.0.0:0: clients do not use it).
pub fn reply(code: Reply) -> [u8; 10] {
    [VERSION, code as u8, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Runs the handshake on `stream`; the target asked for. On a protocol error
/// the client is told why before the error is returned.
pub async fn handshake(stream: &mut TcpStream) -> Result<Target, HandshakeError> {
    let mut buffer = Vec::with_capacity(64);
    let taken = loop {
        match parse_greeting(&buffer) {
            Ok(Some(taken)) => break taken,
            Ok(None) => {}
            Err(err) => {
                if err == Socks5Error::NoAcceptableMethod {
                    let _ = stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await;
                }
                return Err(HandshakeError::Protocol(err));
            }
        }
        read_more(stream, &mut buffer, 2 + 255).await?;
    };
    buffer.drain(..taken);
    stream.write_all(&[VERSION, NO_AUTHENTICATION]).await?;
    loop {
        match parse_request(&buffer) {
            Ok(Some((target, taken))) => {
                // RFC 1928: the client waits for the reply before sending data.
                if taken != buffer.len() {
                    return Err(HandshakeError::EarlyData);
                }
                return Ok(target);
            }
            Ok(None) => read_more(stream, &mut buffer, MAX_REQUEST).await?,
            Err(err) => {
                let _ = stream.write_all(&reply(err.reply())).await;
                return Err(HandshakeError::Protocol(err));
            }
        }
    }
}

async fn read_more(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    limit: usize,
) -> Result<(), HandshakeError> {
    if buffer.len() >= limit {
        return Err(HandshakeError::TooLong);
    }
    let mut chunk = [0u8; 512];
    let read = stream.read(&mut chunk[..limit - buffer.len()]).await?;
    if read == 0 {
        return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    buffer.extend_from_slice(&chunk[..read]);
    Ok(())
}

/// Why a SOCKS5 handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The client broke the protocol.
    #[error(transparent)]
    Protocol(Socks5Error),
    /// Data sent before the reply.
    #[error("the client sent data before the SOCKS5 reply")]
    EarlyData,
    /// A message longer than any valid one.
    #[error("a SOCKS5 message longer than any valid one")]
    TooLong,
    /// I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Some(4)));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
        assert_eq!(parse_greeting(&[5, 0]), Err(Socks5Error::NoMethods));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(Socks5Error::NoAcceptableMethod)
        );
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 1, 0x1f, 0x90];
        assert_eq!(
            parse_request(&v4),
            Ok(Some((
                Target::Address("10.0.0.1:8080".parse().expect("addr")),
                10
            )))
        );
        assert_eq!(parse_request(&v4[..9]), Ok(None));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("ip").octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&v6),
            Ok(Some((
                Target::Address("[fd00::1]:80".parse().expect("addr")),
                22
            )))
        );
        let mut named = vec![5, 1, 0, 3, 4];
        named.extend_from_slice(b"echo");
        named.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&named),
            Ok(Some((Target::Domain("echo".into(), 80), 11)))
        );
        assert_eq!(parse_request(&[5, 2, 0, 1]), Err(Socks5Error::Command(2)));
        assert_eq!(parse_request(&[5, 1, 1, 1]), Err(Socks5Error::Reserved(1)));
        assert_eq!(
            parse_request(&[5, 1, 0, 9]),
            Err(Socks5Error::AddressType(9))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(Socks5Error::DomainName)
        );
        assert_eq!(Socks5Error::Command(2).reply(), Reply::CommandNotSupported);
    }

    proptest! {
        /// Any bytes: an answer, never a panic, and a request's consumed
        /// length never exceeds the input.
        #[test]
        fn any_bytes_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(taken)) = parse_greeting(&bytes) {
                prop_assert!(taken <= bytes.len());
            }
            if let Ok(Some((_, taken))) = parse_request(&bytes) {
                prop_assert!(taken <= bytes.len());
            }
        }

        /// Every IPv4 target round-trips through the wire form.
        #[test]
        fn ipv4_targets_round_trip(ip in any::<u32>(), port in any::<u16>()) {
            let mut wire = vec![5, 1, 0, 1];
            wire.extend_from_slice(&ip.to_be_bytes());
            wire.extend_from_slice(&port.to_be_bytes());
            let expected = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port);
            prop_assert_eq!(parse_request(&wire), Ok(Some((Target::Address(expected), 10))));
        }
    }
}
