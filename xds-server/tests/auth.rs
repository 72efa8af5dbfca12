//! xDS beside the mesh CA on one TLS port: clients authenticated by mesh
//! certificate or bearer token, and the CA's impersonation checks answered by
//! the store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use mesh_api::Identity;
use mesh_ca::{Authenticated, Authority, CaClient, CaServer, ClientCertificate, StaticTokens};
use tokio::net::TcpListener;
use xds_server::{
    Authenticators, ControlPlaneHandle, MeshConfig, Store, StoreNodeAuthorizer, XdsServer,
};

fn identity(uri: &str) -> Identity {
    Identity::parse_uri(uri).expect("identity")
}

/// A control plane: CA and xDS on one TLS port, as `xds-serve --ca-dir` runs them.
struct ControlPlane {
    addr: std::net::SocketAddr,
    authority: Arc<Authority>,
    handle: Option<ControlPlaneHandle>,
    _dir: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.shutdown();
        }
    }
}

async fn control_plane(store: &Store) -> ControlPlane {
    let dir = tempfile::tempdir().expect("tempdir");
    let material = mesh_ca::load_or_create(
        dir.path(),
        "cluster.local",
        Duration::from_secs(86400 * 365),
    )
    .expect("CA files");
    let authority = Arc::new(
        Authority::new(
            &material,
            "cluster.local",
            mesh_ca::SigningPolicy::default(),
        )
        .expect("authority"),
    );
    let agent = identity("spiffe://cluster.local/ns/istio-system/sa/ztunnel");
    let tokens = StaticTokens::new()
        .token(
            "shell-token",
            identity("spiffe://cluster.local/ns/default/sa/shell"),
        )
        .caller(
            "agent-token",
            Authenticated {
                identity: agent.clone(),
                node: Some("node-a".into()),
                pod: None,
            },
        );
    let ca = CaServer::builder()
        .authority(authority.clone())
        .authenticator(tokens.clone())
        .authenticator(ClientCertificate::new(authority.clone()).expect("verifier"))
        .node_agent(agent)
        .node_authorizer(StoreNodeAuthorizer::new(store.clone()))
        .build()
        .expect("CA");
    let xds = XdsServer::builder()
        .store(store.clone())
        .authenticators(
            Authenticators::new()
                .with(tokens)
                .with(ClientCertificate::new(authority.clone()).expect("verifier")),
        )
        .build()
        .expect("xDS");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = xds_server::ControlPlane::builder()
        .xds(xds)
        .ca(ca)
        .build()
        .expect("control plane")
        .spawn(listener)
        .expect("spawn");
    ControlPlane {
        addr,
        authority,
        handle: Some(handle),
        _dir: dir,
    }
}

fn client(plane: &ControlPlane) -> mesh_ca::client::CaClientBuilder {
    CaClient::builder()
        .address(plane.addr)
        .server_name("istiod.istio-system.svc")
        .roots(plane.authority.roots().iter().cloned())
}

fn cluster() -> Store {
    let store = Store::new(MeshConfig::default());
    apply(
        &store,
        &pod("default", "echo", "10.0.0.1", &[("app", "echo")]),
    );
    apply(
        &store,
        &pod("default", "db", "10.0.0.2", &[("app", "db")])
            .replace("nodeName: node-a", "nodeName: node-b"),
    );
    store
}

#[tokio::test]
async fn the_ca_lets_a_node_agent_impersonate_only_workloads_on_its_node() {
    let store = cluster();
    let plane = control_plane(&store).await;
    let agent = client(&plane).token("agent-token").build().expect("client");

    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let issued = agent
        .certificate(&echo, true, None)
        .await
        .expect("echo runs on node-a");
    assert_eq!(issued.identity, echo);

    for (who, why) in [
        (
            "spiffe://cluster.local/ns/default/sa/db",
            "db runs on node-b",
        ),
        (
            "spiffe://cluster.local/ns/default/sa/ghost",
            "no such workload",
        ),
    ] {
        let err = agent
            .certificate(&identity(who), true, None)
            .await
            .expect_err(why);
        let message = err.to_string();
        assert!(
            matches!(&err, mesh_ca::ClientError::Status(status) if status.code() == tonic::Code::Unauthenticated),
            "{why}: {message}"
        );
        assert!(message.contains("node-a"), "{why}: {message}");
    }

    // The store follows the cluster: once db moves to node-a, it may.
    apply(&store, &pod("default", "db", "10.0.0.2", &[("app", "db")]));
    agent
        .certificate(
            &identity("spiffe://cluster.local/ns/default/sa/db"),
            true,
            None,
        )
        .await
        .expect("db now runs on node-a");
}

