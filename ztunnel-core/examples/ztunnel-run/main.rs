//! One proxy instance in dedicated mode, run inside the workload's network
//! namespace (next to redirect rules such as WIRE.md §6):
//!
//! ```text
//! cargo run -p ztunnel-core --example ztunnel-run -- \
//!     --control-plane 10.0.0.1:15012 --root root-cert.pem --token <token> \
//!     --workload-uid Kubernetes//Pod/default/shell [--node-id <id>] \
//!     [--cert-ttl <seconds>] [--socks5 127.0.0.1:15080] [--hbone-port 15008] \
//!     [--worker-threads 1] [--on-demand] [--admin 127.0.0.1:15000] \
//!     [--metrics 0.0.0.0:15020] [--readiness 0.0.0.0:15021]
//! ```
//!
//! `--help` describes every flag.
//!
//! The control plane (`xds-serve --ca-dir ...`) serves xDS and the CA on one
//! TLS port; the token authenticates this instance (a node agent's token, as
//! certificates are asked for on the workload's behalf). It binds its
//! listeners itself (the library binds nothing), with `TCP_NODELAY` inherited
//! by their connections (`listen_with_nodelay`): 15001, 15006 and 15008 on all
//! addresses, and SOCKS5 where `--socks5` says; the admin endpoints on
//! 127.0.0.1:15000, metrics on 15020 and readiness on 15021 (as ztunnel's),
//! each `off` if wanted. Prints `ready` once the
//! workload is known and has its certificate (else exits saying why, with the
//! xDS client's reason if it never synced, e.g. a refused token); drains on
//! SIGTERM or Ctrl-C.
//!
//! One worker thread by default: an instance serves one workload, and on a
//! small machine a second worker mostly adds wake-ups between the two (on the
//! 2-core bench machine one worker used less CPU per byte and added less
//! latency); `--worker-threads` raises it for a busy workload. One worker
//! means tokio's current-thread scheduler, on the main thread: no second
//! thread's stack and allocator cache, and none of the multi-thread
//! scheduler's bookkeeping. (That scheduler is still linked, for
//! `--worker-threads`, and its one use of `pow` keeps libm loaded: about
//! 0.3 MiB of an idle proxy.)
//!
//! Build it for deployment, or to measure it, with the workspace's `proxy`
//! profile (`cargo build --profile proxy -p ztunnel-core --example
//! ztunnel-run`): release, with the code that runs only at start-up or on
//! configuration changes optimised for size. The kernel maps the binary's code
//! nearly whole, so that took an idle proxy from 7.8-8.1 to 7.2-7.4 MiB.
//!
//! Log lines go to stderr in batches (`batched_stderr`): at most 64 KiB or
//! 100 ms of lines per write, not a syscall (and a wake-up of the reader) per
//! connection.
//!
//! The binary allocates with jemalloc, as linkerd2-proxy and ztunnel do (the
//! library leaves the choice to the embedding binary). With glibc's malloc,
//! each large HTTP/2 frame buffer h2 reads into was handed back to the
//! kernel when freed and faulted in again for the next frame: about 15% of the
//! server proxy's CPU went to page faults during bulk transfers.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use mesh_ca::{CaClient, RenewalConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use ztunnel_core::hbone::HBONE_PORT;
use ztunnel_core::net::socket::listen_with_nodelay;
use ztunnel_core::proxy::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use ztunnel_core::{CertManager, Listeners, XdsClient, Ztunnel};

use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod batched_stderr;

use batched_stderr::BatchedStderr;

/// One podless proxy instance in dedicated mode: the data plane of one
/// workload, configured by a control plane over xDS, with certificates from
/// its CA.
#[derive(Debug, Parser)]
#[command(
    name = "ztunnel-run",
    version,
    about = "One podless proxy instance (dedicated mode) for one workload, inside its network namespace",
    long_about = "One podless proxy instance (dedicated mode) for one workload.

Run it inside the workload's network namespace, next to redirect rules
(WIRE.md section 6). It takes its config (xDS) and its workload's
certificate from one control plane (`xds-serve --ca-dir ...` serves both
on one TLS port), and listens on 15001 (outbound), 15006 (inbound
plaintext) and 15008 (HBONE) on all addresses, plus the admin, metrics and
readiness endpoints. Prints `ready` once the workload is known and has its
certificate (else exits saying why); drains on SIGTERM or Ctrl-C."
)]
struct Args {
    /// The control plane's address (xDS and the CA on one TLS port), e.g. 10.0.0.1:15012.
    #[arg(long, value_name = "ADDR")]
    control_plane: SocketAddr,
    /// PEM file of the mesh's root certificate(s), to verify the control plane.
    #[arg(long, value_name = "PEM")]
    root: PathBuf,
    /// Bearer token for the control plane: a node agent's, as certificates are
    /// asked for on the workload's behalf.
    #[arg(long)]
    token: String,
    /// The served workload's uid, e.g. Kubernetes//Pod/default/shell.
    #[arg(long, value_name = "UID")]
    workload_uid: String,
    /// The xDS node id [default: ztunnel~0.0.0.0~<workload uid>~cluster.local].
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// The certificate lifetime to ask the CA for, in seconds [default: the CA's].
    #[arg(long, value_name = "SECONDS")]
    cert_ttl: Option<u64>,
    /// Also accept SOCKS5 on this address (off by default; conventionally 127.0.0.1:15080).
    #[arg(long, value_name = "ADDR")]
    socks5: Option<SocketAddr>,
    /// The port peers accept HBONE on.
    #[arg(long, value_name = "PORT", default_value_t = HBONE_PORT)]
    hbone_port: u16,
    /// Admin endpoints (/healthz/ready, /config_dump, /metrics); `off` for none.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:15000")]
    admin: Listen,
    /// Prometheus metrics (/metrics, /stats/prometheus); `off` for none.
    #[arg(long, value_name = "ADDR|off", default_value = "0.0.0.0:15020")]
    metrics: Listen,
    /// Readiness (/healthz/ready: 200 once ready, else 503); `off` for none.
    #[arg(long, value_name = "ADDR|off", default_value = "0.0.0.0:15021")]
    readiness: Listen,
    /// Runtime worker threads: 1 runs everything on the main thread (best for
    /// one workload on a small machine); more for a busy workload.
    #[arg(long, value_name = "N", default_value_t = 1)]
    worker_threads: usize,
    /// Look destinations up one at a time (on-demand xDS) instead of
    /// receiving every address.
    #[arg(long)]
    on_demand: bool,
}

