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
use tokio_util::sync::CancellationToken;
use xds_server::{ClientAuth, MeshConfig, Store, StoreNodeAuthorizer, XdsServer};

fn identity(uri: &str) -> Identity {
    Identity::parse_uri(uri).expect("identity")
}

/// A control plane: CA and xDS on one TLS port, as `xds-serve --ca-dir` runs them.
struct ControlPlane {
    addr: std::net::SocketAddr,
    authority: Arc<Authority>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
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
        .client_auth(
            ClientAuth::new()
                .with(tokens)
                .with(ClientCertificate::new(authority.clone()).expect("verifier")),
        )
        .build()
        .expect("xDS");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = ca.tls_config();
    let router = tonic::transport::Server::builder()
        .add_service(ca.into_service())
        .add_service(xds.into_service());
    let shutdown = CancellationToken::new();
    tokio::spawn(mesh_ca::transport::serve_router(
        router,
        listener,
        Some(tls),
        mesh_net::HandshakeLimits::default(),
        shutdown.clone(),
    ));
    ControlPlane {
        addr,
        authority,
        shutdown,
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
