//! The node agent: it captures the pods the CNI plugin asks about, if the
//! pod source says they are enrolled (redirection rules inside the pod's
//! network namespace, see [`crate::redirect`]), hands each captured pod's
//! namespace to the node's data plane over ZDS, follows enrollment changes
//! live, and keeps pods captured across its own restarts.
//!
//! Built like every podless component: [`NodeAgent::builder`] (plain data
//! from a [`NodeAgentConfig`], the pod source and, optionally, the
//! redirection backend), then [`NodeAgent::spawn`] on the two sockets the
//! caller bound (the plugin's stream socket and the ZDS `SOCK_SEQPACKET`
//! one), giving a [`NodeAgentHandle`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use cni_plugin::agent::{MemoryPods, NodeAgent, NodeAgentConfig};
//! use mesh_net::zds::ZdsListener;
//! use tokio::net::UnixListener;
//!
//! let pods = MemoryPods::new(); // or the embedder's own PodSource
//! let agent = NodeAgent::builder()
//!     .config(NodeAgentConfig::default())
//!     .pods(pods.clone())
//!     .build()?
//!     .spawn(
//!         UnixListener::bind("/var/run/podless/cni.sock")?,
//!         ZdsListener::bind("/var/run/ztunnel/ztunnel.sock")?,
//!     )?;
//! agent.ready(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

mod core;
mod plugin_server;
mod pods;
mod records;
#[cfg(feature = "xds-store")]
mod store_pods;
mod zds_server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_net::Drained;
use mesh_net::zds::ZdsListener;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use pods::{DATAPLANE_MODE_LABEL, Labels, MemoryPods, PodInfo, PodSource, enrolled, labels};
#[cfg(feature = "xds-store")]
pub use store_pods::StorePods;

use self::core::{Agent, Event};
use self::records::Records;
use self::zds_server::DataPlanes;
use crate::protocol::Attachment;
use crate::redirect::{RedirectBackend, RedirectSpec, Redirection};

/// How often the agent reconciles its pods with the pod source without
/// being told of a change: a capture that failed is tried again, and a pod
/// whose namespace is gone (its DEL never came) is released.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);

/// How long the agent waits for a data plane's ack by default (WIRE.md §5).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The node agent's plain data, as configuration ([`mesh_net::config`]). In
/// YAML:
///
/// ```yaml
/// redirection: nftables   # or iptables
/// rules: {outboundPort: 15001, inboundPlaintextPort: 15006, hbonePort: 15008, dnsPort: 15053}
/// ackTimeout: 5s
/// stateDir: /var/run/podless/agent   # null: pods are not recovered after a restart
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct NodeAgentConfig {
    /// `redirection`: the firewall backend (default nftables).
    pub redirection: RedirectBackend,
    /// `rules`: the ports and mark of the in-pod rules (default Istio's).
    pub rules: RedirectSpec,
    /// `ackTimeout`: how long a data plane may take to ack (default 5 s).
    #[serde(with = "mesh_net::config::duration")]
    pub ack_timeout: Duration,
    /// `stateDir`: where the agent remembers its pods across restarts
    /// (default none: nothing is remembered).
    pub state_dir: Option<PathBuf>,
}

impl Default for NodeAgentConfig {
    fn default() -> Self {
        Self {
            redirection: RedirectBackend::default(),
            rules: RedirectSpec::default(),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            state_dir: None,
        }
    }
}

/// Why an agent could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required part is missing.
    #[error("missing {0}: call NodeAgent::builder().{0}(..)")]
    Missing(&'static str),
    /// The rules are not valid.
    #[error("rules: {0}")]
    Rules(String),
}

/// A builder of [`NodeAgent`].
#[derive(Debug, Default)]
pub struct NodeAgentBuilder {
    config: NodeAgentConfig,
    pods: Option<Arc<dyn PodSource>>,
    redirection: Option<Arc<dyn Redirection>>,
}

impl NodeAgentBuilder {
    /// Takes every field of `config`.
    pub fn config(mut self, config: NodeAgentConfig) -> Self {
        self.config = config;
        self
    }

    /// Where enrollment comes from. Required.
    pub fn pods(mut self, pods: impl PodSource) -> Self {
        self.pods = Some(Arc::new(pods));
        self
    }

    /// A shared pod source.
    pub fn shared_pods(mut self, pods: Arc<dyn PodSource>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// A redirection backend of the embedder's (default: the config's
    /// `redirection`).
    pub fn redirection(mut self, redirection: Arc<dyn Redirection>) -> Self {
        self.redirection = Some(redirection);
        self
    }

    /// Where the agent remembers its pods across restarts.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.state_dir = Some(dir.into());
        self
    }

    /// Checks and assembles; binds and spawns nothing.
    pub fn build(self) -> Result<NodeAgent, BuildError> {
        self.config
            .rules
            .validate()
            .map_err(|err| BuildError::Rules(err.to_string()))?;
        Ok(NodeAgent {
            pods: self.pods.ok_or(BuildError::Missing("pods"))?,
            redirection: self
                .redirection
                .unwrap_or_else(|| self.config.redirection.build()),
            config: self.config,
        })
    }
}

impl From<NodeAgentConfig> for NodeAgentBuilder {
    fn from(config: NodeAgentConfig) -> Self {
        Self::default().config(config)
    }
}

/// A node agent, built but not running.
#[derive(Debug)]
pub struct NodeAgent {
    config: NodeAgentConfig,
    pods: Arc<dyn PodSource>,
    redirection: Arc<dyn Redirection>,
}

/// A pod the agent holds (see [`NodeAgentHandle::view`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldPod {
    /// The uid the data plane knows it by.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The runtime's attachment.
    pub attachment: Attachment,
    /// Whether its traffic is captured.
    pub captured: bool,
}

