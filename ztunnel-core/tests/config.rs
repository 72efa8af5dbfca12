//! The crate's `Config`s (`ZtunnelConfig`, `XdsClientConfig`,
//! `CertManagerConfig`) as a binary reads them, one file for the whole node:
//! every field read and applied, a config-built instance serving traffic as a
//! builder-built one does, misspelt fields and bad values refused by their
//! path, defaults as documented, and no text that panics the readers.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_api::names::ip_to_wire;
use mesh_api::workload::{TunnelProtocol, Workload, WorkloadStatus};
use mesh_net::config::{ConfigError, from_yaml};
use proptest::prelude::*;
use tokio::net::{TcpListener, TcpStream};
use ztunnel_core::{
    CertManager, CertManagerBuilder, CertManagerConfig, HandshakeLimits, Listeners, RenewalConfig,
    SharedState, StaticCertificates, XdsClient, XdsClientBuilder, XdsClientConfig, Ztunnel,
    ZtunnelBuilder, ZtunnelConfig, ZtunnelHandle,
};

mod support;

use support::mesh::{echo_app, identity, in_memory_ca, put, round_trip};

const WAIT: Duration = Duration::from_secs(20);

/// One file for a node's parts, as a binary would define it.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct Node {
    proxy: ZtunnelConfig,
    xds: XdsClientConfig,
    certificates: CertManagerConfig,
}

/// Every field of the three, none at its default.
const EVERY_FIELD: &str = "
proxy:
  workloadUid: Kubernetes//Pod/default/shell
  identity: spiffe://cluster.local/ns/default/sa/shell
  network: net-1
  socketMark: null
  certificateWait: 2s 500ms
  hbonePort: 15999
  handshakeLimits:
    timeout: 3s
    maxInProgress: 100
    maxInProgressPerIp: 8
xds:
  nodeId: ztunnel~10.0.0.2~shell.default~default.svc.cluster.local
  clusterId: east
  onDemand: true
  maxBackoff: 1m
certificates:
  impersonate: true
  renewal:
    ttl: 24h
    initialBackoff: 200ms
    maxBackoff: 20s
";

#[tokio::test]
async fn every_field_is_read_and_the_builders_build() {
    let node: Node = from_yaml(EVERY_FIELD, "node.yaml").expect("read");
    let proxy = &node.proxy;
    assert_eq!(
        proxy.workload_uid.as_deref(),
        Some("Kubernetes//Pod/default/shell")
    );
    assert_eq!(
        proxy.identity,
        Some(identity("spiffe://cluster.local/ns/default/sa/shell"))
    );
    assert_eq!(proxy.network, "net-1");
    assert_eq!(proxy.socket_mark, None);
    assert_eq!(proxy.certificate_wait, Duration::from_millis(2500));
    assert_eq!(proxy.hbone_port, 15999);
    assert_eq!(
        proxy.handshake_limits,
        HandshakeLimits::default()
            .with_timeout(Duration::from_secs(3))
            .with_max_in_progress(100)
            .with_max_in_progress_per_ip(8)
    );
    let xds = &node.xds;
    assert_eq!(
        xds.node_id.as_deref(),
        Some("ztunnel~10.0.0.2~shell.default~default.svc.cluster.local")
    );
    assert_eq!(xds.cluster_id, "east");
    assert!(xds.on_demand);
    assert_eq!(xds.max_backoff, Duration::from_secs(60));
    let certificates = &node.certificates;
    assert!(certificates.impersonate);
    assert_eq!(
        certificates.renewal,
        RenewalConfig {
            ttl: Some(Duration::from_secs(86400)),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(20),
        }
    );
    // None of them is at its default: the sample above covers every field.
    let default = Node::default();
    assert_ne!(node.proxy, default.proxy);
    assert_ne!(node.xds, default.xds);
    assert_ne!(node.certificates, default.certificates);

    // Config → builder (both ways in) → built, with the runtime parts added.
    let certs = CertManager::builder()
        .config(node.certificates)
        .source(StaticCertificates::new())
        .build()
        .expect("certificate manager");
    CertManagerBuilder::from(node.certificates)
        .source(StaticCertificates::new())
        .build()
        .expect("certificate manager from From");
    let channel = tonic::transport::Channel::from_static("https://127.0.0.1:1").connect_lazy();
    let xds = XdsClient::builder()
        .config(node.xds.clone())
        .channel(channel.clone())
        .token("node-agent-token")
        .build()
        .expect("xDS client");
    assert!(xds.demander().is_some(), "onDemand reached the client");
    XdsClientBuilder::from(node.xds.clone())
        .channel(channel)
        .build()
        .expect("xDS client from From");
    Ztunnel::builder()
        .config(node.proxy.clone())
        .state(xds.state())
        .certificates(certs.clone())
        .build()
        .expect("proxy");
    ZtunnelBuilder::from(node.proxy.clone())
        .state(xds.state())
        .certificates(certs)
        .build()
        .expect("proxy from From");
}

