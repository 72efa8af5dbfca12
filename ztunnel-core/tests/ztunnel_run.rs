//! `ztunnel-run`'s command line as a person meets it: `--help` describes
//! every flag, and a bad argument is refused naming the flag; its
//! configuration file (`--config`): the sample lists every field, flags
//! override the file, a wrong file is refused by the field's path, and the
//! sample runs against a real control plane.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{Authenticated, Authority, CaServer, StaticTokens};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use xds_server::{
    Authenticators, ControlPlane, MeshConfig, Store, StoreNodeAuthorizer, XdsServer, parse_manifest,
};
use ztunnel_core::{CertManager, Listeners, XdsClient, Ztunnel};

mod support;

use support::mesh::echo_app;

/// The `ztunnel-run` example, built by cargo with the tests.
fn ztunnel_run() -> PathBuf {
    test_support::example("ztunnel-core", "ztunnel-run")
}

#[test]
fn help_describes_every_flag() {
    let help = test_support::help(&ztunnel_run());
    for flag in [
        "--control-plane",
        "--root",
        "--token",
        "--workload-uid",
        "--node-id",
        "--cert-ttl",
        "--socks5",
        "--hbone-port",
        "--admin",
        "--metrics",
        "--readiness",
        "--worker-threads",
        "--on-demand",
        "--config",
        "--print-config",
        "--token-file",
        "--outbound",
        "--inbound-plaintext",
        "--hbone ",
        "controlPlane:",
        "handshakeLimits:",
        "sample-config.yaml",
    ] {
        assert!(help.contains(flag), "{flag} in\n{help}");
    }
    assert!(help.contains("[default: 127.0.0.1:15000]"), "{help}");
}

#[test]
fn a_bad_argument_is_refused_naming_the_flag() {
    let output = Command::new(ztunnel_run())
        .args(["--control-plane", "not-an-address"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(error.contains("--control-plane"), "{error}");
    let output = Command::new(ztunnel_run())
        .args(["--admin", "nowhere"])
        .output()
        .expect("run");
    let error = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(
        error.contains("--admin") && error.contains("neither an address"),
        "{error}"
    );
}

/// The sample configuration beside the example.
fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ztunnel-run/sample-config.yaml")
}

/// What `ztunnel-run --print-config` prints with `args`, as JSON.
fn printed(args: &[&str]) -> Value {
    let output = Command::new(ztunnel_run())
        .args(args)
        .arg("--print-config")
        .output()
        .expect("run");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// The paths of every field in `value` (`proxy.handshakeLimits.timeout`).
fn fields(value: &Value, prefix: &str, into: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, value) in map {
            let path = format!("{prefix}{key}");
            fields(value, &format!("{path}."), into);
            into.push(path);
        }
    }
}

#[test]
fn the_sample_lists_every_field_and_is_read_whole() {
    let sample = sample();
    let sample = sample.to_str().expect("UTF-8");
    let config = printed(&["--config", sample]);
    let written: Value = mesh_net::config::from_yaml(
        &std::fs::read_to_string(sample).expect("sample"),
        "sample-config.yaml",
    )
    .expect("YAML");
    let (mut all, mut listed) = (Vec::new(), Vec::new());
    fields(&config, "", &mut all);
    fields(&written, "", &mut listed);
    all.sort();
    listed.sort();
    assert_eq!(listed, all, "the sample lists every field, no more");
    // The sample shows the defaults, but for the values a binary needs.
    let defaults = printed(&[]);
    for (path, value) in [
        ("/controlPlane", Value::from("10.0.0.1:15012")),
        ("/root", Value::from("/etc/podless/root-cert.pem")),
        (
            "/proxy/workloadUid",
            Value::from("Kubernetes//Pod/default/shell"),
        ),
    ] {
        assert_eq!(config.pointer(path), Some(&value), "{path}");
    }
    let mut compared = config.clone();
    for path in ["controlPlane", "root", "tokenFile"] {
        compared[path] = defaults[path].clone();
    }
    compared["proxy"]["workloadUid"] = Value::Null;
    assert_eq!(compared, defaults, "the sample shows the defaults");
    // What it prints, --config reads back.
    let dir = tempfile::tempdir().expect("tempdir");
    let again = dir.path().join("printed.json");
    std::fs::write(&again, config.to_string()).expect("write");
    assert_eq!(
        printed(&["--config", again.to_str().expect("UTF-8")]),
        config
    );
}

