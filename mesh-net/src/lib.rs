#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`lifecycle`]: the one shape of every component's handle.
//! - [`listen`]: accepting connections with bounded, deadlined handshakes and
//!   back-off when the process runs out of file descriptors.
//! - [`grpc`]: gRPC over TLS: serving tonic services on a caller-bound
//!   listener with a handle, and client channels with a socket mark.
//! - [`spiffe`]: SPIFFE identities in certificates and the mesh's TLS
//!   verifiers.
//! - [`auth`]: authenticating gRPC callers (client certificates, bearer
//!   tokens, Kubernetes service-account JWTs) and authorizing impersonation.
//! - [`mark`]: the socket mark that keeps the mesh's own connections out of
//!   the redirect rules.
//! - [`backoff`]: exponential retry delays with jitter.
//! - [`config`]: reading components' `Config`s from YAML, with errors that
//!   name the field.
//! - [`throttle`]: logging a recurring event at a bounded rate.
//! - [`netns`]: network namespaces: running code and programs inside one,
//!   opening sockets in one.
//! - [`zds`]: the ZDS transport (one protobuf message per `SOCK_SEQPACKET`
//!   datagram, a network namespace passed along as a file descriptor).

pub mod auth;
pub mod backoff;
pub mod config;
pub mod grpc;
pub mod lifecycle;
pub mod listen;
pub mod mark;
pub mod netns;
pub mod spiffe;
pub mod throttle;
pub mod zds;

pub use auth::{
    Authenticated, Authenticator, Authenticators, Caller, ClientCertificate, JwtAuthenticator,
    NodeAuthorizer, PodRef, StaticNodeAuthorizer, StaticTokens,
};
pub use backoff::Backoff;
pub use grpc::{PeerInfo, ServerHandle, ServerNotReady};
pub use lifecycle::Drained;
pub use listen::{Acceptor, Handshake, HandshakeEnded, HandshakeLimits};
pub use mark::{PROXY_MARK, check_mark, set_mark};
pub use spiffe::{SpiffeError, TrustRoots, peer_identity, spiffe_identity};
pub use throttle::Throttle;

// What an embedder needs from the crates in the API, at matching versions.
pub use tokio_util::sync::CancellationToken;
pub use tonic;
