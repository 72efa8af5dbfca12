//! The running proxy's handle, the shape every podless component has
//! (`mesh_net::lifecycle`): `join` waits and never stops the proxy; `drain`
//! stops reading and accepting, closes idle connections, lets forwarded
//! questions (over UDP and TCP) finish, and closes what is left at its
//! deadline; `shutdown` stops at once, and again; `ready` says whether the
//! proxy still serves. Real sockets on 127.0.0.1, with an upstream the test
//! answers by hand; no time is measured (the only timeouts guard against a
//! hang or make a drain end early).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dns_proxy::{DnsHandle, DnsProxy, InMemoryMeshDns, NotReady, ServiceRecord, UpstreamConfig};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use mesh_net::Drained;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

mod support;
use support::{addresses, ask_udp, bind_pair, question};

/// A guard against a hang, never reached when the proxy works.
const PATIENCE: Duration = Duration::from_secs(60);

const ECHO: &str = "echo.default.svc.cluster.local.";

/// Fails the test instead of hanging when `future` does not end.
async fn patiently<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("did not end: the proxy hangs")
}

/// An upstream on 127.0.0.1 that answers a question only when the test
/// says so (never, unless told).
struct Upstream(UdpSocket);

impl Upstream {
    async fn new() -> Self {
        Self(UdpSocket::bind("127.0.0.1:0").await.unwrap())
    }

    fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap()
    }

    /// The next question forwarded to it, and where from.
    async fn question(&self) -> (Message, SocketAddr) {
        let mut buffer = vec![0u8; 4096];
        let (len, from) = patiently(self.0.recv_from(&mut buffer)).await.unwrap();
        (Message::from_vec(&buffer[..len]).unwrap(), from)
    }

    /// Answers `question` with 192.0.2.1.
    async fn answer(&self, (question, to): &(Message, SocketAddr)) {
        let mut response = Message::response(question.metadata.id, question.metadata.op_code);
        response.metadata.recursion_available = true;
        response.queries = question.queries.clone();
        response.answers = vec![Record::from_rdata(
            question.queries[0].name().clone(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        )];
        let bytes = response.to_vec().unwrap();
        self.0.send_to(&bytes, to).await.unwrap();
    }
}

/// A proxy answering `echo.default.svc.cluster.local` from the mesh and
/// forwarding the rest to `upstream` (which it waits for 20 s).
fn proxy(upstream: Option<SocketAddr>) -> DnsProxy {
    let mesh = InMemoryMeshDns::new();
    mesh.upsert_service(ServiceRecord {
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec!["10.96.0.10".parse().unwrap()],
        endpoints: Vec::new(),
        canonical: false,
    });
    DnsProxy::builder()
        .mesh(Arc::new(mesh))
        .upstream(UpstreamConfig {
            servers: upstream.into_iter().collect(),
            timeout: Duration::from_secs(20),
            attempts: 1,
            ..UpstreamConfig::default()
        })
        .build()
        .unwrap()
}

async fn spawn(upstream: Option<SocketAddr>) -> DnsHandle {
    let (udp, tcp) = bind_pair().await;
    proxy(upstream).spawn(udp, tcp).unwrap()
}

/// Asks for `echo` over UDP: answered with its VIP.
async fn udp_answers(to: SocketAddr) {
    let reply = ask_udp(to, ECHO, RecordType::A, PATIENCE).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&reply), ["10.96.0.10"]);
}