#[tokio::test]
async fn build_still_checks_what_the_config_leaves_out() {
    let certs = CertManager::builder()
        .config(CertManagerConfig::default())
        .source(StaticCertificates::new())
        .build()
        .expect("certificate manager");
    let missing = Ztunnel::builder()
        .config(ZtunnelConfig::default())
        .state(SharedState::default())
        .certificates(certs)
        .build()
        .expect_err("no workload uid");
    assert!(missing.to_string().contains("workload_uid"), "{missing}");
    let channel = tonic::transport::Channel::from_static("https://127.0.0.1:1").connect_lazy();
    let missing = XdsClient::builder()
        .config(XdsClientConfig::default())
        .channel(channel.clone())
        .build()
        .expect_err("no node id");
    assert!(missing.to_string().contains("node id"), "{missing}");
    let bad: XdsClientConfig =
        from_yaml("nodeId: node-a\nclusterId: \"east\\nwest\"\n", "xds.yaml").expect("read");
    let bad = XdsClient::builder()
        .config(bad)
        .channel(channel)
        .build()
        .expect_err("a cluster id that is no header value");
    assert!(bad.to_string().contains("cluster id"), "{bad}");
    let missing = CertManager::builder()
        .config(CertManagerConfig::default())
        .build()
        .expect_err("no source");
    assert!(missing.to_string().contains("source"), "{missing}");
}

#[test]
fn what_is_left_out_keeps_the_documented_default() {
    let node: Node = from_yaml("", "empty.yaml").expect("defaults");
    assert_eq!(node, Node::default());
    let node: Node = from_yaml("proxy: {}\nxds: {}\ncertificates: {}\n", "n.yaml").expect("read");
    assert_eq!(node, Node::default());
    let proxy = ZtunnelConfig::default();
    assert_eq!(proxy.workload_uid, None);
    assert_eq!(proxy.identity, None);
    assert_eq!(proxy.network, "");
    assert_eq!(proxy.socket_mark, Some(1337));
    assert_eq!(proxy.certificate_wait, Duration::from_secs(10));
    assert_eq!(proxy.hbone_port, 15008);
    assert_eq!(proxy.handshake_limits, HandshakeLimits::default());
    let xds = XdsClientConfig::default();
    assert_eq!(xds.node_id, None);
    assert_eq!(xds.cluster_id, "Kubernetes");
    assert!(!xds.on_demand);
    assert_eq!(xds.max_backoff, Duration::from_secs(15));
    let certificates = CertManagerConfig::default();
    assert!(!certificates.impersonate);
    assert_eq!(certificates.renewal, RenewalConfig::default());
    // One field given, the others kept.
    let proxy: ZtunnelConfig = from_yaml("hbonePort: 16008\n", "p.yaml").expect("read");
    assert_eq!(proxy.hbone_port, 16008);
    assert_eq!(proxy.socket_mark, Some(1337));
}

/// Reads `text` as a [`Node`]; the error it gets.
fn refused(text: &str) -> ConfigError {
    from_yaml::<Node>(text, "node.yaml").expect_err("refused")
}

#[test]
fn a_misspelt_field_is_refused_by_its_path() {
    for (text, path, unknown) in [
        ("proxi: {}\n", "proxi", "proxi"),
        (
            "proxy:\n  workload_uid: x\n",
            "proxy.workload_uid",
            "workload_uid",
        ),
        (
            "proxy:\n  handshakeLimits:\n    timout: 1s\n",
            "proxy.handshakeLimits.timout",
            "timout",
        ),
        ("xds:\n  nodeID: x\n", "xds.nodeID", "nodeID"),
        ("xds:\n  token: secret\n", "xds.token", "token"),
        (
            "certificates:\n  renewal:\n    maxBackof: 1s\n",
            "certificates.renewal.maxBackof",
            "maxBackof",
        ),
    ] {
        let err = refused(text);
        assert_eq!(err.source_name, "node.yaml");
        assert_eq!(err.path, path, "{text}: {err}");
        assert!(
            err.message.contains(&format!("unknown field `{unknown}`")),
            "{text}: {err}"
        );
        assert!(
            err.to_string().starts_with(&format!("node.yaml: {path}: ")),
            "{err}"
        );
    }
}

