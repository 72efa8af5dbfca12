//! The mesh against plain TCP between the same two network namespaces, in one
//! run, rounds interleaved (see the crate README). Needs root.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "../../ztunnel-core/tests/support/netns.rs"]
#[allow(dead_code, unreachable_pub)]
mod netns;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_benches::load::{
    BYPASS_MARK, Latency, ROUND_TRIPS, RR_WARM_UP, bulk, connect, connection_rate, on, open_many,
    request_response, runtime_in, serve_echo, serve_sink,
};
use mesh_benches::process::{
    CpuTimes, context_switches, cpu_times, machine_busy, minor_faults, resident_bytes,
};
use mesh_benches::stats::{median, percentile};
use netns::{Netns, Process, Topology, example, install_redirect_except, ztunnel_run_args};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

const CONTROL_PLANE_IP: &str = "10.77.0.1";
const CONTROL_PLANE: &str = "10.77.0.1:15012";
const AGENT_TOKEN: &str = "bench-agent";
/// Mesh ports on the server pod (redirected) and their plain twins (exempt).
const ECHO: u16 = 8080;
const SINK: u16 = 8081;
const PLAIN_ECHO: u16 = 9090;
const PLAIN_SINK: u16 = 9091;

struct Options {
    rounds: usize,
    seconds: u64,
    connections: usize,
    proxy_threads: usize,
    /// A real ztunnel binary, measured in the same run as another carrier.
    ztunnel: Option<PathBuf>,
    /// Another build of our `ztunnel-run` (an earlier commit's), measured in
    /// the same run: the before of a before/after comparison.
    baseline: Option<PathBuf>,
    /// Runtime threads of the baseline's proxies (default: as ours).
    baseline_threads: Option<usize>,
    /// With `--ztunnel`: also ours and ztunnel facing each other, each way.
    mixed: bool,
    /// Figures to measure (`single`, `eight`, `rr`, `rate`, `memory`); all when empty.
    /// `attacks` (only when named) runs the attacks on our proxy instead.
    only: Vec<String>,
}

impl Options {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|name| name == figure)
    }

    fn named(&self, figure: &str) -> bool {
        self.only.iter().any(|name| name == figure)
    }
}

fn options() -> Options {
    let mut options = Options {
        rounds: 3,
        seconds: 3,
        connections: 10_000,
        proxy_threads: 1,
        ztunnel: None,
        baseline: None,
        baseline_threads: None,
        mixed: false,
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
            "--baseline-threads" => options.baseline_threads = Some(number() as usize),
            "--mixed" => options.mixed = true,
            "--ztunnel" => {
                options.ztunnel = Some(args.next().expect("--ztunnel needs a path").into());
            }
            "--baseline" => {
                options.baseline = Some(args.next().expect("--baseline needs a path").into());
            }
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

/// Builds an example of the workspace with the cargo `profile` (a bench may;
/// tests never do), and returns its path.
fn build_example(package: &str, name: &str, profile: &str) -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--example", name])
        .args(["--profile", profile])
        .status()
        .expect("cargo");
    assert!(status.success(), "building the {name} example failed");
    example(package, name, profile)
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

/// What carries the traffic between the two pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carrier {
    /// Plain TCP, around the redirect.
    Plain,
    /// Our `ztunnel-core` (`ztunnel-run`) in each pod.
    Ours,
    /// A real ztunnel in each pod (`--ztunnel`), dedicated mode.
    Ztunnel,
    /// An earlier build of ours in each pod (`--baseline`).
    Baseline,
    /// Ours in the client pod, a real ztunnel in the server pod (`--mixed`):
    /// HBONE from our client side to ztunnel's server side.
    OursToZtunnel,
    /// A real ztunnel in the client pod, ours in the server pod (`--mixed`).
    ZtunnelToOurs,
}

impl Carrier {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Ours => "ours",
            Self::Ztunnel => "ztunnel",
            Self::Baseline => "before",
            Self::OursToZtunnel => "ours→zt",
            Self::ZtunnelToOurs => "zt→ours",
        }
    }
}

/// Starts each carrier's proxies in the two pods.
struct Launcher<'a> {
    topology: &'a Topology,
    ztunnel_run: &'a Path,
    root: &'a Path,
    ztunnel_dir: &'a Path,
    options: &'a Options,
}

