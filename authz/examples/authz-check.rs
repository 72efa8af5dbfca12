//! `authz-check`: decide connections against AuthorizationPolicy YAML.
//!
//! ```sh
//! cargo run -p podless-authz --example authz-check -- \
//!     --policies <file-or-dir> --requests <file.jsonl> [--root-namespace istio-system]
//! ```
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
use mesh_api::Identity;
use serde::Deserialize;

struct Args {
    policies: PathBuf,
    requests: PathBuf,
    root_namespace: String,
}

fn parse_args() -> Result<Args, String> {
    const USAGE: &str = "usage: authz-check --policies <file-or-dir> --requests <file.jsonl> [--root-namespace <ns>]";
    let mut policies = None;
    let mut requests = None;
    let mut root_namespace = authz::DEFAULT_ROOT_NAMESPACE.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--policies" => policies = Some(PathBuf::from(value()?)),
            "--requests" => requests = Some(PathBuf::from(value()?)),
            "--root-namespace" => root_namespace = value()?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        policies: policies.ok_or(format!("--policies is required\n{USAGE}"))?,
        requests: requests.ok_or(format!("--requests is required\n{USAGE}"))?,
        root_namespace,
    })
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
    let args = parse_args()?;
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
