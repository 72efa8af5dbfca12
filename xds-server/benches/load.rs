//! The xDS load harness: N simulated delta clients against a server holding W
//! workloads and W/10 services.
//!
//! ```sh
//! cargo bench -p xds-server --bench load -- --clients 1000 --workloads 100000 --updates 20
//! ```
//!
//! The server runs in a child process (this binary with `serve`), so its memory
//! is measured alone: resident memory with an empty store, after loading the
//! workloads, and with every client synced. Each client is its own HTTP/2
//! connection and delta stream, subscribing to both types by wildcard and ACKing
//! every response, as a ztunnel does. Clients read responses with a skimming
//! decoder (type URL, nonce, number of resources) instead of decoding every
//! resource: the harness measures the server, and decoding 100,000 resources per
//! client in 1,000 clients would measure the harness.
//!
//! Reported: the time until every client holds the full state; for each update
//! (one workload changed), the time from the change to each client's ACK, as
//! p50/p99/max over all clients and updates; memory per workload and per client.

#![allow(clippy::print_stdout, clippy::print_stderr, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Buf;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::prost::Message;
use tokio::sync::mpsc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use xds_server::{ClientAuth, MeshConfig, Object, Store, XdsServer};

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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = XdsServer::builder()
            .store(store.clone())
            .client_auth(ClientAuth::anonymous())
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
            if command == "update" {
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

// ---------------------------------------------------------------- client side

/// What a client needs of a response.
#[derive(Debug, Default)]
struct Skim {
    type_url: String,
    nonce: String,
    resources: usize,
}

/// Reads a varint from the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Reads the top-level fields of a `DeltaDiscoveryResponse`, counting resources
/// without decoding them.
fn skim(mut bytes: &[u8]) -> Result<Skim, tonic::Status> {
    let bad = |what: &str| tonic::Status::internal(format!("bad response: {what}"));
    let mut skim = Skim::default();
    while !bytes.is_empty() {
        let key = varint(&mut bytes).ok_or_else(|| bad("key"))?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut bytes).ok_or_else(|| bad("varint"))?;
            }
            2 => {
                let len = varint(&mut bytes).ok_or_else(|| bad("length"))? as usize;
                if len > bytes.len() {
                    return Err(bad("truncated"));
                }
                let (value, rest) = bytes.split_at(len);
                bytes = rest;
                match field {
                    2 => skim.resources += 1,
                    4 => skim.type_url = String::from_utf8_lossy(value).into_owned(),
                    5 => skim.nonce = String::from_utf8_lossy(value).into_owned(),
                    _ => {}
                }
            }
            _ => return Err(bad("wire type")),
        }
    }
    Ok(skim)
}

#[derive(Clone, Copy, Default)]
struct SkimCodec;

struct RequestEncoder;
struct SkimDecoder;

impl Codec for SkimCodec {
    type Encode = DeltaDiscoveryRequest;
    type Decode = Skim;
    type Encoder = RequestEncoder;
    type Decoder = SkimDecoder;
    fn encoder(&mut self) -> RequestEncoder {
        RequestEncoder
    }
    fn decoder(&mut self) -> SkimDecoder {
        SkimDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = DeltaDiscoveryRequest;
    type Error = tonic::Status;
    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|err| tonic::Status::internal(err.to_string()))
    }
}

impl Decoder for SkimDecoder {
    type Item = Skim;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Skim>, Self::Error> {
        // One message, contiguous in tonic's buffer.
        let len = src.remaining();
        let skimmed = skim(&src.chunk()[..len]);
        src.advance(len);
        skimmed.map(Some)
    }
}

enum Event {
    Synced(Instant),
    Updated(usize, Instant),
    Failed(String),
}

async fn client(
    id: usize,
    addr: SocketAddr,
    expected: usize,
    events: mpsc::UnboundedSender<Event>,
    updating: Arc<std::sync::atomic::AtomicBool>,
) {
    let result: Result<(), String> = async {
        let endpoint =
            Channel::from_shared(format!("http://{addr}")).map_err(|err| err.to_string())?;
        // A thousand clients at once can overflow the listen backlog: retry.
        let mut attempts = 0;
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(err) if attempts < 20 => {
                    attempts += 1;
                    tracing::debug!(%err, "connect failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(err.to_string()),
            }
        };
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(200 << 20);
        grpc.ready().await.map_err(|err| err.to_string())?;
        let (requests, rx) = mpsc::channel(16);
        for type_url in [mesh_api::type_url::ADDRESS, mesh_api::type_url::AUTHORIZATION] {
            let _ = requests
                .send(DeltaDiscoveryRequest {
                    node: Some(mesh_api::envoy_core::Node {
                        id: format!("ztunnel~10.1.0.{id}~ztunnel-{id}.istio-system~istio-system.svc.cluster.local"),
                        ..Default::default()
                    }),
                    type_url: type_url.into(),
                    ..Default::default()
                })
                .await;
        }
        let path = http::uri::PathAndQuery::from_static(xds_server::ads::DELTA_PATH);
        let mut responses = grpc
            .streaming(
                tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
                path,
                SkimCodec,
            )
            .await
            .map_err(|err| err.to_string())?
            .into_inner();
        let (mut addresses, mut authorizations) = (0usize, false);
        let mut synced = false;
        while let Some(response) = responses.message().await.map_err(|err| err.to_string())? {
            let _ = requests
                .send(DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await;
            let now = Instant::now();
            if synced {
                if response.resources > 0
                    && updating.load(std::sync::atomic::Ordering::Acquire)
                {
                    let _ = events.send(Event::Updated(id, now));
                }
                continue;
            }
            if response.type_url == mesh_api::type_url::ADDRESS {
                addresses += response.resources;
            } else {
                authorizations = true;
            }
            if addresses >= expected && authorizations {
                synced = true;
                let _ = events.send(Event::Synced(now));
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
        let cpu_before = cpu_time(pid);
        let started = Instant::now();
        for id in 0..args.clients {
            tokio::spawn(client(id, addr, expected, events.clone(), updating.clone()));
        }
        let mut synced = Vec::with_capacity(args.clients);
        while synced.len() < args.clients {
            match received.recv().await.expect("events") {
                Event::Synced(at) => synced.push(at - started),
                Event::Failed(err) => panic!("{err}"),
                Event::Updated(..) => {}
            }
        }
        let server_cpu = cpu_time(pid) - cpu_before;
        synced.sort();
        let all_synced = *synced.last().expect("clients");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_synced = rss_kib(pid);
        println!(
            "initial sync: {} clients x {} resources: all synced in {:.2} s, \
             server CPU {:.2} s (per client p50 {}, p99 {})",
            args.clients,
            expected,
            all_synced.as_secs_f64(),
            server_cpu.as_secs_f64(),
            millis(percentile(&synced, 0.5)),
            millis(percentile(&synced, 0.99)),
        );

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
