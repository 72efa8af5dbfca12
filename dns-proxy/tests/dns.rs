//! The proxy over real UDP and TCP on loopback, with an upstream started by the
//! test: the search-expansion table for clients in `default` (127.0.0.1) and
//! `other` (127.0.0.2), headless and single-family services, forwarding, cache
//! hits, NXDOMAIN only from upstream, timeouts, truncation with TCP fallback,
//! and malformed packets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dns_proxy::{DnsHandle, DnsProxy, InMemoryMeshDns, ServiceRecord, UpstreamConfig};
use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

mod support;
use support::{exchange, question};

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
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(address).await.unwrap();
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
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind(udp.local_addr().unwrap()).await.unwrap();
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
    let mut stream = TcpStream::connect(to).await.unwrap();
    let packet = question(name, record_type, false);
    stream
        .write_all(&u16::try_from(packet.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&packet).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).await.unwrap();
    Message::from_vec(&body).unwrap()
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
    // And a removed service is no longer the mesh's to answer.
    assert!(
        setup
            .mesh
            .remove_service("other", "echo.other.svc.cluster.local")
    );
    let response = ask(6, other).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(setup.upstream_questions.load(Ordering::SeqCst), 1);
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

    // A mesh name asked for another type goes upstream too.
    let response = ask_udp(
        "127.0.0.1",
        to,
        "echo.default.svc.cluster.local.",
        RecordType::TXT,
    )
    .await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
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
    let mut stream = TcpStream::connect(setup.proxy.tcp_addr()).await.unwrap();
    stream
        .write_all(&u16::try_from(packet.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&packet).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).await.unwrap();
    let response = Message::from_vec(&body).unwrap();
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    assert!(response.answers.is_empty());
}
