//! Who is calling: authenticators turn a request's credentials into an
//! identity, and a [`NodeAuthorizer`] decides whether a node agent may ask for a
//! certificate on behalf of a workload (impersonation). The CA and the xDS
//! server authenticate the same way, with the same [`Authenticators`].
//!
//! Authenticators are tried in order. One that finds no credentials of its kind
//! answers `Ok(None)`; one that finds credentials it cannot accept answers
//! `Err`. The first `Ok(Some(..))` wins; if none does, the call is refused
//! (`Unauthenticated`) with every reason given, and the refusal is logged with
//! the client's address at a bounded rate.
//!
//! The authenticators: [`ClientCertificate`] (a mesh client certificate),
//! [`StaticTokens`] (bearer tokens known in advance), [`JwtAuthenticator`]
//! (Kubernetes service-account tokens); [`StaticNodeAuthorizer`] answers the
//! impersonation question from a fixed table.

mod certificate;
pub mod jwt;
mod node;
mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_api::Identity;
use rustls_pki_types::CertificateDer;
use tonic::metadata::MetadataMap;

use crate::Throttle;
use crate::grpc::PeerInfo;

pub use certificate::ClientCertificate;
pub use jwt::JwtAuthenticator;
pub use node::StaticNodeAuthorizer;
pub use tokens::StaticTokens;

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

impl<'a> Caller<'a> {
    /// The caller of a gRPC request: its metadata, and the connection's facts
    /// when it came through [`crate::grpc::serve_router`].
    pub fn new(metadata: &'a MetadataMap, peer: Option<&'a PeerInfo>) -> Self {
        Self {
            metadata,
            peer_certificates: peer.and_then(|peer| peer.certificates.as_deref()),
            remote: peer.and_then(|peer| peer.remote_addr),
        }
    }

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

/// At most one refusal line per service this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The authenticators of one service, tried in order, and how it refuses
/// (`Unauthenticated`, logged at most once every 5 s with a count, so an
/// operator sees a client's bad credentials and a client retrying in a loop
/// cannot flood the log). Cheap to clone.
#[derive(Clone)]
pub struct Authenticators {
    service: &'static str,
    authenticators: Vec<Arc<dyn Authenticator>>,
    anonymous: bool,
    refusals: Arc<Mutex<Throttle>>,
}

impl std::fmt::Debug for Authenticators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticators")
            .field("service", &self.service)
            .field("authenticators", &self.names())
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

impl Default for Authenticators {
    fn default() -> Self {
        Self::new()
    }
}

impl Authenticators {
    /// None yet: every caller is refused until one is added.
    pub fn new() -> Self {
        Self {
            service: "gRPC",
            authenticators: Vec::new(),
            anonymous: false,
            refusals: Arc::new(Mutex::new(Throttle::new(REFUSAL_LOG_INTERVAL))),
        }
    }

    /// Callers need no credentials (plaintext local testing only; a service
    /// that must know its caller, such as the CA, refuses this).
    pub fn anonymous() -> Self {
        Self {
            anonymous: true,
            ..Self::new()
        }
    }

    /// Adds an authenticator, tried after those added before.
    pub fn with(mut self, authenticator: impl Authenticator) -> Self {
        self.authenticators.push(Arc::new(authenticator));
        self
    }

    /// Adds a shared authenticator, tried after those added before.
    pub fn with_shared(mut self, authenticator: Arc<dyn Authenticator>) -> Self {
        self.authenticators.push(authenticator);
        self
    }

    /// Names the service in refusal logs (`"xDS"`, `"CA"`), with a rate
    /// limit of its own: one set shared by two services logs each one's
    /// refusals.
    pub fn for_service(mut self, service: &'static str) -> Self {
        self.service = service;
        self.refusals = Arc::new(Mutex::new(Throttle::new(REFUSAL_LOG_INTERVAL)));
        self
    }

    /// Whether no authenticator was added (an anonymous set may have none).
    pub fn is_empty(&self) -> bool {
        self.authenticators.is_empty()
    }

    /// Whether any caller could ever be accepted.
    pub fn is_configured(&self) -> bool {
        self.anonymous || !self.authenticators.is_empty()
    }

    /// Whether callers without credentials are let through.
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// The authenticators' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.authenticators.iter().map(|a| a.name()).collect()
    }

    /// The caller, or `None` for one without credentials when anonymous
    /// callers are allowed; `Unauthenticated` (logged) when the credentials
    /// are missing or refused.
    pub async fn authenticate(
        &self,
        caller: &Caller<'_>,
    ) -> Result<Option<Authenticated>, tonic::Status> {
        let mut refusals = Vec::new();
        for authenticator in &self.authenticators {
            match authenticator.authenticate(caller).await {
                Ok(Some(authenticated)) => return Ok(Some(authenticated)),
                Ok(None) => {}
                Err(reason) => refusals.push(format!("{}: {reason}", authenticator.name())),
            }
        }
        if refusals.is_empty() && self.anonymous {
            return Ok(None);
        }
        Err(self.refuse(caller, &refusals))
    }

    /// The caller, who must have credentials (anonymous or not).
    pub async fn require(&self, caller: &Caller<'_>) -> Result<Authenticated, tonic::Status> {
        match self.authenticate(caller).await? {
            Some(authenticated) => Ok(authenticated),
            None => Err(self.refuse(caller, &[])),
        }
    }

    fn refuse(&self, caller: &Caller<'_>, refusals: &[String]) -> tonic::Status {
        let status = tonic::Status::unauthenticated(if refusals.is_empty() {
            "no credentials: send a bearer token or a mesh client certificate".to_owned()
        } else {
            format!("credentials refused ({})", refusals.join("; "))
        });
        let logged = self
            .refusals
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
