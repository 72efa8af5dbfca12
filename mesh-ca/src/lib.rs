#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`store`]: the CA's keys and certificates on disk (Istio's plug-in layout).
//! - [`authority`]: signing workload and serving certificates.
//! - [`csr`]: reading and checking certificate signing requests.
//! - [`auth`]: authenticating callers and authorizing impersonation.
//! - [`jwt`]: Kubernetes service-account tokens as credentials.
//! - [`service`]: the `CreateCertificate` gRPC service.
//! - [`server`]: serving it over TLS on a caller-bound listener.
//! - [`client`]: obtaining certificates from a CA.
//! - [`renewal`]: keeping a certificate fresh.

pub mod auth;
pub mod authority;
pub mod client;
pub mod csr;
pub mod jwt;
pub mod renewal;
pub mod server;
pub mod service;
pub mod store;
pub mod transport;

pub use auth::{
    Authenticated, Authenticator, ClientCertificate, NodeAuthorizer, StaticNodeAuthorizer,
    StaticTokens,
};
pub use authority::{Authority, IssueError, IssuedCertificate, SigningPolicy};
pub use client::{CaClient, ClientError, WorkloadCertificate};
pub use csr::{CsrError, VerifiedCsr, verify_csr};
pub use jwt::JwtAuthenticator;
pub use renewal::{Renewal, RenewalConfig};
pub use server::{CaHandle, CaServer, ServingNames};
pub use service::{CaService, PeerInfo};
pub use store::{CaMaterial, StoreError, load, load_or_create};

// What an embedder needs from the crates in the API, at matching versions.
pub use mesh_net::{Drained, HandshakeLimits};
pub use tokio_util::sync::CancellationToken;
pub use tonic;
