//! Node mode: one node proxy serves every enrolled pod of its node, as
//! Istio ambient's ztunnel does. It connects to the node agent's ZDS socket
//! (the `podless-cni` agent, or istio-cni's), and for each `AddWorkload`
//! runs one proxy instance (the per-workload code path of dedicated mode)
//! whose listeners (15001, 15006, 15008, and DNS on 15053 with the pod's
//! namespace for search expansion) are opened inside the pod's network
//! namespace, and whose connections start there too. Each pod's certificate
//! comes from the node's [`CertManager`], which asks the CA on the pod's
//! behalf with the node's own credential (impersonation).
//!
//! Built like every podless component: [`NodeProxy::builder`] (plain data
//! from a [`NodeProxyConfig`]; the state, certificates and metrics given),
//! then [`NodeProxy::spawn`], giving a [`NodeProxyHandle`].
//!
//! ```no_run
//! # async fn example(state: ztunnel_core::SharedState, certs: ztunnel_core::CertManager)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ztunnel_core::node::{NodeProxy, NodeProxyConfig};
//!
//! let node = NodeProxy::builder()
//!     .config(NodeProxyConfig::default()) // zdsSocket: /var/run/ztunnel/ztunnel.sock
//!     .state(state)                        // kept by an XdsClient
//!     .certificates(certs)                 // impersonating for the node's pods
//!     .build()?
//!     .spawn();
//! node.ready(Duration::from_secs(30)).await?; // the agent's snapshot is in
//! # Ok(()) }
//! ```

mod pod;
mod zds_client;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dns_proxy::DnsConfig;
use mesh_net::Drained;
use prometheus_client::registry::Registry;
use rustls::crypto::CryptoProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::pod::Pod;
use crate::certs::CertManager;
use crate::proxy::{SameNode, ZtunnelConfig};
use crate::state::SharedState;
use crate::telemetry::metrics::Metrics;
use crate::xds::Demander;

/// Where a node proxy opens each pod's listeners, inside the pod.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct PodListeners {
    /// `outbound` (default `0.0.0.0:15001`).
    pub outbound: SocketAddr,
    /// `inboundPlaintext` (default `0.0.0.0:15006`).
    pub inbound_plaintext: SocketAddr,
    /// `hbone` (default `0.0.0.0:15008`).
    pub hbone: SocketAddr,
    /// `dns`, UDP and TCP (default `127.0.0.1:15053`, where the rules send
    /// the pod's own DNS: a UDP answer must leave from the address the
    /// question was redirected to, or conntrack cannot map it back; `null`:
    /// no DNS proxy).
    pub dns: Option<SocketAddr>,
}

impl Default for PodListeners {
    fn default() -> Self {
        let at = |address: &str| address.parse().expect("a default address");
        Self {
            outbound: at("0.0.0.0:15001"),
            inbound_plaintext: at("0.0.0.0:15006"),
            hbone: at("0.0.0.0:15008"),
            dns: Some(at("127.0.0.1:15053")),
        }
    }
}

/// A node proxy's plain data, as configuration ([`mesh_net::config`]). In
/// YAML:
///
/// ```yaml
/// zdsSocket: /var/run/ztunnel/ztunnel.sock
/// clusterId: Kubernetes          # pods' workload uids: <clusterId>//Pod/<ns>/<name>
/// trustDomain: cluster.local
/// proxy: {socketMark: 1337}      # each pod's instance (workloadUid and identity per pod)
/// listeners: {dns: 127.0.0.1:15053}
/// dns: {upstream: {servers: [10.0.0.2:53]}}
/// podDrain: 5s
/// reconnectInitial: 100ms
/// reconnectMax: 10s
/// sameNodeShortcut: true
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct NodeProxyConfig {
    /// `zdsSocket`: the node agent's ZDS socket (default Istio's,
    /// `/var/run/ztunnel/ztunnel.sock`).
    pub zds_socket: PathBuf,
    /// `clusterId`: the first part of the pods' workload uids (default
    /// `Kubernetes`).
    pub cluster_id: String,
    /// `trustDomain`: the pods' identities' (default `cluster.local`).
    pub trust_domain: String,
    /// `proxy`: each pod's proxy instance (`workloadUid` and `identity` are
    /// set per pod).
    pub proxy: ZtunnelConfig,
    /// `listeners`: where each pod's listeners are opened, inside the pod.
    pub listeners: PodListeners,
    /// `dns`: each pod's DNS proxy (upstream servers: the node's).
    pub dns: DnsConfig,
    /// `podDrain`: how long a removed pod's connections may finish (5 s).
    #[serde(with = "mesh_net::config::duration")]
    pub pod_drain: Duration,
    /// `reconnectInitial`: the first delay before reconnecting to the agent.
    #[serde(with = "mesh_net::config::duration")]
    pub reconnect_initial: Duration,
    /// `reconnectMax`: the longest delay before reconnecting.
    #[serde(with = "mesh_net::config::duration")]
    pub reconnect_max: Duration,
    /// `sameNodeShortcut`: between two pods of this node, skip TLS and
    /// HTTP/2 (the destination's policy, metrics and logs all the same; see
    /// [`crate::proxy::SameNode`]). Default on.
    pub same_node_shortcut: bool,
}

