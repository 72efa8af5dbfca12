//! `dns-serve`: run the DNS proxy from a records file.
//!
//! ```sh
//! cargo run -p podless-dns --example dns-serve -- --listen 127.0.0.1:15053 \
//!     --records records.yaml [--config dns.yaml] [--upstream 127.0.0.1:53]... \
//!     [--domain cluster.local] [--max-in-flight 256] [--drain-seconds 5]
//! ```
//!
//! On the shipped sample, from the repository root (then, for instance,
//! `dig @127.0.0.1 -p 15053 echo.default.svc.cluster.local`):
//!
//! ```sh
//! cargo run -p podless-dns --example dns-serve -- --listen 127.0.0.1:15053 \
//!     --records dns-proxy/examples/dns-serve-sample/records.yaml
//! ```
//!
//! `--help` describes every flag and the records format; the flags are parsed
//! with clap, so a missing or malformed one is named on stderr with exit
//! status 2.
//!
//! `--max-in-flight` bounds the questions waiting for the upstream at once
//! (see `UpstreamConfig::max_in_flight`); beyond it they get SERVFAIL.
//!
//! `--config` reads the proxy's configuration (a `DnsConfig`, with
//! `mesh_net::config::from_yaml`): the domain, the TTL, the upstream and its
//! bounds, the TCP handshake limits. `--domain`, `--upstream` and
//! `--max-in-flight`, when given, override the file's values. A sample with
//! every field, `dns-serve-sample/dns.yaml`, ships beside the records
//! sample.
//!
//! The records file lists services and which namespace each client IP is in:
//!
//! ```yaml
//! services:
//! - name: echo                # hostname echo.default.svc.cluster.local
//!   namespace: default
//!   vips: [10.96.0.10, fd00::10]
//! - name: db                  # headless: answered with its endpoints
//!   namespace: default
//!   endpoints: [10.42.0.7, 10.42.0.8]
//! - hostname: api.example.com # an external host
//!   namespace: default
//!   vips: [240.0.0.1]
//! clients:
//!   10.42.0.5: default
//! ```
//!
//! It prints `listening on <addr>` once serving UDP and TCP. SIGTERM or
//! Ctrl-C drains it (`DnsHandle::drain`): no new questions are read or
//! connections accepted, those in progress get up to `--drain-seconds`
//! (default 5) to finish; it then prints the outcome (`drained: all work
//! finished`, or `drain timed out: <n> closed`) and exits.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use dns_proxy::{DEFAULT_MAX_IN_FLIGHT, DnsConfig, DnsProxy, InMemoryMeshDns, ServiceRecord};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Records {
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    clients: BTreeMap<IpAddr, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    #[serde(default)]
    name: Option<String>,
    namespace: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    vips: Vec<IpAddr>,
    #[serde(default)]
    endpoints: Vec<IpAddr>,
    #[serde(default)]
    canonical: bool,
}