#[test]
fn flags_override_the_file_and_the_rest_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ztunnel.yaml");
    std::fs::write(
        &file,
        "controlPlane: 10.0.0.1:15012
controlPlaneName: cp.example
root: /etc/root.pem
tokenFile: /etc/token
workerThreads: 2
listeners: {hbone: 127.0.0.1:16008, admin: off}
proxy:
  workloadUid: Kubernetes//Pod/default/shell
  certificateWait: 3s
  hbonePort: 16008
xds: {clusterId: east}
certificates: {renewal: {ttl: 1h}}
",
    )
    .expect("write");
    let file = file.to_str().expect("UTF-8");
    let config = printed(&["--config", file]);
    assert_eq!(config["workerThreads"], 2);
    assert_eq!(config["controlPlaneName"], "cp.example");
    assert_eq!(config["listeners"]["admin"], "off");
    assert_eq!(config["certificates"]["renewal"]["ttl"], "1h");
    assert_eq!(
        config["certificates"]["impersonate"], true,
        "the binary's default"
    );
    let config = printed(&[
        "--config",
        file,
        "--control-plane",
        "10.9.9.9:15012",
        "--control-plane-name",
        "istiod.istio-system.svc",
        "--root",
        "/other/root.pem",
        "--token",
        "secret",
        "--workload-uid",
        "Kubernetes//Pod/default/echo",
        "--node-id",
        "ztunnel~x",
        "--cert-ttl",
        "60",
        "--socks5",
        "127.0.0.1:15080",
        "--hbone-port",
        "15008",
        "--hbone",
        "0.0.0.0:15008",
        "--admin",
        "127.0.0.1:15000",
        "--metrics",
        "off",
        "--worker-threads",
        "4",
        "--on-demand",
    ]);
    for (path, value) in [
        ("/controlPlane", Value::from("10.9.9.9:15012")),
        ("/controlPlaneName", Value::from("istiod.istio-system.svc")),
        ("/root", Value::from("/other/root.pem")),
        // A token on the command line wins over the file's token file, and is
        // not printed.
        ("/tokenFile", Value::Null),
        (
            "/proxy/workloadUid",
            Value::from("Kubernetes//Pod/default/echo"),
        ),
        ("/xds/nodeId", Value::from("ztunnel~x")),
        ("/certificates/renewal/ttl", Value::from("1m")),
        ("/listeners/socks5", Value::from("127.0.0.1:15080")),
        ("/proxy/hbonePort", Value::from(15008)),
        ("/listeners/hbone", Value::from("0.0.0.0:15008")),
        ("/listeners/admin", Value::from("127.0.0.1:15000")),
        ("/listeners/metrics", Value::from("off")),
        ("/workerThreads", Value::from(4)),
        ("/xds/onDemand", Value::from(true)),
        // Not given as flags: the file's.
        ("/proxy/certificateWait", Value::from("3s")),
        ("/xds/clusterId", Value::from("east")),
        ("/listeners/readiness", Value::from("0.0.0.0:15021")),
    ] {
        assert_eq!(config.pointer(path), Some(&value), "{path} in {config:#}");
    }
    assert!(!config.to_string().contains("secret"), "no token printed");
    let config = printed(&["--config", file, "--token-file", "/run/token"]);
    assert_eq!(config["tokenFile"], "/run/token");
    // The binary's own default, `impersonate: true`, yields to the file.
    let other = dir.path().join("own.yaml");
    std::fs::write(&other, "certificates: {impersonate: false}\n").expect("write");
    let config = printed(&["--config", other.to_str().expect("UTF-8")]);
    assert_eq!(config["certificates"]["impersonate"], false);
    assert_eq!(printed(&[])["certificates"]["impersonate"], true);
}

/// `ztunnel-run` with `args`: its exit code and stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(ztunnel_run())
        .args(args)
        .output()
        .expect("run");
    (
        output.status.code(),
        String::from_utf8(output.stderr).expect("UTF-8"),
    )
}

