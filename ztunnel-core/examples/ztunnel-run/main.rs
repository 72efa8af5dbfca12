//! One proxy instance in dedicated mode, run inside the workload's network
//! namespace (next to redirect rules such as WIRE.md §6), or with `--node`
//! a node proxy serving every pod a node agent hands over by ZDS (node mode:
//! `--zds-socket PATH`, or the `node` section of the file):
//!
//! ```text
//! cargo run -p ztunnel-core --example ztunnel-run -- \
//!     --control-plane 10.0.0.1:15012 --root root-cert.pem --token <token> \
//!     --workload-uid Kubernetes//Pod/default/shell [--node-id <id>] \
//!     [--cert-ttl <seconds>] [--socks5 127.0.0.1:15080] [--hbone-port 15008] \
//!     [--worker-threads 1] [--on-demand] [--admin 127.0.0.1:15000] \
//!     [--metrics 0.0.0.0:15020] [--readiness 0.0.0.0:15021]
//! cargo run -p ztunnel-core --example ztunnel-run -- --config ztunnel.yaml [flags]
//! ```
//!
//! `--help` describes every flag. `--config FILE` reads one YAML (or JSON)
//! file that drives the whole binary: its own settings (control plane, root
//! certificates, token file, listener addresses, worker threads) and the
//! library's `Config`s in sections, `proxy` (`ztunnel_core::ZtunnelConfig`),
//! `xds` (`XdsClientConfig`) and `certificates` (`CertManagerConfig`);
//! `sample-config.yaml` beside this file lists every field with its default.
//! A flag given on the command line overrides the file; a required value
//! (control plane, root, token, workload uid) may come from either.
//! `--print-config` prints the configuration that flags and file make
//! together, as JSON that `--config` reads back, and exits.
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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use mesh_ca::CaClient;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use ztunnel_core::net::socket::listen_with_nodelay;
use ztunnel_core::{
    CertManager, CertManagerConfig, Listeners, NodeProxy, NodeProxyConfig, XdsClient,
    XdsClientConfig, Ztunnel, ZtunnelConfig,
};

use clap::{CommandFactory, Parser};
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
    about = "One podless proxy instance (dedicated mode) for one workload, inside its network namespace; or, with --node, a node proxy serving every pod a node agent hands over (node mode)",
    long_about = "One podless proxy instance (dedicated mode) for one workload.

Run it inside the workload's network namespace, next to redirect rules
(WIRE.md section 6). It takes its config (xDS) and its workload's
certificate from one control plane (`xds-serve --ca-dir ...` serves both
on one TLS port), and listens on 15001 (outbound), 15006 (inbound
plaintext) and 15008 (HBONE) on all addresses, plus the admin, metrics and
readiness endpoints. Prints `listening <listener> <address>` for each
listener, then `ready` once the workload is known and has its certificate
(else exits saying why); drains on SIGTERM or Ctrl-C.

Everything may also come from one YAML (or JSON) file, `--config FILE`:

  controlPlane: 10.0.0.1:15012        # --control-plane
  controlPlaneName: istiod.istio-system.svc  # --control-plane-name
  root: /etc/podless/root-cert.pem    # --root
  tokenFile: /var/run/secrets/token   # --token-file (or --token)
  workerThreads: 1                    # --worker-threads
  listeners:
    outbound: 0.0.0.0:15001           # --outbound
    inboundPlaintext: 0.0.0.0:15006   # --inbound-plaintext
    hbone: 0.0.0.0:15008              # --hbone
    socks5: off                       # --socks5
    admin: 127.0.0.1:15000            # --admin
    metrics: 0.0.0.0:15020            # --metrics
    readiness: 0.0.0.0:15021          # --readiness
  proxy:                              # ztunnel_core::ZtunnelConfig
    workloadUid: Kubernetes//Pod/default/shell  # --workload-uid
    identity: null
    network: \"\"
    socketMark: 1337                  # null for none
    certificateWait: 10s
    hbonePort: 15008                  # --hbone-port
    handshakeLimits: {timeout: 10s, maxInProgress: 1024, maxInProgressPerIp: 64}
  xds:                                # ztunnel_core::XdsClientConfig
    nodeId: null    # --node-id; null: ztunnel~0.0.0.0~<workload uid>~cluster.local
    clusterId: Kubernetes
    onDemand: false                   # --on-demand
    maxBackoff: 15s
  certificates:                       # ztunnel_core::CertManagerConfig
    impersonate: true                 # here true unless said (library: false)
    renewal: {ttl: null, initialBackoff: 1s, maxBackoff: 150s}  # ttl: --cert-ttl
  node: null        # --node, --zds-socket: node mode (ztunnel_core::NodeProxyConfig):
                    # {zdsSocket: /var/run/ztunnel/ztunnel.sock, sameNodeShortcut: true, ...}

