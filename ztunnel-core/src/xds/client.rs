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

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_api::ResourceType;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::envoy_core::Node;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
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

/// A builder of [`XdsClient`].
#[derive(Debug, Default)]
pub struct XdsClientBuilder {
    channel: Option<Channel>,
    node_id: Option<String>,
    cluster_id: Option<String>,
    token: Option<String>,
    state: Option<SharedState>,
    max_backoff: Option<Duration>,
    on_demand: bool,
}

impl XdsClientBuilder {
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
        self.cluster_id = Some(id.into());
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
        self.max_backoff = Some(backoff);
        self
    }

    /// Validates and assembles; connects nothing.
    pub fn build(self) -> Result<XdsClient, BuildError> {
        let channel = self.channel.ok_or(BuildError::NoChannel)?;
        let node_id = self.node_id.ok_or(BuildError::NoNodeId)?;
        let cluster_id: MetadataValue<_> = self
            .cluster_id
            .as_deref()
            .unwrap_or("Kubernetes")
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
            max_backoff: self.max_backoff.unwrap_or(Duration::from_secs(15)),
            synced: watch::Sender::new(false),
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
    synced: watch::Sender<bool>,
    on_demand: Option<OnDemand>,
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

    /// Becomes `true` once the first stream delivered both types (the proxy is
    /// then ready), and stays so.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Runs until `shutdown`: streams, and reconnects with backoff when a stream
    /// fails or ends.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.stream() => outcome,
            };
            match outcome {
                Ok(true) => backoff = INITIAL_BACKOFF,
                Ok(false) => {}
                Err(status) => {
                    tracing::warn!(code = ?status.code(), error = status.message(), "xDS stream failed; keeping the last known state");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
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
            if seen.iter().all(|seen| *seen) {
                self.synced.send_replace(true);
            }
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
