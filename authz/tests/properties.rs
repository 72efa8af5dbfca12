//! Property: for generated policy sets and connections, the full pipeline
//! (YAML text → parse and validate → wire conversion → engine) gives the same
//! verdict as a direct evaluation of the YAML model with Istio ambient's
//! semantics (`oracle` below, written from WIRE.md §8 independently of the wire
//! form).

use std::collections::BTreeMap;
use std::net::IpAddr;

use authz::model::{
    Action, AuthorizationPolicy, Condition, From, Metadata, Operation, PolicySpec, Rule, Source,
    To, WorkloadSelector,
};
use authz::{Connection, Engine, Labels, Verdict, load_policies};
use ipnet::IpNet;
use mesh_api::Identity;
use proptest::prelude::*;
use proptest::sample::select;

const ROOT: &str = "istio-system";
const L4_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

// ---------------------------------------------------------------- generators

fn some_of(values: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(select(values).prop_map(str::to_owned), 0..=max)
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/default/sa/shell",
    "cluster.local/ns/other/sa/shell",
    "cluster.local/ns/default/*",
    "*/sa/shell",
    "*",
    "example.org/ns/default/sa/admin",
];
const NAMESPACES: &[&str] = &["default", "other", "oth*", "*ult", "*"];
const IP_BLOCKS: &[&str] = &["10.0.0.0/24", "10.0.0.1", "fd00::/16", "192.168.0.0/16"];
const ACCOUNTS: &[&str] = &["shell", "other/shell", "default/admin"];
const PORTS: &[&str] = &["80", "8080", "9090"];
const DEST_IPS: &[&str] = &["10.1.0.0/16", "10.1.0.1", "fd01::/16"];