#[test]
fn a_wrong_config_file_is_refused_by_the_fields_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, wrong) in [
        (
            "controlPlan: 10.0.0.1:15012\n",
            "controlPlan: unknown field",
        ),
        (
            "proxy:\n  handshakeLimits:\n    timout: 1s\n",
            "proxy.handshakeLimits.timout: unknown field",
        ),
        ("listeners:\n  admin: nowhere\n", "listeners.admin: "),
        ("proxy:\n  socketMark: -1\n", "proxy.socketMark: "),
        ("xds:\n  maxBackoff: soon\n", "xds.maxBackoff: "),
        (
            "certificates:\n  renewal: {ttl: forever}\n",
            "certificates.renewal.ttl: ",
        ),
        ("controlPlane: [1,\n", "ztunnel.yaml: "),
    ] {
        let file = dir.path().join("ztunnel.yaml");
        std::fs::write(&file, text).expect("write");
        let file = file.to_str().expect("UTF-8");
        let (code, error) = refused(&["--config", file, "--print-config"]);
        assert_eq!(code, Some(2), "{text}: {error}");
        assert!(
            error.contains(&format!("--config {file}: ")) && error.contains(wrong),
            "{text}: {error}"
        );
    }
    let (code, error) = refused(&["--config", "/nonexistent/ztunnel.yaml"]);
    assert_eq!(code, Some(2), "{error}");
    assert!(error.contains("/nonexistent/ztunnel.yaml"), "{error}");
}

#[test]
fn a_required_value_missing_from_both_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ztunnel.yaml");
    std::fs::write(&file, "controlPlane: 10.0.0.1:15012\nroot: /etc/root.pem\n").expect("write");
    let file = file.to_str().expect("UTF-8");
    let (code, error) = refused(&["--config", file, "--token", "t"]);
    assert_eq!(code, Some(2), "{error}");
    assert!(
        error.contains("--workload-uid") && error.contains("proxy.workloadUid"),
        "{error}"
    );
    let (code, error) = refused(&["--config", file, "--workload-uid", "u"]);
    assert_eq!(code, Some(2), "{error}");
    assert!(
        error.contains("--token") && error.contains("tokenFile"),
        "{error}"
    );
    let (code, error) = refused(&["--token", "t", "--workload-uid", "u"]);
    assert_eq!(code, Some(2), "{error}");
    assert!(
        error.contains("--control-plane") && error.contains("controlPlane"),
        "{error}"
    );
}

/// A ceiling so a broken part fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(30);
const TOKEN: &str = "node-a-token";

