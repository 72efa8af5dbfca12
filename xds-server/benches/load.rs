//! The xDS load harness: N simulated delta clients against a server holding W
//! workloads and W/10 services.
//!
//! ```sh
//! cargo bench -p podless-xds --bench load -- --clients 1000 --workloads 100000 --updates 20
//! ```
//!
//! The server runs in a child process (this binary with `serve`), so its memory
//! is measured alone: resident memory with an empty store, after loading the
//! workloads, and with every client synced. Each client is its own HTTP/2
//! connection and delta stream, subscribing to both types by wildcard and ACKing
//! every response, as a ztunnel does. Clients speak gRPC over a raw HTTP/2
//! connection and skim responses as they arrive (type URL, nonce, number of
//! resources) instead of decoding every resource: the harness measures the
//! server, and decoding 100,000 resources in each of 1,000 clients on the same
//! two cores would measure the harness.
//!
//! Reported: the time until every client holds the full state, with the CPU
//! time the server and the clients spent on it, and against a plain-TCP
//! baseline from the same run: the same number of loopback connections, each
//! carrying as many bytes as a client's sync took, written by the server
//! process and read (and thrown away) by the client process, with nothing
//! else done. That is the floor any xDS server sending this state meets on
//! this machine. A second baseline sends the same bytes as one HTTP/2
//! response per connection (h2's default server, clients with the xDS
//! clients' settings): the floor for any gRPC server talking to clients like
//! ztunnel's on the same cores. Then, for each update
//! (one workload changed), the time from the change to each client's ACK, as
//! p50/p99/max over all clients and updates; memory per workload and per client.

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::prost::Message;
use tokio::sync::mpsc;
use xds_server::{Authenticators, MeshConfig, Object, Store, XdsServer};

struct Args {
    clients: usize,
    workloads: usize,
    updates: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        clients: 1000,
        workloads: 100_000,
        updates: 20,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut number = || -> usize {
            argv.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--clients" => args.clients = number(),
            "--workloads" => args.workloads = number(),
            "--updates" => args.updates = number(),
            "--frame-size" => FRAME_SIZE.store(
                u32::try_from(number()).expect("frame size"),
                std::sync::atomic::Ordering::Relaxed,
            ),
            _ => {} // cargo bench's own flags (--bench)
        }
    }
    args
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The CPU time the server process and this harness use from its start.
struct CpuMeter {
    server: u32,
    server_before: Duration,
    harness_before: Duration,
}

impl CpuMeter {
    fn start(server: u32) -> Self {
        Self {
            server,
            server_before: cpu_time(server),
            harness_before: cpu_time(std::process::id()),
        }
    }

