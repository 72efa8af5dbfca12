//! The delta ADS server against a real tonic client: wildcard sync, on-demand
//! lookups, NACK, reconnect with initial versions, removal, a stalled client,
//! malformed requests.

mod common;

use std::collections::BTreeMap;

use common::*;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::workload::{TunnelProtocol, WorkloadStatus, address};
use xds_server::{Kind, MeshConfig, ObjectKey, Store};

const ECHO_UID: &str = "Kubernetes//Pod/default/echo-1";

fn fixture() -> Store {
    let store = Store::new(MeshConfig::default());
    apply(
        &store,
        "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: echo
  ports:
  - name: http
    port: 80
    targetPort: http
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-allow-shell
  namespace: default
spec:
  selector:
    matchLabels:
      app: echo
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/default/sa/shell]
",
    );
    apply(
        &store,
        &pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    );
    apply(
        &store,
        &pod("default", "echo-2", "10.0.0.2", &[("app", "echo")]),
    );
    apply(
        &store,
        &pod("default", "shell", "10.0.0.3", &[("app", "shell")]),
    );
    store
}

/// 3 workloads + 1 service, 1 policy.
fn complete(view: &View) -> bool {
    view.addresses.len() == 4 && view.authorizations.len() == 1
}

async fn synced_client(addr: std::net::SocketAddr) -> (AdsClient, View) {
    let mut client = AdsClient::open(
        addr,
        vec![
            wildcard(ADDRESS, BTreeMap::new()),
            wildcard(AUTHORIZATION, BTreeMap::new()),
        ],
    )
    .await;
    let mut view = View::default();
    client.collect_until(&mut view, complete).await;
    (client, view)
}

#[tokio::test]
async fn wildcard_sync_sends_workloads_services_and_policies_as_istiod_builds_them() {
    let store = fixture();
    let server = serve(&store).await;
    let (_client, view) = synced_client(server.local_addr()).await;

    let echo = view.workload(ECHO_UID).expect("echo-1 workload");
    assert_eq!(echo.name, "echo-1");
    assert_eq!(echo.namespace, "default");
    assert_eq!(echo.addresses, vec![vec![10, 0, 0, 1]]);
    assert_eq!(echo.tunnel_protocol, TunnelProtocol::Hbone as i32);
    assert_eq!(echo.service_account, "echo-1");
    assert_eq!(echo.node, "node-a");
    assert_eq!(echo.status, WorkloadStatus::Healthy as i32);
    assert_eq!(echo.canonical_name, "echo");
    assert_eq!(echo.cluster_id, "Kubernetes");
    let ports = &echo.services["default/echo.default.svc.cluster.local"].ports;
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
    assert_eq!(
        echo.authorization_policies,
        vec!["default/echo-allow-shell"]
    );

    let shell = view
        .workload("Kubernetes//Pod/default/shell")
        .expect("shell");
    assert!(shell.services.is_empty());
    assert!(shell.authorization_policies.is_empty());

    let (_, service) = &view.addresses["default/echo.default.svc.cluster.local"];
    let Some(address::Type::Service(service)) = &service.r#type else {
        panic!("not a service");
    };
    assert_eq!(service.hostname, "echo.default.svc.cluster.local");
    assert_eq!(service.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(service.ports[0].target_port, 0, "named target port");

    let (_, policy) = &view.authorizations["default/echo-allow-shell"];
    assert_eq!(policy.name, "echo-allow-shell");
    assert_eq!(policy.rules.len(), 1);
}

#[tokio::test]
async fn changes_are_pushed_and_removals_announced() {
    let store = fixture();
    let server = serve(&store).await;
    let (mut client, mut view) = synced_client(server.local_addr()).await;

    // A label change moves echo-2 out of the service and the policy.
    apply(
        &store,
        &pod("default", "echo-2", "10.0.0.2", &[("app", "other")]),
    );
    let uid = "Kubernetes//Pod/default/echo-2";
    client
        .collect_until(&mut view, |v| {
            v.workload(uid).is_some_and(|w| w.services.is_empty())
        })
        .await;
    assert!(
        view.workload(uid)
            .expect("echo-2")
            .authorization_policies
            .is_empty()
    );

    // Deleting a pod removes its workload; deleting the policy detaches it.
    assert!(store.delete(&ObjectKey::new(Kind::Pod, "default", "echo-1")));
    client
        .collect_until(&mut view, |v| v.removed.iter().any(|n| n == ECHO_UID))
        .await;
    assert!(store.delete(&ObjectKey::new(
        Kind::AuthorizationPolicy,
        "default",
        "echo-allow-shell"
    )));
    client
        .collect_until(&mut view, |v| {
            v.removed.iter().any(|n| n == "default/echo-allow-shell")
        })
        .await;
    assert!(view.authorizations.is_empty());
}

