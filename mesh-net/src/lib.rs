#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`listen`]: accepting connections with bounded, deadlined handshakes and
//!   back-off when the process runs out of file descriptors.
//! - [`throttle`]: logging a recurring event at a bounded rate.

pub mod listen;
pub mod throttle;

pub use listen::{Acceptor, Handshake, HandshakeLimits};
pub use throttle::Throttle;