    /// The server's and the harness's CPU time since the start.
    fn used(&self) -> (Duration, Duration) {
        (
            cpu_time(self.server) - self.server_before,
            cpu_time(std::process::id()) - self.harness_before,
        )
    }
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

// ---------------------------------------------------------------- server side

const NAMESPACE_SIZE: usize = 1000;

fn namespace_of(index: usize) -> String {
    format!("ns-{}", index / NAMESPACE_SIZE)
}

fn pod(index: usize, services_per_namespace: usize, generation: usize) -> Object {
    let service = (index % NAMESPACE_SIZE) % services_per_namespace;
    let labels = [
        ("app".to_owned(), format!("svc-{service}")),
        ("version".to_owned(), format!("v{generation}")),
    ]
    .into();
    let ip = 0x0a00_0000u32 + index as u32 + 1;
    Object::Pod(Box::new(Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{index}")),
            namespace: Some(namespace_of(index)),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(format!("svc-{service}")),
            node_name: Some(format!("node-{}", index % 1000)),
            containers: vec![Container {
                name: "app".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(std::net::Ipv4Addr::from(ip).to_string()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }))
}

fn service(namespace: usize, index: usize, number: usize) -> Object {
    let ip = 0x6400_0000u32 + number as u32 + 1;
    Object::Service(Box::new(Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{index}")),
            namespace: Some(format!("ns-{namespace}")),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(std::net::Ipv4Addr::from(ip).to_string()),
            selector: Some([("app".to_owned(), format!("svc-{index}"))].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }))
}

fn serve(args: &Args) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = std::io::stdout();
    writeln!(out, "ready").expect("stdout");
    let mut line = String::new();
    let stdin = std::io::stdin();
    stdin.lock().read_line(&mut line).expect("go"); // the parent measured the empty RSS

    let store = Store::new(MeshConfig::default());
    let namespaces = args.workloads.div_ceil(NAMESPACE_SIZE);
    let services_per_namespace = (NAMESPACE_SIZE / 10).max(1);
    let started = Instant::now();
    store.batch(|batch| {
        let mut number = 0;
        for namespace in 0..namespaces {
            for index in 0..services_per_namespace {
                if number < args.workloads / 10 {
                    batch
                        .apply(service(namespace, index, number))
                        .expect("service");
                }
                number += 1;
            }
        }
        for index in 0..args.workloads {
            batch
                .apply(pod(index, services_per_namespace, 0))
                .expect("pod");
        }
    });
    let stats = store.stats();
    writeln!(
        out,
        "loaded {} {} {:.2}",
        stats.workloads,
        stats.services,
        started.elapsed().as_secs_f64()
    )
    .expect("stdout");

    runtime.block_on(async {
        let listener = loopback_listener();
        let server = XdsServer::builder()
            .store(store.clone())
            .authenticators(Authenticators::anonymous())
            .build()
            .expect("server")
            .spawn(listener)
            .expect("spawn");
        writeln!(out, "listening {}", server.local_addr()).expect("stdout");
        let (lines, mut commands) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut generation = 0;
        while let Some(command) = commands.recv().await {
            if let Some(bytes) = command.strip_prefix("blast ") {
                let bytes = bytes.parse().expect("blast size");
                let listener = loopback_listener();
                writeln!(out, "baseline {}", listener.local_addr().expect("addr")).expect("stdout");
                tokio::spawn(blast(listener, bytes));
            } else if let Some(bytes) = command.strip_prefix("stream ") {
                let bytes = bytes.parse().expect("stream size");
                let listener = loopback_listener();
                writeln!(out, "baseline {}", listener.local_addr().expect("addr")).expect("stdout");
                tokio::spawn(stream_over_h2(listener, bytes));
            } else if command == "update" {
                generation += 1;
                store
                    .apply(pod(0, services_per_namespace, generation))
                    .expect("update");
                writeln!(out, "updated").expect("stdout");
            }
        }
        server.shutdown();
    });
}

/// A listener on a free loopback port whose queue holds a thousand clients
/// connecting at once (the default of 128 would drop handshakes, and the
/// clients' retries would be measured instead of the server).
fn loopback_listener() -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    socket.listen(4096).expect("listen")
}

/// The plain-TCP baseline's sender: writes `bytes` bytes to every connection
/// it accepts, once the client has asked with one byte, then closes it.
async fn blast(listener: tokio::net::TcpListener, bytes: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let block = bytes::Bytes::from(vec![0x5a; 256 << 10]);
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let block = block.clone();
        tokio::spawn(async move {
            if tcp.read_exact(&mut [0]).await.is_err() {
                return;
            }
            let mut left = bytes;
            while left > 0 {
                let piece = &block[..left.min(block.len())];
                if tcp.write_all(piece).await.is_err() {
                    return;
                }
                left -= piece.len();
            }
            let _ = tcp.shutdown().await;
        });
    }
}

