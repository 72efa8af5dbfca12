//! Conformance: YAML policies, connections, and the decision Istio ambient gives.
//!
//! Each case loads policies through the whole pipeline (YAML → validation →
//! conversion to the wire form → engine) and checks every request twice: once
//! with the destination's labels (the engine's selector index) and once with the
//! policy names a control plane would attach to the destination workload
//! (`authorization_policies`), as a data plane receives them.

use authz::{Connection, Decision, Engine, Labels, Reason, Verdict, load_policies};
use mesh_api::Identity;

const SHELL: &str = "spiffe://cluster.local/ns/default/sa/shell";
const OTHER_SHELL: &str = "spiffe://cluster.local/ns/other/sa/shell";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";
const FOREIGN: &str = "spiffe://example.org/ns/default/sa/shell";

/// One connection to the destination workload.
#[derive(Clone)]
struct Request {
    source: Option<&'static str>,
    source_ip: &'static str,
    destination_ip: &'static str,
    port: u16,
    namespace: &'static str,
    labels: Vec<(&'static str, &'static str)>,
}

fn from(source: &'static str) -> Request {
    Request {
        source: Some(source),
        source_ip: "10.0.0.1",
        destination_ip: "10.1.0.1",
        port: 8080,
        namespace: "default",
        labels: vec![("app", "echo")],
    }
}

fn plaintext() -> Request {
    Request {
        source: None,
        ..from(SHELL)
    }
}

