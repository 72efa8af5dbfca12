#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`workload`], [`security`], [`ca`], [`zds`], [`discovery`], [`envoy_core`],
//!   [`rpc`]: the protobuf packages (messages, enums, tonic clients and servers).
//! - [`identity`]: the SPIFFE identity type.
//! - [`names`]: typed resource names and wire IP addresses.
//! - [`type_url`]: type URLs of the delta ADS resources.
//! - [`any`]: packing and unpacking `google.protobuf.Any`.
//! - [`codec`]: the stubs' protobuf codec (undecodable is `InvalidArgument`).

pub mod any;
pub mod codec;
pub mod identity;
pub mod names;
pub mod proto;
pub mod type_url;

pub use identity::{Identity, IdentityError, IdentityProblem};
pub use names::{AddressName, NameError, NamespacedName, NetworkIp};
pub use type_url::ResourceType;

/// `istio.workload`: `Address`, `Workload`, `Service` and their parts.
pub use proto::istio::workload;

/// `istio.security`: the `Authorization` resource.
pub use proto::istio::security;

/// `istio.v1.auth`: the CA's `CreateCertificate` messages, client and server.
pub use proto::istio::v1::auth as ca;

/// `istio.workload.zds`: messages between the CNI node agent and the data plane.
pub use proto::istio::workload::zds;

/// `envoy.service.discovery.v3`: delta ADS messages, client and server.
pub use proto::envoy::service::discovery::v3 as discovery;

/// `envoy.config.core.v3`: `Node` and `Locality`.
pub use proto::envoy::config::core::v3 as envoy_core;

/// `google.rpc`: `Status`, carried by NACKs.
pub use proto::google::rpc;

/// Re-exported so callers use the same `prost` and `prost-types` versions.
pub use {prost, prost_types};
