//! The control plane's `Config`s read from YAML (`mesh_net::config::from_yaml`):
//! every field reaches what is built from it, what is wrong is refused with
//! the field's name, and no text makes the readers panic.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mesh_api::Identity;
use mesh_ca::{Authenticated, Authority, CaClient, CaServer, ClientCertificate, StaticTokens};
use mesh_net::HandshakeLimits;
use mesh_net::config::{ConfigError, from_yaml};
use proptest::prelude::*;
use xds_server::{
    Authenticators, ControlPlane, ControlPlaneConfig, MeshConfig, Store, StoreNodeAuthorizer,
    XdsServer, XdsServerConfig,
};

fn id(uri: &str) -> Identity {
    Identity::parse_uri(uri).expect("identity")
}

/// A control plane configuration with every field.
const CONTROL_PLANE_YAML: &str = "
handshakeLimits:
  timeout: 2m
  maxInProgress: 100
  maxInProgressPerIp: 2
mesh:
  clusterId: podless
  domain: podless.local
  trustDomain: cluster.local
  rootNamespace: mesh-root
  network: net-a
xds:
  maxResponseBytes: 1
  handshakeLimits:
    timeout: 30s
    maxInProgress: 200
    maxInProgressPerIp: 50
ca:
  servingNames:
    dnsNames: [control-plane.podless.test]
    ips: [\"127.0.0.1\"]
    validity: 720h
  handshakeLimits:
    timeout: 20s
    maxInProgress: 300
    maxInProgressPerIp: 60
  nodeAgents: [spiffe://cluster.local/ns/istio-system/sa/ztunnel]
";

#[test]
fn a_control_plane_config_with_every_field_is_read() {
    let config: ControlPlaneConfig = from_yaml(CONTROL_PLANE_YAML, "cp.yaml").expect("read");
    assert_eq!(
        config.handshake_limits,
        Some(
            HandshakeLimits::default()
                .with_timeout(Duration::from_secs(120))
                .with_max_in_progress(100)
                .with_max_in_progress_per_ip(2)
        )
    );
    let mut mesh = MeshConfig::default();
    mesh.cluster_id = "podless".into();
    mesh.domain = "podless.local".into();
    mesh.root_namespace = "mesh-root".into();
    mesh.network = "net-a".into();
    assert_eq!(config.mesh, mesh);
    assert_eq!(config.xds.max_response_bytes, 1);
    assert_eq!(
        config.xds.handshake_limits,
        HandshakeLimits::default()
            .with_timeout(Duration::from_secs(30))
            .with_max_in_progress(200)
            .with_max_in_progress_per_ip(50)
    );
    assert_eq!(
        config.ca.serving_names.dns_names,
        vec!["control-plane.podless.test".to_owned()]
    );
    assert_eq!(
        config.ca.serving_names.validity,
        Duration::from_secs(720 * 3600)
    );
    assert_eq!(config.ca.handshake_limits.max_in_progress_per_ip, 60);
    assert_eq!(
        config.ca.node_agents,
        vec![id("spiffe://cluster.local/ns/istio-system/sa/ztunnel")]
    );
}

#[test]
fn what_is_left_out_keeps_its_default() {
    let config: ControlPlaneConfig = from_yaml("", "cp.yaml").expect("read");
    assert_eq!(config, ControlPlaneConfig::default());
    assert_eq!(config.handshake_limits, None);
    assert_eq!(config.mesh, MeshConfig::default());
    assert_eq!(config.xds, XdsServerConfig::default());
    assert_eq!(config.ca, mesh_ca::CaServerConfig::default());
    let xds: XdsServerConfig = from_yaml("", "xds.yaml").expect("read");
    assert_eq!(xds.max_response_bytes, 1 << 20);
    assert_eq!(xds.handshake_limits, HandshakeLimits::default());
    let config: ControlPlaneConfig =
        from_yaml("mesh:\n  clusterId: c1\n", "cp.yaml").expect("read");
    assert_eq!(config.mesh.cluster_id, "c1");
    assert_eq!(config.mesh.domain, "cluster.local");
    // The builder's default: an XdsServer's service splits at 1 MiB.
    let service = XdsServer::builder()
        .store(Store::new(MeshConfig::default()))
        .authenticators(Authenticators::anonymous())
        .build()
        .expect("build")
        .into_service();
    assert_eq!(service.max_response_bytes(), xds.max_response_bytes);
}

#[test]
fn configs_written_out_read_back_the_same() {
    let config: ControlPlaneConfig = from_yaml(CONTROL_PLANE_YAML, "cp.yaml").expect("read");
    let text = serde_json::to_string(&config).expect("write");
    assert_eq!(
        from_yaml::<ControlPlaneConfig>(&text, "cp.json").expect("read"),
        config
    );
}

fn refused<T: serde::de::DeserializeOwned + std::fmt::Debug>(text: &str) -> ConfigError {
    from_yaml::<T>(text, "cp.yaml").expect_err("refused")
}

#[test]
fn a_misspelt_field_is_refused_by_name() {
    for (text, path, field) in [
        (
            "xds:\n  maxResponseByte: 10\n",
            "xds.maxResponseByte",
            "maxResponseByte",
        ),
        ("mesh:\n  cluster_id: c\n", "mesh.cluster_id", "cluster_id"),
        ("ca:\n  nodeAgent: []\n", "ca.nodeAgent", "nodeAgent"),
        ("handshakeLimit: {}\n", "handshakeLimit", "handshakeLimit"),
        ("store: {}\n", "store", "store"),
    ] {
        let err = refused::<ControlPlaneConfig>(text);
        assert_eq!(err.path, path, "{text}: {err}");
        assert!(
            err.message.contains(&format!("unknown field `{field}`")),
            "{text}: {err}"
        );
    }
    let err = refused::<XdsServerConfig>("max_response_bytes: 1\n");
    assert!(err.message.contains("maxResponseBytes"), "{err}");
}

#[test]
fn a_bad_value_names_its_field() {
    for (text, path) in [
        ("xds:\n  maxResponseBytes: -1\n", "xds.maxResponseBytes"),
        ("xds:\n  maxResponseBytes: 1MiB\n", "xds.maxResponseBytes"),
        (
            "xds:\n  handshakeLimits:\n    timeout: soon\n",
            "xds.handshakeLimits.timeout",
        ),
        (
            "handshakeLimits:\n  maxInProgress: lots\n",
            "handshakeLimits.maxInProgress",
        ),
        ("mesh:\n  domain: [a, b]\n", "mesh.domain"),
        (
            "ca:\n  servingNames:\n    ips: [\"10.0.0.300\"]\n",
            "ca.servingNames.ips[0]",
        ),
        (
            "ca:\n  servingNames:\n    validity: 5\n",
            "ca.servingNames.validity",
        ),
    ] {
        let err = refused::<ControlPlaneConfig>(text);
        assert_eq!(err.path, path, "{text}: {err}");
        assert!(
            err.to_string().starts_with(&format!("cp.yaml: {path}: ")),
            "{err}"
        );
    }
}

#[test]
fn a_bad_identity_is_named_with_its_place() {
    let err = refused::<ControlPlaneConfig>(
        "ca:\n  nodeAgents:\n    - spiffe://cluster.local/ns/istio-system/sa/ztunnel\n    - spiffe://cluster.local/ztunnel\n",
    );
    assert_eq!(err.path, "ca.nodeAgents[1]", "{err}");
    assert!(
        err.message
            .contains("invalid SPIFFE identity \"spiffe://cluster.local/ztunnel\""),
        "{err}"
    );
}

#[test]
fn a_zero_response_size_is_refused_when_built() {
    let config: XdsServerConfig = from_yaml("maxResponseBytes: 0\n", "xds.yaml").expect("read");
    let err = XdsServer::builder()
        .config(config)
        .store(Store::new(MeshConfig::default()))
        .authenticators(Authenticators::anonymous())
        .build()
        .expect_err("refused");
    assert!(
        matches!(err, xds_server::BuildError::ZeroResponseSize),
        "{err}"
    );
}

/// Five pods in an ambient namespace.
fn five_pods(store: &Store) {
    apply(
        store,
        "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
",
    );
    for n in 0..5 {
        apply(
            store,
            &pod(
                "default",
                &format!("p{n}"),
                &format!("10.0.0.{}", n + 1),
                &[("app", "p")],
            ),
        );
    }
}

/// The resources of each response of a new wildcard client's first sync.
async fn first_sync(addr: std::net::SocketAddr) -> Vec<usize> {
    let mut client = AdsClient::open(addr, vec![wildcard(ADDRESS, BTreeMap::new())]).await;
    let mut view = View::default();
    let mut sizes = Vec::new();
    while view.addresses.len() < 5 {
        let response = client.next().await;
        sizes.push(response.resources.len());
        view.apply(&response);
        client.send(ack(&response.type_url, &response.nonce)).await;
    }
    sizes
}

#[tokio::test]
async fn a_small_max_response_size_from_yaml_splits_responses() {
    let store = Store::new(MeshConfig::default());
    five_pods(&store);
    let small: XdsServerConfig = from_yaml("maxResponseBytes: 1\n", "xds.yaml").expect("read");
    let handle = serve_with(&store, |builder| builder.config(small)).await;
    assert_eq!(first_sync(handle.local_addr()).await, vec![1; 5]);
    handle.shutdown();

    let defaults: XdsServerConfig = from_yaml("", "xds.yaml").expect("read");
    let handle = serve_with(&store, |builder| builder.config(defaults)).await;
    assert_eq!(first_sync(handle.local_addr()).await, vec![5]);
    handle.shutdown();
}

#[tokio::test]
async fn a_control_plane_built_from_yaml_serves_as_configured() {
    let config: ControlPlaneConfig = from_yaml(CONTROL_PLANE_YAML, "cp.yaml").expect("read");
    let store = Store::new(config.mesh.clone());
    apply(
        &store,
        &pod("default", "echo", "10.0.0.1", &[("app", "echo")]),
    );
    apply(&store, &pod("default", "db", "10.0.0.2", &[("app", "db")]));
    apply(
        &store,
        "apiVersion: v1
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
    targetPort: 8080
",
    );

    let material = mesh_ca::CaMaterial::self_signed(
        &config.mesh.trust_domain,
        Duration::from_secs(365 * 86400),
    )
    .expect("material");
    let authority = Arc::new(
        Authority::new(
            &material,
            &config.mesh.trust_domain,
            mesh_ca::SigningPolicy::default(),
        )
        .expect("authority"),
    );
    let tokens = StaticTokens::new().caller(
        "agent-token",
        Authenticated {
            identity: id("spiffe://cluster.local/ns/istio-system/sa/ztunnel"),
            node: Some("node-a".into()),
            pod: None,
        },
    );
    let authenticators = Authenticators::new()
        .with(tokens)
        .with(ClientCertificate::new(authority.clone()).expect("verifier"));
    let xds = XdsServer::builder()
        .config(config.xds)
        .store(store.clone())
        .authenticators(authenticators.clone())
        .build()
        .expect("xDS");
    let ca = CaServer::builder()
        .config(config.ca.clone())
        .authority(authority.clone())
        .authenticators(authenticators)
        .node_authorizer(StoreNodeAuthorizer::new(store.clone()))
        .build()
        .expect("CA");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = ControlPlane::builder()
        .config(config)
        .xds(xds)
        .ca(ca)
        .build()
        .expect("control plane")
        .spawn(listener)
        .expect("spawn");
    let address = handle.local_addr();

    // The node agent the configuration trusts, dialling the configured name.
    let agent = CaClient::builder()
        .address(address)
        .server_name("control-plane.podless.test")
        .roots(authority.roots().iter().cloned())
        .token("agent-token")
        .build()
        .expect("client");
    let echo = id("spiffe://cluster.local/ns/default/sa/echo");
    let issued = agent
        .certificate(&echo, true, None)
        .await
        .expect("a configured node agent, echo on its node");
    assert_eq!(issued.identity, echo);

    // xDS on the same port, split at 1 byte: one resource per response.
    let response = first_response(agent.channel(), Some("agent-token"))
        .await
        .expect("xDS over TLS");
    assert_eq!(response.resources.len(), 1, "split at 1 byte");

    // The store translates with the configured mesh: its cluster id in
    // workload uids, its domain in service hostnames.
    let plain = serve(&store).await;
    let mut client =
        AdsClient::open(plain.local_addr(), vec![wildcard(ADDRESS, BTreeMap::new())]).await;
    let mut view = View::default();
    client
        .collect_until(&mut view, |view| view.addresses.len() == 3)
        .await;
    assert!(
        view.workload("podless//Pod/default/echo").is_some(),
        "{view:?}"
    );
    assert!(
        view.addresses
            .contains_key("default/echo.default.svc.podless.local"),
        "{view:?}"
    );
    plain.shutdown();

    // The shared port's limits (at most 2 in handshake from one address),
    // not the xDS server's (50) nor the CA's (60): of 5 idle connections,
    // the 3 oldest were closed to make room.
    test_support::assert_oldest_crowded_out(address, [127, 0, 0, 9].into(), 5, 3).await;
    handle.shutdown();
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics_the_readers(text in ".{0,200}") {
        let _ = from_yaml::<ControlPlaneConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<XdsServerConfig>(&text, "fuzz.yaml");
        let _ = from_yaml::<MeshConfig>(&text, "fuzz.yaml");
    }

    #[test]
    fn arbitrary_nested_sections_never_panic(
        section in "(handshakeLimits|mesh|xds|ca)",
        body in "[a-zA-Z0-9:\\[\\]{}, \"\n-]{0,80}",
    ) {
        let text = format!("{section}:\n  {body}\n");
        if let Err(err) = from_yaml::<ControlPlaneConfig>(&text, "fuzz.yaml") {
            prop_assert!(err.to_string().starts_with("fuzz.yaml: "), "{}", err);
        }
    }
}

#[test]
fn the_readme_sample_is_valid_and_shows_the_defaults() {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("a Configuration section");
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("a yaml block");
    let config: ControlPlaneConfig = from_yaml(block, "README").expect("valid");
    let mut expected = ControlPlaneConfig::default();
    expected.handshake_limits = Some(HandshakeLimits::default());
    assert_eq!(config, expected);
}
