//! `xds-serve`: serve a directory of Kubernetes manifests over delta ADS.
//!
//! ```sh
//! cargo run -p podless-xds --example xds-serve -- --manifests <dir> --listen 127.0.0.1:15010 \
//!     [--tls-cert chain.pem --tls-key key.pem] [--token <token>=<spiffe-id>]... \
//!     [--ca-dir <dir> [--node-agent <token>=<spiffe-id>@<node>]...] \
//!     [--cluster-id Kubernetes] [--domain cluster.local] [--trust-domain cluster.local] \
//!     [--config xds-server/examples/xds-serve-config.yaml]
//! ```
//!
//! On the shipped sample, from the repository root:
//!
//! ```sh
//! cargo run -p podless-xds --example xds-serve -- \
//!     --manifests xds-server/examples/xds-serve-sample --listen 127.0.0.1:15010
//! ```
//!
//! `--help` describes every flag; the flags are parsed with clap, so a
//! missing, malformed or conflicting one is named on stderr with exit status 2.
//!
//! The directory holds Namespaces, Pods, Services and AuthorizationPolicies
//! (`*.yaml`, `*.yml`, `*.json`, also in subdirectories); it is watched and
//! changes are pushed to connected clients. Without `--tls-cert` the server is
//! plaintext (local testing). Without `--token` clients need no credentials;
//! with tokens, each client must send `authorization: Bearer <token>`.
//!
//! With `--ca-dir`, the mesh CA (`mesh-ca`, files created on first use) is
//! served on the same port, over TLS with a serving certificate it signs: the
//! control plane of a podless cluster, which a real ztunnel can use for both
//! config and certificates. `--node-agent <token>=<spiffe-id>@<node>` gives a node
//! agent (a ztunnel) a token bound to its node: it may then fetch certificates
//! for the workloads the manifests place on that node. Clients may also
//! authenticate with a mesh certificate.
//!
//! `--config` reads a `xds_server::ControlPlaneConfig` (YAML or JSON, with
//! `mesh_net::config::from_yaml`): the mesh settings (`mesh`), the xDS
//! server's (`xds`), the CA's (`ca`, used with `--ca-dir`) and the shared
//! port's handshake limits. Flags given too win: `--cluster-id`, `--domain`
//! and `--trust-domain` replace the file's `mesh` values, `--node-agent`
//! adds to `ca.nodeAgents`. `xds-server/examples/xds-serve-config.yaml` is a
//! sample with every field.
//!
//! It prints `root certificate: <path>` (with `--ca-dir`) and then
//! `listening on <addr>` once the directory is loaded and the server serves;
//! Ctrl-C or SIGTERM stops it. SIGHUP reloads the CA's files from `--ca-dir`
//! (each step of a root rotation made with `mesh_ca::store`).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use mesh_api::Identity;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use xds_server::{
    Authenticated, Authenticators, ClientCertificate, ConfigSource, ControlPlane,
    ControlPlaneConfig, ManifestDir, MeshConfig, StaticTokens, Store, StoreNodeAuthorizer,
    XdsServer,
};

