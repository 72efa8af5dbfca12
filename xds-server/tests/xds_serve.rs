//! The `xds-serve` example as a person runs it: a manifest directory served to a
//! delta ADS client, with and without bearer tokens.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// The `xds-serve` example binary, next to this test's `deps/` directory:
/// cargo builds a package's examples with its tests (`cargo test`, `cargo
/// nextest run`), so the test never runs cargo itself.
fn xds_serve() -> PathBuf {
    let test_exe = std::env::current_exe().expect("test path");
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("profile dir");
    let binary = profile_dir.join("examples").join("xds-serve");
    assert!(
        binary.exists(),
        "{} is not built: run the tests with cargo test or cargo nextest run -p podless-xds, which build it",
        binary.display()
    );
    binary
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
    // `root certificate: ...` may come first; `listening on <addr>` last.
    let addr = BufReader::new(stdout)
        .lines()
        .map(|line| line.expect("read"))
        .find_map(|line| line.strip_prefix("listening on ").map(str::to_owned))
        .expect("a listening line")
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
    let refused = first_response(channel(addr).await, None)
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let response = first_response(channel(addr).await, Some("s3cret"))
        .await
        .expect("accepted");
    assert_eq!(response.resources[0].name, "Kubernetes//Pod/default/echo");
}

#[tokio::test]
async fn serves_tls_with_a_given_certificate() {
    let dir = manifests();
    let tls = tempfile::tempdir().expect("tempdir");
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert, key) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).expect("write");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write");
    let (_server, addr) = start(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
        ],
    );
    let client = mesh_ca::CaClient::builder()
        .address(addr)
        .server_name("localhost")
        .roots([issued.cert.der().clone()])
        .build()
        .expect("client");
    let response = first_response(client.channel(), None)
        .await
        .expect("served over TLS");
    assert_eq!(response.resources[0].name, "Kubernetes//Pod/default/echo");
}

#[tokio::test]
async fn with_a_ca_dir_serves_the_ca_beside_xds_and_lets_node_agents_impersonate() {
    let dir = manifests();
    let ca = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = start(
        dir.path(),
        &[
            "--ca-dir",
            ca.path().to_str().expect("path"),
            "--node-agent",
            "agent=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a",
        ],
    );
    let root = std::fs::read_to_string(ca.path().join("root-cert.pem")).expect("root written");
    let roots = rustls_pki_types::pem::PemObject::pem_slice_iter(root.as_bytes())
        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
        .expect("PEM");
    let agent = mesh_ca::CaClient::builder()
        .address(addr)
        .server_name("istiod.istio-system.svc")
        .roots(roots)
        .token("agent")
        .build()
        .expect("client");
    let echo =
        mesh_api::Identity::parse_uri("spiffe://cluster.local/ns/default/sa/echo").expect("id");
    let issued = agent
        .certificate(&echo, true, None)
        .await
        .expect("echo runs on node-a");
    assert_eq!(issued.identity, echo);
    let response = first_response(agent.channel(), Some("agent"))
        .await
        .expect("xDS over TLS");
    assert_eq!(response.resources[0].name, "Kubernetes//Pod/default/echo");
}
