//! The `xds-serve` example as a person runs it: a manifest directory served to a
//! delta ADS client, with and without bearer tokens.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// The `xds-serve` example, built by cargo with the tests.
fn xds_serve() -> PathBuf {
    test_support::example("podless-xds", "xds-serve")
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
    let agent = agent_client(ca.path(), addr, "istiod.istio-system.svc");
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

/// The manifest directory shipped next to the example, which `--help` and
/// the README tell users to run it on.
fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/xds-serve-sample")
}

#[tokio::test]
async fn serves_the_shipped_sample() {
    let mut child = Command::new(xds_serve())
        .arg("--manifests")
        .arg(sample())
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xds-serve");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut server = Running(child);
    let addr = BufReader::new(stdout)
        .lines()
        .map(|line| line.expect("read"))
        .find_map(|line| line.strip_prefix("listening on ").map(str::to_owned))
        .expect("a listening line")
        .parse()
        .expect("address");

    let mut client = AdsClient::open(
        addr,
        vec![
            wildcard(ADDRESS, BTreeMap::new()),
            wildcard(AUTHORIZATION, BTreeMap::new()),
        ],
    )
    .await;
    let mut view = View::default();
    // Two workloads and a service; one policy.
    client
        .collect_until(&mut view, |v| {
            v.addresses.len() == 3 && v.authorizations.len() == 1
        })
        .await;
    let checkout = view
        .workload("Kubernetes//Pod/shop/checkout-0")
        .expect("checkout");
    assert_eq!(
        checkout.tunnel_protocol, 1,
        "HBONE: the namespace is ambient"
    );
    assert_eq!(checkout.service_account, "checkout");
    assert_eq!(checkout.node, "node-a");
    assert_eq!(checkout.addresses, vec![vec![10, 42, 0, 9]]);
    let ports = &checkout.services["shop/checkout.shop.svc.cluster.local"].ports;
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
    assert_eq!(
        checkout.authorization_policies,
        vec!["shop/checkout-from-frontend"]
    );
    let frontend = view
        .workload("Kubernetes//Pod/shop/frontend-0")
        .expect("frontend");
    assert!(frontend.services.is_empty());
    assert!(frontend.authorization_policies.is_empty());
    assert!(
        view.addresses
            .contains_key("shop/checkout.shop.svc.cluster.local")
    );
    assert!(
        view.authorizations
            .contains_key("shop/checkout-from-frontend")
    );

    // What it loaded, on stderr (written before `listening on`).
    server.0.kill().expect("kill");
    server.0.wait().expect("wait");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut log).expect("stderr");
    assert!(
        log.contains("xds-serve: 2 workloads, 1 services, 1 authorizations"),
        "{log}"
    );
    assert!(!log.contains("problem in"), "{log}");
}

