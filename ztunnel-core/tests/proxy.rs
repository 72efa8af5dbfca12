//! Proxy instances on loopback, in one process: a client workload's instance
//! (reached over SOCKS5, since nothing redirects here) carries connections over
//! HBONE to a server workload's instance, which admits them by policy and
//! hands them to the application. Certificates are signed in memory (a
//! `StaticCertificates` source, no CA server), except in the test that runs
//! the same traffic with a real `mesh-ca` over TLS. Workload IPs are loopback
//! addresses (127.0.0.x) so each instance binds its own.
//!
//! The same paths run with redirect rules in network namespaces in
//! `tests/netns.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_api::names::ip_to_wire;
use mesh_api::workload::address::Type;
use mesh_api::workload::{
    Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus,
};
use mesh_net::{Drained, HandshakeLimits};
use prometheus_client::registry::Registry;
use test_support::{Captured, Ended, connect_from, ended, still_open};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel_core::hbone::{HboneError, HbonePool, PoolKey};
use ztunnel_core::tls::WorkloadTls;
use ztunnel_core::{CertManager, Listeners, SharedState, Ztunnel, ZtunnelHandle};

mod support;

use support::mesh::{Ca, ca, echo_app, identity, in_memory_ca, put, round_trip};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";

fn workload(namespace: &str, name: &str, account: &str, ip: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{namespace}/{name}"),
        name: name.into(),
        namespace: namespace.into(),
        addresses: vec![ip_to_wire(ip.parse().expect("ip"))],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: account.into(),
        node: "node-a".into(),
        status: WorkloadStatus::Healthy as i32,
        ..Workload::default()
    }
}

/// The echo workload, an endpoint of the echo service on `app_port`.
fn echo_workload(app_port: u16, policies: &[&str]) -> Workload {
    let mut echo = workload("default", "echo", "echo", "127.0.0.2");
    echo.services.insert(
        "default/echo.default.svc.cluster.local".into(),
        PortList {
            ports: vec![Port {
                service_port: 80,
                target_port: u32::from(app_port),
                app_protocol: 0,
            }],
        },
    );
    echo.authorization_policies = policies.iter().map(|p| (*p).to_owned()).collect();
    echo
}

fn echo_service(state: &SharedState, target_port: u16) {
    let service = Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: ip_to_wire(VIP.parse().expect("ip")),
            length: None,
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: u32::from(target_port),
            app_protocol: 0,
        }],
        ..Service::default()
    };
    state
        .update(|s| {
            s.apply_address(
                "default/echo.default.svc.cluster.local",
                Address {
                    r#type: Some(Type::Service(service)),
                },
            )
        })
        .expect("service");
}

/// Allows only `principal` to reach the echo workload.
fn allow_only(state: &SharedState, app_port: u16, principal: &str) {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-shell\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: echo\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
    );
    let policy = authz::parse_policies(&yaml, "default")
        .expect("policy")
        .remove(0);
    let authorization = authz::convert(&policy, "istio-system", "default")
        .authorization
        .expect("wire policy");
    state.update(|s| {
        s.apply_authorization("default/allow-shell", &authorization)
            .expect("applied");
    });
    put(state, echo_workload(app_port, &["default/allow-shell"]));
}

async fn instance(
    state: &SharedState,
    certs: &CertManager,
    uid: &str,
    hbone: TcpListener,
    registry: Option<&mut Registry>,
    limits: HandshakeLimits,
) -> ZtunnelHandle {
    let address = hbone.local_addr().expect("hbone address");
    let (ip, hbone_port) = (address.ip(), address.port());
    let bind =
        |port: u16| async move { TcpListener::bind((ip, port)).await.expect("bind listener") };
    let mut builder = Ztunnel::builder()
        .state(state.clone())
        .certificates(certs.clone())
        .workload_uid(uid)
        .hbone_port(hbone_port)
        .handshake_limits(limits);
    if let Some(registry) = registry {
        builder = builder.metrics(registry);
    }
    let handle = builder
        .build()
        .expect("built")
        .spawn(Listeners {
            outbound: bind(0).await,
            inbound_plaintext: bind(0).await,
            hbone,
            socks5: Some(bind(0).await),
        })
        .expect("spawned");
    handle.ready(WAIT).await.expect("ready");
    handle
}

/// Asks `proxy`'s SOCKS5 listener for `target`: its reply code (0 for
/// success), and the connection.
async fn socks5_reply(
    proxy: &ZtunnelHandle,
    target: SocketAddr,
) -> std::io::Result<(u8, TcpStream)> {
    socks5_reply_at(proxy.socks5_addr().expect("socks5"), target).await
}

