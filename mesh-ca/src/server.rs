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
///
/// As configuration ([`mesh_net::config`], the `servingNames` of a
/// [`CaServerConfig`]): `dnsNames`, `ips` (text, `"127.0.0.1"`, `"::1"`) and
/// `validity` (`"8760h"`), each optional; a list given replaces the default
/// list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingNames {
    /// `dnsNames`: DNS names clients dial (default: Istio's
    /// `istiod.istio-system.svc` and `istiod.istio-system.svc.cluster.local`,
    /// and `localhost`).
    pub dns_names: Vec<String>,
    /// `ips`: IP addresses clients dial (default: `127.0.0.1`).
    pub ips: Vec<IpAddr>,
    /// `validity`: how long each serving certificate lives; it is re-issued
    /// at half-life (default 365 days, `"8760h"`).
    #[serde(with = "mesh_net::config::duration")]
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

/// A [`CaServer`]'s plain settings, as configuration ([`mesh_net::config`]):
/// camelCase names, every field optional, unknown fields refused.
///
/// ```yaml
/// servingNames:                 # the serving certificate (ServingNames)
///   dnsNames: [istiod.istio-system.svc, istiod.istio-system.svc.cluster.local, localhost]
///   ips: ["127.0.0.1"]
///   validity: 8760h
/// handshakeLimits:              # mesh_net::HandshakeLimits
///   timeout: 10s
///   maxInProgress: 1024
///   maxInProgressPerIp: 64
/// nodeAgents:                   # SPIFFE identities trusted to impersonate
///   - spiffe://cluster.local/ns/istio-system/sa/ztunnel
/// ```
///
/// What is not data stays with the builder: the [`Authority`] (and its
/// [`SigningPolicy`](crate::SigningPolicy), which is serde too), the
/// authenticators (their tokens and keys are secrets a binary reads from
/// files of its own), the node authorizer and the crypto provider:
///
/// ```no_run
/// # fn example(authority: std::sync::Arc<mesh_ca::Authority>, tokens: mesh_ca::StaticTokens,
/// #     agents: mesh_ca::StaticNodeAuthorizer) -> Result<(), Box<dyn std::error::Error>> {
/// let text = std::fs::read_to_string("ca.yaml")?;
/// let config: mesh_ca::CaServerConfig = mesh_net::config::from_yaml(&text, "ca.yaml")?;
/// let server = mesh_ca::CaServer::builder()
///     .config(config)
///     .authority(authority)
///     .authenticator(tokens)
///     .node_authorizer(agents)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct CaServerConfig {
    /// `servingNames`: the names and validity of the serving certificate
    /// (default [`ServingNames::default`]).
    pub serving_names: ServingNames,
    /// `handshakeLimits`: bounds on clients in handshake (default
    /// [`HandshakeLimits::default`]: `timeout: 10s`, `maxInProgress: 1024`,
    /// `maxInProgressPerIp: 64`).
    pub handshake_limits: HandshakeLimits,
    /// `nodeAgents`: identities trusted as node agents that may ask for
    /// workload certificates (impersonation), as SPIFFE URIs
    /// (`spiffe://cluster.local/ns/istio-system/sa/ztunnel`); default none.
    /// Needs a node authorizer on the builder.
    #[serde(with = "identities")]
    pub node_agents: Vec<Identity>,
}

impl From<CaServerConfig> for CaServerBuilder {
    fn from(config: CaServerConfig) -> Self {
        CaServerBuilder::default().config(config)
    }
}

/// SPIFFE identities as a list of URI strings, each checked when read (an
/// error names the bad one and what is wrong with it).
mod identities {
    use mesh_api::Identity;
    use serde::{Deserialize, Deserializer, Serializer};

    /// One identity read from its URI.
    struct Uri(Identity);

    impl<'de> Deserialize<'de> for Uri {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let text = String::deserialize(deserializer)?;
            text.parse().map(Uri).map_err(serde::de::Error::custom)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        identities: &[Identity],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(identities.iter().map(Identity::as_uri))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Identity>, D::Error> {
        let uris = Vec::<Uri>::deserialize(deserializer)?;
        Ok(uris.into_iter().map(|Uri(identity)| identity).collect())
    }
}

/// The shortest validity of the CA's serving certificate: it is re-issued at
/// half-life, on a handshake, so shorter would mean signing constantly.
const MIN_SERVING_VALIDITY: Duration = Duration::from_secs(3600);

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
    /// The authenticators let anonymous callers through: the CA signs only
    /// for a caller it knows.
    #[error("the CA's authenticators may not be anonymous")]
    AnonymousCallers,
    /// The serving certificate's validity is too short to serve with, or
    /// beyond what a certificate can hold.
    #[error("servingNames.validity {0:?} must be between 1 hour and 100 years")]
    ServingValidity(Duration),
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
    /// Takes every field of `config`, as its setter would: the serving
    /// names and handshake limits are set, the node agents added to any
    /// given before. What is not data (the authority, authenticators, node
    /// authorizer, crypto provider) is still given with its own method;
    /// [`CaServerBuilder::build`] checks the whole.
    pub fn config(mut self, config: CaServerConfig) -> Self {
        let CaServerConfig {
            serving_names,
            handshake_limits,
            node_agents,
        } = config;
        self.serving = serving_names;
        self.limits = handshake_limits;
        self.node_agents.extend(node_agents);
        self
    }

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
        if self.authenticators.is_empty() {
            return Err(BuildError::NoAuthenticator);
        }
        if self.authenticators.is_anonymous() {
            return Err(BuildError::AnonymousCallers);
        }
        let validity = self.serving.validity;
        if validity < MIN_SERVING_VALIDITY || validity > crate::authority::MAX_VALIDITY {
            return Err(BuildError::ServingValidity(validity));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_the_builders_default() {
        let config = CaServerConfig::default();
        let builder = CaServerBuilder::default();
        assert_eq!(config.serving_names, builder.serving);
        assert_eq!(config.handshake_limits, builder.limits);
        assert!(config.node_agents.is_empty() && builder.node_agents.is_empty());
        let from = CaServerBuilder::from(config);
        assert_eq!(from.serving, builder.serving);
        assert_eq!(from.limits, builder.limits);
        assert!(from.node_agents.is_empty());
    }

    #[test]
    fn config_sets_every_field() {
        let agent: Identity = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
            .parse()
            .expect("identity");
        let earlier: Identity = "spiffe://cluster.local/ns/istio-system/sa/agent"
            .parse()
            .expect("identity");
        let mut config = CaServerConfig::default();
        config.serving_names.dns_names = vec!["ca.example".into()];
        config.serving_names.ips = vec![IpAddr::from([10, 0, 0, 1])];
        config.serving_names.validity = Duration::from_secs(3600);
        config.handshake_limits = HandshakeLimits::default().with_max_in_progress(7);
        config.node_agents = vec![agent.clone()];
        let builder = CaServerBuilder::default()
            .node_agent(earlier.clone())
            .config(config.clone());
        assert_eq!(builder.serving, config.serving_names);
        assert_eq!(builder.limits, config.handshake_limits);
        assert_eq!(builder.node_agents, HashSet::from([agent, earlier]));
    }
}
