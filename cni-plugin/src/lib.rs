#![doc = include_str!("../README.md")]
//!
//! # Modules, as a pod's capture flows
//!
//! - [`plugin`]: the chained CNI plugin: one call of a container runtime
//!   (command, environment, stdin) in, the spec's result or error out.
//! - [`protocol`]: what the plugin and the node agent say on the agent's
//!   socket.
//! - [`agent`]: the node agent: enrollment from a pod source, capture,
//!   the ZDS server for the node's data plane, recovery after a restart.
//! - [`redirect`]: the in-pod redirection rules (nftables or iptables), set
//!   up and removed inside a pod's network namespace.

pub mod agent;
pub mod plugin;
pub mod protocol;
pub mod redirect;