#[test]
fn a_bad_value_is_refused_by_its_path() {
    for (text, path) in [
        ("proxy:\n  identity: shell\n", "proxy.identity"),
        ("proxy:\n  socketMark: -1\n", "proxy.socketMark"),
        ("proxy:\n  hbonePort: 70000\n", "proxy.hbonePort"),
        ("proxy:\n  certificateWait: soon\n", "proxy.certificateWait"),
        (
            "proxy:\n  handshakeLimits:\n    maxInProgress: many\n",
            "proxy.handshakeLimits.maxInProgress",
        ),
        ("proxy:\n  workloadUid: [a, b]\n", "proxy.workloadUid"),
        ("xds:\n  onDemand: sometimes\n", "xds.onDemand"),
        ("xds:\n  maxBackoff: 15\n", "xds.maxBackoff"),
        (
            "certificates:\n  impersonate: 2\n",
            "certificates.impersonate",
        ),
        (
            "certificates:\n  renewal:\n    ttl: forever\n",
            "certificates.renewal.ttl",
        ),
    ] {
        let err = refused(text);
        assert_eq!(err.path, path, "{text}: {err}");
        assert!(
            err.to_string().starts_with(&format!("node.yaml: {path}: ")),
            "{err}"
        );
    }
    // Text that is not YAML names the file, and no field.
    let err = refused("proxy: [1,\n");
    assert!(err.to_string().starts_with("node.yaml: "), "{err}");
    assert!(err.path.is_empty(), "{err}");
}

fn workload(namespace: &str, name: &str, ip: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{namespace}/{name}"),
        name: name.into(),
        namespace: namespace.into(),
        addresses: vec![ip_to_wire(ip.parse().expect("ip"))],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: name.into(),
        node: "node-a".into(),
        status: WorkloadStatus::Healthy as i32,
        ..Workload::default()
    }
}

/// HBONE listeners on one port for echo (127.0.0.2) and shell (127.0.0.3).
async fn hbone_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..20 {
        let echo = TcpListener::bind("127.0.0.2:0").await.expect("bind");
        let port = echo.local_addr().expect("addr").port();
        if let Ok(shell) = TcpListener::bind(("127.0.0.3", port)).await {
            return (echo, shell);
        }
    }
    panic!("no port free on both workload addresses");
}

/// How an instance was made.
#[derive(Clone, Copy, Debug)]
enum Made {
    /// With the builder's setters.
    BySetters,
    /// From a `ZtunnelConfig` read from YAML.
    FromConfig,
}

/// An instance for `uid`, listening beside `hbone`, made as `made` says.
async fn instance(
    made: Made,
    state: &SharedState,
    certs: &CertManager,
    uid: &str,
    hbone: TcpListener,
) -> ZtunnelHandle {
    let address = hbone.local_addr().expect("hbone address");
    let builder = match made {
        Made::BySetters => Ztunnel::builder()
            .workload_uid(uid)
            .hbone_port(address.port())
            .certificate_wait(Duration::from_secs(5))
            .handshake_limits(HandshakeLimits::default().with_timeout(Duration::from_secs(5))),
        Made::FromConfig => {
            let yaml = format!(
                "workloadUid: {uid}\nhbonePort: {}\ncertificateWait: 5s\nhandshakeLimits: {{timeout: 5s}}\n",
                address.port()
            );
            let config: ZtunnelConfig = from_yaml(&yaml, "proxy.yaml").expect("config");
            Ztunnel::builder().config(config)
        }
    };
    let bind = || async {
        TcpListener::bind((address.ip(), 0))
            .await
            .expect("bind listener")
    };
    let handle = builder
        .state(state.clone())
        .certificates(certs.clone())
        .build()
        .expect("built")
        .spawn(Listeners {
            outbound: bind().await,
            inbound_plaintext: bind().await,
            hbone,
            socks5: Some(bind().await),
        })
        .expect("spawned");
    handle.ready(WAIT).await.expect("ready");
    handle
}