/// Serve a directory of Kubernetes manifests to ztunnels over delta ADS.
///
/// The podless ambient control plane in one process: it reads the
/// Namespaces, Pods, Services and AuthorizationPolicies of --manifests,
/// translates them as istiod does for ambient, and serves Istio's workload
/// API (istio.workload.Address and istio.security.Authorization over delta
/// ADS) on --listen. The directory is watched: edits are pushed to the
/// connected clients; a file that does not parse keeps what it defined
/// before, and its problem is logged on stderr.
///
/// With --ca-dir it also serves the mesh CA (Istio's CreateCertificate) on
/// the same TLS port, as istiod serves 15012: a real ztunnel can take both
/// its configuration and its certificates from it.
///
/// On stderr it reports what it loaded (<n> workloads, <n> services, <n>
/// authorizations) and any problem of a file; on stdout, once serving:
///
///     root certificate: <ca-dir>/root-cert.pem    (with --ca-dir)
///     listening on <address>
///
/// Ctrl-C or SIGTERM drains it (up to 5 s) and stops it; SIGHUP reloads the
/// CA's files from --ca-dir (each step of a root rotation).
///
/// --config reads the control plane's settings from a YAML (or JSON) file,
/// a xds_server::ControlPlaneConfig (every field optional, camelCase,
/// unknown fields refused):
///
///     handshakeLimits: {timeout: 10s, maxInProgress: 1024, maxInProgressPerIp: 64}
///     mesh: {clusterId: Kubernetes, domain: cluster.local, trustDomain: cluster.local,
///            rootNamespace: istio-system, network: ""}
///     xds:
///       maxResponseBytes: 1048576
///       handshakeLimits: {timeout: 10s}
///     ca:                                   (used with --ca-dir)
///       servingNames: {dnsNames: [istiod.istio-system.svc], ips: ["127.0.0.1"], validity: 8760h}
///       handshakeLimits: {timeout: 10s}
///       nodeAgents: [spiffe://cluster.local/ns/istio-system/sa/ztunnel]
///
/// Flags given too win: --cluster-id, --domain and --trust-domain replace
/// the file's mesh values; --node-agent adds to ca.nodeAgents. Tokens and
/// keys are secrets and stay flags and files of their own.
#[derive(Parser)]
#[command(
    name = "xds-serve",
    verbatim_doc_comment,
    after_help = concat!(
        "Try it on the shipped sample (a namespace, two pods, a service and a\n",
        "policy), from the repository root:\n",
        "\n",
        "  cargo run -p podless-xds --example xds-serve -- \\\n",
        "      --manifests xds-server/examples/xds-serve-sample --listen 127.0.0.1:15010\n",
        "\n",
        "and with the shipped configuration (every field of the file), serving\n",
        "the CA too:\n",
        "\n",
        "  cargo run -p podless-xds --example xds-serve -- \\\n",
        "      --manifests xds-server/examples/xds-serve-sample --listen 127.0.0.1:15012 \\\n",
        "      --config xds-server/examples/xds-serve-config.yaml --ca-dir /tmp/podless-ca",
    )
)]
struct Cli {
    /// The manifest directory to serve (and watch).
    ///
    /// Its *.yaml, *.yml and *.json files, also in subdirectories, each
    /// with one or more documents (--- between YAML documents, or a List).
    /// Namespaces, Pods, Services and AuthorizationPolicies
    /// (security.istio.io) are used; other kinds are skipped. A pod is in
    /// the ambient mesh (HBONE) when it or its namespace is labelled
    /// istio.io/dataplane-mode=ambient.
    #[arg(long, value_name = "DIR", verbatim_doc_comment)]
    manifests: PathBuf,

    /// The address to serve on, as IP:PORT (e.g. 127.0.0.1:15010).
    ///
    /// Port 0 picks a free port (printed once serving). With --ca-dir,
    /// unless it is an unspecified address (0.0.0.0 or [::]), its IP is
    /// also put in the serving certificate.
    #[arg(long, value_name = "IP:PORT", verbatim_doc_comment)]
    listen: SocketAddr,