/// [`socks5_reply`] from the SOCKS5 listener at `socks5`.
async fn socks5_reply_at(
    socks5: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<(u8, TcpStream)> {
    test_support::socks5(socks5, target).await
}

/// Connects through `proxy`'s SOCKS5 listener to `target`.
async fn socks5(proxy: &ZtunnelHandle, target: SocketAddr) -> std::io::Result<TcpStream> {
    let (reply, stream) = socks5_reply(proxy, target).await?;
    assert_eq!(reply, 0, "SOCKS5 success");
    Ok(stream)
}

struct Mesh {
    /// The echo instance's metrics.
    registry: Arc<Registry>,
    /// The `default/shell` instance's metrics.
    shell_registry: Registry,
    state: SharedState,
    ca: Ca,
    app: SocketAddr,
    echo: ZtunnelHandle,
    shell: ZtunnelHandle,
    other: ZtunnelHandle,
    hbone_port: u16,
}

/// HBONE listeners on one port for the three workloads (127.0.0.2, .3, .4),
/// bound together: a port free on one address may be taken on another.
async fn hbone_listeners() -> [TcpListener; 3] {
    for _ in 0..20 {
        let echo = TcpListener::bind("127.0.0.2:0").await.expect("bind");
        let port = echo.local_addr().expect("addr").port();
        if let (Ok(shell), Ok(other)) = (
            TcpListener::bind(("127.0.0.3", port)).await,
            TcpListener::bind(("127.0.0.4", port)).await,
        ) {
            return [echo, shell, other];
        }
    }
    panic!("no port free on all three workload addresses");
}

/// Where the mesh's certificates come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Certificates {
    /// Signed in memory: no CA server.
    InMemory,
    /// A `mesh-ca` served over TLS on loopback.
    CaServer,
}

/// The identities of the mesh's three workloads.
const IDENTITIES: [&str; 3] = [
    "spiffe://cluster.local/ns/default/sa/echo",
    "spiffe://cluster.local/ns/default/sa/shell",
    "spiffe://cluster.local/ns/other/sa/shell",
];

async fn mesh() -> Mesh {
    mesh_with(HandshakeLimits::default(), Certificates::InMemory).await
}

