//! Shared test helpers: objects, a server on loopback, and a delta ADS client
//! built on the generated tonic client.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_api::envoy_core::Node;
use mesh_api::rpc::Status as RpcStatus;
use mesh_api::workload::{Address, Workload, address};
use mesh_api::{any, security};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;
use xds_server::{Authenticators, Object, Store, XdsHandle, XdsServer, parse_manifest};

/// How long a test waits for a response before failing (not a timing assertion:
/// a ceiling so a broken server fails the test instead of hanging it).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Objects from YAML (panics on errors: test input).
pub fn objects(yaml: &str) -> Vec<Object> {
    let manifest = parse_manifest(yaml).expect("YAML");
    assert!(manifest.errors.is_empty(), "{:?}", manifest.errors);
    manifest.objects
}

/// Applies YAML to a store.
pub fn apply(store: &Store, yaml: &str) {
    for object in objects(yaml) {
        store.apply(object).expect("apply");
    }
}

/// A pod manifest.
pub fn pod(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("\n    {k}: {v}"))
        .collect();
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels:{labels}
spec:
  serviceAccountName: {name}
  nodeName: node-a
  containers:
  - name: app
    image: app
    ports:
    - name: http
      containerPort: 8080
status:
  podIP: {ip}
  conditions:
  - type: Ready
    status: \"True\"
"
    )
}

/// Serves `store` on a loopback port, plaintext, anonymous clients.
pub async fn serve(store: &Store) -> XdsHandle {
    serve_with(store, |builder| builder).await
}

/// Serves `store` on a loopback port with builder tweaks.
pub async fn serve_with(
    store: &Store,
    tweak: impl FnOnce(xds_server::XdsServerBuilder) -> xds_server::XdsServerBuilder,
) -> XdsHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let builder = XdsServer::builder()
        .store(store.clone())
        .authenticators(Authenticators::anonymous());
    tweak(builder)
        .build()
        .expect("build")
        .spawn(listener)
        .expect("spawn")
}

/// A delta ADS client stream.
pub struct AdsClient {
    pub requests: mpsc::Sender<DeltaDiscoveryRequest>,
    pub responses: Streaming<DeltaDiscoveryResponse>,
}

pub const ADDRESS: &str = mesh_api::type_url::ADDRESS;
pub const AUTHORIZATION: &str = mesh_api::type_url::AUTHORIZATION;

pub fn node() -> Node {
    Node {
        id: "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
        ..Node::default()
    }
}

/// A wildcard subscription to `type_url` (with `initial` versions).
pub fn wildcard(type_url: &str, initial: BTreeMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: type_url.into(),
        initial_resource_versions: initial,
        ..DeltaDiscoveryRequest::default()
    }
}

pub fn ack(type_url: &str, nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        ..DeltaDiscoveryRequest::default()
    }
}

pub fn nack(type_url: &str, nonce: &str, error: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: error.into(),
            details: Vec::new(),
        }),
        ..DeltaDiscoveryRequest::default()
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    channel_with_window(addr, None).await
}

/// A channel with the given HTTP/2 stream window (hyper's default is 2 MiB).
pub async fn channel_with_window(addr: SocketAddr, window: Option<u32>) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect()
        .await
        .expect("connect")
}

impl AdsClient {
    /// Opens a stream and sends `first`.
    pub async fn open(addr: SocketAddr, first: Vec<DeltaDiscoveryRequest>) -> Self {
        Self::try_open(addr, first).await.expect("stream")
    }

    pub async fn try_open(
        addr: SocketAddr,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> Result<Self, tonic::Status> {
        Self::open_on(channel(addr).await, first).await
    }

    /// Opens a stream on `channel` and sends `first`.
    pub async fn open_on(
        channel: Channel,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> Result<Self, tonic::Status> {
        let (requests, rx) = mpsc::channel(16);
        for request in first {
            requests.send(request).await.expect("queue");
        }
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(200 << 20);
        let responses = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
        })
    }

    pub async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.expect("send");
    }

    /// The next response (panics on error or after [`PATIENCE`]).
    pub async fn next(&mut self) -> DeltaDiscoveryResponse {
        self.try_next().await.expect("a response")
    }

    /// The next response or the stream's error.
    pub async fn try_next(&mut self) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(PATIENCE, self.responses.message()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no response within {PATIENCE:?}"),
        }
    }

    /// Receives and ACKs responses of `type_url` until `done` says the
    /// accumulated view is complete; returns the view.
    pub async fn collect_until(&mut self, view: &mut View, done: impl Fn(&View) -> bool) {
        while !done(view) {
            let response = self.next().await;
            view.apply(&response);
            self.send(ack(&response.type_url, &response.nonce)).await;
        }
    }
}

/// What a client holds: resources by type and name, with versions.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub addresses: BTreeMap<String, (String, Address)>,
    pub authorizations: BTreeMap<String, (String, security::Authorization)>,
    pub removed: Vec<String>,
    pub responses: usize,
}

impl View {
    pub fn apply(&mut self, response: &DeltaDiscoveryResponse) {
        self.responses += 1;
        for name in &response.removed_resources {
            self.addresses.remove(name);
            self.authorizations.remove(name);
            self.removed.push(name.clone());
        }
        for resource in &response.resources {
            let any = resource.resource.as_ref().expect("resource body");
            match response.type_url.as_str() {
                ADDRESS => {
                    let address: Address = any::unpack(any).expect("Address");
                    self.addresses
                        .insert(resource.name.clone(), (resource.version.clone(), address));
                }
                AUTHORIZATION => {
                    let policy: security::Authorization = any::unpack(any).expect("Authorization");
                    self.authorizations
                        .insert(resource.name.clone(), (resource.version.clone(), policy));
                }
                other => panic!("unexpected type {other}"),
            }
        }
    }

    pub fn workload(&self, uid: &str) -> Option<&Workload> {
        match &self.addresses.get(uid)?.1.r#type {
            Some(address::Type::Workload(workload)) => Some(workload),
            _ => None,
        }
    }

    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        match type_url {
            ADDRESS => self
                .addresses
                .iter()
                .map(|(name, (version, _))| (name.clone(), version.clone()))
                .collect(),
            _ => self
                .authorizations
                .iter()
                .map(|(name, (version, _))| (name.clone(), version.clone()))
                .collect(),
        }
    }
}

/// Waits until `check` holds (a ceiling of [`PATIENCE`], not a timing assertion).
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a stream on `channel` (with a bearer token, if given), subscribes to
/// every address, and returns the first response or the stream's error.
pub async fn first_response(
    channel: Channel,
    token: Option<&str>,
) -> Result<DeltaDiscoveryResponse, tonic::Status> {
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(wildcard(ADDRESS, BTreeMap::new()))
        .await
        .expect("queue");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    let mut responses = grpc.delta_aggregated_resources(request).await?.into_inner();
    let response = responses.message().await?;
    drop(requests);
    response.ok_or_else(|| tonic::Status::cancelled("no response"))
}
