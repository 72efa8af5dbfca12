//! Who is calling: authenticators turn a request's credentials into an
//! identity, and a [`NodeAuthorizer`] decides whether a node agent may ask for a
//! certificate on behalf of a workload (impersonation).
//!
//! Authenticators are tried in order. One that finds no credentials of its kind
//! answers `Ok(None)`; one that finds credentials it cannot accept answers
//! `Err`. The first `Ok(Some(..))` wins; if none does, the call is refused with
//! every reason given.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use mesh_api::Identity;
use mesh_net::Throttle;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::metadata::MetadataMap;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::Authority;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a request offers to prove who it is.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// The gRPC metadata (e.g. `authorization: Bearer <token>`).
    pub metadata: &'a MetadataMap,
    /// The TLS client certificate chain, leaf first, when the client sent one.
    pub peer_certificates: Option<&'a [CertificateDer<'static>]>,
    /// The client's address, when known (for logs).
    pub remote: Option<SocketAddr>,
}

impl Caller<'_> {
    /// The bearer token of the `authorization` header, if any.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.metadata.get("authorization")?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

/// A Kubernetes pod, as named in a service-account token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, when known.
    pub uid: Option<String>,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// The caller's identity.
    pub identity: Identity,
    /// The node the caller runs on, when the credentials say so.
    pub node: Option<String>,
    /// The pod the caller runs in, when the credentials say so.
    pub pod: Option<PodRef>,
}

impl Authenticated {
    /// A caller known only by identity.
    pub fn identity(identity: Identity) -> Self {
        Self {
            identity,
            node: None,
            pod: None,
        }
    }
}

/// Turns a request's credentials into an identity.
pub trait Authenticator: Send + Sync + 'static {
    /// A short name for error messages (e.g. `"bearer token"`).
    fn name(&self) -> &'static str;

    /// `Ok(None)`: no credentials of this kind. `Err`: credentials that are not accepted.
    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<Authenticated>, String>>;
}

/// Tries `authenticators` in order: the first caller one accepts; `Ok(None)`
/// when none found credentials of its kind; `Err` with every refusal
/// (`"<authenticator>: <reason>"`) when some found credentials and refused them.
pub async fn authenticate(
    authenticators: &[Arc<dyn Authenticator>],
    caller: &Caller<'_>,
) -> Result<Option<Authenticated>, Vec<String>> {
    let mut refusals = Vec::new();
    for authenticator in authenticators {
        match authenticator.authenticate(caller).await {
            Ok(Some(authenticated)) => return Ok(Some(authenticated)),
            Ok(None) => {}
            Err(reason) => refusals.push(format!("{}: {reason}", authenticator.name())),
        }
    }
    if refusals.is_empty() {
        Ok(None)
    } else {
        Err(refusals)
    }
}

/// The `Unauthenticated` status for a caller [`authenticate`] did not accept:
/// without credentials (`refusals` empty), or with refused ones.
pub fn unauthenticated(refusals: &[String]) -> tonic::Status {
    tonic::Status::unauthenticated(if refusals.is_empty() {
        "no credentials: send a bearer token or a mesh client certificate".to_owned()
    } else {
        format!("credentials refused ({})", refusals.join("; "))
    })
}

/// Refuses callers [`authenticate`] did not accept, and logs each refusal
/// with the client's address and the reasons, at most once every 5 s (with a
/// count of those since the last line): an operator sees a client's bad
/// credentials without the client having to be asked, and a client retrying
/// in a loop cannot flood the log.
#[derive(Debug)]
pub struct RefusalLog {
    service: &'static str,
    throttle: Mutex<Throttle>,
}

