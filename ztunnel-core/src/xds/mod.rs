//! The xDS client: delta ADS for the workload API, into [`crate::state`].

mod apply;
mod client;

pub use apply::{KnownVersions, apply_response};
pub use client::{
    BuildError, Demander, RunError, StreamError, SyncState, XdsClient, XdsClientBuilder,
    XdsClientConfig, XdsClientHandle, XdsNotReady,
};