Every field is optional (the defaults are shown); unknown fields are
refused. A flag given on the command line overrides the file; the control
plane, root, token and (in dedicated mode) workload uid are required from
one or the other.

With --node (or a `node` section), it is a node proxy instead: it follows
the node agent's ZDS socket and serves each pod the agent hands over from
inside the pod's network namespace, with the pod's own certificate (asked
for by impersonation); it prints `ready` once the agent's snapshot is
served.
examples/ztunnel-run/sample-config.yaml has it all."
)]
struct Args {
    /// A YAML (or JSON) configuration file for the whole binary (see above;
    /// flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Prints the configuration that the file and the flags make together
    /// (as JSON, which --config reads back; the token itself is left out) and
    /// exits.
    #[arg(long)]
    print_config: bool,
    /// The control plane's address (xDS and the CA on one TLS port), e.g.
    /// 10.0.0.1:15012. Required, here or as `controlPlane` in the file.
    #[arg(long, value_name = "ADDR")]
    control_plane: Option<SocketAddr>,
    /// The name the control plane's serving certificate carries, checked
    /// when connecting (default istiod.istio-system.svc, as istiod's and
    /// xds-serve's); `controlPlaneName` in the file.
    #[arg(long, value_name = "NAME")]
    control_plane_name: Option<String>,
    /// PEM file of the mesh's root certificate(s), to verify the control
    /// plane. Required, here or as `root` in the file.
    #[arg(long, value_name = "PEM")]
    root: Option<PathBuf>,
    /// Bearer token for the control plane: a node agent's, as certificates are
    /// asked for on the workload's behalf. Required, this or a token file
    /// (--token-file, or `tokenFile` in the file).
    #[arg(long)]
    token: Option<String>,
    /// A file holding the bearer token (read once at start; surrounding
    /// whitespace is ignored); `tokenFile` in the file.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The served workload's uid, e.g. Kubernetes//Pod/default/shell.
    /// Required, here or as `proxy.workloadUid` in the file.
    #[arg(long, value_name = "UID")]
    workload_uid: Option<String>,
    /// The xDS node id [default: ztunnel~0.0.0.0~<workload uid>~cluster.local];
    /// `xds.nodeId` in the file.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// The certificate lifetime to ask the CA for, in seconds [default: the
    /// CA's]; `certificates.renewal.ttl` in the file.
    #[arg(long, value_name = "SECONDS")]
    cert_ttl: Option<u64>,
    /// Also accept SOCKS5 on this address; `off` for none [default: off;
    /// conventionally 127.0.0.1:15080]; `listeners.socks5` in the file.
    #[arg(long, value_name = "ADDR|off")]
    socks5: Option<Listen>,
    /// The port peers accept HBONE on [default: 15008]; `proxy.hbonePort` in
    /// the file.
    #[arg(long, value_name = "PORT")]
    hbone_port: Option<u16>,
    /// Where to accept captured outbound connections [default:
    /// 0.0.0.0:15001]; `listeners.outbound` in the file.
    #[arg(long, value_name = "ADDR")]
    outbound: Option<SocketAddr>,
    /// Where to accept plaintext inbound connections [default:
    /// 0.0.0.0:15006]; `listeners.inboundPlaintext` in the file.
    #[arg(long, value_name = "ADDR")]
    inbound_plaintext: Option<SocketAddr>,
    /// Where to accept HBONE [default: 0.0.0.0:15008]; `listeners.hbone` in
    /// the file.
    #[arg(long, value_name = "ADDR")]
    hbone: Option<SocketAddr>,
    /// Admin endpoints (/healthz/ready, /config_dump, /metrics); `off` for
    /// none [default: 127.0.0.1:15000]; `listeners.admin` in the file.
    #[arg(long, value_name = "ADDR|off")]
    admin: Option<Listen>,
    /// Prometheus metrics (/metrics, /stats/prometheus); `off` for none
    /// [default: 0.0.0.0:15020]; `listeners.metrics` in the file.
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<Listen>,
    /// Readiness (/healthz/ready: 200 once ready, else 503); `off` for none
    /// [default: 0.0.0.0:15021]; `listeners.readiness` in the file.
    #[arg(long, value_name = "ADDR|off")]
    readiness: Option<Listen>,
    /// Runtime worker threads: 1 runs everything on the main thread (best for
    /// one workload on a small machine); more for a busy workload [default:
    /// 1]; `workerThreads` in the file.
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
    /// Look destinations up one at a time (on-demand xDS) instead of
    /// receiving every address; `xds.onDemand` in the file.
    #[arg(long)]
    on_demand: bool,
    /// Node mode: serve every pod the node agent hands over by ZDS, each
    /// from inside its own network namespace, instead of one workload (no
    /// workload uid then; the dedicated listeners are not bound); the `node`
    /// section in the file.
    #[arg(long)]
    node: bool,
    /// Node mode's ZDS socket, where the node agent listens [default:
    /// /var/run/ztunnel/ztunnel.sock]; implies --node; `node.zdsSocket` in
    /// the file.
    #[arg(long, value_name = "PATH")]
    zds_socket: Option<PathBuf>,
}