/// The pods, as (name, workload uid); each pod's service account is its name.
const PODS: [(&str, &str); 2] = [
    ("client", "Kubernetes//Pod/default/client"),
    ("server", "Kubernetes//Pod/default/server"),
];

impl Launcher<'_> {
    /// The client pod's proxy, then the server pod's (none for plain TCP).
    fn start(&self, carrier: Carrier) -> Vec<Process> {
        self.topology
            .workloads
            .iter()
            .zip(PODS)
            .enumerate()
            .filter_map(|(pod, (netns, (name, uid)))| match carrier {
                Carrier::Plain => None,
                Carrier::OursToZtunnel | Carrier::ZtunnelToOurs => {
                    let ours_in_client = carrier == Carrier::OursToZtunnel;
                    Some(if (pod == 0) == ours_in_client {
                        self.ours(netns, uid, self.ztunnel_run, self.options.proxy_threads)
                    } else {
                        self.ztunnel(netns, name)
                    })
                }
                Carrier::Ours => {
                    Some(self.ours(netns, uid, self.ztunnel_run, self.options.proxy_threads))
                }
                Carrier::Baseline => Some(
                    self.ours(
                        netns,
                        uid,
                        self.options.baseline.as_deref().expect("--baseline"),
                        self.options
                            .baseline_threads
                            .unwrap_or(self.options.proxy_threads),
                    ),
                ),
                Carrier::Ztunnel => Some(self.ztunnel(netns, name)),
            })
            .collect()
    }

    fn ours(&self, netns: &Netns, uid: &str, program: &Path, threads: usize) -> Process {
        let root = self.root.to_str().expect("utf-8");
        let threads = threads.to_string();
        let mut args = ztunnel_run_args(CONTROL_PLANE, root, AGENT_TOKEN, uid);
        args.extend(["--worker-threads", &threads]);
        Process::start(netns, program, &args, "ready")
    }

    /// A real ztunnel serving the pod `name` (service account `name`),
    /// authenticated with its own token, taking config and certificates from
    /// our control plane. It reads its token from a path relative to its
    /// working directory.
    fn ztunnel(&self, netns: &Netns, name: &str) -> Process {
        let program = self.options.ztunnel.as_deref().expect("--ztunnel");
        let dir = self.ztunnel_dir.join(name);
        let tokens = dir.join("var/run/secrets/tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        std::fs::write(tokens.join("istio-token"), ztunnel_token(name)).expect("token");
        let address = format!("https://{CONTROL_PLANE}");
        let root = self.root.to_str().expect("utf-8");
        let pod = format!("ztunnel-{name}");
        let workload = format!("default/{name}/{name}");
        let mark = BYPASS_MARK.to_string();
        Process::start_in(
            netns,
            &dir,
            &[
                ("XDS_ADDRESS", &address),
                ("CA_ADDRESS", &address),
                ("XDS_ROOT_CA", root),
                ("CA_ROOT_CA", root),
                ("NODE_NAME", "node-a"),
                ("POD_NAME", &pod),
                ("POD_NAMESPACE", "default"),
                ("CLUSTER_ID", "Kubernetes"),
                ("PROXY_MODE", "dedicated"),
                ("PROXY_WORKLOAD_INFO", &workload),
                ("ENABLE_ORIG_SRC", "false"),
                ("PACKET_MARK", &mark),
            ],
            program,
            "marking server ready",
        )
    }
}

/// The bearer token a ztunnel in pod `name` presents.
fn ztunnel_token(name: &str) -> String {
    format!("ztunnel-{name}")
}

#[derive(Default)]
struct Figures {
    single: Vec<f64>,
    eight: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// Both proxies' CPU time per 1 KiB round trip, in microseconds.
    rr_cpu: Vec<f64>,
    rate: Vec<f64>,
    /// Both proxies' CPU time per byte in the bulk tests, in nanoseconds.
    single_cpu: Vec<f64>,
    eight_cpu: Vec<f64>,
    /// Both proxies' CPU time per connection in the rate test, in
    /// microseconds: all of it, and the part in user space.
    rate_cpu: Vec<f64>,
    rate_user: Vec<f64>,
    /// The whole machine's busy CPU time per connection in the rate test
    /// (applications, proxies, kernel), in microseconds.
    rate_machine: Vec<f64>,
    /// Each proxy's resident bytes (client pod, server pod), idle and with
    /// `--connections` open.
    idle: Vec<u64>,
    loaded: Vec<u64>,
}

