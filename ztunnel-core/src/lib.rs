#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`certs`]: workload certificates from the CA, renewed in the background.
//! - [`state`]: workloads, services and policies as the data plane knows them.
//! - [`xds`]: the delta ADS client that keeps the state up to date.

pub mod certs;
pub mod state;
pub mod xds;

pub use certs::{CertError, CertManager};
pub use state::{ProxyState, Rejected};
pub use xds::{XdsClient, XdsClientBuilder};