/// The name istiod's serving certificate carries, and xds-serve's by default.
const DEFAULT_CONTROL_PLANE_NAME: &str = "istiod.istio-system.svc";

/// The whole binary's configuration: `--config`'s file, then the flags.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct RunConfig {
    /// `controlPlane`: xDS and the CA on one TLS port. Required.
    control_plane: Option<SocketAddr>,
    /// `controlPlaneName`: the name in its serving certificate (default
    /// `istiod.istio-system.svc`).
    control_plane_name: String,
    /// `root`: PEM file of the mesh's root certificates. Required.
    root: Option<PathBuf>,
    /// `tokenFile`: the file holding the bearer token (or `--token`).
    token_file: Option<PathBuf>,
    /// `workerThreads`: runtime worker threads (default 1).
    worker_threads: usize,
    /// `listeners`: where each listener is bound.
    listeners: ListenersConfig,
    /// `proxy`: the proxy instance.
    proxy: ZtunnelConfig,
    /// `xds`: the xDS client (`nodeId` null: derived from the workload uid).
    xds: XdsClientConfig,
    /// `certificates`: the certificate manager (`impersonate` defaults to
    /// `true` here, whether the section is given or not: a node agent's
    /// token, certificates asked for on the workload's behalf).
    certificates: CertManagerConfig,
    /// `node`: node mode, when present (`ztunnel_core::NodeProxyConfig`;
    /// `proxy` is then its pods' template, in `node.proxy`).
    node: Option<NodeProxyConfig>,
}

impl Default for RunConfig {
    fn default() -> Self {
        let mut certificates = CertManagerConfig::default();
        certificates.impersonate = true;
        Self {
            control_plane: None,
            control_plane_name: DEFAULT_CONTROL_PLANE_NAME.to_owned(),
            root: None,
            token_file: None,
            worker_threads: 1,
            listeners: ListenersConfig::default(),
            proxy: ZtunnelConfig::default(),
            xds: XdsClientConfig::default(),
            certificates,
            node: None,
        }
    }
}

/// Where the binary binds its listeners (`listeners` in the file).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct ListenersConfig {
    /// `outbound` (default `0.0.0.0:15001`).
    outbound: SocketAddr,
    /// `inboundPlaintext` (default `0.0.0.0:15006`).
    inbound_plaintext: SocketAddr,
    /// `hbone` (default `0.0.0.0:15008`).
    hbone: SocketAddr,
    /// `socks5` (default `off`).
    socks5: Listen,
    /// `admin` (default `127.0.0.1:15000`).
    admin: Listen,
    /// `metrics` (default `0.0.0.0:15020`).
    metrics: Listen,
    /// `readiness` (default `0.0.0.0:15021`).
    readiness: Listen,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        let at = |address: &str| address.parse().expect("a default address");
        Self {
            outbound: at("0.0.0.0:15001"),
            inbound_plaintext: at("0.0.0.0:15006"),
            hbone: at("0.0.0.0:15008"),
            socks5: Listen(None),
            admin: Listen(Some(at("127.0.0.1:15000"))),
            metrics: Listen(Some(at("0.0.0.0:15020"))),
            readiness: Listen(Some(at("0.0.0.0:15021"))),
        }
    }
}

