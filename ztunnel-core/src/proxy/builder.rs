//! Building a proxy instance ([`ZtunnelBuilder`]: checked and assembled,
//! nothing bound or spawned; its plain data also from a [`ZtunnelConfig`])
//! and starting it on the caller's [`Listeners`] ([`Ztunnel::spawn`]), which
//! gives its [`ZtunnelHandle`].

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::Identity;
use mesh_net::{Acceptor, HandshakeLimits};
use prometheus_client::registry::Registry;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::authorize::LiveConnections;
use super::baggage::BaggageCache;
use super::context::Context;
use super::handle::{Tasks, ZtunnelHandle};
use super::local::SameNode;
use super::{inbound, outbound, plaintext};
use crate::certs::CertManager;
use crate::hbone::{HBONE_PORT, HbonePool};
#[cfg(doc)]
use crate::net::socket::listen_with_nodelay;
use crate::net::socket::{PROXY_MARK, SocketNamespace};
use crate::state::SharedState;
use crate::telemetry::metrics::Metrics;
use crate::tls::TlsConfigs;
use crate::xds::Demander;

/// Why an instance could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required part is missing.
    #[error("missing {0}: call Ztunnel::builder().{0}(..)")]
    Missing(&'static str),
}

/// Listeners bound by the caller (e.g. inside a network namespace). Bound
/// with [`listen_with_nodelay`] (or with `TCP_NODELAY` set before
/// listening), their connections inherit `TCP_NODELAY`; otherwise the proxy
/// sets it on each connection it accepts, a syscall apiece.
#[derive(Debug)]
pub struct Listeners {
    /// Outbound capture (15001).
    pub outbound: TcpListener,
    /// Plaintext inbound (15006).
    pub inbound_plaintext: TcpListener,
    /// HBONE (15008).
    pub hbone: TcpListener,
    /// SOCKS5, if wanted (conventionally on `127.0.0.1:15080`).
    pub socks5: Option<TcpListener>,
}

/// A proxy instance's plain data, as configuration ([`mesh_net::config`]):
/// what [`ZtunnelBuilder`] takes besides its runtime parts (the state, the
/// certificate manager, a metrics registry, a crypto provider, a demander),
/// which stay builder-only. Every field is optional; [`Default`] gives the
/// builder's defaults. In YAML:
///
/// ```yaml
/// workloadUid: Kubernetes//Pod/default/shell   # required, here or with the builder
/// identity: null          # or spiffe://cluster.local/ns/default/sa/shell
/// network: ""
/// socketMark: 1337        # null for none
/// certificateWait: 10s
/// hbonePort: 15008
/// handshakeLimits: {timeout: 10s, maxInProgress: 1024, maxInProgressPerIp: 64}
/// ```
///
/// ```
/// use ztunnel_core::{ZtunnelBuilder, ZtunnelConfig};
///
/// let config: ZtunnelConfig = mesh_net::config::from_yaml(
///     "workloadUid: Kubernetes//Pod/default/shell\nsocketMark: null\n",
///     "proxy.yaml",
/// )?;
/// assert_eq!(config.socket_mark, None);
/// assert_eq!(config.hbone_port, 15008); // the default
/// let builder = ZtunnelBuilder::from(config); // then .state(..).certificates(..)
/// # let _ = builder;
/// # Ok::<(), mesh_net::config::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ZtunnelConfig {
    /// `workloadUid`: the uid of the served workload (default none: then
    /// [`ZtunnelBuilder::workload_uid`] is required).
    pub workload_uid: Option<String>,
    /// `identity`: the served workload's SPIFFE identity as a URI, if it
    /// should not be derived from the state (default none).
    #[serde(with = "identity_uri")]
    pub identity: Option<Identity>,
    /// `network`: the network of the served workload (default `""`, the
    /// default network).
    pub network: String,
    /// `socketMark`: the mark on the proxy's own sockets (default 1337;
    /// `null` for none, e.g. where no redirect rules exist).
    pub socket_mark: Option<u32>,
    /// `certificateWait`: how long a connection waits for the served
    /// workload's certificate (default `10s`).
    #[serde(with = "mesh_net::config::duration")]
    pub certificate_wait: Duration,
    /// `hbonePort`: the port peers accept HBONE on (default 15008).
    pub hbone_port: u16,
    /// `handshakeLimits`: bounds on connections in handshake on the HBONE
    /// and SOCKS5 listeners (default [`HandshakeLimits::default`]: `timeout:
    /// 10s`, `maxInProgress: 1024`, `maxInProgressPerIp: 64`).
    pub handshake_limits: HandshakeLimits,
}

