//! Node mode end to end, in namespaces: a node namespace with a bridge, pods
//! made by the CNI chain (`shell` and `echo` in `default`, `shell` in
//! `other`), the control plane (xDS and the CA, in this process on
//! loopback), the node agent, and `ztunnel-core`'s node proxy serving every
//! pod from inside its namespace with the pod's own certificate (asked for
//! by impersonation). The applications know nothing of the mesh.
//!
//! Needs root (namespaces, nftables, iptables), as CI runs. Every check runs
//! with both redirection backends.

#[macro_use]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cni_plugin::agent::{DATAPLANE_MODE_LABEL, labels};
use mesh_ca::{CaClient, RenewalConfig};
use prometheus_client::registry::Registry;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use xds_server::parse_manifest;
use ztunnel_core::node::{NodeProxy, NodeProxyConfig, NodeProxyHandle};
use ztunnel_core::{CertManager, SharedState, XdsClient};

const PATIENCE: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";

/// The control plane in this process, on loopback, for nodes `node-a` and
/// `node-b`.
async fn control_plane() -> ControlPlaneParts {
    let manifest = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: other, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{clusterIP: {VIP}, selector: {{app: echo}}, ports: [{{port: 80, targetPort: 8080}}]}}
"
    );
    support::control_plane(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        &manifest,
        &[("node-a-token", "node-a"), ("node-b-token", "node-b")],
    )
    .await
}

/// The node's data plane: an xDS client, an impersonating certificate
/// manager, and the node proxy following the agent's ZDS socket.
struct DataPlane {
    state: SharedState,
    xds: ztunnel_core::XdsClientHandle,
    certs: CertManager,
    registry: Arc<std::sync::Mutex<Registry>>,
}

impl DataPlane {
    /// The data plane of `node` (`node-a`, `node-b`: its token names it).
    async fn start(control: &ControlPlaneParts, node: &str) -> Self {
        let token = format!("{node}-token");
        let ca = CaClient::builder()
            .address(control.address)
            .server_name("istiod.istio-system.svc")
            .roots(control.authority.roots().iter().cloned())
            .token(token.clone())
            .build()
            .expect("CA client");
        let xds = XdsClient::builder()
            .channel(ca.channel())
            .node_id(format!(
                "ztunnel~10.85.0.1~ztunnel-{node}.istio-system~istio-system.svc.cluster.local"
            ))
            .token(token)
            .build()
            .expect("xDS client");
        let state = xds.state();
        let xds = xds.spawn();
        xds.ready(PATIENCE).await.expect("synced");
        let certs = CertManager::builder()
            .client(ca)
            .impersonate(true)
            .renewal(RenewalConfig::default())
            .build()
            .expect("certificate manager");
        Self {
            state,
            xds,
            certs,
            registry: Arc::default(),
        }
    }

    fn node_proxy(&self, node: &Node, shortcut: bool) -> NodeProxyHandle {
        let mut config = NodeProxyConfig::default();
        config.zds_socket = node.zds_socket();
        config.same_node_shortcut = shortcut;
        let mut registry = self.registry.lock().expect("registry");
        *registry = Registry::default();
        NodeProxy::builder()
            .config(config)
            .state(self.state.clone())
            .certificates(self.certs.clone())
            .metrics(&mut registry)
            .build()
            .expect("node proxy")
            .spawn()
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &self.registry.lock().expect("registry"),
        )
        .expect("encode");
        text
    }

    /// Waits until the state knows a workload at `ip`.
    async fn knows(&self, ip: IpAddr) {
        let mut changes = self.state.changes();
        tokio::time::timeout(PATIENCE, async {
            while self.state.read().workload_by_ip("", ip).is_none() {
                let _ = changes.changed().await;
            }
        })
        .await
        .expect("the workload reached the data plane");
    }
}