impl Default for NodeProxyConfig {
    fn default() -> Self {
        Self {
            zds_socket: "/var/run/ztunnel/ztunnel.sock".into(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            proxy: ZtunnelConfig::default(),
            listeners: PodListeners::default(),
            dns: DnsConfig::default(),
            pod_drain: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            same_node_shortcut: true,
        }
    }
}

/// Why a node proxy could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required part is missing.
    #[error("missing {0}: call NodeProxy::builder().{0}(..)")]
    Missing(&'static str),
}

/// A builder of [`NodeProxy`].
#[derive(Debug, Default)]
pub struct NodeProxyBuilder {
    config: NodeProxyConfig,
    state: Option<SharedState>,
    certs: Option<CertManager>,
    metrics: Option<Metrics>,
    demander: Option<Demander>,
    provider: Option<Arc<CryptoProvider>>,
}

impl NodeProxyBuilder {
    /// Takes every field of `config`.
    pub fn config(mut self, config: NodeProxyConfig) -> Self {
        self.config = config;
        self
    }

    /// The mesh state. Required.
    pub fn state(mut self, state: SharedState) -> Self {
        self.state = Some(state);
        self
    }

    /// The node's certificate manager, impersonating for its pods. Required.
    pub fn certificates(mut self, certs: CertManager) -> Self {
        self.certs = Some(certs);
        self
    }

    /// Counts every pod's connections into `registry`.
    pub fn metrics(mut self, registry: &mut Registry) -> Self {
        self.metrics = Some(Metrics::register(registry));
        self
    }

    /// Looks up unknown destinations on demand.
    pub fn demander(mut self, demander: Demander) -> Self {
        self.demander = Some(demander);
        self
    }

    /// The rustls crypto provider (default: aws-lc-rs).
    pub fn crypto_provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Checks and assembles; connects nothing.
    pub fn build(self) -> Result<NodeProxy, BuildError> {
        Ok(NodeProxy {
            shared: Arc::new(NodeProxyShared {
                state: self.state.ok_or(BuildError::Missing("state"))?,
                certs: self.certs.ok_or(BuildError::Missing("certificates"))?,
                metrics: self.metrics,
                demander: self.demander,
                provider: self
                    .provider
                    .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())),
                status: watch::Sender::new(NodeStatus::default()),
                same_node: SameNode::new(),
                config: self.config,
            }),
        })
    }
}

impl From<NodeProxyConfig> for NodeProxyBuilder {
    fn from(config: NodeProxyConfig) -> Self {
        Self::default().config(config)
    }
}

/// What every pod of a node proxy shares.
#[derive(Debug)]
pub(crate) struct NodeProxyShared {
    config: NodeProxyConfig,
    state: SharedState,
    certs: CertManager,
    metrics: Option<Metrics>,
    demander: Option<Demander>,
    provider: Arc<CryptoProvider>,
    status: watch::Sender<NodeStatus>,
    /// Its pods' instances, for the same-node shortcut.
    same_node: SameNode,
}

/// The node proxy's connection to its agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// Connected to the agent now.
    pub connected: bool,
    /// A snapshot was received (since the start).
    pub synced: bool,
    /// Why the last connection failed.
    pub last_error: Option<String>,
}

/// The pods being served, by ZDS uid; pods being drained are not listed.
#[derive(Clone, Debug)]
pub(crate) struct Pods {
    running: Arc<Mutex<HashMap<String, Pod>>>,
    draining: TaskTracker,
}

impl Pods {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pod>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn contains(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    fn insert(&self, uid: String, pod: Pod) {
        self.lock().insert(uid, pod);
    }

    /// Whether `uid` is served, and if so whether in `netns`.
    fn serves_in(&self, uid: &str, netns: &mesh_net::netns::Netns) -> Option<bool> {
        let running = self.lock();
        let pod = running.get(uid)?;
        Some(pod.sockets.netns().is_some_and(|served| {
            mesh_net::netns::same_namespace(served.fd(), netns.fd()).unwrap_or(false)
        }))
    }

    fn uids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Stops serving a pod: it no longer accepts, its open connections get
    /// `deadline` to finish.
    fn remove_and_drain(&self, uid: &str, deadline: Duration) {
        let pod = self.lock().remove(uid);
        if let Some(pod) = pod {
            tracing::info!(
                "draining pod {}/{} ({uid})",
                pod.info.namespace,
                pod.info.name
            );
            self.draining.spawn(async move {
                let _ = pod.drain(deadline).await;
            });
        }
    }
}

/// A node proxy, built but not running.
#[derive(Debug)]
pub struct NodeProxy {
    shared: Arc<NodeProxyShared>,
}

/// A pod the node proxy serves (see [`NodeProxyHandle::pods`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServedPod {
    /// The uid ZDS gave it.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its service account.
    pub service_account: String,
}