impl Default for ZtunnelConfig {
    fn default() -> Self {
        Self {
            workload_uid: None,
            identity: None,
            network: String::new(),
            socket_mark: Some(PROXY_MARK),
            certificate_wait: DEFAULT_CERTIFICATE_WAIT,
            hbone_port: HBONE_PORT,
            handshake_limits: HandshakeLimits::default(),
        }
    }
}

impl From<ZtunnelConfig> for ZtunnelBuilder {
    fn from(config: ZtunnelConfig) -> Self {
        Self::default().config(config)
    }
}

/// How long a connection waits for the served workload's certificate, unless
/// told otherwise.
const DEFAULT_CERTIFICATE_WAIT: Duration = Duration::from_secs(10);

/// An optional [`Identity`] as its SPIFFE URI.
mod identity_uri {
    use mesh_api::Identity;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        identity: &Option<Identity>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        identity
            .as_ref()
            .map(Identity::as_uri)
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Identity>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|uri| Identity::parse_uri(&uri).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A builder of [`Ztunnel`].
#[derive(Debug)]
pub struct ZtunnelBuilder {
    state: Option<SharedState>,
    certificates: Option<CertManager>,
    workload_uid: Option<String>,
    identity: Option<Identity>,
    network: String,
    mark: Option<u32>,
    provider: Option<Arc<CryptoProvider>>,
    certificate_wait: Duration,
    hbone_port: u16,
    metrics: Option<Metrics>,
    demander: Option<Demander>,
    handshake_limits: HandshakeLimits,
    sockets: SocketNamespace,
    same_node: Option<SameNode>,
}

impl Default for ZtunnelBuilder {
    fn default() -> Self {
        Self {
            state: None,
            certificates: None,
            workload_uid: None,
            identity: None,
            network: String::new(),
            mark: Some(PROXY_MARK),
            provider: None,
            certificate_wait: DEFAULT_CERTIFICATE_WAIT,
            hbone_port: HBONE_PORT,
            metrics: None,
            demander: None,
            handshake_limits: HandshakeLimits::default(),
            sockets: SocketNamespace::process(),
            same_node: None,
        }
    }
}

impl ZtunnelBuilder {
    /// Takes every field of `config` (each replaces what was set before, an
    /// absent `workloadUid` or `identity` included): call it first, then the
    /// runtime parts and any overrides, e.g.
    /// `Ztunnel::builder().config(config).state(state).certificates(certs)`.
    pub fn config(mut self, config: ZtunnelConfig) -> Self {
        let ZtunnelConfig {
            workload_uid,
            identity,
            network,
            socket_mark,
            certificate_wait,
            hbone_port,
            handshake_limits,
        } = config;
        self.workload_uid = workload_uid;
        self.identity = identity;
        self.network = network;
        self.mark = socket_mark;
        self.certificate_wait = certificate_wait;
        self.hbone_port = hbone_port;
        self.handshake_limits = handshake_limits;
        self
    }

    /// The mesh state (kept up to date by an [`crate::XdsClient`], or by the
    /// embedder). Required.
    pub fn state(mut self, state: SharedState) -> Self {
        self.state = Some(state);
        self
    }

    /// Where certificates come from (one manager shared by every instance of
    /// a node agent). Required. The instance leases its served workload's
    /// identity while it runs: once no running instance serves an identity,
    /// the manager drops its certificate ([`CertManager::lease`]).
    pub fn certificates(mut self, certificates: CertManager) -> Self {
        self.certificates = Some(certificates);
        self
    }

    /// The uid of the served workload. Required.
    pub fn workload_uid(mut self, uid: impl Into<String>) -> Self {
        self.workload_uid = Some(uid.into());
        self
    }

    /// The served workload's identity, if it should not be derived from the
    /// state.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The network of the served workload (default: the default network "").
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.network = network.into();
        self
    }

