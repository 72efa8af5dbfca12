//! The policy engine: wire-form policies, indexed so that a decision only looks at
//! the policies that apply to the destination.
//!
//! A destination's policies are found, never scanned for:
//! - GLOBAL policies (root namespace, no selector): one short list;
//! - NAMESPACE policies: a map from namespace to its policies;
//! - WORKLOAD_SELECTOR policies: by the names the destination workload lists in
//!   `authorization_policies` (what a control plane sends), and, for policies
//!   added with a [`Selector`], by the destination's labels through a label index.
//!
//! The decision is ztunnel's: a matching enforced DENY denies; otherwise, with no
//! enforced ALLOW policy the connection is allowed; otherwise a matching ALLOW
//! allows and anything else is denied. Dry-run policies are evaluated and
//! reported in [`Decision::dry_run`], never decide.

mod compiled;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use mesh_api::Identity;
use mesh_api::security::{self, Authorization};

pub use self::compiled::WirePolicyError;
use self::compiled::{CompiledPolicy, Peer};
use crate::convert::{Selector, Warning, convert};
use crate::model::AuthorizationPolicy;
use crate::validate::{ValidationError, validate};

/// Kubernetes labels.
pub type Labels = BTreeMap<String, String>;

/// A connection to authorize, as seen by the destination's data plane.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The peer's identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    /// The peer's IP.
    pub source_ip: IpAddr,
    /// The destination workload's IP.
    pub destination_ip: IpAddr,
    /// The destination (target) port.
    pub destination_port: u16,
    /// The destination workload's namespace.
    pub destination_namespace: &'a str,
    /// The destination workload's labels, for policies added with a [`Selector`].
    pub destination_labels: Option<&'a Labels>,
    /// Policies the destination workload lists (`authorization_policies`,
    /// `"<namespace>/<name>"`), as a control plane sends them.
    pub destination_policies: &'a [String],
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the connection through.
    Allow,
    /// Refuse the connection.
    Deny,
}

/// Why the engine decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A DENY policy matched.
    DenyPolicyMatched,
    /// An ALLOW policy matched.
    AllowPolicyMatched,
    /// No ALLOW policy applies to the destination, and no DENY policy matched.
    NoAllowPolicy,
    /// ALLOW policies apply to the destination, and none matched.
    NoAllowPolicyMatched,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DenyPolicyMatched => "a DENY policy matched",
            Self::AllowPolicyMatched => "an ALLOW policy matched",
            Self::NoAllowPolicy => "no ALLOW policy applies to the destination",
            Self::NoAllowPolicyMatched => {
                "ALLOW policies apply to the destination and none matched"
            }
        })
    }
}

/// What a dry-run policy would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRun {
    /// The policy, as `<namespace>/<name>`.
    pub policy: Arc<str>,
    /// Its action.
    pub action: security::Action,
    /// Whether it matched the connection.
    pub matched: bool,
}

/// The outcome of [`Engine::evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The deciding policy (`<namespace>/<name>`), when a policy matched.
    pub policy: Option<Arc<str>>,
    /// Why.
    pub reason: Reason,
    /// The dry-run policies that apply, with what they would have done.
    pub dry_run: Vec<DryRun>,
}

impl Decision {
    /// Whether the connection is allowed.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// Indexed wire-form policies. `Send + Sync`: share it behind an `Arc` (with a
/// lock, or swapped whole) between the tasks that evaluate and the one that updates.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    /// Every policy by key, `"<namespace>/<name>"`.
    by_key: HashMap<Arc<str>, Entry>,
    /// GLOBAL policies, in key order.
    global: BTreeMap<Arc<str>, Arc<CompiledPolicy>>,
    /// NAMESPACE policies by namespace, in key order.
    by_namespace: HashMap<Box<str>, BTreeMap<Arc<str>, Arc<CompiledPolicy>>>,
    /// Selectors of policies added with one, indexed by their first label.
    labels: LabelIndex,
}

#[derive(Clone, Debug)]
struct Entry {
    policy: Arc<CompiledPolicy>,
    selector: Option<Arc<Selector>>,
}

/// Selector policies by (namespace or root) → label key → label value.
#[derive(Clone, Debug, Default)]
struct LabelIndex {
    namespaced: HashMap<Box<str>, LabelMap>,
    root: LabelMap,
}

type LabelMap = HashMap<Box<str>, HashMap<Box<str>, BTreeMap<Arc<str>, Selected>>>;

#[derive(Clone, Debug)]
struct Selected {
    policy: Arc<CompiledPolicy>,
    selector: Arc<Selector>,
}