/// `echo` (127.0.0.2) and `shell` (127.0.0.3) in namespace `default`.
const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: default, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node-a, containers: []}
status: {podIP: 127.0.0.2, conditions: [{type: Ready, status: 'True'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shell, namespace: default, labels: {app: shell}}
spec: {serviceAccountName: shell, nodeName: node-a, containers: []}
status: {podIP: 127.0.0.3, conditions: [{type: Ready, status: 'True'}]}
";

/// Through the SOCKS5 listener at `socks5` to `target`, and back.
async fn through_socks5(socks5: SocketAddr, target: SocketAddr) -> Vec<u8> {
    let (reply, mut stream) = test_support::socks5(socks5, target).await.expect("SOCKS5");
    assert_eq!(reply, 0, "SOCKS5 success");
    stream
        .write_all(b"configured by file")
        .await
        .expect("write");
    stream.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut echoed))
        .await
        .expect("in time")
        .expect("read");
    echoed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_config_runs_against_a_control_plane() {
    // The control plane: xDS and the CA on one TLS port, in this process.
    let app = echo_app("127.0.0.2").await;
    let store = Store::new(MeshConfig::default());
    for object in parse_manifest(CLUSTER).expect("YAML").objects {
        store.apply(object).expect("valid");
    }
    let material = mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(86400))
        .expect("CA material");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", Default::default()).expect("authority"),
    );
    let agent =
        Identity::parse_uri("spiffe://cluster.local/ns/istio-system/sa/ztunnel").expect("identity");
    let tokens = StaticTokens::new().caller(
        TOKEN,
        Authenticated {
            identity: agent.clone(),
            node: Some("node-a".into()),
            pod: None,
        },
    );
    let control_plane = ControlPlane::builder()
        .xds(
            XdsServer::builder()
                .store(store.clone())
                .authenticators(Authenticators::new().with(tokens.clone()))
                .build()
                .expect("xDS"),
        )
        .ca(CaServer::builder()
            .authority(authority.clone())
            .authenticator(tokens)
            .node_agent(agent)
            .node_authorizer(StoreNodeAuthorizer::new(store.clone()))
            .build()
            .expect("CA"))
        .build()
        .expect("control plane")
        .spawn(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        .expect("spawned");
    control_plane
        .ready(PATIENCE)
        .await
        .expect("control plane ready");

    // The echo pod's proxy, in this process.
    let ca = mesh_ca::CaClient::builder()
        .address(control_plane.local_addr())
        .server_name("istiod.istio-system.svc")
        .roots(authority.roots().iter().cloned())
        .token(TOKEN)
        .build()
        .expect("CA client");
    let xds = XdsClient::builder()
        .channel(ca.channel())
        .node_id("ztunnel~127.0.0.2~echo.default~default.svc.cluster.local")
        .token(TOKEN)
        .build()
        .expect("xDS client");
    let state = xds.state();
    let xds = xds.spawn();
    let certs = CertManager::builder()
        .client(ca)
        .impersonate(true)
        .build()
        .expect("certificates");
    let bind = || async { TcpListener::bind("127.0.0.2:0").await.expect("bind") };
    let hbone = bind().await;
    let hbone_port = hbone.local_addr().expect("addr").port();
    let echo = Ztunnel::builder()
        .state(state)
        .certificates(certs.clone())
        .workload_uid("Kubernetes//Pod/default/echo")
        .hbone_port(hbone_port)
        .build()
        .expect("built")
        .spawn(Listeners {
            outbound: bind().await,
            inbound_plaintext: bind().await,
            hbone,
            socks5: None,
        })
        .expect("spawned");
    echo.ready(PATIENCE).await.expect("echo proxy ready");

    // The shell pod's proxy: ztunnel-run with the sample; flags give what
    // is this machine's (the control plane, its root, the token, free
    // loopback ports) and the workload.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, material.roots_pem()).expect("root");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let control_plane_address = control_plane.local_addr().to_string();
    let hbone_port = hbone_port.to_string();
    let sample = sample();
    let mut child = tokio::process::Command::new(ztunnel_run())
        .args(["--config", sample.to_str().expect("UTF-8")])
        .args(["--control-plane", &control_plane_address])
        .args(["--root", root.to_str().expect("UTF-8")])
        .args(["--token-file", token.to_str().expect("UTF-8")])
        .args(["--workload-uid", "Kubernetes//Pod/default/shell"])
        .args(["--hbone-port", &hbone_port])
        .args(["--outbound", "127.0.0.3:0"])
        .args(["--inbound-plaintext", "127.0.0.3:0"])
        .args(["--hbone", "127.0.0.3:0"])
        .args(["--socks5", "127.0.0.3:0"])
        .args(["--admin", "off", "--metrics", "off"])
        .args(["--readiness", "127.0.0.3:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ztunnel-run");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut listening = std::collections::HashMap::new();
    let started = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stdout.next_line().await.expect("stdout") {
            if line == "ready" {
                return true;
            }
            if let Some(rest) = line.strip_prefix("listening ") {
                let (name, address) = rest.split_once(' ').expect("listener and address");
                let address: SocketAddr = address.parse().expect("an address");
                listening.insert(name.to_owned(), address);
            }
        }
        false
    })
    .await;
    if started != Ok(true) {
        let _ = child.start_kill();
        let mut error = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = stderr.read_to_string(&mut error).await;
        }
        panic!("ztunnel-run never said ready: {error}");
    }
    for name in [
        "outbound",
        "inbound-plaintext",
        "hbone",
        "socks5",
        "readiness",
    ] {
        assert_eq!(
            listening.get(name).map(SocketAddr::ip),
            Some("127.0.0.3".parse().expect("ip")),
            "{name}: {listening:?}"
        );
    }
    assert!(!listening.contains_key("admin"), "{listening:?}");

    // Through the file-configured proxy, over HBONE to the echo pod's.
    let echoed = through_socks5(listening["socks5"], app).await;
    assert_eq!(echoed, b"configured by file");

    // SIGTERM drains it and it exits cleanly.
    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits in time")
        .expect("status");
    assert!(status.success(), "{status}");

    echo.shutdown();
    xds.shutdown();
    certs.shutdown();
    control_plane.shutdown();
}