/// The HTTP/2 baseline's sender: answers every request on every connection it
/// accepts with `bytes` bytes of response body, sent as the xDS server sends
/// (h2's default server settings, data handed over as flow control allows),
/// with nothing else done.
async fn stream_over_h2(listener: tokio::net::TcpListener, bytes: usize) {
    let block = bytes::Bytes::from(vec![0x5a; 256 << 10]);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let block = block.clone();
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                let block = block.clone();
                tokio::spawn(async move {
                    let response = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .expect("response");
                    let Ok(mut send) = respond.send_response(response, false) else {
                        return;
                    };
                    let mut left = bytes;
                    while left > 0 {
                        send.reserve_capacity(left.min(block.len()));
                        let Some(Ok(granted)) =
                            std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                        else {
                            return;
                        };
                        let piece = granted.min(left);
                        if send.send_data(block.slice(..piece), false).is_err() {
                            return;
                        }
                        left -= piece;
                    }
                    let _ = send.send_data(bytes::Bytes::new(), true);
                });
            }
        });
    }
}

// ---------------------------------------------------------------- client side

/// Tries `open` until it succeeds, up to 50 times with a growing pause: a
/// thousand clients connecting at once can still see some connections reset.
async fn retrying<T, F>(mut open: impl FnMut() -> F) -> Result<T, String>
where
    F: Future<Output = Result<T, String>>,
{
    let mut attempts = 0;
    loop {
        match open().await {
            Ok(opened) => return Ok(opened),
            Err(err) if attempts < 50 => {
                attempts += 1;
                tracing::debug!(%err, "opening a connection failed; retrying");
                tokio::time::sleep(Duration::from_millis(20 * attempts)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// The plain-TCP baseline's receiver: asks with one byte (as an xDS client
/// speaks first: a handshake whose last ACK the full listen queue dropped
/// completes when that byte is resent), then reads and drops everything the
/// server sends, and returns when it has all `bytes` of it.
async fn drain(addr: SocketAddr, bytes: usize) -> Result<Instant, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = retrying(|| async {
        tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|err| err.to_string())
    })
    .await?;
    tcp.write_all(&[1]).await.map_err(|err| err.to_string())?;
    let mut buffer = vec![0; 64 << 10];
    let mut received = 0;
    while received < bytes {
        match tcp.read(&mut buffer).await {
            Ok(0) => return Err(format!("closed after {received} of {bytes} bytes")),
            Ok(n) => received += n,
            Err(err) => return Err(err.to_string()),
        }
    }
    Ok(Instant::now())
}

/// The HTTP/2 baseline's receiver: one connection with the xDS clients'
/// settings and one request, whose response body it reads (releasing flow
/// control as it goes) and drops; returns when it has all `bytes` of it.
async fn h2_drain(addr: SocketAddr, bytes: usize) -> Result<Instant, String> {
    let h2 = retrying(|| connect(addr)).await?;
    let mut h2 = h2.ready().await.map_err(|err| err.to_string())?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/baseline"))
        .body(())
        .map_err(|err| err.to_string())?;
    let (response, _) = h2
        .send_request(request, true)
        .map_err(|err| err.to_string())?;
    let mut body = response.await.map_err(|err| err.to_string())?.into_body();
    let mut received = 0;
    while received < bytes {
        match body.data().await {
            Some(Ok(chunk)) => {
                received += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Some(Err(err)) => return Err(err.to_string()),
            None => return Err(format!("ended after {received} of {bytes} bytes")),
        }
    }
    Ok(Instant::now())
}

/// What a client needs of a response.
#[derive(Debug, Default)]
struct Skim {
    type_url: String,
    nonce: String,
    resources: usize,
}

/// Reads gRPC-framed `DeltaDiscoveryResponse`s from HTTP/2 data as it arrives,
/// in any split: counts `resources` (field 2) without decoding them, and keeps
/// the type URL (4) and nonce (5).
#[derive(Default)]
struct Skimmer {
    state: SkimState,
    /// Bytes of the current message not yet read.
    left: usize,
    /// A varint or header being assembled across chunks.
    scratch: Vec<u8>,
    current: Skim,
}

#[derive(Default)]
enum SkimState {
    /// The 5-byte gRPC prefix.
    #[default]
    Prefix,
    /// A field key.
    Key,
    /// A varint value (wire type 0).
    Varint,
    /// The length of field `.0`.
    Length(u64),
    /// Skipping this many bytes of a field.
    Skip(usize),
    /// Collecting this many bytes of field `.0`.
    Collect(u64, usize),
}

impl Skimmer {
    /// Feeds a chunk; calls `done` for each complete response.
    fn feed(&mut self, mut chunk: &[u8], done: &mut impl FnMut(Skim)) -> Result<(), String> {
        while !chunk.is_empty() {
            if matches!(self.state, SkimState::Key) && self.scratch.is_empty() {
                self.skip_whole_resources(&mut chunk);
                self.finish_if_done(done);
                if chunk.is_empty() {
                    break;
                }
            }
            match self.state {
                SkimState::Prefix => {
                    let take = (5 - self.scratch.len()).min(chunk.len());
                    self.scratch.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.scratch.len() == 5 {
                        let prefix = std::mem::take(&mut self.scratch);
                        if prefix[0] != 0 {
                            return Err("compressed message".into());
                        }
                        self.left = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]])
                            as usize;
                        self.state = SkimState::Key;
                        self.finish_if_done(done);
                    }
                }
                SkimState::Key | SkimState::Varint | SkimState::Length(_) => {
                    let Some(value) = self.varint(&mut chunk)? else {
                        continue;
                    };
                    self.state = match self.state {
                        SkimState::Key => match value & 7 {
                            0 => SkimState::Varint,
                            2 => SkimState::Length(value >> 3),
                            other => return Err(format!("wire type {other}")),
                        },
                        SkimState::Length(field) => {
                            let len = value as usize;
                            match field {
                                4 | 5 => SkimState::Collect(field, len),
                                _ => {
                                    if field == 2 {
                                        self.current.resources += 1;
                                    }
                                    SkimState::Skip(len)
                                }
                            }
                        }
                        _ => SkimState::Key,
                    };
                    self.finish_if_done(done);
                }
                SkimState::Skip(len) => {
                    let take = len.min(chunk.len());
                    chunk = &chunk[take..];
                    self.left -= take;
                    self.state = if take == len {
                        SkimState::Key
                    } else {
                        SkimState::Skip(len - take)
                    };
                    self.finish_if_done(done);
                }
                SkimState::Collect(field, len) => {
                    let take = (len - self.scratch.len()).min(chunk.len());
                    self.scratch.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    self.left -= take;
                    if self.scratch.len() == len {
                        let text = String::from_utf8_lossy(&std::mem::take(&mut self.scratch))
                            .into_owned();
                        if field == 4 {
                            self.current.type_url = text;
                        } else {
                            self.current.nonce = text;
                        }
                        self.state = SkimState::Key;
                        self.finish_if_done(done);
                    }
                }
            }
        }
        Ok(())
    }

    /// The fast path: skips and counts the `resources` entries that lie whole
    /// in `chunk` (nearly all of them), leaving the rest to the state machine.
    fn skip_whole_resources(&mut self, chunk: &mut &[u8]) {
        /// Field 2, length-delimited.
        const RESOURCE_KEY: u8 = (2 << 3) | 2;
        while self.left > 0 {
            let bytes = *chunk;
            if bytes.first() != Some(&RESOURCE_KEY) {
                return;
            }
            let Some((len, varint_len)) = whole_varint(&bytes[1..]) else {
                return;
            };
            let Some(total) = usize::try_from(len)
                .ok()
                .and_then(|len| len.checked_add(1 + varint_len))
            else {
                return;
            };
            if total > bytes.len() || total > self.left {
                return;
            }
            self.current.resources += 1;
            self.left -= total;
            *chunk = &bytes[total..];
        }
    }

    /// Reads a varint that may span chunks (in place when it does not).
    fn varint(&mut self, chunk: &mut &[u8]) -> Result<Option<u64>, String> {
        if self.scratch.is_empty()
            && let Some((value, len)) = whole_varint(chunk)
        {
            *chunk = &chunk[len..];
            self.left = self.left.checked_sub(len).ok_or("message overrun")?;
            return Ok(Some(value));
        }
        while let Some((&byte, rest)) = chunk.split_first() {
            *chunk = rest;
            self.left = self.left.checked_sub(1).ok_or("message overrun")?;
            self.scratch.push(byte);
            if byte & 0x80 == 0 {
                let value = self
                    .scratch
                    .iter()
                    .rev()
                    .fold(0u64, |value, byte| (value << 7) | u64::from(byte & 0x7f));
                self.scratch.clear();
                return Ok(Some(value));
            }
            if self.scratch.len() > 10 {
                return Err("varint too long".into());
            }
        }
        Ok(None)
    }

    fn finish_if_done(&mut self, done: &mut impl FnMut(Skim)) {
        if self.left == 0 && matches!(self.state, SkimState::Key) {
            done(std::mem::take(&mut self.current));
            self.state = SkimState::Prefix;
        }
    }
}

/// A varint that ends within `bytes`: its value and length.
fn whole_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let end = bytes.iter().take(10).position(|byte| byte & 0x80 == 0)?;
    let value = bytes[..=end]
        .iter()
        .rev()
        .fold(0u64, |value, byte| (value << 7) | u64::from(byte & 0x7f));
    Some((value, end + 1))
}