impl Engine {
    /// An engine with no policies: it allows everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder that takes YAML-model or wire policies.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// How many policies the engine holds.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the engine holds no policy.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Whether a policy with this key (`"<namespace>/<name>"`) is held.
    pub fn contains(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    /// Adds or replaces one wire policy, selected only by name (through
    /// [`Connection::destination_policies`]) if it is WORKLOAD_SELECTOR. An
    /// invalid policy is refused and the engine keeps its previous state,
    /// including any earlier version of that policy.
    pub fn upsert(&mut self, policy: &Authorization) -> Result<(), WirePolicyError> {
        self.upsert_with_selector(policy, None)
    }

    /// Adds or replaces one wire policy; a WORKLOAD_SELECTOR policy with a
    /// `selector` is also found by the destination's labels.
    pub fn upsert_with_selector(
        &mut self,
        policy: &Authorization,
        selector: Option<Selector>,
    ) -> Result<(), WirePolicyError> {
        let compiled = Arc::new(CompiledPolicy::compile(policy)?);
        let key = compiled.key.clone();
        self.remove(&key);
        let selector = selector
            .filter(|_| compiled.scope == security::Scope::WorkloadSelector)
            .map(Arc::new);
        match compiled.scope {
            security::Scope::Global => {
                self.global.insert(key.clone(), compiled.clone());
            }
            security::Scope::Namespace => {
                self.by_namespace
                    .entry(compiled.namespace.clone())
                    .or_default()
                    .insert(key.clone(), compiled.clone());
            }
            security::Scope::WorkloadSelector => {
                if let Some(selector) = &selector {
                    self.labels.insert(&compiled, selector);
                }
            }
        }
        self.by_key.insert(
            key,
            Entry {
                policy: compiled,
                selector,
            },
        );
        Ok(())
    }

    /// Removes a policy by key (`"<namespace>/<name>"`); `false` if it was not held.
    pub fn remove(&mut self, key: &str) -> bool {
        let Some(entry) = self.by_key.remove(key) else {
            return false;
        };
        let policy = &entry.policy;
        match policy.scope {
            security::Scope::Global => {
                self.global.remove(key);
            }
            security::Scope::Namespace => {
                if let Some(policies) = self.by_namespace.get_mut(&policy.namespace) {
                    policies.remove(key);
                    if policies.is_empty() {
                        self.by_namespace.remove(&policy.namespace);
                    }
                }
            }
            security::Scope::WorkloadSelector => {
                if let Some(selector) = &entry.selector {
                    self.labels.remove(key, selector);
                }
            }
        }
        true
    }

    /// Decides a connection.
    pub fn evaluate(&self, connection: &Connection<'_>) -> Decision {
        let peer = Peer {
            principal: connection.source.map(Identity::principal),
            account: connection
                .source
                .map(|id| (id.namespace(), id.service_account())),
            namespace: connection.source.map_or("", Identity::namespace),
            source_ip: connection.source_ip.to_canonical(),
            destination_ip: connection.destination_ip.to_canonical(),
            destination_port: connection.destination_port,
        };
        let mut tally = Tally::default();
        for policy in self.global.values() {
            tally.add(policy, &peer);
        }
        if let Some(policies) = self.by_namespace.get(connection.destination_namespace) {
            for policy in policies.values() {
                tally.add(policy, &peer);
            }
        }
        for name in connection.destination_policies {
            if let Some(entry) = self.by_key.get(name.as_str()) {
                tally.add(&entry.policy, &peer);
            }
        }
        if let Some(labels) = connection.destination_labels {
            self.labels
                .for_each_selected(connection.destination_namespace, labels, |policy| {
                    tally.add(policy, &peer);
                });
        }
        tally.decide()
    }
}

/// What the policies seen so far say.
#[derive(Default)]
struct Tally {
    denied_by: Option<Arc<str>>,
    allowed_by: Option<Arc<str>>,
    any_allow: bool,
    dry_run: Vec<DryRun>,
}

impl Tally {
    #[inline]
    fn add(&mut self, policy: &Arc<CompiledPolicy>, peer: &Peer<'_>) {
        if policy.dry_run {
            if !self.dry_run.iter().any(|seen| seen.policy == policy.key) {
                self.dry_run.push(DryRun {
                    policy: policy.key.clone(),
                    action: policy.action,
                    matched: policy.matches(peer),
                });
            }
            return;
        }
        match policy.action {
            security::Action::Deny => {
                if self.denied_by.is_none() && policy.matches(peer) {
                    self.denied_by = Some(policy.key.clone());
                }
            }
            security::Action::Allow => {
                self.any_allow = true;
                if self.denied_by.is_none() && self.allowed_by.is_none() && policy.matches(peer) {
                    self.allowed_by = Some(policy.key.clone());
                }
            }
        }
    }

    fn decide(self) -> Decision {
        let (verdict, policy, reason) = match (self.denied_by, self.allowed_by) {
            (Some(policy), _) => (Verdict::Deny, Some(policy), Reason::DenyPolicyMatched),
            (None, _) if !self.any_allow => (Verdict::Allow, None, Reason::NoAllowPolicy),
            (None, Some(policy)) => (Verdict::Allow, Some(policy), Reason::AllowPolicyMatched),
            (None, None) => (Verdict::Deny, None, Reason::NoAllowPolicyMatched),
        };
        Decision {
            verdict,
            policy,
            reason,
            dry_run: self.dry_run,
        }
    }
}

impl LabelIndex {
    fn map_for(&mut self, selector: &Selector) -> &mut LabelMap {
        if selector.root {
            &mut self.root
        } else {
            self.namespaced
                .entry(selector.namespace.as_str().into())
                .or_default()
        }
    }

