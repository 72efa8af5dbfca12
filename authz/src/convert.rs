//! Conversion of a validated `AuthorizationPolicy` into the ambient wire form,
//! `istio.security.Authorization`, as the control plane sends it to data planes.
//!
//! The rules are istiod's for ambient:
//! - Scope: no selector → NAMESPACE (GLOBAL in the root namespace); a selector →
//!   WORKLOAD_SELECTOR.
//! - Only ALLOW and DENY are sent; CUSTOM, AUDIT and policies with `targetRef(s)`
//!   (which are for waypoints) are not.
//! - Each rule becomes one wire rule whose clauses are: one for all `to` entries
//!   (a match per entry), one for all `from` entries, then one per `when`.
//! - L7-only attributes (hosts, methods, paths, requestPrincipals, remoteIpBlocks
//!   and every `when` key other than source.ip, source.namespace, source.principal,
//!   destination.ip, destination.port): in an ALLOW policy the whole rule is
//!   dropped; in a DENY policy only those attributes are dropped, and a match left
//!   empty never matches.
//! - The `istio.io/dry-run` annotation sets `dry_run`.
//!
//! Every drop is reported as a [`Warning`].

use std::collections::BTreeMap;

use mesh_api::names::ip_to_wire;
use mesh_api::security::{self, Authorization, Clause, Match, ServiceAccountMatch};

use crate::model::{Action, AuthorizationPolicy, Condition, From, Operation, Rule, To};
use crate::values::{parse_ip_range, parse_port, service_account, string_match};

/// `when` keys a data plane can enforce.
const L4_WHEN_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// The labels a WORKLOAD_SELECTOR policy selects, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// The policy's namespace. In the root namespace the selector applies to
    /// workloads of every namespace.
    pub namespace: String,
    /// Whether `namespace` is the root namespace.
    pub root: bool,
    /// Labels a workload must all have. Empty selects nothing (as in ambient).
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    /// Whether a workload in `namespace` with `labels` is selected.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.root || self.namespace == namespace)
            && !self.match_labels.is_empty()
            && self
                .match_labels
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// Something a conversion left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// The policy is not sent to data planes (CUSTOM, AUDIT, `targetRef`).
    NotSent {
        /// Why.
        reason: String,
    },
    /// L7-only attributes were found and dropped.
    HttpAttributes {
        /// The attributes, sorted (e.g. `methods`, `request.headers[x]`).
        attributes: Vec<String>,
        /// What that does to the policy.
        effect: String,
    },
    /// The selector has no labels, so it selects no workload.
    EmptySelector,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent { reason } => write!(f, "not sent to data planes: {reason}"),
            Self::HttpAttributes { attributes, effect } => write!(
                f,
                "data planes do not enforce HTTP attributes (found: {}); a waypoint must \
                 enforce them. {effect}",
                attributes.join(", ")
            ),
            Self::EmptySelector => {
                f.write_str("the selector has no labels and selects no workload")
            }
        }
    }
}

/// The result of converting one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    /// The wire resource, or `None` when the policy is not for data planes.
    pub authorization: Option<Authorization>,
    /// For WORKLOAD_SELECTOR policies: which workloads the policy applies to.
    pub selector: Option<Selector>,
    /// What was left out.
    pub warnings: Vec<Warning>,
}

/// Converts a policy that passed [`validate`](fn@crate::validate) into its wire form.
/// `default_namespace` stands in for a missing `metadata.namespace`.
pub fn convert(
    policy: &AuthorizationPolicy,
    root_namespace: &str,
    default_namespace: &str,
) -> Conversion {
    let namespace = policy.namespace_or(default_namespace);
    let spec = &policy.spec;
    let not_sent = |reason: String| Conversion {
        authorization: None,
        selector: None,
        warnings: vec![Warning::NotSent { reason }],
    };
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return not_sent("policies with targetRef(s) are enforced by waypoints".into());
    }
    let action = match spec.action {
        Action::Allow => security::Action::Allow,
        Action::Deny => security::Action::Deny,
        other => {
            return not_sent(format!(
                "data planes do not support the {} action",
                other.as_str()
            ));
        }
    };

    let mut warnings = Vec::new();
    let (scope, selector) = match &spec.selector {
        Some(selector) => {
            if selector.match_labels.is_empty() {
                warnings.push(Warning::EmptySelector);
            }
            let selector = Selector {
                namespace: namespace.to_owned(),
                root: namespace == root_namespace,
                match_labels: selector.match_labels.clone(),
            };
            (security::Scope::WorkloadSelector, Some(selector))
        }
        None if namespace == root_namespace => (security::Scope::Global, None),
        None => (security::Scope::Namespace, None),
    };

    let mut http_attributes = Vec::new();
    let mut rules = Vec::new();
    for rule in spec.rules.iter().flatten() {
        let (clauses, found) = convert_rule(rule, namespace);
        let has_http = !found.is_empty();
        http_attributes.extend(found);
        if !(action == security::Action::Allow && has_http) {
            rules.push(security::Rule { clauses });
        }
    }
    if !http_attributes.is_empty() {
        http_attributes.sort();
        http_attributes.dedup();
        let effect = if action == security::Action::Allow {
            "In an ALLOW policy, rules using them are left out: more restrictive than requested."
        } else if rules.iter().any(rule_can_match) {
            "The DENY policy is enforced without them: more restrictive than requested."
        } else {
            "With them left out, this DENY policy can never match at a data plane and has no effect."
        };
        warnings.push(Warning::HttpAttributes {
            attributes: http_attributes,
            effect: effect.into(),
        });
    }

    Conversion {
        authorization: Some(Authorization {
            name: policy.metadata.name.clone(),
            namespace: namespace.to_owned(),
            scope: scope.into(),
            action: action.into(),
            rules,
            dry_run: policy.dry_run(),
        }),
        selector,
        warnings,
    }
}

