//! The `dns-serve` example's command line: it answers from the records file
//! shipped next to it, with or without the configuration file shipped there
//! too, `--help` describes every flag, and bad flags and configuration files
//! are named.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// The `dns-serve` example, built by cargo with the tests.
fn dns_serve() -> PathBuf {
    test_support::example("podless-dns", "dns-serve")
}

/// The records file shipped next to the example, which `--help` and the
/// README tell users to run it on.
fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dns-serve-sample/records.yaml")
}

/// The configuration file shipped next to the example (`--config`).
fn sample_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dns-serve-sample/dns.yaml")
}

/// `dns-serve` on 127.0.0.1 with `args`, and the address it serves.
fn start(args: &[&std::ffi::OsStr]) -> (Running, SocketAddr) {
    let mut child = Running(
        Command::new(dns_serve())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let server: SocketAddr = line
        .strip_prefix("listening on ")
        .expect("a listening line")
        .parse()
        .unwrap();
    (child, server)
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asks `server` for `name` from a socket on `from`: the response code and
/// the A and AAAA addresses answered, sorted.
fn ask(
    server: SocketAddr,
    from: &str,
    name: &str,
    record_type: RecordType,
) -> (ResponseCode, Vec<IpAddr>) {
    let socket = UdpSocket::bind((from, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut question = Message::query();
    question.metadata.recursion_desired = true;
    question.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    socket.send_to(&question.to_vec().unwrap(), server).unwrap();
    let mut buffer = vec![0u8; 65535];
    let (len, _) = socket.recv_from(&mut buffer).expect("an answer");
    let response = Message::from_vec(&buffer[..len]).unwrap();
    let mut addresses: Vec<IpAddr> = response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect();
    addresses.sort();
    (response.metadata.response_code, addresses)
}

fn ips(ips: &[&str]) -> Vec<IpAddr> {
    ips.iter().map(|ip| ip.parse().unwrap()).collect()
}

#[test]
fn answers_from_the_shipped_sample() {
    let mut child = Running(
        Command::new(dns_serve())
            .args(["--listen", "127.0.0.1:0", "--records"])
            .arg(sample())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let server: SocketAddr = line
        .strip_prefix("listening on ")
        .expect("a listening line")
        .parse()
        .unwrap();

    let noerror = ResponseCode::NoError;
    assert_eq!(
        ask(
            server,
            "127.0.0.1",
            "echo.default.svc.cluster.local",
            RecordType::A
        ),
        (noerror, ips(&["10.96.0.10"]))
    );
    assert_eq!(
        ask(
            server,
            "127.0.0.1",
            "echo.default.svc.cluster.local",
            RecordType::AAAA
        ),
        (noerror, ips(&["fd00::10"]))
    );
    // The short name, by the client's namespace (`clients:`).
    assert_eq!(
        ask(server, "127.0.0.1", "echo", RecordType::A),
        (noerror, ips(&["10.96.0.10"]))
    );
    assert_eq!(
        ask(server, "127.0.0.2", "echo", RecordType::A),
        (noerror, ips(&["10.96.0.20"]))
    );
    // Headless: the endpoints.
    assert_eq!(
        ask(
            server,
            "127.0.0.1",
            "db.default.svc.cluster.local",
            RecordType::A
        ),
        (noerror, ips(&["10.42.0.7", "10.42.0.8"]))
    );
    assert_eq!(
        ask(server, "127.0.0.1", "api.example.com", RecordType::A),
        (noerror, ips(&["240.0.0.1"]))
    );
    // Not in the records but in the cluster domain; outside it with no upstream.
    assert_eq!(
        ask(
            server,
            "127.0.0.1",
            "nope.default.svc.cluster.local",
            RecordType::A
        ),
        (ResponseCode::NXDomain, vec![])
    );
    assert_eq!(
        ask(server, "127.0.0.1", "example.org", RecordType::A),
        (ResponseCode::ServFail, vec![])
    );
}

/// With the shipped configuration file (every field, the defaults but for
/// an upstream): the same answers for the cluster domain.
#[test]
fn answers_from_the_shipped_samples_with_the_configuration_file() {
    let records = sample();
    let config = sample_config();
    let (_child, server) = start(&[
        "--records".as_ref(),
        records.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    let noerror = ResponseCode::NoError;
    assert_eq!(
        ask(
            server,
            "127.0.0.1",
            "echo.default.svc.cluster.local",
            RecordType::A
        ),
        (noerror, ips(&["10.96.0.10"]))
    );
    assert_eq!(
        ask(server, "127.0.0.2", "echo", RecordType::A),
        (noerror, ips(&["10.96.0.20"]))
    );
    assert_eq!(
        ask(
            server,
            "127.0.0.1",
            "nope.default.svc.cluster.local",
            RecordType::A
        ),
        (ResponseCode::NXDomain, vec![])
    );
}

/// A configuration file that cannot be read, or that names a field wrongly
/// or gives it a bad value, stops the example at start with the file and the
/// field on stderr.
#[test]
fn bad_configuration_files_are_named_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let records = sample();
    for (text, expected) in [
        (None, "missing.yaml: "),
        (Some("domian: cluster.local\n"), "unknown field `domian`"),
        (Some("upstream:\n  timeout: soon\n"), "upstream.timeout: "),
        (
            Some("upstream:\n  servers: [10.0.0.10]\n"),
            "upstream.servers[0]: ",
        ),
        // Read, but refused by the builder.
        (
            Some("upstream:\n  servers: [127.0.0.1:53]\n  attempts: 0\n"),
            "upstream attempts must be at least 1",
        ),
        (Some("ttl: 1500ms\n"), "ttl 1.5s: "),
    ] {
        let path = dir.path().join(if text.is_some() {
            "dns.yaml"
        } else {
            "missing.yaml"
        });
        if let Some(text) = text {
            std::fs::write(&path, text).unwrap();
        }
        let output = Command::new(dns_serve())
            .args(["--listen", "127.0.0.1:0", "--records"])
            .arg(&records)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{text:?}");
        assert!(output.stdout.is_empty(), "{text:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.starts_with("dns-serve: "), "{text:?}: {stderr}");
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
        if text.is_some_and(|text| !text.contains("1500ms") && !text.contains("attempts")) {
            assert!(stderr.contains("dns.yaml: "), "{text:?}: {stderr}");
        }
    }
}

#[test]
fn help_describes_every_flag_and_the_sample() {
    let help = test_support::help(&dns_serve());
    for flag in [
        "--listen <IP:PORT>",
        "--records <FILE.yaml>",
        "--config <FILE.yaml>",
        "--upstream <IP:PORT>",
        "--domain <DOMAIN>",
        "--max-in-flight <N>",
        "--drain-seconds <SECONDS>",
        "--help",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    for default in [
        "[default: cluster.local]",
        &format!("[default: {}]", dns_proxy::DEFAULT_MAX_IN_FLIGHT),
        "[default: 5]",
    ] {
        assert!(help.contains(default), "{default} in {help}");
    }
    assert!(
        help.contains("--records dns-proxy/examples/dns-serve-sample/records.yaml"),
        "{help}"
    );
    assert!(
        help.contains("--config dns-proxy/examples/dns-serve-sample/dns.yaml"),
        "{help}"
    );
    // The configuration file's format: every field.
    for field in [
        "domain:",
        "ttl:",
        "upstream:",
        "servers:",
        "timeout:",
        "attempts:",
        "cacheSize:",
        "negativeMinTtl:",
        "negativeMaxTtl:",
        "maxInFlight:",
        "handshakeLimits:",
        "maxInProgress:",
        "maxInProgressPerIp:",
    ] {
        assert!(help.contains(field), "{field} in {help}");
    }
}

#[test]
fn bad_arguments_name_the_flag() {
    let records = sample();
    let records = records.to_str().unwrap();
    for (args, expected) in [
        (vec!["--listen", "127.0.0.1:0"], "--records"),
        (vec!["--records", records], "--listen"),
        (
            vec!["--listen", "127.0.0.1", "--records", records],
            "invalid value '127.0.0.1' for '--listen",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--records",
                records,
                "--upstream",
                "10.0.0.1",
            ],
            "--upstream",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--records",
                records,
                "--max-in-flight",
                "0",
            ],
            "must be at least 1",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--records",
                records,
                "--drain-seconds",
                "-1",
            ],
            "value is negative",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--records",
                records,
                "--drain-seconds",
                "soon",
            ],
            "--drain-seconds",
        ),
    ] {
        let output = Command::new(dns_serve()).args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
