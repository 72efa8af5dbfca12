#![doc = include_str!("../README.md")]
//!
//! # Modules, as the data flows
//!
//! - [`xds`]: the delta ADS client that keeps the [`state`] up to date
//!   (workloads, services and policies as the data plane knows them); [`dns`]:
//!   the state as `dns-proxy`'s mesh view.
//! - [`certs`]: workload certificates from a [`CertificateSource`] (the CA,
//!   or any other), renewed in the background; [`tls`]: TLS configurations
//!   from them.
//! - [`proxy`]: the proxy instance: its listeners (outbound, inbound
//!   plaintext, SOCKS5, admin), routing and policy, lifecycle.
//! - [`hbone`]: HBONE, client and server side by side: the client's
//!   connections and their pool, the server, the request headers, the wire
//!   constants.
//! - [`net`]: below both: sockets (in the process's network namespace or a
//!   pod's) and the byte copies.
//! - [`node`]: node mode: one node proxy serving every pod the node agent
//!   hands over by ZDS, each with its own instance inside the pod.
//! - [`telemetry`]: one record per connection, handed when it ends to the
//!   access log and the metrics (Istio's names).

pub mod certs;
pub mod dns;
pub mod hbone;
pub mod net;
pub mod node;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod xds;

#[cfg(test)]
mod test_support;

pub use certs::{
    CertError, CertLease, CertManager, CertManagerBuilder, CertManagerConfig, CertificateRequest,
    CertificateSource, StaticCertificates,
};
pub use dns::StateDns;
pub use node::{NodeProxy, NodeProxyBuilder, NodeProxyConfig, NodeProxyHandle};
pub use proxy::{
    ConnectionError, IdentityError, Listeners, ServeError, Ztunnel, ZtunnelBuilder, ZtunnelConfig,
    ZtunnelHandle,
};
pub use state::{ProxyState, Rejected, SharedState};
pub use telemetry::ConnectionRecord;
pub use xds::{
    SyncState, XdsClient, XdsClientBuilder, XdsClientConfig, XdsClientHandle, XdsNotReady,
};

// What an embedder needs from the crates in the API, at matching versions.
pub use mesh_ca::RenewalConfig;
pub use mesh_net::{Drained, HandshakeLimits};
pub use prometheus_client;
pub use tonic;
