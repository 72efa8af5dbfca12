//! Node mode's figures, in one run (see the crate README): a node namespace
//! with Debian's CNI plugins and ours in the chain, our node agent and
//! control plane in this process, and the node's data plane as a process of
//! its own: `ztunnel-run --node` (ours), and a real ztunnel in shared mode
//! when `--ztunnel PATH` gives one.
//!
//! - `add`: pod ADD (the start of the CNI chain) to the first byte proxied
//!   from the new pod, p50/p99 over `--pods` pods;
//! - `memory`: the data plane's resident memory idle with one pod, per
//!   additional pod, and per open connection;
//! - `same-node`: pod to pod on one node, plain TCP (two pods outside the
//!   mesh) against the same-node shortcut and HBONE through the same node
//!   proxy: throughput, 1 KiB round trips, connection rate.
//!
//! `cargo bench -p mesh-benches --bench node -- [--rounds 3] [--seconds 3]
//! [--pods 100] [--connections 1000] [--ztunnel PATH] [--only add,memory,same-node]`.
//! Needs root.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "../../cni-plugin/tests/support/mod.rs"]
#[allow(unused_imports, unused_macros)]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cni_plugin::agent::Labels;
use mesh_benches::load::{
    Latency, ROUND_TRIPS, bulk, connection_rate, on, request_response, runtime_in, serve_echo,
    serve_sink,
};
use mesh_benches::process::resident_bytes;
use mesh_benches::stats::{median, percentile};
use mesh_net::netns::Netns;
use support::{
    Backend, ControlPlaneParts, Daemon, Node, Pod, control_plane, listener_in, real_ztunnel_env,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "bench-node-a";
const ECHO: u16 = 8080;
const SINK: u16 = 8081;
const PATIENCE: Duration = Duration::from_secs(60);

struct Options {
    rounds: usize,
    seconds: u64,
    pods: usize,
    connections: usize,
    ztunnel: Option<PathBuf>,
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
        pods: 100,
        connections: 1000,
        ztunnel: None,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--rounds" => options.rounds = value().parse().expect("--rounds N"),
            "--seconds" => options.seconds = value().parse().expect("--seconds N"),
            "--pods" => options.pods = value().parse().expect("--pods N"),
            "--connections" => options.connections = value().parse().expect("--connections N"),
            "--ztunnel" => options.ztunnel = Some(PathBuf::from(value())),
            "--only" => options.only = value().split(',').map(str::to_owned).collect(),
            // cargo bench passes --bench.
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    options
}

/// Builds with cargo (the bench's own), `args` after `build --quiet`.
fn cargo_build(args: &[&str]) {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet"])
        .args(args)
        .status()
        .expect("cargo");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The target directory (this bench runs from `target/release/deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    exe.ancestors().nth(3).expect("target dir").to_owned()
}

/// Which data plane serves the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carrier {
    /// `ztunnel-run --node`, with or without the same-node shortcut.
    Ours { shortcut: bool },
    /// A real ztunnel in shared mode.
    Ztunnel,
}

impl Carrier {
    fn name(self) -> &'static str {
        match self {
            Self::Ours { shortcut: true } => "ours",
            Self::Ours { shortcut: false } => "ours (HBONE, no shortcut)",
            Self::Ztunnel => "ztunnel",
        }
    }
}

/// A node with its agent, its control plane (in this process, on the node's
/// loopback) and its data plane process.
struct Cluster {
    node: Node,
    dir: PathBuf,
    control: ControlPlaneParts,
    data_plane: Option<Daemon>,
    /// Pods held (kept alive).
    pods: Vec<(Pod, IpAddr)>,
}

impl Cluster {
    async fn new(plugin: &Path) -> Self {
        let mut node = Node::new(Backend::Nftables);
        node.plugin = plugin.to_owned();
        node.pods
            .set_namespace("plain", Labels::from([("app".to_owned(), "x".to_owned())]));
        let manifest = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
";
        let control = control_plane(
            listener_in(&node.netns.open()),
            manifest,
            &[(TOKEN, "node-a")],
        )
        .await;
        let dir = node.dir.path().join("data-plane");
        let tokens_dir = dir.join("var/run/secrets/tokens");
        std::fs::create_dir_all(&tokens_dir).expect("dirs");
        std::fs::write(tokens_dir.join("istio-token"), TOKEN).expect("token");
        control.write_root(&dir.join("root.pem"));
        node.start_agent();
        Self {
            node,
            dir,
            control,
            data_plane: None,
            pods: Vec::new(),
        }
    }

    /// Starts `carrier` as the node's data plane; returns once the agent
    /// has it.
    async fn start(&mut self, carrier: Carrier, ztunnel_run: &Path, ztunnel: Option<&Path>) {
        let root = self.dir.join("root.pem").display().to_string();
        let zds = self.node.zds_socket().display().to_string();
        let daemon = match carrier {
            Carrier::Ours { shortcut } => {
                let config = self.dir.join("node.yaml");
                std::fs::write(&config, format!("node: {{sameNodeShortcut: {shortcut}}}\n"))
                    .expect("config");
                let token = self.dir.join("var/run/secrets/tokens/istio-token");
                Daemon::start(
                    &self.node.netns.name,
                    &self.dir,
                    &[],
                    ztunnel_run,
                    &[
                        "--config".into(),
                        config.display().to_string(),
                        "--zds-socket".into(),
                        zds,
                        "--control-plane".into(),
                        self.control.address.to_string(),
                        "--root".into(),
                        root,
                        "--token-file".into(),
                        token.display().to_string(),
                    ],
                )
            }
            Carrier::Ztunnel => {
                let env = real_ztunnel_env(self.control.address, &root, &zds, "warn");
                Daemon::start(
                    &self.node.netns.name,
                    &self.dir,
                    &env,
                    ztunnel.expect("--ztunnel"),
                    &[],
                )
            }
        };
        let mut view = self.node.agent().watch();
        if tokio::time::timeout(PATIENCE, view.wait_for(|view| view.data_planes == 1))
            .await
            .is_err()
        {
            panic!("{} never connected:\n{}", carrier.name(), daemon.output());
        }
        self.data_plane = Some(daemon);
    }

    /// Stops the data plane (the agent keeps the pods captured).
    async fn stop(&mut self) {
        drop(self.data_plane.take());
        let mut view = self.node.agent().watch();
        tokio::time::timeout(PATIENCE, view.wait_for(|view| view.data_planes == 0))
            .await
            .expect("the agent saw its data plane go")
            .expect("agent running");
    }

    fn rss(&self) -> u64 {
        let pid = self.data_plane.as_ref().expect("running").child.id();
        resident_bytes(pid).expect("RSS")
    }

    /// Adds a pod through the CNI chain and tells the control plane its IP.
    async fn add(&mut self, namespace: &str, name: &str) -> (usize, IpAddr) {
        let (pod, ip, _) = self
            .node
            .add_pod(&self.control, namespace, name, name)
            .await;
        self.pods.push((pod, ip));
        (self.pods.len() - 1, ip)
    }

    fn netns(&self, pod: usize) -> Netns {
        self.pods[pod].0.netns.open()
    }

    fn netns_path(&self, pod: usize) -> String {
        self.pods[pod].0.netns.path()
    }

    /// Removes every pod through the CNI chain.
    async fn delete_pods(&mut self) {
        for (pod, _) in std::mem::take(&mut self.pods) {
            self.node.chain("DEL", &pod, None).await;
        }
    }

    async fn shut_down(mut self) {
        self.delete_pods().await;
        self.stop().await;
        self.node.stop_agent().await;
        let _ = self.control.handle.drain(Duration::from_secs(5)).await;
    }
}

/// An echo application on `ECHO` and a sink on `SINK`, on `runtime` (whose
/// threads live in the pod's namespace).
async fn serve_apps(runtime: &tokio::runtime::Runtime) {
    runtime
        .spawn(async {
            let echo = TcpListener::bind(("0.0.0.0", ECHO)).await.expect("echo");
            let sink = TcpListener::bind(("0.0.0.0", SINK)).await.expect("sink");
            tokio::spawn(serve_echo(echo));
            tokio::spawn(serve_sink(sink));
        })
        .await
        .expect("apps");
}

/// From inside `netns`: connect to `to`, one byte there and back.
async fn first_byte(netns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = netns.enter(tokio::net::TcpSocket::new_v4)??;
    socket.set_nodelay(true)?;
    let mut stream = socket.connect(to).await?;
    stream.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(stream)
}

/// What one carrier's pods cost and how fast they start.
#[derive(Default)]
struct PodFigures {
    add_to_first_byte: Vec<Duration>,
    /// Each plugin's ADD (`bridge`, `host-local` within it, ours).
    plugin_add: std::collections::BTreeMap<String, Vec<Duration>>,
    idle_one_pod: Vec<u64>,
    per_pod: Vec<f64>,
    per_connection: Vec<f64>,
    failures: usize,
}

/// A fresh node with `carrier`: one server pod (idle memory), then
/// `options.pods` client pods each timed from ADD to its first byte echoed
/// through the data plane, then `options.connections` held open.
async fn pods_round(
    plugin: &Path,
    carrier: Carrier,
    ztunnel_run: &Path,
    options: &Options,
    figures: &mut PodFigures,
) {
    let mut cluster = Cluster::new(plugin).await;
    cluster
        .start(carrier, ztunnel_run, options.ztunnel.as_deref())
        .await;
    let (server, server_ip) = cluster.add("default", "server").await;
    let server_runtime = runtime_in(&cluster.netns_path(server));
    serve_apps(&server_runtime).await;
    let echo = SocketAddr::new(server_ip, ECHO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = cluster.rss();
    for i in 0..options.pods {
        let started = Instant::now();
        let (client, _) = cluster.add("default", &format!("client-{i}")).await;
        let netns = cluster.netns(client);
        // A data plane that learns of the pods over xDS (ztunnel) may
        // refuse the very first connection: retried, and counted.
        let mut tries = 0;
        loop {
            tries += 1;
            match tokio::time::timeout(PATIENCE, first_byte(&netns, echo)).await {
                Ok(Ok(_)) => break,
                _ if tries < 50 => {
                    figures.failures += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => panic!("{}: no first byte: {other:?}", carrier.name()),
            }
        }
        figures.add_to_first_byte.push(started.elapsed());
    }
    for (name, took) in cluster.node.timings.lock().expect("timings").drain(..) {
        if name.starts_with("ADD") {
            figures.plugin_add.entry(name).or_default().push(took);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = cluster.rss();
    figures.idle_one_pod.push(idle);
    figures
        .per_pod
        .push((loaded as f64 - idle as f64) / options.pods as f64);
    if options.connections > 0 {
        let netns = cluster.netns(1);
        let mut open = Vec::with_capacity(options.connections);
        for _ in 0..options.connections {
            open.push(first_byte(&netns, echo).await.expect("connection"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with_connections = cluster.rss();
        figures
            .per_connection
            .push((with_connections as f64 - loaded as f64) / options.connections as f64);
        drop(open);
    }
    cluster.shut_down().await;
    server_runtime.shutdown_background();
}

#[derive(Default)]
struct SameNode {
    throughput: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn m(values: &[f64]) -> f64 {
    median(values).unwrap_or(f64::NAN)
}

fn main() {
    let options = options();
    raise_open_files_limit();
    eprintln!("building ztunnel-run (proxy profile) and podless-cni (release)...");
    cargo_build(&[
        "-p",
        "ztunnel-core",
        "--example",
        "ztunnel-run",
        "--profile",
        "proxy",
    ]);
    cargo_build(&["-p", "podless-cni", "--bin", "podless-cni", "--release"]);
    let target = target_dir();
    let ztunnel_run = target.join("proxy/examples/ztunnel-run");
    let plugin = target.join("release/podless-cni");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(&options, &plugin, &ztunnel_run));
}

async fn run(options: &Options, plugin: &Path, ztunnel_run: &Path) {
    let mut carriers = vec![Carrier::Ours { shortcut: true }];
    if options.ztunnel.is_some() {
        carriers.push(Carrier::Ztunnel);
    }
    if options.wants("add") || options.wants("memory") {
        let mut figures: Vec<PodFigures> = carriers.iter().map(|_| PodFigures::default()).collect();
        for round in 0..options.rounds {
            for (carrier, figures) in carriers.iter().zip(&mut figures) {
                eprintln!(
                    "round {}: {} pods with {}",
                    round + 1,
                    options.pods,
                    carrier.name()
                );
                pods_round(plugin, *carrier, ztunnel_run, options, figures).await;
            }
        }
        println!(
            "\nPod ADD to first proxied byte ({} pods x {} rounds), and memory (median of rounds):",
            options.pods, options.rounds
        );
        for (carrier, figures) in carriers.iter().zip(&figures) {
            let at = |p| {
                percentile(&figures.add_to_first_byte, p)
                    .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
            };
            println!(
                "  {:<8} ADD->first byte p50 {:6.1} ms  p99 {:6.1} ms  (refused first tries: {})  \
                 idle with one pod {:5.2} MiB  per pod {:6.1} KiB  per connection {:5.2} KiB",
                carrier.name(),
                at(50.0),
                at(99.0),
                figures.failures,
                m(&figures
                    .idle_one_pod
                    .iter()
                    .map(|&b| b as f64)
                    .collect::<Vec<_>>())
                    / 1048576.0,
                m(&figures.per_pod) / 1024.0,
                m(&figures.per_connection) / 1024.0,
            );
        }
        for (carrier, figures) in carriers.iter().zip(&figures) {
            for (name, took) in &figures.plugin_add {
                let at = |p| percentile(took, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
                println!(
                    "  {:<8} of which {name}: p50 {:6.1} ms  p99 {:6.1} ms",
                    carrier.name(),
                    at(50.0),
                    at(99.0)
                );
            }
        }
        if let [ours, theirs] = &figures[..] {
            println!(
                "  ours/ztunnel: per pod {:.2}x, per connection {:.2}x, idle {:.2}x",
                m(&ours.per_pod) / m(&theirs.per_pod),
                m(&ours.per_connection) / m(&theirs.per_connection),
                m(&ours
                    .idle_one_pod
                    .iter()
                    .map(|&b| b as f64)
                    .collect::<Vec<_>>())
                    / m(&theirs
                        .idle_one_pod
                        .iter()
                        .map(|&b| b as f64)
                        .collect::<Vec<_>>()),
            );
        }
    }
    if options.wants("same-node") {
        same_node(options, plugin, ztunnel_run).await;
    }
}

/// Pod to pod on one node: plain TCP between two pods outside the mesh,
/// and between two enrolled pods through the node proxy with the shortcut
/// and with HBONE, rounds interleaved.
async fn same_node(options: &Options, plugin: &Path, ztunnel_run: &Path) {
    let mut cluster = Cluster::new(plugin).await;
    cluster
        .start(Carrier::Ours { shortcut: true }, ztunnel_run, None)
        .await;
    let (echo, echo_ip) = cluster.add("default", "echo").await;
    let (shell, _) = cluster.add("default", "shell").await;
    let (plain_echo, plain_echo_ip) = cluster.add("plain", "echo").await;
    let (plain_shell, _) = cluster.add("plain", "shell").await;
    let echo_runtime = runtime_in(&cluster.netns_path(echo));
    let plain_echo_runtime = runtime_in(&cluster.netns_path(plain_echo));
    serve_apps(&echo_runtime).await;
    serve_apps(&plain_echo_runtime).await;
    let shell_runtime = Arc::new(runtime_in(&cluster.netns_path(shell)));
    let plain_runtime = Arc::new(runtime_in(&cluster.netns_path(plain_shell)));
    let names = ["plain TCP", "shortcut", "HBONE"];
    let mut figures: [SameNode; 3] = Default::default();
    for round in 0..options.rounds {
        for (index, name) in names.iter().enumerate() {
            eprintln!("round {}: same node, {name}", round + 1);
            let (client, ip) = match index {
                0 => (plain_runtime.clone(), plain_echo_ip),
                _ => (shell_runtime.clone(), echo_ip),
            };
            if index > 0 {
                cluster.stop().await;
                cluster
                    .start(
                        Carrier::Ours {
                            shortcut: index == 1,
                        },
                        ztunnel_run,
                        None,
                    )
                    .await;
            }
            let seconds = options.seconds;
            let measured = tokio::task::spawn_blocking(move || {
                let (bytes, took) = on(&client, bulk(SocketAddr::new(ip, SINK), false, 1, seconds));
                let latency: Latency = on(
                    &client,
                    request_response(SocketAddr::new(ip, ECHO), false, ROUND_TRIPS),
                );
                let (count, rate_took) = on(
                    &client,
                    connection_rate(SocketAddr::new(ip, ECHO), false, 4, seconds),
                );
                (
                    bytes as f64 / took.as_secs_f64() / 1048576.0,
                    micros(latency.p50),
                    micros(latency.p99),
                    count as f64 / rate_took.as_secs_f64(),
                )
            })
            .await
            .expect("measured");
            let figure = &mut figures[index];
            figure.throughput.push(measured.0);
            figure.p50.push(measured.1);
            figure.p99.push(measured.2);
            figure.rate.push(measured.3);
        }
    }
    println!(
        "\nSame node, pod to pod (median of {} rounds):",
        options.rounds
    );
    for (name, figure) in names.iter().zip(&figures) {
        println!(
            "  {name:<10} {:8.0} MiB/s  RR p50 {:7.1} us  p99 {:7.1} us  {:7.0} conn/s",
            m(&figure.throughput),
            m(&figure.p50),
            m(&figure.p99),
            m(&figure.rate)
        );
    }
    let [plain, shortcut, hbone] = &figures;
    let added = |figure: &SameNode, p: fn(&SameNode) -> &Vec<f64>| m(p(figure)) - m(p(plain));
    println!(
        "  added latency p50: shortcut {:.1} us, HBONE {:.1} us ({:.2}x); p99: {:.1} us vs {:.1} us ({:.2}x)",
        added(shortcut, |f| &f.p50),
        added(hbone, |f| &f.p50),
        added(shortcut, |f| &f.p50) / added(hbone, |f| &f.p50),
        added(shortcut, |f| &f.p99),
        added(hbone, |f| &f.p99),
        added(shortcut, |f| &f.p99) / added(hbone, |f| &f.p99),
    );
    println!(
        "  throughput shortcut/HBONE {:.2}x, connection rate shortcut/HBONE {:.2}x",
        m(&shortcut.throughput) / m(&hbone.throughput),
        m(&shortcut.rate) / m(&hbone.rate),
    );
    cluster.shut_down().await;
    echo_runtime.shutdown_background();
    plain_echo_runtime.shutdown_background();
    for runtime in [shell_runtime, plain_runtime] {
        if let Ok(runtime) = Arc::try_unwrap(runtime) {
            runtime.shutdown_background();
        }
    }
}

fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