#[test]
fn help_describes_every_flag_and_the_sample() {
    let help = test_support::help(&xds_serve());
    for flag in [
        "--manifests <DIR>",
        "--listen <IP:PORT>",
        "--tls-cert <CHAIN.pem>",
        "--tls-key <KEY.pem>",
        "--token <TOKEN=SPIFFE-ID>",
        "--ca-dir <DIR>",
        "--node-agent <TOKEN=SPIFFE-ID@NODE>",
        "--cluster-id <ID>",
        "--domain <DOMAIN>",
        "--trust-domain <DOMAIN>",
        "--config <FILE>",
        "--help",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    for default in ["[default: Kubernetes]", "[default: cluster.local]"] {
        assert!(help.contains(default), "{default} in {help}");
    }
    assert!(
        help.contains("--manifests xds-server/examples/xds-serve-sample --listen 127.0.0.1:15010"),
        "{help}"
    );
    // The configuration file: its sections and fields, and the sample.
    for field in [
        "handshakeLimits",
        "maxInProgressPerIp",
        "clusterId",
        "rootNamespace",
        "maxResponseBytes",
        "servingNames",
        "nodeAgents",
        "--config xds-server/examples/xds-serve-config.yaml",
    ] {
        assert!(help.contains(field), "{field} in {help}");
    }
}

#[test]
fn bad_arguments_name_the_flags() {
    let id = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
    let agent = format!("agent={id}@node-a");
    let base = ["--manifests", "/nonexistent", "--listen", "127.0.0.1:0"];
    for (extra, expected) in [
        (vec!["--tls-cert", "c.pem"], "--tls-key"),
        (vec!["--tls-key", "k.pem"], "--tls-cert"),
        (
            vec![
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--ca-dir",
                "ca",
            ],
            "cannot be used with",
        ),
        (vec!["--node-agent", &agent], "--ca-dir"),
        (
            vec!["--ca-dir", "ca", "--node-agent", "agent"],
            "expected <token>=<spiffe-id>@<node>",
        ),
        (vec!["--token", "s3cret"], "expected <token>=<spiffe-id>"),
        (vec!["--token", "s3cret=ztunnel"], "invalid SPIFFE identity"),
    ] {
        let output = Command::new(xds_serve())
            .args(base)
            .args(&extra)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8(output.stderr).expect("UTF-8");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    let output = Command::new(xds_serve())
        .args(["--manifests", "/nonexistent"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(stderr.contains("--listen"), "{stderr}");
}

/// The configuration shipped next to the example.
fn sample_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/xds-serve-config.yaml")
}

/// The workload uids a wildcard client of `addr` gets for the sample.
async fn sample_uids(addr: std::net::SocketAddr) -> Vec<String> {
    let mut client = AdsClient::open(addr, vec![wildcard(ADDRESS, BTreeMap::new())]).await;
    let mut view = View::default();
    client
        .collect_until(&mut view, |v| v.addresses.len() == 3)
        .await;
    view.addresses
        .keys()
        .filter(|name| name.contains("//Pod/"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn serves_the_shipped_sample_with_the_shipped_config_and_its_ca() {
    let ca = tempfile::tempdir().expect("tempdir");
    let (_server, addr) = start(
        &sample(),
        &[
            "--config",
            sample_config().to_str().expect("path"),
            "--ca-dir",
            ca.path().to_str().expect("path"),
            "--node-agent",
            "agent=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a",
        ],
    );
    // A name only the file puts on the serving certificate.
    let agent = agent_client(ca.path(), addr, "control-plane.podless.internal");
    let checkout =
        mesh_api::Identity::parse_uri("spiffe://cluster.local/ns/shop/sa/checkout").expect("id");
    let issued = agent
        .certificate(&checkout, true, None)
        .await
        .expect("checkout runs on node-a");
    assert_eq!(issued.identity, checkout);
    // The file's cluster id names the workloads.
    let response = first_response(agent.channel(), Some("agent"))
        .await
        .expect("xDS over TLS");
    let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"podless//Pod/shop/checkout-0"), "{names:?}");
}

#[tokio::test]
async fn flags_win_over_the_config_file() {
    let config = sample_config();
    let config = config.to_str().expect("path");
    let (_server, addr) = start(&sample(), &["--config", config]);
    let uids = sample_uids(addr).await;
    assert!(
        uids.iter().all(|uid| uid.starts_with("podless//")),
        "{uids:?}"
    );
    let (_server, addr) = start(&sample(), &["--config", config, "--cluster-id", "flagged"]);
    let uids = sample_uids(addr).await;
    assert_eq!(uids.len(), 2);
    assert!(
        uids.iter().all(|uid| uid.starts_with("flagged//")),
        "{uids:?}"
    );
    // Without the file, the flag's default.
    let (_server, addr) = start(&sample(), &[]);
    let uids = sample_uids(addr).await;
    assert!(
        uids.iter().all(|uid| uid.starts_with("Kubernetes//")),
        "{uids:?}"
    );
}

#[test]
fn a_bad_config_file_is_named_with_its_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cp.yaml");
    for (text, expected) in [
        (
            "xds:\n  maxResponseByte: 1\n",
            "xds.maxResponseByte: unknown field `maxResponseByte`",
        ),
        ("mesh:\n  clusterId: [a]\n", "mesh.clusterId: "),
        (
            "ca:\n  nodeAgents: [ztunnel]\n",
            "ca.nodeAgents[0]: invalid SPIFFE identity \"ztunnel\"",
        ),
        (
            "xds:\n  maxResponseBytes: 0\n",
            "maxResponseBytes in a config) must be at least 1",
        ),
    ] {
        std::fs::write(&config, text).expect("write");
        let output = Command::new(xds_serve())
            .arg("--manifests")
            .arg(sample())
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8(output.stderr).expect("UTF-8");
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
    let output = Command::new(xds_serve())
        .arg("--manifests")
        .arg(sample())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/nonexistent/cp.yaml",
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(stderr.contains("--config /nonexistent/cp.yaml"), "{stderr}");
}

#[test]
fn the_shipped_config_has_every_field() {
    let text = std::fs::read_to_string(sample_config()).expect("read");
    let config: xds_server::ControlPlaneConfig =
        mesh_net::config::from_yaml(&text, "xds-serve-config.yaml").expect("valid");
    let defaults = xds_server::ControlPlaneConfig::default();
    assert!(config.handshake_limits.is_some());
    assert_ne!(config.mesh.cluster_id, defaults.mesh.cluster_id);
    assert_ne!(config.xds, defaults.xds);
    assert_ne!(config.xds.handshake_limits, defaults.xds.handshake_limits);
    assert_ne!(config.ca.serving_names, defaults.ca.serving_names);
    assert_ne!(config.ca.handshake_limits, defaults.ca.handshake_limits);
    assert_ne!(config.ca.node_agents, defaults.ca.node_agents);
    // Every field written out: the text names each one.
    for field in [
        "handshakeLimits:",
        "timeout:",
        "maxInProgress:",
        "maxInProgressPerIp:",
        "mesh:",
        "clusterId:",
        "domain:",
        "trustDomain:",
        "rootNamespace:",
        "network:",
        "xds:",
        "maxResponseBytes:",
        "ca:",
        "servingNames:",
        "dnsNames:",
        "ips:",
        "validity:",
        "nodeAgents:",
    ] {
        assert!(text.contains(field), "{field}");
    }
}

#[test]
fn a_ca_section_without_ca_dir_is_warned_about() {
    let config = sample_config();
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let run = |extra: &[&str]| {
        let output = Command::new(xds_serve())
            .args(["--config", config.to_str().expect("path")])
            .args(["--manifests", "/nonexistent/podless-manifests"])
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .expect("xds-serve");
        assert!(!output.status.success(), "no manifests: an error");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let warning = "the file's `ca` section is not used without --ca-dir";
    let stderr = run(&[]);
    assert!(stderr.contains(warning), "{stderr}");
    let stderr = run(&["--ca-dir", ca_dir.path().to_str().expect("path")]);
    assert!(!stderr.contains(warning), "{stderr}");
}

/// The node agent's CA client (token `agent`) to the control plane at `addr`,
/// trusting the root xds-serve wrote in `ca_dir`, dialling `server_name`.
fn agent_client(ca_dir: &Path, addr: std::net::SocketAddr, server_name: &str) -> mesh_ca::CaClient {
    let root = std::fs::read_to_string(ca_dir.join("root-cert.pem")).expect("root written");
    let roots = rustls_pki_types::pem::PemObject::pem_slice_iter(root.as_bytes())
        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
        .expect("PEM");
    mesh_ca::CaClient::builder()
        .address(addr)
        .server_name(server_name)
        .roots(roots)
        .token("agent")
        .build()
        .expect("client")
}
