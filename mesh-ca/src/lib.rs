#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`store`]: the CA's keys and certificates on disk (Istio's plug-in layout).
//! - [`authority`]: signing workload and serving certificates.
//! - [`csr`]: reading and checking certificate signing requests.
//! - [`service`]: the `CreateCertificate` gRPC service.
//! - [`server`]: serving it over TLS on a caller-bound listener.
//! - [`client`]: obtaining certificates from a CA.
//! - [`source`]: where certificates come from (the CA client, memory, any
//!   other source).
//! - [`renewal`]: keeping a certificate fresh.

pub mod authority;
pub mod client;
pub mod csr;
pub mod renewal;
pub mod server;
pub mod service;
pub mod source;
pub mod store;

pub use authority::{Authority, IssueError, IssuedCertificate, SigningPolicy};
pub use client::{CaClient, CaClientBuilder, CaClientConfig, ClientError, WorkloadCertificate};
pub use csr::{CsrError, VerifiedCsr, verify_csr};
pub use renewal::{Renewal, RenewalConfig};
pub use server::{CaHandle, CaServer, CaServerBuilder, CaServerConfig, ServingNames};
pub use service::CaService;
pub use source::{
    CertificateRequest, CertificateSource, Fetch, SourceError, StaticCertificates, StaticError,
};
pub use store::{CaMaterial, StoreError, load, load_or_create};

// How callers authenticate (shared with the xDS server), and what an
// embedder needs from the crates in the API, at matching versions.
pub use mesh_net::auth::{
    Authenticated, Authenticator, Authenticators, ClientCertificate, JwtAuthenticator,
    NodeAuthorizer, StaticNodeAuthorizer, StaticTokens,
};
pub use mesh_net::{Drained, HandshakeLimits, TrustRoots};
pub use tokio_util::sync::CancellationToken;
pub use tonic;
