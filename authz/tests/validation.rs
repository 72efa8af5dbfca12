//! Validation: every policy Istio refuses is refused here, with the policy, the
//! path and a message a user can act on.

use authz::{LoadError, load_policies};

const HEADER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: ns\n";

/// Loads `HEADER + body` and returns the problems as `path: message` lines.
fn problems(body: &str) -> Vec<String> {
    match load_policies(&format!("{HEADER}{body}"), "default") {
        Ok(_) => Vec::new(),
        Err(LoadError::Invalid(problems)) => problems
            .iter()
            .map(|p| {
                assert_eq!(p.policy, "ns/p", "{p}");
                format!("{}: {}", p.path, p.message)
            })
            .collect(),
        Err(other) => vec![other.to_string()],
    }
}

/// Asserts exactly one problem, at `path`, whose message contains `needle`.
fn rejects(body: &str, path: &str, needle: &str) {
    let found = problems(body);
    assert_eq!(
        found.len(),
        1,
        "for\n{body}\nexpected one problem, got {found:#?}"
    );
    let (found_path, message) = found[0].split_once(": ").unwrap();
    assert_eq!(found_path, path, "for\n{body}\n{message}");
    assert!(
        message.contains(needle),
        "for\n{body}\n{message:?} lacks {needle:?}"
    );
}

#[test]
fn unknown_fields_are_refused_with_a_hint() {
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        namespace: [other]\n",
        "spec.rules[0].from[0].source.namespace",
        "unknown field `namespace`",
    );
    let found = problems("spec:\n  rules:\n  - from:\n    - source:\n        namespace: other\n");
    assert!(
        found[0].contains("Istio has `namespaces` (a list) and `principals`"),
        "{found:?}"
    );
    rejects(
        "spec:\n  rules:\n  - to:\n    - operation:\n        port: \"80\"\n",
        "spec.rules[0].to[0].operation.port",
        "Istio has `ports`",
    );
    rejects("spec:\n  rule: []\n", "spec.rule", "Istio has `rules`");
    rejects(
        "spec:\n  rules:\n  - source:\n      principals: [x]\n",
        "spec.rules[0].source",
        "`from: - source:`",
    );
    rejects("spec:\n  bogus: 1\n", "spec.bogus", "unknown field `bogus`");
    rejects(
        "spec:\n  selector:\n    labels: {app: x}\n",
        "spec.selector.labels",
        "Istio has `matchLabels`",
    );
}

#[test]
fn wrong_types_and_values_are_named() {
    rejects(
        "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [8080]\n",
        "spec.rules[0].to[0].operation.ports[0]",
        "quote numbers",
    );
    rejects(
        "spec:\n  action: PERMIT\n",
        "spec.action",
        "unknown variant `PERMIT`",
    );
    rejects(
        "spec:\n  rules:\n  - from: {source: {principals: [a]}}\n",
        "spec.rules[0].from",
        "invalid type: map",
    );
}

#[test]
fn empty_source_and_operation() {
    rejects(
        "spec:\n  rules:\n  - from:\n    - source: {}\n",
        "spec.rules[0].from[0].source",
        "must not be empty",
    );
    rejects(
        "spec:\n  rules:\n  - from:\n    - {}\n",
        "spec.rules[0].from[0].source",
        "must be set",
    );
    rejects(
        "spec:\n  rules:\n  - from: []\n",
        "spec.rules[0].from",
        "omit `from`",
    );
    rejects(
        "spec:\n  rules:\n  - to:\n    - operation: {}\n",
        "spec.rules[0].to[0].operation",
        "must not be empty",
    );
    rejects(
        "spec:\n  rules:\n  - to:\n    - {}\n",
        "spec.rules[0].to[0].operation",
        "must be set",
    );
    rejects(
        "spec:\n  rules:\n  - to: []\n",
        "spec.rules[0].to",
        "omit `to`",
    );
}

#[test]
fn bad_cidrs_and_ips() {
    for (value, needle) in [
        ("10.0.0.0/33", "bad CIDR range \"10.0.0.0/33\""),
        ("10.0.0/8", "bad CIDR range"),
        ("fd00::/129", "bad CIDR range"),
        ("10.0.0.256", "bad IP address \"10.0.0.256\""),
        ("example.com", "bad IP address"),
    ] {
        rejects(
            &format!(
                "spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{value}\"]\n"
            ),
            "spec.rules[0].from[0].source.ipBlocks[0]",
            needle,
        );
    }
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        notIpBlocks: [\"1.2.3.4\", \"x\"]\n",
        "spec.rules[0].from[0].source.notIpBlocks[1]",
        "bad IP address",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: destination.ip\n      values: [\"300.1.1.1\"]\n",
        "spec.rules[0].when[0].values[0]",
        "bad IP address",
    );
}

#[test]
fn ports_out_of_range_or_malformed() {
    for (value, needle) in [
        ("65536", "ports go up to 65535"),
        ("99999999999", "ports go up to 65535"),
        ("-1", "decimal number"),
        ("80-90", "decimal number"),
        ("http", "decimal number"),
        ("+80", "decimal number"),
    ] {
        rejects(
            &format!("spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"{value}\"]\n"),
            "spec.rules[0].to[0].operation.ports[0]",
            needle,
        );
    }
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: destination.port\n      notValues: [\"70000\"]\n",
        "spec.rules[0].when[0].notValues[0]",
        "65535",
    );
}

#[test]
fn service_accounts_rules() {
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [a]\n        principals: [b]\n",
        "spec.rules[0].from[0].source",
        "serviceAccounts cannot be combined with namespaces or principals",
    );
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        notServiceAccounts: [a]\n        namespaces: [b]\n",
        "spec.rules[0].from[0].source",
        "cannot be combined",
    );
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"a/b/c\"]\n",
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "expected 'serviceAccount' or 'namespace/serviceAccount'",
    );
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"ns/*\"]\n",
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "wildcards are not allowed",
    );
    let many: Vec<String> = (0..17).map(|i| format!("sa{i}")).collect();
    rejects(
        &format!(
            "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [{}]\n",
            many.join(", ")
        ),
        "spec.rules[0].from[0].source.serviceAccounts",
        "at most 16",
    );
}