/// `packet` with its two-byte length, as DNS over TCP sends it.
fn framed(packet: &[u8]) -> Vec<u8> {
    let mut framed = u16::try_from(packet.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    framed
}

/// Reads one length-prefixed answer.
async fn read_answer(stream: &mut TcpStream) -> Message {
    let mut len = [0u8; 2];
    patiently(stream.read_exact(&mut len)).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    patiently(stream.read_exact(&mut body)).await.unwrap();
    Message::from_vec(&body).unwrap()
}

/// A TCP connection that has asked for `echo` and read its answer: the proxy
/// has accepted it and waits for its next question.
async fn answered_connection(to: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream
        .write_all(&framed(&question(ECHO, RecordType::A, false)))
        .await
        .unwrap();
    assert_eq!(addresses(&read_answer(&mut stream).await), ["10.96.0.10"]);
    stream
}

/// Whether the proxy has closed `stream` (end of stream, or reset): reads
/// until one or the other.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match patiently(stream.read_to_end(&mut rest)).await {
        Ok(_) => rest.is_empty(),
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Waits until `count` forwarded questions wait for the upstream.
async fn forwards_waiting(proxy: &DnsHandle, count: usize) {
    patiently(async {
        while proxy.stats().forwards_in_flight != count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn join_waits_and_never_stops_the_proxy() {
    let proxy = spawn(None).await;
    let (udp, tcp) = (proxy.udp_addr(), proxy.tcp_addr());
    assert_eq!(proxy.local_addr(), udp, "the local address is the UDP one");
    proxy.ready(PATIENCE).await.unwrap();
    // Joined from a task of its own: the proxy answers while join waits.
    let joining = tokio::spawn(proxy.join());
    udp_answers(udp).await;
    drop(answered_connection(tcp).await);
    assert!(!joining.is_finished(), "join returned while the proxy runs");
    // The join future polled and dropped: the proxy still answers.
    joining.abort();
    assert!(joining.await.unwrap_err().is_cancelled());
    udp_answers(udp).await;
    drop(answered_connection(tcp).await);
}

#[tokio::test]
async fn dropping_the_handle_leaves_the_proxy_running() {
    let proxy = spawn(None).await;
    let udp = proxy.udp_addr();
    drop(proxy);
    udp_answers(udp).await;
}

#[tokio::test]
async fn drain_of_an_idle_proxy_is_complete() {
    let proxy = spawn(None).await;
    let tcp = proxy.tcp_addr();
    udp_answers(proxy.udp_addr()).await;
    // Connections between questions are idle: a drain closes them.
    let mut idle = answered_connection(tcp).await;
    let drained = patiently(proxy.drain(PATIENCE)).await;
    assert_eq!(drained, Drained::Complete);
    assert!(closed(&mut idle).await, "the idle connection is closed");
    assert_eq!(proxy.ready(PATIENCE).await, Err(NotReady::Stopped));
    // Nothing accepts any more.
    assert!(
        TcpStream::connect(tcp).await.is_err(),
        "the listener closed"
    );
    patiently(proxy.join()).await.unwrap();
}

/// Sends a question for `name` over UDP from a socket of its own, returned
/// to read the answer with.
async fn send_udp(to: SocketAddr, name: &str) -> UdpSocket {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&question(name, RecordType::A, false), to)
        .await
        .unwrap();
    client
}

/// Reads the UDP answer to what `client` sent.
async fn udp_answer(client: &UdpSocket) -> Message {
    let mut buffer = vec![0u8; 4096];
    let (len, _) = patiently(client.recv_from(&mut buffer)).await.unwrap();
    Message::from_vec(&buffer[..len]).unwrap()
}

/// A TCP connection that has been answered once and now waits for the
/// upstream's answer to a question for `name`.
async fn forwarding_connection(to: SocketAddr, name: &str) -> TcpStream {
    let mut stream = answered_connection(to).await;
    stream
        .write_all(&framed(&question(name, RecordType::A, false)))
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn drain_lets_forwarded_questions_finish() {
    let upstream = Upstream::new().await;
    let proxy = spawn(Some(upstream.addr())).await;
    // One question forwarded from UDP, one from TCP, both waiting for the
    // upstream; an idle TCP connection besides.
    let udp_client = send_udp(proxy.udp_addr(), "one.example.org.").await;
    let mut stream = forwarding_connection(proxy.tcp_addr(), "two.example.org.").await;
    let mut idle = answered_connection(proxy.tcp_addr()).await;
    let questions = [upstream.question().await, upstream.question().await];
    forwards_waiting(&proxy, 2).await;
    // The upstream answers once the drain has begun (`join!` polls the drain
    // first); the clients get their answers, and the connection closes after.
    let clients = async {
        for question in &questions {
            upstream.answer(question).await;
        }
        let over_udp = udp_answer(&udp_client).await;
        let over_tcp = read_answer(&mut stream).await;
        (over_udp, over_tcp, closed(&mut stream).await)
    };
    let (drained, (over_udp, over_tcp, stream_closed)) =
        patiently(async { tokio::join!(proxy.drain(PATIENCE), clients) }).await;
    assert_eq!(drained, Drained::Complete);
    assert_eq!(addresses(&over_udp), ["192.0.2.1"]);
    assert_eq!(addresses(&over_tcp), ["192.0.2.1"]);
    assert!(stream_closed, "closed after its question");
    assert!(closed(&mut idle).await, "the idle connection is closed");
    patiently(proxy.join()).await.unwrap();
}

#[tokio::test]
async fn drain_closes_what_is_left_at_the_deadline() {
    let upstream = Upstream::new().await;
    let proxy = spawn(Some(upstream.addr())).await;
    // Two questions forwarded from UDP and one from TCP, never answered...
    let _first = send_udp(proxy.udp_addr(), "one.example.org.").await;
    let _second = send_udp(proxy.udp_addr(), "two.example.org.").await;
    let mut stream = forwarding_connection(proxy.tcp_addr(), "three.example.org.").await;
    forwards_waiting(&proxy, 3).await;
    // ...and an idle connection, which is no work in progress.
    let mut idle = answered_connection(proxy.tcp_addr()).await;
    // A deadline far shorter than the upstream's timeout (20 s).
    let drained = patiently(proxy.drain(Duration::from_millis(100))).await;
    assert_eq!(drained, Drained::TimedOut { left: 3 });
    assert!(closed(&mut stream).await, "the connection was closed");
    assert!(closed(&mut idle).await, "the idle connection was closed");
    assert_eq!(
        proxy.stats().forwards_in_flight,
        0,
        "the forwards were dropped"
    );
    assert_eq!(proxy.ready(PATIENCE).await, Err(NotReady::Stopped));
    patiently(proxy.join()).await.unwrap();
}

#[tokio::test]
async fn shutdown_is_idempotent_and_closes_everything() {
    let upstream = Upstream::new().await;
    let proxy = spawn(Some(upstream.addr())).await;
    assert_eq!(proxy.ready(PATIENCE).await, Ok(()));
    let _client = send_udp(proxy.udp_addr(), "one.example.org.").await;
    let mut stream = forwarding_connection(proxy.tcp_addr(), "two.example.org.").await;
    forwards_waiting(&proxy, 2).await;
    // And a connection in the middle of a question.
    let mut partial = answered_connection(proxy.tcp_addr()).await;
    partial.write_all(&[0, 40, 1]).await.unwrap();
    proxy.shutdown();
    proxy.shutdown();
    assert_eq!(proxy.ready(PATIENCE).await, Err(NotReady::Stopped));
    assert!(closed(&mut stream).await, "the connection was closed");
    assert!(closed(&mut partial).await, "the connection was closed");
    proxy.shutdown();
    patiently(proxy.join()).await.unwrap();
}

#[tokio::test]
async fn a_drain_after_shutdown_has_nothing_left() {
    let proxy = spawn(None).await;
    let mut idle = answered_connection(proxy.tcp_addr()).await;
    proxy.shutdown();
    assert_eq!(patiently(proxy.drain(PATIENCE)).await, Drained::Complete);
    assert!(closed(&mut idle).await);
    patiently(proxy.join()).await.unwrap();
}

#[tokio::test]
async fn serve_runs_until_its_token_is_cancelled() {
    let (udp, tcp) = bind_pair().await;
    let to = udp.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(proxy(None).serve(udp, tcp, shutdown.clone()));
    udp_answers(to).await;
    shutdown.cancel();
    patiently(serving).await.unwrap().unwrap();
}