/// A request as a gRPC message.
fn grpc_message(request: &DeltaDiscoveryRequest) -> bytes::Bytes {
    let body = request.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&body);
    framed.into()
}

enum Event {
    /// Fully synced, having received this many bytes of gRPC messages.
    Synced(Instant, usize),
    Updated(usize, Instant),
    Failed(String),
}

/// The HTTP/2 frame size clients accept: 16 KiB (the protocol's default, which
/// ztunnel's xDS client keeps), or what `--frame-size` says.
fn frame_size() -> u32 {
    FRAME_SIZE.load(std::sync::atomic::Ordering::Relaxed)
}

static FRAME_SIZE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(16 << 10);

/// A TCP connection and an HTTP/2 handshake (hyper's default client windows).
async fn connect(addr: SocketAddr) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| err.to_string())?;
    tcp.set_nodelay(true).map_err(|err| err.to_string())?;
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_frame_size(frame_size())
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .map_err(|err| err.to_string())?;
    tokio::spawn(connection);
    Ok(h2)
}

/// Connects, opens the delta stream and subscribes to both types by wildcard.
async fn open_stream(
    id: usize,
    addr: SocketAddr,
) -> Result<(h2::SendStream<bytes::Bytes>, http::Response<h2::RecvStream>), String> {
    let h2 = connect(addr).await?;
    let mut h2 = h2.ready().await.map_err(|err| err.to_string())?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{}", xds_server::ads::DELTA_PATH))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|err| err.to_string())?;
    let (response, mut send) = h2
        .send_request(request, false)
        .map_err(|err| err.to_string())?;
    for type_url in [
        mesh_api::type_url::ADDRESS,
        mesh_api::type_url::AUTHORIZATION,
    ] {
        let subscribe = DeltaDiscoveryRequest {
            node: Some(mesh_api::envoy_core::Node {
                id: format!(
                    "ztunnel~10.1.0.{id}~ztunnel-{id}.istio-system~istio-system.svc.cluster.local"
                ),
                ..Default::default()
            }),
            type_url: type_url.into(),
            ..Default::default()
        };
        send.send_data(grpc_message(&subscribe), false)
            .map_err(|err| err.to_string())?;
    }
    let response = response.await.map_err(|err| err.to_string())?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP {}", response.status()));
    }
    Ok((send, response))
}