#[test]
fn when_conditions() {
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: source.ip\n",
        "spec.rules[0].when[0]",
        "at least one of `values` or `notValues` must be set for key \"source.ip\"",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - values: [a]\n",
        "spec.rules[0].when[0].key",
        "must be set",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: source.name\n      values: [a]\n",
        "spec.rules[0].when[0].key",
        "unknown attribute \"source.name\"",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: request.headers\n      values: [a]\n",
        "spec.rules[0].when[0].key",
        "request.headers[<header-name>]",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: destination.namespace\n      values: [a]\n",
        "spec.rules[0].when[0].key",
        "metadata.namespace",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: destination.labels[app]\n      values: [a]\n",
        "spec.rules[0].when[0].key",
        "spec.selector.matchLabels",
    );
    rejects(
        "spec:\n  rules:\n  - when:\n    - key: source.namespace\n      values: [\"\"]\n",
        "spec.rules[0].when[0].values[0]",
        "empty value not allowed",
    );
    // Every accepted key loads.
    for key in [
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "destination.ip",
        "destination.port",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[groups]",
        "request.headers[x-token]",
        "connection.sni",
        "experimental.envoy.filters.a.b[c]",
    ] {
        let value = match key {
            "source.ip" | "remote.ip" | "destination.ip" => "10.0.0.1",
            "destination.port" => "80",
            _ => "v",
        };
        let body =
            format!("spec:\n  rules:\n  - when:\n    - key: {key}\n      values: [\"{value}\"]\n");
        assert_eq!(problems(&body), Vec::<String>::new(), "{key}");
    }
}

#[test]
fn actions_targets_and_annotations() {
    rejects(
        "spec:\n  action: DENY\n",
        "spec.rules",
        "a DENY policy without rules never applies",
    );
    rejects(
        "spec:\n  action: CUSTOM\n  provider: {name: ext}\n",
        "spec.rules",
        "a CUSTOM policy without rules",
    );
    rejects(
        "spec:\n  action: CUSTOM\n  rules: [{}]\n",
        "spec.provider.name",
        "needs a provider name",
    );
    rejects(
        "spec:\n  provider: {name: ext}\n  rules: [{}]\n",
        "spec.provider",
        "only CUSTOM policies have a provider, this one is ALLOW",
    );
    rejects(
        "spec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - from:\n    - source:\n        principals: [a]\n",
        "spec.rules[0].from[0].source.principals",
        "not supported with the CUSTOM action",
    );
    rejects(
        "spec:\n  selector: {matchLabels: {app: a}}\n  targetRef: {kind: Service, name: a}\n",
        "spec",
        "only one of selector, targetRef or targetRefs",
    );
    rejects(
        "spec:\n  targetRefs:\n  - {kind: Deployment, group: apps, name: a}\n",
        "spec.targetRefs[0]",
        "found group \"apps\" kind \"Deployment\"",
    );
    rejects(
        "spec:\n  targetRef: {kind: Service, name: a, namespace: other}\n",
        "spec.targetRef.namespace",
        "cross-namespace",
    );
    rejects(
        "spec:\n  selector: {matchLabels: {app: \"*\"}}\n",
        "spec.selector.matchLabels[app]",
        "wildcards are not supported",
    );
    rejects(
        "  annotations: {istio.io/dry-run: maybe}\nspec: {}\n",
        "metadata.annotations[istio.io/dry-run]",
        "\"maybe\" is not a boolean",
    );
    rejects(
        "  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: AUDIT\n  rules: [{}]\n",
        "metadata.annotations[istio.io/dry-run]",
        "only supported for ALLOW and DENY",
    );
    rejects(
        "spec:\n  rules:\n  - from:\n    - source:\n        principals: [\"\"]\n",
        "spec.rules[0].from[0].source.principals[0]",
        "empty value not allowed",
    );
}

#[test]
fn every_problem_is_listed_and_versions_are_checked() {
    let found = problems(
        "spec:\n  rules:\n  - from:\n    - source: {}\n    to:\n    - operation:\n        ports: [\"x\"]\n",
    );
    assert_eq!(found.len(), 2, "{found:#?}");
    let yaml = "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: old}\nspec: {}\n";
    let err = load_policies(yaml, "default").unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported version \"security.istio.io/v1alpha1\""),
        "{err}"
    );
    let err = load_policies("a: [1, 2\nb: c", "default").unwrap_err();
    assert!(matches!(err, LoadError::Yaml(_)), "{err}");
    let err = load_policies(
        &format!("{HEADER}spec:\n  rules: [{{}}]\n  rules: []\n"),
        "x",
    )
    .unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
}

#[test]
fn valid_policies_load() {
    for body in [
        "spec: {}\n",
        "spec:\n  rules: [{}]\n",
        "spec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n",
        "spec:\n  action: AUDIT\n",
        "spec:\n  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\n",
        "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"0\", \"080\", \"65535\"]\n",
        "spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.1\", \"fd00::/8\", \"::ffff:10.0.0.1\"]\n",
        "  annotations: {istio.io/dry-run: \"T\", other: x}\n  labels: {a: b}\n  uid: 123\nspec: {}\nstatus: {anything: here}\n",
    ] {
        assert_eq!(problems(body), Vec::<String>::new(), "{body}");
    }
}