#[tokio::test]
async fn on_demand_lookups_by_ip_hostname_and_uid_and_unknown_names_are_removed() {
    let store = fixture();
    let server = serve(&store).await;
    let mut client = AdsClient::open(
        server.local_addr(),
        vec![DeltaDiscoveryRequest {
            node: Some(node()),
            type_url: ADDRESS.into(),
            resource_names_subscribe: vec!["*".into()],
            resource_names_unsubscribe: vec!["*".into()],
            ..DeltaDiscoveryRequest::default()
        }],
    )
    .await;
    let mut view = View::default();
    let first = client.next().await;
    assert!(
        first.resources.is_empty() && first.removed_resources.is_empty(),
        "nothing subscribed yet: an empty first answer"
    );
    client.send(ack(ADDRESS, &first.nonce)).await;

    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS.into(),
            resource_names_subscribe: vec!["/10.0.0.1".into()],
            ..DeltaDiscoveryRequest::default()
        })
        .await;
    let response = client.next().await;
    view.apply(&response);
    assert_eq!(response.resources.len(), 1, "only what was asked for");
    assert_eq!(response.resources[0].name, ECHO_UID);
    assert_eq!(response.resources[0].aliases, vec!["/10.0.0.1"]);
    client.send(ack(ADDRESS, &response.nonce)).await;

    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS.into(),
            resource_names_subscribe: vec![
                "default/echo.default.svc.cluster.local".into(),
                "Kubernetes//Pod/default/shell".into(),
                "/10.9.9.9".into(),
            ],
            ..DeltaDiscoveryRequest::default()
        })
        .await;
    let response = client.next().await;
    let mut names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/default/shell",
            "default/echo.default.svc.cluster.local"
        ]
    );
    assert_eq!(response.removed_resources, vec!["/10.9.9.9"]);
    client.send(ack(ADDRESS, &response.nonce)).await;

    // A subscribed name that appears later is pushed.
    apply(&store, &pod("default", "late", "10.9.9.9", &[]));
    let response = client.next().await;
    assert_eq!(response.resources.len(), 1);
    assert_eq!(response.resources[0].name, "Kubernetes//Pod/default/late");
    assert!(
        !view
            .addresses
            .contains_key("Kubernetes//Pod/default/echo-2"),
        "on-demand clients get no unrequested workloads"
    );
}

#[tokio::test]
async fn a_nack_is_not_an_ack_and_the_stream_goes_on() {
    let store = fixture();
    let server = serve(&store).await;
    let mut client = AdsClient::open(
        server.local_addr(),
        vec![wildcard(AUTHORIZATION, BTreeMap::new())],
    )
    .await;
    let first = client.next().await;
    client
        .send(nack(AUTHORIZATION, &first.nonce, "cannot parse"))
        .await;

    apply(
        &store,
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: default
spec: {}
",
    );
    let next = client.next().await;
    assert_ne!(next.nonce, first.nonce);
    assert_eq!(next.resources[0].name, "default/deny-all");
    client.send(ack(AUTHORIZATION, &next.nonce)).await;
}

#[tokio::test]
async fn reconnecting_with_initial_versions_sends_only_what_changed() {
    let store = fixture();
    let server = serve(&store).await;
    let (client, view) = synced_client(server.local_addr()).await;
    drop(client);

    // While away: one workload changes, one goes, one comes.
    apply(
        &store,
        &pod("default", "shell", "10.0.0.3", &[("app", "shell-v2")]),
    );
    store.delete(&ObjectKey::new(Kind::Pod, "default", "echo-2"));
    apply(&store, &pod("default", "new", "10.0.0.4", &[]));

    let mut client = AdsClient::open(
        server.local_addr(),
        vec![
            wildcard(ADDRESS, view.versions(ADDRESS)),
            wildcard(AUTHORIZATION, view.versions(AUTHORIZATION)),
        ],
    )
    .await;
    let mut responses = [client.next().await, client.next().await];
    responses.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    let [policies, response] = responses;
    assert_eq!(policies.type_url, AUTHORIZATION);
    assert!(
        policies.resources.is_empty() && policies.removed_resources.is_empty(),
        "nothing changed for policies: an empty first answer"
    );
    assert_eq!(response.type_url, ADDRESS);
    let mut sent: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    sent.sort_unstable();
    assert_eq!(
        sent,
        [
            "Kubernetes//Pod/default/new",
            "Kubernetes//Pod/default/shell"
        ]
    );
    assert_eq!(
        response.removed_resources,
        vec!["Kubernetes//Pod/default/echo-2"]
    );
}