fn source() -> impl Strategy<Value = Source> {
    (
        any::<bool>(),
        some_of(PRINCIPALS, 2),
        some_of(PRINCIPALS, 1),
        some_of(NAMESPACES, 2),
        some_of(NAMESPACES, 1),
        some_of(IP_BLOCKS, 2),
        some_of(IP_BLOCKS, 1),
        some_of(ACCOUNTS, 2),
        some_of(ACCOUNTS, 1),
        some_of(&["*", "issuer/subject"], 1),
    )
        .prop_map(|(accounts, p, np, n, nn, ip, nip, sa, nsa, request)| {
            let mut source = Source {
                ip_blocks: ip,
                not_ip_blocks: nip,
                request_principals: request,
                ..Source::default()
            };
            // serviceAccounts may not be combined with principals or namespaces.
            if accounts {
                source.service_accounts = sa;
                source.not_service_accounts = nsa;
            } else {
                source.principals = p;
                source.not_principals = np;
                source.namespaces = n;
                source.not_namespaces = nn;
            }
            if source == Source::default() {
                source.namespaces = vec!["default".into()];
            }
            source
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (
        some_of(PORTS, 2),
        some_of(PORTS, 1),
        some_of(&["GET", "POST"], 1),
    )
        .prop_map(|(ports, not_ports, methods)| {
            let mut operation = Operation {
                ports,
                not_ports,
                methods,
                ..Operation::default()
            };
            if operation == Operation::default() {
                operation.ports = vec!["8080".into()];
            }
            operation
        })
}

fn condition() -> impl Strategy<Value = Condition> {
    let keys: &'static [&'static str] = &[
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.ip",
        "destination.port",
        "request.headers[x-user]",
    ];
    (select(keys), any::<bool>(), 0..3usize).prop_map(|(key, negate, count)| {
        let pool: &[&str] = match key {
            "source.ip" => IP_BLOCKS,
            "source.namespace" => NAMESPACES,
            "source.principal" => PRINCIPALS,
            "destination.ip" => DEST_IPS,
            "destination.port" => PORTS,
            _ => &["alice"],
        };
        let values: Vec<String> = pool
            .iter()
            .take(count.max(1))
            .map(|v| (*v).to_owned())
            .collect();
        Condition {
            key: key.into(),
            values: if negate { Vec::new() } else { values.clone() },
            not_values: if negate { values } else { Vec::new() },
        }
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        proptest::option::of(proptest::collection::vec(
            source().prop_map(|s| From { source: Some(s) }),
            1..3,
        )),
        proptest::option::of(proptest::collection::vec(
            operation().prop_map(|o| To { operation: Some(o) }),
            1..3,
        )),
        proptest::option::of(proptest::collection::vec(condition(), 1..3)),
    )
        .prop_map(|(from, to, when)| Rule { from, to, when })
}

fn policy(index: usize) -> impl Strategy<Value = AuthorizationPolicy> {
    (
        select(&["default", "other", ROOT][..]),
        select(&[Action::Allow, Action::Deny, Action::Audit][..]),
        proptest::option::of(select(&["echo", "db"][..])),
        proptest::collection::vec(rule(), 0..3),
        any::<bool>(),
    )
        .prop_map(move |(namespace, action, app, rules, dry_run)| {
            let mut annotations = BTreeMap::new();
            if dry_run && index.is_multiple_of(3) && action != Action::Audit {
                annotations.insert("istio.io/dry-run".to_owned(), "true".to_owned());
            }
            // DENY needs rules; give it a match-all rule when none were generated.
            let rules = if rules.is_empty() && action != Action::Allow {
                vec![Rule::default()]
            } else {
                rules
            };
            AuthorizationPolicy {
                metadata: Metadata {
                    name: format!("p{index}"),
                    namespace: Some(namespace.into()),
                    annotations,
                },
                spec: PolicySpec {
                    selector: app.map(|app| WorkloadSelector {
                        match_labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
                    }),
                    rules: Some(rules),
                    action,
                    ..PolicySpec::default()
                },
            }
        })
}

fn policy_set() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
    (0..5usize).prop_flat_map(|count| (0..count).map(policy).collect::<Vec<_>>())
}

#[derive(Clone, Debug)]
struct Request {
    source: Option<&'static str>,
    source_ip: &'static str,
    destination_ip: &'static str,
    port: u16,
    namespace: &'static str,
    app: &'static str,
}

fn request() -> impl Strategy<Value = Request> {
    (
        select(
            &[
                Some("spiffe://cluster.local/ns/default/sa/shell"),
                Some("spiffe://cluster.local/ns/default/sa/admin"),
                Some("spiffe://cluster.local/ns/other/sa/shell"),
                Some("spiffe://example.org/ns/default/sa/admin"),
                None,
            ][..],
        ),
        select(
            &[
                "10.0.0.1",
                "10.0.1.1",
                "fd00::1",
                "192.168.3.4",
                "::ffff:10.0.0.1",
            ][..],
        ),
        select(&["10.1.0.1", "10.1.9.9", "fd01::1", "10.2.0.1"][..]),
        select(&[80u16, 8080, 9090, 22][..]),
        select(&["default", "other"][..]),
        select(&["echo", "db", "web"][..]),
    )
        .prop_map(
            |(source, source_ip, destination_ip, port, namespace, app)| Request {
                source,
                source_ip,
                destination_ip,
                port,
                namespace,
                app,
            },
        )
}

// ------------------------------------------------------------------- oracle

/// Istio's `*` patterns on strings.
fn pattern(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn in_block(block: &str, ip: IpAddr) -> bool {
    let net: IpNet = if block.contains('/') {
        block.parse().unwrap()
    } else {
        IpNet::from(block.parse::<IpAddr>().unwrap())
    };
    net.contains(&ip)
}

/// A list field: empty holds; otherwise some value matches.
fn any_of(values: &[String], test: impl Fn(&str) -> bool) -> bool {
    values.is_empty() || values.iter().any(|v| test(v))
}

fn none_of(values: &[String], test: impl Fn(&str) -> bool) -> bool {
    !values.iter().any(|v| test(v))
}

struct Peer<'a> {
    identity: Option<&'a Identity>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    port: u16,
}

impl Peer<'_> {
    fn principal(&self, p: &str) -> bool {
        self.identity.is_some_and(|id| pattern(p, id.principal()))
    }
    fn namespace(&self, p: &str) -> bool {
        pattern(p, self.identity.map_or("", Identity::namespace))
    }
    fn account(&self, value: &str, policy_namespace: &str) -> bool {
        let (ns, sa) = value.split_once('/').unwrap_or((policy_namespace, value));
        self.identity
            .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
    }
}

