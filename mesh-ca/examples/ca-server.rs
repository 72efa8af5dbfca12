//! `ca-server`: run the mesh CA.
//!
//! ```sh
//! cargo run -p mesh-ca --example ca-server -- --dir /tmp/ca --listen 127.0.0.1:15012 \
//!     --token secret=spiffe://cluster.local/ns/default/sa/shell \
//!     [--token ...] [--trust-domain cluster.local] [--dns-name istiod.istio-system.svc] [--ip 127.0.0.1] \
//!     [--node-agent <token>=<spiffe-id>@<node> ...] [--workload <node>=<spiffe-id> ...] \
//!     [--config mesh-ca/examples/ca-server-config.yaml]
//! ```
//!
//! `--help` describes every flag; the flags are parsed with clap, so a
//! missing or malformed one is named on stderr with exit status 2.
//!
//! `--config` reads a `mesh_ca::CaServerConfig` (YAML or JSON, with
//! `mesh_net::config::from_yaml`): the serving certificate's names and
//! validity, the handshake limits and the trusted node agents. Flags given
//! too add to it: `--dns-name`, `--ip` and `--node-agent` extend its lists.
//! `mesh-ca/examples/ca-server-config.yaml` is a sample with every field.
//!
//! `--node-agent` gives a node agent (e.g. a ztunnel) a token bound to its node;
//! it may then ask for the certificates of the workloads `--workload` places on
//! that node (`ImpersonatedIdentity`).
//!
//! Creates (or loads) the CA files in `--dir`, serves `CreateCertificate` over TLS
//! on `--listen`, and prints `root certificate: <path>` and `listening on <addr>`
//! once ready. Ctrl-C drains and stops it.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use mesh_api::Identity;
use mesh_ca::{
    Authenticated, Authority, CaServer, CaServerConfig, ClientCertificate, SigningPolicy,
    StaticNodeAuthorizer, StaticTokens, load_or_create, store,
};

/// Run the podless mesh certificate authority (Istio's CreateCertificate).
///
/// Creates a self-signed root for --trust-domain in --dir on first run (or
/// loads the CA files already there), then serves Istio's gRPC
/// CreateCertificate API over TLS on --listen: a caller that authenticates
/// (a bearer token given with --token or --node-agent, or a mesh client
/// certificate it got earlier) gets its SPIFFE certificate, valid as long
/// as it asks, at most 90 days (24 hours when it does not say). A real
/// ztunnel or istio-agent can use it as its CA.
///
/// Once serving it prints, on stdout:
///
///     root certificate: <dir>/root-cert.pem
///     listening on <address>
///
/// (clients trust that root; the TLS serving certificate is signed by the
/// CA). Ctrl-C drains it (up to 10 s for calls in progress) and stops it.
///
/// A node agent (a ztunnel serving several workloads) authenticates with a
/// --node-agent token bound to its node, and may then ask for the
/// certificate of any workload --workload places on that node (Istio's
/// ImpersonatedIdentity), and only those.
///
/// --config reads the server's settings from a YAML (or JSON) file, a
/// mesh_ca::CaServerConfig (every field optional, camelCase, unknown
/// fields refused):
///
///     servingNames:
///       dnsNames: [istiod.istio-system.svc, localhost]
///       ips: ["127.0.0.1"]
///       validity: 8760h
///     handshakeLimits: {timeout: 10s, maxInProgress: 1024, maxInProgressPerIp: 64}
///     nodeAgents: [spiffe://cluster.local/ns/istio-system/sa/ztunnel]
///
/// Flags add to the file: --dns-name and --ip extend servingNames, and
/// --node-agent extends nodeAgents. Tokens are secrets and stay flags.
#[derive(Parser)]
#[command(
    name = "ca-server",
    verbatim_doc_comment,
    group = ArgGroup::new("callers").args(["tokens", "node_agents"]).required(true).multiple(true),
    after_help = concat!(
        "Example: a token for one workload, and a node agent on node-a that may\n",
        "fetch the certificate of echo, which runs there:\n",
        "\n",
        "  cargo run -p mesh-ca --example ca-server -- --dir /tmp/ca \\\n",
        "      --listen 127.0.0.1:15012 \\\n",
        "      --token s3cret=spiffe://cluster.local/ns/default/sa/shell \\\n",
        "      --node-agent agent-token=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a \\\n",
        "      --workload node-a=spiffe://cluster.local/ns/default/sa/echo\n",
        "\n",
        "With the shipped sample configuration (every field of the file), from\n",
        "the repository root:\n",
        "\n",
        "  cargo run -p mesh-ca --example ca-server -- --dir /tmp/ca \\\n",
        "      --listen 127.0.0.1:15012 --config mesh-ca/examples/ca-server-config.yaml \\\n",
        "      --token s3cret=spiffe://cluster.local/ns/default/sa/shell",
    )
)]
struct Args {
    /// The CA's directory: created with a new root on first run, loaded after.
    ///
    /// Holds root-cert.pem (the roots clients trust), ca-cert.pem and
    /// ca-key.pem (the signing certificate and its key) and
    /// cert-chain.pem; a new root is valid 10 years. A directory made by
    /// an earlier run (or by mesh_ca::store, e.g. mid root rotation) is
    /// used as it is.
    #[arg(long, value_name = "DIR", verbatim_doc_comment)]
    dir: PathBuf,

