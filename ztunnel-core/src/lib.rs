#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`certs`]: workload certificates from the CA, renewed in the background.
//! - [`dns`]: the state as `dns-proxy`'s mesh view.
//! - [`hbone`]: HBONE: wire constants, request headers, the client pool and
//!   the stream copy.
//! - [`metrics`]: connection metrics with Istio's names.
//! - [`proxy`]: the proxy instance: listeners, routing, policy, lifecycle.
//! - [`tls`]: TLS configurations from workload certificates.
//! - [`state`]: workloads, services and policies as the data plane knows them.
//! - [`xds`]: the delta ADS client that keeps the state up to date.

pub mod certs;
pub mod dns;
pub mod hbone;
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod xds;

#[cfg(test)]
mod test_support;

pub use certs::{CertError, CertLease, CertManager, CertManagerBuilder};
pub use dns::StateDns;
pub use proxy::{IdentityError, Listeners, ServeError, Ztunnel, ZtunnelBuilder, ZtunnelHandle};
pub use state::{ProxyState, Rejected, SharedState};
pub use xds::{SyncState, XdsClient, XdsClientBuilder, XdsClientHandle, XdsNotReady};

// What an embedder needs from the crates in the API, at matching versions.
pub use mesh_net::{Drained, HandshakeLimits};
pub use prometheus_client;
pub use tonic;
