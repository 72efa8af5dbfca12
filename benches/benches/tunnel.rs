//! The mesh against plain TCP between the same two network namespaces, in one
//! run, rounds interleaved (see the crate README). Needs root.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "../../ztunnel-core/tests/support/netns.rs"]
#[allow(dead_code, unreachable_pub)]
mod netns;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_benches::process::{cpu_time, resident_bytes};
use mesh_benches::stats::{median, percentile};
use netns::{Netns, Process, Topology, example, install_redirect_except};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const CONTROL_PLANE: &str = "10.77.0.1:15012";
const AGENT_TOKEN: &str = "bench-agent";
/// Mesh ports on the server pod (redirected) and their plain twins (exempt).
const ECHO: u16 = 8080;
const SINK: u16 = 8081;
const PLAIN_ECHO: u16 = 9090;
const PLAIN_SINK: u16 = 9091;
/// The mark that keeps plain-baseline client sockets out of the redirect.
const BYPASS_MARK: u32 = 1337;

struct Options {
    rounds: usize,
    seconds: u64,
    connections: usize,
    proxy_threads: usize,
    /// Figures to measure (`single`, `eight`, `rr`, `rate`, `memory`); all when empty.
    only: Vec<String>,
}

impl Options {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|name| name == figure)
    }
}

fn options() -> Options {
    let mut options = Options {
        rounds: 3,
        seconds: 3,
        connections: 10_000,
        proxy_threads: 1,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = || -> u64 {
            args.next()
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--rounds" => options.rounds = number() as usize,
            "--seconds" => options.seconds = number(),
            "--connections" => options.connections = number() as usize,
            "--proxy-threads" => options.proxy_threads = number() as usize,
            "--only" => {
                let names = args.next().expect("--only needs a comma-separated list");
                options.only = names.split(',').map(str::to_owned).collect();
            }
            // cargo bench passes --bench.
            _ => {}
        }
    }
    options
}

/// A proxy's resident memory.
fn rss(process: &Process) -> u64 {
    resident_bytes(process.pid()).expect("RSS")
}

fn manifest() -> String {
    let pod = |name: &str, account: &str, ip: &str, app: &str| {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
spec: {{serviceAccountName: {account}, nodeName: node-a}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}
"
        )
    };
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
{}{}",
        pod("client", "client", &Topology::workload_ip(0), "client"),
        pod("server", "server", &Topology::workload_ip(1), "server"),
    )
}

/// A multi-threaded runtime whose threads live in `netns`.
fn runtime_in(netns: &Netns) -> tokio::runtime::Runtime {
    let path = format!("/var/run/netns/{}", netns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        // Worker threads are created from this thread: they inherit its namespace.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
    .join()
    .expect("runtime thread")
}

/// Runs `future` on one of `runtime`'s workers (inside its namespace), not on
/// the calling thread as `block_on` alone would.
fn on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> T {
    runtime
        .block_on(runtime.spawn(future))
        .expect("the task finished")
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.split();
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
            let _ = writer.shutdown().await;
        });
    }
}

/// Reads until EOF, then answers with the byte count.
async fn serve_sink(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(&total.to_be_bytes()).await;
        });
    }
}

async fn connect(to: SocketAddr, bypass: bool) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if bypass {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &BYPASS_MARK)
            .map_err(std::io::Error::from)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(to).await
}

/// Sends for `seconds` on each of `streams` connections: the bytes received
/// and the time taken.
async fn bulk(to: SocketAddr, bypass: bool, streams: usize, seconds: u64) -> (u64, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut stream = connect(to, bypass).await.expect("connect");
            let chunk = vec![0x5au8; 256 << 10];
            while Instant::now() < deadline {
                stream.write_all(&chunk).await.expect("send");
            }
            stream.shutdown().await.expect("shutdown");
            let mut count = [0u8; 8];
            stream.read_exact(&mut count).await.expect("count");
            u64::from_be_bytes(count)
        }));
    }
    let mut total = 0u64;
    for task in tasks {
        total += task.await.expect("stream");
    }
    (total, started.elapsed())
}

/// 1 KiB request/response on one connection: (p50, p99).
async fn request_response(to: SocketAddr, bypass: bool, count: usize) -> (Duration, Duration) {
    let mut stream = connect(to, bypass).await.expect("connect");
    let request = vec![7u8; 1024];
    let mut response = vec![0u8; 1024];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 200 {
        let started = Instant::now();
        stream.write_all(&request).await.expect("request");
        stream.read_exact(&mut response).await.expect("response");
        if i >= 200 {
            samples.push(started.elapsed());
        }
    }
    (
        percentile(&samples, 50.0).expect("samples"),
        percentile(&samples, 99.0).expect("samples"),
    )
}

