//! The `dns-serve` example queried with `dig` (Debian's bind9-dnsutils), as a
//! person would: from clients in two namespaces, over UDP and TCP; unknown
//! names of the cluster domain, with and without an upstream; other opcodes;
//! a configuration file (`--config`) and the flags over it; and a drain on
//! SIGTERM.

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

/// The `dns-serve` example, built by cargo with the tests.
fn dns_serve() -> PathBuf {
    test_support::example("podless-dns", "dns-serve")
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const RECORDS: &str = "
services:
- name: echo
  namespace: default
  vips: [10.96.0.10, fd00::10]
- name: echo
  namespace: other
  vips: [10.96.0.20]
- name: db
  namespace: default
  endpoints: [10.42.0.7, 10.42.0.8]
- hostname: api.example.com
  namespace: default
  vips: [240.0.0.1]
clients:
  127.0.0.1: default
  127.0.0.2: other
";

fn dig(port: u16, from: &str, args: &[&str]) -> Vec<String> {
    let output = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "-b",
            from,
            "+short",
            "+time=5",
            "+tries=1",
        ])
        .args(args)
        .output()
        .expect("dig is installed (Debian bind9-dnsutils)");
    assert!(
        output.status.success(),
        "dig {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `dns-serve` on 127.0.0.1 with `RECORDS` and `args`, and its port.
fn serve(args: &[&str]) -> (Running, u16) {
    let (child, port, _output) = serve_with_output(args);
    (child, port)
}

/// `dns-serve` on 127.0.0.1 with `RECORDS` and `args`, its port, and the
/// lines it prints after `listening on <addr>`.
fn serve_with_output(args: &[&str]) -> (Running, u16, Lines<BufReader<ChildStdout>>) {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records.yaml");
    std::fs::write(&records, RECORDS).unwrap();
    let mut child = Running(
        Command::new(dns_serve())
            .args(["--listen", "127.0.0.1:0", "--records"])
            .arg(&records)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let port: u16 = line.rsplit(':').next().unwrap().parse().unwrap();
    (child, port, lines)
}

/// dig's whole output (header, flags, sections).
fn dig_full(port: u16, args: &[&str]) -> String {
    let output = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=5", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is installed (Debian bind9-dnsutils)");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn dig_gets_mesh_answers_by_namespace() {
    let (_child, port) = serve(&[]);

    assert_eq!(
        dig(port, "127.0.0.1", &["echo.default.svc.cluster.local", "A"]),
        ["10.96.0.10"]
    );
    assert_eq!(
        dig(
            port,
            "127.0.0.1",
            &["echo.default.svc.cluster.local", "AAAA"]
        ),
        ["fd00::10"]
    );
    assert_eq!(
        dig(
            port,
            "127.0.0.1",
            &["+tcp", "echo.default.svc.cluster.local", "A"]
        ),
        ["10.96.0.10"]
    );
    // The same short name in two namespaces.
    assert_eq!(
        dig(port, "127.0.0.1", &["echo", "A"]),
        ["echo.default.svc.cluster.local.", "10.96.0.10"]
    );
    assert_eq!(
        dig(port, "127.0.0.2", &["echo", "A"]),
        ["echo.other.svc.cluster.local.", "10.96.0.20"]
    );
    assert_eq!(
        dig(
            port,
            "127.0.0.2",
            &["echo.default.other.svc.cluster.local", "A"]
        ),
        ["echo.default.svc.cluster.local.", "10.96.0.10"]
    );
    // Headless, external host, no records of the family.
    let mut db = dig(port, "127.0.0.1", &["db.default.svc.cluster.local", "A"]);
    db.sort();
    assert_eq!(db, ["10.42.0.7", "10.42.0.8"]);
    assert_eq!(
        dig(port, "127.0.0.1", &["api.example.com", "A"]),
        ["240.0.0.1"]
    );
    assert!(dig(port, "127.0.0.2", &["echo.other.svc.cluster.local", "AAAA"]).is_empty());
    // dig's full answer shows the authoritative flag and NOERROR.
    let full = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+time=5",
            "+tries=1",
            "+edns=0",
            "echo.default.svc.cluster.local",
            "A",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(full.stdout).unwrap();
    assert!(text.contains("status: NOERROR"), "{text}");
    assert!(text.contains("flags: qr aa rd ra"), "{text}");
    assert!(text.contains("OPT PSEUDOSECTION"), "EDNS answered: {text}");
}

#[test]
fn dig_gets_nxdomain_for_unknown_cluster_names_with_or_without_an_upstream() {
    // An upstream that is sent questions and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = silent.local_addr().unwrap().to_string();
    for args in [vec![], vec!["--upstream", upstream.as_str()]] {
        let (_child, port) = serve(&args);
        for transport in ["+notcp", "+tcp"] {
            let text = dig_full(port, &[transport, "nope.default.svc.cluster.local", "A"]);
            assert!(text.contains("status: NXDOMAIN"), "{args:?} {text}");
            assert!(text.contains("flags: qr aa rd ra"), "{args:?} {text}");
            assert!(
                text.contains(
                    "cluster.local.\t\t5\tIN\tSOA\tns.dns.cluster.local. hostmaster.cluster.local."
                ),
                "{args:?} {text}"
            );
            // A search suffix after an external name: NXDOMAIN, the resolver
            // then tries the name as given.
            let text = dig_full(
                port,
                &[transport, "www.example.org.default.svc.cluster.local"],
            );
            assert!(text.contains("status: NXDOMAIN"), "{args:?} {text}");
        }
        // A service asked for another type: no data, authoritatively.
        let text = dig_full(port, &["echo.default.svc.cluster.local", "TXT"]);
        assert!(text.contains("status: NOERROR"), "{text}");
        assert!(text.contains("ANSWER: 0, AUTHORITY: 1"), "{text}");
    }
}

#[test]
fn dig_update_and_notify_get_notimp() {
    let (_child, port) = serve(&[]);
    for args in [
        ["+notcp", "+opcode=update"],
        ["+tcp", "+opcode=update"],
        ["+notcp", "+opcode=notify"],
        ["+tcp", "+opcode=status"],
    ] {
        let text = dig_full(port, &[args[0], args[1], "cluster.local", "SOA"]);
        let opcode = args[1].trim_start_matches("+opcode=").to_ascii_uppercase();
        assert!(
            text.contains(&format!("opcode: {opcode}, status: NOTIMP")),
            "{args:?} {text}"
        );
    }
    // And the proxy still answers questions.
    assert_eq!(
        dig(port, "127.0.0.1", &["echo.default.svc.cluster.local", "A"]),
        ["10.96.0.10"]
    );
}

/// The fields (name, TTL, class, type, address) of the answer to an A
/// question for `name`, which must be one record.
fn answer_fields(port: u16, name: &str) -> Vec<String> {
    let answer = dig_full(port, &["+noall", "+answer", name, "A"]);
    let lines: Vec<&str> = answer.lines().collect();
    assert_eq!(lines.len(), 1, "{answer}");
    lines[0].split_whitespace().map(str::to_owned).collect()
}

/// `--config`: the file's domain and TTL are served, and `--domain` given
/// on the command line wins over the file's (its TTL still holds).
#[test]
fn dig_gets_the_configuration_files_domain_and_ttl_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dns.yaml");
    std::fs::write(
        &config,
        "domain: mesh.test\nttl: 7s\nupstream:\n  maxInFlight: 4\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let (_child, port) = serve(&["--config", config]);
    assert_eq!(
        dig(port, "127.0.0.1", &["echo.default.svc.mesh.test", "A"]),
        ["10.96.0.10"]
    );
    assert_eq!(
        dig(port, "127.0.0.2", &["echo", "A"]),
        ["echo.other.svc.mesh.test.", "10.96.0.20"]
    );
    assert_eq!(
        answer_fields(port, "echo.default.svc.mesh.test"),
        ["echo.default.svc.mesh.test.", "7", "IN", "A", "10.96.0.10"]
    );
    // cluster.local is not the domain now: forwarded, with no upstream.
    let text = dig_full(port, &["echo.default.svc.cluster.local", "A"]);
    assert!(text.contains("status: SERVFAIL"), "{text}");

    let (_child, port) = serve(&["--config", config, "--domain", "cluster.local"]);
    assert_eq!(
        answer_fields(port, "echo.default.svc.cluster.local"),
        [
            "echo.default.svc.cluster.local.",
            "7",
            "IN",
            "A",
            "10.96.0.10"
        ]
    );
    let text = dig_full(port, &["nope.default.svc.cluster.local", "A"]);
    assert!(text.contains("status: NXDOMAIN"), "{text}");
}

/// SIGTERM drains `dns-serve`: it says so, prints how the drain ended, and
/// exits cleanly.
#[test]
fn dns_serve_drains_on_sigterm() {
    let (mut child, port, lines) = serve_with_output(&["--drain-seconds", "30"]);
    assert_eq!(
        dig(port, "127.0.0.1", &["echo.default.svc.cluster.local", "A"]),
        ["10.96.0.10"]
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM");
    let output: Vec<String> = lines.map(Result::unwrap).collect();
    assert_eq!(
        output,
        [
            "terminated: draining for up to 30s",
            "drained: all work finished"
        ]
    );
    assert!(child.0.wait().unwrap().success());
}
