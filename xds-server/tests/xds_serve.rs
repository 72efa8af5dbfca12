//! The `xds-serve` example as a person runs it: a manifest directory served to a
//! delta ADS client, with and without bearer tokens.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// The example binary, next to this test's `deps/` directory. Cargo is asked to
/// build it every time (a no-op when it is current).
fn xds_serve() -> PathBuf {
    let test_exe = std::env::current_exe().expect("test path");
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("profile dir");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "xds-server",
            "--example",
            "xds-serve",
        ])
        .status()
        .expect("cargo");
    assert!(status.success(), "building the xds-serve example failed");
    profile_dir.join("examples").join("xds-serve")
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the example; returns it and the address it printed.
fn start(manifests: &Path, extra: &[&str]) -> (Running, std::net::SocketAddr) {
    let mut child = Command::new(xds_serve())
        .arg("--manifests")
        .arg(manifests)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn xds-serve");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");
    (running, addr)
}

fn manifests() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("cluster.yaml"),
        format!(
            "apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
---
{}",
            pod("default", "echo", "10.0.0.1", &[("app", "echo")])
        ),
    )
    .expect("write");
    dir
}

#[tokio::test]
async fn serves_a_manifest_directory() {
    let dir = manifests();
    let (_server, addr) = start(dir.path(), &[]);
    let mut client = AdsClient::open(addr, vec![wildcard(ADDRESS, BTreeMap::new())]).await;
    let mut view = View::default();
    client
        .collect_until(&mut view, |v| {
            v.workload("Kubernetes//Pod/default/echo").is_some()
        })
        .await;
    let echo = view.workload("Kubernetes//Pod/default/echo").expect("echo");
    assert_eq!(echo.tunnel_protocol, 1, "HBONE");
}

#[tokio::test]
async fn with_tokens_a_client_without_one_is_refused() {
    let dir = manifests();
    let (_server, addr) = start(
        dir.path(),
        &[
            "--token",
            "s3cret=spiffe://cluster.local/ns/istio-system/sa/ztunnel",
        ],
    );
    let refused = AdsClient::try_open(addr, vec![wildcard(ADDRESS, BTreeMap::new())]).await;
    let status = match refused {
        Ok(mut client) => client.try_next().await.expect_err("refused"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let channel = channel(addr).await;
    let mut client = mesh_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel);
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(wildcard(ADDRESS, BTreeMap::new()))
        .await
        .expect("queue");
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("header"));
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .expect("accepted")
        .into_inner();
    let response = responses.message().await.expect("ok").expect("a response");
    assert_eq!(response.resources[0].name, "Kubernetes//Pod/default/echo");
}