/// A listener's address, or none (`off`).
#[derive(Clone, Copy, Debug, serde::Serialize)]
#[serde(into = "String")]
struct Listen(Option<SocketAddr>);

impl<'de> serde::Deserialize<'de> for Listen {
    /// An address, or `off`; also `false` (what `off` means in YAML 1.1;
    /// `mesh_net::config::from_yaml` reads YAML 1.2, where `off` is text).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Listen;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("an address (ip:port) or `off`")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Listen, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Listen, E> {
                if on {
                    Err(E::invalid_value(serde::de::Unexpected::Bool(on), &self))
                } else {
                    Ok(Listen(None))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

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

impl From<Listen> for String {
    fn from(listen: Listen) -> Self {
        listen
            .0
            .map_or_else(|| "off".to_owned(), |address| address.to_string())
    }
}

/// What the binary runs with: the configuration, and the token.
struct Settings {
    config: RunConfig,
    token: Option<String>,
}

/// The file's configuration (or the defaults), with the flags given on top.
fn settings(args: Args) -> Result<Settings, String> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("--config {}: {err}", path.display()))?;
            let name = path.display().to_string();
            let mut config: RunConfig = mesh_net::config::from_yaml(&text, &name)
                .map_err(|err| format!("--config {err}"))?;
            // This binary's default for `certificates.impersonate` is `true`
            // (the library's is `false`): kept when the file has a
            // `certificates` section that does not say.
            let written: serde_json::Value = mesh_net::config::from_yaml(&text, &name)
                .map_err(|err| format!("--config {err}"))?;
            if written.pointer("/certificates/impersonate").is_none() {
                config.certificates.impersonate = true;
            }
            config
        }
        None => RunConfig::default(),
    };
    let Args {
        config: _,
        print_config: _,
        control_plane,
        control_plane_name,
        root,
        token,
        token_file,
        workload_uid,
        node_id,
        cert_ttl,
        socks5,
        hbone_port,
        outbound,
        inbound_plaintext,
        hbone,
        admin,
        metrics,
        readiness,
        worker_threads,
        on_demand,
        node,
        zds_socket,
    } = args;
    /// A flag given replaces the file's value.
    fn set<T>(field: &mut T, flag: Option<T>) {
        if let Some(value) = flag {
            *field = value;
        }
    }
    /// A flag given for an optional value.
    fn some<T>(flag: Option<T>) -> Option<Option<T>> {
        flag.map(Some)
    }
    set(&mut config.control_plane, some(control_plane));
    set(&mut config.control_plane_name, control_plane_name);
    set(&mut config.root, some(root));
    if token.is_some() {
        // A token given on the command line wins over the file's token file.
        config.token_file = None;
    }
    set(&mut config.token_file, some(token_file));
    set(&mut config.proxy.workload_uid, some(workload_uid));
    set(&mut config.xds.node_id, some(node_id));
    set(
        &mut config.certificates.renewal.ttl,
        some(cert_ttl.map(Duration::from_secs)),
    );
    set(&mut config.proxy.hbone_port, hbone_port);
    set(&mut config.worker_threads, worker_threads);
    let listeners = &mut config.listeners;
    set(&mut listeners.outbound, outbound);
    set(&mut listeners.inbound_plaintext, inbound_plaintext);
    set(&mut listeners.hbone, hbone);
    set(&mut listeners.socks5, socks5);
    set(&mut listeners.admin, admin);
    set(&mut listeners.metrics, metrics);
    set(&mut listeners.readiness, readiness);
    if on_demand {
        config.xds.on_demand = true;
    }
    if node || zds_socket.is_some() {
        let node = config.node.get_or_insert_with(NodeProxyConfig::default);
        set(&mut node.zds_socket, zds_socket);
    }
    Ok(Settings { config, token })
}

