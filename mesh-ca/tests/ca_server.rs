//! The `ca-server` example, run as a user runs it: it prints where the root is
//! once ready, and a client with one of its tokens gets a certificate.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use mesh_ca::CaClient;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The `ca-server` example, built by cargo with the tests.
fn ca_server() -> PathBuf {
    test_support::example("mesh-ca", "ca-server")
}

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serves_certificates_to_token_holders() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Running(
        Command::new(ca_server())
            .args(["--dir".as_ref(), dir.path().as_os_str()])
            .args(["--listen", "127.0.0.1:0"])
            .args([
                "--node-agent",
                "node-token=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a",
            ])
            .args([
                "--workload",
                "node-a=spiffe://cluster.local/ns/default/sa/echo",
            ])
            .args([
                "--token",
                "t0ken=spiffe://cluster.local/ns/default/sa/shell",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let root_line = lines.next().unwrap().unwrap();
    let root_path = root_line.strip_prefix("root certificate: ").unwrap();
    assert_eq!(Path::new(root_path), dir.path().join("root-cert.pem"));
    let address = lines.next().unwrap().unwrap();
    let address = address
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();

    let roots: Vec<_> = CertificateDer::pem_file_iter(root_path)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let client = CaClient::builder()
        .address(address)
        .roots(roots.clone())
        .token("t0ken")
        .build()
        .unwrap();
    let shell = "spiffe://cluster.local/ns/default/sa/shell"
        .parse()
        .unwrap();
    let certificate = client.certificate(&shell, false, None).await.unwrap();
    assert_eq!(certificate.identity, shell);

    // The node agent gets the certificate of a workload on its node, and only that.
    let node_agent = CaClient::builder()
        .address(address)
        .roots(roots)
        .token("node-token")
        .build()
        .unwrap();
    let echo = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    assert_eq!(
        node_agent
            .certificate(&echo, true, None)
            .await
            .unwrap()
            .identity,
        echo
    );
    assert!(node_agent.certificate(&shell, true, None).await.is_err());
}

#[test]
fn bad_arguments_are_explained() {
    let output = Command::new(ca_server())
        .args([
            "--dir",
            "/nonexistent",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "no-equals-sign",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("expected <token>=<spiffe-id>"), "{stderr}");
}

#[test]
fn help_describes_every_flag() {
    let help = test_support::help(&ca_server());
    for flag in [
        "--dir <DIR>",
        "--listen <IP:PORT>",
        "--token <TOKEN=SPIFFE-ID>",
        "--node-agent <TOKEN=SPIFFE-ID@NODE>",
        "--workload <NODE=SPIFFE-ID>",
        "--trust-domain <DOMAIN>",
        "--dns-name <NAME>",
        "--ip <IP>",
        "--config <FILE>",
        "--help",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    assert!(help.contains("[default: cluster.local]"), "{help}");
    assert!(help.contains("Repeatable"), "{help}");
    // The configuration file: its fields and the sample.
    for field in [
        "servingNames",
        "dnsNames",
        "validity",
        "handshakeLimits",
        "maxInProgressPerIp",
        "nodeAgents",
        "--config mesh-ca/examples/ca-server-config.yaml",
    ] {
        assert!(help.contains(field), "{field} in {help}");
    }
}

#[test]
fn missing_and_malformed_flags_are_named() {
    let id = "spiffe://cluster.local/ns/default/sa/shell";
    let token = format!("t={id}");
    for (args, expected) in [
        // Neither a token nor a node agent: nobody could get a certificate.
        (
            vec!["--dir", "/nonexistent", "--listen", "127.0.0.1:0"],
            "--token",
        ),
        (vec!["--listen", "127.0.0.1:0", "--token", &token], "--dir"),
        (
            vec![
                "--dir",
                "/nonexistent",
                "--listen",
                "localhost",
                "--token",
                &token,
            ],
            "--listen",
        ),
        (
            vec![
                "--dir",
                "/nonexistent",
                "--listen",
                "127.0.0.1:0",
                "--node-agent",
                &token,
            ],
            "expected <token>=<spiffe-id>@<node>",
        ),
        (
            vec![
                "--dir",
                "/nonexistent",
                "--listen",
                "127.0.0.1:0",
                "--token",
                "t=shell",
            ],
            "invalid SPIFFE identity",
        ),
        (
            vec![
                "--dir",
                "/nonexistent",
                "--listen",
                "127.0.0.1:0",
                "--token",
                &token,
                "--ip",
                "x",
            ],
            "--ip",
        ),
    ] {
        let output = Command::new(ca_server()).args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// The configuration file shipped next to the example.
fn sample_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ca-server-config.yaml")
}

/// Starts the example with `args`; returns it, its root and its address.
fn start(
    args: &[&std::ffi::OsStr],
) -> (Running, Vec<CertificateDer<'static>>, std::net::SocketAddr) {
    let mut server = Running(
        Command::new(ca_server())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let root_line = lines.next().unwrap().unwrap();
    let root_path = root_line.strip_prefix("root certificate: ").unwrap();
    let roots = CertificateDer::pem_file_iter(root_path)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let address = lines.next().unwrap().unwrap();
    let address = address
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    (server, roots, address)
}

#[tokio::test]
async fn serves_with_the_shipped_config_and_flags_added_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, roots, address) = start(&[
        "--dir".as_ref(),
        dir.path().as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--config".as_ref(),
        sample_config().as_os_str(),
        "--dns-name".as_ref(),
        "from-the-flag.test".as_ref(),
        "--token".as_ref(),
        "t0ken=spiffe://cluster.local/ns/default/sa/shell".as_ref(),
        "--node-agent".as_ref(),
        "agent=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a".as_ref(),
        "--workload".as_ref(),
        "node-a=spiffe://cluster.local/ns/default/sa/echo".as_ref(),
    ]);
    let client = |server_name: &str, token: &str| {
        CaClient::builder()
            .address(address)
            .server_name(server_name)
            .roots(roots.clone())
            .token(token)
            .build()
            .unwrap()
    };
    let shell = "spiffe://cluster.local/ns/default/sa/shell"
        .parse()
        .unwrap();
    // A name only the file gives, and one the flag adds to it.
    for name in ["ca.podless.internal", "from-the-flag.test"] {
        let certificate = client(name, "t0ken")
            .certificate(&shell, false, None)
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(certificate.identity, shell);
    }
    client("not-configured.test", "t0ken")
        .certificate(&shell, false, None)
        .await
        .expect_err("a name nobody configured");
    let echo = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    assert_eq!(
        client("localhost", "agent")
            .certificate(&echo, true, None)
            .await
            .unwrap()
            .identity,
        echo
    );
}

#[test]
fn a_bad_config_file_is_named_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ca.yaml");
    for (text, expected) in [
        (
            "servingNames:\n  dnsName: [a]\n",
            "servingNames.dnsName: unknown field `dnsName`",
        ),
        (
            "handshakeLimits:\n  timeout: soon\n",
            "handshakeLimits.timeout: ",
        ),
        (
            "nodeAgents: [ztunnel]\n",
            "nodeAgents[0]: invalid SPIFFE identity \"ztunnel\"",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let output = Command::new(ca_server())
            .args(["--dir".as_ref(), dir.path().join("ca").as_os_str()])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--token", "t=spiffe://cluster.local/ns/default/sa/shell"])
            .args(["--config".as_ref(), config.as_os_str()])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{text}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.contains(&format!("{}: {expected}", config.display())),
            "{text}: {stderr}"
        );
    }
    let output = Command::new(ca_server())
        .args(["--dir".as_ref(), dir.path().join("ca").as_os_str()])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--token", "t=spiffe://cluster.local/ns/default/sa/shell"])
        .args(["--config", "/nonexistent/ca.yaml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--config /nonexistent/ca.yaml"), "{stderr}");
}

#[test]
fn the_shipped_config_has_every_field() {
    let text = std::fs::read_to_string(sample_config()).unwrap();
    let config: mesh_ca::CaServerConfig =
        mesh_net::config::from_yaml(&text, "ca-server-config.yaml").unwrap();
    let defaults = mesh_ca::CaServerConfig::default();
    assert_ne!(
        config.serving_names.dns_names,
        defaults.serving_names.dns_names
    );
    assert_ne!(config.serving_names.ips, defaults.serving_names.ips);
    assert_ne!(
        config.serving_names.validity,
        defaults.serving_names.validity
    );
    assert_ne!(
        config.handshake_limits.timeout,
        defaults.handshake_limits.timeout
    );
    assert_ne!(
        config.handshake_limits.max_in_progress,
        defaults.handshake_limits.max_in_progress
    );
    assert_ne!(
        config.handshake_limits.max_in_progress_per_ip,
        defaults.handshake_limits.max_in_progress_per_ip
    );
    assert_ne!(config.node_agents, defaults.node_agents);
}