/// Serve cluster DNS for the services of a records file, as CoreDNS would.
///
/// The podless DNS proxy, authoritative for --domain: it answers the
/// services of --records (A and AAAA) with Kubernetes search expansion by
/// the asking client's namespace, a headless service with its endpoints,
/// and unknown names of the domain with NXDOMAIN; other names go to
/// --upstream (cached), or get SERVFAIL without one. It serves UDP and TCP
/// on --listen and prints "listening on <address>" once serving.
///
/// SIGTERM or Ctrl-C drains it: no new questions are read or connections
/// accepted, those in progress get up to --drain-seconds to finish; it then
/// prints how the drain ended ("drained: all work finished", or "drain
/// timed out: <n> closed") and exits.
///
/// The records file (YAML) lists services and which namespace each client
/// address is in:
///
///     services:
///     - name: echo                # echo.default.svc.<domain>
///       namespace: default
///       vips: [10.96.0.10, fd00::10]
///     - name: db                  # headless: answered with its endpoints
///       namespace: default
///       endpoints: [10.42.0.7, 10.42.0.8]
///     - hostname: api.example.com # any other host name
///       namespace: default
///       vips: [240.0.0.1]
///       canonical: true           # preferred over other namespaces' (default false)
///     clients:                    # client IP: its namespace (for short names)
///       10.42.0.5: default
///
/// A service has a name (then its hostname is <name>.<namespace>.svc.<domain>)
/// or a hostname, a namespace, and vips or endpoints.
///
/// The configuration file (--config, YAML) sets the proxy itself; every
/// field is optional, with the default shown:
///
///     domain: cluster.local       # the cluster domain
///     ttl: 30s                    # TTL of mesh answers, whole seconds
///     upstream:                   # forwarding of names outside the domain
///       servers: [127.0.0.1:53]   # IP:PORT, tried in order (default none)
///       timeout: 2s               # per attempt
///       attempts: 2               # timeout × attempts at most 30s
///       cacheSize: 4096           # cached responses
///       negativeMinTtl: 1s        # negative answers cached at least
///       negativeMaxTtl: 5m        # and at most
///       maxInFlight: 256          # questions waiting for the upstream
///     handshakeLimits:            # TCP clients before their first question
///       timeout: 10s
///       maxInProgress: 256
///       maxInProgressPerIp: 32
///
/// --domain, --upstream and --max-in-flight, given on the command line,
/// override the file's domain, upstream.servers and upstream.maxInFlight.
#[derive(Parser)]
#[command(
    name = "dns-serve",
    verbatim_doc_comment,
    after_help = concat!(
        "Try it on the shipped sample, from the repository root:\n",
        "\n",
        "  cargo run -p podless-dns --example dns-serve -- --listen 127.0.0.1:15053 \\\n",
        "      --records dns-proxy/examples/dns-serve-sample/records.yaml\n",
        "\n",
        "then ask it, e.g.: dig @127.0.0.1 -p 15053 echo.default.svc.cluster.local\n",
        "\n",
        "With the sample configuration file (every field) as well:\n",
        "\n",
        "  cargo run -p podless-dns --example dns-serve -- --listen 127.0.0.1:15053 \\\n",
        "      --records dns-proxy/examples/dns-serve-sample/records.yaml \\\n",
        "      --config dns-proxy/examples/dns-serve-sample/dns.yaml",
    )
)]
struct Args {
    /// The address to serve DNS on, UDP and TCP, as IP:PORT.
    ///
    /// E.g. 127.0.0.1:15053; port 0 picks a free port (printed once
    /// serving).
    #[arg(long, value_name = "IP:PORT", verbatim_doc_comment)]
    listen: SocketAddr,

    /// The records file (YAML): the services to answer, and clients' namespaces.
    ///
    /// See the format above. Read once at start.
    #[arg(long, value_name = "FILE.yaml", verbatim_doc_comment)]
    records: PathBuf,

    /// The proxy's configuration file (YAML): domain, ttl, upstream, handshakeLimits.
    ///
    /// See the format above; every field is optional. --domain, --upstream
    /// and --max-in-flight, when given, override the file's values. None by
    /// default: the defaults and the flags.
    #[arg(long, value_name = "FILE.yaml", verbatim_doc_comment)]
    config: Option<PathBuf>,

    /// A resolver for names outside the cluster domain, as IP:PORT.
    ///
    /// E.g. 127.0.0.1:53 (the port is required). Repeatable: tried in the
    /// order given, 2 s per attempt, 2 attempts; answers are cached. None
    /// by default: names outside --domain and the records then get
    /// SERVFAIL. Replaces the servers of --config's upstream.
    #[arg(long = "upstream", value_name = "IP:PORT", verbatim_doc_comment)]
    upstreams: Vec<SocketAddr>,

    /// The cluster's DNS domain, which the proxy is authoritative for.
    ///
    /// A service named <name> in <namespace> is
    /// <name>.<namespace>.svc.<domain>. Overrides --config's domain.
    #[arg(
        long,
        value_name = "DOMAIN",
        default_value = "cluster.local",
        verbatim_doc_comment
    )]
    domain: String,

    /// The most questions waiting for the upstream at once (at least 1).
    ///
    /// Beyond it, questions the cache cannot answer get SERVFAIL at once;
    /// each waiting question holds one UDP socket, so keep it well under
    /// the file descriptor limit. Overrides --config's upstream.maxInFlight.
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_MAX_IN_FLIGHT,
        value_parser = at_least_one,
        verbatim_doc_comment
    )]
    max_in_flight: usize,

    /// How long a drain (on SIGTERM or Ctrl-C) waits, in seconds.
    ///
    /// Questions and connections in progress get this long to finish
    /// (fractions allowed, e.g. 0.5); what is left is then closed.
    #[arg(
        long = "drain-seconds",
        value_name = "SECONDS",
        default_value = "5",
        value_parser = seconds,
        allow_negative_numbers = true,
        verbatim_doc_comment
    )]
    drain: Duration,
}

