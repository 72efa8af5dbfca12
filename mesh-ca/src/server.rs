//! Serving the CA over gRPC and TLS on a listener the caller bound.
//!
//! The serving certificate is signed by the mesh CA itself, with the DNS names
//! and IPs clients dial (a real ztunnel checks, e.g., `istiod.istio-system.svc`
//! against the root it was given). Client certificates are optional at the TLS
//! layer: a workload renewing with its mesh certificate presents one, a new
//! workload presents a token instead.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mesh_api::Identity;
use mesh_net::HandshakeLimits;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authority::Authority;
use crate::service::CaService;
use mesh_net::auth::{Authenticator, Authenticators, NodeAuthorizer};
use mesh_net::grpc::{OpenConnections, ServerHandle, serve_router};
use mesh_net::spiffe::MeshClientVerifier;

/// The names the CA's serving certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingNames {
    /// DNS names clients dial (default: Istio's `istiod.istio-system.svc`).
    pub dns_names: Vec<String>,
    /// IP addresses clients dial.
    pub ips: Vec<IpAddr>,
    /// Validity of the serving certificate.
    pub validity: Duration,
}

impl Default for ServingNames {
    fn default() -> Self {
        Self {
            dns_names: vec![
                "istiod.istio-system.svc".into(),
                "istiod.istio-system.svc.cluster.local".into(),
                "localhost".into(),
            ],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            validity: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// Why a CA server could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No [`Authority`] was given.
    #[error("a CA server needs an authority")]
    NoAuthority,
    /// No authenticator was given: nobody could ever get a certificate.
    #[error("a CA server needs at least one authenticator")]
    NoAuthenticator,
    /// Node agents were named but no node authorizer can check their requests.
    #[error("trusted node agents were given without a node authorizer")]
    NodeAgentsWithoutAuthorizer,
    /// The serving certificate or TLS configuration failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Listener(io::Error),
    /// The server's task failed.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Builds a [`CaServer`].
#[derive(Default)]
pub struct CaServerBuilder {
    authority: Option<Arc<Authority>>,
    authenticators: Authenticators,
    node_agents: HashSet<Identity>,
    node_authorizer: Option<Arc<dyn NodeAuthorizer>>,
    serving: ServingNames,
    provider: Option<Arc<CryptoProvider>>,
    limits: HandshakeLimits,
}

impl std::fmt::Debug for CaServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServerBuilder")
            .field("authority", &self.authority)
            .field("serving", &self.serving)
            .finish_non_exhaustive()
    }
}

impl CaServerBuilder {
    /// The authority that signs.
    pub fn authority(mut self, authority: Arc<Authority>) -> Self {
        self.authority = Some(authority);
        self
    }

    /// Adds an authenticator; they are tried in the order added.
    pub fn authenticator(mut self, authenticator: impl Authenticator) -> Self {
        self.authenticators = self.authenticators.with(authenticator);
        self
    }

    /// Sets every authenticator at once (the same set can serve xDS); an
    /// anonymous set is refused by [`CaServerBuilder::build`].
    pub fn authenticators(mut self, authenticators: Authenticators) -> Self {
        self.authenticators = authenticators;
        self
    }

    /// Trusts `identity` as a node agent that may ask for workload certificates
    /// (impersonation), subject to the node authorizer.
    pub fn node_agent(mut self, identity: Identity) -> Self {
        self.node_agents.insert(identity);
        self
    }

    /// The check for impersonation requests.
    pub fn node_authorizer(mut self, authorizer: impl NodeAuthorizer) -> Self {
        self.node_authorizer = Some(Arc::new(authorizer));
        self
    }

    /// Names on the serving certificate.
    pub fn serving_names(mut self, serving: ServingNames) -> Self {
        self.serving = serving;
        self
    }

