//! The `authz-check` example, run as a user runs it: a policy directory and a
//! JSONL request file in, one JSON decision per line out.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The JSON lines of a successful run.
fn decision_lines(output: &Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The `authz-check` example, built by cargo with the tests.
fn authz_check() -> PathBuf {
    test_support::example("podless-authz", "authz-check")
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "authz-check-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&Path], extra: &[&str]) -> Output {
    let mut command = Command::new(authz_check());
    command
        .arg("--policies")
        .arg(args[0])
        .arg("--requests")
        .arg(args[1])
        .args(extra);
    command.output().unwrap()
}

const ALLOW_SHELL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shell, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/shell"]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
"#;

const DENY_PLAINTEXT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plaintext, namespace: mesh-root}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["*"]}
"#;

fn request(principal: Option<&str>, app: &str) -> String {
    serde_json::json!({
        "source_principal": principal,
        "source_ip": "10.0.0.1",
        "destination_ip": "10.0.0.2",
        "destination_port": 8080,
        "destination_namespace": "default",
        "destination_labels": {"app": app},
    })
    .to_string()
}

#[test]
fn decides_each_request_line() {
    let scratch = Scratch::new("ok");
    let policies = scratch.0.join("policies");
    scratch.write("policies/10-allow.yaml", ALLOW_SHELL);
    scratch.write("policies/20-deny.yml", DENY_PLAINTEXT);
    scratch.write("policies/README.txt", "not yaml: ignored");
    let requests = scratch.write(
        "requests.jsonl",
        &[
            request(Some("cluster.local/ns/default/sa/shell"), "echo"),
            request(Some("cluster.local/ns/other/sa/shell"), "echo"),
            String::new(),
            request(None, "echo"),
            request(Some("spiffe://cluster.local/ns/other/sa/shell"), "db"),
        ]
        .join("\n"),
    );
    let output = run(&[&policies, &requests], &["--root-namespace", "mesh-root"]);
    let lines = decision_lines(&output);
    let summary: Vec<(&str, Option<&str>)> = lines
        .iter()
        .map(|l| (l["decision"].as_str().unwrap(), l["policy"].as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("allow", Some("default/allow-shell")),
            ("deny", None),
            ("deny", Some("mesh-root/deny-plaintext")),
            ("allow", None),
        ]
    );
    assert_eq!(
        lines[1]["reason"],
        "ALLOW policies apply to the destination and none matched"
    );
    assert_eq!(
        lines[2]["reason"],
        "denied by DENY policy mesh-root/deny-plaintext"
    );
    assert_eq!(
        lines.iter().map(|l| l.as_object().unwrap().len()).max(),
        Some(3)
    );
}

#[test]
fn invalid_policies_exit_non_zero_with_every_error() {
    let scratch = Scratch::new("invalid");
    let policies = scratch.write(
        "bad.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\nspec:\n  rules:\n  \
         - from:\n    - source: {namespace: other}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: bad-port}\nspec:\n  rules:\n  - to:\n    - operation: {ports: [\"99999\"]}\n",
    );
    let requests = scratch.write("requests.jsonl", &request(None, "echo"));
    let output = run(&[&policies, &requests], &[]);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(
            "policy default/bad: spec.rules[0].from[0].source.namespace: unknown field `namespace`"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("Istio has `namespaces`"), "{stderr}");
    assert!(
        stderr.contains("policy default/bad-port: spec.rules[0].to[0].operation.ports[0]"),
        "{stderr}"
    );
}

#[test]
fn unreadable_request_lines_are_denied_and_reported() {
    let scratch = Scratch::new("requests");
    let policies = scratch.write("p.yaml", ALLOW_SHELL);
    let requests = scratch.write(
        "requests.jsonl",
        &format!(
            "{{\"source_ip\": \"nope\"}}\n{}\n",
            request(Some("not a principal"), "echo")
        ),
    );
    let output = run(&[&policies, &requests], &[]);
    assert!(!output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2);
    assert!(
        stdout.lines().all(|l| l.contains("\"decision\":\"deny\"")),
        "{stdout}"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("requests.jsonl:1: invalid request"),
        "{stderr}"
    );
    assert!(
        stderr.contains("requests.jsonl:2: invalid request: invalid SPIFFE identity"),
        "{stderr}"
    );
}

/// The sample shipped next to the example, which `--help` and the README
/// tell users to run it on.
fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/authz-check-sample")
}

#[test]
fn decides_the_shipped_sample() {
    let sample = sample();
    let output = run(
        &[&sample.join("policies"), &sample.join("requests.jsonl")],
        &[],
    );
    let lines = decision_lines(&output);
    let summary: Vec<(&str, Option<&str>)> = lines
        .iter()
        .map(|l| (l["decision"].as_str().unwrap(), l["policy"].as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("allow", Some("shop/checkout-from-frontend")),
            ("deny", None),
            ("deny", None),
            ("deny", Some("istio-system/deny-plaintext")),
            ("allow", None),
        ]
    );
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons[1].starts_with("ALLOW policies apply to the destination and none matched"),
        "{reasons:?}"
    );
    assert!(
        reasons[4].starts_with("no ALLOW policy applies to the destination"),
        "{reasons:?}"
    );
    // The dry-run policy reports on every connection into `shop`, and would
    // deny those from the `batch` namespace only.
    let would_deny: Vec<bool> = reasons
        .iter()
        .map(|r| r.contains("dry-run policy shop/no-batch-jobs would deny"))
        .collect();
    assert_eq!(would_deny, [false, false, true, false, true], "{reasons:?}");
}

#[test]
fn help_describes_every_flag_and_the_sample() {
    let help = test_support::help(&authz_check());
    for flag in ["--policies", "--requests", "--root-namespace", "--help"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    assert!(help.contains("[default: istio-system]"), "{help}");
    assert!(
        help.contains("--policies authz/examples/authz-check-sample/policies"),
        "{help}"
    );
    assert!(
        help.contains("--requests authz/examples/authz-check-sample/requests.jsonl"),
        "{help}"
    );
}

#[test]
fn bad_arguments_name_the_flag() {
    for (args, expected) in [
        (&["--policies", "p.yaml"][..], "--requests"),
        (&["--policies", "p.yaml", "--requests"][..], "--requests"),
        (
            &["--policies", "p", "--requests", "r", "--root-namespce", "x"][..],
            "--root-namespce",
        ),
    ] {
        let output = Command::new(authz_check()).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