    /// The address to serve on, as IP:PORT (e.g. 127.0.0.1:15012).
    ///
    /// Port 0 picks a free port (printed once serving). Unless it is an
    /// unspecified address (0.0.0.0 or [::]), its IP is also put in the
    /// serving certificate.
    #[arg(long, value_name = "IP:PORT", verbatim_doc_comment)]
    listen: SocketAddr,

    /// A bearer token and the identity its holder gets certificates for.
    ///
    /// Format: <token>=<spiffe-id>, e.g.
    /// s3cret=spiffe://cluster.local/ns/default/sa/shell. A client sending
    /// "authorization: Bearer s3cret" may get that identity's certificate.
    /// Repeatable; at least one --token or --node-agent is required.
    #[arg(
        long = "token",
        value_name = "TOKEN=SPIFFE-ID",
        value_parser = token,
        verbatim_doc_comment
    )]
    tokens: Vec<(String, Identity)>,

    /// A node agent's bearer token, its own identity and its node.
    ///
    /// Format: <token>=<spiffe-id>@<node>, e.g.
    /// agent-token=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a.
    /// Its holder may get the certificates of the workloads --workload
    /// places on <node> (impersonation). Repeatable.
    #[arg(
        long = "node-agent",
        value_name = "TOKEN=SPIFFE-ID@NODE",
        value_parser = node_agent,
        verbatim_doc_comment
    )]
    node_agents: Vec<(String, Identity, String)>,

    /// A workload identity that runs on a node, for node agents.
    ///
    /// Format: <node>=<spiffe-id>, e.g.
    /// node-a=spiffe://cluster.local/ns/default/sa/echo: a --node-agent of
    /// node-a may get echo's certificate. Repeatable; none by default, and
    /// only used with --node-agent.
    #[arg(
        long = "workload",
        value_name = "NODE=SPIFFE-ID",
        value_parser = workload,
        verbatim_doc_comment
    )]
    workloads: Vec<(String, Identity)>,

    /// The trust domain of the certificates (spiffe://<trust-domain>/...).
    ///
    /// Also the name in a new root; certificates are only issued for
    /// identities of this trust domain.
    #[arg(
        long,
        value_name = "DOMAIN",
        default_value = "cluster.local",
        verbatim_doc_comment
    )]
    trust_domain: String,

    /// The server's settings: a YAML (or JSON) CaServerConfig file.
    ///
    /// servingNames (dnsNames, ips, validity), handshakeLimits (timeout,
    /// maxInProgress, maxInProgressPerIp) and nodeAgents (SPIFFE
    /// identities); each optional, defaults as without the file. A
    /// misspelt field or a bad value is named with the file. See
    /// mesh-ca/examples/ca-server-config.yaml.
    #[arg(long, value_name = "FILE", verbatim_doc_comment)]
    config: Option<PathBuf>,

    /// An extra DNS name for the TLS serving certificate.
    ///
    /// Clients check the name they dial against it. It always has the
    /// --config file's servingNames.dnsNames, by default
    /// istiod.istio-system.svc, istiod.istio-system.svc.cluster.local and
    /// localhost. Repeatable.
    #[arg(long = "dns-name", value_name = "NAME", verbatim_doc_comment)]
    dns_names: Vec<String>,

    /// An extra IP address for the TLS serving certificate.
    ///
    /// It always has the --config file's servingNames.ips (by default
    /// 127.0.0.1) and the --listen IP (unless unspecified). Repeatable.
    #[arg(long = "ip", value_name = "IP", verbatim_doc_comment)]
    ips: Vec<IpAddr>,
}

