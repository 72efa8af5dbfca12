//! The delta ADS client: subscribes to every `Address` and `Authorization`,
//! applies responses to the shared state, ACKs or NACKs each, and reconnects
//! with exponential backoff, announcing what it holds
//! (`initial_resource_versions`) so the server sends only what changed. While
//! the control plane is unreachable the state stays as it was: last known good.
//!
//! On demand (`XdsClientBuilder::on_demand`), `Address` resources are not
//! streamed wholesale: the first request subscribes to nothing (`*` in and out
//! at once, as ztunnel does), and each lookup asks for one name through a
//! [`Demander`] (`<network>/<ip>`, `<namespace>/<hostname>` or a uid), which
//! resolves once a response names it (sent, aliased or removed). Demanded
//! names stay subscribed, across reconnects too. Policies are always streamed.
//!
//! [`XdsClient::spawn`] runs it and returns an [`XdsClientHandle`] of the
//! shape of [`mesh_net::lifecycle`]: `ready(wait)` says why it has not synced
//! (credentials refused, control plane unreachable, ...), `state()` how the
//! sync goes, `drain`/`shutdown` end the stream, `join` waits for the end.
//!
//! ```no_run
//! # async fn example(channel: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ztunnel_core::XdsClient;
//!
//! let client = XdsClient::builder()
//!     .channel(channel)
//!     .node_id("ztunnel~10.0.0.2~shell.default~default.svc.cluster.local")
//!     .token("node-agent-token")
//!     .build()?;
//! let state = client.state();
//! let xds = client.spawn();
//! if let Err(why) = xds.ready(Duration::from_secs(10)).await {
//!     eprintln!("not synced: {why}"); // e.g. the credentials were refused
//! }
//! // ... later
//! xds.shutdown();
//! xds.join().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_api::ResourceType;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::envoy_core::Node;
use mesh_net::{Backoff, Drained};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::apply::{KnownVersions, apply_response};
use crate::state::SharedState;

/// ztunnel accepts responses up to 200 MiB.
const MAX_RESPONSE_BYTES: usize = 200 << 20;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No channel to the control plane was given.
    #[error("no channel: call XdsClient::builder().channel(..)")]
    NoChannel,
    /// No node id was given.
    #[error("no node id: call XdsClient::builder().node_id(..)")]
    NoNodeId,
    /// A header value is not valid.
    #[error("{0} is not a valid header value")]
    Header(&'static str),
}

/// An xDS client's plain data, as configuration ([`mesh_net::config`]):
/// what [`XdsClientBuilder`] takes besides the channel, the bearer token (a
/// secret, read by the binary from wherever it keeps it) and the state, which
/// stay builder-only. Every field is optional; [`Default`] gives the
/// builder's defaults. In YAML:
///
/// ```yaml
/// nodeId: ztunnel~10.0.0.2~shell.default~default.svc.cluster.local  # required, here or with the builder
/// clusterId: Kubernetes
/// onDemand: false
/// maxBackoff: 15s
/// ```
///
/// ```
/// use std::time::Duration;
/// use ztunnel_core::XdsClientConfig;
///
/// let config: XdsClientConfig =
///     mesh_net::config::from_yaml("nodeId: ztunnel~a\nmaxBackoff: 1m\n", "xds.yaml")?;
/// assert_eq!(config.max_backoff, Duration::from_secs(60));
/// assert_eq!(config.cluster_id, "Kubernetes"); // the default
/// # Ok::<(), mesh_net::config::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct XdsClientConfig {
    /// `nodeId`: the node id, ztunnel's form
    /// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (default none: then
    /// [`XdsClientBuilder::node_id`] is required).
    pub node_id: Option<String>,
    /// `clusterId`: the `clusterid` header (default `Kubernetes`).
    pub cluster_id: String,
    /// `onDemand`: ask for `Address` resources one name at a time instead of
    /// all of them (default `false`).
    pub on_demand: bool,
    /// `maxBackoff`: the longest wait between reconnection attempts (default
    /// `15s`).
    #[serde(with = "mesh_net::config::duration")]
    pub max_backoff: Duration,
}

impl Default for XdsClientConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            on_demand: false,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl From<XdsClientConfig> for XdsClientBuilder {
    fn from(config: XdsClientConfig) -> Self {
        Self::default().config(config)
    }
}

/// The `clusterid` header, unless told otherwise.
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The longest wait between reconnection attempts, unless told otherwise.
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(15);

