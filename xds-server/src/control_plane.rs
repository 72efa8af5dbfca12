//! The control plane on one port, as istiod serves it on 15012: xDS and the
//! CA behind one TLS listener (the CA's serving certificate; mesh client
//! certificates accepted), with one handle of the shape every podless
//! component has ([`mesh_net::lifecycle`]).
//!
//! ```no_run
//! # async fn example(xds: xds_server::XdsServer, ca: mesh_ca::CaServer) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use xds_server::ControlPlane;
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:15012").await?;
//! let handle = ControlPlane::builder().xds(xds).ca(ca).build()?.spawn(listener)?;
//! // ... later
//! let drained = handle.drain(Duration::from_secs(5)).await;
//! handle.join().await?;
//! # Ok(()) }
//! ```

use mesh_ca::{CaServer, CaServerConfig};
use mesh_net::HandshakeLimits;
use tokio::net::TcpListener;

use crate::server::{
    BuildError, ServeError, XdsServer, XdsServerConfig, close_streams_when, grpc_server,
};
use crate::translate::MeshConfig;

/// The whole control plane's plain settings, as one section of a
/// configuration file ([`mesh_net::config`]): camelCase names, every field
/// optional, unknown fields refused.
///
/// ```yaml
/// handshakeLimits:            # the shared port's; unset: xds.handshakeLimits
///   timeout: 10s
///   maxInProgress: 1024
///   maxInProgressPerIp: 64
/// mesh:                       # MeshConfig, for Store::new
///   clusterId: Kubernetes
///   domain: cluster.local
///   trustDomain: cluster.local
///   rootNamespace: istio-system
///   network: ""
/// xds:                        # XdsServerConfig, for XdsServer::builder().config(..)
///   maxResponseBytes: 1048576
/// ca:                         # mesh_ca::CaServerConfig, for CaServer::builder().config(..)
///   servingNames:
///     dnsNames: [istiod.istio-system.svc, istiod.istio-system.svc.cluster.local, localhost]
///     ips: ["127.0.0.1"]
///     validity: 8760h
///   nodeAgents: [spiffe://cluster.local/ns/istio-system/sa/ztunnel]
/// ```
///
/// [`ControlPlaneBuilder::config`] takes only its own part
/// (`handshakeLimits`): the control plane is built from an xDS server and a
/// CA that are built first, and each of those takes its part with its own
/// builder's `config`. The mesh settings go to the store, whose trust domain
/// is also the one a binary gives the CA's [`mesh_ca::Authority`]:
///
/// ```no_run
/// # fn example(authority: std::sync::Arc<mesh_ca::Authority>,
/// #     authenticators: xds_server::Authenticators) -> Result<(), Box<dyn std::error::Error>> {
/// use xds_server::{ControlPlane, ControlPlaneConfig, Store, StoreNodeAuthorizer, XdsServer};
///
/// let text = std::fs::read_to_string("control-plane.yaml")?;
/// let config: ControlPlaneConfig = mesh_net::config::from_yaml(&text, "control-plane.yaml")?;
/// let store = Store::new(config.mesh.clone());
/// let xds = XdsServer::builder()
///     .config(config.xds)
///     .store(store.clone())
///     .authenticators(authenticators.clone())
///     .build()?;
/// let ca = mesh_ca::CaServer::builder()
///     .config(config.ca.clone())
///     .authority(authority)
///     .authenticators(authenticators)
///     .node_authorizer(StoreNodeAuthorizer::new(store))
///     .build()?;
/// let plane = ControlPlane::builder().config(config).xds(xds).ca(ca).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ControlPlaneConfig {
    /// `handshakeLimits`: bounds on clients in handshake on the shared port
    /// (default unset: the xDS server's, `xds.handshakeLimits`; the CA's
    /// own, `ca.handshakeLimits`, apply only when it serves alone).
    pub handshake_limits: Option<HandshakeLimits>,
    /// `mesh`: the mesh-wide settings the store translates with (default
    /// [`MeshConfig::default`]), for [`crate::Store::new`].
    pub mesh: MeshConfig,
    /// `xds`: the xDS server's settings (default
    /// [`XdsServerConfig::default`]), for [`crate::XdsServerBuilder::config`].
    pub xds: XdsServerConfig,
    /// `ca`: the CA's settings (default [`CaServerConfig::default`]), for
    /// [`mesh_ca::CaServerBuilder::config`].
    pub ca: CaServerConfig,
}