/// One simulated data plane: its own TCP connection and HTTP/2 stream (with
/// hyper's default client settings, as ztunnel's xDS client has), speaking
/// gRPC by hand so that reading responses costs little more than the kernel's
/// copy.
async fn client(
    id: usize,
    addr: SocketAddr,
    expected: usize,
    events: mpsc::UnboundedSender<Event>,
    updating: Arc<std::sync::atomic::AtomicBool>,
) {
    let result: Result<(), String> = async {
        let (mut send, response) = retrying(|| open_stream(id, addr)).await?;
        let mut body = response.into_body();
        let mut skimmer = Skimmer::default();
        let (mut addresses, mut authorizations, mut synced) = (0usize, false, false);
        let mut received = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|err| err.to_string())?;
            received += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
            let mut failure = None;
            skimmer.feed(&chunk, &mut |response: Skim| {
                let ack = DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                };
                if let Err(err) = send.send_data(grpc_message(&ack), false) {
                    failure = Some(err.to_string());
                }
                let now = Instant::now();
                if synced {
                    if response.resources > 0 && updating.load(std::sync::atomic::Ordering::Acquire)
                    {
                        let _ = events.send(Event::Updated(id, now));
                    }
                    return;
                }
                if response.type_url == mesh_api::type_url::ADDRESS {
                    addresses += response.resources;
                } else {
                    authorizations = true;
                }
                if addresses >= expected && authorizations {
                    synced = true;
                    let _ = events.send(Event::Synced(now, received));
                }
            })?;
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Ok(())
    }
    .await;
    if let Err(err) = result {
        let _ = events.send(Event::Failed(format!("client {id}: {err}")));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// What a baseline took: wall time until every client had all its bytes, and
/// the CPU time the server process and the clients spent on it.
struct Baseline {
    took: Duration,
    server_cpu: Duration,
    clients_cpu: Duration,
}

impl Baseline {
    fn print(&self, name: &str, bytes: usize, clients: usize, sync: Duration) {
        println!(
            "{name} baseline: the same {:.1} MB to each of {clients} connections in {:.2} s \
             (server CPU {:.2} s, clients' CPU {:.2} s); xDS sync / {name} = {:.2}x",
            bytes as f64 / 1e6,
            self.took.as_secs_f64(),
            self.server_cpu.as_secs_f64(),
            self.clients_cpu.as_secs_f64(),
            sync.as_secs_f64() / self.took.as_secs_f64(),
        );
    }
}

/// Asks the server process for a baseline sender (`command <bytes>`), then
/// runs `clients` receivers of `bytes` each against it at once.
async fn baseline<F, Receive>(
    to_server: &mut impl Write,
    next_line: &mut impl FnMut() -> String,
    server: u32,
    clients: usize,
    command: &str,
    bytes: usize,
    receive: F,
) -> Baseline
where
    F: Fn(SocketAddr, usize) -> Receive,
    Receive: Future<Output = Result<Instant, String>> + Send + 'static,
{
    writeln!(to_server, "{command} {bytes}").expect("baseline command");
    let addr: SocketAddr = tokio::task::block_in_place(next_line)
        .strip_prefix("baseline ")
        .expect("baseline address")
        .parse()
        .expect("addr");
    let cpu = CpuMeter::start(server);
    let started = Instant::now();
    let receivers: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(receive(addr, bytes)))
        .collect();
    let mut last = started;
    for receiver in receivers {
        last = last.max(
            receiver
                .await
                .expect("receiver task")
                .unwrap_or_else(|err| panic!("{command} baseline: {err}")),
        );
    }
    let (server_cpu, clients_cpu) = cpu.used();
    Baseline {
        took: last - started,
        server_cpu,
        clients_cpu,
    }
}

