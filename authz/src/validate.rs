//! Validation of `AuthorizationPolicy` resources: the checks Istio applies when a
//! policy is created, each reported with the policy, the path to the field and
//! what to change.

use std::fmt;

use crate::model::{
    Action, AuthorizationPolicy, Condition, DRY_RUN_ANNOTATION, Operation, Rule, Source, TargetRef,
    parse_go_bool,
};
use crate::values::{MAX_SERVICE_ACCOUNTS, check_service_account, parse_ip_range, parse_port};

/// Istio's limits on list sizes (from the CRD schema).
const MAX_RULES: usize = 512;
const MAX_FROM: usize = 512;
const MAX_TARGET_REFS: usize = 16;

/// Target kinds a policy may reference, as `(group, kind)`; an empty group is core.
const TARGET_KINDS: &[(&str, &str)] = &[
    ("", "Service"),
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

/// One problem with one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// The policy, as `<namespace>/<name>`.
    pub policy: String,
    /// Where in the resource, e.g. `spec.rules[0].from[1].source.ipBlocks[0]`.
    pub path: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {}: {}: {}", self.policy, self.path, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Checks a policy; an empty list means it is valid. `default_namespace` stands in
/// for a missing `metadata.namespace`.
pub fn validate(policy: &AuthorizationPolicy, default_namespace: &str) -> Vec<ValidationError> {
    let mut check = Checker {
        policy: format!(
            "{}/{}",
            policy.namespace_or(default_namespace),
            policy.metadata.name
        ),
        errors: Vec::new(),
    };
    check.metadata(policy);
    check.targets(policy);
    check.action(policy);
    if let Some(rules) = &policy.spec.rules {
        if rules.len() > MAX_RULES {
            check.error(
                "spec.rules",
                format!(
                    "at most {MAX_RULES} rules are allowed, found {}",
                    rules.len()
                ),
            );
        }
        for (index, rule) in rules.iter().enumerate() {
            check.rule(&format!("spec.rules[{index}]"), rule, policy.spec.action);
        }
    }
    check.errors
}

struct Checker {
    policy: String,
    errors: Vec<ValidationError>,
}

impl Checker {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ValidationError {
            policy: self.policy.clone(),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn metadata(&mut self, policy: &AuthorizationPolicy) {
        if policy.metadata.name.is_empty() {
            self.error("metadata.name", "must be set");
        }
        if let Some(value) = policy.metadata.annotations.get(DRY_RUN_ANNOTATION) {
            let path = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
            if parse_go_bool(value).is_none() {
                self.error(
                    &path,
                    format!("{value:?} is not a boolean: use \"true\" or \"false\""),
                );
            }
            if !matches!(policy.spec.action, Action::Allow | Action::Deny) {
                self.error(
                    &path,
                    format!(
                        "dry-run is only supported for ALLOW and DENY policies, this one is {}",
                        policy.spec.action.as_str()
                    ),
                );
            }
        }
    }

    fn targets(&mut self, policy: &AuthorizationPolicy) {
        let spec = &policy.spec;
        let ways = usize::from(spec.selector.is_some())
            + usize::from(spec.target_ref.is_some())
            + usize::from(!spec.target_refs.is_empty());
        if ways > 1 {
            self.error(
                "spec",
                "only one of selector, targetRef or targetRefs may be set",
            );
        }
        if let Some(selector) = &spec.selector {
            for (key, value) in &selector.match_labels {
                let path = format!("spec.selector.matchLabels[{key}]");
                if key.is_empty() {
                    self.error(&path, format!("empty label key (with value {value:?})"));
                }
                if key.contains('*') || value.contains('*') {
                    self.error(&path, "wildcards are not supported in selectors");
                }
            }
        }
        if spec.target_refs.len() > MAX_TARGET_REFS {
            self.error(
                "spec.targetRefs",
                format!(
                    "at most {MAX_TARGET_REFS} targets are allowed, found {}",
                    spec.target_refs.len()
                ),
            );
        }
        if let Some(target) = &spec.target_ref {
            self.target("spec.targetRef", target);
        }
        for (index, target) in spec.target_refs.iter().enumerate() {
            self.target(&format!("spec.targetRefs[{index}]"), target);
        }
    }

    fn target(&mut self, path: &str, target: &TargetRef) {
        if target.name.is_empty() {
            self.error(&format!("{path}.name"), "must be set");
        }
        if target.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
            self.error(
                &format!("{path}.namespace"),
                "must not be set: cross-namespace references are not supported",
            );
        }
        if !TARGET_KINDS.contains(&(target.group.as_str(), target.kind.as_str())) {
            self.error(
                path,
                format!(
                    "a target must be a Service, ServiceEntry (networking.istio.io), Gateway or \
                     GatewayClass (gateway.networking.k8s.io), found group {:?} kind {:?}",
                    target.group, target.kind
                ),
            );
        }
    }

    fn action(&mut self, policy: &AuthorizationPolicy) {
        let spec = &policy.spec;
        let has_rules = spec.rules.as_ref().is_some_and(|rules| !rules.is_empty());
        match spec.action {
            Action::Custom => {
                if !has_rules {
                    self.error(
                        "spec.rules",
                        "a CUSTOM policy without rules never applies: add an empty rule `{}` to apply it to every request",
                    );
                }
                if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
                    self.error("spec.provider.name", "a CUSTOM policy needs a provider name");
                }
            }
            Action::Deny if !has_rules => self.error(
                "spec.rules",
                "a DENY policy without rules never applies: add an empty rule `{}` to deny everything it selects",
            ),
            _ => {}
        }
        if spec.provider.is_some() && spec.action != Action::Custom {
            self.error(
                "spec.provider",
                format!(
                    "only CUSTOM policies have a provider, this one is {}",
                    spec.action.as_str()
                ),
            );
        }
    }

    fn rule(&mut self, path: &str, rule: &Rule, action: Action) {
        if let Some(from) = &rule.from {
            if from.is_empty() {
                self.error(
                    &format!("{path}.from"),
                    "must not be empty: omit `from` to match any source",
                );
            }
            if from.len() > MAX_FROM {
                self.error(
                    &format!("{path}.from"),
                    format!("at most {MAX_FROM} entries are allowed"),
                );
            }
            for (index, entry) in from.iter().enumerate() {
                let path = format!("{path}.from[{index}].source");
                match &entry.source {
                    None => self.error(&path, "must be set"),
                    Some(source) => self.source(&path, source, action),
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                self.error(
                    &format!("{path}.to"),
                    "must not be empty: omit `to` to match any operation",
                );
            }
            for (index, entry) in to.iter().enumerate() {
                let path = format!("{path}.to[{index}].operation");
                match &entry.operation {
                    None => self.error(&path, "must be set"),
                    Some(operation) => self.operation(&path, operation),
                }
            }
        }
        for (index, condition) in rule.when.iter().flatten().enumerate() {
            self.condition(&format!("{path}.when[{index}]"), condition, action);
        }
    }

    fn source(&mut self, path: &str, source: &Source, action: Action) {
        let Source {
            principals,
            not_principals,
            request_principals,
            not_request_principals,
            namespaces,
            not_namespaces,
            ip_blocks,
            not_ip_blocks,
            remote_ip_blocks,
            not_remote_ip_blocks,
            service_accounts,
            not_service_accounts,
        } = source;
        let strings = [
            ("principals", principals),
            ("notPrincipals", not_principals),
            ("requestPrincipals", request_principals),
            ("notRequestPrincipals", not_request_principals),
            ("namespaces", namespaces),
            ("notNamespaces", not_namespaces),
        ];
        let ips = [
            ("ipBlocks", ip_blocks),
            ("notIpBlocks", not_ip_blocks),
            ("remoteIpBlocks", remote_ip_blocks),
            ("notRemoteIpBlocks", not_remote_ip_blocks),
        ];
        let accounts = [
            ("serviceAccounts", service_accounts),
            ("notServiceAccounts", not_service_accounts),
        ];
        let all = strings.iter().chain(&ips).chain(&accounts);
        if all.clone().all(|(_, values)| values.is_empty()) {
            self.error(
                path,
                "must not be empty: set at least one of principals, namespaces, serviceAccounts, \
                 ipBlocks, requestPrincipals, remoteIpBlocks (or their not* forms)",
            );
        }
        let identity_fields = [principals, not_principals, namespaces, not_namespaces];
        let has_accounts = !service_accounts.is_empty() || !not_service_accounts.is_empty();
        if has_accounts && identity_fields.iter().any(|values| !values.is_empty()) {
            self.error(
                path,
                "serviceAccounts cannot be combined with namespaces or principals: use one or the other",
            );
        }
        for (field, values) in strings.iter().chain(&ips) {
            self.no_empty_values(&format!("{path}.{field}"), values);
        }
        for (field, values) in &ips {
            for (index, value) in values.iter().enumerate() {
                if let (false, Err(problem)) = (value.is_empty(), parse_ip_range(value)) {
                    self.error(&format!("{path}.{field}[{index}]"), problem);
                }
            }
        }
        for (field, values) in &accounts {
            if values.len() > MAX_SERVICE_ACCOUNTS {
                self.error(
                    &format!("{path}.{field}"),
                    format!(
                        "at most {MAX_SERVICE_ACCOUNTS} values are allowed, found {}",
                        values.len()
                    ),
                );
            }
            for (index, value) in values.iter().enumerate() {
                if let Err(problem) = check_service_account(value) {
                    self.error(&format!("{path}.{field}[{index}]"), problem);
                }
            }
        }
        if action == Action::Custom {
            let unsupported = [
                ("namespaces", namespaces),
                ("notNamespaces", not_namespaces),
                ("serviceAccounts", service_accounts),
                ("notServiceAccounts", not_service_accounts),
                ("principals", principals),
                ("notPrincipals", not_principals),
                ("requestPrincipals", request_principals),
                ("notRequestPrincipals", not_request_principals),
            ];
            for (field, values) in unsupported {
                if !values.is_empty() {
                    self.error(
                        &format!("{path}.{field}"),
                        "not supported with the CUSTOM action",
                    );
                }
            }
        }
    }

    fn operation(&mut self, path: &str, operation: &Operation) {
        let Operation {
            hosts,
            not_hosts,
            ports,
            not_ports,
            methods,
            not_methods,
            paths,
            not_paths,
        } = operation;
        let fields = [
            ("hosts", hosts),
            ("notHosts", not_hosts),
            ("ports", ports),
            ("notPorts", not_ports),
            ("methods", methods),
            ("notMethods", not_methods),
            ("paths", paths),
            ("notPaths", not_paths),
        ];
        if fields.iter().all(|(_, values)| values.is_empty()) {
            self.error(
                path,
                "must not be empty: set at least one of ports, hosts, methods, paths (or their not* forms)",
            );
        }
        for (field, values) in fields {
            self.no_empty_values(&format!("{path}.{field}"), values);
        }
        for (field, values) in [("ports", ports), ("notPorts", not_ports)] {
            for (index, value) in values.iter().enumerate() {
                if let (false, Err(problem)) = (value.is_empty(), parse_port(value)) {
                    self.error(&format!("{path}.{field}[{index}]"), problem);
                }
            }
        }
    }

    fn condition(&mut self, path: &str, condition: &Condition, action: Action) {
        let key = condition.key.as_str();
        if key.is_empty() {
            self.error(&format!("{path}.key"), "must be set");
            return;
        }
        if condition.values.is_empty() && condition.not_values.is_empty() {
            self.error(
                path,
                format!("at least one of `values` or `notValues` must be set for key {key:?}"),
            );
        }
        let kind = match when_key_kind(key) {
            Ok(kind) => kind,
            Err(problem) => {
                self.error(&format!("{path}.key"), problem);
                return;
            }
        };
        if action == Action::Custom && kind.identity_based() {
            self.error(
                &format!("{path}.key"),
                format!("{key:?} is not supported with the CUSTOM action"),
            );
        }
        for (field, values) in [
            ("values", &condition.values),
            ("notValues", &condition.not_values),
        ] {
            for (index, value) in values.iter().enumerate() {
                let problem = match kind {
                    _ if value.is_empty() => Some("empty value not allowed".to_owned()),
                    WhenKey::Ip => parse_ip_range(value).err(),
                    WhenKey::Port => parse_port(value).err(),
                    WhenKey::ServiceAccount => check_service_account(value).err(),
                    _ => None,
                };
                if let Some(problem) = problem {
                    self.error(&format!("{path}.{field}[{index}]"), problem);
                }
            }
        }
    }

    fn no_empty_values(&mut self, path: &str, values: &[String]) {
        for (index, value) in values.iter().enumerate() {
            if value.is_empty() {
                self.error(&format!("{path}[{index}]"), "empty value not allowed");
            }
        }
    }
}

/// What kind of value a `when` key takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WhenKey {
    Ip,
    Port,
    ServiceAccount,
    Namespace,
    Principal,
    RequestAuth,
    Other,
}