impl Request {
    fn ip(mut self, ip: &'static str) -> Self {
        self.source_ip = ip;
        self
    }
    fn dest_ip(mut self, ip: &'static str) -> Self {
        self.destination_ip = ip;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn in_ns(mut self, namespace: &'static str) -> Self {
        self.namespace = namespace;
        self
    }
    fn labels(mut self, labels: &[(&'static str, &'static str)]) -> Self {
        self.labels = labels.to_vec();
        self
    }
}

/// The decision a request must get.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Allowed because no ALLOW policy applies.
    Open,
    /// Allowed by this ALLOW policy.
    AllowedBy(&'static str),
    /// Denied by this DENY policy.
    DeniedBy(&'static str),
    /// Denied because ALLOW policies apply and none matched.
    NotAllowed,
}

use Expect::{AllowedBy, DeniedBy, NotAllowed, Open};

const HEADER: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

/// Wraps spec bodies into AuthorizationPolicy documents: each entry is
/// `(namespace/name, yaml for the rest of the resource below metadata)`.
fn policies(entries: &[(&str, &str)]) -> String {
    entries
        .iter()
        .map(|(key, body)| {
            let (namespace, name) = key.split_once('/').unwrap();
            format!("{HEADER}metadata:\n  name: {name}\n  namespace: {namespace}\n{body}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn check(case: &str, yaml: &str, requests: &[(Request, Expect)]) {
    let loaded = load_policies(yaml, "default")
        .unwrap_or_else(|err| panic!("case {case}: policies do not load:\n{err}"));
    let built = Engine::builder()
        .root_namespace("istio-system")
        .policies(loaded.clone())
        .build()
        .unwrap_or_else(|err| panic!("case {case}: {err}"));
    // What a control plane attaches to the destination: WORKLOAD_SELECTOR policies
    // whose selector selects it.
    let conversions: Vec<_> = loaded
        .iter()
        .map(|policy| authz::convert(policy, "istio-system", "default"))
        .collect();

    for (index, (request, expect)) in requests.iter().enumerate() {
        let identity: Option<Identity> = request.source.map(|s| s.parse().unwrap());
        let labels: Labels = request
            .labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let attached: Vec<String> = conversions
            .iter()
            .filter(|c| {
                c.selector
                    .as_ref()
                    .is_some_and(|s| s.selects(request.namespace, &labels))
            })
            .filter_map(|c| c.authorization.as_ref())
            .map(|a| format!("{}/{}", a.namespace, a.name))
            .collect();
        let connection = |labels: Option<&Labels>, attached: &[String]| {
            let connection = Connection {
                source: identity.as_ref(),
                source_ip: request.source_ip.parse().unwrap(),
                destination_ip: request.destination_ip.parse().unwrap(),
                destination_port: request.port,
                destination_namespace: request.namespace,
                destination_labels: labels,
                destination_policies: attached,
            };
            built.engine.evaluate(&connection)
        };
        let by_labels = connection(Some(&labels), &[]);
        let by_names = connection(None, &attached);
        for (path, decision) in [("labels", &by_labels), ("attached names", &by_names)] {
            assert_decision(
                decision,
                *expect,
                &format!("case {case}, request {index} ({path})"),
            );
        }
    }
}

fn assert_decision(decision: &Decision, expect: Expect, context: &str) {
    let policy = decision.policy.as_deref();
    let ok = match expect {
        Open => decision.verdict == Verdict::Allow && decision.reason == Reason::NoAllowPolicy,
        AllowedBy(name) => decision.verdict == Verdict::Allow && policy == Some(name),
        DeniedBy(name) => decision.verdict == Verdict::Deny && policy == Some(name),
        NotAllowed => {
            decision.verdict == Verdict::Deny && decision.reason == Reason::NoAllowPolicyMatched
        }
    };
    assert!(ok, "{context}: expected {expect:?}, got {decision:?}");
}

const SELECT_ECHO: &str = "  selector:\n    matchLabels:\n      app: echo\n";

fn allow_echo(rules: &str) -> String {
    policies(&[(
        "default/p",
        &format!("spec:\n{SELECT_ECHO}  action: ALLOW\n  rules:\n{rules}"),
    )])
}

fn deny_echo(rules: &str) -> String {
    policies(&[(
        "default/d",
        &format!("spec:\n{SELECT_ECHO}  action: DENY\n  rules:\n{rules}"),
    )])
}

#[test]
fn no_policy_allows_everything() {
    check("none", "", &[(from(SHELL), Open), (plaintext(), Open)]);
}

#[test]
fn empty_spec_allows_nothing_and_empty_rule_allows_everything() {
    let yaml = policies(&[("default/nothing", "spec: {}")]);
    check(
        "spec: {}",
        &yaml,
        &[
            (from(SHELL), NotAllowed),
            (plaintext(), NotAllowed),
            (from(SHELL).in_ns("other"), Open),
        ],
    );
    let yaml = policies(&[("default/everything", "spec:\n  rules:\n  - {}")]);
    check(
        "rules: [{}]",
        &yaml,
        &[
            (from(SHELL), AllowedBy("default/everything")),
            (plaintext(), AllowedBy("default/everything")),
        ],
    );
    let yaml = policies(&[("default/empty-list", "spec:\n  rules: []")]);
    check("rules: []", &yaml, &[(from(SHELL), NotAllowed)]);
}

#[test]
fn principals_and_not_principals() {
    let yaml = allow_echo(&format!(
        "  - from:\n    - source:\n        principals: [\"{}\"]\n",
        &SHELL[9..]
    ));
    check(
        "principals exact",
        &yaml,
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
            (from(FOREIGN), NotAllowed),
            (plaintext(), NotAllowed),
        ],
    );
    let yaml = allow_echo(&format!(
        "  - from:\n    - source:\n        notPrincipals: [\"{}\"]\n",
        &OTHER_SHELL[9..]
    ));
    check(
        "notPrincipals",
        &yaml,
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
            (plaintext(), AllowedBy("default/p")),
        ],
    );
    // The spiffe:// form never matches: principals are compared without the scheme.
    let yaml = allow_echo(&format!(
        "  - from:\n    - source:\n        principals: [\"{SHELL}\"]\n"
    ));
    check(
        "principals with scheme",
        &yaml,
        &[(from(SHELL), NotAllowed)],
    );
}

#[test]
fn string_matches_exact_prefix_suffix_presence() {
    let principals = |value: &str| {
        allow_echo(&format!(
            "  - from:\n    - source:\n        principals: [\"{value}\"]\n"
        ))
    };
    check(
        "prefix",
        &principals("cluster.local/ns/default/*"),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(ADMIN), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
        ],
    );
    check(
        "suffix",
        &principals("*/sa/shell"),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), AllowedBy("default/p")),
            (from(ADMIN), NotAllowed),
        ],
    );
    check(
        "presence",
        &principals("*"),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(FOREIGN), AllowedBy("default/p")),
            (plaintext(), NotAllowed),
        ],
    );
    check(
        "middle star is literal",
        &principals("cluster.local/ns/*/sa/shell"),
        &[(from(SHELL), NotAllowed)],
    );
    let yaml = allow_echo("  - from:\n    - source:\n        notPrincipals: [\"*\"]\n");
    check(
        "notPrincipals presence",
        &yaml,
        &[
            (from(SHELL), NotAllowed),
            (plaintext(), AllowedBy("default/p")),
        ],
    );
    // Case matters.
    check(
        "case sensitive",
        &principals("cluster.local/ns/DEFAULT/sa/shell"),
        &[(from(SHELL), NotAllowed)],
    );
}

