//! The xDS client against podless's own control plane (`xds-server`): initial
//! sync, updates and removals, the control plane going away (the state stays)
//! and coming back with changes (the client resyncs to them), and a client
//! whose credentials are refused saying so through its handle.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{Authenticated, StaticTokens};
use mesh_net::Drained;
use tokio::net::TcpListener;
use xds_server::{
    Authenticators, Kind, MeshConfig, ObjectKey, Store, XdsHandle, XdsServer, parse_manifest,
};
use ztunnel_core::SharedState;
use ztunnel_core::{XdsClient, XdsNotReady};

/// A ceiling so a broken client fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shell, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/shell]}}]}]
";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: echo}}}}
spec: {{serviceAccountName: echo, nodeName: node-a, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}
"
    )
}

fn apply(store: &Store, yaml: &str) {
    for object in parse_manifest(yaml).expect("YAML").objects {
        store.apply(object).expect("valid");
    }
}

async fn serve(store: &Store, listener: TcpListener) -> XdsHandle {
    serve_with(store, listener, Authenticators::anonymous())
}

fn serve_with(store: &Store, listener: TcpListener, auth: Authenticators) -> XdsHandle {
    XdsServer::builder()
        .store(store.clone())
        .authenticators(auth)
        .build()
        .expect("server")
        .spawn(listener)
        .expect("spawn")
}

