//! HBONE: workload traffic as HTTP/2 CONNECT streams inside mutual TLS to port
//! 15008 (WIRE.md §4). Both sides, side by side:
//!
//! - [`client`]: one connection to a peer's HBONE port and the CONNECT streams
//!   opened on it; [`pool`]: those connections shared by key, one opened at
//!   a time per key;
//! - [`server`]: accepting HBONE connections and their CONNECT streams;
//! - [`headers`]: the request headers (`:authority`, `forwarded`, `baggage`);
//! - here: the wire constants both sides use.
//!
//! The copy between a TCP connection and a stream, and the sockets, are in
//! [`crate::net`]; who may connect to what is [`crate::proxy`]'s.

pub mod client;
pub mod headers;
pub mod pool;
pub mod server;

use std::time::Duration;

pub use client::{HboneError, HboneStream, PendingStream};
pub use pool::{HbonePool, PoolKey};
pub use server::{ConnectRequest, HboneServer, RequestError};

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;
/// HTTP/2 stream window (as ztunnel).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window (as ztunnel).
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 maximum frame size (as ztunnel).
pub const MAX_FRAME_SIZE: u32 = 1 << 20;
/// Streams per pooled connection before another is opened.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// A pooled connection unused this long is closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/2 PING interval on pooled connections.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