#[tokio::test]
async fn xds_clients_authenticate_with_a_mesh_certificate_or_a_token() {
    let store = cluster();
    let plane = control_plane(&store).await;

    // A workload gets its certificate with its token, then uses it for xDS.
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    let cert = client(&plane)
        .token("shell-token")
        .build()
        .expect("client")
        .certificate(&shell, false, None)
        .await
        .expect("certificate");
    let with_cert = client(&plane)
        .client_certificate(cert.chain.clone(), cert.private_key())
        .build()
        .expect("client");
    let response = first_response(with_cert.channel(), None)
        .await
        .expect("mesh certificate accepted");
    assert_eq!(response.resources.len(), 2);

    let anonymous = client(&plane).build().expect("client");
    let refused = first_response(anonymous.channel(), None)
        .await
        .expect_err("no credentials");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = first_response(anonymous.channel(), Some("wrong"))
        .await
        .expect_err("bad token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    first_response(anonymous.channel(), Some("shell-token"))
        .await
        .expect("token accepted");
}

#[tokio::test]
async fn the_control_plane_handle_joins_without_stopping_and_drains_open_streams() {
    let store = cluster();
    let plane = control_plane(&store).await;
    let handle = plane.handle.as_ref().expect("handle");
    handle.ready(Duration::from_secs(1)).await.expect("ready");
    let shell = client(&plane).token("shell-token").build().expect("client");
    // A stream that stays open: drain must end it.
    let mut grpc = mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(shell.channel());
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(wildcard(ADDRESS, std::collections::BTreeMap::new()))
        .await
        .expect("queue");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        "Bearer shell-token".parse().expect("header"),
    );
    let mut stream = grpc
        .delta_aggregated_resources(request)
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("first response");
    let drained = handle.drain(Duration::from_secs(10)).await;
    assert!(drained.is_complete(), "{drained}");
    assert!(
        handle.ready(Duration::from_secs(1)).await.is_err(),
        "stopped"
    );
    // The client's stream ended.
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(matches!(end, Ok(Err(_) | Ok(None))), "{end:?}");
    drop(requests);
}

#[tokio::test]
async fn join_waits_without_stopping_and_shutdown_is_idempotent() {
    let store = cluster();
    let mut plane = control_plane(&store).await;
    let handle = plane.handle.take().expect("handle");
    let stopper = handle.stopping();
    let join = tokio::spawn(handle.join());
    // Joined, and still serving.
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    client(&plane)
        .token("shell-token")
        .build()
        .expect("client")
        .certificate(&shell, false, None)
        .await
        .expect("served while joined");
    assert!(!join.is_finished(), "join does not stop the server");
    assert!(!stopper.is_cancelled());
    join.abort();
}

#[tokio::test]
async fn shutdown_is_idempotent_and_join_then_ends() {
    let store = cluster();
    let mut plane = control_plane(&store).await;
    let handle = plane.handle.take().expect("handle");
    handle.shutdown();
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), handle.join())
        .await
        .expect("joined")
        .expect("a shut down server ends Ok");
}

#[tokio::test]
async fn shutdown_closes_a_connection_whose_call_never_ends() {
    let store = cluster();
    let mut plane = control_plane(&store).await;
    let handle = plane.handle.take().expect("handle");
    // A CA call whose request body never ends: tonic alone would wait for it.
    let mut roots = rustls::RootCertStore::empty();
    for root in plane.authority.roots().iter() {
        roots.add(root.clone()).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(plane.addr)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (mut client, connection) = h2::client::handshake(tls).await.expect("HTTP/2");
    let connection = tokio::spawn(connection);
    let request = http::Request::post(
        "https://istiod.istio-system.svc/istio.v1.auth.IstioCertificateService/CreateCertificate",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", "Bearer shell-token")
    .body(())
    .expect("request");
    let (response, mut body) = client.send_request(request, false).expect("sent");
    // A message header announcing 100 bytes, then 3 of them.
    body.send_data(
        bytes::Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2, 3]),
        false,
    )
    .expect("data");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!connection.is_finished(), "the call is in progress");
    handle.shutdown();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(ended.is_ok(), "the connection was closed by the shutdown");
    drop(response);
    handle.join().await.expect("stopped");
}
