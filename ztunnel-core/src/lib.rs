#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`state`]: workloads, services and policies as the data plane knows them.
//! - [`xds`]: the delta ADS client that keeps the state up to date.

pub mod state;
pub mod xds;

pub use state::{ProxyState, Rejected};
pub use xds::{XdsClient, XdsClientBuilder};
