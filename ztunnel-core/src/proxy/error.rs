//! Why a connection failed: [`ConnectionError`], one variant per step of the
//! outbound and inbound paths that can fail, naming the destination it was
//! for where one was known. Its `Display` is what the access log prints as
//! the connection's `error`.

use std::io;
use std::net::SocketAddr;

use authz::Reason;
use mesh_net::HandshakeEnded;

use super::context::IdentityError;
use super::route::RouteError;
use super::socks5::HandshakeError;
use crate::hbone::{HboneError, RequestError};

/// Why a connection failed, before or after it was established.
///
/// Errors once bytes flow ([`ConnectionError::Transfer`],
/// [`ConnectionError::Revoked`]) name no destination: the connection's
/// record, logged with them, has it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The original destination of a redirected connection could not be
    /// read.
    #[error("no destination: {0}")]
    NoDestination(#[source] io::Error),
    /// The SOCKS5 handshake failed.
    #[error("SOCKS5: {0}")]
    Socks5(#[source] HandshakeError),
    /// The SOCKS5 greeting did not come within the handshake's deadline, or
    /// was ended to make room for newer clients.
    #[error("SOCKS5 greeting: {0}")]
    Socks5Greeting(#[source] HandshakeEnded),
    /// A SOCKS5 client asked for a name that resolves neither to a mesh
    /// service nor through the system resolver.
    #[error("SOCKS5: the name {name:?} (port {port}) does not resolve")]
    Unresolved {
        /// The name asked for.
        name: String,
        /// The port asked for.
        port: u16,
    },
    /// The client's side of the connection failed before it was carried
    /// (reading its first bytes, or answering its SOCKS5 request).
    #[error("the client failed (to {destination}): {source}")]
    Client {
        /// Where it was going.
        destination: SocketAddr,
        /// What happened.
        source: io::Error,
    },
    /// The destination is one of the proxy's own ports: refused whatever
    /// policy says, as the connection would loop the proxy into itself.
    #[error("refused: {0} is one of the proxy's own ports (a self call)")]
    SelfCall(SocketAddr),
    /// No endpoint could be chosen for a service address.
    #[error("no route to {destination}: {source}")]
    Route {
        /// The service address.
        destination: SocketAddr,
        /// Why.
        source: RouteError,
    },
    /// The served workload cannot present a certificate to reach a mesh
    /// destination.
    #[error("no identity to reach {destination} with: {source}")]
    Identity {
        /// The endpoint.
        destination: SocketAddr,
        /// Why.
        source: IdentityError,
    },
    /// The destination workload has no valid SPIFFE identity, so its HBONE
    /// server could not be verified.
    #[error("workload {workload} ({destination}) has no valid identity")]
    NoPeerIdentity {
        /// The workload's uid.
        workload: String,
        /// The endpoint.
        destination: SocketAddr,
    },
    /// The CONNECT stream over HBONE could not be opened (TLS, the server's
    /// identity, HTTP/2, or the server's refusal).
    #[error("HBONE to {destination}: {source}")]
    Hbone {
        /// The endpoint.
        destination: SocketAddr,
        /// Why.
        source: HboneError,
    },
    /// A plain TCP connect failed (a destination outside the mesh, or a
    /// mesh workload that takes no HBONE).
    #[error("connect to {destination}: {source}")]
    Connect {
        /// Where.
        destination: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// An HBONE peer's CONNECT request was malformed.
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    /// The destination of an inbound connection is no workload this
    /// instance serves.
    #[error("{0} is not served here")]
    NotServed(SocketAddr),
    /// Policy denied the inbound connection.
    #[error("denied by policy ({reason:?}) to {destination}")]
    Denied {
        /// The served workload's address and port.
        destination: SocketAddr,
        /// Why.
        reason: Reason,
    },
    /// The local application could not be reached.
    #[error("application unreachable at {destination}: {source}")]
    ApplicationUnreachable {
        /// The application's address and port.
        destination: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The HBONE peer went away before the stream was answered.
    #[error("the peer went away (for {destination}): {source}")]
    PeerGone {
        /// Where its stream was going.
        destination: SocketAddr,
        /// What happened.
        source: h2::Error,
    },
    /// Carrying the bytes failed (a reset or an error on either side).
    #[error(transparent)]
    Transfer(io::Error),
    /// Policy now denies the connection: closed.
    #[error("closed: policy now denies it")]
    Revoked,
    /// The destination's instance on this node (the same-node shortcut) is
    /// not who the destination should be, or cannot be reached now.
    #[error("destination {destination} on this node: {problem}")]
    LocalPeer {
        /// Where it was going.
        destination: SocketAddr,
        /// What was wrong.
        problem: String,
    },
}