/// A builder of [`XdsClient`].
#[derive(Debug)]
pub struct XdsClientBuilder {
    channel: Option<Channel>,
    node_id: Option<String>,
    cluster_id: String,
    token: Option<String>,
    state: Option<SharedState>,
    max_backoff: Duration,
    on_demand: bool,
}

impl Default for XdsClientBuilder {
    fn default() -> Self {
        Self {
            channel: None,
            node_id: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_owned(),
            token: None,
            state: None,
            max_backoff: DEFAULT_MAX_BACKOFF,
            on_demand: false,
        }
    }
}

impl XdsClientBuilder {
    /// Takes every field of `config` (each replaces what was set before, an
    /// absent `nodeId` included): call it first, then the channel, the token
    /// and any overrides, e.g.
    /// `XdsClient::builder().config(config).channel(channel).token(token)`.
    pub fn config(mut self, config: XdsClientConfig) -> Self {
        let XdsClientConfig {
            node_id,
            cluster_id,
            on_demand,
            max_backoff,
        } = config;
        self.node_id = node_id;
        self.cluster_id = cluster_id;
        self.on_demand = on_demand;
        self.max_backoff = max_backoff;
        self
    }

    /// Ask for `Address` resources one name at a time, through
    /// [`XdsClient::demander`], instead of all of them (default: all).
    pub fn on_demand(mut self, on_demand: bool) -> Self {
        self.on_demand = on_demand;
        self
    }

    /// The channel to the control plane (e.g. `mesh_ca::CaClient::channel`, TLS
    /// to the same server as the CA).
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// The node id (ztunnel's form: `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }

    /// The `clusterid` header (default `Kubernetes`).
    pub fn cluster_id(mut self, id: impl Into<String>) -> Self {
        self.cluster_id = id.into();
        self
    }

    /// A bearer token sent with every stream.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The state to keep up to date (default: a new one).
    pub fn state(mut self, state: SharedState) -> Self {
        self.state = Some(state);
        self
    }

    /// The longest wait between reconnection attempts (default 15 s).
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// Validates and assembles; connects nothing.
    pub fn build(self) -> Result<XdsClient, BuildError> {
        let channel = self.channel.ok_or(BuildError::NoChannel)?;
        let node_id = self.node_id.ok_or(BuildError::NoNodeId)?;
        let cluster_id: MetadataValue<_> = self
            .cluster_id
            .parse()
            .map_err(|_| BuildError::Header("the cluster id"))?;
        let authorization = self
            .token
            .map(|token| format!("Bearer {token}").parse())
            .transpose()
            .map_err(|_| BuildError::Header("the token"))?;
        Ok(XdsClient {
            channel,
            node: Node {
                id: node_id,
                ..Node::default()
            },
            cluster_id,
            authorization,
            state: self.state.unwrap_or_default(),
            known: KnownVersions::default(),
            max_backoff: self.max_backoff,
            sync: watch::Sender::new(SyncState::default()),
            on_demand: self.on_demand.then(|| {
                let (sender, receiver) = mpsc::channel(256);
                OnDemand {
                    sender,
                    receiver,
                    names: BTreeSet::new(),
                    waiting: Vec::new(),
                }
            }),
        })
    }
}

/// The delta ADS client.
#[derive(Debug)]
pub struct XdsClient {
    channel: Channel,
    node: Node,
    cluster_id: MetadataValue<tonic::metadata::Ascii>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    state: SharedState,
    known: KnownVersions,
    max_backoff: Duration,
    sync: watch::Sender<SyncState>,
    on_demand: Option<OnDemand>,
}

/// How the sync with the control plane goes: a snapshot
/// ([`XdsClientHandle::state`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncState {
    /// The first stream delivered both resource types (the state is then
    /// complete enough to serve); stays `true` through later failures, while
    /// the last known state is kept.
    pub synced: bool,
    /// A stream is open now (the control plane accepted it).
    pub connected: bool,
    /// Why the latest stream failed, until a later one delivers a response.
    pub last_error: Option<StreamError>,
    /// Streams attempted so far (the first connection, then reconnections).
    pub attempts: u64,
    /// Responses received and applied (ACKed or NACKed) so far.
    pub responses: u64,
}

/// How a stream failed: the gRPC status the client got (from the control
/// plane, or from the transport when it could not be reached).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct StreamError {
    /// The status code.
    pub code: tonic::Code,
    /// Its message.
    pub message: String,
}

