//! One proxy instance in dedicated mode, run inside the workload's network
//! namespace (next to redirect rules such as WIRE.md §6):
//!
//! ```text
//! cargo run -p ztunnel-core --example ztunnel-run -- \
//!     --control-plane 10.0.0.1:15012 --root root-cert.pem --token <token> \
//!     --workload-uid Kubernetes//Pod/default/shell [--node-id <id>] \
//!     [--cert-ttl <seconds>] [--socks5 127.0.0.1:15080] [--hbone-port 15008] \
//!     [--worker-threads 1] [--on-demand]
//! ```
//!
//! The control plane (`xds-serve --ca-dir ...`) serves xDS and the CA on one
//! TLS port; the token authenticates this instance (a node agent's token, as
//! certificates are asked for on the workload's behalf). It binds its
//! listeners itself (the library binds nothing), with `TCP_NODELAY` inherited
//! by their connections (`listen_with_nodelay`): 15001, 15006 and 15008 on all
//! addresses, and SOCKS5 where `--socks5` says. Prints `ready` once the
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
use std::time::Duration;

use mesh_ca::{CaClient, RenewalConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use ztunnel_core::hbone::HBONE_PORT;
use ztunnel_core::proxy::socket::listen_with_nodelay;
use ztunnel_core::proxy::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use ztunnel_core::{CertManager, Listeners, XdsClient, Ztunnel};

mod batched_stderr;

use batched_stderr::BatchedStderr;

const USAGE: &str = "usage: ztunnel-run --control-plane <addr> --root <pem> --token <token> \
--workload-uid <uid> [--node-id <id>] [--cert-ttl <seconds>] [--socks5 <addr>] [--hbone-port <port>] \
[--worker-threads <n>] [--on-demand]";

struct Args {
    control_plane: SocketAddr,
    root: PathBuf,
    token: String,
    workload_uid: String,
    node_id: String,
    cert_ttl: Option<Duration>,
    socks5: Option<SocketAddr>,
    hbone_port: u16,
    worker_threads: usize,
    on_demand: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut control_plane = None;
    let mut root = None;
    let mut token = None;
    let mut workload_uid = None;
    let mut node_id = None;
    let mut cert_ttl = None;
    let mut socks5 = None;
    let mut hbone_port = HBONE_PORT;
    let mut worker_threads = 1;
    let mut on_demand = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--control-plane" => {
                control_plane = Some(
                    value()?
                        .parse()
                        .map_err(|err| format!("--control-plane: {err}"))?,
                );
            }
            "--root" => root = Some(PathBuf::from(value()?)),
            "--token" => token = Some(value()?),
            "--workload-uid" => workload_uid = Some(value()?),
            "--node-id" => node_id = Some(value()?),
            "--cert-ttl" => {
                let seconds: u64 = value()?
                    .parse()
                    .map_err(|err| format!("--cert-ttl: {err}"))?;
                cert_ttl = Some(Duration::from_secs(seconds));
            }
            "--socks5" => {
                socks5 = Some(value()?.parse().map_err(|err| format!("--socks5: {err}"))?);
            }
            "--hbone-port" => {
                hbone_port = value()?
                    .parse()
                    .map_err(|err| format!("--hbone-port: {err}"))?;
            }
            "--worker-threads" => {
                worker_threads = value()?
                    .parse()
                    .map_err(|err| format!("--worker-threads: {err}"))?;
            }
            "--on-demand" => on_demand = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let workload_uid: String =
        workload_uid.ok_or(format!("--workload-uid is required\n{USAGE}"))?;
    Ok(Args {
        control_plane: control_plane.ok_or(format!("--control-plane is required\n{USAGE}"))?,
        root: root.ok_or(format!("--root is required\n{USAGE}"))?,
        token: token.ok_or(format!("--token is required\n{USAGE}"))?,
        node_id: node_id.unwrap_or_else(|| format!("ztunnel~0.0.0.0~{workload_uid}~cluster.local")),
        workload_uid,
        cert_ttl,
        socks5,
        hbone_port,
        worker_threads,
        on_demand,
    })
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
        .socket_mark(ztunnel_core::proxy::socket::PROXY_MARK)
        .build()
        .map_err(|err| err.to_string())?;
    let xds = XdsClient::builder()
        .channel(ca.channel())
        .node_id(args.node_id.clone())
        .token(args.token.clone())
        .on_demand(args.on_demand)
        .build()
        .map_err(|err| err.to_string())?;
    let state = xds.state();
    let demander = xds.demander();
    let renewal = RenewalConfig {
        ttl: args.cert_ttl,
        ..RenewalConfig::default()
    };
    let certs = CertManager::builder()
        .client(ca)
        .impersonate(true)
        .renewal(renewal)
        .build()
        .map_err(|err| err.to_string())?;
    let xds = xds.spawn();

    let mut builder = Ztunnel::builder()
        .state(state)
        .certificates(certs.clone())
        .workload_uid(args.workload_uid.clone())
        .hbone_port(args.hbone_port);
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
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
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
