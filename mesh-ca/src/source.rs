//! Where workload certificates come from: a [`CertificateSource`] fetches one
//! for an identity when a [`crate::Renewal`] asks (first use, then at each
//! renewal; `ztunnel-core`'s certificate manager runs one per identity).
//! Implemented for [`CaClient`] (a CSR to `mesh-ca` or istiod) and for
//! [`StaticCertificates`] (certificates the embedder already holds, or a
//! test's); a SPIRE agent's Workload API, or any other, plugs in the same
//! way.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::client::{CaClient, WorkloadCertificate};
use mesh_api::Identity;

/// Why a source gave no certificate: its own error, boxed (a renewal only
/// logs it and retries with backoff).
pub type SourceError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A fetch under way: [`CertificateSource::fetch`]'s future.
pub type Fetch<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, SourceError>> + Send + 'a>>;

/// What a certificate is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CertificateRequest {
    /// Whose certificate.
    pub identity: Identity,
    /// Asked on the workload's behalf by a node agent, whose own credentials
    /// are not the workload's (the CA's `ImpersonatedIdentity`).
    pub impersonate: bool,
    /// The validity asked for (`None`: the source's default; a source may
    /// grant less).
    pub ttl: Option<Duration>,
}

impl CertificateRequest {
    /// A request for `identity`'s certificate, as itself, for the source's
    /// default validity.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            impersonate: false,
            ttl: None,
        }
    }
}

/// Something that issues workload certificates. Object-safe: a renewal
/// holds it as `Arc<dyn CertificateSource>`, and calls may run concurrently
/// (one per identity being fetched or renewed).
///
/// ```
/// use mesh_ca::WorkloadCertificate;
/// use mesh_ca::source::{CertificateRequest, CertificateSource, Fetch};
///
/// /// Certificates from a SPIRE agent's Workload API, say.
/// #[derive(Debug)]
/// struct Spire;
///
/// impl Spire {
///     async fn svid(&self, request: &CertificateRequest) -> Result<WorkloadCertificate, std::io::Error> {
///         Err(std::io::Error::other(format!("no SVID for {} yet", request.identity)))
///     }
/// }
///
/// impl CertificateSource for Spire {
///     fn fetch<'a>(&'a self, request: &'a CertificateRequest) -> Fetch<'a> {
///         Box::pin(async move { Ok(self.svid(request).await?) })
///     }
/// }
/// ```
pub trait CertificateSource: fmt::Debug + Send + Sync + 'static {
    /// Fetches a certificate as `request` asks: a new one each call (the
    /// renewal calls again at half-life).
    fn fetch<'a>(&'a self, request: &'a CertificateRequest) -> Fetch<'a>;
}

/// A CSR to the CA (`mesh-ca`, or istiod), with a key generated here.
impl CertificateSource for CaClient {
    fn fetch<'a>(&'a self, request: &'a CertificateRequest) -> Fetch<'a> {
        Box::pin(async move {
            Ok(self
                .certificate(&request.identity, request.impersonate, request.ttl)
                .await?)
        })
    }
}

impl<S: CertificateSource + ?Sized> CertificateSource for Arc<S> {
    fn fetch<'a>(&'a self, request: &'a CertificateRequest) -> Fetch<'a> {
        (**self).fetch(request)
    }
}

/// Certificates held in memory, by identity: issued elsewhere (files, a
/// secret store, a test's CA), handed out as they are. Cheap to clone:
/// clones share the certificates, so one replaced by
/// [`StaticCertificates::insert`] is what the next fetch (a renewal) gets.
#[derive(Clone, Debug, Default)]
pub struct StaticCertificates {
    certificates: Arc<Mutex<HashMap<Identity, WorkloadCertificate>>>,
}

/// Why [`StaticCertificates`] gave no certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StaticError {
    /// None is held for the identity.
    #[error("no certificate is held for {0}")]
    Unknown(Identity),
}

impl StaticCertificates {
    /// None yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `certificate` too (for its identity).
    pub fn with(self, certificate: WorkloadCertificate) -> Self {
        self.insert(certificate);
        self
    }

    /// Holds `certificate` for its identity, replacing the one held before.
    pub fn insert(&self, certificate: WorkloadCertificate) {
        self.lock()
            .insert(certificate.identity.clone(), certificate);
    }

    /// Stops handing out `identity`'s certificate; whether one was held.
    pub fn remove(&self, identity: &Identity) -> bool {
        self.lock().remove(identity).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, WorkloadCertificate>> {
        self.certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl CertificateSource for StaticCertificates {
    fn fetch<'a>(&'a self, request: &'a CertificateRequest) -> Fetch<'a> {
        let held = self
            .lock()
            .get(&request.identity)
            .cloned()
            .ok_or_else(|| StaticError::Unknown(request.identity.clone()).into());
        Box::pin(std::future::ready(held))
    }
}