/// A required value missing from both the flags and the file.
fn missing(flag: &str, field: &str) -> String {
    format!("missing {flag}: give it on the command line or as `{field}` in the --config file")
}

/// The admin-style listeners: where, and which endpoints each serves.
fn admin_listeners(
    listeners: &ListenersConfig,
) -> [(&'static str, Option<SocketAddr>, &'static [&'static str]); 3] {
    [
        ("admin", listeners.admin.0, &[]),
        (
            "metrics",
            listeners.metrics.0,
            &["/metrics", "/stats/prometheus"],
        ),
        ("readiness", listeners.readiness.0, &["/healthz/ready"]),
    ]
}

/// Reads the token file (surrounding whitespace dropped).
fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("token file {}: {err}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {}: empty", path.display()));
    }
    Ok(token.to_owned())
}

/// What both modes take from the control plane: the xDS client (not yet
/// spawned) keeping the state, and the certificate manager over the CA.
struct ControlPlaneParts {
    xds: XdsClient,
    certs: CertManager,
}

/// Connects to the control plane of `config` (its root, address and name)
/// with `token`, from sockets carrying `mark`; `node_id` is the xDS node id
/// unless the file gives one.
fn control_plane_parts(
    config: &RunConfig,
    token: String,
    mark: Option<u32>,
    node_id: String,
) -> Result<ControlPlaneParts, String> {
    let root = config
        .root
        .clone()
        .ok_or_else(|| missing("--root", "root"))?;
    let roots = CertificateDer::pem_file_iter(&root)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|err| format!("root {}: {err}", root.display()))?;
    let control_plane = config
        .control_plane
        .ok_or_else(|| missing("--control-plane", "controlPlane"))?;
    let mut ca = CaClient::builder()
        .address(control_plane)
        .server_name(config.control_plane_name.clone())
        .roots(roots)
        .token(token.clone());
    // The control plane's connections must not be captured by the redirect
    // rules around the proxy: they carry the proxy's own mark.
    if let Some(mark) = mark {
        ca = ca.socket_mark(mark);
    }
    let ca = ca.build().map_err(|err| err.to_string())?;
    let mut xds_config = config.xds.clone();
    xds_config.node_id.get_or_insert(node_id);
    let xds = XdsClient::builder()
        .config(xds_config)
        .channel(ca.channel())
        .token(token)
        .build()
        .map_err(|err| err.to_string())?;
    let certs = CertManager::builder()
        .config(config.certificates)
        .client(ca)
        .build()
        .map_err(|err| err.to_string())?;
    Ok(ControlPlaneParts { xds, certs })
}