    /// The mark on the proxy's own sockets (default 1337; `None` for none,
    /// e.g. where no redirect rules exist).
    pub fn socket_mark(mut self, mark: Option<u32>) -> Self {
        self.mark = mark;
        self
    }

    /// The rustls crypto provider (default: aws-lc-rs).
    pub fn crypto_provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// How long a connection waits for the served workload's certificate.
    pub fn certificate_wait(mut self, wait: Duration) -> Self {
        self.certificate_wait = wait;
        self
    }

    /// The port peers accept HBONE on (default 15008). Where this instance
    /// accepts HBONE is its [`Listeners::hbone`].
    pub fn hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// Counts connections into `registry` with Istio's metric names (see
    /// [`crate::telemetry::metrics`]).
    pub fn metrics(mut self, registry: &mut Registry) -> Self {
        self.metrics = Some(Metrics::register(registry));
        self
    }

    /// Counts connections into metrics already registered (shared by the
    /// instances of a node proxy).
    pub fn shared_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Where the instance makes its sockets (default: the process's
    /// namespace; a node proxy gives each instance its pod's). Its
    /// [`Listeners`] are the caller's to bind there
    /// ([`SocketNamespace::listen`]).
    pub fn sockets(mut self, sockets: SocketNamespace) -> Self {
        self.sockets = sockets;
        self
    }

    /// Lists the instance in `same_node`, the registry of its node proxy's
    /// instances, and takes the same-node shortcut to the others listed
    /// there (see [`SameNode`]). Default: no shortcut.
    pub fn same_node(mut self, same_node: SameNode) -> Self {
        self.same_node = Some(same_node);
        self
    }

    /// Looks up unknown destinations (and the served workload) on demand,
    /// through an on-demand [`crate::XdsClient`]'s [`Demander`].
    pub fn demander(mut self, demander: Demander) -> Self {
        self.demander = Some(demander);
        self
    }

    /// Bounds on connections in handshake on the HBONE and SOCKS5 listeners:
    /// how long a client may take for its TLS handshake and HTTP/2 preface
    /// (or SOCKS5 greeting), and how many may be in handshake at once, in all
    /// and from one address (default: [`HandshakeLimits::default`], 10 s,
    /// 1024, 64). Over them, the oldest connection in handshake is closed to
    /// make room.
    pub fn handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.handshake_limits = limits;
        self
    }

    /// Checks and assembles; binds nothing.
    pub fn build(self) -> Result<Ztunnel, BuildError> {
        let shutdown = CancellationToken::new();
        let provider = self
            .provider
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let context = Context {
            state: self.state.ok_or(BuildError::Missing("state"))?,
            certs: self
                .certificates
                .ok_or(BuildError::Missing("certificates"))?,
            served_uid: self
                .workload_uid
                .ok_or(BuildError::Missing("workload_uid"))?,
            identity: self.identity,
            network: self.network,
            mark: self.mark,
            tls: TlsConfigs::new(provider),
            certificate_wait: self.certificate_wait,
            hbone_port: self.hbone_port,
            pool: HbonePool::in_namespace(self.mark, self.sockets.clone(), &shutdown),
            sockets: self.sockets,
            same_node: self.same_node,
            live: Arc::new(LiveConnections::default()),
            baggage: BaggageCache::default(),
            metrics: self.metrics,
            demander: self.demander,
            tasks: TaskTracker::new(),
            force_close: shutdown.child_token(),
            shutdown,
            lease: Mutex::new(None),
            own_ports: Vec::new(),
        };
        Ok(Ztunnel {
            context,
            handshake_limits: self.handshake_limits,
        })
    }
}

/// A proxy instance, built but not running.
#[derive(Debug)]
pub struct Ztunnel {
    context: Context,
    handshake_limits: HandshakeLimits,
}

impl Ztunnel {
    /// A builder.
    pub fn builder() -> ZtunnelBuilder {
        ZtunnelBuilder::default()
    }

