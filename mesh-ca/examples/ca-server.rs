//! `ca-server`: run the mesh CA.
//!
//! ```sh
//! cargo run -p mesh-ca --example ca-server -- --dir /tmp/ca --listen 127.0.0.1:15012 \
//!     --token secret=spiffe://cluster.local/ns/default/sa/shell \
//!     [--token ...] [--trust-domain cluster.local] [--dns-name istiod.istio-system.svc] [--ip 127.0.0.1] \
//!     [--node-agent <token>=<spiffe-id>@<node> ...] [--workload <node>=<spiffe-id> ...]
//! ```
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

use mesh_api::Identity;
use mesh_ca::server::CaServerBuilder;
use mesh_ca::{
    Authenticated, Authority, CaServer, ClientCertificate, ServingNames, SigningPolicy,
    StaticNodeAuthorizer, StaticTokens, load_or_create, store,
};

struct Args {
    dir: PathBuf,
    listen: SocketAddr,
    tokens: Vec<(String, Identity)>,
    node_agents: Vec<(String, Identity, String)>,
    workloads: Vec<(String, Identity)>,
    trust_domain: String,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
}

const USAGE: &str = "usage: ca-server --dir <dir> --listen <addr> --token <token>=<spiffe-id> ... \
                     [--trust-domain <td>] [--dns-name <name>] ... [--ip <ip>] ... \
                     [--node-agent <token>=<spiffe-id>@<node>] ... [--workload <node>=<spiffe-id>] ...";

/// Splits `left<sep>right`, naming the flag and the expected shape on failure.
fn split<'a>(
    flag: &str,
    value: &'a str,
    separator: char,
    shape: &str,
) -> Result<(&'a str, &'a str), String> {
    value
        .split_once(separator)
        .ok_or(format!("{flag} {value:?}: expected {shape}"))
}

fn identity(flag: &str, value: &str) -> Result<Identity, String> {
    value.parse().map_err(|err| format!("{flag}: {err}"))
}

fn parse_args() -> Result<Args, String> {
    let mut dir = None;
    let mut listen = None;
    let mut tokens = Vec::new();
    let mut node_agents = Vec::new();
    let mut workloads = Vec::new();
    let mut trust_domain = "cluster.local".to_owned();
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--listen" => {
                listen = Some(value()?.parse().map_err(|err| format!("--listen: {err}"))?);
            }
            "--token" => {
                let value = value()?;
                let (token, id) = split(&flag, &value, '=', "<token>=<spiffe-id>")?;
                tokens.push((token.to_owned(), identity(&flag, id)?));
            }
            "--node-agent" => {
                let value = value()?;
                let shape = "<token>=<spiffe-id>@<node>";
                let (token, rest) = split(&flag, &value, '=', shape)?;
                let (id, node) = split(&flag, rest, '@', shape)?;
                node_agents.push((token.to_owned(), identity(&flag, id)?, node.to_owned()));
            }
            "--workload" => {
                let value = value()?;
                let (node, id) = split(&flag, &value, '=', "<node>=<spiffe-id>")?;
                workloads.push((node.to_owned(), identity(&flag, id)?));
            }
            "--trust-domain" => trust_domain = value()?,
            "--dns-name" => dns_names.push(value()?),
            "--ip" => ips.push(value()?.parse().map_err(|err| format!("--ip: {err}"))?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if tokens.is_empty() && node_agents.is_empty() {
        return Err(format!(
            "at least one --token or --node-agent is required\n{USAGE}"
        ));
    }
    Ok(Args {
        dir: dir.ok_or(format!("--dir is required\n{USAGE}"))?,
        listen: listen.ok_or(format!("--listen is required\n{USAGE}"))?,
        tokens,
        node_agents,
        workloads,
        trust_domain,
        dns_names,
        ips,
    })
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
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
    let node_agent_identities: Vec<Identity> = args
        .node_agents
        .iter()
        .map(|(_, identity, _)| identity.clone())
        .collect();
    for (token, identity, node) in args.node_agents {
        let caller = Authenticated {
            identity,
            node: Some(node),
            pod: None,
        };
        tokens = tokens.caller(&token, caller);
    }
    let mut serving = ServingNames::default();
    serving.dns_names.extend(args.dns_names);
    serving.ips.extend(args.ips);
    if !args.listen.ip().is_unspecified() {
        serving.ips.push(args.listen.ip());
    }
    let mut builder = CaServer::builder()
        .authority(authority.clone())
        .authenticator(tokens)
        .authenticator(ClientCertificate::new(authority.clone())?)
        .serving_names(serving);
    if !node_agent_identities.is_empty() {
        builder = node_agent_identities
            .into_iter()
            .fold(builder, CaServerBuilder::node_agent)
            .node_authorizer(node_authorizer);
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
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ca-server: {message}");
            ExitCode::FAILURE
        }
    }
}
