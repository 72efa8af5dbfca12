//! The proxy over real UDP and TCP on loopback, with an upstream started by the
//! test: the search-expansion table for clients in `default` (127.0.0.1) and
//! `other` (127.0.0.2), headless and single-family services, forwarding, cache
//! hits, NXDOMAIN from upstream for external names and from the proxy for the
//! cluster domain, timeouts, truncation with TCP fallback, malformed packets,
//! NOTIMP for opcodes other than QUERY, and quiet TCP disconnects.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dns_proxy::{DnsHandle, DnsProxy, InMemoryMeshDns, ServiceRecord, UpstreamConfig};
use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
    update_message,
};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::{bind_pair, exchange, question, tcp_exchange};

// ------------------------------------------------------------ the upstream

/// A fake upstream: `www.example.org` → 192.0.2.1, `big.example.org` → 100 A
/// records, `nx.example.org` → NXDOMAIN with a SOA, `slow.example.org` → no
/// answer at all. Counts the questions it sees.
#[derive(Clone, Default)]
struct FakeUpstream {
    questions: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for FakeUpstream {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        self.questions.fetch_add(1, Ordering::SeqCst);
        let info = request.request_info().unwrap();
        let name: Name = info.query.name().clone().into();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let ip = |last: u8| RData::A(A::new(192, 0, 2, last));
        let soa = Record::from_rdata(
            Name::from_ascii("example.org.").unwrap(),
            60,
            RData::SOA(SOA::new(
                Name::from_ascii("ns.example.org.").unwrap(),
                Name::from_ascii("admin.example.org.").unwrap(),
                1,
                3600,
                600,
                86400,
                30,
            )),
        );
        let (answers, authorities) = match name.to_ascii().as_str() {
            "www.example.org." => (vec![Record::from_rdata(name.clone(), 300, ip(1))], vec![]),
            "big.example.org." => (
                (0..100)
                    .map(|i| Record::from_rdata(name.clone(), 300, ip(i)))
                    .collect(),
                vec![],
            ),
            "slow.example.org." => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                (vec![], vec![])
            }
            _ => {
                metadata.response_code = ResponseCode::NXDomain;
                (vec![], vec![soa])
            }
        };
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let edns = Edns::new();
        if request.edns.is_some() {
            builder.edns(&edns);
        }
        let message = builder.build(metadata, answers.iter(), authorities.iter(), [], []);
        response.send_response(message).await.unwrap_or_else(|_| {
            ResponseInfo::from(Header {
                metadata: Metadata::response_from_request(&request.metadata),
                counts: HeaderCounts::default(),
            })
        })
    }
}

async fn start_upstream() -> (SocketAddr, Arc<AtomicUsize>, Server<FakeUpstream>) {
    let handler = FakeUpstream::default();
    let questions = handler.questions.clone();
    let (udp, tcp) = bind_pair().await;
    let address = udp.local_addr().unwrap();
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 8);
    (address, questions, server)
}

// --------------------------------------------------------------- the proxy

fn service(namespace: &str, hostname: &str, vips: &[&str], endpoints: &[&str]) -> ServiceRecord {
    let ips = |list: &[&str]| list.iter().map(|ip| ip.parse().unwrap()).collect();
    ServiceRecord {
        namespace: namespace.into(),
        hostname: hostname.into(),
        vips: ips(vips),
        endpoints: ips(endpoints),
        canonical: false,
    }
}

struct Setup {
    proxy: DnsHandle,
    mesh: InMemoryMeshDns,
    upstream_questions: Arc<AtomicUsize>,
    _upstream: Server<FakeUpstream>,
}