    /// Runs on the caller's listeners, on the current runtime. Fails at once
    /// if the socket mark cannot be set (no `CAP_NET_ADMIN`), rather than on
    /// every connection later.
    pub fn spawn(self, listeners: Listeners) -> io::Result<ZtunnelHandle> {
        let mut context = self.context;
        if let Some(mark) = context.mark {
            mesh_net::check_mark(mark)?;
        }
        let addresses = [
            listeners.outbound.local_addr()?,
            listeners.inbound_plaintext.local_addr()?,
            listeners.hbone.local_addr()?,
        ];
        let socks5 = match &listeners.socks5 {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        context.own_ports = addresses
            .iter()
            .chain(&socks5)
            .map(SocketAddr::port)
            .chain([context.hbone_port])
            .collect();
        let ctx = Arc::new(context);
        if let Some(same_node) = &ctx.same_node {
            same_node.register(&ctx);
        }
        let limits = self.handshake_limits;
        let accepting = ctx.shutdown.child_token();
        let mut tasks = Tasks::default();
        tasks.spawn(
            "outbound",
            outbound::serve(
                ctx.clone(),
                Acceptor::new(listeners.outbound, "outbound", limits),
                accepting.clone(),
            ),
        );
        tasks.spawn(
            "inbound plaintext",
            plaintext::serve(
                ctx.clone(),
                Acceptor::new(listeners.inbound_plaintext, "inbound plaintext", limits),
                accepting.clone(),
            ),
        );
        tasks.spawn(
            "HBONE",
            inbound::serve(
                ctx.clone(),
                Acceptor::new(listeners.hbone, "HBONE", limits),
                accepting.clone(),
            ),
        );
        if let Some(listener) = listeners.socks5 {
            tasks.spawn(
                "SOCKS5",
                outbound::serve_socks5(
                    ctx.clone(),
                    Acceptor::new(listener, "SOCKS5", limits),
                    accepting.clone(),
                ),
            );
        }
        tasks.spawn(
            "policy watch",
            ctx.live.clone().watch(
                ctx.state.clone(),
                ctx.served_uid.clone(),
                ctx.network.clone(),
                ctx.shutdown.clone(),
            ),
        );
        Ok(ZtunnelHandle::supervise(
            ctx, tasks, addresses, socks5, accepting,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builders compare by what they hold (no `PartialEq`: some parts are
    /// runtime handles).
    fn holds(builder: &ZtunnelBuilder) -> String {
        format!("{builder:?}")
    }

    #[test]
    fn the_default_config_is_the_builders_default() {
        assert_eq!(
            holds(&ZtunnelBuilder::from(ZtunnelConfig::default())),
            holds(&Ztunnel::builder())
        );
    }

    #[test]
    fn config_applies_every_field_as_its_setter_does() {
        let identity =
            Identity::parse_uri("spiffe://cluster.local/ns/default/sa/shell").expect("identity");
        let limits = HandshakeLimits::default()
            .with_timeout(Duration::from_secs(3))
            .with_max_in_progress(7)
            .with_max_in_progress_per_ip(2);
        let config = ZtunnelConfig {
            workload_uid: Some("Kubernetes//Pod/default/shell".into()),
            identity: Some(identity.clone()),
            network: "net-1".into(),
            socket_mark: None,
            certificate_wait: Duration::from_millis(1500),
            hbone_port: 15999,
            handshake_limits: limits,
        };
        let by_setters = Ztunnel::builder()
            .workload_uid("Kubernetes//Pod/default/shell")
            .identity(identity)
            .network("net-1")
            .socket_mark(None)
            .certificate_wait(Duration::from_millis(1500))
            .hbone_port(15999)
            .handshake_limits(limits);
        assert_eq!(
            holds(&ZtunnelBuilder::from(config.clone())),
            holds(&by_setters)
        );
        // Every field differs from its default, so none was left out above.
        let default = ZtunnelConfig::default();
        assert_ne!(config.workload_uid, default.workload_uid);
        assert_ne!(config.identity, default.identity);
        assert_ne!(config.network, default.network);
        assert_ne!(config.socket_mark, default.socket_mark);
        assert_ne!(config.certificate_wait, default.certificate_wait);
        assert_ne!(config.hbone_port, default.hbone_port);
        assert_ne!(config.handshake_limits, default.handshake_limits);
        // A later setter overrides the config.
        let overridden = Ztunnel::builder().config(config).hbone_port(15008);
        assert_eq!(overridden.hbone_port, 15008);
    }
}