impl WhenKey {
    /// Keys derived from the peer's identity, which CUSTOM policies cannot use.
    fn identity_based(self) -> bool {
        matches!(
            self,
            Self::Namespace | Self::Principal | Self::ServiceAccount | Self::RequestAuth
        )
    }
}

/// Classifies a `when` key, or says why Istio refuses it.
fn when_key_kind(key: &str) -> Result<WhenKey, String> {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inner| !inner.is_empty())
    };
    Ok(match key {
        "source.ip" | "remote.ip" | "destination.ip" => WhenKey::Ip,
        "destination.port" => WhenKey::Port,
        "source.serviceAccount" => WhenKey::ServiceAccount,
        "source.namespace" => WhenKey::Namespace,
        "source.principal" => WhenKey::Principal,
        "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => {
            WhenKey::RequestAuth
        }
        "connection.sni" => WhenKey::Other,
        _ if key.starts_with("experimental.envoy.filters.") => WhenKey::Other,
        _ if key.starts_with("request.headers") => {
            if !bracketed("request.headers[") {
                return Err(format!(
                    "bad key {key:?}: write it as request.headers[<header-name>]"
                ));
            }
            WhenKey::Other
        }
        _ if key.starts_with("request.auth.claims") => {
            if !bracketed("request.auth.claims[") {
                return Err(format!(
                    "bad key {key:?}: write it as request.auth.claims[<claim>]"
                ));
            }
            WhenKey::RequestAuth
        }
        "destination.namespace" => {
            return Err(format!(
                "{key:?} is not an attribute: the policy's own namespace (metadata.namespace) plays that role"
            ));
        }
        _ if key.starts_with("destination.labels") => {
            return Err(format!(
                "{key:?} is not an attribute: use spec.selector.matchLabels"
            ));
        }
        "destination.name" | "destination.user" => {
            return Err(format!("{key:?} was removed after v1alpha1"));
        }
        _ => {
            return Err(format!(
                "unknown attribute {key:?}: L4 keys are source.ip, source.namespace, source.principal, \
                 destination.ip and destination.port"
            ));
        }
    })
}