fn m(values: &[f64]) -> f64 {
    median(values).unwrap_or(f64::NAN)
}

impl Figures {
    /// Medians against plain TCP.
    fn summarize(&self, plain: &Figures, options: &Options) {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mib = 1048576.0;
        println!(
            "  single-stream throughput: {:.1} vs {:.1} MiB/s = {:.2}x",
            m(&self.single) / mib,
            m(&plain.single) / mib,
            m(&self.single) / m(&plain.single)
        );
        println!(
            "  8-stream throughput:      {:.1} vs {:.1} MiB/s = {:.2}x",
            m(&self.eight) / mib,
            m(&plain.eight) / mib,
            m(&self.eight) / m(&plain.eight)
        );
        println!(
            "  proxies' CPU per byte:    {:.2} ns (1 stream), {:.2} ns (8 streams), both proxies together",
            m(&self.single_cpu),
            m(&self.eight_cpu)
        );
        println!(
            "  1 KiB RR p50:             {:.1} vs {:.1} µs: +{:.1} µs",
            m(&self.p50),
            m(&plain.p50),
            m(&self.p50) - m(&plain.p50)
        );
        println!(
            "  1 KiB RR p99:             {:.1} vs {:.1} µs: +{:.1} µs",
            m(&self.p99),
            m(&plain.p99),
            m(&self.p99) - m(&plain.p99)
        );
        println!("  proxies' CPU per RR:      {:.1} µs", m(&self.rr_cpu));
        println!(
            "  connections/s:            {:.0} vs {:.0} = {:.2}x; proxies' CPU {:.1} µs per connection",
            m(&self.rate),
            m(&plain.rate),
            m(&self.rate) / m(&plain.rate),
            m(&self.rate_cpu)
        );
        // Connections per second times machine µs per connection.
        let busy = |f: &Figures| 100.0 * m(&f.rate) * m(&f.rate_machine) / 1e6 / cpus as f64;
        println!(
            "  per connection:           machine CPU {:.1} vs {:.1} µs (busy {:.0}% vs {:.0}% of {cpus} CPUs); proxies' user space {:.1} µs",
            m(&self.rate_machine),
            m(&plain.rate_machine),
            busy(self),
            busy(plain),
            m(&self.rate_user)
        );
        for (i, name) in ["client proxy", "server proxy"].iter().enumerate() {
            println!(
                "  {name}: idle {:.1} MiB, with {} connections {:.1} MiB ({:.0} B per connection)",
                self.idle[i] as f64 / mib,
                options.connections,
                self.loaded[i] as f64 / mib,
                self.per_connection(i, options)
            );
        }
    }

    /// What `proxy` (0: client pod, 1: server pod) held for the open
    /// connections, in bytes.
    fn held(&self, proxy: usize) -> f64 {
        self.loaded[proxy].saturating_sub(self.idle[proxy]) as f64
    }

    fn per_connection(&self, proxy: usize, options: &Options) -> f64 {
        self.held(proxy) / options.connections as f64
    }

    /// Ratios of medians against `other`, measured in the same run. Added
    /// latency is over plain TCP's.
    fn compare(&self, other: &Figures, plain: &Figures) {
        let added =
            |mesh: &Figures, pick: fn(&Figures) -> &Vec<f64>| m(pick(mesh)) - m(pick(plain));
        println!(
            "  throughput: {:.2}x (1 stream), {:.2}x (8 streams)",
            m(&self.single) / m(&other.single),
            m(&self.eight) / m(&other.eight)
        );
        println!(
            "  proxies' CPU per byte: {:.2}x (1 stream), {:.2}x (8 streams)",
            m(&self.single_cpu) / m(&other.single_cpu),
            m(&self.eight_cpu) / m(&other.eight_cpu)
        );
        println!(
            "  added latency: {:.2}x (p50), {:.2}x (p99)",
            added(self, |f| &f.p50) / added(other, |f| &f.p50),
            added(self, |f| &f.p99) / added(other, |f| &f.p99)
        );
        println!(
            "  proxies' CPU per round trip: {:.2}x",
            m(&self.rr_cpu) / m(&other.rr_cpu)
        );
        println!(
            "  connections/s: {:.2}x; proxies' CPU per connection: {:.2}x",
            m(&self.rate) / m(&other.rate),
            m(&self.rate_cpu) / m(&other.rate_cpu)
        );
        println!(
            "  machine CPU per connection: {:.2}x; were our proxies' user space free: {:.2}x their connections/s at most, when CPU-bound",
            m(&self.rate_machine) / m(&other.rate_machine),
            m(&other.rate_machine) / (m(&self.rate_machine) - m(&self.rate_user))
        );
        let ratio = |mine: u64, theirs: u64| mine as f64 / theirs as f64;
        println!(
            "  idle memory: {:.2}x / {:.2}x (client / server proxy)",
            ratio(self.idle[0], other.idle[0]),
            ratio(self.idle[1], other.idle[1])
        );
        println!(
            "  memory per connection: {:.2}x / {:.2}x (client / server proxy)",
            self.held(0) / other.held(0),
            self.held(1) / other.held(1)
        );
    }
}

