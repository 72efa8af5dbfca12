//! The podless mesh certificate authority (work in progress).

pub mod authority;
pub mod csr;
pub mod store;

pub use authority::{Authority, IssueError, IssuedCertificate, SigningPolicy};
pub use csr::{CsrError, VerifiedCsr, verify_csr};
pub use store::{CaMaterial, StoreError, load, load_or_create};
