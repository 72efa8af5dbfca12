//! A watched manifest directory feeding connected clients.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;
use xds_server::source::ManifestDir;
use xds_server::{ConfigSource, MeshConfig, Store};

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: echo
  ports:
  - port: 80
    targetPort: 8080
";

#[tokio::test]
async fn edits_reach_connected_clients_and_broken_files_keep_what_was_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("service.yaml"), SERVICE).expect("write");
    std::fs::create_dir(dir.path().join("pods")).expect("mkdir");
    let pods = dir.path().join("pods/echo.yaml");
    std::fs::write(
        &pods,
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");

    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(dir.path()).poll_interval(Duration::from_millis(50));
    let problems = source.problems();
    source.sync(&store).expect("first read");
    assert_eq!(store.stats().workloads, 1);
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(Box::new(source).run(store.clone(), shutdown.clone()));

    let server = serve(&store).await;
    let mut client = AdsClient::open(
        server.local_addr(),
        vec![wildcard(ADDRESS, BTreeMap::new())],
    )
    .await;
    let mut view = View::default();
    let echo = "Kubernetes//Pod/default/echo-1";
    client
        .collect_until(&mut view, |v| {
            v.workload(echo).is_some_and(|w| w.services.len() == 1)
        })
        .await;

    // Edit: the pod leaves the service, a second pod appears.
    let edited = format!(
        "{}---\n{}",
        pod("default", "echo-1", "10.0.0.1", &[("app", "other")]),
        pod("default", "echo-2", "10.0.0.2", &[("app", "echo")])
    );
    std::fs::write(&pods, edited).expect("write");
    client
        .collect_until(&mut view, |v| {
            v.workload(echo).is_some_and(|w| w.services.is_empty())
                && v.workload("Kubernetes//Pod/default/echo-2").is_some()
        })
        .await;

    // A broken file is reported; what it defined before stays.
    std::fs::write(
        &pods,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-1\n  labels: [oops]\n",
    )
    .expect("write");
    eventually("the broken file is reported", || {
        !problems.current().is_empty()
    })
    .await;
    let reported = problems.current();
    assert_eq!(reported[0].path, pods);
    assert!(
        reported[0].problems[0].contains("metadata.labels"),
        "{:?}",
        reported[0].problems
    );
    assert_eq!(store.stats().workloads, 2, "nothing dropped");

    // Fixed again: the problem clears. Removing the file withdraws its pods.
    std::fs::write(
        &pods,
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");
    eventually("the problem clears", || problems.current().is_empty()).await;
    client
        .collect_until(&mut view, |v| {
            v.removed
                .iter()
                .any(|n| n == "Kubernetes//Pod/default/echo-2")
        })
        .await;
    std::fs::remove_file(&pods).expect("rm");
    client
        .collect_until(&mut view, |v| v.removed.iter().any(|n| n == echo))
        .await;
    assert_eq!(store.stats().workloads, 0);

    shutdown.cancel();
    watcher.await.expect("join").expect("watcher");
}

#[test]
fn an_object_defined_twice_stays_until_no_file_defines_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = dir.path().join("one.yaml");
    let two = dir.path().join("two.yml");
    std::fs::write(&one, SERVICE).expect("write");
    std::fs::write(&two, SERVICE.replace("10.96.0.10", "10.96.0.11")).expect("write");
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(dir.path());
    source.sync(&store).expect("read");
    assert_eq!(store.stats().services, 1);

    std::fs::remove_file(&two).expect("rm");
    source.sync(&store).expect("read");
    assert_eq!(store.stats().services, 1, "one.yaml still defines it");
    std::fs::remove_file(&one).expect("rm");
    source.sync(&store).expect("read");
    assert_eq!(store.stats().services, 0);
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new("/nonexistent/podless-manifests");
    let err = source.sync(&store).expect_err("missing");
    assert!(
        err.to_string().contains("/nonexistent/podless-manifests"),
        "{err}"
    );
}