/// A pod through the CNI chain, once the node's data plane knows its IP.
async fn add_pod(
    node: &Node,
    control: &ControlPlaneParts,
    data_plane: &DataPlane,
    namespace: &str,
    name: &str,
    app: &str,
) -> (Pod, IpAddr, Value) {
    let (pod, ip, result) = node.add_pod(control, namespace, name, app).await;
    data_plane.knows(ip).await;
    (pod, ip, result)
}

/// Runs `dig` inside the pod: the redirect rules send it to the pod's DNS
/// proxy whatever server it asks.
async fn dig(pod: &Pod, name: &str) -> String {
    let output = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns.name,
            "dig",
            "+short",
            "+time=5",
            "+tries=1",
        ])
        .arg("@10.85.0.1")
        .arg(name)
        .output()
        .await
        .expect("dig");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

const ALLOW_ONLY_DEFAULT_SHELL: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shell, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/shell]}
";

both_backends!(
    pods_on_one_node_take_the_same_node_shortcut,
    pods_on_one_node_over_hbone,
    pods_on_two_nodes_reach_each_other_over_hbone,
);

async fn pods_on_one_node_take_the_same_node_shortcut(backend: Backend) {
    pods_on_one_node(backend, true).await;
}

async fn pods_on_one_node_over_hbone(backend: Backend) {
    pods_on_one_node(backend, false).await;
}