    fn insert(&mut self, policy: &Arc<CompiledPolicy>, selector: &Arc<Selector>) {
        // A selector without labels selects nothing: nothing to index.
        let Some((key, value)) = selector.match_labels.iter().next() else {
            return;
        };
        self.map_for(selector)
            .entry(key.as_str().into())
            .or_default()
            .entry(value.as_str().into())
            .or_default()
            .insert(
                policy.key.clone(),
                Selected {
                    policy: policy.clone(),
                    selector: selector.clone(),
                },
            );
    }

    fn remove(&mut self, policy_key: &str, selector: &Selector) {
        let Some((key, value)) = selector.match_labels.iter().next() else {
            return;
        };
        let map = self.map_for(selector);
        if let Some(values) = map.get_mut(key.as_str()) {
            if let Some(policies) = values.get_mut(value.as_str()) {
                policies.remove(policy_key);
                if policies.is_empty() {
                    values.remove(value.as_str());
                }
            }
            if values.is_empty() {
                map.remove(key.as_str());
            }
        }
        if !selector.root
            && self
                .namespaced
                .get(selector.namespace.as_str())
                .is_some_and(HashMap::is_empty)
        {
            self.namespaced.remove(selector.namespace.as_str());
        }
    }

    /// Calls `f` with each policy whose selector selects the workload. Each
    /// selector is indexed under one label, so each policy is seen at most once.
    fn for_each_selected(
        &self,
        namespace: &str,
        labels: &Labels,
        mut f: impl FnMut(&Arc<CompiledPolicy>),
    ) {
        let maps = [self.namespaced.get(namespace), Some(&self.root)];
        for map in maps.into_iter().flatten().filter(|map| !map.is_empty()) {
            for (key, value) in labels {
                let Some(policies) = map.get(key.as_str()).and_then(|v| v.get(value.as_str()))
                else {
                    continue;
                };
                for selected in policies.values() {
                    if selected.selector.selects(namespace, labels) {
                        f(&selected.policy);
                    }
                }
            }
        }
    }
}

/// Builds an [`Engine`] from YAML-model policies (validated and converted as the
/// control plane would) and wire policies.
#[derive(Debug)]
pub struct EngineBuilder {
    root_namespace: String,
    default_namespace: String,
    policies: Vec<AuthorizationPolicy>,
    wire: Vec<(Authorization, Option<Selector>)>,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            root_namespace: crate::DEFAULT_ROOT_NAMESPACE.into(),
            default_namespace: crate::DEFAULT_NAMESPACE.into(),
            policies: Vec::new(),
            wire: Vec::new(),
        }
    }
}

/// Why [`EngineBuilder::build`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// YAML-model policies failed validation; every problem is listed.
    #[error("invalid policies:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ValidationError>),
    /// A wire policy is malformed.
    #[error(transparent)]
    Wire(#[from] WirePolicyError),
}

/// A built engine and what the conversions left out.
#[derive(Clone, Debug)]
pub struct Built {
    /// The engine.
    pub engine: Engine,
    /// Per policy key, what its conversion left out.
    pub warnings: Vec<(String, Warning)>,
}

impl EngineBuilder {
    /// The mesh root namespace (default `istio-system`): policies there without a
    /// selector apply to the whole mesh, with one to every namespace.
    pub fn root_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.root_namespace = namespace.into();
        self
    }

    /// The namespace of policies whose metadata has none (default `default`).
    pub fn default_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.default_namespace = namespace.into();
        self
    }

    /// Adds a policy as written in YAML.
    pub fn policy(mut self, policy: AuthorizationPolicy) -> Self {
        self.policies.push(policy);
        self
    }

    /// Adds policies as written in YAML.
    pub fn policies(mut self, policies: impl IntoIterator<Item = AuthorizationPolicy>) -> Self {
        self.policies.extend(policies);
        self
    }

    /// Adds a wire policy, with the selector of a WORKLOAD_SELECTOR policy if known.
    pub fn authorization(mut self, policy: Authorization, selector: Option<Selector>) -> Self {
        self.wire.push((policy, selector));
        self
    }

    /// Validates, converts and indexes everything.
    pub fn build(self) -> Result<Built, BuildError> {
        let problems: Vec<ValidationError> = self
            .policies
            .iter()
            .flat_map(|policy| validate(policy, &self.default_namespace))
            .collect();
        if !problems.is_empty() {
            return Err(BuildError::Invalid(problems));
        }
        let mut engine = Engine::new();
        let mut warnings = Vec::new();
        for policy in &self.policies {
            let conversion = convert(policy, &self.root_namespace, &self.default_namespace);
            let key = format!(
                "{}/{}",
                policy.namespace_or(&self.default_namespace),
                policy.metadata.name
            );
            warnings.extend(conversion.warnings.into_iter().map(|w| (key.clone(), w)));
            if let Some(authorization) = conversion.authorization {
                engine.upsert_with_selector(&authorization, conversion.selector)?;
            }
        }
        for (authorization, selector) in self.wire {
            engine.upsert_with_selector(&authorization, selector)?;
        }
        Ok(Built { engine, warnings })
    }
}