/// Connect, 1-byte echo, close, from `parallel` loops for `seconds`:
/// connections per second.
async fn connection_rate(to: SocketAddr, bypass: bool, parallel: usize, seconds: u64) -> f64 {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut stream = connect(to, bypass).await.expect("connect");
                stream.write_all(b"x").await.expect("write");
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.expect("echo");
                drop(stream);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("loop");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Opens `count` connections through the mesh, each with one exchange.
async fn open_many(to: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = connect(to, false).await.expect("connect");
        stream.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("echo");
        open.push(stream);
    }
    open
}

fn raise_open_files_limit() {
    use nix::sys::resource::getrlimit;
    use nix::sys::resource::{Resource, setrlimit};
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, most, most).is_err() {
        // Without CAP_SYS_RESOURCE: up to the hard limit.
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("limit");
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the open files limit");
    }
}

#[derive(Default)]
struct Figures {
    single: Vec<f64>,
    eight: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
    /// Both proxies' CPU time per byte in the bulk tests, in nanoseconds.
    single_cpu: Vec<f64>,
    eight_cpu: Vec<f64>,
}

/// The proxies' CPU time so far, together.
fn proxies_cpu(proxies: &[Process]) -> Duration {
    proxies
        .iter()
        .map(|process| cpu_time(process.pid()).expect("CPU time"))
        .sum()
}

/// The server pod's applications, in their own process (each end of 10,000
/// connections needs its own descriptors): echo and sink, mesh and plain.
fn serve_apps() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for port in [ECHO, PLAIN_ECHO] {
            let listener = TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
            tokio::spawn(serve_echo(listener));
        }
        for port in [SINK, PLAIN_SINK] {
            let listener = TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
            tokio::spawn(serve_sink(listener));
        }
        println!("serving");
        std::future::pending::<()>().await;
    });
}

