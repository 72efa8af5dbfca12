//! `xds-serve`: serve a directory of Kubernetes manifests over delta ADS.
//!
//! ```sh
//! cargo run -p xds-server --example xds-serve -- --manifests <dir> --listen 127.0.0.1:15010 \
//!     [--tls-cert chain.pem --tls-key key.pem] [--token <token>=<spiffe-id>]... \
//!     [--cluster-id Kubernetes] [--domain cluster.local] [--trust-domain cluster.local]
//! ```
//!
//! The directory holds Namespaces, Pods, Services and AuthorizationPolicies
//! (`*.yaml`, `*.yml`, `*.json`, also in subdirectories); it is watched and
//! changes are pushed to connected clients. Without `--tls-cert` the server is
//! plaintext (local testing). Without `--token` clients need no credentials;
//! with tokens, each client must send `authorization: Bearer <token>`.
//!
//! It prints `listening on <addr>` once the directory is loaded and the server
//! serves; Ctrl-C stops it.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use mesh_api::Identity;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use xds_server::{ClientAuth, ConfigSource, ManifestDir, MeshConfig, Store, XdsServer};

const USAGE: &str = "usage: xds-serve --manifests <dir> --listen <addr> \
[--tls-cert <chain.pem> --tls-key <key.pem>] [--token <token>=<spiffe-id>]... \
[--cluster-id <id>] [--domain <domain>] [--trust-domain <domain>]";

struct Args {
    manifests: PathBuf,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
    tokens: Vec<(String, Identity)>,
    mesh: MeshConfig,
}

fn parse_args() -> Result<Args, String> {
    let mut manifests = None;
    let mut listen = None;
    let mut cert = None;
    let mut key = None;
    let mut tokens = Vec::new();
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
    Ok(Args {
        manifests: manifests.ok_or(format!("--manifests is required\n{USAGE}"))?,
        listen: listen.ok_or(format!("--listen is required\n{USAGE}"))?,
        tls,
        tokens,
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

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let store = Store::new(args.mesh.clone());
    let mut manifests = ManifestDir::new(&args.manifests);
    manifests.sync(&store).map_err(|err| err.to_string())?;
    for problem in manifests.problems().current() {
        eprintln!(
            "xds-serve: skipped {}: {}",
            problem.path.display(),
            problem.problems.join("; ")
        );
    }
    let stats = store.stats();
    eprintln!(
        "xds-serve: {} workloads, {} services, {} authorizations",
        stats.workloads, stats.services, stats.authorizations
    );

    let auth = if args.tokens.is_empty() {
        ClientAuth::anonymous()
    } else {
        let tokens = args
            .tokens
            .iter()
            .fold(mesh_ca::StaticTokens::new(), |tokens, (token, identity)| {
                tokens.token(token, identity.clone())
            });
        ClientAuth::new().with(tokens)
    };
    let mut builder = XdsServer::builder().store(store.clone()).client_auth(auth);
    if let Some((cert, key)) = &args.tls {
        builder = builder.tls(tls_config(cert, key)?);
    }
    let server = builder.build().map_err(|err| err.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| format!("--listen {}: {err}", args.listen))?;
    let handle = server.spawn(listener).map_err(|err| err.to_string())?;
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(Box::new(manifests).run(store, shutdown.clone()));
    println!("listening on {}", handle.local_addr());

    tokio::signal::ctrl_c()
        .await
        .map_err(|err| err.to_string())?;
    shutdown.cancel();
    let _ = watcher.await;
    handle
        .drain(std::time::Duration::from_secs(5))
        .await
        .map_err(|err| err.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
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