async fn run(config: RunConfig, token: String) -> Result<(), String> {
    let workload_uid = config
        .proxy
        .workload_uid
        .clone()
        .ok_or_else(|| missing("--workload-uid", "proxy.workloadUid"))?;
    let mark = config.proxy.socket_mark;
    let node_id = format!("ztunnel~0.0.0.0~{workload_uid}~cluster.local");
    let ControlPlaneParts { xds, certs } = control_plane_parts(&config, token, mark, node_id)?;
    let state = xds.state();
    let demander = xds.demander();
    let xds = xds.spawn();

    let mut registry = Registry::default();
    let mut builder = Ztunnel::builder()
        .config(config.proxy)
        .state(state)
        .certificates(certs.clone())
        .metrics(&mut registry);
    if let Some(demander) = demander {
        builder = builder.demander(demander);
    }
    let addresses = &config.listeners;
    let bind = |address: SocketAddr| {
        listen_with_nodelay(address).map_err(|err| format!("binding {address}: {err}"))
    };
    let listeners = Listeners {
        outbound: bind(addresses.outbound)?,
        inbound_plaintext: bind(addresses.inbound_plaintext)?,
        hbone: bind(addresses.hbone)?,
        socks5: addresses.socks5.0.map(bind).transpose()?,
    };
    let handle = builder
        .build()
        .map_err(|err| err.to_string())?
        .spawn(listeners)
        .map_err(|err| format!("starting the proxy: {err}"))?;
    println!("listening outbound {}", handle.outbound_addr());
    println!("listening inbound-plaintext {}", handle.inbound_addr());
    println!("listening hbone {}", handle.hbone_addr());
    if let Some(socks5) = handle.socks5_addr() {
        println!("listening socks5 {socks5}");
    }
    let registry = Arc::new(registry);
    let admin_stop = CancellationToken::new();
    let mut admins = Vec::new();
    for (name, address, paths) in admin_listeners(addresses) {
        let Some(address) = address else { continue };
        let listener = TcpListener::bind(address)
            .await
            .map_err(|err| format!("{name} listener {address}: {err}"))?;
        if let Ok(bound) = listener.local_addr() {
            println!("listening {name} {bound}");
        }
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

/// Node mode: the xDS client and the certificate manager of the node, and the
/// node proxy following the agent's ZDS socket (the admin, metrics and
/// readiness listeners are dedicated mode's only, for now). Prints `ready`
/// once the agent's first snapshot is served.
async fn run_node(mut config: RunConfig, token: String) -> Result<(), String> {
    let mut node = config.node.take().unwrap_or_default();
    // The pods' instances take the top-level `proxy` section (as dedicated
    // mode's instance does), unless the `node` section has its own.
    if node.proxy == ZtunnelConfig::default() {
        node.proxy = config.proxy.clone();
    }
    // The node proxy's own connections start in its namespace, not a pod's:
    // marked all the same, as the pods' rules expect of the data plane.
    let mark = node.proxy.socket_mark;
    let node_id = "ztunnel~0.0.0.0~ztunnel.istio-system~cluster.local".to_owned();
    let ControlPlaneParts { xds, certs } = control_plane_parts(&config, token, mark, node_id)?;
    let state = xds.state();
    let demander = xds.demander();
    let xds = xds.spawn();
    // Pods are served once the mesh's configuration is in: a restarted node
    // proxy resumes the agent's pods knowing where their traffic goes.
    xds.ready(Duration::from_secs(60))
        .await
        .map_err(|err| format!("not ready: {err}"))?;
    let zds = node.zds_socket.clone();
    let mut builder = NodeProxy::builder()
        .config(node)
        .state(state)
        .certificates(certs.clone());
    if let Some(demander) = demander {
        builder = builder.demander(demander);
    }
    let handle = builder.build().map_err(|err| err.to_string())?.spawn();
    println!("following zds {}", zds.display());
    if let Err(err) = handle.ready(Duration::from_secs(60)).await {
        return Err(format!("not ready: {err}"));
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
    handle.join().await;
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
    let args = Args::parse();
    let print = args.print_config;
    // Wrong configuration is a usage error (exit code 2), as a wrong flag is.
    let usage = |message: String| -> ExitCode {
        let _ = Args::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .print();
        ExitCode::from(2)
    };
    let Settings { config, token } = match settings(args) {
        Ok(settings) => settings,
        Err(message) => return usage(message),
    };
    if print {
        return match serde_json::to_string_pretty(&config) {
            Ok(json) => {
                use std::io::Write;
                // Into a closed pipe (`| head`) is no failure of ours.
                let _ = writeln!(std::io::stdout(), "{json}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("ztunnel-run: {err}");
                ExitCode::FAILURE
            }
        };
    }
    for (value, flag, field) in [
        (
            config.control_plane.is_none(),
            "--control-plane",
            "controlPlane",
        ),
        (config.root.is_none(), "--root", "root"),
        (
            config.proxy.workload_uid.is_none() && config.node.is_none(),
            "--workload-uid",
            "proxy.workloadUid",
        ),
    ] {
        if value {
            return usage(missing(flag, field));
        }
    }
    let token = match (token, &config.token_file) {
        (Some(token), _) => token,
        (None, Some(path)) => match read_token(path) {
            Ok(token) => token,
            Err(message) => return usage(message),
        },
        (None, None) => {
            return usage(
                "missing --token: give --token, --token-file, or `tokenFile` in the --config file"
                    .into(),
            );
        }
    };
    raise_open_files_limit();
    let log = BatchedStderr::default();
    tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::INFO)
        .init();
    let mut builder = if config.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.worker_threads);
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
    let outcome = if config.node.is_some() {
        runtime.block_on(run_node(config, token))
    } else {
        runtime.block_on(run(config, token))
    };
    log.flush();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ztunnel-run: {message}");
            ExitCode::FAILURE
        }
    }
}