/// Splits `left<sep>right`, naming the expected shape on failure.
fn split(value: &str, separator: char, shape: &str) -> Result<(String, String), String> {
    value
        .split_once(separator)
        .map(|(left, right)| (left.to_owned(), right.to_owned()))
        .ok_or(format!("expected {shape}"))
}

fn identity(value: &str) -> Result<Identity, String> {
    value
        .parse()
        .map_err(|err: mesh_api::IdentityError| err.to_string())
}

/// `--token <token>=<spiffe-id>`.
fn token(value: &str) -> Result<(String, Identity), String> {
    let (token, id) = split(value, '=', "<token>=<spiffe-id>")?;
    Ok((token, identity(&id)?))
}

/// `--node-agent <token>=<spiffe-id>@<node>`.
fn node_agent(value: &str) -> Result<(String, Identity, String), String> {
    let shape = "<token>=<spiffe-id>@<node>";
    let (token, rest) = split(value, '=', shape)?;
    let (id, node) = split(&rest, '@', shape)?;
    Ok((token, identity(&id)?, node))
}

/// `--workload <node>=<spiffe-id>`.
fn workload(value: &str) -> Result<(String, Identity), String> {
    let (node, id) = split(value, '=', "<node>=<spiffe-id>")?;
    Ok((node, identity(&id)?))
}

/// The `--config` file, or the defaults without one.
fn config(path: Option<&PathBuf>) -> Result<CaServerConfig, String> {
    let Some(path) = path else {
        return Ok(CaServerConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("--config {}: {err}", path.display()))?;
    mesh_net::config::from_yaml(&text, &path.display().to_string()).map_err(|err| err.to_string())
}

async fn run(args: Args) -> Result<(), String> {
    let mut config = config(args.config.as_ref())?;
    let material = load_or_create(
        &args.dir,
        &args.trust_domain,
        Duration::from_secs(10 * 365 * 86400),
    )
    .map_err(|err| err.to_string())?;
    let authority = Arc::new(
        Authority::new(&material, &args.trust_domain, SigningPolicy::default())
            .map_err(|err| err.to_string())?,
    );
    let mut tokens = StaticTokens::new();
    for (token, identity) in args.tokens {
        tokens = tokens.token(&token, identity);
    }
    let mut node_authorizer = StaticNodeAuthorizer::new();
    for (node, identity) in args.workloads {
        node_authorizer = node_authorizer.workload(node, identity);
    }
    // The file's node agents, and those given with tokens here.
    config.node_agents.extend(
        args.node_agents
            .iter()
            .map(|(_, identity, _)| identity.clone()),
    );
    let with_node_agents = !config.node_agents.is_empty();
    for (token, identity, node) in args.node_agents {
        let caller = Authenticated {
            identity,
            node: Some(node),
            pod: None,
        };
        tokens = tokens.caller(&token, caller);
    }
    let serving = &mut config.serving_names;
    serving.dns_names.extend(args.dns_names);
    serving.ips.extend(args.ips);
    if !args.listen.ip().is_unspecified() {
        serving.ips.push(args.listen.ip());
    }
    let mut builder = CaServer::builder()
        .config(config)
        .authority(authority.clone())
        .authenticator(tokens)
        .authenticator(ClientCertificate::new(authority.clone()).map_err(|err| err.to_string())?);
    if with_node_agents {
        builder = builder.node_authorizer(node_authorizer);
    }
    let server = builder.build().map_err(|err| err.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| format!("--listen {}: {err}", args.listen))?;
    let handle = server.spawn(listener).map_err(|err| err.to_string())?;
    handle
        .ready(Duration::from_secs(1))
        .await
        .map_err(|err| err.to_string())?;
    println!(
        "root certificate: {}",
        args.dir.join(store::ROOT_CERT_FILE).display()
    );
    println!("listening on {}", handle.local_addr());
    tokio::signal::ctrl_c()
        .await
        .map_err(|err| err.to_string())?;
    let drained = handle.drain(Duration::from_secs(10)).await;
    eprintln!("ca-server: {drained}");
    handle.join().await.map_err(|err| err.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ca-server: {message}");
            ExitCode::FAILURE
        }
    }
}
