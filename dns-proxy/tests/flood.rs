//! A flood of distinct external names towards an upstream that never answers
//! them: at most `max_in_flight` questions wait for the upstream (the proxy's
//! counters and the process's open file descriptors say so), the others get
//! SERVFAIL while those still wait, mesh names and cached names are answered
//! all along, and once the waiting questions time out everything they held is
//! released. Alone in its test binary, so the descriptors counted are the
//! proxy's. Real sockets on 127.0.0.1 only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dns_proxy::{DnsProxy, DnsStats, InMemoryMeshDns, ServiceRecord, UpstreamConfig};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

mod support;
use support::{addresses, ask_udp, bind_pair, question};

/// The bound on questions waiting for the upstream.
const CAP: usize = 16;
/// Questions beyond the cap, sent in windows of `WINDOW`.
const BEYOND: usize = 400;
const WINDOW: usize = 50;
/// Long enough that the questions given a place still wait while the test
/// checks everything else (nothing is measured against it).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);
/// A guard against a hang, never reached when the proxy works.
const PATIENCE: Duration = Duration::from_secs(60);

const CACHED: &str = "cached.example.org.";

/// An upstream on 127.0.0.1 that reads every question and answers only
/// `cached.example.org`; returns its address and how many other questions it
/// was sent.
async fn quiet_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let unanswered = Arc::new(AtomicUsize::new(0));
    let count = unanswered.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            let Ok(query) = Message::from_vec(&buffer[..len]) else {
                continue;
            };
            let name = query.queries.first().map(|q| q.name().to_ascii());
            if name.as_deref() != Some(CACHED) {
                count.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let mut response = Message::response(query.metadata.id, query.metadata.op_code);
            response.metadata.recursion_available = true;
            response.queries = query.queries.clone();
            response.answers = vec![Record::from_rdata(
                query.queries[0].name().clone(),
                300,
                RData::A(A::new(192, 0, 2, 7)),
            )];
            let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
        }
    });
    (address, unanswered)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn flood_question(i: usize) -> Vec<u8> {
    let mut packet = question(&format!("n{i}.flood.example."), RecordType::A, false);
    packet[..2].copy_from_slice(&u16::try_from(i).unwrap().to_be_bytes());
    packet
}

async fn ask(to: SocketAddr, name: &str) -> Message {
    ask_udp(to, name, RecordType::A, PATIENCE).await
}

/// Receives responses on `client` until `count` came, by ID.
async fn receive(client: &UdpSocket, count: usize, into: &mut HashMap<u16, ResponseCode>) {
    let mut buffer = vec![0u8; 4096];
    let target = into.len() + count;
    while into.len() < target {
        let (len, _) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buffer))
            .await
            .expect("every question is answered")
            .unwrap();
        let response = Message::from_vec(&buffer[..len]).unwrap();
        let previous = into.insert(response.metadata.id, response.metadata.response_code);
        assert!(previous.is_none(), "one answer per question");
    }
}

/// The largest counters and descriptor count seen.
#[derive(Default)]
struct Peak {
    in_flight: usize,
    sockets: usize,
    fds: usize,
}

impl Peak {
    fn sample(&mut self, stats: DnsStats) {
        self.in_flight = self.in_flight.max(stats.forwards_in_flight);
        self.sockets = self.sockets.max(stats.upstream_sockets);
        self.fds = self.fds.max(open_fds());
    }
}