#[test]
fn namespaces_and_not_namespaces() {
    let source = |field: &str, value: &str| {
        allow_echo(&format!(
            "  - from:\n    - source:\n        {field}: [\"{value}\"]\n"
        ))
    };
    check(
        "namespaces exact",
        &source("namespaces", "default"),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
            (plaintext(), NotAllowed),
        ],
    );
    check(
        "namespaces prefix",
        &source("namespaces", "oth*"),
        &[
            (from(OTHER_SHELL), AllowedBy("default/p")),
            (from(SHELL), NotAllowed),
        ],
    );
    check(
        "namespaces suffix",
        &source("namespaces", "*ault"),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
        ],
    );
    check(
        "namespaces presence",
        &source("namespaces", "*"),
        &[
            (from(OTHER_SHELL), AllowedBy("default/p")),
            (plaintext(), NotAllowed),
        ],
    );
    check(
        "notNamespaces",
        &source("notNamespaces", "other"),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
            (plaintext(), AllowedBy("default/p")),
        ],
    );
}

#[test]
fn ip_blocks_v4_and_v6() {
    let source = |field: &str, values: &str| {
        allow_echo(&format!(
            "  - from:\n    - source:\n        {field}: [{values}]\n"
        ))
    };
    check(
        "ipBlocks v4",
        &source("ipBlocks", "\"10.0.0.0/24\", \"192.168.1.7\""),
        &[
            (from(SHELL).ip("10.0.0.200"), AllowedBy("default/p")),
            (from(SHELL).ip("192.168.1.7"), AllowedBy("default/p")),
            (from(SHELL).ip("192.168.1.8"), NotAllowed),
            (from(SHELL).ip("10.0.1.1"), NotAllowed),
            // An IPv4-mapped IPv6 peer is its IPv4 address.
            (from(SHELL).ip("::ffff:10.0.0.9"), AllowedBy("default/p")),
            (plaintext().ip("10.0.0.9"), AllowedBy("default/p")),
        ],
    );
    check(
        "ipBlocks v6",
        &source("ipBlocks", "\"fd00:1::/32\""),
        &[
            (from(SHELL).ip("fd00:1::5"), AllowedBy("default/p")),
            (from(SHELL).ip("fd00:2::5"), NotAllowed),
            (from(SHELL).ip("10.0.0.1"), NotAllowed),
        ],
    );
    check(
        "notIpBlocks",
        &source("notIpBlocks", "\"10.0.0.0/8\", \"fd00::/8\""),
        &[
            (from(SHELL).ip("10.9.9.9"), NotAllowed),
            (from(SHELL).ip("fd12::1"), NotAllowed),
            (from(SHELL).ip("192.168.0.1"), AllowedBy("default/p")),
        ],
    );
    // Host bits in a CIDR are ignored when matching.
    check(
        "unmasked cidr",
        &source("ipBlocks", "\"10.0.0.77/24\""),
        &[(from(SHELL).ip("10.0.0.1"), AllowedBy("default/p"))],
    );
}

