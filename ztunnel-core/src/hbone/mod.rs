//! HBONE: workload traffic as HTTP/2 CONNECT streams inside mutual TLS to port
//! 15008 (WIRE.md §4): the wire constants, the request headers (`:authority`,
//! `forwarded`, `baggage`), the client's connection pool, and the copy between
//! a TCP connection and a stream. The server side is the proxy's inbound
//! listener.

pub mod copy;
pub mod headers;
pub mod pool;

use std::time::Duration;

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
