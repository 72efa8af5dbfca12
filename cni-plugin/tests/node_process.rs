//! The node's data plane as a process of its own, driven by our node agent
//! over ZDS: `ztunnel-run --node` (podless's), and a real ztunnel
//! (istio/ztunnel, built outside this repository) in shared mode. Each takes
//! the pods the CNI chain captures, opens their listeners inside their
//! namespaces, gets its configuration from our control plane and each pod's
//! certificate from our CA (by impersonation), and carries pod-to-pod
//! traffic by pod IP and by service VIP.
//!
//! The real ztunnel's test is skipped unless `PODLESS_ZTUNNEL` names its
//! binary (release, `testing` feature). Needs root, as CI runs.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::*;

const PATIENCE: Duration = Duration::from_secs(30);
const VIP: &str = "10.96.0.10";
const TOKEN: &str = "ztunnel-node-a-token";

both_backends!(
    ztunnel_run_in_node_mode_serves_the_pods_our_agent_captures,
    a_real_ztunnel_in_shared_mode_serves_the_pods_our_agent_captures,
);

/// Which data plane serves the node.
enum DataPlane {
    /// `ztunnel-run --node`.
    Ours(PathBuf),
    /// A real ztunnel in shared mode.
    RealZtunnel(PathBuf),
}

async fn ztunnel_run_in_node_mode_serves_the_pods_our_agent_captures(backend: Backend) {
    let ztunnel_run = test_support::example("ztunnel-core", "ztunnel-run");
    serves_the_pods_our_agent_captures(backend, DataPlane::Ours(ztunnel_run)).await;
}

#[allow(clippy::print_stderr)]
async fn a_real_ztunnel_in_shared_mode_serves_the_pods_our_agent_captures(backend: Backend) {
    // A test given a binary by a variable: the test reads it, no library.
    let Some(ztunnel) = std::env::var_os("PODLESS_ZTUNNEL").map(PathBuf::from) else {
        eprintln!("PODLESS_ZTUNNEL is not set: skipped (give it a real ztunnel binary)");
        return;
    };
    serves_the_pods_our_agent_captures(backend, DataPlane::RealZtunnel(ztunnel)).await;
}

async fn serves_the_pods_our_agent_captures(backend: Backend, data_plane: DataPlane) {
    let mut node = Node::new(backend);
    // The control plane listens inside the node's namespace, on its
    // loopback, where the node's ztunnel finds it.
    let manifest = format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{clusterIP: {VIP}, selector: {{app: echo}}, ports: [{{port: 80, targetPort: 8080}}]}}
"
    );
    let control = control_plane(
        listener_in(&node.netns.open()),
        &manifest,
        &[(TOKEN, "node-a")],
    )
    .await;
    let address = control.address;

    node.start_agent();
    let dir = node.dir.path().join("ztunnel");
    let tokens_dir = dir.join("var/run/secrets/tokens");
    std::fs::create_dir_all(&tokens_dir).expect("dirs");
    std::fs::write(tokens_dir.join("istio-token"), TOKEN).expect("token");
    let root = dir.join("root.pem");
    control.write_root(&root);
    let root = root.display().to_string();
    let token = tokens_dir.join("istio-token").display().to_string();
    let daemon = match data_plane {
        DataPlane::Ours(program) => Daemon::start(
            &node.netns.name,
            &dir,
            &[],
            &program,
            &[
                "--node".into(),
                "--zds-socket".into(),
                node.zds_socket().display().to_string(),
                "--control-plane".into(),
                address.to_string(),
                "--root".into(),
                root,
                "--token-file".into(),
                token,
            ],
        ),
        DataPlane::RealZtunnel(program) => Daemon::start(
            &node.netns.name,
            &dir,
            &real_ztunnel_env(
                address,
                &root,
                &node.zds_socket().display().to_string(),
                "info",
            ),
            &program,
            &[],
        ),
    };
    let mut view = node.agent().watch();
    tokio::time::timeout(PATIENCE, view.wait_for(|view| view.data_planes == 1))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the data plane never connected to the agent:\n{}",
                daemon.output()
            )
        })
        .expect("agent running");

    let mut ips = Vec::new();
    let mut pods = Vec::new();
    for name in ["echo", "shell"] {
        let (pod, ip, _) = node.add_pod(&control, "default", name, name).await;
        ips.push(ip);
        pods.push(pod);
    }
    echo_app(&pods[0].netns.open());
    let shell = pods[1].netns.open();
    // ztunnel learns of the pods' addresses over xDS: retry until it does.
    for target in [
        SocketAddr::new(ips[0], 8080),
        format!("{VIP}:80").parse().expect("VIP"),
    ] {
        let start = Instant::now();
        loop {
            match round_trip(&shell, target, b"through a real ztunnel").await {
                Ok(echoed) if echoed == b"through a real ztunnel" => break,
                other => assert!(
                    start.elapsed() < PATIENCE,
                    "to {target}: {other:?}\n{}",
                    daemon.output()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The access log (written in batches) names the source's identity.
    let start = Instant::now();
    while !daemon
        .output()
        .contains("spiffe://cluster.local/ns/default/sa/shell")
    {
        assert!(
            start.elapsed() < PATIENCE,
            "the access log never named the source identity:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pod in &pods {
        node.chain("DEL", pod, None).await;
    }
    drop(daemon);
    node.stop_agent().await;
    let _ = control.handle.drain(PATIENCE).await;
}