    /// Serve TLS with this certificate chain (PEM, leaf first).
    ///
    /// Needs --tls-key. Without it (and without --ca-dir) the server is
    /// plaintext HTTP/2, for local testing.
    #[arg(
        long,
        value_name = "CHAIN.pem",
        requires = "tls_key",
        verbatim_doc_comment
    )]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        value_name = "KEY.pem",
        requires = "tls_cert",
        verbatim_doc_comment
    )]
    tls_key: Option<PathBuf>,

    /// A bearer token clients may present, and the identity it stands for.
    ///
    /// Format: <token>=<spiffe-id>, e.g.
    /// s3cret=spiffe://cluster.local/ns/istio-system/sa/ztunnel. With
    /// tokens, a client must send "authorization: Bearer <token>" (or,
    /// with --ca-dir, a mesh client certificate). Repeatable; none by
    /// default: without --token and --ca-dir clients need no credentials.
    #[arg(
        long = "token",
        value_name = "TOKEN=SPIFFE-ID",
        value_parser = token,
        verbatim_doc_comment
    )]
    tokens: Vec<(String, Identity)>,

    /// Also serve the mesh CA, from this directory, on the same TLS port.
    ///
    /// The CA's files (root-cert.pem, ca-cert.pem, ca-key.pem,
    /// cert-chain.pem) are created there on first use, with a root valid
    /// 10 years, and loaded after. The server then serves TLS with a
    /// certificate the CA signs (so not with --tls-cert), and clients may
    /// authenticate with the mesh certificates it issued.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["tls_cert", "tls_key"],
        verbatim_doc_comment
    )]
    ca_dir: Option<PathBuf>,

    /// A node agent's bearer token, its identity and its node (needs --ca-dir).
    ///
    /// Format: <token>=<spiffe-id>@<node>, e.g.
    /// agent=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a. Its
    /// holder gets xDS, and may fetch the certificates of the workloads
    /// the manifests place on <node> (a ztunnel serving that node).
    /// Repeatable.
    #[arg(
        long = "node-agent",
        value_name = "TOKEN=SPIFFE-ID@NODE",
        value_parser = node_agent,
        requires = "ca_dir",
        verbatim_doc_comment
    )]
    node_agents: Vec<(String, Identity, String)>,

    /// The control plane's settings: a YAML (or JSON) ControlPlaneConfig file.
    ///
    /// handshakeLimits (the shared port's), mesh (clusterId, domain,
    /// trustDomain, rootNamespace, network), xds (maxResponseBytes,
    /// handshakeLimits) and ca (servingNames, handshakeLimits,
    /// nodeAgents; used with --ca-dir); each optional, defaults as
    /// without the file. A misspelt field or a bad value is named with
    /// the file. Flags given too win. See
    /// xds-server/examples/xds-serve-config.yaml.
    #[arg(long, value_name = "FILE", verbatim_doc_comment)]
    config: Option<PathBuf>,

    /// The cluster's id: part of every workload's uid (<id>//Pod/<ns>/<name>).
    ///
    /// Given, it replaces the --config file's mesh.clusterId.
    #[arg(
        long,
        value_name = "ID",
        default_value_t = MeshConfig::default().cluster_id,
        verbatim_doc_comment
    )]
    cluster_id: String,

    /// The cluster's DNS domain: services are <name>.<ns>.svc.<domain>.
    ///
    /// Given, it replaces the --config file's mesh.domain.
    #[arg(
        long,
        value_name = "DOMAIN",
        default_value_t = MeshConfig::default().domain,
        verbatim_doc_comment
    )]
    domain: String,

    /// The trust domain of workload identities (spiffe://<trust-domain>/...).
    ///
    /// Also the CA's, with --ca-dir. Given, it replaces the --config
    /// file's mesh.trustDomain.
    #[arg(
        long,
        value_name = "DOMAIN",
        default_value_t = MeshConfig::default().trust_domain,
        verbatim_doc_comment
    )]
    trust_domain: String,
}

/// `--token <token>=<spiffe-id>`.
fn token(value: &str) -> Result<(String, Identity), String> {
    let (token, identity) = value
        .split_once('=')
        .ok_or("expected <token>=<spiffe-id>")?;
    let identity = Identity::parse_uri(identity).map_err(|err| err.to_string())?;
    Ok((token.to_owned(), identity))
}