impl StreamError {
    fn of(status: &tonic::Status) -> Self {
        Self {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Why a client is not ready (not synced yet): the latest failure, if any.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XdsNotReady {
    /// The control plane refused the client's credentials (gRPC
    /// `UNAUTHENTICATED`): a wrong or expired token, a client certificate
    /// it does not trust. Retrying will not help until they change.
    #[error("the control plane refused the credentials: {0}")]
    Unauthenticated(String),
    /// The control plane knows the client but refuses it (gRPC
    /// `PERMISSION_DENIED`).
    #[error("the control plane denied the stream: {0}")]
    PermissionDenied(String),
    /// The control plane could not be reached, or is not serving (gRPC
    /// `UNAVAILABLE` or `DEADLINE_EXCEEDED`, e.g. connection refused, TLS
    /// failure).
    #[error("the control plane is unreachable: {0}")]
    Unreachable(String),
    /// A stream failed otherwise.
    #[error("the xDS stream failed: {0}")]
    Failed(StreamError),
    /// No failure, but not synced yet (no stream delivered both types).
    #[error("not synced with the control plane yet")]
    NotSynced,
    /// The client was shut down or drained, or its task ended.
    #[error("the xDS client has stopped")]
    Stopped,
}

impl From<&StreamError> for XdsNotReady {
    fn from(error: &StreamError) -> Self {
        let message = error.message.clone();
        match error.code {
            tonic::Code::Unauthenticated => Self::Unauthenticated(message),
            tonic::Code::PermissionDenied => Self::PermissionDenied(message),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Self::Unreachable(message),
            _ => Self::Failed(error.clone()),
        }
    }
}

/// Why a client's task ended other than by `drain` or `shutdown`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Its task failed (panicked) or was cancelled with its runtime.
    #[error("the xDS client's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A running [`XdsClient`] ([`XdsClient::spawn`]), with the verbs of
/// [`mesh_net::lifecycle`]. Dropping it leaves the client running.
#[derive(Debug)]
pub struct XdsClientHandle {
    state: SharedState,
    sync: watch::Receiver<SyncState>,
    stop: CancellationToken,
    /// Empty once the client has stopped.
    stopped: TaskTracker,
    task: JoinHandle<()>,
}

impl XdsClientHandle {
    /// The mesh state this client keeps up to date.
    pub fn shared_state(&self) -> SharedState {
        self.state.clone()
    }

    /// How the sync goes now.
    pub fn state(&self) -> SyncState {
        self.sync.borrow().clone()
    }

    /// Why the latest stream failed, until a later one delivers a response.
    pub fn last_error(&self) -> Option<StreamError> {
        self.sync.borrow().last_error.clone()
    }

    /// Waits up to `wait` for the first sync (both resource types delivered);
    /// otherwise why not: the latest stream's failure (credentials refused,
    /// unreachable, ...), else [`XdsNotReady::NotSynced`].
    pub async fn ready(&self, wait: Duration) -> Result<(), XdsNotReady> {
        let mut sync = self.sync.clone();
        // Stopped first: a stopped client is not ready, synced or not.
        let synced = tokio::select! {
            biased;
            () = self.stop.cancelled() => return Err(XdsNotReady::Stopped),
            synced = tokio::time::timeout(wait, sync.wait_for(|sync| sync.synced)) => synced,
        };
        match synced {
            Ok(Ok(_)) => Ok(()),
            // The client's task ended.
            Ok(Err(_)) => Err(XdsNotReady::Stopped),
            Err(_) => Err(self
                .sync
                .borrow()
                .last_error
                .as_ref()
                .map_or(XdsNotReady::NotSynced, XdsNotReady::from)),
        }
    }

    /// Ends the stream (the state stays as last received) and waits up to
    /// `deadline` for the client to stop. A response being applied is
    /// applied whole, so this is [`Drained::Complete`] unless the task is
    /// stuck.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.shutdown();
        match tokio::time::timeout(deadline, self.stopped.wait()).await {
            Ok(()) => Drained::Complete,
            Err(_) => Drained::TimedOut { left: 1 },
        }
    }

    /// Ends the stream and stops reconnecting; the state stays as last
    /// received. Idempotent; returns at once (see [`XdsClientHandle::join`]).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits until the client has stopped (after [`XdsClientHandle::drain`]
    /// or [`XdsClientHandle::shutdown`]; failed streams are retried, never
    /// fatal). Never stops it.
    pub async fn join(self) -> Result<(), RunError> {
        Ok(self.task.await?)
    }
}

/// The on-demand side of a client.
#[derive(Debug)]
struct OnDemand {
    sender: mpsc::Sender<(String, oneshot::Sender<()>)>,
    receiver: mpsc::Receiver<(String, oneshot::Sender<()>)>,
    /// Every name asked for: subscribed again on each new stream.
    names: BTreeSet<String>,
    /// Asks not answered yet.
    waiting: Vec<(String, oneshot::Sender<()>)>,
}

/// Asks an on-demand client for `Address` resources. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Demander {
    sender: mpsc::Sender<(String, oneshot::Sender<()>)>,
}

impl Demander {
    /// Asks for `name` (`<network>/<ip>`, `<namespace>/<hostname>` or a uid)
    /// and waits up to `wait` for the answer to reach the state; whether it
    /// came (an unknown name is answered too, as a removal).
    pub async fn demand(&self, name: &str, wait: Duration) -> bool {
        let (done, answered) = oneshot::channel();
        if self.sender.send((name.to_owned(), done)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(wait, answered).await, Ok(Ok(())))
    }
}

/// How long the first reconnection attempt waits.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

impl XdsClient {
    /// A builder.
    pub fn builder() -> XdsClientBuilder {
        XdsClientBuilder::default()
    }