/// A listener's address, or none.
#[derive(Clone, Copy, Debug)]
struct Listen(Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "off" {
            return Ok(Self(None));
        }
        text.parse()
            .map(|address| Self(Some(address)))
            .map_err(|err| format!("{text:?} is neither an address (ip:port) nor `off`: {err}"))
    }
}

/// The admin-style listeners: where, and which endpoints each serves.
fn admin_listeners(
    args: &Args,
) -> [(&'static str, Option<SocketAddr>, &'static [&'static str]); 3] {
    [
        ("--admin", args.admin.0, &[]),
        (
            "--metrics",
            args.metrics.0,
            &["/metrics", "/stats/prometheus"],
        ),
        ("--readiness", args.readiness.0, &["/healthz/ready"]),
    ]
}

async fn run(args: Args) -> Result<(), String> {
    let roots = CertificateDer::pem_file_iter(&args.root)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|err| format!("--root {}: {err}", args.root.display()))?;
    let ca = CaClient::builder()
        .address(args.control_plane)
        .server_name("istiod.istio-system.svc")
        .roots(roots)
        .token(args.token.clone())
        // The control plane's connections must not be captured by the
        // redirect rules around this proxy.
        .socket_mark(ztunnel_core::net::socket::PROXY_MARK)
        .build()
        .map_err(|err| err.to_string())?;
    let xds = XdsClient::builder()
        .channel(ca.channel())
        .node_id(
            args.node_id
                .clone()
                .unwrap_or_else(|| format!("ztunnel~0.0.0.0~{}~cluster.local", args.workload_uid)),
        )
        .token(args.token.clone())
        .on_demand(args.on_demand)
        .build()
        .map_err(|err| err.to_string())?;
    let state = xds.state();
    let demander = xds.demander();
    let renewal = RenewalConfig {
        ttl: args.cert_ttl.map(Duration::from_secs),
        ..RenewalConfig::default()
    };
    let certs = CertManager::builder()
        .client(ca)
        .impersonate(true)
        .renewal(renewal)
        .build()
        .map_err(|err| err.to_string())?;
    let xds = xds.spawn();

    let mut registry = Registry::default();
    let mut builder = Ztunnel::builder()
        .state(state)
        .certificates(certs.clone())
        .workload_uid(args.workload_uid.clone())
        .hbone_port(args.hbone_port)
        .metrics(&mut registry);
    if let Some(demander) = demander {
        builder = builder.demander(demander);
    }
    let bind = |address: SocketAddr| {
        listen_with_nodelay(address).map_err(|err| format!("binding {address}: {err}"))
    };
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listeners = Listeners {
        outbound: bind(any(OUTBOUND_PORT))?,
        inbound_plaintext: bind(any(INBOUND_PLAINTEXT_PORT))?,
        hbone: bind(any(HBONE_PORT))?,
        socks5: args.socks5.map(bind).transpose()?,
    };
    let handle = builder
        .build()
        .map_err(|err| err.to_string())?
        .spawn(listeners)
        .map_err(|err| format!("starting the proxy: {err}"))?;
    let registry = Arc::new(registry);
    let admin_stop = CancellationToken::new();
    let mut admins = Vec::new();
    for (flag, address, paths) in admin_listeners(&args) {
        let Some(address) = address else { continue };
        let listener = TcpListener::bind(address)
            .await
            .map_err(|err| format!("{flag} {address}: {err}"))?;
        let admin = handle.admin(Some(registry.clone())).restricted_to(paths);
        admins.push(tokio::spawn(admin.serve(listener, admin_stop.clone())));
    }
    if let Err(err) = handle.ready(Duration::from_secs(60)).await {
        // The xDS client says why it never synced, if it did not (e.g. the
        // control plane refused the token).
        return Err(match xds.ready(Duration::ZERO).await {
            Ok(()) => format!("not ready: {err}"),
            Err(xds) => format!("not ready: {err} ({xds})"),
        });
    }
    println!("ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| err.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    let drained = handle.drain(Duration::from_secs(5)).await;
    admin_stop.cancel();
    for admin in admins {
        let _ = admin.await;
    }
    xds.shutdown();
    certs.shutdown();
    tracing::info!("{drained}");
    handle.join().await.map_err(|err| err.to_string())?;
    xds.join().await.map_err(|err| err.to_string())?;
    certs.join().await;
    Ok(())
}

/// Lets the proxy hold many connections: two descriptors each, beyond the
/// usual 1024. (A binary's choice; the library never changes limits.)
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> ExitCode {
    raise_open_files_limit();
    let args = Args::parse();
    let log = BatchedStderr::default();
    tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::INFO)
        .init();
    let mut builder = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(args.worker_threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ztunnel-run: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.spawn(log.clone().flush_periodically());
    let outcome = runtime.block_on(run(args));
    log.flush();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ztunnel-run: {message}");
            ExitCode::FAILURE
        }
    }
}