async fn start() -> Setup {
    let (upstream, upstream_questions, upstream_server) = start_upstream().await;
    let mesh = InMemoryMeshDns::new();
    mesh.upsert_service(service(
        "default",
        "echo.default.svc.cluster.local",
        &["10.96.0.10", "fd00::10"],
        &[],
    ));
    mesh.upsert_service(service(
        "other",
        "echo.other.svc.cluster.local",
        &["10.96.0.20"],
        &[],
    ));
    mesh.upsert_service(service(
        "default",
        "db.default.svc.cluster.local",
        &[],
        &["10.42.0.7", "10.42.0.8"],
    ));
    mesh.upsert_service(service(
        "default",
        "v6only.default.svc.cluster.local",
        &["fd00::66"],
        &[],
    ));
    mesh.upsert_service(service("default", "api.example.com", &["240.0.0.1"], &[]));
    mesh.set_client_namespace("127.0.0.1".parse().unwrap(), Some("default".into()));
    mesh.set_client_namespace("127.0.0.2".parse().unwrap(), Some("other".into()));
    let (udp, tcp) = bind_pair().await;
    let proxy = DnsProxy::builder()
        .mesh(Arc::new(mesh.clone()))
        .upstream(UpstreamConfig {
            servers: vec![upstream],
            timeout: Duration::from_millis(500),
            attempts: 1,
            ..UpstreamConfig::default()
        })
        .build()
        .unwrap()
        .spawn(udp, tcp)
        .unwrap();
    Setup {
        proxy,
        mesh,
        upstream_questions,
        _upstream: upstream_server,
    }
}

// -------------------------------------------------------------- the client

async fn udp_exchange(from: &str, to: SocketAddr, packet: &[u8]) -> Option<Message> {
    let reply = exchange(from, to, packet, Duration::from_secs(5)).await?;
    Some(Message::from_vec(&reply).unwrap())
}

async fn ask_udp(from: &str, to: SocketAddr, name: &str, record_type: RecordType) -> Message {
    udp_exchange(from, to, &question(name, record_type, false))
        .await
        .expect("an answer")
}

async fn ask_tcp(to: SocketAddr, name: &str, record_type: RecordType) -> Message {
    tcp_exchange(to, &question(name, record_type, false)).await
}

/// (record type, target or address) of each answer, in order.
fn answers(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => format!("A {} {}", r.name, a.0),
            RData::AAAA(a) => format!("AAAA {} {}", r.name, a.0),
            RData::CNAME(c) => format!("CNAME {} {}", r.name, c.0),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn search_expansion_table() {
    let setup = start().await;
    let to = setup.proxy.udp_addr();
    let echo_default = "A echo.default.svc.cluster.local. 10.96.0.10";
    let echo_other = "A echo.other.svc.cluster.local. 10.96.0.20";
    let cname = |from: &str, to: &str| format!("CNAME {from} {to}");
    // (client, question, expected answers)
    let table: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "127.0.0.1",
            "echo.default.svc.cluster.local.",
            vec![echo_default.into()],
        ),
        (
            "127.0.0.2",
            "echo.default.svc.cluster.local.",
            vec![echo_default.into()],
        ),
        (
            "127.0.0.2",
            "echo.other.svc.cluster.local.",
            vec![echo_other.into()],
        ),
        // The resolver appended a search suffix to a partly qualified name.
        (
            "127.0.0.1",
            "echo.other.default.svc.cluster.local.",
            vec![
                cname(
                    "echo.other.default.svc.cluster.local.",
                    "echo.other.svc.cluster.local.",
                ),
                echo_other.into(),
            ],
        ),
        (
            "127.0.0.1",
            "echo.other.svc.svc.cluster.local.",
            vec![
                cname(
                    "echo.other.svc.svc.cluster.local.",
                    "echo.other.svc.cluster.local.",
                ),
                echo_other.into(),
            ],
        ),
        (
            "127.0.0.2",
            "echo.default.other.svc.cluster.local.",
            vec![
                cname(
                    "echo.default.other.svc.cluster.local.",
                    "echo.default.svc.cluster.local.",
                ),
                echo_default.into(),
            ],
        ),
        (
            "127.0.0.1",
            "api.example.com.default.svc.cluster.local.",
            vec![
                cname(
                    "api.example.com.default.svc.cluster.local.",
                    "api.example.com.",
                ),
                "A api.example.com. 240.0.0.1".into(),
            ],
        ),
        // Unqualified names use the client's namespace.
        (
            "127.0.0.1",
            "echo.",
            vec![
                cname("echo.", "echo.default.svc.cluster.local."),
                echo_default.into(),
            ],
        ),
        (
            "127.0.0.2",
            "echo.",
            vec![
                cname("echo.", "echo.other.svc.cluster.local."),
                echo_other.into(),
            ],
        ),
        (
            "127.0.0.2",
            "echo.default.",
            vec![
                cname("echo.default.", "echo.default.svc.cluster.local."),
                echo_default.into(),
            ],
        ),
    ];
    for (from, name, expected) in table {
        let response = ask_udp(from, to, name, RecordType::A).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{from} {name}"
        );
        assert!(
            response.metadata.authoritative,
            "{from} {name}: mesh answers are authoritative"
        );
        assert_eq!(answers(&response), expected, "{from} {name}");
    }
    setup.proxy.shutdown();
    setup.proxy.join().await.unwrap();
}