#[test]
fn service_accounts_and_not_service_accounts() {
    let source = |field: &str, values: &str| {
        allow_echo(&format!(
            "  - from:\n    - source:\n        {field}: [{values}]\n"
        ))
    };
    check(
        "serviceAccounts in the policy namespace",
        &source("serviceAccounts", "\"shell\""),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(OTHER_SHELL), NotAllowed),
            (plaintext(), NotAllowed),
        ],
    );
    check(
        "serviceAccounts ns/sa",
        &source("serviceAccounts", "\"other/shell\""),
        &[
            (from(OTHER_SHELL), AllowedBy("default/p")),
            (from(SHELL), NotAllowed),
        ],
    );
    // The trust domain is not part of a service account match.
    check(
        "serviceAccounts ignore trust domain",
        &source("serviceAccounts", "\"shell\""),
        &[(from(FOREIGN), AllowedBy("default/p"))],
    );
    check(
        "notServiceAccounts",
        &source("notServiceAccounts", "\"default/admin\""),
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(ADMIN), NotAllowed),
            (plaintext(), AllowedBy("default/p")),
        ],
    );
}

#[test]
fn ports_and_not_ports() {
    let operation = |field: &str, values: &str| {
        allow_echo(&format!(
            "  - to:\n    - operation:\n        {field}: [{values}]\n"
        ))
    };
    check(
        "ports",
        &operation("ports", "\"8080\", \"9090\""),
        &[
            (from(SHELL).port(8080), AllowedBy("default/p")),
            (from(SHELL).port(9090), AllowedBy("default/p")),
            (from(SHELL).port(80), NotAllowed),
            (plaintext().port(8080), AllowedBy("default/p")),
        ],
    );
    check(
        "notPorts",
        &operation("notPorts", "\"22\""),
        &[
            (from(SHELL).port(22), NotAllowed),
            (from(SHELL).port(8080), AllowedBy("default/p")),
        ],
    );
}

#[test]
fn each_l4_when_key() {
    let when = |key: &str, field: &str, values: &str| {
        allow_echo(&format!(
            "  - when:\n    - key: {key}\n      {field}: [{values}]\n"
        ))
    };
    check(
        "source.ip",
        &when("source.ip", "values", "\"10.0.0.0/24\""),
        &[
            (from(SHELL).ip("10.0.0.3"), AllowedBy("default/p")),
            (from(SHELL).ip("10.0.1.3"), NotAllowed),
        ],
    );
    check(
        "source.ip notValues",
        &when("source.ip", "notValues", "\"10.0.0.3\""),
        &[
            (from(SHELL).ip("10.0.0.3"), NotAllowed),
            (from(SHELL).ip("10.0.0.4"), AllowedBy("default/p")),
        ],
    );
    check(
        "source.namespace",
        &when("source.namespace", "values", "\"other\""),
        &[
            (from(OTHER_SHELL), AllowedBy("default/p")),
            (from(SHELL), NotAllowed),
        ],
    );
    check(
        "source.namespace notValues",
        &when("source.namespace", "notValues", "\"other\""),
        &[
            (from(OTHER_SHELL), NotAllowed),
            (plaintext(), AllowedBy("default/p")),
        ],
    );
    check(
        "source.principal",
        &when("source.principal", "values", "\"*/sa/admin\""),
        &[
            (from(ADMIN), AllowedBy("default/p")),
            (from(SHELL), NotAllowed),
            (plaintext(), NotAllowed),
        ],
    );
    check(
        "source.principal notValues",
        &when("source.principal", "notValues", "\"*/sa/admin\""),
        &[
            (from(ADMIN), NotAllowed),
            (from(SHELL), AllowedBy("default/p")),
        ],
    );
    check(
        "destination.ip",
        &when("destination.ip", "values", "\"10.1.0.0/16\", \"fd01::/16\""),
        &[
            (from(SHELL).dest_ip("10.1.2.3"), AllowedBy("default/p")),
            (from(SHELL).dest_ip("fd01::9"), AllowedBy("default/p")),
            (from(SHELL).dest_ip("10.2.2.3"), NotAllowed),
        ],
    );
    check(
        "destination.ip notValues",
        &when("destination.ip", "notValues", "\"10.1.0.1\""),
        &[
            (from(SHELL).dest_ip("10.1.0.1"), NotAllowed),
            (from(SHELL).dest_ip("10.1.0.2"), AllowedBy("default/p")),
        ],
    );
    check(
        "destination.port",
        &when("destination.port", "values", "\"8080\""),
        &[
            (from(SHELL).port(8080), AllowedBy("default/p")),
            (from(SHELL).port(8081), NotAllowed),
        ],
    );
    check(
        "destination.port notValues",
        &when("destination.port", "notValues", "\"8080\""),
        &[
            (from(SHELL).port(8080), NotAllowed),
            (from(SHELL).port(8081), AllowedBy("default/p")),
        ],
    );
}

