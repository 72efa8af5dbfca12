#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`object`]: the Kubernetes objects read, and reading them from YAML.
//! - [`store`]: the versioned resource store.
//! - [`ads`]: the delta ADS service.
//! - [`source`]: config sources (manifest directory, Kubernetes).
//! - [`auth`]: who may connect, and impersonation checks for `mesh-ca`.
//! - [`server`]: serving on a caller-bound listener.
//! - [`control_plane`]: xDS and the CA on one TLS port, with one handle.

pub mod ads;
pub mod auth;
pub mod control_plane;
pub mod object;
pub mod server;
pub mod source;
pub mod store;
mod translate;

pub use ads::AdsService;
pub use auth::StoreNodeAuthorizer;
// How clients authenticate (shared with the CA).
pub use control_plane::{
    ControlPlane, ControlPlaneBuilder, ControlPlaneConfig, ControlPlaneHandle,
};
pub use mesh_net::auth::{
    Authenticated, Authenticator, Authenticators, ClientCertificate, JwtAuthenticator, StaticTokens,
};
pub use object::{Kind, Manifest, Object, ObjectError, ObjectKey, parse_manifest};
pub use server::{BuildError, ServeError, XdsHandle, XdsServer, XdsServerBuilder, XdsServerConfig};
pub use source::{ConfigSource, ManifestDir, SourceError};
pub use store::{Batch, PodEnrollment, Store, StoreStats};
pub use translate::{DATAPLANE_MODE_LABEL, MeshConfig};

// What an embedder needs from the crates in the API, at matching versions.
pub use k8s_openapi;
pub use mesh_net::{Drained, HandshakeLimits};
pub use tokio_util::sync::CancellationToken;