/// Why the node proxy is not ready.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// No snapshot from the agent within the wait.
    #[error("no snapshot from the node agent within {waited:?}{}", last_error.as_ref().map(|err| format!(" ({err})")).unwrap_or_default())]
    NotSynced {
        /// How long it waited.
        waited: Duration,
        /// Why the last connection failed.
        last_error: Option<String>,
    },
    /// It was stopped.
    #[error("the node proxy has stopped")]
    Stopped,
}

impl NodeProxy {
    /// A builder.
    pub fn builder() -> NodeProxyBuilder {
        NodeProxyBuilder::default()
    }

    /// Connects to the agent and serves its pods, on the current runtime.
    pub fn spawn(self) -> NodeProxyHandle {
        let stop = CancellationToken::new();
        let pods = Pods {
            running: Arc::default(),
            draining: TaskTracker::new(),
        };
        let task = tokio::spawn(zds_client::run(
            self.shared.clone(),
            pods.clone(),
            stop.clone(),
        ));
        NodeProxyHandle {
            shared: self.shared,
            pods,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }
}

/// A running node proxy, with the verbs every podless component's handle
/// has (see [`mesh_net::lifecycle`]).
#[derive(Debug)]
pub struct NodeProxyHandle {
    shared: Arc<NodeProxyShared>,
    pods: Pods,
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl NodeProxyHandle {
    /// The pods served now.
    pub fn pods(&self) -> Vec<ServedPod> {
        let mut pods: Vec<ServedPod> = self
            .pods
            .lock()
            .iter()
            .map(|(uid, pod)| ServedPod {
                uid: uid.clone(),
                namespace: pod.info.namespace.clone(),
                name: pod.info.name.clone(),
                service_account: pod.info.service_account.clone(),
            })
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        pods
    }

    /// HBONE connections the pods' instances hold open (pooled), in all.
    pub fn pooled_connections(&self) -> usize {
        self.pods
            .lock()
            .values()
            .map(|pod| pod.proxy.pooled_connections())
            .sum()
    }

    /// The connection to the agent.
    pub fn status(&self) -> NodeStatus {
        self.shared.status.borrow().clone()
    }

    /// A receiver of [`NodeStatus`], for waiting on a change.
    pub fn watch(&self) -> watch::Receiver<NodeStatus> {
        self.shared.status.subscribe()
    }

    /// `Ok` once the agent's first snapshot is in (every pod it listed is
    /// served); waits up to `wait`.
    pub async fn ready(&self, wait: Duration) -> Result<(), NotReady> {
        if self.stop.is_cancelled() {
            return Err(NotReady::Stopped);
        }
        let mut status = self.shared.status.subscribe();
        match tokio::time::timeout(wait, status.wait_for(|status| status.synced)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(NotReady::Stopped),
            Err(_) => Err(NotReady::NotSynced {
                waited: wait,
                last_error: self.status().last_error,
            }),
        }
    }

    /// Stops following the agent and drains every pod for up to `deadline`.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.stop.cancel();
        self.wait_task().await;
        let pods: Vec<Pod> = self.pods.lock().drain().map(|(_, pod)| pod).collect();
        let drained = futures_drain(pods, deadline).await;
        self.pods.draining.close();
        self.pods.draining.wait().await;
        drained
    }

    /// Stops now: every pod's listeners and connections close. Idempotent.
    pub fn shutdown(&self) {
        self.stop.cancel();
        for pod in self.pods.lock().values() {
            pod.shutdown();
        }
    }

    /// Waits until the node proxy has stopped; never stops it.
    pub async fn join(self) {
        self.wait_task().await;
        self.pods.draining.close();
        self.pods.draining.wait().await;
    }

    async fn wait_task(&self) {
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Drains pods together; what was left at the deadline, summed.
async fn futures_drain(pods: Vec<Pod>, deadline: Duration) -> Drained {
    let mut tasks = tokio::task::JoinSet::new();
    for pod in pods {
        tasks.spawn(pod.drain(deadline));
    }
    let mut left = 0;
    while let Some(drained) = tasks.join_next().await {
        if let Ok(Drained::TimedOut { left: more }) = drained {
            left += more;
        }
    }
    if left == 0 {
        Drained::Complete
    } else {
        Drained::TimedOut { left }
    }
}