/// What a test carried per second, and what each unit it counted (byte,
/// connection) cost, in seconds; all NaN for a test not run.
struct PerUnit {
    rate: f64,
    /// Both proxies' CPU time.
    proxies: f64,
    /// The part of it in user space.
    proxies_user: f64,
    /// The whole machine's busy time.
    machine: f64,
}

/// Runs `test` (if given), which counts what it carried (bytes,
/// connections), on `client`, and measures it per unit.
fn per_unit(
    client: &tokio::runtime::Runtime,
    proxies: &[Process],
    test: Option<impl Future<Output = (u64, Duration)> + Send + 'static>,
) -> PerUnit {
    let Some(test) = test else {
        return PerUnit {
            rate: f64::NAN,
            proxies: f64::NAN,
            proxies_user: f64::NAN,
            machine: f64::NAN,
        };
    };
    let (proxies_before, machine_before) = (proxies_cpu(proxies), busy());
    let (count, elapsed) = on(client, test);
    let proxies = proxies_cpu(proxies) - proxies_before;
    let machine = busy() - machine_before;
    let each = |time: Duration| time.as_secs_f64() / count as f64;
    PerUnit {
        rate: count as f64 / elapsed.as_secs_f64(),
        proxies: each(proxies.total()),
        proxies_user: each(proxies.user),
        machine: each(machine),
    }
}

/// The proxies' CPU time so far, together.
fn proxies_cpu(proxies: &[Process]) -> CpuTimes {
    proxies
        .iter()
        .map(|process| cpu_times(process.pid()).expect("CPU time"))
        .sum()
}

/// Both proxies' context switches so far (voluntary and preempted).
fn proxies_switches(proxies: &[Process]) -> u64 {
    proxies
        .iter()
        .map(|process| {
            let (voluntary, preempted) = context_switches(process.pid()).expect("switches");
            voluntary + preempted
        })
        .sum()
}

/// Both proxies' minor page faults so far.
fn proxies_faults(proxies: &[Process]) -> u64 {
    proxies
        .iter()
        .map(|process| minor_faults(process.pid()).expect("faults"))
        .sum()
}

