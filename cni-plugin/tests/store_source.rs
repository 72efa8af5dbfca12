//! The node agent's pods from a control plane's store, fed by a watched
//! manifest directory (`xds_server::ManifestDir`): a pod is judged at its
//! ADD, before it has an IP, as the control plane judges it; editing the
//! manifest enrols and releases it live. (The same store, fed by Kubernetes,
//! is the `kube` feature's source.)
//!
//! Needs root (namespaces, nftables), as CI runs.
#![cfg(feature = "xds-store")]

#[macro_use]
mod support;

use std::path::Path;
use std::time::Duration;

use cni_plugin::agent::{NodeAgent, NodeAgentConfig, StorePods};
use mesh_net::zds::ZdsListener;
use support::*;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use xds_server::{ConfigSource, ManifestDir, MeshConfig, Store};

fn write_manifest(dir: &Path, pod_mode: Option<&str>) {
    let labels = pod_mode.map_or_else(String::new, |mode| {
        format!("labels: {{istio.io/dataplane-mode: {mode}}}, ")
    });
    std::fs::write(
        dir.join("cluster.yaml"),
        format!(
            "apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: shell, namespace: default, {labels}}}
spec: {{serviceAccountName: shell, nodeName: node-a, containers: [{{name: c}}]}}
"
        ),
    )
    .expect("manifest");
}

both_backends!(pods_come_from_a_manifest_directory_through_the_store);

async fn pods_come_from_a_manifest_directory_through_the_store(backend: Backend) {
    let manifests = tempfile::tempdir().expect("dir");
    write_manifest(manifests.path(), None);
    let store = Store::new(MeshConfig::default());
    let stop = CancellationToken::new();
    let source =
        Box::new(ManifestDir::new(manifests.path()).poll_interval(Duration::from_millis(20)));
    tokio::spawn(source.run(store.clone(), stop.clone()));
    let mut node = Node::new(backend);
    let agent = NodeAgent::builder()
        .config(NodeAgentConfig::default())
        .pods(StorePods::new(store.clone()))
        .redirection(backend.redirection())
        .build()
        .expect("build")
        .spawn(
            UnixListener::bind(node.agent_socket()).expect("bind"),
            ZdsListener::bind(node.zds_socket()).expect("bind"),
        )
        .expect("spawn");
    node.agent = Some(agent);
    let mut data_plane = data_plane(node.zds_socket(), Vec::new()).await;
    assert_eq!(next(&mut data_plane).await, Seen::SnapshotSent);
    node.wait_for_data_planes(1).await;

    // Known from the manifest, without an IP: enrolled by its namespace.
    let mut changes = store.object_changes();
    tokio::time::timeout(WAIT, async {
        while store.pod_enrollment("default", "shell").is_none() {
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("the manifest was read");
    let shell = Pod {
        namespace: "default".into(),
        name: "shell".into(),
        uid: "uid-store-shell".into(),
        container_id: "container-store-shell".into(),
        netns: TestNetns::new("pod"),
    };
    let added = node.chain("ADD", &shell, None).await;
    assert!(added.exit_ok, "{added:?}");
    assert!(node.captured(&shell));
    assert!(
        matches!(next(&mut data_plane).await, Seen::Add { uid, service_account, .. }
        if uid == "uid-store-shell" && service_account == "shell")
    );

    // The manifest opts the pod out: released live.
    write_manifest(manifests.path(), Some("none"));
    assert_eq!(
        next(&mut data_plane).await,
        Seen::Del("uid-store-shell".into())
    );
    assert!(!node.captured(&shell));
    // And back in.
    write_manifest(manifests.path(), Some("ambient"));
    assert!(matches!(next(&mut data_plane).await, Seen::Add { .. }));
    assert!(node.captured(&shell));

    node.chain("DEL", &shell, Some(&added.json())).await;
    node.stop_agent().await;
    stop.cancel();
}