fn source_l4_empty(s: &Source) -> bool {
    s.principals.is_empty()
        && s.not_principals.is_empty()
        && s.namespaces.is_empty()
        && s.not_namespaces.is_empty()
        && s.ip_blocks.is_empty()
        && s.not_ip_blocks.is_empty()
        && s.service_accounts.is_empty()
        && s.not_service_accounts.is_empty()
}

fn source_matches(s: &Source, peer: &Peer<'_>, policy_namespace: &str) -> bool {
    !source_l4_empty(s)
        && any_of(&s.principals, |p| peer.principal(p))
        && none_of(&s.not_principals, |p| peer.principal(p))
        && any_of(&s.namespaces, |p| peer.namespace(p))
        && none_of(&s.not_namespaces, |p| peer.namespace(p))
        && any_of(&s.ip_blocks, |b| in_block(b, peer.source_ip))
        && none_of(&s.not_ip_blocks, |b| in_block(b, peer.source_ip))
        && any_of(&s.service_accounts, |a| peer.account(a, policy_namespace))
        && none_of(&s.not_service_accounts, |a| {
            peer.account(a, policy_namespace)
        })
}

fn operation_matches(o: &Operation, peer: &Peer<'_>) -> bool {
    let port = |p: &str| p.parse::<u16>().unwrap() == peer.port;
    !(o.ports.is_empty() && o.not_ports.is_empty())
        && any_of(&o.ports, port)
        && none_of(&o.not_ports, port)
}

fn condition_matches(c: &Condition, peer: &Peer<'_>) -> bool {
    let test: Box<dyn Fn(&str) -> bool + '_> = match c.key.as_str() {
        "source.ip" => Box::new(|v| in_block(v, peer.source_ip)),
        "destination.ip" => Box::new(|v| in_block(v, peer.destination_ip)),
        "destination.port" => Box::new(|v| v.parse::<u16>().unwrap() == peer.port),
        "source.namespace" => Box::new(|v| peer.namespace(v)),
        "source.principal" => Box::new(|v| peer.principal(v)),
        _ => return false, // L7 keys cannot be evaluated at L4
    };
    any_of(&c.values, &test) && none_of(&c.not_values, &test)
}

fn has_l7(rule: &Rule) -> bool {
    rule.from
        .iter()
        .flatten()
        .filter_map(|f| f.source.as_ref())
        .any(|s| {
            !s.request_principals.is_empty()
                || !s.not_request_principals.is_empty()
                || !s.remote_ip_blocks.is_empty()
                || !s.not_remote_ip_blocks.is_empty()
        })
        || rule
            .to
            .iter()
            .flatten()
            .filter_map(|t| t.operation.as_ref())
            .any(|o| {
                !o.methods.is_empty()
                    || !o.not_methods.is_empty()
                    || !o.hosts.is_empty()
                    || !o.not_hosts.is_empty()
                    || !o.paths.is_empty()
                    || !o.not_paths.is_empty()
            })
        || rule
            .when
            .iter()
            .flatten()
            .any(|c| !L4_KEYS.contains(&c.key.as_str()))
}

fn rule_matches(rule: &Rule, action: Action, peer: &Peer<'_>, namespace: &str) -> bool {
    if action == Action::Allow && has_l7(rule) {
        return false; // an ALLOW rule with HTTP attributes is dropped
    }
    let from = rule.from.as_ref().is_none_or(|from| {
        from.iter()
            .any(|f| source_matches(f.source.as_ref().unwrap(), peer, namespace))
    });
    let to = rule.to.as_ref().is_none_or(|to| {
        to.iter()
            .any(|t| operation_matches(t.operation.as_ref().unwrap(), peer))
    });
    let when = rule
        .when
        .iter()
        .flatten()
        .all(|c| condition_matches(c, peer));
    from && to && when
}

fn applies(policy: &AuthorizationPolicy, namespace: &str, labels: &Labels) -> bool {
    let policy_ns = policy.metadata.namespace.as_deref().unwrap();
    let in_scope = policy_ns == namespace || policy_ns == ROOT;
    match &policy.spec.selector {
        None => in_scope,
        Some(selector) => {
            in_scope
                && !selector.match_labels.is_empty()
                && selector
                    .match_labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
        }
    }
}