#[tokio::test]
async fn a_stalled_client_does_not_hold_back_others_and_catches_up_with_the_latest() {
    const UPDATES: usize = 5000;
    let store = fixture();
    let server = serve(&store).await;
    // A small window, so that the transport buffers little of what the server
    // sends the stalled client (the server's HTTP/2 send buffer still holds 400 KiB).
    let mut stalled = AdsClient::open_on(
        channel_with_window(server.local_addr(), Some(65_535)).await,
        vec![
            wildcard(ADDRESS, BTreeMap::new()),
            wildcard(AUTHORIZATION, BTreeMap::new()),
        ],
    )
    .await
    .expect("stream");
    let mut stalled_view = View::default();
    stalled.collect_until(&mut stalled_view, complete).await;
    let (mut live, mut live_view) = synced_client(server.local_addr()).await;
    let uid = "Kubernetes//Pod/default/shell";

    // `stalled` reads nothing while the live client follows every update.
    for generation in 0..UPDATES {
        let label = format!("g{generation}");
        apply(
            &store,
            &pod("default", "shell", "10.0.0.3", &[("app", &label)]),
        );
        let latest = latest_version(&store, uid);
        live.collect_until(&mut live_view, |v| {
            v.versions(ADDRESS).get(uid) == Some(&latest)
        })
        .await;
    }
    let latest = latest_version(&store, uid);
    assert_eq!(
        live_view.workload(uid).expect("shell").canonical_name,
        format!("g{}", UPDATES - 1)
    );

    // The stalled client now reads. Transport buffers hold some of what was
    // sent before it stalled; past them the server coalesced: it converges on
    // the latest version with far fewer responses than updates.
    let before = stalled_view.responses;
    stalled
        .collect_until(&mut stalled_view, |v| {
            v.versions(ADDRESS).get(uid) == Some(&latest)
        })
        .await;
    let received = stalled_view.responses - before;
    assert!(
        received < UPDATES / 2,
        "not coalesced: {received} responses for {UPDATES} updates"
    );
    assert_eq!(
        stalled_view.workload(uid).expect("shell").canonical_name,
        format!("g{}", UPDATES - 1)
    );
}

fn latest_version(store: &Store, name: &str) -> String {
    store
        .resource_version(mesh_api::ResourceType::Address, name)
        .expect("published")
}

#[tokio::test]
async fn unknown_type_urls_end_the_stream_with_invalid_argument() {
    let store = fixture();
    let server = serve(&store).await;
    let mut client = AdsClient::open(
        server.local_addr(),
        vec![wildcard(
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            BTreeMap::new(),
        )],
    )
    .await;
    let status = client.try_next().await.expect_err("an error");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("unknown type URL"),
        "{}",
        status.message()
    );
}

/// Sends raw bytes as request messages.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct ResponseDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = mesh_api::discovery::DeltaDiscoveryResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = mesh_api::discovery::DeltaDiscoveryResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, tonic::Status> {
        use mesh_api::prost::Message;
        Self::Item::decode(src)
            .map(Some)
            .map_err(|err| tonic::Status::internal(err.to_string()))
    }
}

async fn send_raw(
    addr: std::net::SocketAddr,
    messages: Vec<Vec<u8>>,
) -> Result<Vec<mesh_api::discovery::DeltaDiscoveryResponse>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(xds_server::ads::DELTA_PATH);
    let mut stream = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter(messages)),
            path,
            RawCodec,
        )
        .await?
        .into_inner();
    let mut responses = Vec::new();
    loop {
        match tokio::time::timeout(PATIENCE, stream.message()).await {
            Ok(Ok(Some(response))) => responses.push(response),
            Ok(Ok(None)) => return Ok(responses),
            Ok(Err(status)) => return Err(status),
            Err(_) => panic!("no answer within {PATIENCE:?}"),
        }
    }
}

#[tokio::test]
async fn malformed_requests_end_the_stream_with_invalid_argument_and_the_server_goes_on() {
    use mesh_api::prost::Message;
    let store = fixture();
    let server = serve(&store).await;
    let garbage = [
        vec![0xff, 0xff, 0xff, 0xff], // a truncated varint key
        vec![0x12, 0x05, b'a'],       // a length beyond the message
        vec![0x12, 0x02, 0xc3, 0x28], // type_url that is not UTF-8
    ];
    for bytes in garbage {
        let status = send_raw(server.local_addr(), vec![bytes.clone()])
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{bytes:?}: {status:?}"
        );
        assert!(
            status.message().contains("malformed DeltaDiscoveryRequest"),
            "{bytes:?}: {}",
            status.message()
        );
    }
    // A good request on the same server still works.
    let good = wildcard(AUTHORIZATION, BTreeMap::new()).encode_to_vec();
    let status = send_raw(server.local_addr(), vec![good, vec![0xff]])
        .await
        .expect_err("the second message is garbage");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let (_client, view) = synced_client(server.local_addr()).await;
    assert!(complete(&view));
}

#[tokio::test]
async fn other_methods_are_unimplemented() {
    let store = fixture();
    let server = serve(&store).await;
    let mut grpc = tonic::client::Grpc::new(channel(server.local_addr()).await);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let status = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter(vec![Vec::new()])),
            path,
            RawCodec,
        )
        .await
        .expect_err("not served");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}