impl From<ControlPlaneConfig> for ControlPlaneBuilder {
    fn from(config: ControlPlaneConfig) -> Self {
        ControlPlaneBuilder::default().config(config)
    }
}

/// A builder of [`ControlPlane`].
#[derive(Debug, Default)]
pub struct ControlPlaneBuilder {
    xds: Option<XdsServer>,
    ca: Option<CaServer>,
    limits: Option<HandshakeLimits>,
}

impl ControlPlaneBuilder {
    /// Takes the control plane's own part of `config`: `handshakeLimits`,
    /// when set (unset, it keeps what was given before). The `mesh`, `xds`
    /// and `ca` parts belong to the store and the servers given with
    /// [`ControlPlaneBuilder::xds`] and [`ControlPlaneBuilder::ca`]: give
    /// them to [`crate::Store::new`], [`crate::XdsServerBuilder::config`] and
    /// [`mesh_ca::CaServerBuilder::config`] (see [`ControlPlaneConfig`]).
    #[allow(
        clippy::needless_pass_by_value,
        reason = "by value, as every builder's `config`"
    )]
    pub fn config(mut self, config: ControlPlaneConfig) -> Self {
        if let Some(limits) = config.handshake_limits {
            self.limits = Some(limits);
        }
        self
    }

    /// The xDS server (its own TLS setting, if any, is not used: the
    /// control plane serves with the CA's).
    pub fn xds(mut self, xds: XdsServer) -> Self {
        self.xds = Some(xds);
        self
    }

    /// The CA, whose serving certificate the port presents.
    pub fn ca(mut self, ca: CaServer) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Bounds on clients in handshake (default: the xDS server's, which
    /// defaults to [`HandshakeLimits::default`]).
    pub fn handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Checks and assembles; binds nothing.
    pub fn build(self) -> Result<ControlPlane, BuildError> {
        let xds = self.xds.ok_or(BuildError::Missing("xds"))?;
        let ca = self.ca.ok_or(BuildError::Missing("ca"))?;
        Ok(ControlPlane {
            limits: self.limits.unwrap_or(xds.limits),
            xds,
            ca,
        })
    }
}

/// xDS and the CA, ready to serve on one port.
#[derive(Debug)]
pub struct ControlPlane {
    xds: XdsServer,
    ca: CaServer,
    limits: HandshakeLimits,
}

impl ControlPlane {
    /// A builder.
    pub fn builder() -> ControlPlaneBuilder {
        ControlPlaneBuilder::default()
    }

    /// Serves both on `listener` (bound by the caller) on a task of the
    /// current runtime. Draining or shutting it down ends open xDS streams.
    pub fn spawn(self, listener: TcpListener) -> Result<ControlPlaneHandle, ServeError> {
        let tls = self.ca.tls_config();
        let ads = self.xds.into_service();
        let router = grpc_server()
            .add_service(self.ca.into_service())
            .add_service(ads.clone());
        let handle = ControlPlaneHandle::spawn(router, listener, Some(tls), self.limits)
            .map_err(ServeError::Listener)?;
        close_streams_when(&ads, handle.stopping());
        Ok(handle)
    }
}

/// A running control plane (the [`mesh_net::lifecycle`] handle shape).
pub type ControlPlaneHandle = mesh_net::ServerHandle<ServeError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_the_builders_default() {
        let config = ControlPlaneConfig::default();
        let builder = ControlPlaneBuilder::default();
        assert_eq!(config.handshake_limits, builder.limits);
        assert_eq!(ControlPlaneBuilder::from(config).limits, builder.limits);
    }

    #[test]
    fn config_sets_the_limits_and_keeps_them_when_unset() {
        let limits = HandshakeLimits::default().with_max_in_progress(9);
        let config = ControlPlaneConfig {
            handshake_limits: Some(limits),
            ..ControlPlaneConfig::default()
        };
        assert_eq!(ControlPlaneBuilder::from(config).limits, Some(limits));
        let kept = ControlPlaneBuilder::default()
            .handshake_limits(limits)
            .config(ControlPlaneConfig::default());
        assert_eq!(kept.limits, Some(limits));
    }
}
