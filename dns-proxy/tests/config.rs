//! The proxy's configuration file (`DnsConfig`, read with
//! `mesh_net::config::from_yaml`): a file with every field builds a proxy
//! that serves with those values; misspelt fields and bad values are refused,
//! naming the field; the defaults are the builder's; the shipped sample and
//! the README list every field; and no text panics the reader.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dns_proxy::{
    BuildError, DEFAULT_MAX_IN_FLIGHT, DnsConfig, DnsProxy, DnsProxyBuilder, HandshakeLimits,
    InMemoryMeshDns, ServiceRecord, UpstreamConfig,
};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use mesh_net::config::from_yaml;
use proptest::prelude::*;
use tokio::net::UdpSocket;

mod support;
use support::{addresses, ask_udp, bind_pair, question, tcp_exchange};

const WAIT: Duration = Duration::from_secs(10);

/// Every field, none at its default; `UPSTREAM` is replaced by the test's
/// upstream. The domain is given as a user might (upper case, final dot).
const EVERY_FIELD: &str = "
domain: Mesh.Test.
ttl: 7s
upstream:
  servers: [UPSTREAM]
  timeout: 1s
  attempts: 3
  cacheSize: 100
  negativeMinTtl: 2s
  negativeMaxTtl: 1m
  maxInFlight: 8
handshakeLimits:
  timeout: 3s
  maxInProgress: 16
  maxInProgressPerIp: 1
";

/// An upstream that answers every A question with 192.0.2.1, counting them.
async fn start_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let questions = Arc::new(AtomicUsize::new(0));
    let seen = questions.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
                return;
            };
            let Ok(request) = Message::from_vec(&buffer[..len]) else {
                continue;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            let mut response = Message::response(request.metadata.id, request.metadata.op_code);
            response.metadata.recursion_desired = request.metadata.recursion_desired;
            response.metadata.recursion_available = true;
            for query in request.queries {
                if query.query_type() == RecordType::A {
                    response.answers.push(Record::from_rdata(
                        query.name().clone(),
                        300,
                        RData::A(A::new(192, 0, 2, 1)),
                    ));
                }
                response.queries.push(query);
            }
            let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
        }
    });
    (address, questions)
}

fn mesh(domain: &str) -> Arc<InMemoryMeshDns> {
    let mesh = InMemoryMeshDns::new();
    mesh.upsert_service(ServiceRecord {
        namespace: "default".into(),
        hostname: format!("echo.default.svc.{domain}"),
        vips: vec!["10.96.0.10".parse().unwrap()],
        endpoints: Vec::new(),
        canonical: false,
    });
    mesh.set_client_namespace("127.0.0.1".parse().unwrap(), Some("default".into()));
    Arc::new(mesh)
}

/// The TTLs of an answer's records, then of its authority records.
fn ttls(message: &Message) -> (Vec<u32>, Vec<u32>) {
    let ttl = |records: &[Record]| records.iter().map(|record| record.ttl).collect();
    (ttl(&message.answers), ttl(&message.authorities))
}

