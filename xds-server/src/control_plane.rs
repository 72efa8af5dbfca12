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

use mesh_ca::CaServer;
use mesh_net::HandshakeLimits;
use tokio::net::TcpListener;

use crate::server::{BuildError, ServeError, XdsServer, close_streams_when, grpc_server};

/// A builder of [`ControlPlane`].
#[derive(Debug, Default)]
pub struct ControlPlaneBuilder {
    xds: Option<XdsServer>,
    ca: Option<CaServer>,
    limits: Option<HandshakeLimits>,
}

impl ControlPlaneBuilder {
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