    /// The state this client keeps up to date.
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// The handle for on-demand lookups; `None` unless built with
    /// [`XdsClientBuilder::on_demand`].
    pub fn demander(&self) -> Option<Demander> {
        self.on_demand.as_ref().map(|on_demand| Demander {
            sender: on_demand.sender.clone(),
        })
    }

    /// Runs on the current runtime (streams, and reconnects with backoff
    /// when a stream fails or ends) until the handle stops it.
    pub fn spawn(self) -> XdsClientHandle {
        let state = self.state.clone();
        let sync = self.sync.subscribe();
        let stop = CancellationToken::new();
        let stopped = TaskTracker::new();
        let task = stopped.spawn(self.run(stop.clone()));
        stopped.close();
        XdsClientHandle {
            state,
            sync,
            stop,
            stopped,
            task,
        }
    }

    /// Runs until `shutdown`: streams, and reconnects with backoff when a stream
    /// fails or ends (with jitter, so that clients cut off together by a
    /// control plane restart do not come back together).
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(INITIAL_BACKOFF, self.max_backoff);
        loop {
            self.sync.send_modify(|sync| sync.attempts += 1);
            let outcome = tokio::select! {
                () = shutdown.cancelled() => None,
                outcome = self.stream() => Some(outcome),
            };
            self.sync.send_modify(|sync| sync.connected = false);
            let Some(outcome) = outcome else { return };
            match outcome {
                Ok(true) => backoff.reset(),
                Ok(false) => {}
                Err(status) => {
                    tracing::warn!(code = ?status.code(), error = status.message(), "xDS stream failed; keeping the last known state");
                    self.sync
                        .send_modify(|sync| sync.last_error = Some(StreamError::of(&status)));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One stream, until it ends; `Ok(true)` if it delivered anything.
    async fn stream(&mut self) -> Result<bool, tonic::Status> {
        let (requests, outbound) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for kind in ResourceType::ALL {
            let mut first = DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: kind.type_url().to_owned(),
                initial_resource_versions: self.known.of(kind).clone().into_iter().collect(),
                ..DeltaDiscoveryRequest::default()
            };
            if kind == ResourceType::Address && self.on_demand.is_some() {
                // Subscribe to nothing (asked-for names follow).
                first.resource_names_subscribe = vec!["*".to_owned()];
                first.resource_names_unsubscribe = vec!["*".to_owned()];
            }
            requests
                .send(first)
                .await
                .map_err(|_| tonic::Status::internal("request queue closed"))?;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(outbound));
        request
            .metadata_mut()
            .insert("clusterid", self.cluster_id.clone());
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        let mut responses = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        self.sync.send_modify(|sync| sync.connected = true);
        // Names asked for on an earlier stream, asked for again.
        if let Some(on_demand) = &self.on_demand
            && !on_demand.names.is_empty()
        {
            let again = DeltaDiscoveryRequest {
                type_url: ResourceType::Address.type_url().to_owned(),
                resource_names_subscribe: on_demand.names.iter().cloned().collect(),
                ..DeltaDiscoveryRequest::default()
            };
            requests
                .send(again)
                .await
                .map_err(|_| tonic::Status::internal("request queue closed"))?;
        }
        let mut seen = [false; 2];
        let mut delivered = false;
        loop {
            let response = tokio::select! {
                response = responses.message() => match response? {
                    Some(response) => response,
                    None => break,
                },
                asked = next_demand(self.on_demand.as_mut()) => {
                    let Some((name, done)) = asked else { continue };
                    let Some(on_demand) = self.on_demand.as_mut() else { continue };
                    on_demand.names.insert(name.clone());
                    on_demand.waiting.push((name.clone(), done));
                    let request = DeltaDiscoveryRequest {
                        type_url: ResourceType::Address.type_url().to_owned(),
                        resource_names_subscribe: vec![name],
                        ..DeltaDiscoveryRequest::default()
                    };
                    if requests.send(request).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            delivered = true;
            let kind = response.type_url.parse::<ResourceType>().ok();
            let answer = {
                let known = &mut self.known;
                self.state
                    .update(|state| apply_response(state, known, &response))
            };
            if requests.send(answer).await.is_err() {
                break;
            }
            if let Some(on_demand) = self.on_demand.as_mut()
                && kind == Some(ResourceType::Address)
            {
                on_demand.answered(&response);
            }
            if let Some(kind) = kind {
                seen[ResourceType::ALL
                    .iter()
                    .position(|k| *k == kind)
                    .unwrap_or_default()] = true;
            }
            let synced = seen.iter().all(|seen| *seen);
            self.sync.send_modify(|sync| {
                sync.responses += 1;
                sync.last_error = None;
                sync.synced |= synced;
            });
        }
        Ok(delivered)
    }
}

/// The next on-demand ask, or never without on-demand.
async fn next_demand(on_demand: Option<&mut OnDemand>) -> Option<(String, oneshot::Sender<()>)> {
    match on_demand {
        Some(on_demand) => on_demand.receiver.recv().await,
        None => std::future::pending().await,
    }
}

impl OnDemand {
    /// Completes the asks that `response` answers: a name it sends (or
    /// aliases) or removes.
    fn answered(&mut self, response: &mesh_api::discovery::DeltaDiscoveryResponse) {
        let mentioned = |name: &str| {
            response.removed_resources.iter().any(|n| n == name)
                || response
                    .resources
                    .iter()
                    .any(|r| r.name == name || r.aliases.iter().any(|a| a == name))
        };
        let waiting = std::mem::take(&mut self.waiting);
        for (name, done) in waiting {
            if mentioned(&name) {
                let _ = done.send(());
            } else if !done.is_closed() {
                self.waiting.push((name, done));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builders compare by what they hold (no `PartialEq`: the channel is a
    /// runtime handle).
    fn holds(builder: &XdsClientBuilder) -> String {
        format!("{builder:?}")
    }

    #[test]
    fn the_default_config_is_the_builders_default() {
        assert_eq!(
            holds(&XdsClientBuilder::from(XdsClientConfig::default())),
            holds(&XdsClient::builder())
        );
    }

    #[test]
    fn config_applies_every_field_as_its_setter_does() {
        let config = XdsClientConfig {
            node_id: Some("ztunnel~10.0.0.2~shell.default~default.svc.cluster.local".into()),
            cluster_id: "east".into(),
            on_demand: true,
            max_backoff: Duration::from_secs(90),
        };
        let by_setters = XdsClient::builder()
            .node_id("ztunnel~10.0.0.2~shell.default~default.svc.cluster.local")
            .cluster_id("east")
            .on_demand(true)
            .max_backoff(Duration::from_secs(90));
        assert_eq!(
            holds(&XdsClientBuilder::from(config.clone())),
            holds(&by_setters)
        );
        let default = XdsClientConfig::default();
        assert_ne!(config.node_id, default.node_id);
        assert_ne!(config.cluster_id, default.cluster_id);
        assert_ne!(config.on_demand, default.on_demand);
        assert_ne!(config.max_backoff, default.max_backoff);
    }

    #[tokio::test]
    async fn the_default_cluster_id_and_backoff_reach_the_client() {
        let channel = Channel::from_static("http://127.0.0.1:1").connect_lazy();
        let client = XdsClient::builder()
            .config(XdsClientConfig {
                node_id: Some("n".into()),
                ..XdsClientConfig::default()
            })
            .channel(channel)
            .build()
            .expect("built");
        assert_eq!(client.cluster_id, "Kubernetes");
        assert_eq!(client.max_backoff, Duration::from_secs(15));
    }
}