/// What the agent holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentView {
    /// The pods, by uid.
    pub pods: Vec<HeldPod>,
    /// How many data planes are connected.
    pub data_planes: usize,
}

/// Why the agent is not ready.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// It was stopped.
    #[error("the node agent has stopped")]
    Stopped,
    /// It has not finished reading back its pods.
    #[error("the node agent is still recovering its pods after {0:?}")]
    Recovering(Duration),
}

impl NodeAgent {
    /// A builder.
    pub fn builder() -> NodeAgentBuilder {
        NodeAgentBuilder::default()
    }

    /// Runs on the caller's sockets, on the current runtime: `plugin` for
    /// the CNI plugin's requests, `zds` for data planes. First it reads back
    /// the pods of an earlier agent (see [`NodeAgentConfig::state_dir`]).
    pub fn spawn(self, plugin: UnixListener, zds: ZdsListener) -> std::io::Result<NodeAgentHandle> {
        let stop = CancellationToken::new();
        let draining = stop.child_token();
        let (events, mut inbox) = mpsc::channel::<Event>(1024);
        let (view, view_rx) = watch::channel(AgentView::default());
        let (recovered, recovered_rx) = watch::channel(false);
        let tasks = TaskTracker::new();
        let mut agent = Agent::new(
            self.pods.clone(),
            self.redirection,
            self.config.rules,
            Records::new(self.config.state_dir),
            DataPlanes::new(self.config.ack_timeout),
            view,
        );
        let ack_timeout = self.config.ack_timeout;
        tasks.spawn(accept_data_planes(
            zds,
            events.clone(),
            draining.clone(),
            ack_timeout,
        ));
        tasks.spawn(plugin_server::serve(
            plugin,
            events,
            draining.clone(),
            tasks.clone(),
        ));
        let mut changes = self.pods.changes();
        let agent_stop = stop.clone();
        let task = tokio::spawn(async move {
            agent.recover().await;
            recovered.send_replace(true);
            let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut source_open = true;
            loop {
                // Stopping cuts short what is in progress: a pod half set up
                // is set up again by the runtime's retry (ADD is idempotent).
                let sockets = agent.data_planes.sockets();
                let work = async {
                    tokio::select! {
                        socket = zds_server::readable(&sockets) => {
                            agent.data_plane_spoke(&socket).await;
                            true
                        }
                        event = inbox.recv() => match event {
                            Some(event) => {
                                agent.handle(event).await;
                                true
                            }
                            None => false,
                        },
                        changed = changes.changed(), if source_open => {
                            // A source that is gone changes nothing more.
                            source_open = changed.is_ok();
                            agent.reconcile().await;
                            true
                        }
                        _ = tick.tick() => {
                            agent.reconcile().await;
                            true
                        }
                    }
                };
                tokio::select! {
                    () = agent_stop.cancelled() => break,
                    go_on = work => if !go_on { break },
                }
            }
        });
        tasks.close();
        Ok(NodeAgentHandle {
            stop,
            draining,
            tasks,
            task: Some(task).into(),
            view: view_rx,
            recovered: recovered_rx,
        })
    }
}

/// Accepts data planes, reads their hello, and hands them to the agent.
async fn accept_data_planes(
    mut zds: ZdsListener,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
    hello_timeout: Duration,
) {
    loop {
        let socket = tokio::select! {
            () = stop.cancelled() => return,
            accepted = zds.accept() => match accepted {
                Ok(socket) => socket,
                Err(err) => {
                    tracing::warn!("ZDS socket: accept: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let events = events.clone();
        tokio::spawn(async move {
            match DataPlanes::hello(&socket, hello_timeout).await {
                Ok(()) => {
                    let _ = events.send(Event::DataPlane(socket)).await;
                }
                Err(err) => tracing::warn!("ZDS: a data plane was refused: {err}"),
            }
        });
    }
}

/// A running node agent, with the verbs every podless component's handle has
/// (see [`mesh_net::lifecycle`]). Stopping it leaves every pod as it is:
/// captured pods stay captured for the next agent.
#[derive(Debug)]
pub struct NodeAgentHandle {
    stop: CancellationToken,
    draining: CancellationToken,
    tasks: TaskTracker,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    view: watch::Receiver<AgentView>,
    recovered: watch::Receiver<bool>,
}

impl NodeAgentHandle {
    /// What the agent holds now.
    pub fn view(&self) -> AgentView {
        self.view.borrow().clone()
    }

    /// A receiver of [`AgentView`]s, for waiting on a change.
    pub fn watch(&self) -> watch::Receiver<AgentView> {
        self.view.clone()
    }

    /// `Ok` once the agent has read back its earlier pods and serves the
    /// plugin (it answers "try again later" until a data plane connects).
    pub async fn ready(&self, wait: Duration) -> Result<(), NotReady> {
        if self.stop.is_cancelled() || self.draining.is_cancelled() {
            return Err(NotReady::Stopped);
        }
        let mut recovered = self.recovered.clone();
        match tokio::time::timeout(wait, recovered.wait_for(|done| *done)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(NotReady::Stopped),
            Err(_) => Err(NotReady::Recovering(wait)),
        }
    }

    /// Stops taking requests, lets the ones in progress finish for up to
    /// `deadline`, then stops. Pods are left as they are.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.draining.cancel();
        let finished = tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok();
        let left = if finished { 0 } else { self.tasks.len() };
        self.stop.cancel();
        self.wait_task().await;
        if left == 0 {
            Drained::Complete
        } else {
            Drained::TimedOut { left }
        }
    }

    /// Stops now. Idempotent.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits until the agent has stopped; never stops it.
    pub async fn join(self) {
        self.wait_task().await;
    }

    async fn wait_task(&self) {
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