#[test]
fn rule_structure_ands_and_ors() {
    let yaml = allow_echo(&format!(
        "  - from:\n    - source:\n        principals: [\"{}\"]\n    - source:\n        namespaces: [\"other\"]\n    \
         to:\n    - operation:\n        ports: [\"8080\"]\n    when:\n    - key: source.ip\n      values: [\"10.0.0.0/8\"]\n",
        &ADMIN[9..]
    ));
    check(
        "from OR, to AND, when AND",
        &yaml,
        &[
            (from(ADMIN), AllowedBy("default/p")),
            (from(OTHER_SHELL), AllowedBy("default/p")),
            (from(SHELL), NotAllowed),
            (from(ADMIN).port(9090), NotAllowed),
            (from(ADMIN).ip("192.168.0.1"), NotAllowed),
        ],
    );
    // Fields inside one source AND.
    let yaml = allow_echo(
        "  - from:\n    - source:\n        namespaces: [\"default\"]\n        ipBlocks: [\"10.0.0.0/24\"]\n",
    );
    check(
        "source fields AND",
        &yaml,
        &[
            (from(SHELL), AllowedBy("default/p")),
            (from(SHELL).ip("10.9.0.1"), NotAllowed),
            (from(OTHER_SHELL), NotAllowed),
        ],
    );
    // Rules OR.
    let yaml = allow_echo(
        "  - to:\n    - operation:\n        ports: [\"80\"]\n  - from:\n    - source:\n        namespaces: [\"other\"]\n",
    );
    check(
        "rules OR",
        &yaml,
        &[
            (from(SHELL).port(80), AllowedBy("default/p")),
            (from(OTHER_SHELL).port(9), AllowedBy("default/p")),
            (from(SHELL).port(9), NotAllowed),
        ],
    );
}

#[test]
fn deny_beats_allow() {
    let yaml = policies(&[
        ("default/allow-all", "spec:\n  rules:\n  - {}"),
        (
            "default/deny-other",
            "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"other\"]",
        ),
    ]);
    check(
        "allow and deny",
        &yaml,
        &[
            (from(SHELL), AllowedBy("default/allow-all")),
            (from(OTHER_SHELL), DeniedBy("default/deny-other")),
            (plaintext(), AllowedBy("default/allow-all")),
            // Neither policy is in namespace `other`.
            (from(OTHER_SHELL).in_ns("other"), Open),
        ],
    );
    let yaml = policies(&[(
        "default/deny-all",
        "spec:\n  action: DENY\n  rules:\n  - {}",
    )]);
    check(
        "deny everything",
        &yaml,
        &[
            (from(SHELL), DeniedBy("default/deny-all")),
            (plaintext(), DeniedBy("default/deny-all")),
        ],
    );
}