fn main() {
    raise_open_files_limit();
    if std::env::args().any(|arg| arg == "--serve-apps") {
        serve_apps();
        return;
    }
    let options = options();
    let xds_serve = example("xds-server", "xds-serve", true);
    let ztunnel_run = example("ztunnel-core", "ztunnel-run", true);
    let topology = Topology::new("bench", 2);
    // Load-generator settings, for plain TCP and the mesh alike: the
    // connection test closes tens of thousands of connections, whose
    // TIME_WAIT entries would otherwise exhaust the ephemeral ports.
    for netns in &topology.workloads {
        netns::run(
            "ip",
            &[
                "netns",
                "exec",
                &netns.name,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ],
        );
    }
    let manifests = tempfile::tempdir().expect("tempdir");
    std::fs::write(manifests.path().join("cluster.yaml"), manifest()).expect("manifest");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let agent = format!("{AGENT_TOKEN}=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a");
    let _control_plane = Process::start(
        &topology.control,
        &xds_serve,
        &[
            "--manifests",
            manifests.path().to_str().expect("utf-8"),
            "--listen",
            CONTROL_PLANE,
            "--ca-dir",
            ca_dir.path().to_str().expect("utf-8"),
            "--node-agent",
            &agent,
        ],
        "listening on",
    );
    let root = ca_dir.path().join(mesh_ca::store::ROOT_CERT_FILE);
    let mut proxies = Vec::new();
    for (netns, uid) in topology.workloads.iter().zip([
        "Kubernetes//Pod/default/client",
        "Kubernetes//Pod/default/server",
    ]) {
        install_redirect_except(netns, &[PLAIN_ECHO, PLAIN_SINK]);
        proxies.push(Process::start(
            netns,
            &ztunnel_run,
            &[
                "--control-plane",
                CONTROL_PLANE,
                "--root",
                root.to_str().expect("utf-8"),
                "--token",
                AGENT_TOKEN,
                "--workload-uid",
                uid,
                "--worker-threads",
                &options.proxy_threads.to_string(),
            ],
            "ready",
        ));
    }
    let idle: Vec<u64> = proxies.iter().map(rss).collect();

    let _server = Process::start(
        &topology.workloads[1],
        &std::env::current_exe().expect("bench path"),
        &["--serve-apps"],
        "serving",
    );
    let client = runtime_in(&topology.workloads[0]);
    let server_ip = Topology::workload_ip(1);
    let at = |port: u16| -> SocketAddr { format!("{server_ip}:{port}").parse().expect("addr") };

    let mut plain = Figures::default();
    let mut mesh = Figures::default();
    for round in 1..=options.rounds {
        for (name, figures, bypass, echo, sink) in [
            ("plain", &mut plain, true, at(PLAIN_ECHO), at(PLAIN_SINK)),
            ("mesh", &mut mesh, false, at(ECHO), at(SINK)),
        ] {
            let seconds = options.seconds;
            // Both proxies' CPU time while `bulk` runs, per byte carried.
            let bulk_with_cpu = |streams: usize| -> (f64, f64) {
                let before = proxies_cpu(&proxies);
                let (bytes, elapsed) = on(&client, bulk(sink, bypass, streams, seconds));
                let cpu = proxies_cpu(&proxies) - before;
                (
                    bytes as f64 / elapsed.as_secs_f64(),
                    cpu.as_secs_f64() * 1e9 / bytes as f64,
                )
            };
            let (single, single_cpu) = if options.wants("single") {
                bulk_with_cpu(1)
            } else {
                (f64::NAN, f64::NAN)
            };
            let (eight, eight_cpu) = if options.wants("eight") {
                bulk_with_cpu(8)
            } else {
                (f64::NAN, f64::NAN)
            };
            let (p50, p99) = if options.wants("rr") {
                on(&client, request_response(echo, bypass, 5000))
            } else {
                (Duration::ZERO, Duration::ZERO)
            };
            let rate = if options.wants("rate") {
                on(&client, connection_rate(echo, bypass, 8, seconds))
            } else {
                f64::NAN
            };
            println!(
                "round {round} {name:>5}: 1 stream {:8.1} MiB/s | 8 streams {:8.1} MiB/s | 1 KiB RR p50 {:6.1} µs p99 {:6.1} µs | {:7.0} conn/s | proxies' CPU {:.2} / {:.2} ns/B",
                single / 1048576.0,
                eight / 1048576.0,
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                rate,
                single_cpu,
                eight_cpu,
            );
            figures.single_cpu.push(single_cpu);
            figures.eight_cpu.push(eight_cpu);
            figures.single.push(single);
            figures.eight.push(eight);
            figures.p50.push(p50.as_secs_f64() * 1e6);
            figures.p99.push(p99.as_secs_f64() * 1e6);
            figures.rate.push(rate);
            // Let TIME_WAIT sockets from the connection test drain a little.
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    let loaded: Vec<u64> = if options.wants("memory") {
        let _open = on(&client, open_many(at(ECHO), options.connections));
        std::thread::sleep(Duration::from_millis(500));
        proxies.iter().map(rss).collect()
    } else {
        idle.clone()
    };

    let m = |values: &[f64]| median(values).unwrap_or(f64::NAN);
    println!("\nmedians of {} rounds (mesh / plain TCP):", options.rounds);
    println!(
        "  single-stream throughput: {:.1} vs {:.1} MiB/s = {:.2}x",
        m(&mesh.single) / 1048576.0,
        m(&plain.single) / 1048576.0,
        m(&mesh.single) / m(&plain.single)
    );
    println!(
        "  8-stream throughput:      {:.1} vs {:.1} MiB/s = {:.2}x",
        m(&mesh.eight) / 1048576.0,
        m(&plain.eight) / 1048576.0,
        m(&mesh.eight) / m(&plain.eight)
    );
    println!(
        "  proxies' CPU per byte:    {:.2} ns (1 stream), {:.2} ns (8 streams), both proxies together",
        m(&mesh.single_cpu),
        m(&mesh.eight_cpu)
    );
    println!(
        "  1 KiB RR p50:             {:.1} vs {:.1} µs: +{:.1} µs",
        m(&mesh.p50),
        m(&plain.p50),
        m(&mesh.p50) - m(&plain.p50)
    );
    println!(
        "  1 KiB RR p99:             {:.1} vs {:.1} µs: +{:.1} µs",
        m(&mesh.p99),
        m(&plain.p99),
        m(&mesh.p99) - m(&plain.p99)
    );
    println!(
        "  connections/s:            {:.0} vs {:.0} = {:.2}x",
        m(&mesh.rate),
        m(&plain.rate),
        m(&mesh.rate) / m(&plain.rate)
    );
    for (i, name) in ["client proxy", "server proxy"].iter().enumerate() {
        let per_connection = loaded[i].saturating_sub(idle[i]) as f64 / options.connections as f64;
        println!(
            "  {name}: idle {:.1} MiB, with {} connections {:.1} MiB ({:.0} B per connection)",
            idle[i] as f64 / 1048576.0,
            options.connections,
            loaded[i] as f64 / 1048576.0,
            per_connection
        );
    }
    client.shutdown_background();
}
