//! The delta ADS client: subscribes to every `Address` and `Authorization`,
//! applies responses to the shared state, ACKs or NACKs each, and reconnects
//! with exponential backoff, announcing what it holds
//! (`initial_resource_versions`) so the server sends only what changed. While
//! the control plane is unreachable the state stays as it was: last known good.

use std::time::Duration;

use mesh_api::ResourceType;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::envoy_core::Node;
use tokio::sync::{mpsc, watch};
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
}

impl XdsClientBuilder {
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
            let first = DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: kind.type_url().to_owned(),
                initial_resource_versions: self.known.of(kind).clone().into_iter().collect(),
                ..DeltaDiscoveryRequest::default()
            };
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
        let mut seen = [false; 2];
        let mut delivered = false;
        while let Some(response) = responses.message().await? {
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