impl RefusalLog {
    /// A log for refusals by `service` (`"xDS"`, `"CA"`).
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            throttle: Mutex::new(Throttle::new(Duration::from_secs(5))),
        }
    }

    /// The `Unauthenticated` status for `caller` (see [`unauthenticated`]),
    /// logged.
    pub fn refuse(&self, caller: &Caller<'_>, refusals: &[String]) -> tonic::Status {
        let status = unauthenticated(refusals);
        let logged = self
            .throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tick();
        if let Some(refused) = logged {
            let remote = caller
                .remote
                .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
            tracing::warn!(
                service = self.service,
                %remote,
                refused,
                reason = status.message(),
                "refused a client's credentials"
            );
        }
        status
    }
}

/// The names of `authenticators`, for debug output.
pub fn names(authenticators: &[Arc<dyn Authenticator>]) -> Vec<&'static str> {
    authenticators.iter().map(|a| a.name()).collect()
}

/// Decides impersonation: may this node agent obtain a certificate for this
/// workload identity? (The control plane's store answers "is a workload with
/// this identity on the caller's node?".)
pub trait NodeAuthorizer: Send + Sync + 'static {
    /// `Ok(())` to allow; `Err(reason)` to refuse.
    fn authorize<'a>(
        &'a self,
        node_agent: &'a Authenticated,
        workload: &'a Identity,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Bearer tokens mapped to callers, e.g. for the reference cluster. Tokens are
/// kept only as SHA-256 digests.
#[derive(Clone, Debug, Default)]
pub struct StaticTokens {
    by_digest: HashMap<[u8; 32], Authenticated>,
}

fn digest(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl StaticTokens {
    /// No tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token for an identity.
    pub fn token(self, token: &str, identity: Identity) -> Self {
        self.caller(token, Authenticated::identity(identity))
    }

    /// Adds a token for a caller (identity and node, e.g. a node agent's).
    pub fn caller(mut self, token: &str, caller: Authenticated) -> Self {
        self.by_digest.insert(digest(token), caller);
        self
    }
}

impl Authenticator for StaticTokens {
    fn name(&self) -> &'static str {
        "bearer token"
    }

    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<Authenticated>, String>> {
        let result = match caller.bearer_token() {
            None => Ok(None),
            Some(token) => self
                .by_digest
                .get(&digest(token))
                .cloned()
                .map(Some)
                .ok_or_else(|| "the bearer token is not known".to_owned()),
        };
        Box::pin(std::future::ready(result))
    }
}

/// Verifies TLS client certificates against the authority's current roots. The
/// webpki verifier is rebuilt when the roots change (root rotation), so
/// certificates from either root verify during an overlap.
pub struct MeshRootsVerifier {
    authority: Arc<Authority>,
    provider: Arc<CryptoProvider>,
    allow_unauthenticated: bool,
    current: RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for MeshRootsVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshRootsVerifier")
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .finish_non_exhaustive()
    }
}

impl MeshRootsVerifier {
    /// A verifier over `authority`'s roots; `allow_unauthenticated` lets clients
    /// without a certificate through (they then authenticate otherwise).
    pub fn new(
        authority: Arc<Authority>,
        provider: Arc<CryptoProvider>,
        allow_unauthenticated: bool,
    ) -> Result<Self, String> {
        let generation = authority.generation();
        let verifier = build_verifier(&authority, &provider, allow_unauthenticated)?;
        Ok(Self {
            authority,
            provider,
            allow_unauthenticated,
            current: RwLock::new((generation, verifier)),
        })
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let generation = self.authority.generation();
        if let Ok(current) = self.current.read()
            && current.0 == generation
        {
            return current.1.clone();
        }
        match build_verifier(&self.authority, &self.provider, self.allow_unauthenticated) {
            Ok(verifier) => {
                if let Ok(mut current) = self.current.write() {
                    *current = (generation, verifier.clone());
                }
                verifier
            }
            // Keep the previous roots rather than trusting nothing or everything.
            Err(err) => {
                tracing::error!(error = %err, "could not rebuild the client verifier");
                match self.current.read() {
                    Ok(current) => current.1.clone(),
                    Err(poisoned) => poisoned.into_inner().1.clone(),
                }
            }
        }
    }
}

