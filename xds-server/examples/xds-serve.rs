//! `xds-serve`: serve a directory of Kubernetes manifests over delta ADS.
//!
//! ```sh
//! cargo run -p podless-xds --example xds-serve -- --manifests <dir> --listen 127.0.0.1:15010 \
//!     [--tls-cert chain.pem --tls-key key.pem] [--token <token>=<spiffe-id>]... \
//!     [--ca-dir <dir> [--node-agent <token>=<spiffe-id>@<node>]...] \
//!     [--cluster-id Kubernetes] [--domain cluster.local] [--trust-domain cluster.local]
//! ```
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

use mesh_api::Identity;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use xds_server::{
    ClientAuth, ConfigSource, ControlPlane, ManifestDir, MeshConfig, Store, StoreNodeAuthorizer,
    XdsServer,
};

const USAGE: &str = "usage: xds-serve --manifests <dir> --listen <addr> \
[--tls-cert <chain.pem> --tls-key <key.pem>] [--token <token>=<spiffe-id>]... \
[--ca-dir <dir> [--node-agent <token>=<spiffe-id>@<node>]...] [--cluster-id <id>] [--domain <domain>] [--trust-domain <domain>]";

struct Args {
    manifests: PathBuf,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
    tokens: Vec<(String, Identity)>,
    ca_dir: Option<PathBuf>,
    node_agents: Vec<(String, Identity, String)>,
    mesh: MeshConfig,
}

fn parse_args() -> Result<Args, String> {
    let mut manifests = None;
    let mut listen = None;
    let mut cert = None;
    let mut key = None;
    let mut tokens = Vec::new();
    let mut ca_dir = None;
    let mut node_agents = Vec::new();
    let mut mesh = MeshConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--manifests" => manifests = Some(PathBuf::from(value()?)),
            "--listen" => {
                listen = Some(value()?.parse().map_err(|err| format!("--listen: {err}"))?);
            }
            "--tls-cert" => cert = Some(PathBuf::from(value()?)),
            "--tls-key" => key = Some(PathBuf::from(value()?)),
            "--token" => {
                let value = value()?;
                let (token, identity) = value
                    .split_once('=')
                    .ok_or(format!("--token {value:?}: expected <token>=<spiffe-id>"))?;
                let identity = Identity::parse_uri(identity)
                    .map_err(|err| format!("--token {value:?}: {err}"))?;
                tokens.push((token.to_owned(), identity));
            }
            "--ca-dir" => ca_dir = Some(PathBuf::from(value()?)),
            "--node-agent" => {
                let value = value()?;
                let parsed = value.split_once('=').and_then(|(token, rest)| {
                    let (identity, node) = rest.rsplit_once('@')?;
                    Some((token, identity, node))
                });
                let Some((token, identity, node)) = parsed else {
                    return Err(format!(
                        "--node-agent {value:?}: expected <token>=<spiffe-id>@<node>"
                    ));
                };
                let identity = Identity::parse_uri(identity)
                    .map_err(|err| format!("--node-agent {value:?}: {err}"))?;
                node_agents.push((token.to_owned(), identity, node.to_owned()));
            }
            "--cluster-id" => mesh.cluster_id = value()?,
            "--domain" => mesh.domain = value()?,
            "--trust-domain" => mesh.trust_domain = value()?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(format!("--tls-cert and --tls-key go together\n{USAGE}")),
    };
    if tls.is_some() && ca_dir.is_some() {
        return Err(format!(
            "--ca-dir serves TLS with a certificate the CA signs: drop --tls-cert\n{USAGE}"
        ));
    }
    if !node_agents.is_empty() && ca_dir.is_none() {
        return Err(format!("--node-agent needs --ca-dir\n{USAGE}"));
    }
    Ok(Args {
        manifests: manifests.ok_or(format!("--manifests is required\n{USAGE}"))?,
        listen: listen.ok_or(format!("--listen is required\n{USAGE}"))?,
        tls,
        tokens,
        ca_dir,
        node_agents,
        mesh,
    })
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

/// The mesh CA in `dir`, sharing the port; its TLS configuration, and the
/// authenticators it adds (node agents' tokens, mesh client certificates).
struct WithCa {
    ca: mesh_ca::CaServer,
    authority: Arc<mesh_ca::Authority>,
    root: PathBuf,
}

fn ca(
    args: &Args,
    store: &Store,
    tokens: &mesh_ca::StaticTokens,
) -> Result<Option<WithCa>, String> {
    let Some(dir) = &args.ca_dir else {
        return Ok(None);
    };
    let trust_domain = &args.mesh.trust_domain;
    let material =
        mesh_ca::load_or_create(dir, trust_domain, Duration::from_secs(10 * 365 * 86400))
            .map_err(|err| format!("--ca-dir {}: {err}", dir.display()))?;
    let authority = Arc::new(
        mesh_ca::Authority::new(&material, trust_domain, mesh_ca::SigningPolicy::default())
            .map_err(|err| err.to_string())?,
    );
    let mut serving = mesh_ca::ServingNames::default();
    if !args.listen.ip().is_unspecified() {
        serving.ips.push(args.listen.ip());
    }
    let mut builder = mesh_ca::CaServer::builder()
        .authority(authority.clone())
        .authenticator(tokens.clone())
        .authenticator(mesh_ca::ClientCertificate::new(authority.clone())?)
        .serving_names(serving)
        .node_authorizer(StoreNodeAuthorizer::new(store.clone()));
    for (_, identity, _) in &args.node_agents {
        builder = builder.node_agent(identity.clone());
    }
    let ca = builder.build().map_err(|err| err.to_string())?;
    Ok(Some(WithCa {
        ca,
        authority,
        root: dir.join(mesh_ca::store::ROOT_CERT_FILE),
    }))
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let store = Store::new(args.mesh.clone());
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

    let mut tokens = mesh_ca::StaticTokens::new();
    for (token, identity) in &args.tokens {
        tokens = tokens.token(token, identity.clone());
    }
    for (token, identity, node) in &args.node_agents {
        let caller = mesh_ca::Authenticated {
            identity: identity.clone(),
            node: Some(node.clone()),
            pod: None,
        };
        tokens = tokens.caller(token, caller);
    }
    let with_ca = ca(&args, &store, &tokens)?;
    let auth = match &with_ca {
        Some(with_ca) => ClientAuth::new()
            .with(tokens)
            .with(mesh_ca::ClientCertificate::new(with_ca.authority.clone())?),
        None if args.tokens.is_empty() => ClientAuth::anonymous(),
        None => ClientAuth::new().with(tokens),
    };
    let mut builder = XdsServer::builder().store(store.clone()).client_auth(auth);
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
        }) => {
            reload_from = args.ca_dir.clone().map(|dir| (dir, authority));
            println!("root certificate: {}", root.display());
            ControlPlane::builder()
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
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xds-serve: {message}");
            ExitCode::FAILURE
        }
    }
}
