#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`model`]: the `AuthorizationPolicy` resource as written in YAML.
//! - [`parse`]: reading policies from multi-document Kubernetes YAML.
//! - [`validate`](mod@validate): Istio's validation rules, with precise errors.
//! - [`convert`](mod@convert): conversion to the wire `istio.security.Authorization`.
//! - [`engine`]: the indexed evaluation engine over wire policies.

pub mod convert;
pub mod engine;
pub mod model;
pub mod parse;
pub mod validate;
mod values;

pub use convert::{Conversion, Selector, Warning, convert};
pub use engine::{
    BuildError, Built, Connection, Decision, DryRun, Engine, EngineBuilder, Labels, Reason,
    Verdict, WirePolicyError,
};
pub use model::AuthorizationPolicy;
pub use parse::{LoadError, load_policies, parse_policies, policy_from_document};
pub use validate::{ValidationError, validate};

/// Istio's default root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The namespace of a policy whose metadata names none (as `kubectl` would use).
pub const DEFAULT_NAMESPACE: &str = "default";