/// Bytes that are not all alike, `len` of them.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Pods of one node served from inside their namespaces: by IP, by VIP and
/// by name; policy; the node proxy's and the agent's restarts; relabelling;
/// deletion. With `shortcut`, pod to pod on the node skips HBONE (the
/// destination's policy, metrics and logs all the same).
async fn pods_on_one_node(backend: Backend, shortcut: bool) {
    let control = control_plane().await;
    let data_plane = DataPlane::start(&control, "node-a").await;
    let mut node = Node::new(backend);
    node.pods
        .set_namespace("other", labels([(DATAPLANE_MODE_LABEL, "ambient")]));
    node.start_agent();
    node.agent().ready(PATIENCE).await.expect("agent ready");
    let node_proxy = data_plane.node_proxy(&node, shortcut);
    node_proxy.ready(PATIENCE).await.expect("node proxy synced");

    let (echo, echo_ip, _) = add_pod(&node, &control, &data_plane, "default", "echo", "echo").await;
    let (shell, _, _) = add_pod(&node, &control, &data_plane, "default", "shell", "shell").await;
    let (other, _, _) = add_pod(&node, &control, &data_plane, "other", "shell", "shell").await;
    assert_eq!(node_proxy.pods().len(), 3);
    echo_app(&echo.netns.open());
    let shell_ns = shell.netns.open();
    let other_ns = other.netns.open();

    // By pod IP and by the service's VIP, through HBONE with each pod's own
    // identity (the destination side counts the source's principal).
    let by_ip = SocketAddr::new(echo_ip, 8080);
    let by_vip: SocketAddr = format!("{VIP}:80").parse().expect("VIP");
    assert_eq!(
        round_trip(&shell_ns, by_ip, b"by ip").await.expect("by IP"),
        b"by ip"
    );
    assert_eq!(
        round_trip(&shell_ns, by_vip, b"by vip")
            .await
            .expect("by VIP"),
        b"by vip"
    );
    let metrics = data_plane.metrics();
    assert!(
        metrics.lines().any(
            |line| line.starts_with("istio_tcp_connections_opened_total")
                && line.contains("reporter=\"destination\"")
                && line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/shell\"")
                && line.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\""
                )
        ),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(
            |line| line.starts_with("istio_tcp_connections_opened_total")
                && line.contains("reporter=\"source\"")
                && line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/shell\"")
        ),
        "{metrics}"
    );
    // A large transfer arrives whole, and took the path asked for.
    let large = pattern(4 << 20);
    let echoed = round_trip(&shell_ns, by_ip, &large).await.expect("large");
    assert!(echoed == large, "the large transfer came back altered");
    if shortcut {
        assert_eq!(
            node_proxy.pooled_connections(),
            0,
            "no HBONE between pods of one node"
        );
    } else {
        assert!(
            node_proxy.pooled_connections() > 0,
            "HBONE between the pods"
        );
    }

    // By name: the pod's DNS is captured and answered from the mesh.
    assert_eq!(dig(&shell, "echo.default.svc.cluster.local").await, VIP);

    // A policy admits default/shell and resets other/shell.
    for object in parse_manifest(ALLOW_ONLY_DEFAULT_SHELL)
        .expect("YAML")
        .objects
    {
        control.store.apply(object).expect("valid");
    }
    let mut changes = data_plane.state.changes();
    tokio::time::timeout(PATIENCE, async {
        while data_plane.state.read().counts().2 == 0 {
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("the policy reached the data plane");
    assert_eq!(
        round_trip(&shell_ns, by_vip, b"allowed")
            .await
            .expect("allowed"),
        b"allowed"
    );
    let denied = round_trip(&other_ns, by_vip, b"denied").await;
    assert!(denied.as_ref().map_or(true, Vec::is_empty), "{denied:?}");

    // The node proxy restarts: every pod is served again from the snapshot.
    node_proxy.shutdown();
    node_proxy.join().await;
    let node_proxy = data_plane.node_proxy(&node, shortcut);
    node_proxy
        .ready(PATIENCE)
        .await
        .expect("node proxy synced again");
    assert_eq!(node_proxy.pods().len(), 3);
    assert_eq!(
        round_trip(&shell_ns, by_ip, b"resumed")
            .await
            .expect("resumed"),
        b"resumed"
    );

    // The agent restarts while a connection flows: it keeps flowing, and a
    // pod added afterwards is captured.
    let mut flowing = connect_from(&shell_ns, by_ip).await.expect("connect");
    flowing.write_all(b"before").await.expect("write");
    node.stop_agent().await;
    node.start_agent();
    node.agent()
        .ready(PATIENCE)
        .await
        .expect("agent ready again");
    let mut view = node.agent().watch();
    tokio::time::timeout(PATIENCE, view.wait_for(|view| view.data_planes == 1))
        .await
        .expect("the node proxy reconnected")
        .expect("agent running");
    flowing.write_all(b" and after").await.expect("write");
    flowing.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    flowing.read_to_end(&mut echoed).await.expect("read");
    assert_eq!(echoed, b"before and after");
    let (late, late_ip, _) = add_pod(&node, &control, &data_plane, "default", "late", "late").await;
    assert!(node.captured(&late));
    echo_app(&late.netns.open());
    assert_eq!(
        round_trip(&shell_ns, SocketAddr::new(late_ip, 8080), b"late")
            .await
            .expect("late"),
        b"late"
    );

    // A pod relabelled out of the mesh is released live.
    node.pods.set_pod(
        "default",
        "late",
        "late",
        labels([(DATAPLANE_MODE_LABEL, "none")]),
    );
    tokio::time::timeout(PATIENCE, async {
        while node_proxy.pods().iter().any(|pod| pod.name == "late") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the node proxy let go of the pod");
    assert!(!node.captured(&late));

    // Deleting a pod leaves no rules and no listeners.
    let deleted = node.chain("DEL", &echo, None).await;
    assert!(deleted.exit_ok, "{deleted:?}");
    assert!(!node.captured(&echo));
    tokio::time::timeout(PATIENCE, async {
        while node_proxy.pods().iter().any(|pod| pod.name == "echo") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the node proxy let go of the pod");
    let echo_ns = echo.netns.open();
    for port in [15001, 15006, 15008, 15053] {
        let refused = connect_from(&echo_ns, SocketAddr::from(([127, 0, 0, 1], port))).await;
        assert!(refused.is_err(), "port {port} still listens");
    }

    let _ = node_proxy.drain(PATIENCE).await;
    node.stop_agent().await;
    let _ = data_plane.xds.drain(PATIENCE).await;
    let _ = data_plane.certs.drain(PATIENCE).await;
    let _ = control.handle.drain(PATIENCE).await;
}

/// Joins two node namespaces with a veth pair (`10.86.0.1` ↔ `10.86.0.2`)
/// and routes each node's pod subnet through the other: as two machines on
/// one link.
fn link_nodes(a: &Node, b: &Node) {
    let (a_name, b_name) = (&a.netns.name, &b.netns.name);
    let ip = |args: &[&str]| run("ip", args);
    ip(&[
        "-n", a_name, "link", "add", "tonode", "type", "veth", "peer", "name", "tonode", "netns",
        b_name,
    ]);
    for (name, own, other_subnet, via) in [
        (a_name, "10.86.0.1/30", b.subnet, "10.86.0.2"),
        (b_name, "10.86.0.2/30", a.subnet, "10.86.0.1"),
    ] {
        ip(&["-n", name, "addr", "add", own, "dev", "tonode"]);
        ip(&["-n", name, "link", "set", "tonode", "up"]);
        let subnet = format!("10.85.{other_subnet}.0/24");
        ip(&["-n", name, "route", "add", &subnet, "via", via]);
        // The node routes for its pods (inside its own namespace only).
        run(
            "ip",
            &[
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
    }
}

/// Two nodes, each with its agent and node proxy: a pod on one reaches a
/// pod on the other over HBONE, with each pod's own identity (as the
/// destination's node proxy counts it).
async fn pods_on_two_nodes_reach_each_other_over_hbone(backend: Backend) {
    let control = control_plane().await;
    let data_plane_a = DataPlane::start(&control, "node-a").await;
    let data_plane_b = DataPlane::start(&control, "node-b").await;
    let mut node_a = Node::with_subnet(backend, 0);
    let mut node_b = Node::with_subnet(backend, 1);
    node_a.start_agent();
    node_b.start_agent();
    let proxy_a = data_plane_a.node_proxy(&node_a, true);
    let proxy_b = data_plane_b.node_proxy(&node_b, true);
    proxy_a.ready(PATIENCE).await.expect("node A synced");
    proxy_b.ready(PATIENCE).await.expect("node B synced");

    // The pods' bridges come with their first pod: link the nodes once
    // both exist.
    let (shell, _, _) = add_pod(
        &node_a,
        &control,
        &data_plane_a,
        "default",
        "shell",
        "shell",
    )
    .await;
    let (echo, echo_ip, _) =
        add_pod(&node_b, &control, &data_plane_b, "default", "echo", "echo").await;
    link_nodes(&node_a, &node_b);
    data_plane_a.knows(echo_ip).await;
    echo_app(&echo.netns.open());
    let shell_ns = shell.netns.open();

    let by_ip = SocketAddr::new(echo_ip, 8080);
    let by_vip: SocketAddr = format!("{VIP}:80").parse().expect("VIP");
    let large = pattern(1 << 20);
    assert!(round_trip(&shell_ns, by_ip, &large).await.expect("by IP") == large);
    assert_eq!(
        round_trip(&shell_ns, by_vip, b"by vip")
            .await
            .expect("by VIP"),
        b"by vip"
    );
    assert!(proxy_a.pooled_connections() > 0, "HBONE from node A");
    let metrics = data_plane_b.metrics();
    assert!(
        metrics.lines().any(
            |line| line.starts_with("istio_tcp_connections_opened_total")
                && line.contains("reporter=\"destination\"")
                && line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/shell\"")
                && line.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\""
                )
        ),
        "{metrics}"
    );

    let _ = proxy_a.drain(PATIENCE).await;
    let _ = proxy_b.drain(PATIENCE).await;
    node_a.stop_agent().await;
    node_b.stop_agent().await;
    for data_plane in [&data_plane_a, &data_plane_b] {
        let _ = data_plane.xds.drain(PATIENCE).await;
        let _ = data_plane.certs.drain(PATIENCE).await;
    }
    let _ = control.handle.drain(PATIENCE).await;
}