fn busy() -> Duration {
    machine_busy().expect("the machine's busy time")
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
    let xds_serve = build_example("podless-xds", "xds-serve", "release");
    let ztunnel_run = build_example("ztunnel-core", "ztunnel-run", "proxy");
    let topology = Topology::new("bench", 2);
    // Load-generator settings, for plain TCP and the mesh alike: the
    // connection test closes tens of thousands of connections, whose
    // TIME_WAIT entries would otherwise exhaust the ephemeral ports. Ephemeral
    // ports stay above the proxies' 15xxx ports, which are bound afresh for
    // every round.
    for netns in &topology.workloads {
        netns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=16000 65000",
        ]);
    }
    let manifests = tempfile::tempdir().expect("tempdir");
    std::fs::write(manifests.path().join("cluster.yaml"), manifest()).expect("manifest");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let agent = format!("{AGENT_TOKEN}=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a");
    let mut control_plane_args: Vec<String> = [
        "--manifests",
        manifests.path().to_str().expect("utf-8"),
        "--listen",
        CONTROL_PLANE,
        "--ca-dir",
        ca_dir.path().to_str().expect("utf-8"),
        "--node-agent",
        &agent,
    ]
    .map(str::to_owned)
    .into();
    if options.ztunnel.is_some() {
        // A real ztunnel in dedicated mode authenticates as its workload.
        for (name, _) in PODS {
            control_plane_args.push("--token".into());
            control_plane_args.push(format!(
                "{}=spiffe://cluster.local/ns/default/sa/{name}",
                ztunnel_token(name)
            ));
        }
    }
    let control_plane_args: Vec<&str> = control_plane_args.iter().map(String::as_str).collect();
    let _control_plane = Process::start(
        &topology.control,
        &xds_serve,
        &control_plane_args,
        "listening on",
    );
    let root = ca_dir.path().join(mesh_ca::store::ROOT_CERT_FILE);
    for netns in &topology.workloads {
        install_redirect_except(netns, &[PLAIN_ECHO, PLAIN_SINK]);
        if options.ztunnel.is_some() {
            // ztunnel does not mark its own connections to the control plane.
            netns.exec(&[
                "nft",
                "insert",
                "rule",
                "inet",
                "podless",
                "output",
                "ip",
                "daddr",
                CONTROL_PLANE_IP,
                "return",
            ]);
        }
    }
    let ztunnel_dir = tempfile::tempdir().expect("tempdir");
    let launcher = Launcher {
        topology: &topology,
        ztunnel_run: &ztunnel_run,
        root: &root,
        ztunnel_dir: ztunnel_dir.path(),
        options: &options,
    };

    let _server = Process::start(
        &topology.workloads[1],
        &std::env::current_exe().expect("bench path"),
        &["--serve-apps"],
        "serving",
    );
    let client = runtime_in(&format!("/var/run/netns/{}", topology.workloads[0].name));
    let server_ip = Topology::workload_ip(1);
    let at = |port: u16| -> SocketAddr { format!("{server_ip}:{port}").parse().expect("addr") };

    if options.named("attacks") {
        // The attacker: another address in the client pod, so the attack and
        // the normal client (the client pod's proxy) are different clients.
        topology.workloads[0].ip(&["addr", "add", ATTACKER, "dev", "eth0"]);
        for attack in [Attack::SelfCall, Attack::IdleHandshakes] {
            attack.measure(&launcher, &client, at(ECHO), server_ip.clone());
        }
        client.shutdown_background();
        return;
    }
    let mut carriers = vec![Carrier::Plain, Carrier::Ours];
    if options.baseline.is_some() {
        carriers.push(Carrier::Baseline);
    }
    if options.ztunnel.is_some() {
        carriers.push(Carrier::Ztunnel);
        if options.mixed {
            carriers.extend([Carrier::OursToZtunnel, Carrier::ZtunnelToOurs]);
        }
    }
    let mut figures: Vec<Figures> = carriers.iter().map(|_| Figures::default()).collect();
    for round in 1..=options.rounds {
        for (carrier, figures) in carriers.iter().zip(&mut figures) {
            // Fresh proxies for each carrier and round: ours and ztunnel's
            // use the same ports, and no round inherits another's state.
            let proxies = launcher.start(*carrier);
            let bypass = *carrier == Carrier::Plain;
            let (echo, sink) = if bypass {
                (at(PLAIN_ECHO), at(PLAIN_SINK))
            } else {
                (at(ECHO), at(SINK))
            };
            let seconds = options.seconds;
            let single = per_unit(
                &client,
                &proxies,
                options
                    .wants("single")
                    .then(|| bulk(sink, bypass, 1, seconds)),
            );
            let eight = per_unit(
                &client,
                &proxies,
                options
                    .wants("eight")
                    .then(|| bulk(sink, bypass, 8, seconds)),
            );
            let (latency, rr_cpu, rr_switches, rr_faults) = if options.wants("rr") {
                let before = proxies_cpu(&proxies);
                let switches_before = proxies_switches(&proxies);
                let faults_before = proxies_faults(&proxies);
                let latency = on(&client, request_response(echo, bypass, ROUND_TRIPS));
                let spent = proxies_cpu(&proxies) - before;
                let switches = proxies_switches(&proxies) - switches_before;
                let faults = proxies_faults(&proxies) - faults_before;
                let rounds = (ROUND_TRIPS + RR_WARM_UP) as f64;
                let each = spent.total().as_secs_f64() / rounds;
                let per_rr = |count: u64| count as f64 / rounds;
                (latency, each * 1e6, per_rr(switches), per_rr(faults))
            } else {
                (Latency::default(), f64::NAN, f64::NAN, f64::NAN)
            };
            let (p50, p99) = (latency.p50, latency.p99);
            let rate = per_unit(
                &client,
                &proxies,
                options
                    .wants("rate")
                    .then(|| connection_rate(echo, bypass, 8, seconds)),
            );
            // Per byte in nanoseconds, per connection in microseconds.
            let (single_cpu, eight_cpu) = (single.proxies * 1e9, eight.proxies * 1e9);
            let rate_cpu = rate.proxies * 1e6;
            println!(
                "round {round} {:>7}: 1 stream {:8.1} MiB/s | 8 streams {:8.1} MiB/s | 1 KiB RR p50 {:6.1} µs p99 {:6.1} µs | {:7.0} conn/s | proxies' CPU {:.2} / {:.2} ns/B, {:.1} µs/RR, {:.1} µs/conn",
                carrier.name(),
                single.rate / 1048576.0,
                eight.rate / 1048576.0,
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                rate.rate,
                single_cpu,
                eight_cpu,
                rr_cpu,
                rate_cpu,
            );
            figures.single_cpu.push(single_cpu);
            figures.eight_cpu.push(eight_cpu);
            figures.single.push(single.rate);
            figures.eight.push(eight.rate);
            figures.p50.push(p50.as_secs_f64() * 1e6);
            figures.p99.push(p99.as_secs_f64() * 1e6);
            figures.rr_cpu.push(rr_cpu);
            if options.wants("rr") {
                println!(
                    "        {:>7}  RR p90 {:6.1} µs p99.9 {:7.1} µs | proxies' context switches {:.2}, page faults {:.3} per RR",
                    carrier.name(),
                    latency.p90.as_secs_f64() * 1e6,
                    latency.p999.as_secs_f64() * 1e6,
                    rr_switches,
                    rr_faults,
                );
            }
            figures.rate.push(rate.rate);
            figures.rate_cpu.push(rate_cpu);
            figures.rate_user.push(rate.proxies_user * 1e6);
            figures.rate_machine.push(rate.machine * 1e6);
            drop(proxies);
            // Let TIME_WAIT sockets from the connection test drain a little.
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    // Memory: fresh proxies of each carrier, idle, then holding connections.
    for (carrier, figures) in carriers.iter().zip(&mut figures).skip(1) {
        let proxies = launcher.start(*carrier);
        figures.idle = proxies.iter().map(rss).collect();
        for (proxy, name) in proxies.iter().zip(["client", "server"]) {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
            let field = |key: &str| {
                status
                    .lines()
                    .find(|line| line.starts_with(key))
                    .map_or("?", |line| line[key.len()..].trim())
                    .to_owned()
            };
            println!(
                "{:>7} {name} proxy idle: RssAnon {}, RssFile {}",
                carrier.name(),
                field("RssAnon:"),
                field("RssFile:")
            );
        }
        figures.loaded = if options.wants("memory") {
            let _open = on(&client, open_many(at(ECHO), options.connections));
            std::thread::sleep(Duration::from_millis(500));
            proxies.iter().map(rss).collect()
        } else {
            figures.idle.clone()
        };
    }

    let plain = &figures[0];
    println!("\nmedians of {} rounds:", options.rounds);
    for (carrier, mesh) in carriers.iter().zip(&figures).skip(1) {
        println!("{} (against plain TCP):", carrier.name());
        mesh.summarize(plain, &options);
    }
    let of = |wanted: Carrier| {
        carriers
            .iter()
            .position(|carrier| *carrier == wanted)
            .map(|at| &figures[at])
    };
    let ours = of(Carrier::Ours).expect("ours");
    for other in [Carrier::Baseline, Carrier::Ztunnel] {
        if let Some(theirs) = of(other) {
            println!("ours / {}, same run:", other.name());
            ours.compare(theirs, plain);
        }
    }
    client.shutdown_background();
}

/// Attacks on the server pod's proxy from the client pod (`--only attacks`):
/// each runs for `ATTACK_SECONDS` against fresh proxies of ours, while a
/// normal client makes one mesh request a second.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// CONNECTs to the server proxy's own ports 15006 and 15001 through the
    /// client pod's proxy: once, a request looped the proxy into itself.
    SelfCall,
    /// Bare TCP connections to 15008 that never send a byte (up to 20,000),
    /// from another address of the client pod than its proxy's.
    IdleHandshakes,
}