#[test]
fn root_namespace_policies_apply_across_namespaces() {
    let yaml = policies(&[(
        "istio-system/mesh-deny-plaintext",
        "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]",
    )]);
    check(
        "global",
        &yaml,
        &[
            (plaintext(), DeniedBy("istio-system/mesh-deny-plaintext")),
            (
                plaintext().in_ns("other"),
                DeniedBy("istio-system/mesh-deny-plaintext"),
            ),
            (from(SHELL), Open),
        ],
    );
    let yaml = policies(&[(
        "istio-system/echo-everywhere",
        &format!(
            "spec:\n{SELECT_ECHO}  rules:\n  - from:\n    - source:\n        namespaces: [\"default\"]"
        ),
    )]);
    check(
        "root selector",
        &yaml,
        &[
            (
                from(SHELL).in_ns("other"),
                AllowedBy("istio-system/echo-everywhere"),
            ),
            (from(OTHER_SHELL).in_ns("other"), NotAllowed),
            (
                from(OTHER_SHELL).in_ns("other").labels(&[("app", "db")]),
                Open,
            ),
        ],
    );
    // A namespace policy outside the root namespace stays in its namespace.
    let yaml = policies(&[("kube-system/ns-only", "spec: {}")]);
    check(
        "not root",
        &yaml,
        &[
            (from(SHELL), Open),
            (from(SHELL).in_ns("kube-system"), NotAllowed),
        ],
    );
}

#[test]
fn selectors_pick_workloads_by_labels() {
    let yaml = allow_echo(&format!(
        "  - from:\n    - source:\n        principals: [\"{}\"]\n",
        &SHELL[9..]
    ));
    check(
        "selector mismatch",
        &yaml,
        &[
            (from(OTHER_SHELL).labels(&[("app", "other")]), Open),
            (from(OTHER_SHELL).labels(&[]), Open),
            (
                from(OTHER_SHELL).labels(&[("app", "echo"), ("version", "v1")]),
                NotAllowed,
            ),
            (from(OTHER_SHELL).in_ns("other"), Open),
        ],
    );
    let yaml = policies(&[(
        "default/two-labels",
        "spec:\n  selector:\n    matchLabels:\n      app: echo\n      version: v2\n  rules: []",
    )]);
    check(
        "all labels must match",
        &yaml,
        &[
            (from(SHELL), Open),
            (
                from(SHELL).labels(&[("app", "echo"), ("version", "v2")]),
                NotAllowed,
            ),
        ],
    );
    let yaml = policies(&[(
        "default/empty-selector",
        "spec:\n  selector: {}\n  rules: []",
    )]);
    check(
        "empty selector selects nothing",
        &yaml,
        &[(from(SHELL), Open)],
    );
}

#[test]
fn dry_run_policies_report_but_never_decide() {
    let yaml = policies(&[(
        "default/deny-dry",
        "  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - {}",
    )]);
    check("dry-run deny", &yaml, &[(from(SHELL), Open)]);

    let loaded = load_policies(&yaml, "default").unwrap();
    let engine = Engine::builder().policies(loaded).build().unwrap().engine;
    let id: Identity = SHELL.parse().unwrap();
    let decision = engine.evaluate(&Connection {
        source: Some(&id),
        source_ip: "10.0.0.1".parse().unwrap(),
        destination_ip: "10.1.0.1".parse().unwrap(),
        destination_port: 80,
        destination_namespace: "default",
        destination_labels: None,
        destination_policies: &[],
    });
    assert!(decision.is_allowed());
    assert_eq!(decision.dry_run.len(), 1);
    assert_eq!(&*decision.dry_run[0].policy, "default/deny-dry");
    assert!(decision.dry_run[0].matched);

    let yaml = policies(&[(
        "default/allow-dry",
        "  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  rules:\n  - from:\n    - source:\n        namespaces: [\"other\"]",
    )]);
    check(
        "dry-run allow does not close the workload",
        &yaml,
        &[(from(SHELL), Open)],
    );
    let yaml = policies(&[(
        "default/dry-false",
        "  annotations:\n    istio.io/dry-run: \"false\"\nspec:\n  action: DENY\n  rules:\n  - {}",
    )]);
    check(
        "dry-run false enforces",
        &yaml,
        &[(from(SHELL), DeniedBy("default/dry-false"))],
    );
}