/// `--max-in-flight`: a count of at least one.
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(err) => Err(err.to_string()),
    }
}

/// `--drain-seconds`: seconds, fractions allowed.
fn seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value.parse().map_err(|err| format!("{err}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|err| err.to_string())
}

/// The proxy's configuration: `--config`'s file (or the defaults), with the
/// flags given on the command line (`given`) over it.
fn config(args: &Args, given: impl Fn(&str) -> bool) -> Result<DnsConfig, String> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            mesh_net::config::from_yaml(&text, &path.display().to_string())
                .map_err(|err| err.to_string())?
        }
        None => DnsConfig::default(),
    };
    if args.config.is_none() || given("domain") {
        config.domain.clone_from(&args.domain);
    }
    if args.config.is_none() || given("max_in_flight") {
        config.upstream.max_in_flight = args.max_in_flight;
    }
    if !args.upstreams.is_empty() {
        config.upstream.servers.clone_from(&args.upstreams);
    }
    Ok(config)
}

fn load(args: &Args, domain: &str) -> Result<InMemoryMeshDns, String> {
    let text = std::fs::read_to_string(&args.records)
        .map_err(|err| format!("{}: {err}", args.records.display()))?;
    let records: Records = serde_saphyr::from_str(&text)
        .map_err(|err| format!("{}: {err}", args.records.display()))?;
    let mesh = InMemoryMeshDns::new();
    for (index, service) in records.services.into_iter().enumerate() {
        let hostname = match (service.hostname, service.name) {
            (Some(hostname), _) => hostname,
            (None, Some(name)) => format!("{name}.{}.svc.{domain}", service.namespace),
            (None, None) => return Err(format!("services[{index}]: give a name or a hostname")),
        };
        mesh.upsert_service(ServiceRecord {
            namespace: service.namespace,
            hostname,
            vips: service.vips,
            endpoints: service.endpoints,
            canonical: service.canonical,
        });
    }
    for (ip, namespace) in records.clients {
        mesh.set_client_namespace(ip, Some(namespace));
    }
    Ok(mesh)
}

async fn run(args: Args, matches: ArgMatches) -> Result<(), String> {
    let config = config(&args, |id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
    })?;
    let domain = config.domain.trim_end_matches('.').to_ascii_lowercase();
    let mesh = load(&args, &domain)?;
    let proxy = DnsProxy::builder()
        .config(config)
        .mesh(Arc::new(mesh))
        .build()
        .map_err(|err| err.to_string())?;
    let udp = tokio::net::UdpSocket::bind(args.listen)
        .await
        .map_err(|err| format!("--listen {} (udp): {err}", args.listen))?;
    let tcp = tokio::net::TcpListener::bind(udp.local_addr().map_err(|err| err.to_string())?)
        .await
        .map_err(|err| format!("--listen {} (tcp): {err}", args.listen))?;
    let handle = proxy.spawn(udp, tcp).map_err(|err| err.to_string())?;
    // Listening for the signals before saying so: one sent after the line
    // drains.
    let stop = stop_signal().map_err(|err| err.to_string())?;
    println!("listening on {}", handle.local_addr());
    let signal = stop.await;
    println!("{signal}: draining for up to {:?}", args.drain);
    let drained = handle.drain(args.drain).await;
    println!("{drained}");
    handle.join().await.map_err(|err| err.to_string())
}

/// Listens for SIGTERM and Ctrl-C (SIGINT) from now on; the future says
/// which came.
fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => "terminated",
                _ = interrupt.recv() => "interrupted",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        })
    }
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    // One thread, like dnsmasq: a DNS server's work per question is tiny, and
    // waking worker threads for each costs more than the work (measured).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("dns-serve: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dns-serve: {message}");
            ExitCode::FAILURE
        }
    }
}