/// Whether a wire rule can ever match: every clause has a non-empty match (or no
/// matches at all).
fn rule_can_match(rule: &security::Rule) -> bool {
    rule.clauses.iter().all(|clause| {
        clause.matches.is_empty() || clause.matches.iter().any(|m| *m != Match::default())
    })
}

/// One policy rule → the clauses of one wire rule, and the L7 attributes found.
fn convert_rule(rule: &Rule, namespace: &str) -> (Vec<Clause>, Vec<String>) {
    let mut http = Vec::new();
    let mut clauses = Vec::new();
    let to: Vec<Match> = rule
        .to
        .iter()
        .flatten()
        .filter_map(|To { operation }| operation.as_ref())
        .map(|operation| to_match(operation, &mut http))
        .collect();
    if !to.is_empty() {
        clauses.push(Clause { matches: to });
    }
    let from: Vec<Match> = rule
        .from
        .iter()
        .flatten()
        .filter_map(|From { source }| source.as_ref())
        .map(|source| from_match(source, namespace, &mut http))
        .collect();
    if !from.is_empty() {
        clauses.push(Clause { matches: from });
    }
    for condition in rule.when.iter().flatten() {
        if !L4_WHEN_KEYS.contains(&condition.key.as_str()) {
            http.push(condition.key.clone());
        }
        clauses.push(Clause {
            matches: vec![when_match(condition)],
        });
    }
    (clauses, http)
}

fn to_match(operation: &Operation, http: &mut Vec<String>) -> Match {
    for (field, values) in [
        ("hosts", &operation.hosts),
        ("notHosts", &operation.not_hosts),
        ("methods", &operation.methods),
        ("notMethods", &operation.not_methods),
        ("paths", &operation.paths),
        ("notPaths", &operation.not_paths),
    ] {
        if !values.is_empty() {
            http.push(field.to_owned());
        }
    }
    Match {
        destination_ports: ports(&operation.ports),
        not_destination_ports: ports(&operation.not_ports),
        ..Match::default()
    }
}

fn from_match(source: &crate::model::Source, namespace: &str, http: &mut Vec<String>) -> Match {
    for (field, values) in [
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
    ] {
        if !values.is_empty() {
            http.push(field.to_owned());
        }
    }
    Match {
        source_ips: ips(&source.ip_blocks),
        not_source_ips: ips(&source.not_ip_blocks),
        namespaces: strings(&source.namespaces),
        not_namespaces: strings(&source.not_namespaces),
        principals: strings(&source.principals),
        not_principals: strings(&source.not_principals),
        service_accounts: accounts(&source.service_accounts, namespace),
        not_service_accounts: accounts(&source.not_service_accounts, namespace),
        ..Match::default()
    }
}

fn when_match(condition: &Condition) -> Match {
    let (values, not_values) = (&condition.values, &condition.not_values);
    match condition.key.as_str() {
        "source.namespace" => Match {
            namespaces: strings(values),
            not_namespaces: strings(not_values),
            ..Match::default()
        },
        "source.principal" => Match {
            principals: strings(values),
            not_principals: strings(not_values),
            ..Match::default()
        },
        "source.ip" => Match {
            source_ips: ips(values),
            not_source_ips: ips(not_values),
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: ips(values),
            not_destination_ips: ips(not_values),
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: ports(values),
            not_destination_ports: ports(not_values),
            ..Match::default()
        },
        // L7 keys: an empty match, which never matches.
        _ => Match::default(),
    }
}

fn strings(values: &[String]) -> Vec<security::StringMatch> {
    values.iter().map(|value| string_match(value)).collect()
}

/// Values that do not parse are left out, as istiod does; validation refuses them first.
fn ports(values: &[String]) -> Vec<u32> {
    values
        .iter()
        .filter_map(|value| parse_port(value).ok())
        .map(u32::from)
        .collect()
}

fn ips(values: &[String]) -> Vec<security::Address> {
    values
        .iter()
        .filter_map(|value| parse_ip_range(value).ok())
        .map(|range| security::Address {
            address: ip_to_wire(range.address),
            length: u32::from(range.prefix_len),
        })
        .collect()
}

fn accounts(values: &[String], namespace: &str) -> Vec<ServiceAccountMatch> {
    values
        .iter()
        .map(|value| {
            let (namespace, service_account) = service_account(value, namespace);
            ServiceAccountMatch {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            }
        })
        .collect()
}