#[test]
fn l7_attributes_are_dropped_as_ambient_does() {
    // ALLOW: a rule with any L7 attribute is dropped; the policy still applies.
    let yaml = allow_echo("  - to:\n    - operation:\n        methods: [\"GET\"]\n");
    check(
        "allow with only an L7 rule denies",
        &yaml,
        &[(from(SHELL), NotAllowed)],
    );
    let yaml = allow_echo(
        "  - to:\n    - operation:\n        methods: [\"GET\"]\n        ports: [\"8080\"]\n  \
         - from:\n    - source:\n        namespaces: [\"other\"]\n",
    );
    check(
        "allow keeps L4 rules",
        &yaml,
        &[
            (from(SHELL), NotAllowed),
            (from(OTHER_SHELL), AllowedBy("default/p")),
        ],
    );
    let yaml =
        allow_echo("  - when:\n    - key: request.headers[x-user]\n      values: [\"me\"]\n");
    check("allow with L7 when", &yaml, &[(from(SHELL), NotAllowed)]);
    let yaml = allow_echo(
        "  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n        namespaces: [\"default\"]\n",
    );
    check(
        "allow with requestPrincipals",
        &yaml,
        &[(from(SHELL), NotAllowed)],
    );

    // DENY: L7 attributes are dropped from the match; the rest still denies.
    let yaml = deny_echo(
        "  - from:\n    - source:\n        namespaces: [\"other\"]\n        remoteIpBlocks: [\"1.2.3.4\"]\n",
    );
    check(
        "deny drops L7 fields",
        &yaml,
        &[
            (from(OTHER_SHELL), DeniedBy("default/d")),
            (from(SHELL), Open),
        ],
    );
    // A match left empty never matches, so these DENY rules never fire.
    let yaml = deny_echo(
        "  - from:\n    - source:\n        namespaces: [\"other\"]\n    to:\n    - operation:\n        paths: [\"/admin\"]\n",
    );
    check(
        "deny with an L7-only operation",
        &yaml,
        &[(from(OTHER_SHELL), Open)],
    );
    let yaml =
        deny_echo("  - when:\n    - key: request.auth.claims[group]\n      values: [\"x\"]\n");
    check("deny with an L7-only when", &yaml, &[(from(SHELL), Open)]);
    // One `to` with ports still matches when another `to` entry is L7-only.
    let yaml = deny_echo(
        "  - to:\n    - operation:\n        hosts: [\"a\"]\n    - operation:\n        ports: [\"8080\"]\n",
    );
    check(
        "deny with a mixed to list",
        &yaml,
        &[
            (from(SHELL).port(8080), DeniedBy("default/d")),
            (from(SHELL).port(80), Open),
        ],
    );
}

#[test]
fn policies_not_for_data_planes_have_no_effect() {
    let yaml = policies(&[
        ("default/audit", "spec:\n  action: AUDIT\n  rules:\n  - {}"),
        (
            "default/custom",
            "spec:\n  action: CUSTOM\n  provider:\n    name: ext-authz\n  rules:\n  - {}",
        ),
        (
            "default/waypoint",
            "spec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: echo\n  action: DENY\n  rules:\n  - {}",
        ),
    ]);
    check(
        "audit, custom, targetRefs",
        &yaml,
        &[(from(SHELL), Open), (plaintext(), Open)],
    );
}

#[test]
fn other_kinds_in_the_file_are_skipped() {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  ports: [{{port: 80}}]\n---\n\
         # a comment-only document\n---\n{}---\napiVersion: v1\nkind: List\nitems:\n- {}\n",
        policies(&[(
            "default/deny-all",
            "spec:\n  action: DENY\n  rules:\n  - {}"
        )]),
        "{apiVersion: security.istio.io/v1beta1, kind: AuthorizationPolicy, metadata: {name: from-list}, spec: {}}"
    );
    let loaded = load_policies(&yaml, "default").unwrap();
    let names: Vec<_> = loaded.iter().map(|p| p.metadata.name.as_str()).collect();
    assert_eq!(names, ["deny-all", "from-list"]);
    assert_eq!(loaded[1].metadata.namespace.as_deref(), Some("default"));
    check(
        "mixed file",
        &yaml,
        &[(from(SHELL), DeniedBy("default/deny-all"))],
    );
}