fn oracle(
    policies: &[AuthorizationPolicy],
    peer: &Peer<'_>,
    namespace: &str,
    labels: &Labels,
) -> Verdict {
    let enforced = policies.iter().filter(|p| {
        matches!(p.spec.action, Action::Allow | Action::Deny)
            && !p.dry_run()
            && applies(p, namespace, labels)
    });
    let matches = |p: &AuthorizationPolicy| {
        let ns = p.metadata.namespace.as_deref().unwrap();
        p.spec
            .rules
            .iter()
            .flatten()
            .any(|r| rule_matches(r, p.spec.action, peer, ns))
    };
    let (deny, allow): (Vec<_>, Vec<_>) = enforced.partition(|p| p.spec.action == Action::Deny);
    if deny.iter().any(|p| matches(p)) {
        Verdict::Deny
    } else if allow.is_empty() || allow.iter().any(|p| matches(p)) {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

// -------------------------------------------------------------- the property

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn pipeline_agrees_with_direct_evaluation(
        policies in policy_set(),
        requests in proptest::collection::vec(request(), 1..8),
    ) {
        // Through text, as a user would write it (JSON is YAML).
        let yaml: String = policies
            .iter()
            .map(|p| {
                let mut value = serde_json::to_value(p).unwrap();
                value["apiVersion"] = "security.istio.io/v1".into();
                value["kind"] = "AuthorizationPolicy".into();
                format!("---\n{value}\n")
            })
            .collect();
        let loaded = load_policies(&yaml, "default")
            .unwrap_or_else(|err| panic!("generated policies must be valid:\n{err}\n{yaml}"));
        prop_assert_eq!(&loaded, &policies);
        let engine = Engine::builder().root_namespace(ROOT).policies(loaded).build().unwrap().engine;

        for request in requests {
            let identity: Option<Identity> = request.source.map(|s| s.parse().unwrap());
            let labels: Labels = BTreeMap::from([("app".to_owned(), request.app.to_owned())]);
            let source_ip: IpAddr = request.source_ip.parse().unwrap();
            let peer = Peer {
                identity: identity.as_ref(),
                source_ip: source_ip.to_canonical(),
                destination_ip: request.destination_ip.parse().unwrap(),
                port: request.port,
            };
            let expected = oracle(&policies, &peer, request.namespace, &labels);
            let decision = engine.evaluate(&Connection {
                source: identity.as_ref(),
                source_ip,
                destination_ip: peer.destination_ip,
                destination_port: request.port,
                destination_namespace: request.namespace,
                destination_labels: Some(&labels),
                destination_policies: &[],
            });
            prop_assert_eq!(decision.verdict, expected, "request {:?}\npolicies:\n{}", request, yaml);
        }
    }

    /// Updating policies one at a time gives the same decisions as building the
    /// engine from scratch with the final set.
    #[test]
    fn incremental_updates_match_a_fresh_build(
        first in policy_set(),
        second in policy_set(),
        request in request(),
    ) {
        let built = |policies: &[AuthorizationPolicy]| {
            Engine::builder().root_namespace(ROOT).policies(policies.to_vec()).build().unwrap().engine
        };
        let mut engine = built(&first);
        // Replace by name (p0, p1, ... collide across the two sets), add, remove.
        for policy in &first {
            let key = format!("{}/{}", policy.metadata.namespace.as_deref().unwrap(), policy.metadata.name);
            engine.remove(&key);
        }
        for policy in &second {
            let conversion = authz::convert(policy, ROOT, "default");
            if let Some(authorization) = conversion.authorization {
                engine.upsert_with_selector(&authorization, conversion.selector).unwrap();
            }
        }
        let fresh = built(&second);
        prop_assert_eq!(engine.len(), fresh.len());
        let identity: Option<Identity> = request.source.map(|s| s.parse().unwrap());
        let labels: Labels = BTreeMap::from([("app".to_owned(), request.app.to_owned())]);
        let connection = Connection {
            source: identity.as_ref(),
            source_ip: request.source_ip.parse().unwrap(),
            destination_ip: request.destination_ip.parse().unwrap(),
            destination_port: request.port,
            destination_namespace: request.namespace,
            destination_labels: Some(&labels),
            destination_policies: &[],
        };
        prop_assert_eq!(engine.evaluate(&connection).verdict, fresh.evaluate(&connection).verdict);
    }
}