#[tokio::test]
async fn a_flood_of_unanswered_names_is_bounded_and_released() {
    let (upstream, unanswered) = quiet_upstream().await;
    let mesh = InMemoryMeshDns::new();
    mesh.upsert_service(ServiceRecord {
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec!["10.96.0.10".parse().unwrap()],
        endpoints: Vec::new(),
        canonical: false,
    });
    mesh.set_client_namespace("127.0.0.1".parse().unwrap(), Some("default".into()));
    let (udp, tcp) = bind_pair().await;
    let proxy = DnsProxy::builder()
        .mesh(Arc::new(mesh))
        .upstream(UpstreamConfig {
            servers: vec![upstream],
            timeout: UPSTREAM_TIMEOUT,
            attempts: 1,
            max_in_flight: CAP,
            ..UpstreamConfig::default()
        })
        .build()
        .unwrap()
        .spawn(udp, tcp)
        .unwrap();
    let to = proxy.udp_addr();

    // An external name the upstream answers, now in the cache.
    assert_eq!(addresses(&ask(to, CACHED).await), ["192.0.2.7"]);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let start = proxy.stats();
    assert_eq!(start.forwards_in_flight, 0);
    let fds_before = open_fds();
    let mut peak = Peak::default();
    let mut answers = HashMap::new();

    // The first CAP names take every place and wait for the upstream ...
    for i in 0..CAP {
        client.send_to(&flood_question(i), to).await.unwrap();
        peak.sample(proxy.stats());
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while proxy.stats().forwards_in_flight < CAP {
        assert!(tokio::time::Instant::now() < deadline, "the places fill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... and every name beyond them gets SERVFAIL while they still wait.
    for window in (CAP..CAP + BEYOND).collect::<Vec<_>>().chunks(WINDOW) {
        for &i in window {
            client.send_to(&flood_question(i), to).await.unwrap();
            peak.sample(proxy.stats());
        }
        receive(&client, window.len(), &mut answers).await;
        peak.sample(proxy.stats());
        assert_eq!(
            proxy.stats().forwards_in_flight,
            CAP,
            "the first still wait"
        );
    }
    assert!(
        answers.values().all(|code| *code == ResponseCode::ServFail),
        "{answers:?}"
    );
    assert!(
        answers.keys().all(|id| usize::from(*id) >= CAP),
        "the questions with a place are not answered yet"
    );
    let saturated = proxy.stats();
    assert_eq!(saturated.forwarded - start.forwarded, CAP as u64);
    assert_eq!(
        saturated.forwards_refused - start.forwards_refused,
        BEYOND as u64
    );

    // The bounds held throughout the flood: CAP questions waited, each with one socket.
    assert_eq!(peak.in_flight, CAP);
    assert!(peak.sockets <= CAP, "{} upstream sockets", peak.sockets);
    assert!(
        peak.fds <= fds_before + CAP,
        "{} descriptors open, {fds_before} before the flood",
        peak.fds
    );

    // While the places are all taken: mesh names over UDP and TCP, and the
    // cached external name, are answered; an uncached one gets SERVFAIL.
    let echo = "echo.default.svc.cluster.local.";
    assert_eq!(addresses(&ask(to, echo).await), ["10.96.0.10"]);
    let mut stream = TcpStream::connect(proxy.tcp_addr()).await.unwrap();
    let packet = question(echo, RecordType::A, false);
    stream
        .write_all(&u16::try_from(packet.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&packet).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(
        addresses(&Message::from_vec(&body).unwrap()),
        ["10.96.0.10"]
    );
    // A clean close, and the proxy's end closes too.
    stream.shutdown().await.unwrap();
    assert_eq!(stream.read_to_end(&mut Vec::new()).await.unwrap(), 0);
    drop(stream);
    assert_eq!(addresses(&ask(to, CACHED).await), ["192.0.2.7"]);
    let refused = proxy.stats().forwards_refused;
    let response = ask(to, "one-more.flood.example.").await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(proxy.stats().forwards_refused, refused + 1);
    assert_eq!(proxy.stats().forwards_in_flight, CAP);

    // The waiting questions time out: SERVFAIL, and all they held is released
    // (their places before their answers are sent; sockets kept for reuse
    // are counted).
    receive(&client, CAP, &mut answers).await;
    assert!(
        (0..CAP).all(|i| answers.get(&u16::try_from(i).unwrap()) == Some(&ResponseCode::ServFail))
    );
    let after = proxy.stats();
    assert_eq!(after.forwards_in_flight, 0);
    assert!(after.upstream_sockets <= CAP);
    assert!(
        open_fds() <= fds_before + after.upstream_sockets,
        "{} descriptors open, {fds_before} before the flood and {} sockets kept",
        open_fds(),
        after.upstream_sockets
    );
    // One datagram per forwarded question: no retransmission from more sockets.
    assert_eq!(unanswered.load(Ordering::SeqCst), CAP);
    proxy.shutdown();
    proxy.join().await.unwrap();
}
