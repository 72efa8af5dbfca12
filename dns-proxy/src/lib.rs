#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`config`]: the proxy's configuration as data ([`DnsConfig`]), for a
//!   configuration file.
//! - [`lookup`]: the mesh state the proxy answers from.
//! - [`resolve`](mod@resolve): the decision for one question, free of I/O.
//! - [`upstream`]: forwarding with a cache, bounded.
//! - [`server`]: serving on caller-bound sockets, and the [`DnsHandle`] that
//!   drains, stops and joins the running proxy.

pub mod config;
pub mod lookup;
pub mod resolve;
pub mod server;
pub mod upstream;

pub use config::DnsConfig;
pub use lookup::{InMemoryMeshDns, MeshDns, ServiceRecord};
pub use resolve::{Resolution, in_domain, resolve};
pub use server::{
    BuildError, DnsHandle, DnsProxy, DnsProxyBuilder, DnsStats, NotReady, ServeError,
};
pub use upstream::{DEFAULT_MAX_IN_FLIGHT, MAX_FORWARD_TIME, Upstream, UpstreamConfig};

// What an embedder needs from the crates in the API, at matching versions.
pub use mesh_net::{Drained, HandshakeLimits};
pub use tokio_util::sync::CancellationToken;