async fn mesh_with(limits: HandshakeLimits, certificates: Certificates) -> Mesh {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let ca = match certificates {
        Certificates::InMemory => in_memory_ca(&IDENTITIES),
        Certificates::CaServer => ca(&IDENTITIES).await,
    };
    let state = SharedState::default();
    let app = echo_app("127.0.0.2").await;
    put(&state, echo_workload(app.port(), &[]));
    put(&state, workload("default", "shell", "shell", "127.0.0.3"));
    put(&state, workload("other", "shell", "shell", "127.0.0.4"));
    echo_service(&state, app.port());
    // One HBONE port for every instance, each on its own IP.
    let [echo_hbone, shell_hbone, other_hbone] = hbone_listeners().await;
    let hbone_port = echo_hbone.local_addr().expect("addr").port();
    let mut registry = Registry::default();
    let echo = instance(
        &state,
        &ca.certs,
        "Kubernetes//Pod/default/echo",
        echo_hbone,
        Some(&mut registry),
        limits,
    )
    .await;
    let mut shell_registry = Registry::default();
    let shell = instance(
        &state,
        &ca.certs,
        "Kubernetes//Pod/default/shell",
        shell_hbone,
        Some(&mut shell_registry),
        limits,
    )
    .await;
    let other = instance(
        &state,
        &ca.certs,
        "Kubernetes//Pod/other/shell",
        other_hbone,
        None,
        limits,
    )
    .await;
    Mesh {
        registry: Arc::new(registry),
        shell_registry,
        state,
        ca,
        app,
        echo,
        shell,
        other,
        hbone_port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_to_a_pod_ip_and_a_vip_arrives_intact_with_half_close() {
    // Certificates from a CA over TLS here, as in a cluster; the other tests
    // sign theirs in memory.
    let mesh = mesh_with(HandshakeLimits::default(), Certificates::CaServer).await;
    let to_pod = socks5(&mesh.shell, mesh.app).await.expect("connect");
    assert!(
        round_trip(to_pod, 4 << 20).await.expect("round trip"),
        "4 MiB through HBONE to the pod IP, echoed back intact"
    );
    let vip: SocketAddr = format!("{VIP}:80").parse().expect("vip");
    let to_vip = socks5(&mesh.shell, vip).await.expect("connect");
    assert!(
        round_trip(to_vip, 64 << 10).await.expect("round trip"),
        "through the service VIP"
    );
    assert_eq!(
        mesh.shell.pooled_connections(),
        1,
        "both streams shared one pooled connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_policy_admits_one_principal_and_resets_another() {
    let mesh = mesh().await;
    // Before the policy: both may connect; the other shell keeps a connection open.
    let mut lingering = socks5(&mesh.other, mesh.app).await.expect("connect");
    lingering.write_all(b"ping").await.expect("write");
    let mut pong = [0u8; 4];
    lingering.read_exact(&mut pong).await.expect("echoed");
    assert_eq!(mesh.echo.live_inbound(), 1);

    allow_only(
        &mesh.state,
        mesh.app.port(),
        "cluster.local/ns/default/sa/shell",
    );

    // The open connection is now denied: it is closed.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, lingering.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        matches!(&closed, Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset),
        "the denied connection is reset, not ended as if complete: {closed:?}"
    );

    let allowed = socks5(&mesh.shell, mesh.app).await.expect("connect");
    assert!(round_trip(allowed, 1024).await.expect("round trip"));

    // Refused by the server's policy before any byte moved: SOCKS5 answers
    // a failure (a redirected connection is reset; see tests/netns.rs).
    let (reply, _) = socks5_reply(&mesh.other, mesh.app).await.expect("socks5");
    assert_eq!(reply, 1, "denied: general failure");
}

/// An HBONE client as `default/shell`, for the echo instance's server.
struct ShellClient {
    pool: HbonePool,
    tls: WorkloadTls,
    key: PoolKey,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

async fn shell_client(mesh: &Mesh, shutdown: &CancellationToken) -> ShellClient {
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    let cert = mesh.ca.certs.certificate(&shell, WAIT).await.expect("cert");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = WorkloadTls::new(cert, &provider).expect("tls");
    ShellClient {
        pool: HbonePool::new(None, shutdown),
        tls,
        key: PoolKey {
            source: shell,
            expected: vec![identity("spiffe://cluster.local/ns/default/sa/echo")],
            address: SocketAddr::new("127.0.0.2".parse().expect("ip"), mesh.hbone_port),
            source_ip: None,
        },
        provider,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_answer_arrive_first_and_a_refusal_still_refuses() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    let client = shell_client(&mesh, &shutdown).await;
    let (pool, tls, key) = (&client.pool, &client.tls, &client.key);

    // Sent with the request, before the server has connected the
    // application: they reach it first, then what follows the answer.
    let mut pending = pool
        .request(tls, key, mesh.app, &[])
        .await
        .expect("request");
    pending
        .send_early(bytes::Bytes::from_static(b"early "))
        .expect("early bytes");
    let mut stream = pending.established().await.expect("answered 200");
    stream
        .send
        .send_data(bytes::Bytes::from_static(b"and late"), true)
        .expect("later bytes");
    let mut echoed = Vec::new();
    while let Some(data) = stream.recv.data().await {
        let data = data.expect("echo");
        stream
            .recv
            .flow_control()
            .release_capacity(data.len())
            .expect("release");
        echoed.extend_from_slice(&data);
    }
    assert_eq!(
        echoed, b"early and late",
        "echoed in order, after half-close"
    );

    // Early bytes change nothing about the answer to a bad target.
    let unserved: SocketAddr = "127.0.0.9:80".parse().expect("addr");
    let mut pending = pool
        .request(tls, key, unserved, &[])
        .await
        .expect("request");
    // The server may have refused (and closed the stream) before these are
    // sent: then sending them fails, which is as good as ignoring them.
    let _ = pending.send_early(bytes::Bytes::from_static(b"ignored"));
    assert!(
        matches!(
            pending.established().await,
            Err(HboneError::Refused { status, .. }) if status == http::StatusCode::BAD_REQUEST
        ),
        "a target not served here is still refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hbone_server_answers_bad_requests_and_refuses_foreign_certificates() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    let ShellClient {
        pool,
        tls,
        key,
        provider,
    } = shell_client(&mesh, &shutdown).await;
    let shell = key.source.clone();
    let status = |result: Result<_, HboneError>| match result {
        Err(HboneError::Refused { status, .. }) => status.as_u16(),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => 200,
    };
    let to = |address: &str| address.parse::<SocketAddr>().expect("addr");
    // A target this instance does not serve.
    assert_eq!(
        status(pool.connect(&tls, &key, to("127.0.0.9:80"), &[]).await),
        400
    );
    // The application's port is closed.
    let closed_port = {
        let probe = TcpListener::bind("127.0.0.2:0").await.expect("probe");
        probe.local_addr().expect("addr")
    };
    assert_eq!(
        status(pool.connect(&tls, &key, closed_port, &[]).await),
        503
    );
    assert_eq!(status(pool.connect(&tls, &key, mesh.app, &[]).await), 200);

    // The server must be who we expect.
    let wrong = PoolKey {
        expected: vec![identity("spiffe://cluster.local/ns/default/sa/billing")],
        ..key.clone()
    };
    assert!(matches!(
        pool.connect(&tls, &wrong, mesh.app, &[]).await,
        Err(HboneError::Peer { .. })
    ));

    // A certificate from another root is refused in the handshake.
    let foreign = in_memory_ca(&["spiffe://cluster.local/ns/default/sa/shell"]);
    assert_ne!(foreign.authority.roots(), mesh.ca.authority.roots());
    let foreign_cert = foreign
        .certs
        .certificate(&shell, WAIT)
        .await
        .expect("foreign cert");
    let foreign_tls = WorkloadTls::new(foreign_cert, &provider).expect("tls");
    let foreign_pool = HbonePool::new(None, &shutdown);
    let refused = foreign_pool
        .connect(&foreign_tls, &key, mesh.app, &[])
        .await;
    assert!(
        matches!(
            refused,
            Err(HboneError::Handshake { .. } | HboneError::Http2 { .. })
        ),
        "refused: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hbone_server_answers_with_its_workloads_baggage() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    let ShellClient { pool, tls, key, .. } = shell_client(&mesh, &shutdown).await;
    let (_stream, headers) = pool
        .request(&tls, &key, mesh.app, &[])
        .await
        .expect("request")
        .established_with_headers()
        .await
        .expect("established");
    let baggage = headers.get("baggage").expect("a baggage header");
    assert_eq!(
        baggage.to_str().expect("text"),
        "k8s.namespace.name=default,k8s.deployment.name=echo"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_connections_finish() {
    let mesh = mesh().await;
    let mut open = socks5(&mesh.shell, mesh.app).await.expect("connect");
    open.write_all(b"hello").await.expect("write");
    let mut echoed = [0u8; 5];
    open.read_exact(&mut echoed).await.expect("echoed");
    let Mesh { shell, echo, .. } = mesh;
    let drained = tokio::spawn(async move { (shell.drain(WAIT).await, shell) });
    // Still carried while draining.
    open.write_all(b"again")
        .await
        .expect("write while draining");
    open.read_exact(&mut echoed)
        .await
        .expect("echoed while draining");
    assert_eq!(&echoed, b"again");
    open.shutdown().await.expect("close");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.expect("closed cleanly");
    let (drained, shell) = drained.await.expect("drain task");
    assert_eq!(
        drained,
        Drained::Complete,
        "every connection finished on its own"
    );
    shell.join().await.expect("stopped cleanly");
    echo.shutdown();
    echo.join().await.expect("stopped cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_what_is_left_at_its_deadline_and_counts_it() {
    let mesh = mesh().await;
    let mut open = socks5(&mesh.shell, mesh.app).await.expect("connect");
    open.write_all(b"hello").await.expect("write");
    let mut echoed = [0u8; 5];
    open.read_exact(&mut echoed).await.expect("echoed");
    // The connection stays open past the deadline: closed, and counted.
    assert_eq!(
        mesh.shell.drain(Duration::from_millis(200)).await,
        Drained::TimedOut { left: 1 }
    );
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, open.read_to_end(&mut rest))
        .await
        .expect("the connection was closed");
    assert!(
        ended.is_err() || rest.is_empty(),
        "closed: {ended:?}, {rest:?}"
    );
    assert!(
        TcpStream::connect(mesh.shell.socks5_addr().expect("socks5"))
            .await
            .is_err(),
        "no listener left"
    );
    let shell = mesh.shell;
    shell.join().await.expect("stopped cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_at_once_and_join_waits_without_stopping() {
    let mesh = mesh().await;
    let echo_hbone = mesh.echo.local_addr();
    assert_eq!(echo_hbone, mesh.echo.hbone_addr(), "served on HBONE");
    assert_eq!(echo_hbone.port(), mesh.hbone_port);

    // Joining does not stop an instance: it still carries traffic.
    let shell_socks5 = mesh.shell.socks5_addr().expect("socks5");
    let shell = mesh.shell;
    let joined = tokio::spawn(shell.join());
    let (reply, through) = socks5_reply_at(shell_socks5, mesh.app)
        .await
        .expect("connect");
    assert_eq!(reply, 0, "SOCKS5 success");
    assert!(round_trip(through, 1000).await.expect("round trip"));
    assert!(!joined.is_finished(), "still running while joined");

    // Shutdown returns at once, however often called; join then returns.
    let mut open = socks5(&mesh.other, mesh.app).await.expect("connect");
    mesh.other.shutdown();
    mesh.other.shutdown();
    let other = mesh.other;
    tokio::time::timeout(WAIT, other.join())
        .await
        .expect("joined after shutdown")
        .expect("stopped cleanly");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, open.read_to_end(&mut rest))
        .await
        .expect("closed by the shutdown");
    assert_eq!(
        mesh.echo.drain(WAIT).await,
        Drained::Complete,
        "nothing open on echo's side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_dropped_once_no_running_instance_serves_its_identity() {
    let mesh = mesh().await;
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    let other = identity("spiffe://cluster.local/ns/other/sa/shell");
    let sorted = |mut identities: Vec<Identity>| {
        identities.sort();
        identities
    };
    // A second pod of default/shell's service account.
    put(
        &mesh.state,
        workload("default", "shell-2", "shell", "127.0.0.5"),
    );
    let shell_2 = instance(
        &mesh.state,
        &mesh.ca.certs,
        "Kubernetes//Pod/default/shell-2",
        TcpListener::bind("127.0.0.5:0").await.expect("bind"),
        None,
        HandshakeLimits::default(),
    )
    .await;
    assert_eq!(
        mesh.ca.certs.identities(),
        sorted(vec![echo.clone(), shell.clone(), other.clone()])
    );

    // One of the two shell pods leaves: the other still uses the identity.
    let first_shell = mesh.shell;
    first_shell.shutdown();
    first_shell.join().await.expect("stopped");
    assert_eq!(
        mesh.ca.certs.identities(),
        sorted(vec![echo.clone(), shell.clone(), other.clone()]),
        "shell-2 still serves default/shell"
    );

    // The last one leaves: its certificate goes; the others' stay.
    assert_eq!(shell_2.drain(WAIT).await, Drained::Complete);
    shell_2.join().await.expect("stopped");
    assert_eq!(
        mesh.ca.certs.identities(),
        sorted(vec![echo.clone(), other.clone()]),
        "no running instance serves default/shell"
    );

    // The ones still running keep working.
    let through = socks5(&mesh.other, mesh.app).await.expect("connect");
    assert!(round_trip(through, 1000).await.expect("round trip"));
}

/// An HTTP/1.1 GET against `address`: (status, body).
async fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_ports_serve_only_their_endpoints() {
    let mesh = mesh().await;
    let stop = CancellationToken::new();
    let serve = |paths: &'static [&'static str]| {
        let admin = mesh
            .echo
            .admin(Some(mesh.registry.clone()))
            .restricted_to(paths);
        let stop = stop.clone();
        async move {
            let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
            let address = listener.local_addr().expect("addr");
            tokio::spawn(admin.serve(listener, stop));
            address
        }
    };
    let metrics = serve(&["/metrics", "/stats/prometheus"]).await;
    let readiness = serve(&["/healthz/ready"]).await;
    assert_eq!(get(metrics, "/metrics").await.0, 200);
    assert_eq!(get(metrics, "/stats/prometheus").await.0, 200);
    assert_eq!(
        get(metrics, "/config_dump").await.0,
        404,
        "no config on the metrics port"
    );
    assert_eq!(get(metrics, "/healthz/ready").await.0, 404);
    assert_eq!(get(readiness, "/healthz/ready").await.0, 200);
    assert_eq!(get(readiness, "/config_dump").await.0, 404);
    assert_eq!(get(readiness, "/metrics").await.0, 404);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_reports_readiness_config_and_istio_metrics() {
    let mesh = mesh().await;
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind admin");
    let address = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(
        mesh.echo
            .admin(Some(mesh.registry.clone()))
            .serve(listener, stop.clone()),
    );
    let to_pod = socks5(&mesh.shell, mesh.app).await.expect("connect");
    assert!(round_trip(to_pod, 1000).await.expect("round trip"));

    assert_eq!(get(address, "/healthz/ready").await.0, 200);
    let (status, index) = get(address, "/").await;
    assert_eq!(status, 200);
    for path in ["/config_dump", "/healthz/ready", "/metrics"] {
        assert!(index.contains(path), "{index}");
    }
    let (status, dump) = get(address, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    assert_eq!(dump["served_workload"], "Kubernetes//Pod/default/echo");
    assert_eq!(dump["workloads"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        dump["serving_certificate"]["identity"],
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    assert_eq!(
        dump["services"][0]["hostname"],
        "echo.default.svc.cluster.local"
    );

    // The connection is counted once it has ended.
    let mut metrics = String::new();
    for _ in 0..100 {
        let (status, body) = get(address, "/metrics").await;
        assert_eq!(status, 200);
        metrics = body;
        if metrics.contains("istio_tcp_connections_closed_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for expected in [
        "istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"shell\",source_workload_namespace=\"default\",source_principal=\"spiffe://cluster.local/ns/default/sa/shell\",destination_workload=\"echo\"",
        "connection_security_policy=\"mutual_tls\"} 1",
        "istio_tcp_sent_bytes_total{",
    ] {
        assert!(metrics.contains(expected), "{expected} in\n{metrics}");
    }
    assert_eq!(get(address, "/nothing").await.0, 404);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_every_size_arrive_intact_in_order() {
    let mesh = mesh().await;
    let mut stream = socks5(&mesh.shell, mesh.app).await.expect("connect");
    // Each message is echoed in full before the next is sent, so the proxies
    // read them one by one: small reads, reads that fill and grow the
    // buffer, short reads at full size, and small ones again.
    let sizes = [
        1,
        100,
        16_375,
        16_376,
        70_000,
        5,
        300_000,
        20_000,
        3,
        1 << 20,
        7,
    ];
    for (round, size) in sizes.into_iter().enumerate() {
        let message: Vec<u8> = (0..size).map(|i| ((i + round) % 251) as u8).collect();
        stream.write_all(&message).await.expect("send");
        let mut echoed = vec![0u8; size];
        // Bounded: a lost byte would otherwise wait forever.
        tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("message {round} ({size} bytes) was not echoed in full"))
            .expect("echo");
        assert!(
            echoed == message,
            "message {round} ({size} bytes) came back intact"
        );
    }
    stream.shutdown().await.expect("close");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("end");
    assert!(rest.is_empty());
}

/// The value of the first sample of `metric` whose labels include `labels`.
fn sample(registry: &Registry, metric: &str, labels: &str) -> Option<u64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text.lines()
        .find(|line| line.starts_with(&format!("{metric}{{")) && line.contains(labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_follow_istio_directions_at_both_ends() {
    let mesh = mesh().await;
    // An application on the echo workload's IP that answers a 100-byte
    // request with 5,000 bytes.
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let app = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.expect("request");
        stream.write_all(&vec![1u8; 5000]).await.expect("response");
        stream.shutdown().await.expect("shutdown");
    });
    let mut stream = socks5(&mesh.shell, app).await.expect("connect");
    stream.write_all(&[2u8; 100]).await.expect("request");
    stream.shutdown().await.expect("close the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("response");
    assert_eq!(response.len(), 5000);

    // Counted once each proxy has seen the connection end.
    let closed = |registry: &Registry, reporter: &str| {
        sample(
            registry,
            "istio_tcp_connections_closed_total",
            &format!("reporter=\"{reporter}\""),
        )
    };
    for _ in 0..100 {
        if closed(&mesh.shell_registry, "source") == Some(1)
            && closed(&mesh.registry, "destination") == Some(1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (registry, reporter) in [
        (&mesh.shell_registry, "source"),
        (&*mesh.registry, "destination"),
    ] {
        let labels = format!("reporter=\"{reporter}\"");
        assert_eq!(closed(registry, reporter), Some(1), "{reporter}");
        assert_eq!(
            sample(registry, "istio_tcp_received_bytes_total", &labels),
            Some(100),
            "{reporter}: the request's bytes are received"
        );
        assert_eq!(
            sample(registry, "istio_tcp_sent_bytes_total", &labels),
            Some(5000),
            "{reporter}: the response's bytes are sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_opens_another_connection_past_100_streams_and_closes_idle_ones() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    // Pinged every second (a pong may take as long), closed after two
    // seconds without streams.
    let pool = HbonePool::with_keep_alive(
        None,
        &shutdown,
        Duration::from_secs(1),
        Duration::from_secs(2),
    );
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    let cert = mesh.ca.certs.certificate(&shell, WAIT).await.expect("cert");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = WorkloadTls::new(cert, &provider).expect("tls");
    let key = PoolKey {
        source: shell,
        expected: vec![identity("spiffe://cluster.local/ns/default/sa/echo")],
        address: SocketAddr::new("127.0.0.2".parse().expect("ip"), mesh.hbone_port),
        source_ip: None,
    };
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(
            pool.connect(&tls, &key, mesh.app, &[])
                .await
                .expect("stream"),
        );
    }
    assert_eq!(
        pool.connection_count(),
        1,
        "100 streams share one connection"
    );
    open.push(
        pool.connect(&tls, &key, mesh.app, &[])
            .await
            .expect("stream 101"),
    );
    assert_eq!(pool.connection_count(), 2, "the 101st opens another");

    drop(open);
    let deadline = tokio::time::Instant::now() + WAIT;
    while pool.connection_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle connections are closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_answers_success_only_once_the_tunnel_is_up() {
    let mesh = mesh().await;
    let (reply, stream) = socks5_reply(&mesh.shell, mesh.app).await.expect("socks5");
    assert_eq!(reply, 0, "succeeded: the tunnel is up");
    assert!(round_trip(stream, 1024).await.expect("round trip"));
    // The application's port is closed: the server answers 503, and the
    // client hears a failure instead of a success followed by a reset.
    let closed = {
        let probe = TcpListener::bind("127.0.0.2:0").await.expect("probe");
        probe.local_addr().expect("addr")
    };
    let (reply, _) = socks5_reply(&mesh.shell, closed).await.expect("socks5");
    assert_eq!(reply, 1, "general failure");
    // Policy denies: a failure too.
    allow_only(
        &mesh.state,
        mesh.app.port(),
        "cluster.local/ns/default/sa/shell",
    );
    let (reply, _) = socks5_reply(&mesh.other, mesh.app).await.expect("socks5");
    assert_eq!(reply, 1, "denied: general failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_stream_is_reset_with_connect_error() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    let ShellClient { pool, tls, key, .. } = shell_client(&mesh, &shutdown).await;
    let mut stream = pool
        .connect(&tls, &key, mesh.app, &[])
        .await
        .expect("admitted before the policy");
    allow_only(
        &mesh.state,
        mesh.app.port(),
        "cluster.local/ns/other/sa/shell",
    );
    let ended = tokio::time::timeout(WAIT, stream.recv.data())
        .await
        .expect("ended in time");
    // A dropped stream would go out as CANCEL, which ztunnel takes for a
    // clean end; CONNECT_ERROR is how HTTP/2 reports a reset TCP connection.
    let reason = match ended {
        Some(Err(err)) => err.reason(),
        other => panic!("expected a reset, got {other:?}"),
    };
    assert_eq!(reason, Some(h2::Reason::CONNECT_ERROR));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_requests_opens_one_connection_per_100_streams() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    let ShellClient { pool, tls, key, .. } = shell_client(&mesh, &shutdown).await;
    // 150 at once to a destination with no connection yet: a real ztunnel
    // opens 2 connections, as many as the streams need.
    let burst = (0..150).map(|_| pool.connect(&tls, &key, mesh.app, &[]));
    let streams = futures::future::join_all(burst).await;
    assert!(streams.iter().all(Result::is_ok), "every stream opened");
    assert_eq!(
        pool.connection_count(),
        2,
        "one open at a time, then shared"
    );
    drop(streams);

    // When the open fails, the requests that waited for it fail with it
    // rather than each trying again.
    let closed = {
        let probe = TcpListener::bind("127.0.0.2:0").await.expect("probe");
        probe.local_addr().expect("addr")
    };
    let nowhere = PoolKey {
        address: closed,
        ..key.clone()
    };
    let burst = (0..20).map(|_| pool.connect(&tls, &nowhere, mesh.app, &[]));
    let failures = futures::future::join_all(burst).await;
    let connects = failures
        .iter()
        .filter(|f| matches!(f, Err(HboneError::Connect { .. })))
        .count();
    let shared = failures
        .iter()
        .filter(|f| matches!(f, Err(HboneError::Opening { .. })))
        .count();
    assert_eq!((connects, shared), (1, 19), "{failures:?}");
    // Afterwards a request tries afresh.
    assert!(matches!(
        pool.connect(&tls, &nowhere, mesh.app, &[]).await,
        Err(HboneError::Connect { .. })
    ));
}

/// File descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_the_proxys_own_ports_are_refused_as_self_calls() {
    let mesh = mesh().await;
    let shutdown = CancellationToken::new();
    let ShellClient { pool, tls, key, .. } = shell_client(&mesh, &shutdown).await;
    let echo_ip = mesh.app.ip();
    let fds_before = open_fds();
    // No policy selects the echo workload: only the self-call rule refuses.
    // Before it, one CONNECT to 15006 looped until the fd limit.
    for port in [
        mesh.echo.inbound_addr().port(),
        mesh.echo.outbound_addr().port(),
        mesh.hbone_port,
        mesh.echo.socks5_addr().expect("socks5").port(),
    ] {
        let refused = pool
            .connect(&tls, &key, SocketAddr::new(echo_ip, port), &[])
            .await;
        assert!(
            matches!(&refused, Err(HboneError::Refused { status, .. }) if *status == http::StatusCode::BAD_REQUEST),
            "CONNECT to the proxy's own port {port}: {refused:?}"
        );
    }
    // Plaintext straight to the inbound listener: its own address is the
    // destination, refused likewise.
    let direct = TcpStream::connect(mesh.echo.inbound_addr()).await;
    assert_eq!(ended(direct, WAIT).await, Ended::Reset);
    // Outbound (here through SOCKS5) to the proxy's own listeners.
    let own = mesh.shell.inbound_addr();
    let (reply, through) = socks5_reply(&mesh.shell, own).await.expect("socks5");
    assert_eq!(reply, 1, "SOCKS5 general failure");
    assert_eq!(ended(Ok(through), WAIT).await, Ended::Closed);
    assert!(
        open_fds() < fds_before + 16,
        "no connections piled up: {} fds, {fds_before} before",
        open_fds()
    );
    assert_eq!(mesh.echo.live_inbound(), 0);
    assert_eq!(
        mesh.shell.pooled_connections(),
        0,
        "no pooled self-connections"
    );
    // The application is still served.
    assert!(
        pool.connect(&tls, &key, mesh.app, &[]).await.is_ok(),
        "the application's own port is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hbone_connections_make_room_for_newer_ones() {
    // A deadline far off: whatever ends now was evicted, not timed out.
    let limits = HandshakeLimits::default()
        .with_timeout(Duration::from_secs(120))
        .with_max_in_progress_per_ip(4);
    let mesh = mesh_with(limits, Certificates::InMemory).await;
    let shutdown = CancellationToken::new();
    let ShellClient { pool, tls, key, .. } = shell_client(&mesh, &shutdown).await;
    let hbone = SocketAddr::new(mesh.app.ip(), mesh.hbone_port);
    let attacker = "127.0.0.9";
    // Bare TCP connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(
            connect_from(attacker.parse().expect("ip"), hbone)
                .await
                .expect("connect"),
        );
    }
    // A mesh client is served meanwhile.
    let served = pool.connect(&tls, &key, mesh.app, &[]).await;
    assert!(
        served.is_ok(),
        "a normal client during the attack: {served:?}"
    );
    // The attacker's 16 oldest were closed to make room; its 4 newest wait.
    for stream in idle.drain(..16) {
        assert_eq!(ended(Ok(stream), WAIT).await, Ended::Closed);
    }
    for stream in &mut idle {
        assert!(
            still_open(stream).await,
            "the newest wait for their deadline"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_hbone_handshakes_are_closed_at_their_deadline() {
    let limits = HandshakeLimits::default().with_timeout(Duration::from_secs(1));
    let mesh = mesh_with(limits, Certificates::InMemory).await;
    let shutdown = CancellationToken::new();
    let ShellClient { tls, .. } = shell_client(&mesh, &shutdown).await;
    let hbone = SocketAddr::new(mesh.app.ip(), mesh.hbone_port);
    let attacker = "127.0.0.9";
    // Nothing sent; part of a TLS record, then nothing; and a TLS handshake
    // with no HTTP/2 preface after it. Each is closed at its deadline.
    let idle = connect_from(attacker.parse().expect("ip"), hbone).await;
    assert_eq!(
        ended(idle, WAIT).await,
        Ended::Closed,
        "idle: closed at the deadline"
    );
    let mut partial = connect_from(attacker.parse().expect("ip"), hbone)
        .await
        .expect("connect");
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8])
        .await
        .expect("write");
    assert_eq!(
        ended(Ok(partial), WAIT).await,
        Ended::Closed,
        "partial TLS record"
    );
    let tcp = connect_from(attacker.parse().expect("ip"), hbone)
        .await
        .expect("connect");
    let server_name = rustls_pki_types::ServerName::try_from("echo.default").expect("server name");
    let tls_stream = tokio_rustls::TlsConnector::from(tls.client.clone())
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");
    let (tcp, _) = tls_stream.into_inner();
    assert_eq!(ended(Ok(tcp), WAIT).await, Ended::Closed, "no preface");
}

#[tokio::test(flavor = "current_thread")]
async fn each_connection_is_logged_once_with_its_record_and_why_it_failed() {
    // One thread: the instances' tasks log through this test's subscriber.
    let (captured, _guard) = Captured::install();
    let mesh = mesh().await;
    let allowed = socks5(&mesh.shell, mesh.app).await.expect("connect");
    assert!(round_trip(allowed, 100).await.expect("round trip"));
    allow_only(
        &mesh.state,
        mesh.app.port(),
        "cluster.local/ns/default/sa/shell",
    );
    let (reply, _) = socks5_reply(&mesh.other, mesh.app).await.expect("socks5");
    assert_eq!(reply, 1, "denied: general failure");

    let complete = |direction: &str, needle: &str| {
        let text = captured.text();
        text.lines()
            .filter(|line| {
                line.contains("connection complete")
                    && line.contains(&format!("direction=\"{direction}\""))
                    && line.contains(needle)
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let app = mesh.app.to_string();
    let denied = format!("error=denied by policy (NoAllowPolicyMatched) to {app}");
    while complete("inbound", "bytes_request=100").is_empty()
        || complete("inbound", &denied).is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both inbound connections logged:\n{}",
            captured.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The admitted one: its record, no error.
    let admitted = complete("inbound", "bytes_request=100");
    assert_eq!(admitted.len(), 1, "{admitted:?}");
    for field in [
        "src.identity=\"spiffe://cluster.local/ns/default/sa/shell\"",
        "dst.workload=default/echo",
        "bytes_response=100",
    ] {
        assert!(admitted[0].contains(field), "{field} in {}", admitted[0]);
    }
    assert!(!admitted[0].contains("error="), "{}", admitted[0]);
    // The denied one, at both ends: policy's reason at the server, the
    // server's answer at the client.
    let refused = complete("inbound", &denied);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("src.identity=\"spiffe://cluster.local/ns/other/sa/shell\""),
        "{}",
        refused[0]
    );
    let answered = complete("outbound", "401 Unauthorized");
    assert_eq!(answered.len(), 1, "{}", captured.text());
    assert!(
        answered[0].contains(&format!("error=HBONE to {app}: HBONE server")),
        "{}",
        answered[0]
    );
}
