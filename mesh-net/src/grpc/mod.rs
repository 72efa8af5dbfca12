//! gRPC over TLS, both ends: [`serve_router`] and [`ServerHandle`] serve
//! tonic services on a listener the caller bound (handshakes bounded by
//! [`crate::Acceptor`], each request told its peer in [`PeerInfo`]), and
//! [`tls_channel`] opens a client channel with a socket mark.

mod client;
mod handle;
mod server;

pub use client::{ChannelError, TlsChannel, tls_channel};
pub use handle::{ServerHandle, ServerNotReady};
pub use server::{Connection, OpenConnections, PeerInfo, serve_router};