/// The cluster with pods echo-1 and echo-2, served on loopback.
async fn two_echoes() -> (Store, SocketAddr, XdsHandle) {
    let store = Store::new(MeshConfig::default());
    apply(&store, CLUSTER);
    apply(&store, &pod("echo-1", "10.0.0.1"));
    apply(&store, &pod("echo-2", "10.0.0.2"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = serve(&store, listener).await;
    (store, addr, server)
}

fn client(addr: SocketAddr) -> XdsClient {
    client_with(addr, false)
}

/// A client of the server at `addr`, streaming everything or on demand.
fn client_with(addr: SocketAddr, on_demand: bool) -> XdsClient {
    builder(addr).on_demand(on_demand).build().expect("client")
}

fn builder(addr: SocketAddr) -> ztunnel_core::XdsClientBuilder {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    XdsClient::builder()
        .channel(channel)
        .node_id("ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local")
        .max_backoff(Duration::from_millis(200))
}

async fn eventually(
    what: &str,
    state: &SharedState,
    check: impl Fn(&ztunnel_core::ProxyState) -> bool,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if check(&state.read()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_state_follows_the_control_plane_and_outlives_it() {
    let (store, addr, server) = two_echoes().await;

    let client = client(addr);
    let state = client.state();
    let running = client.spawn();
    running.ready(PATIENCE).await.expect("synced");
    let sync = running.state();
    assert!(sync.synced && sync.connected, "{sync:?}");
    assert_eq!(sync.last_error, None);
    eventually("the initial state", &state, |s| s.counts() == (2, 1, 1)).await;
    {
        let state = state.read();
        let echo = state
            .workload_by_ip("", "10.0.0.1".parse().expect("ip"))
            .expect("by IP");
        assert_eq!(echo.uid, "Kubernetes//Pod/default/echo-1");
        assert_eq!(echo.authorization_policies, vec!["default/allow-shell"]);
        let service = state
            .service_by_vip("", "10.96.0.10".parse().expect("ip"))
            .expect("by VIP");
        assert_eq!(service.hostname, "echo.default.svc.cluster.local");
        assert!(state.policies().contains("default/allow-shell"));
    }

    // Updates and removals.
    apply(&store, &pod("echo-3", "10.0.0.3"));
    store.delete(&ObjectKey::new(Kind::Pod, "default", "echo-1"));
    eventually("echo-3 in, echo-1 out", &state, |s| {
        s.workload("Kubernetes//Pod/default/echo-3").is_some()
            && s.workload("Kubernetes//Pod/default/echo-1").is_none()
            && s.workload_by_ip("", "10.0.0.1".parse().expect("ip"))
                .is_none()
    })
    .await;

    // The control plane goes away: the state stays as it was.
    let _ = server.drain(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state.read().counts(), (2, 1, 1), "last known good");
    running
        .ready(Duration::ZERO)
        .await
        .expect("still ready: synced once, the last known state is served");

    // It comes back, on the same address, with changes made meanwhile: the
    // client reconnects and catches up, removals included.
    store.delete(&ObjectKey::new(Kind::Pod, "default", "echo-2"));
    store.delete(&ObjectKey::new(
        Kind::AuthorizationPolicy,
        "default",
        "allow-shell",
    ));
    apply(&store, &pod("echo-4", "10.0.0.4"));
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let _server = serve(&store, listener).await;
    eventually("the client resyncs", &state, |s| {
        s.workload("Kubernetes//Pod/default/echo-2").is_none()
            && s.workload("Kubernetes//Pod/default/echo-4").is_some()
            && !s.policies().contains("default/allow-shell")
    })
    .await;
    assert_eq!(state.read().counts(), (2, 1, 0));

    assert_eq!(running.drain(PATIENCE).await, Drained::Complete);
    assert_eq!(
        running.ready(PATIENCE).await,
        Err(XdsNotReady::Stopped),
        "a drained client is not ready"
    );
    assert!(!running.state().connected);
    running.join().await.expect("join");
}

/// A control plane that knows one bearer token, `agent-token`.
fn token_auth() -> Authenticators {
    let agent =
        Identity::parse_uri("spiffe://cluster.local/ns/istio-system/sa/ztunnel").expect("identity");
    Authenticators::new().with(StaticTokens::new().caller(
        "agent-token",
        Authenticated {
            identity: agent,
            node: Some("node-a".into()),
            pod: None,
        },
    ))
}

#[tokio::test]
async fn a_refused_token_is_reported_by_ready_and_the_right_one_syncs() {
    let store = Store::new(MeshConfig::default());
    apply(&store, CLUSTER);
    apply(&store, &pod("echo-1", "10.0.0.1"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _server = serve_with(&store, listener, token_auth());

    // A wrong token: refused on every attempt, and the handle says so.
    let refused = builder(addr)
        .token("wrong-token")
        .build()
        .expect("client")
        .spawn();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while refused.last_error().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no stream ever failed: {:?}",
            refused.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = refused
        .ready(Duration::from_millis(100))
        .await
        .expect_err("never synced");
    let XdsNotReady::Unauthenticated(message) = &why else {
        panic!("not Unauthenticated: {why:?}");
    };
    assert!(message.contains("refused"), "names the refusal: {message}");
    assert!(why.to_string().contains("refused the credentials"), "{why}");
    let sync = refused.state();
    assert!(!sync.synced && !sync.connected, "{sync:?}");
    assert_eq!(
        sync.last_error.map(|error| error.code),
        Some(tonic::Code::Unauthenticated)
    );
    refused.shutdown();
    refused.join().await.expect("join");

    // The right token: synced.
    let accepted = builder(addr).token("agent-token").build().expect("client");
    let state = accepted.state();
    let accepted = accepted.spawn();
    accepted.ready(PATIENCE).await.expect("synced");
    assert!(accepted.state().synced);
    assert_eq!(accepted.last_error(), None);
    eventually("the state", &state, |s| s.counts() == (1, 1, 1)).await;
    accepted.shutdown();
    accepted.shutdown();
    accepted.join().await.expect("join");
}

#[tokio::test]
async fn on_demand_clients_learn_only_what_they_ask_for() {
    let (store, addr, _server) = two_echoes().await;
    let client = client_with(addr, true);
    let state = client.state();
    let demander = client.demander().expect("on demand");
    let client = client.spawn();
    client.ready(PATIENCE).await.expect("synced");
    assert_eq!(
        state.read().counts(),
        (0, 0, 1),
        "no addresses until asked; policies are streamed"
    );

    assert!(demander.demand("/10.0.0.1", PATIENCE).await, "answered");
    assert!(
        state
            .read()
            .workload_by_ip("", "10.0.0.1".parse().expect("ip"))
            .is_some()
    );
    assert_eq!(state.read().counts().0, 1, "only what was asked for");
    assert!(demander.demand("/10.96.0.10", PATIENCE).await, "a VIP");
    assert!(
        state
            .read()
            .service_by_vip("", "10.96.0.10".parse().expect("ip"))
            .is_some()
    );
    // An unknown name is answered too, and adds nothing.
    assert!(demander.demand("/10.9.9.9", PATIENCE).await);
    assert_eq!(state.read().counts().0, 1);

    // What was asked for keeps being pushed.
    store.delete(&ObjectKey::new(Kind::Pod, "default", "echo-1"));
    eventually("echo-1 removed", &state, |s| {
        s.workload_by_ip("", "10.0.0.1".parse().expect("ip"))
            .is_none()
    })
    .await;
    client.shutdown();
    client.join().await.expect("join");
}