/// Connects through `proxy`'s SOCKS5 listener to `target` (success answered
/// once the tunnel is up).
async fn socks5(proxy: &ZtunnelHandle, target: SocketAddr) -> TcpStream {
    let socks5 = proxy.socks5_addr().expect("a SOCKS5 listener");
    let (reply, stream) = test_support::socks5(socks5, target).await.expect("SOCKS5");
    assert_eq!(reply, 0, "SOCKS5 success");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_built_instance_serves_traffic_as_a_setter_built_one() {
    let ca = in_memory_ca(&[
        "spiffe://cluster.local/ns/default/sa/echo",
        "spiffe://cluster.local/ns/default/sa/shell",
    ]);
    let state = SharedState::default();
    let app = echo_app("127.0.0.2").await;
    put(&state, workload("default", "echo", "127.0.0.2"));
    put(&state, workload("default", "shell", "127.0.0.3"));
    // Every pairing of the two ways, client side and server side.
    for (client, server) in [
        (Made::FromConfig, Made::BySetters),
        (Made::BySetters, Made::FromConfig),
        (Made::FromConfig, Made::FromConfig),
        (Made::BySetters, Made::BySetters),
    ] {
        let (echo_hbone, shell_hbone) = hbone_listeners().await;
        let echo = instance(
            server,
            &state,
            &ca.certs,
            "Kubernetes//Pod/default/echo",
            echo_hbone,
        )
        .await;
        let shell = instance(
            client,
            &state,
            &ca.certs,
            "Kubernetes//Pod/default/shell",
            shell_hbone,
        )
        .await;
        let stream = socks5(&shell, app).await;
        assert!(
            round_trip(stream, 256 << 10).await.expect("round trip"),
            "{client:?} client to {server:?} server: 256 KiB echoed intact"
        );
        for (name, handle) in [("shell", shell), ("echo", echo)] {
            assert_eq!(
                handle.drain(WAIT).await,
                ztunnel_core::Drained::Complete,
                "{name}"
            );
            handle.join().await.expect("stopped cleanly");
        }
    }
}

/// Durations as humantime writes and reads them back exactly.
fn duration() -> impl Strategy<Value = Duration> {
    (0u64..10_000_000, 0u32..1_000_000_000).prop_map(|(secs, nanos)| Duration::new(secs, nanos))
}

prop_compose! {
    fn node()(
        uid in proptest::option::of("[ -~]{0,40}"),
        account in proptest::option::of("[a-z][a-z0-9-]{0,20}"),
        network in "[ -~]{0,20}",
        mark in proptest::option::of(any::<u32>()),
        wait in duration(),
        port in any::<u16>(),
        limits in (duration(), any::<u32>(), any::<u32>()),
        node_id in proptest::option::of("[ -~]{0,40}"),
        cluster in "[ -~]{0,20}",
        on_demand in any::<bool>(),
        backoff in duration(),
        impersonate in any::<bool>(),
        renewal in (proptest::option::of(duration()), duration(), duration()),
    ) -> Node {
        let mut node = Node::default();
        node.proxy.workload_uid = uid;
        node.proxy.identity = account
            .map(|account| identity(&format!("spiffe://cluster.local/ns/default/sa/{account}")));
        node.proxy.network = network;
        node.proxy.socket_mark = mark;
        node.proxy.certificate_wait = wait;
        node.proxy.hbone_port = port;
        node.proxy.handshake_limits = HandshakeLimits::default()
            .with_timeout(limits.0)
            .with_max_in_progress(limits.1 as usize)
            .with_max_in_progress_per_ip(limits.2 as usize);
        node.xds.node_id = node_id;
        node.xds.cluster_id = cluster;
        node.xds.on_demand = on_demand;
        node.xds.max_backoff = backoff;
        node.certificates.impersonate = impersonate;
        node.certificates.renewal = RenewalConfig {
            ttl: renewal.0,
            initial_backoff: renewal.1,
            max_backoff: renewal.2,
        };
        node
    }
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics_the_readers(text in ".{0,200}") {
        let _ = from_yaml::<ZtunnelConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<XdsClientConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<CertManagerConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<Node>(&text, "fuzz.yaml");
    }

    #[test]
    fn yaml_shaped_text_never_panics_the_readers(
        entries in proptest::collection::vec(
            (
                prop_oneof![
                    Just("proxy"), Just("xds"), Just("certificates"), Just("workloadUid"),
                    Just("identity"), Just("socketMark"), Just("handshakeLimits"),
                    Just("timeout"), Just("renewal"), Just("ttl"), Just("maxBackoff"),
                ],
                "[ -~]{0,12}",
                0usize..3,
            ),
            0..8,
        )
    ) {
        let text: String = entries
            .iter()
            .map(|(key, value, depth)| format!("{}{key}: {value}\n", "  ".repeat(*depth)))
            .collect();
        let _ = from_yaml::<Node>(&text, "fuzz.yaml");
        let _ = from_yaml::<ZtunnelConfig>(&text, "fuzz.yaml");
    }

    #[test]
    fn what_is_written_reads_back_the_same(node in node()) {
        let json = serde_json::to_string(&node).expect("written");
        let read: Node = from_yaml(&json, "node.json").expect("read back");
        prop_assert_eq!(read, node);
    }
}
