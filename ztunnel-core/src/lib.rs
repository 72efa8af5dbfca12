#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`certs`]: workload certificates from the CA, renewed in the background.
//! - [`dns`]: the state as `dns-proxy`'s mesh view.
//! - [`hbone`]: HBONE's wire constants and request headers.
//! - [`state`]: workloads, services and policies as the data plane knows them.
//! - [`xds`]: the delta ADS client that keeps the state up to date.

pub mod certs;
pub mod dns;
pub mod hbone;
pub mod state;
pub mod xds;

pub use certs::{CertError, CertManager};
pub use dns::StateDns;
pub use state::{ProxyState, Rejected};
pub use xds::{XdsClient, XdsClientBuilder};