    /// The rustls crypto provider (default: aws-lc-rs).
    pub fn crypto_provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Bounds on clients in handshake: the TLS handshake and HTTP/2 preface
    /// deadline, and how many at once (default [`HandshakeLimits::default`]:
    /// 10 s, 1024, 64 from one address).
    pub fn handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Validates and assembles: issues the serving certificate; binds nothing.
    pub fn build(self) -> Result<CaServer, BuildError> {
        let authority = self.authority.ok_or(BuildError::NoAuthority)?;
        if self.authenticators.names().is_empty() {
            return Err(BuildError::NoAuthenticator);
        }
        if !self.node_agents.is_empty() && self.node_authorizer.is_none() {
            return Err(BuildError::NodeAgentsWithoutAuthorizer);
        }
        let provider = self
            .provider
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let tls = tls_config(&authority, &self.serving, provider)?;
        Ok(CaServer {
            service: CaService::new(
                authority,
                self.authenticators,
                self.node_agents,
                self.node_authorizer,
            ),
            tls,
            limits: self.limits,
        })
    }
}

fn tls_config(
    authority: &Arc<Authority>,
    serving: &ServingNames,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, BuildError> {
    let client_verifier = MeshClientVerifier::new(authority.clone(), provider.clone(), true)
        .map_err(|err| BuildError::Tls(err.to_string()))?;
    let resolver = ServingCertificate::new(authority.clone(), serving.clone(), provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| BuildError::Tls(err.to_string()))?
        .with_client_cert_verifier(Arc::new(client_verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The CA's own serving certificate, re-issued when the authority's signer
/// changes (root rotation) or when it is past half its life.
struct ServingCertificate {
    authority: Arc<Authority>,
    names: ServingNames,
    provider: Arc<CryptoProvider>,
    current: RwLock<Current>,
}

struct Current {
    generation: u64,
    renew_after: SystemTime,
    key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCertificate {
    fn new(
        authority: Arc<Authority>,
        names: ServingNames,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, BuildError> {
        let current = issue_serving(&authority, &names, &provider)?;
        Ok(Self {
            authority,
            names,
            provider,
            current: RwLock::new(current),
        })
    }
}

fn issue_serving(
    authority: &Authority,
    names: &ServingNames,
    provider: &CryptoProvider,
) -> Result<Current, BuildError> {
    let generation = authority.generation();
    let (chain, key) = authority
        .issue_serving_certificate(&names.dns_names, &names.ips, names.validity)
        .map_err(|err| BuildError::Tls(err.to_string()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| BuildError::Tls(err.to_string()))?;
    Ok(Current {
        generation,
        renew_after: SystemTime::now() + names.validity / 2,
        key: Arc::new(CertifiedKey::new(chain, signing_key)),
    })
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let fresh = |current: &Current| {
            current.generation == self.authority.generation()
                && SystemTime::now() < current.renew_after
        };
        if let Ok(current) = self.current.read()
            && fresh(&current)
        {
            return Some(current.key.clone());
        }
        match issue_serving(&self.authority, &self.names, &self.provider) {
            Ok(renewed) => {
                let key = renewed.key.clone();
                if let Ok(mut current) = self.current.write() {
                    *current = renewed;
                }
                Some(key)
            }
            Err(err) => {
                tracing::error!(error = %err, "could not re-issue the serving certificate");
                self.current.read().ok().map(|current| current.key.clone())
            }
        }
    }
}

/// A CA ready to serve: the service plus its TLS configuration.
#[derive(Debug)]
pub struct CaServer {
    service: CaService,
    tls: Arc<rustls::ServerConfig>,
    limits: HandshakeLimits,
}

impl CaServer {
    /// A builder.
    pub fn builder() -> CaServerBuilder {
        CaServerBuilder::default()
    }

    /// The service alone, to mount on a shared gRPC server.
    pub fn into_service(
        self,
    ) -> mesh_api::ca::istio_certificate_service_server::IstioCertificateServiceServer<CaService>
    {
        self.service.into_service()
    }

    /// The TLS configuration (serving certificate, optional client certificates,
    /// ALPN h2), for a shared server.
    pub fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.tls.clone()
    }

    /// The gRPC server of the CA alone, with its TLS and handshake limits.
    fn router(
        self,
    ) -> (
        tonic::transport::server::Router,
        Arc<rustls::ServerConfig>,
        HandshakeLimits,
    ) {
        let router = tonic::transport::Server::builder().add_service(self.service.into_service());
        (router, self.tls, self.limits)
    }

    /// Serves on `listener` until `shutdown` is cancelled, then lets in-flight
    /// calls finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let (router, tls, limits) = self.router();
        let open = OpenConnections::default();
        serve_router(router, listener, Some(tls), limits, open, shutdown)
            .await
            .map_err(ServeError::from)
    }

    /// Serves on `listener` on a task of the current runtime: the handle
    /// ([`mesh_net::lifecycle`] shape).
    pub fn spawn(self, listener: TcpListener) -> Result<CaHandle, ServeError> {
        let (router, tls, limits) = self.router();
        CaHandle::spawn(router, listener, Some(tls), limits).map_err(ServeError::Listener)
    }
}

/// A running CA server.
pub type CaHandle = ServerHandle<ServeError>;
