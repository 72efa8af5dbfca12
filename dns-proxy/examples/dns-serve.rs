//! `dns-serve`: run the DNS proxy from a records file.
//!
//! ```sh
//! cargo run -p podless-dns --example dns-serve -- --listen 127.0.0.1:15053 \
//!     --records records.yaml --upstream 127.0.0.1:53 [--domain cluster.local] \
//!     [--max-in-flight 256] [--drain-seconds 5]
//! ```
//!
//! `--max-in-flight` bounds the questions waiting for the upstream at once
//! (see `UpstreamConfig::max_in_flight`); beyond it they get SERVFAIL.
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

use dns_proxy::{DnsProxy, InMemoryMeshDns, ServiceRecord, UpstreamConfig};
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

struct Args {
    listen: SocketAddr,
    records: PathBuf,
    upstreams: Vec<SocketAddr>,
    domain: String,
    max_in_flight: usize,
    drain: Duration,
}

const USAGE: &str = "usage: dns-serve --listen <addr> --records <file.yaml> [--upstream <addr>] ... [--domain <domain>] [--max-in-flight <n>] [--drain-seconds <s>]";

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut records = None;
    let mut upstreams = Vec::new();
    let mut domain = "cluster.local".to_owned();
    let mut max_in_flight = UpstreamConfig::default().max_in_flight;
    let mut drain = Duration::from_secs(5);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--listen" => {
                listen = Some(value()?.parse().map_err(|err| format!("--listen: {err}"))?);
            }
            "--records" => records = Some(PathBuf::from(value()?)),
            "--upstream" => upstreams.push(
                value()?
                    .parse()
                    .map_err(|err| format!("--upstream: {err}"))?,
            ),
            "--domain" => domain = value()?,
            "--max-in-flight" => {
                max_in_flight = value()?
                    .parse()
                    .map_err(|err| format!("--max-in-flight: {err}"))?;
            }
            "--drain-seconds" => {
                let seconds: f64 = value()?
                    .parse()
                    .map_err(|err| format!("--drain-seconds: {err}"))?;
                drain = Duration::try_from_secs_f64(seconds)
                    .map_err(|err| format!("--drain-seconds: {err}"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or(format!("--listen is required\n{USAGE}"))?,
        records: records.ok_or(format!("--records is required\n{USAGE}"))?,
        upstreams,
        domain,
        max_in_flight,
        drain,
    })
}

fn load(args: &Args) -> Result<InMemoryMeshDns, String> {
    let text = std::fs::read_to_string(&args.records)
        .map_err(|err| format!("{}: {err}", args.records.display()))?;
    let records: Records = serde_saphyr::from_str(&text)
        .map_err(|err| format!("{}: {err}", args.records.display()))?;
    let mesh = InMemoryMeshDns::new();
    for (index, service) in records.services.into_iter().enumerate() {
        let hostname = match (service.hostname, service.name) {
            (Some(hostname), _) => hostname,
            (None, Some(name)) => format!("{name}.{}.svc.{}", service.namespace, args.domain),
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

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mesh = load(&args)?;
    let proxy = DnsProxy::builder()
        .mesh(Arc::new(mesh))
        .domain(&args.domain)
        .upstream(UpstreamConfig {
            servers: args.upstreams.clone(),
            max_in_flight: args.max_in_flight,
            ..UpstreamConfig::default()
        })
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
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dns-serve: {message}");
            ExitCode::FAILURE
        }
    }
}