/// `--node-agent <token>=<spiffe-id>@<node>`.
fn node_agent(value: &str) -> Result<(String, Identity, String), String> {
    let (token, identity, node) = value
        .split_once('=')
        .and_then(|(token, rest)| {
            let (identity, node) = rest.rsplit_once('@')?;
            Some((token, identity, node))
        })
        .ok_or("expected <token>=<spiffe-id>@<node>")?;
    let identity = Identity::parse_uri(identity).map_err(|err| err.to_string())?;
    Ok((token.to_owned(), identity, node.to_owned()))
}

struct Args {
    manifests: PathBuf,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
    tokens: Vec<(String, Identity)>,
    ca_dir: Option<PathBuf>,
    node_agents: Vec<(String, Identity, String)>,
    /// The `--config` file (or the defaults) with the flags given applied.
    config: ControlPlaneConfig,
}

impl Args {
    /// The command line, and the `--config` file it names, read; a flag
    /// given on the command line wins over the file.
    fn parse() -> Result<Self, String> {
        let matches = Cli::command().get_matches();
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|err| format!("--config {}: {err}", path.display()))?;
                mesh_net::config::from_yaml(&text, &path.display().to_string())
                    .map_err(|err| err.to_string())?
            }
            None => ControlPlaneConfig::default(),
        };
        // Without the flag, clap's default is MeshConfig's, which the file's
        // value replaces.
        let mesh = &mut config.mesh;
        if given("cluster_id") || cli.config.is_none() {
            mesh.cluster_id = cli.cluster_id;
        }
        if given("domain") || cli.config.is_none() {
            mesh.domain = cli.domain;
        }
        if given("trust_domain") || cli.config.is_none() {
            mesh.trust_domain = cli.trust_domain;
        }
        config.ca.node_agents.extend(
            cli.node_agents
                .iter()
                .map(|(_, identity, _)| identity.clone()),
        );
        if cli.ca_dir.is_none() && config.ca != mesh_ca::CaServerConfig::default() {
            eprintln!("xds-serve: warning: the file's `ca` section is not used without --ca-dir");
        }
        Ok(Self {
            manifests: cli.manifests,
            listen: cli.listen,
            // Clap has checked that both are given or neither.
            tls: cli.tls_cert.zip(cli.tls_key),
            tokens: cli.tokens,
            ca_dir: cli.ca_dir,
            node_agents: cli.node_agents,
            config,
        })
    }
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|err| format!("--tls-cert {}: {err}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| format!("--tls-key {}: {err}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| format!("--tls-cert/--tls-key: {err}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The mesh CA in `dir`, sharing the port, and the authenticators xDS and
/// the CA share (node agents' tokens, mesh client certificates).
struct WithCa {
    ca: mesh_ca::CaServer,
    authority: Arc<mesh_ca::Authority>,
    authenticators: Authenticators,
    root: PathBuf,
}

fn ca(args: &Args, store: &Store, tokens: StaticTokens) -> Result<Option<WithCa>, String> {
    let Some(dir) = &args.ca_dir else {
        return Ok(None);
    };
    let trust_domain = &args.config.mesh.trust_domain;
    let material =
        mesh_ca::load_or_create(dir, trust_domain, Duration::from_secs(10 * 365 * 86400))
            .map_err(|err| format!("--ca-dir {}: {err}", dir.display()))?;
    let authority = Arc::new(
        mesh_ca::Authority::new(&material, trust_domain, mesh_ca::SigningPolicy::default())
            .map_err(|err| err.to_string())?,
    );
    // The file's CA settings (node agents from --node-agent included), and
    // the --listen IP on the serving certificate.
    let mut config = args.config.ca.clone();
    if !args.listen.ip().is_unspecified() {
        config.serving_names.ips.push(args.listen.ip());
    }
    let client_certificates =
        ClientCertificate::new(authority.clone()).map_err(|err| err.to_string())?;
    let authenticators = Authenticators::new().with(tokens).with(client_certificates);
    let ca = mesh_ca::CaServer::builder()
        .config(config)
        .authority(authority.clone())
        .authenticators(authenticators.clone())
        .node_authorizer(StoreNodeAuthorizer::new(store.clone()))
        .build()
        .map_err(|err| err.to_string())?;
    Ok(Some(WithCa {
        ca,
        authority,
        authenticators,
        root: dir.join(mesh_ca::store::ROOT_CERT_FILE),
    }))
}

async fn run(args: Args) -> Result<(), String> {
    let store = Store::new(args.config.mesh.clone());
    let mut manifests = ManifestDir::new(&args.manifests);
    manifests.sync(&store).map_err(|err| err.to_string())?;
    for problem in manifests.problems().current() {
        eprintln!(
            "xds-serve: problem in {}: {}",
            problem.path.display(),
            problem.problems.join("; ")
        );
    }
    let stats = store.stats();
    eprintln!(
        "xds-serve: {} workloads, {} services, {} authorizations",
        stats.workloads, stats.services, stats.authorizations
    );

    let mut tokens = StaticTokens::new();
    for (token, identity) in &args.tokens {
        tokens = tokens.token(token, identity.clone());
    }
    for (token, identity, node) in &args.node_agents {
        let caller = Authenticated {
            identity: identity.clone(),
            node: Some(node.clone()),
            pod: None,
        };
        tokens = tokens.caller(token, caller);
    }
    let no_tokens = args.tokens.is_empty();
    let with_ca = ca(&args, &store, tokens.clone())?;
    let authenticators = match &with_ca {
        Some(with_ca) => with_ca.authenticators.clone(),
        None if no_tokens => Authenticators::anonymous(),
        None => Authenticators::new().with(tokens),
    };
    let mut builder = XdsServer::builder()
        .config(args.config.xds)
        .store(store.clone())
        .authenticators(authenticators);
    if let Some((cert, key)) = &args.tls {
        builder = builder.tls(tls_config(cert, key)?);
    }
    let xds = builder.build().map_err(|err| err.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| format!("--listen {}: {err}", args.listen))?;
    let mut reload_from = None;
    let handle = match with_ca {
        // xDS and the CA on one TLS port, as istiod serves 15012.
        Some(WithCa {
            ca,
            root,
            authority,
            ..
        }) => {
            reload_from = args.ca_dir.clone().map(|dir| (dir, authority));
            println!("root certificate: {}", root.display());
            ControlPlane::builder()
                .config(args.config.clone())
                .xds(xds)
                .ca(ca)
                .build()
                .map_err(|err| err.to_string())?
                .spawn(listener)
        }
        None => xds.spawn(listener),
    }
    .map_err(|err| err.to_string())?;
    let local_addr = handle.local_addr();
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(Box::new(manifests).run(store, shutdown.clone()));
    println!("listening on {local_addr}");

    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(|err| err.to_string())?;
    let mut hangup = signal(SignalKind::hangup()).map_err(|err| err.to_string())?;
    loop {
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => {
                interrupted.map_err(|err| err.to_string())?;
                break;
            }
            _ = terminate.recv() => break,
            _ = hangup.recv() => {
                if let Some((dir, authority)) = &reload_from {
                    match mesh_ca::store::load(dir).map_err(|err| err.to_string()).and_then(|material| authority.reload(&material).map_err(|err| err.to_string())) {
                        Ok(()) => eprintln!("xds-serve: reloaded the CA from {}", dir.display()),
                        Err(err) => eprintln!("xds-serve: kept the CA as it was: {err}"),
                    }
                }
            }
        }
    }
    shutdown.cancel();
    let _ = watcher.await;
    let drained = handle.drain(Duration::from_secs(5)).await;
    eprintln!("xds-serve: {drained}");
    handle.join().await.map_err(|err| err.to_string())
}

fn main() -> ExitCode {
    // Arguments first: a bad one is reported (exit status 2) before anything
    // starts, and so is a --config file that cannot be read (exit status 1).
    let args = match Args::parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("xds-serve: {message}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("xds-serve: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xds-serve: {message}");
            ExitCode::FAILURE
        }
    }
}