#[tokio::test]
async fn headless_and_single_family_services() {
    let setup = start().await;
    let to = setup.proxy.udp_addr();
    let response = ask_udp(
        "127.0.0.1",
        to,
        "db.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(
        answers(&response),
        [
            "A db.default.svc.cluster.local. 10.42.0.7",
            "A db.default.svc.cluster.local. 10.42.0.8"
        ]
    );
    let response = ask_udp(
        "127.0.0.1",
        to,
        "echo.default.svc.cluster.local.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(
        answers(&response),
        ["AAAA echo.default.svc.cluster.local. fd00::10"]
    );
    // A known name without records of the asked family: empty NOERROR, authoritative.
    for (name, record_type) in [
        ("v6only.default.svc.cluster.local.", RecordType::A),
        ("echo.other.svc.cluster.local.", RecordType::AAAA),
    ] {
        let response = ask_udp("127.0.0.1", to, name, record_type).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert!(response.answers.is_empty(), "{name}");
    }
    assert_eq!(
        setup.upstream_questions.load(Ordering::SeqCst),
        0,
        "nothing went upstream"
    );
}

#[tokio::test]
async fn repeated_questions_get_their_own_id_and_follow_mesh_changes() {
    let setup = start().await;
    let to = setup.proxy.udp_addr();
    let ask = |id: u16, name: &str| {
        let mut packet = question(name, RecordType::A, true);
        packet[..2].copy_from_slice(&id.to_be_bytes());
        async move { udp_exchange("127.0.0.1", to, &packet).await.unwrap() }
    };
    let echo = "echo.default.svc.cluster.local.";
    for id in [1, 2, 0xbeef] {
        let response = ask(id, echo).await;
        assert_eq!(response.metadata.id, id);
        assert_eq!(answers(&response), [format!("A {echo} 10.96.0.10")]);
        assert!(response.metadata.authoritative);
    }
    // A changed service is answered from the new state at once.
    setup.mesh.upsert_service(service(
        "default",
        "echo.default.svc.cluster.local",
        &["10.96.0.99"],
        &[],
    ));
    let response = ask(3, echo).await;
    assert_eq!(response.metadata.id, 3);
    assert_eq!(answers(&response), [format!("A {echo} 10.96.0.99")]);
    // So is a client that moved to another namespace.
    let short = "echo.";
    assert_eq!(
        answers(&ask(4, short).await),
        [
            format!("CNAME {short} {echo}"),
            format!("A {echo} 10.96.0.99")
        ]
    );
    setup
        .mesh
        .set_client_namespace("127.0.0.1".parse().unwrap(), Some("other".into()));
    let other = "echo.other.svc.cluster.local.";
    assert_eq!(
        answers(&ask(5, short).await),
        [
            format!("CNAME {short} {other}"),
            format!("A {other} 10.96.0.20")
        ]
    );
    // And a removed service is gone: NXDOMAIN from the proxy, the authority
    // for the cluster domain.
    assert!(
        setup
            .mesh
            .remove_service("other", "echo.other.svc.cluster.local")
    );
    let response = ask(6, other).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(response.metadata.authoritative);
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn unknown_names_and_other_types_are_forwarded_and_cached() {
    let setup = start().await;
    let to = setup.proxy.udp_addr();
    let response = ask_udp("127.0.0.1", to, "www.example.org.", RecordType::A).await;
    assert_eq!(answers(&response), ["A www.example.org. 192.0.2.1"]);
    assert!(
        !response.metadata.authoritative,
        "relayed answers are not ours"
    );
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), 1);
    // Again: from the cache.
    let response = ask_udp("127.0.0.1", to, "www.example.org.", RecordType::A).await;
    assert_eq!(answers(&response), ["A www.example.org. 192.0.2.1"]);
    assert_eq!(
        setup.upstream_questions.load(Ordering::SeqCst),
        1,
        "a cache hit"
    );

    // NXDOMAIN only when the upstream says so, with its SOA; cached negatively.
    let response = ask_udp("127.0.0.1", to, "nope.example.org.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(
        response.authorities.first().map(|r| &r.data),
        Some(RData::SOA(_))
    ));
    let before = setup.upstream_questions.load(Ordering::SeqCst);
    let response = ask_udp("127.0.0.1", to, "nope.example.org.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        setup.upstream_questions.load(Ordering::SeqCst),
        before,
        "a negative cache hit"
    );

    // An external name asked for another type goes upstream too.
    let before = setup.upstream_questions.load(Ordering::SeqCst);
    let response = ask_udp("127.0.0.1", to, "mail.example.org.", RecordType::MX).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn upstream_timeouts_are_servfail() {
    let setup = start().await;
    let response = ask_udp(
        "127.0.0.1",
        setup.proxy.udp_addr(),
        "slow.example.org.",
        RecordType::A,
    )
    .await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn truncated_upstream_answers_are_fetched_over_tcp_and_relayed() {
    let setup = start().await;
    // Over UDP without EDNS the proxy's own answer is truncated to 512 bytes ...
    let udp = ask_udp(
        "127.0.0.1",
        setup.proxy.udp_addr(),
        "big.example.org.",
        RecordType::A,
    )
    .await;
    assert!(udp.metadata.truncation);
    assert!(udp.answers.len() < 100);
    // ... and the client retries over TCP, getting all 100 records (which the
    // proxy itself got from the upstream over TCP after a truncated UDP answer).
    let tcp = ask_tcp(setup.proxy.tcp_addr(), "big.example.org.", RecordType::A).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 100);
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_are_dropped() {
    let setup = start().await;
    let to = setup.proxy.udp_addr();
    // Too short for a header: dropped, and the server keeps serving.
    assert!(
        udp_exchange("127.0.0.1", to, &[0x12, 0x34, 0x01])
            .await
            .is_none()
    );
    // A header announcing a question that is not there: FORMERR.
    let mut truncated = question("echo.default.svc.cluster.local.", RecordType::A, false);
    truncated.truncate(20);
    let response = udp_exchange("127.0.0.1", to, &truncated).await.unwrap();
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    // Two questions in one message: FORMERR.
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
    message.add_query(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
    let response = udp_exchange("127.0.0.1", to, &message.to_vec().unwrap())
        .await
        .unwrap();
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    // Still serving.
    let response = ask_udp(
        "127.0.0.1",
        to,
        "echo.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(response.answers.len(), 1);
}

#[tokio::test]
async fn edns_is_answered_with_edns() {
    let setup = start().await;
    let response = udp_exchange(
        "127.0.0.1",
        setup.proxy.udp_addr(),
        &question("echo.default.svc.cluster.local.", RecordType::A, true),
    )
    .await
    .unwrap();
    let edns = response.edns.expect("an EDNS answer to an EDNS question");
    assert!(edns.max_payload() >= 512);
    let _: IpAddr = "10.96.0.10".parse().unwrap();
}

#[tokio::test]
async fn hickory_client_over_udp_and_tcp() {
    use futures::StreamExt;
    use hickory_proto::op::{DnsRequest, DnsRequestOptions};
    use hickory_server::net::runtime::TokioRuntimeProvider;
    use hickory_server::net::tcp::TcpClientStream;
    use hickory_server::net::udp::UdpClientStream;
    use hickory_server::net::xfer::DnsHandle;

    let setup = start().await;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii("echo.default.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    let provider = TokioRuntimeProvider::default();

    /// One question through hickory's client, UDP or TCP alike.
    async fn exchange(client: &impl DnsHandle, query: Message) -> Message {
        client
            .send(DnsRequest::new(query, DnsRequestOptions::default()))
            .next()
            .await
            .unwrap()
            .unwrap()
            .into_message()
    }

    let udp = UdpClientStream::builder(setup.proxy.udp_addr(), provider.clone())
        .with_timeout(Some(Duration::from_secs(5)))
        .exchange();
    let response = exchange(&udp, query.clone()).await;
    assert_eq!(
        answers(&response),
        ["A echo.default.svc.cluster.local. 10.96.0.10"]
    );

    let tcp = TcpClientStream::exchange(
        setup.proxy.tcp_addr(),
        None,
        Duration::from_secs(5),
        None,
        provider,
    )
    .await
    .unwrap();
    let response = exchange(&tcp, query).await;
    assert_eq!(
        answers(&response),
        ["A echo.default.svc.cluster.local. 10.96.0.10"]
    );
}

#[tokio::test]
async fn oversized_tcp_questions_are_refused() {
    let setup = start().await;
    // A valid question padded with 8 KiB of additional records.
    let mut message = Message::query();
    message.add_query(Query::query(
        Name::from_ascii("echo.default.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    for i in 0..400u16 {
        let name = Name::from_ascii(format!("pad{i}.example.")).unwrap();
        message.add_additional(Record::from_rdata(name, 0, RData::A(A::new(10, 0, 0, 1))));
    }
    let packet = message.to_vec().unwrap();
    assert!(packet.len() > 8 * 1024);
    let response = tcp_exchange(setup.proxy.tcp_addr(), &packet).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    assert!(response.answers.is_empty());
}

/// The SOA records in the authority section, as text.
fn soa_authority(message: &Message) -> Vec<String> {
    message
        .authorities
        .iter()
        .filter(|record| matches!(record.data, RData::SOA(_)))
        .map(|record| record.name.to_string())
        .collect()
}

#[tokio::test]
async fn the_proxy_is_the_authority_for_the_cluster_domain() {
    let setup = start().await;
    let udp = setup.proxy.udp_addr();
    let tcp = setup.proxy.tcp_addr();
    // Unknown names in the domain: NXDOMAIN with the domain's SOA, over UDP
    // and TCP, also when a resolver appended a search suffix to an external name.
    for name in [
        "nope.default.svc.cluster.local.",
        "www.example.org.default.svc.cluster.local.",
        "www.example.org.svc.cluster.local.",
        "nope.cluster.local.",
    ] {
        for response in [
            ask_udp("127.0.0.1", udp, name, RecordType::A).await,
            ask_tcp(tcp, name, RecordType::AAAA).await,
        ] {
            assert_eq!(
                response.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
            assert!(response.metadata.authoritative, "{name}");
            assert!(response.answers.is_empty(), "{name}");
            assert_eq!(soa_authority(&response), ["cluster.local."], "{name}");
        }
    }
    // Names that exist without records of the type: NODATA with the SOA.
    for (name, record_type) in [
        ("echo.default.svc.cluster.local.", RecordType::TXT),
        ("echo.default.svc.cluster.local.", RecordType::MX),
        ("default.svc.cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
        ("cluster.local.", RecordType::NS),
    ] {
        let response = ask_udp("127.0.0.1", udp, name, record_type).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(response.metadata.authoritative, "{name}");
        assert!(response.answers.is_empty(), "{name} {record_type}");
        assert_eq!(soa_authority(&response), ["cluster.local."], "{name}");
    }
    // A short name in the domain's search form asked for another type: the
    // CNAME to the service, and no data.
    let response = ask_udp(
        "127.0.0.1",
        udp,
        "echo.default.default.svc.cluster.local.",
        RecordType::TXT,
    )
    .await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        answers(&response),
        ["CNAME echo.default.default.svc.cluster.local. echo.default.svc.cluster.local."]
    );
    // Outside the domain, a mesh host without records of the family: no SOA
    // of ours.
    let response = ask_udp("127.0.0.1", udp, "api.example.com.", RecordType::AAAA).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.answers.is_empty());
    assert!(soa_authority(&response).is_empty());
    // The apex's SOA.
    let response = ask_udp("127.0.0.1", udp, "cluster.local.", RecordType::SOA).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(
        response.answers.first().map(|r| &r.data),
        Some(RData::SOA(_))
    ));
    // None of it went upstream; names outside the domain still do.
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), 0);
    let response = ask_udp("127.0.0.1", udp, "nope.example.org.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(!response.metadata.authoritative);
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn without_an_upstream_unknown_cluster_names_are_nxdomain() {
    let mesh = InMemoryMeshDns::new();
    let (udp, tcp) = bind_pair().await;
    let proxy = DnsProxy::builder()
        .mesh(Arc::new(mesh))
        .build()
        .unwrap()
        .spawn(udp, tcp)
        .unwrap();
    let name = "nope.default.svc.cluster.local.";
    let response = ask_udp("127.0.0.1", proxy.udp_addr(), name, RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    let response = ask_tcp(proxy.tcp_addr(), name, RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    // Outside the domain there is nobody to ask.
    let response = ask_udp("127.0.0.1", proxy.udp_addr(), "example.org.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    proxy.shutdown();
    proxy.join().await.unwrap();
}

/// A DNS UPDATE (RFC 2136) adding a record to the cluster domain.
fn update(id: u16) -> Message {
    let record = Record::from_rdata(
        Name::from_ascii("new.default.svc.cluster.local.").unwrap(),
        60,
        RData::A(A::new(10, 96, 0, 99)),
    );
    let mut message = update_message::create(
        RecordSet::from(record),
        Name::from_ascii("cluster.local.").unwrap(),
        false,
    );
    message.metadata.id = id;
    message
}

#[tokio::test]
async fn other_opcodes_get_notimp() {
    let setup = start().await;
    let udp = setup.proxy.udp_addr();
    let check = |response: &Message, id: u16, op_code: OpCode| {
        assert_eq!(response.metadata.id, id);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(response.metadata.op_code, op_code);
        assert_eq!(response.metadata.response_code, ResponseCode::NotImp);
        assert!(response.answers.is_empty());
    };
    // An UPDATE, over UDP and TCP, with EDNS or without.
    let packet = update(0x1234).to_vec().unwrap();
    let response = udp_exchange("127.0.0.1", udp, &packet).await.unwrap();
    check(&response, 0x1234, OpCode::Update);
    let response = tcp_exchange(setup.proxy.tcp_addr(), &packet).await;
    check(&response, 0x1234, OpCode::Update);
    let mut with_edns = update(0x4321);
    with_edns.set_edns(Edns::new());
    let response = udp_exchange("127.0.0.1", udp, &with_edns.to_vec().unwrap())
        .await
        .unwrap();
    check(&response, 0x4321, OpCode::Update);
    assert!(response.edns.is_some(), "EDNS answered with EDNS");
    // A question with another opcode: NOTIFY, STATUS, and unassigned ones.
    for (op, op_code) in [
        (4, OpCode::Notify),
        (2, OpCode::Status),
        (3, OpCode::Unknown(3)),
        (15, OpCode::Unknown(15)),
    ] {
        let mut packet = question("echo.default.svc.cluster.local.", RecordType::A, false);
        packet[..2].copy_from_slice(&[0xab, op]);
        packet[2] = (packet[2] & 0x87) | (op << 3);
        let response = udp_exchange("127.0.0.1", udp, &packet).await.unwrap();
        check(&response, u16::from_be_bytes([0xab, op]), op_code);
        let response = tcp_exchange(setup.proxy.tcp_addr(), &packet).await;
        check(&response, u16::from_be_bytes([0xab, op]), op_code);
    }
    // A header alone with another opcode: the bare NOTIMP header.
    let response = udp_exchange(
        "127.0.0.1",
        udp,
        &[0x0f, 0x0f, 0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    )
    .await
    .unwrap();
    check(&response, 0x0f0f, OpCode::Update);
    // Nothing was updated, nothing went upstream.
    let response = ask_udp(
        "127.0.0.1",
        udp,
        "new.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), 0);
}

/// Every event at WARN or ERROR level, from any crate.
#[derive(Clone, Default)]
struct Alarms(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Alarms {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={value:?}", field.name()));
            }
        }
        let metadata = event.metadata();
        let mut text = Text(format!("{} {}:", metadata.level(), metadata.target()));
        event.record(&mut text);
        self.0.lock().unwrap().push(text.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Writes a question for `name` to a TCP stream.
async fn send(stream: &mut TcpStream, name: &str) {
    let packet = question(name, RecordType::A, false);
    let mut framed = u16::try_from(packet.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    stream.write_all(&framed).await.unwrap();
}

/// TCP clients that close their end cleanly (after a question, with or
/// without its answer, or without asking) are no cause for a warning or an
/// error. Each case ends when the proxy has closed its end too, so it has
/// seen the close and logged whatever it logs for it.
#[tokio::test]
async fn tcp_clients_closing_cleanly_are_not_logged_as_errors() {
    let alarms = Alarms::default();
    let _guard = tracing::subscriber::set_default(alarms.clone());
    let setup = start().await;
    let to = setup.proxy.tcp_addr();
    // Connects and closes without a question.
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(stream.read_to_end(&mut Vec::new()).await.unwrap(), 0);
    // Asks, reads the answer, closes.
    let mut stream = TcpStream::connect(to).await.unwrap();
    send(&mut stream, "echo.default.svc.cluster.local.").await;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(stream.read_to_end(&mut Vec::new()).await.unwrap(), 0);
    // Asks a mesh name and a forwarded name, closes at once (the answers come
    // after the close).
    let mut stream = TcpStream::connect(to).await.unwrap();
    send(&mut stream, "echo.default.svc.cluster.local.").await;
    send(&mut stream, "www.example.org.").await;
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(!rest.is_empty(), "both answered");
    // And a question that times out upstream, the client gone meanwhile.
    let mut stream = TcpStream::connect(to).await.unwrap();
    send(&mut stream, "slow.example.org.").await;
    stream.shutdown().await.unwrap();
    stream.read_to_end(&mut Vec::new()).await.unwrap();
    // Every connection has closed: a drain has nothing to wait for.
    let drained = setup.proxy.drain(Duration::from_secs(30)).await;
    assert_eq!(drained, mesh_net::Drained::Complete);
    setup.proxy.join().await.unwrap();
    let alarms = alarms.0.lock().unwrap();
    assert!(alarms.is_empty(), "{alarms:#?}");
}

#[tokio::test]
async fn idle_tcp_clients_make_room_for_newer_ones() {
    let setup = start().await;
    let address = setup.proxy.tcp_addr();
    // 40 connections from one address that never ask: 32 may wait for their
    // first question (10 s), the 8 oldest are closed to make room.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.9:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(address).await.unwrap());
    }
    // Another client is answered meanwhile.
    let answer = ask_tcp(address, "echo.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let mut byte = [0u8; 1];
    for mut stream in idle.drain(..8) {
        // Well before the 10 s deadline: evicted.
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0))), "closed to make room: {read:?}");
    }
    for stream in &mut idle {
        let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
        assert!(read.is_err(), "the newest wait for their question");
    }
}
