#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`lifecycle`]: the one shape of every component's handle.
//! - [`listen`]: accepting connections with bounded, deadlined handshakes and
//!   back-off when the process runs out of file descriptors.
//! - [`mark`]: the socket mark that keeps the mesh's own connections out of
//!   the redirect rules.
//! - [`throttle`]: logging a recurring event at a bounded rate.

pub mod lifecycle;
pub mod listen;
pub mod mark;
pub mod throttle;

pub use lifecycle::Drained;
pub use listen::{Acceptor, Handshake, HandshakeEnded, HandshakeLimits};
pub use mark::{PROXY_MARK, check_mark, set_mark};
pub use throttle::Throttle;
