//! `authz-check`: decide connections against AuthorizationPolicy YAML.
//!
//! ```sh
//! cargo run -p podless-authz --example authz-check -- \
//!     --policies <file-or-dir> --requests <file.jsonl> [--root-namespace istio-system]
//! ```
//!
//! On the shipped sample, from the repository root:
//!
//! ```sh
//! cargo run -p podless-authz --example authz-check -- \
//!     --policies authz/examples/authz-check-sample/policies \
//!     --requests authz/examples/authz-check-sample/requests.jsonl
//! ```
//!
//! `--help` describes every flag and the formats; the flags are parsed with
//! clap, so a missing or malformed one is named on stderr with exit status 2.
//!
//! Loads every policy in the file (or in each `.yaml`/`.yml` file of the
//! directory), validates and converts them as the control plane would, and prints
//! one JSON line per request line:
//! `{"decision":"allow"|"deny","policy":"<ns>/<name>"|null,"reason":"..."}`.
//!
//! Request lines look like `{"source_principal": "cluster.local/ns/a/sa/b" | null,
//! "source_ip": "10.0.0.1", "destination_ip": "10.0.0.2", "destination_port": 8080,
//! "destination_namespace": "default", "destination_labels": {"app": "echo"}}`.
//!
//! Invalid policies: every validation error on stderr and exit status 1. An
//! unreadable request line is answered with a deny (its reason says why) and makes
//! the exit status 1.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use authz::{Connection, Decision, Engine, Labels, Reason, Verdict, load_policies};
use clap::Parser;
use mesh_api::Identity;
use serde::Deserialize;

/// Decide connections against Istio AuthorizationPolicy YAML, as the mesh would.
///
/// Loads every AuthorizationPolicy in --policies, validates and converts them
/// as the podless control plane does, then decides each connection described
/// in --requests and prints one JSON line per request line:
///
///     {"decision":"allow"|"deny","policy":"<ns>/<name>"|null,"reason":"..."}
///
/// A request line is one JSON object (blank lines are skipped):
///
///     {"source_principal": "cluster.local/ns/shop/sa/frontend",
///      "source_ip": "10.42.0.5", "destination_ip": "10.42.0.9",
///      "destination_port": 8080, "destination_namespace": "shop",
///      "destination_labels": {"app": "checkout"}}
///
/// source_principal is an Istio principal (<trust-domain>/ns/<ns>/sa/<sa>),
/// a SPIFFE URI (spiffe://...), or null for a plaintext (unauthenticated)
/// peer; destination_labels may be left out.
///
/// Exit status: 0 when every request was decided; 1 when a policy is
/// invalid (every validation error is printed on stderr, no decisions) or a
/// request line cannot be read (it is answered with a deny whose reason
/// says why, and reported on stderr); 2 on bad command-line arguments.
#[derive(Parser)]
#[command(
    name = "authz-check",
    verbatim_doc_comment,
    after_help = concat!(
        "Try it on the shipped sample, from the repository root:\n",
        "\n",
        "  cargo run -p podless-authz --example authz-check -- \\\n",
        "      --policies authz/examples/authz-check-sample/policies \\\n",
        "      --requests authz/examples/authz-check-sample/requests.jsonl",
    )
)]
struct Args {
    /// AuthorizationPolicy YAML: one file, or a directory.
    ///
    /// A file may hold several documents separated by ---; documents of
    /// other kinds are skipped. A directory is read one level deep: each of
    /// its .yaml and .yml files, in name order (other files are ignored).
    /// A policy without metadata.namespace is in the namespace default.
    #[arg(long, value_name = "FILE-OR-DIR", verbatim_doc_comment)]
    policies: PathBuf,

    /// The connections to decide: a JSON Lines file, one request per line.
    ///
    /// Each line is an object with source_principal (a principal, a SPIFFE
    /// URI, or null for plaintext), source_ip, destination_ip,
    /// destination_port, destination_namespace and, optionally,
    /// destination_labels (an object of label names to values).
    #[arg(long, value_name = "FILE.jsonl", verbatim_doc_comment)]
    requests: PathBuf,

