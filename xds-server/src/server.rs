//! Serving xDS on a listener the caller bound: plaintext (local testing) or TLS
//! with a certificate the caller gives (the CA can issue it).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use mesh_net::HandshakeLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ads::{AdsService, DEFAULT_MAX_RESPONSE_BYTES};
use crate::store::Store;
use mesh_net::auth::{Authenticator, Authenticators};
use mesh_net::grpc::{OpenConnections, ServerHandle, serve_router};

/// How often an idle connection is pinged, to find clients that vanished.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a server could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No store was given.
    #[error("no store: call XdsServer::builder().store(..)")]
    NoStore,
    /// No client authentication was chosen.
    #[error(
        "no client authentication: add an authenticator, or choose Authenticators::anonymous() \
         for local testing"
    )]
    NoClientAuth,
    /// `max_response_bytes` is zero.
    #[error("max_response_bytes (maxResponseBytes in a config) must be at least 1")]
    ZeroResponseSize,
    /// A required part is missing.
    #[error("missing {0}: call ControlPlane::builder().{0}(..)")]
    Missing(&'static str),
}

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listener failed.
    #[error("listener: {0}")]
    Listener(#[source] io::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The server's task failed.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// An [`XdsServer`]'s plain settings, as configuration
/// ([`mesh_net::config`]): camelCase names, every field optional, unknown
/// fields refused.
///
/// ```yaml
/// maxResponseBytes: 1048576   # responses larger than this are split
/// handshakeLimits:            # mesh_net::HandshakeLimits
///   timeout: 10s
///   maxInProgress: 1024
///   maxInProgressPerIp: 64
/// ```
///
/// The store, the authenticators and the TLS configuration are not data:
/// they are given to the builder (`XdsServer::builder().config(config)
/// .store(store).authenticators(..)`). The mesh-wide settings the store
/// translates with are a [`MeshConfig`](crate::MeshConfig), given to
/// [`Store::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct XdsServerConfig {
    /// `maxResponseBytes`: responses larger than this are split in several
    /// (default 1 MiB, `1048576`; at least 1).
    pub max_response_bytes: usize,
    /// `handshakeLimits`: bounds on clients in handshake (default
    /// [`HandshakeLimits::default`]: `timeout: 10s`, `maxInProgress: 1024`,
    /// `maxInProgressPerIp: 64`).
    pub handshake_limits: HandshakeLimits,
}

impl Default for XdsServerConfig {
    fn default() -> Self {
        Self {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            handshake_limits: HandshakeLimits::default(),
        }
    }
}

impl From<XdsServerConfig> for XdsServerBuilder {
    fn from(config: XdsServerConfig) -> Self {
        XdsServerBuilder::default().config(config)
    }
}

/// A builder of [`XdsServer`].
#[derive(Debug)]
pub struct XdsServerBuilder {
    store: Option<Store>,
    auth: Authenticators,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_response_bytes: usize,
    limits: HandshakeLimits,
}

impl Default for XdsServerBuilder {
    fn default() -> Self {
        Self {
            store: None,
            auth: Authenticators::new(),
            tls: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            limits: HandshakeLimits::default(),
        }
    }
}

impl XdsServerBuilder {
    /// Takes every field of `config`, as its setter would. The store,
    /// authenticators and TLS are given with their own methods;
    /// [`XdsServerBuilder::build`] checks the whole (a `maxResponseBytes` of
    /// 0 is refused there).
    pub fn config(mut self, config: XdsServerConfig) -> Self {
        let XdsServerConfig {
            max_response_bytes,
            handshake_limits,
        } = config;
        self.max_response_bytes = max_response_bytes;
        self.limits = handshake_limits;
        self
    }

    /// The store to serve.
    pub fn store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Adds an authenticator; they are tried in the order added. At least
    /// one is required, or [`Authenticators::anonymous`].
    pub fn authenticator(mut self, authenticator: impl Authenticator) -> Self {
        self.auth = self.auth.with(authenticator);
        self
    }

    /// Sets every authenticator at once (the same set can serve the CA), or
    /// [`Authenticators::anonymous`] for plaintext local testing.
    pub fn authenticators(mut self, authenticators: Authenticators) -> Self {
        self.auth = authenticators;
        self
    }

