#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`stats`]: summaries of samples (medians, percentiles) and ratios.
//! - [`process`]: what a process costs (resident memory, CPU time).
//! - [`load`]: applications and clients run inside network namespaces.

pub mod load;
pub mod process;
pub mod stats;