const ATTACK_SECONDS: u64 = 10;

/// The attacker's address in the client pod (with its prefix).
const ATTACKER: &str = "10.77.0.100/24";

/// A process's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// One normal request through the mesh: connect, 1 KiB out and back. Its
/// time, or `None` if it failed or took over 5 s.
async fn normal_request(echo: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = connect(echo, false).await.ok()?;
        let request = [7u8; 1024];
        stream.write_all(&request).await.ok()?;
        let mut response = [0u8; 1024];
        stream.read_exact(&mut response).await.ok()?;
        (response == request).then_some(())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()?;
    Some(started.elapsed())
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Self::SelfCall => "self-call",
            Self::IdleHandshakes => "idle-handshakes",
        }
    }

    /// Connections the attacker opens and holds until `stop`.
    async fn run(self, server_ip: String, stop: Arc<std::sync::atomic::AtomicBool>) -> usize {
        let mut held = Vec::new();
        let mut opened = 0;
        while !stop.load(Ordering::Relaxed) {
            let (port, bypass) = match self {
                Self::SelfCall if opened % 2 == 0 => (15006, false),
                Self::SelfCall => (15001, false),
                Self::IdleHandshakes => (15008, true),
            };
            let to: SocketAddr = format!("{server_ip}:{port}").parse().expect("addr");
            let connecting = async {
                let socket = TcpSocket::new_v4()?;
                if bypass {
                    nix::sys::socket::setsockopt(
                        &socket,
                        nix::sys::socket::sockopt::Mark,
                        &BYPASS_MARK,
                    )
                    .map_err(std::io::Error::from)?;
                    let attacker = ATTACKER.split('/').next().expect("address");
                    socket.bind(SocketAddr::new(attacker.parse().expect("ip"), 0))?;
                }
                socket.connect(to).await
            };
            if let Ok(Ok(mut stream)) =
                tokio::time::timeout(Duration::from_secs(1), connecting).await
            {
                if matches!(self, Self::SelfCall) {
                    let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
                }
                held.push(stream);
            }
            opened += 1;
            if opened % 256 == 0 {
                // Let go of what the server closed, as an attacker reopening
                // would: the harness's own descriptors stay bounded.
                held.retain(|stream| {
                    matches!(stream.try_read(&mut [0u8; 1]), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
                });
            }
            let most = match self {
                Self::SelfCall => 100,
                Self::IdleHandshakes => 20_000,
            };
            if opened >= most {
                // Hold what is open until the attack ends.
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        opened
    }

    /// Runs the attack against fresh proxies and prints the server proxy's
    /// peak RSS and descriptors during it and 30 s after it, and the normal
    /// client's request times during it.
    fn measure(
        self,
        launcher: &Launcher<'_>,
        client: &tokio::runtime::Runtime,
        echo: SocketAddr,
        server_ip: String,
    ) {
        let proxies = launcher.start(Carrier::Ours);
        let pid = proxies[1].pid();
        let idle = (resident_bytes(pid).unwrap_or(0), open_fds(pid));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attacker = client.spawn(self.run(server_ip, stop.clone()));
        let (mut peak_rss, mut peak_fds) = idle;
        let mut times = Vec::new();
        let mut failed = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(ATTACK_SECONDS) {
            match on(client, normal_request(echo)) {
                Some(time) => times.push(time),
                None => failed += 1,
            }
            for _ in 0..5 {
                peak_rss = peak_rss.max(resident_bytes(pid).unwrap_or(0));
                peak_fds = peak_fds.max(open_fds(pid));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let opened = client.block_on(attacker).unwrap_or(0);
        std::thread::sleep(Duration::from_secs(30));
        let after = (resident_bytes(pid).unwrap_or(0), open_fds(pid));
        let after_request = on(client, normal_request(echo));
        let mib = |bytes: u64| bytes as f64 / 1048576.0;
        let ms = |time: Option<Duration>| time.map_or(f64::NAN, |t| t.as_secs_f64() * 1e3);
        println!(
            "{:>15}: {opened} attack connections | server proxy idle {:.1} MiB, {} fds | peak during {:.1} MiB, {} fds | 30 s after {:.1} MiB, {} fds | normal requests during: {} ok (p50 {:.2} ms, max {:.2} ms), {failed} failed | after: {:.2} ms",
            self.name(),
            mib(idle.0),
            idle.1,
            mib(peak_rss),
            peak_fds,
            mib(after.0),
            after.1,
            times.len(),
            ms(percentile(&times, 50.0)),
            ms(times.iter().max().copied()),
            ms(after_request),
        );
        drop(proxies);
    }
}