    /// The mesh's root namespace (Istio's meshConfig.rootNamespace).
    ///
    /// A policy there without a selector applies to the whole mesh; one
    /// with a selector, to the matching workloads of every namespace.
    #[arg(
        long,
        value_name = "NAMESPACE",
        default_value = authz::DEFAULT_ROOT_NAMESPACE,
        verbatim_doc_comment
    )]
    root_namespace: String,
}

/// The YAML files to read: the file itself, or a directory's `.yaml`/`.yml`
/// files in name order.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    Ok(files)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    source_principal: Option<String>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    destination_namespace: String,
    #[serde(default)]
    destination_labels: Labels,
}

fn reason(decision: &Decision) -> String {
    let policy = decision.policy.as_deref().unwrap_or_default();
    let mut reason = match decision.reason {
        Reason::DenyPolicyMatched => format!("denied by DENY policy {policy}"),
        Reason::AllowPolicyMatched => format!("allowed by ALLOW policy {policy}"),
        other => other.to_string(),
    };
    for dry_run in &decision.dry_run {
        let would = match (dry_run.matched, dry_run.action) {
            (true, mesh_api::security::Action::Deny) => "would deny",
            (true, mesh_api::security::Action::Allow) => "would allow",
            (false, _) => "did not match",
        };
        reason.push_str(&format!("; dry-run policy {} {would}", dry_run.policy));
    }
    reason
}

fn answer(engine: &Engine, line: &str) -> Result<serde_json::Value, String> {
    let request: RequestLine = serde_json::from_str(line).map_err(|err| err.to_string())?;
    let identity = request
        .source_principal
        .as_deref()
        .map(|p| {
            if p.starts_with(mesh_api::identity::SPIFFE_SCHEME) {
                Identity::parse_uri(p)
            } else {
                Identity::from_principal(p)
            }
        })
        .transpose()
        .map_err(|err| err.to_string())?;
    let decision = engine.evaluate(&Connection {
        source: identity.as_ref(),
        source_ip: request.source_ip,
        destination_ip: request.destination_ip,
        destination_port: request.destination_port,
        destination_namespace: &request.destination_namespace,
        destination_labels: Some(&request.destination_labels),
        destination_policies: &[],
    });
    Ok(serde_json::json!({
        "decision": if decision.verdict == Verdict::Allow { "allow" } else { "deny" },
        "policy": decision.policy.as_deref(),
        "reason": reason(&decision),
    }))
}

fn run() -> Result<bool, String> {
    let args = Args::parse();
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for file in policy_files(&args.policies)? {
        let text =
            std::fs::read_to_string(&file).map_err(|err| format!("{}: {err}", file.display()))?;
        match load_policies(&text, authz::DEFAULT_NAMESPACE) {
            Ok(loaded) => policies.extend(loaded),
            Err(err) => problems.push(format!("{}:\n{err}", file.display())),
        }
    }
    if !problems.is_empty() {
        return Err(format!("invalid policies\n{}", problems.join("\n")));
    }
    let built = Engine::builder()
        .root_namespace(&args.root_namespace)
        .policies(policies)
        .build()
        .map_err(|err| err.to_string())?;
    for (policy, warning) in &built.warnings {
        eprintln!("warning: policy {policy}: {warning}");
    }

    let requests = std::fs::File::open(&args.requests)
        .map_err(|err| format!("{}: {err}", args.requests.display()))?;
    let mut out = std::io::stdout().lock();
    let mut all_read = true;
    for (index, line) in BufReader::new(requests).lines().enumerate() {
        let line = line.map_err(|err| format!("{}: {err}", args.requests.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = answer(&built.engine, &line).unwrap_or_else(|problem| {
            all_read = false;
            eprintln!(
                "{}:{}: invalid request: {problem}",
                args.requests.display(),
                index + 1
            );
            serde_json::json!({
                "decision": "deny",
                "policy": null,
                "reason": format!("invalid request: {problem}"),
            })
        });
        writeln!(out, "{answer}").map_err(|err| err.to_string())?;
    }
    Ok(all_read)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("authz-check: {message}");
            ExitCode::FAILURE
        }
    }
}