#[tokio::test]
async fn a_file_with_every_field_builds_a_proxy_that_serves_with_it() {
    let (upstream, upstream_questions) = start_upstream().await;
    let text = EVERY_FIELD.replace("UPSTREAM", &upstream.to_string());
    let config: DnsConfig = from_yaml(&text, "dns.yaml").unwrap();

    // Every field read.
    assert_eq!(config.domain, "Mesh.Test.");
    assert_eq!(config.ttl, Duration::from_secs(7));
    assert_eq!(
        config.upstream,
        UpstreamConfig {
            servers: vec![upstream],
            timeout: Duration::from_secs(1),
            attempts: 3,
            cache_size: 100,
            negative_min_ttl: Duration::from_secs(2),
            negative_max_ttl: Duration::from_secs(60),
            max_in_flight: 8,
        }
    );
    assert_eq!(
        config.handshake_limits,
        HandshakeLimits::default()
            .with_timeout(Duration::from_secs(3))
            .with_max_in_progress(16)
            .with_max_in_progress_per_ip(1)
    );
    // Written back (JSON, which the reader takes too) and read again: the same.
    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains(r#""negativeMaxTtl":"1m""#), "{json}");
    assert_eq!(from_yaml::<DnsConfig>(&json, "dns.json").unwrap(), config);

    // Into a builder, both ways, and built.
    let proxy = DnsProxy::builder()
        .config(config.clone())
        .mesh(mesh("mesh.test"))
        .build()
        .unwrap();
    let mut served = config.clone();
    served.domain = "mesh.test".into();
    assert_eq!(proxy.config(), &served);
    let same = DnsProxyBuilder::from(config)
        .mesh(mesh("mesh.test"))
        .build()
        .unwrap();
    assert_eq!(same.config(), &served);
    let (udp, tcp) = bind_pair().await;
    let handle = proxy.spawn(udp, tcp).unwrap();
    let to = handle.udp_addr();

    // The domain and the TTL: mesh answers, short names, the authority.
    let answer = ask_udp(to, "echo.default.svc.mesh.test", RecordType::A, WAIT).await;
    assert_eq!(addresses(&answer), ["10.96.0.10"]);
    assert_eq!(ttls(&answer), (vec![7], vec![]));
    assert!(answer.metadata.authoritative);
    let short = ask_udp(to, "echo", RecordType::A, WAIT).await;
    assert_eq!(addresses(&short), ["10.96.0.10"]);
    let missing = ask_udp(to, "nope.default.svc.mesh.test", RecordType::A, WAIT).await;
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(missing.authorities[0].name.to_ascii(), "mesh.test.");
    assert_eq!(ttls(&missing), (vec![], vec![5]));
    assert_eq!(upstream_questions.load(Ordering::SeqCst), 0);

    // The upstream: names outside the domain (cluster.local is not it now)
    // are forwarded there.
    for name in ["www.example.org", "echo.default.svc.cluster.local"] {
        let forwarded = ask_udp(to, name, RecordType::A, WAIT).await;
        assert_eq!(addresses(&forwarded), ["192.0.2.1"], "{name}");
        assert!(!forwarded.metadata.authoritative);
    }
    assert_eq!(upstream_questions.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().forwarded, 2);

    // The handshake limits: one client in handshake per address (a second
    // closes the first at once), and 3 s for its first question, not 10.
    let started = Instant::now();
    let first = tokio::net::TcpStream::connect(handle.tcp_addr()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = tokio::net::TcpStream::connect(handle.tcp_addr()).await;
    test_support::ended(first, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    test_support::ended(second, Duration::from_secs(8)).await;
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(2500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    // A client that asks is served over TCP.
    let over_tcp = tcp_exchange(
        handle.tcp_addr(),
        &question("echo.default.svc.mesh.test.", RecordType::A, false),
    )
    .await;
    assert_eq!(addresses(&over_tcp), ["10.96.0.10"]);

    handle.shutdown();
    handle.join().await.unwrap();
}

#[test]
fn more_in_flight_than_descriptors_could_hold_is_refused() {
    let config: DnsConfig = from_yaml(
        "upstream:\n  servers: [127.0.0.1:53]\n  maxInFlight: 18446744073709551615\n",
        "dns.yaml",
    )
    .expect("read");
    let built = DnsProxy::builder()
        .config(config)
        .mesh(mesh("cluster.local"))
        .build();
    assert!(
        matches!(&built, Err(BuildError::Upstream(problem)) if problem.contains("max_in_flight")),
        "{:?}",
        built.err()
    );
}

#[test]
fn misspelt_fields_and_bad_values_are_refused_naming_the_field() {
    let refused = |text: &str| {
        from_yaml::<DnsConfig>(text, "dns.yaml")
            .expect_err(text)
            .to_string()
    };
    for (text, field) in [
        ("domian: mesh.test\n", "domian"),
        ("tll: 30s\n", "tll"),
        ("upstream:\n  maxInFlite: 3\n", "maxInFlite"),
        ("upstream:\n  max_in_flight: 3\n", "max_in_flight"),
        ("handshakeLimits:\n  perIp: 3\n", "perIp"),
    ] {
        let error = refused(text);
        assert!(error.starts_with("dns.yaml: "), "{text}: {error}");
        assert!(error.contains("unknown field"), "{text}: {error}");
        assert!(error.contains(field), "{text}: {error}");
    }
    for (text, path) in [
        ("ttl: soon\n", "ttl"),
        ("ttl: 30\n", "ttl"),
        ("domain: [a, b]\n", "domain"),
        ("upstream: 10.0.0.10:53\n", "upstream"),
        ("upstream:\n  servers: [10.0.0.10]\n", "upstream.servers[0]"),
        ("upstream:\n  timeout: -1s\n", "upstream.timeout"),
        ("upstream:\n  attempts: two\n", "upstream.attempts"),
        ("upstream:\n  maxInFlight: -1\n", "upstream.maxInFlight"),
        (
            "upstream:\n  negativeMaxTtl: 5 fortnights\n",
            "upstream.negativeMaxTtl",
        ),
        (
            "handshakeLimits:\n  timeout: soon\n",
            "handshakeLimits.timeout",
        ),
        (
            "handshakeLimits:\n  maxInProgressPerIp: many\n",
            "handshakeLimits.maxInProgressPerIp",
        ),
    ] {
        let error = refused(text);
        assert!(
            error.starts_with(&format!("dns.yaml: {path}: ")),
            "{text}: {error}"
        );
    }
    // Read, but refused by build(), with the builder's errors.
    let build = |text: &str| {
        let config: DnsConfig = from_yaml(text, "dns.yaml").unwrap();
        DnsProxy::builder()
            .config(config)
            .mesh(mesh("cluster.local"))
            .build()
            .expect_err(text)
    };
    let servers = "upstream:\n  servers: [127.0.0.1:53]\n";
    for (text, expected) in [
        (format!("{servers}  attempts: 0\n"), "attempts"),
        (format!("{servers}  maxInFlight: 0\n"), "max_in_flight"),
        (format!("{servers}  timeout: 0s\n"), "timeout"),
        (format!("{servers}  timeout: 20s\n"), "exceeds"),
    ] {
        let error = build(&text);
        assert!(
            matches!(error, BuildError::Upstream(_)),
            "{text}: {error:?}"
        );
        assert!(error.to_string().contains(expected), "{text}: {error}");
    }
    assert!(matches!(build("domain: ''\n"), BuildError::Domain { .. }));
    assert!(matches!(
        build("domain: 'a..b'\n"),
        BuildError::Domain { .. }
    ));
    for ttl in ["1500ms", "200000000 years"] {
        let error = build(&format!("ttl: {ttl}\n"));
        assert!(matches!(error, BuildError::Ttl { .. }), "{ttl}: {error:?}");
        assert!(error.to_string().starts_with("ttl "), "{error}");
    }
}

#[tokio::test]
async fn the_defaults_are_the_builders() {
    let defaults = DnsConfig::default();
    assert_eq!(defaults.domain, "cluster.local");
    assert_eq!(defaults.ttl, Duration::from_secs(30));
    assert_eq!(defaults.upstream, UpstreamConfig::default());
    assert!(defaults.upstream.servers.is_empty());
    assert_eq!(defaults.upstream.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
    assert_eq!(
        defaults.handshake_limits,
        HandshakeLimits::default()
            .with_timeout(Duration::from_secs(10))
            .with_max_in_progress(256)
            .with_max_in_progress_per_ip(32)
    );
    // An empty file, and a builder given no configuration, are the defaults.
    assert_eq!(from_yaml::<DnsConfig>("", "dns.yaml").unwrap(), defaults);
    let plain = DnsProxy::builder()
        .mesh(mesh("cluster.local"))
        .build()
        .unwrap();
    assert_eq!(plain.config(), &defaults);
    let configured = DnsProxy::builder()
        .config(DnsConfig::default())
        .mesh(mesh("cluster.local"))
        .build()
        .unwrap();
    assert_eq!(configured.config(), &defaults);

    // And both serve alike: the TTL, the domain, no upstream.
    for proxy in [plain, configured] {
        let (udp, tcp) = bind_pair().await;
        let handle = proxy.spawn(udp, tcp).unwrap();
        let to = handle.udp_addr();
        let answer = ask_udp(to, "echo.default.svc.cluster.local", RecordType::A, WAIT).await;
        assert_eq!(addresses(&answer), ["10.96.0.10"]);
        assert_eq!(ttls(&answer), (vec![30], vec![]));
        let missing = ask_udp(to, "nope.default.svc.cluster.local", RecordType::A, WAIT).await;
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(missing.authorities[0].name.to_ascii(), "cluster.local.");
        let outside = ask_udp(to, "www.example.org", RecordType::A, WAIT).await;
        assert_eq!(outside.metadata.response_code, ResponseCode::ServFail);
        handle.shutdown();
        handle.join().await.unwrap();
    }

    // Setters after `config` change single fields; `config` replaces all.
    let proxy = DnsProxy::builder()
        .ttl(9)
        .config(DnsConfig::default())
        .domain("mesh.test")
        .mesh(mesh("mesh.test"))
        .build()
        .unwrap();
    assert_eq!(proxy.config().ttl, Duration::from_secs(30));
    assert_eq!(proxy.config().domain, "mesh.test");
}

/// The names of every field of `value` (a serialized `DnsConfig`), nested
/// ones too.
fn field_names(value: &serde_json::Value, names: &mut Vec<String>) {
    if let serde_json::Value::Object(fields) = value {
        for (name, value) in fields {
            names.push(name.clone());
            field_names(value, names);
        }
    }
}

/// The shipped sample (for `dns-serve --config`) and the README's sample
/// are read without error and write every field.
#[test]
fn the_samples_list_every_field() {
    let mut names = Vec::new();
    field_names(
        &serde_json::to_value(DnsConfig::default()).unwrap(),
        &mut names,
    );
    assert_eq!(names.len(), 14, "{names:?}"); // `timeout` twice

    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(dir.join("examples/dns-serve-sample/dns.yaml")).unwrap();
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let readme_sample = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|section| section.split("```yaml\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("a yaml block in the README's Configuration section");
    for (source, text) in [("dns.yaml", sample.as_str()), ("README.md", readme_sample)] {
        let config: DnsConfig = from_yaml(text, source).unwrap();
        assert_eq!(config.upstream.servers.len(), 1, "{source}");
        let mut defaults = config.clone();
        defaults.upstream.servers.clear();
        assert_eq!(defaults, DnsConfig::default(), "{source}: the defaults");
        for name in &names {
            assert!(text.contains(&format!("{name}:")), "{source}: {name}");
        }
    }
}

/// YAML-looking text from the configuration's field names and odd values.
fn yaml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("domain"),
        Just("ttl"),
        Just("upstream"),
        Just("servers"),
        Just("timeout"),
        Just("attempts"),
        Just("cacheSize"),
        Just("negativeMinTtl"),
        Just("negativeMaxTtl"),
        Just("maxInFlight"),
        Just("handshakeLimits"),
        Just("maxInProgress"),
        Just("maxInProgressPerIp"),
    ]
    .prop_map(str::to_owned)
    .boxed();
    let key = prop_oneof![4 => key, 1 => "[a-zA-Z_]{1,8}"];
    let value = prop_oneof![
        Just(String::new()),
        Just("0".to_owned()),
        Just("1".to_owned()),
        Just("-1".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("1e400".to_owned()),
        Just("30s".to_owned()),
        Just("0s".to_owned()),
        Just("999999999999999999999s".to_owned()),
        Just("584942417355 years".to_owned()),
        Just("1500ms".to_owned()),
        Just("[127.0.0.1:53]".to_owned()),
        Just("[127.0.0.1:53, '[::1]:53']".to_owned()),
        Just("[10.0.0.1]".to_owned()),
        Just("{}".to_owned()),
        Just("[]".to_owned()),
        Just("~".to_owned()),
        Just("'.'".to_owned()),
        Just("&a [*a]".to_owned()),
        Just("!!binary aGk=".to_owned()),
        "[ -~]{0,16}",
    ];
    let line = (
        prop_oneof![Just(""), Just("  "), Just("    "), Just("- ")],
        key,
        value,
    )
        .prop_map(|(indent, key, value)| format!("{indent}{key}: {value}"));
    prop::collection::vec(line, 0..10).prop_map(|lines| lines.join("\n"))
}

proptest! {
    /// Any text: an error or a configuration, never a panic.
    #[test]
    fn no_text_panics_the_reader(text in any::<String>()) {
        let _ = from_yaml::<DnsConfig>(&text, "dns.yaml");
    }

    /// Text shaped like a configuration, with odd values: read or refused
    /// without a panic, and what is read builds or is refused without one.
    #[test]
    fn no_configuration_like_text_panics_the_reader_or_the_builder(text in yaml_like()) {
        if let Ok(config) = from_yaml::<DnsConfig>(&text, "dns.yaml") {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _guard = runtime.enter();
            let _ = DnsProxy::builder()
                .config(config)
                .mesh(Arc::new(InMemoryMeshDns::new()))
                .build();
        }
    }
}