fn build_verifier(
    authority: &Authority,
    provider: &Arc<CryptoProvider>,
    allow_unauthenticated: bool,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut store = RootCertStore::empty();
    for root in authority.roots().iter() {
        store.add(root.clone()).map_err(|err| err.to_string())?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone());
    let builder = if allow_unauthenticated {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder.build().map_err(|err| err.to_string())
}

impl ClientCertVerifier for MeshRootsVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.allow_unauthenticated
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Hints are optional; mesh clients know which certificate to send.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// The TLS client certificate of a workload that already has a mesh
/// certificate (renewal): verified against the mesh roots (all of them during a
/// root rotation), identity from its SPIFFE URI SAN.
#[derive(Debug)]
pub struct ClientCertificate {
    verifier: MeshRootsVerifier,
}

impl ClientCertificate {
    /// Trusts certificates chaining to `authority`'s roots, with identities in
    /// its trust domain.
    pub fn new(authority: Arc<Authority>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Ok(Self {
            verifier: MeshRootsVerifier::new(authority, provider, false)?,
        })
    }
}

/// The SPIFFE identity in a certificate's URI SAN (exactly one is expected).
pub fn spiffe_identity(certificate: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) = X509Certificate::from_der(certificate)
        .map_err(|err| format!("unreadable certificate: {err}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|err| format!("unreadable SAN: {err}"))?
        .ok_or("the certificate has no SAN")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri
            .parse()
            .map_err(|err: mesh_api::IdentityError| err.to_string()),
        [] => Err("the certificate has no SPIFFE URI SAN".into()),
        _ => Err("the certificate has more than one SPIFFE URI SAN".into()),
    }
}

impl Authenticator for ClientCertificate {
    fn name(&self) -> &'static str {
        "client certificate"
    }

    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<Authenticated>, String>> {
        let result = (|| {
            let Some([leaf, intermediates @ ..]) = caller.peer_certificates else {
                return Ok(None);
            };
            self.verifier
                .verify_client_cert(leaf, intermediates, UnixTime::now())
                .map_err(|err| format!("the client certificate is not trusted: {err}"))?;
            let identity = spiffe_identity(leaf)?;
            let trust_domain = self.verifier.authority.trust_domain();
            if identity.trust_domain() != trust_domain {
                return Err(format!(
                    "{identity} is not in trust domain {trust_domain:?}"
                ));
            }
            Ok(Some(Authenticated::identity(identity)))
        })();
        Box::pin(std::future::ready(result))
    }
}

/// A fixed table of which workload identities run on which node, for the
/// reference cluster and tests. A node agent authenticated with a node name may
/// impersonate the identities listed for that node.
#[derive(Clone, Debug, Default)]
pub struct StaticNodeAuthorizer {
    by_node: HashMap<String, HashSet<Identity>>,
}

impl StaticNodeAuthorizer {
    /// An empty table: every impersonation is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a workload with `identity` runs on `node`.
    pub fn workload(mut self, node: impl Into<String>, identity: Identity) -> Self {
        self.by_node
            .entry(node.into())
            .or_default()
            .insert(identity);
        self
    }
}

impl NodeAuthorizer for StaticNodeAuthorizer {
    fn authorize<'a>(
        &'a self,
        node_agent: &'a Authenticated,
        workload: &'a Identity,
    ) -> BoxFuture<'a, Result<(), String>> {
        let result = match &node_agent.node {
            None => Err(format!("{} is not bound to a node", node_agent.identity)),
            Some(node)
                if self
                    .by_node
                    .get(node)
                    .is_some_and(|ids| ids.contains(workload)) =>
            {
                Ok(())
            }
            Some(node) => Err(format!(
                "no workload with identity {workload} runs on node {node:?}"
            )),
        };
        Box::pin(std::future::ready(result))
    }
}