fn main() {
    let args = parse_args();
    if std::env::args().nth(1).as_deref() == Some("serve") {
        serve(&args);
        return;
    }
    raise_fd_limit();
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .arg("serve")
        .args(["--workloads", &args.workloads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server process");
    let pid = child.id();
    let mut to_server = child.stdin.take().expect("stdin");
    let mut from_server = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next_line = move || from_server.next().expect("server line").expect("read");

    assert_eq!(next_line(), "ready");
    let rss_empty = rss_kib(pid);
    writeln!(to_server, "go").expect("go");
    let loaded = next_line();
    let rss_loaded = rss_kib(pid);
    let addr: SocketAddr = next_line()
        .strip_prefix("listening ")
        .expect("listening")
        .parse()
        .expect("addr");
    let mut parts = loaded.split_whitespace().skip(1);
    let workloads: usize = parts
        .next()
        .and_then(|v| v.parse().ok())
        .expect("workloads");
    let services: usize = parts.next().and_then(|v| v.parse().ok()).expect("services");
    let load_secs = parts.next().unwrap_or("?").to_owned();
    println!(
        "store: {workloads} workloads, {services} services, built in {load_secs} s; \
         server RSS empty {rss_empty} KiB, loaded {rss_loaded} KiB"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (events, mut received) = mpsc::unbounded_channel();
        let updating = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let expected = workloads + services;
        let cpu = CpuMeter::start(pid);
        let started = Instant::now();
        for id in 0..args.clients {
            tokio::spawn(client(id, addr, expected, events.clone(), updating.clone()));
        }
        let mut synced = Vec::with_capacity(args.clients);
        let mut sync_bytes = 0;
        while synced.len() < args.clients {
            match received.recv().await.expect("events") {
                Event::Synced(at, bytes) => {
                    synced.push(at - started);
                    sync_bytes = sync_bytes.max(bytes);
                }
                Event::Failed(err) => panic!("{err}"),
                Event::Updated(..) => {}
            }
        }
        let (server_cpu, harness_cpu) = cpu.used();
        synced.sort();
        let all_synced = *synced.last().expect("clients");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_synced = rss_kib(pid);
        println!(
            "initial sync: {} clients x {} resources ({:.1} MB each): all synced in {:.2} s, \
             server CPU {:.2} s, clients' CPU {:.2} s (per client p50 {}, p99 {})",
            args.clients,
            expected,
            sync_bytes as f64 / 1e6,
            all_synced.as_secs_f64(),
            server_cpu.as_secs_f64(),
            harness_cpu.as_secs_f64(),
            millis(percentile(&synced, 0.5)),
            millis(percentile(&synced, 0.99)),
        );

        // The baselines: the same bytes over as many connections, as plain TCP
        // and as one HTTP/2 response each.
        let plain = baseline(
            &mut to_server,
            &mut next_line,
            pid,
            args.clients,
            "blast",
            sync_bytes,
            drain,
        )
        .await;
        plain.print("plain TCP", sync_bytes, args.clients, all_synced);
        let over_h2 = baseline(
            &mut to_server,
            &mut next_line,
            pid,
            args.clients,
            "stream",
            sync_bytes,
            h2_drain,
        )
        .await;
        over_h2.print("HTTP/2", sync_bytes, args.clients, all_synced);

        updating.store(true, std::sync::atomic::Ordering::Release);
        let mut latencies = Vec::new();
        let mut all_acked = Vec::new();
        for _ in 0..args.updates {
            let sent = Instant::now();
            writeln!(to_server, "update").expect("update");
            let mut seen = vec![false; args.clients];
            let mut count = 0;
            let mut last = Duration::ZERO;
            while count < args.clients {
                match received.recv().await.expect("events") {
                    Event::Updated(id, at) if !seen[id] => {
                        seen[id] = true;
                        count += 1;
                        let latency = at.saturating_duration_since(sent);
                        last = last.max(latency);
                        latencies.push(latency);
                    }
                    Event::Failed(err) => panic!("{err}"),
                    _ => {}
                }
            }
            all_acked.push(last);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        latencies.sort();
        all_acked.sort();
        println!(
            "update fan-out ({} updates x {} clients): update to ACK p50 {}, p99 {}, max {}; \
             to the last client's ACK: median {}",
            args.updates,
            args.clients,
            millis(percentile(&latencies, 0.5)),
            millis(percentile(&latencies, 0.99)),
            millis(percentile(&latencies, 1.0)),
            millis(percentile(&all_acked, 0.5)),
        );
        println!(
            "server memory: {:.0} B per workload (store), {:.1} KiB per client (synced, idle); \
             RSS synced {rss_synced} KiB",
            (rss_loaded.saturating_sub(rss_empty) as f64 * 1024.0) / workloads.max(1) as f64,
            rss_synced.saturating_sub(rss_loaded) as f64 / args.clients.max(1) as f64,
        );
    });
    drop(to_server);
    let _ = child.wait();
}