    /// Serve TLS with this configuration (its ALPN should offer `h2`; for mesh
    /// client certificates, a client verifier such as
    /// [`mesh_net::spiffe::MeshClientVerifier`]). Without it, plaintext.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Responses larger than this are split in several (default 1 MiB).
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Bounds on clients in handshake: the TLS handshake and HTTP/2 preface
    /// deadline, and how many at once (default [`HandshakeLimits::default`]:
    /// 10 s, 1024, 64 from one address).
    pub fn handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Validates and assembles; binds nothing.
    pub fn build(self) -> Result<XdsServer, BuildError> {
        let store = self.store.ok_or(BuildError::NoStore)?;
        if !self.auth.is_configured() {
            return Err(BuildError::NoClientAuth);
        }
        if self.max_response_bytes == 0 {
            return Err(BuildError::ZeroResponseSize);
        }
        Ok(XdsServer {
            service: AdsService::new(
                store,
                self.auth,
                self.max_response_bytes,
                CancellationToken::new(),
            ),
            tls: self.tls,
            limits: self.limits,
        })
    }
}

/// An xDS server ready to serve.
#[derive(Debug)]
pub struct XdsServer {
    service: AdsService,
    tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) limits: HandshakeLimits,
}

impl XdsServer {
    /// A builder.
    pub fn builder() -> XdsServerBuilder {
        XdsServerBuilder::default()
    }

    /// The service alone, to mount on a shared gRPC server (e.g. with the CA's).
    /// Call [`AdsService::close_streams`] when shutting that server down.
    pub fn into_service(self) -> AdsService {
        self.service
    }

    /// The gRPC server of xDS alone (keepalive pings find vanished clients),
    /// and the service, whose streams a stopping server must end.
    fn router(&self) -> tonic::transport::server::Router {
        grpc_server().add_service(self.service.clone())
    }

    /// Serves on `listener` until `shutdown` is cancelled; then open streams are
    /// ended (clients reconnect elsewhere) and the server stops.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        close_streams_when(&self.service, shutdown.clone());
        let router = self.router();
        let open = OpenConnections::default();
        serve_router(router, listener, self.tls, self.limits, open, shutdown)
            .await
            .map_err(ServeError::from)
    }

    /// Serves on `listener` on a task of the current runtime: the handle
    /// ([`mesh_net::lifecycle`] shape). Draining or shutting it down ends open
    /// streams (clients reconnect elsewhere).
    pub fn spawn(self, listener: TcpListener) -> Result<XdsHandle, ServeError> {
        let router = self.router();
        let handle = XdsHandle::spawn(router, listener, self.tls, self.limits)
            .map_err(ServeError::Listener)?;
        close_streams_when(&self.service, handle.stopping());
        Ok(handle)
    }
}

/// A gRPC server builder with the control plane's keepalive settings.
pub(crate) fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Ends `service`'s open streams once `stopping` is cancelled: an ADS stream
/// lasts as long as its client, so a server would otherwise never finish
/// draining.
pub(crate) fn close_streams_when(service: &AdsService, stopping: CancellationToken) {
    let service = service.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        service.close_streams();
    });
}

/// A running xDS server (shutting down ends open streams; clients reconnect).
pub type XdsHandle = ServerHandle<ServeError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_the_builders_default() {
        let config = XdsServerConfig::default();
        let builder = XdsServerBuilder::default();
        assert_eq!(config.max_response_bytes, builder.max_response_bytes);
        assert_eq!(config.handshake_limits, builder.limits);
        let from = XdsServerBuilder::from(config);
        assert_eq!(from.max_response_bytes, builder.max_response_bytes);
        assert_eq!(from.limits, builder.limits);
    }

    #[test]
    fn config_sets_every_field() {
        let config = XdsServerConfig {
            max_response_bytes: 4096,
            handshake_limits: HandshakeLimits::default().with_max_in_progress_per_ip(3),
        };
        let builder = XdsServerBuilder::default().config(config);
        assert_eq!(builder.max_response_bytes, 4096);
        assert_eq!(builder.limits, config.handshake_limits);
    }
}
