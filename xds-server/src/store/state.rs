//! The cluster as the control plane knows it (facts extracted from objects,
//! indexed by namespace) and the resources derived from it, kept consistent on
//! every change: a change recomputes exactly the resources it can affect.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};

use authz::Selector;
use mesh_api::prost::Message;
use mesh_api::workload::{Address, address};
use mesh_api::{Identity, NetworkIp, ResourceType};

use super::intern::Interner;
use super::table::{Table, Upserted};
use crate::object::{Kind, Object, ObjectError, ObjectKey};
use crate::translate::pod::{
    NamedPorts, PodFacts, Share, WorkloadContext, pod_facts, uid, workload,
};
use crate::translate::service::{ServiceFacts, selector_matches, service_facts};
use crate::translate::{Labels, MeshConfig, enrollment};

/// Every resource of a type, framed and concatenated in chunks, at a revision:
/// what a client that has nothing is sent. Shared by all clients syncing at
/// that revision, and dropped when the last of them is done.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) revision: u64,
    pub(crate) chunks: Vec<Bytes>,
}

/// One resource that changed, at a revision.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) revision: u64,
    pub(crate) kind: ResourceType,
    pub(crate) name: Arc<str>,
}

/// What node agents ask of a pod, kept for every pod from its creation
/// (workloads need an IP; a pod is asked about at its CNI ADD, before it has
/// one).
#[derive(Debug)]
struct PodMeta {
    service_account: Box<str>,
    /// The node it is scheduled to.
    node: Option<Box<str>>,
    /// Its own `istio.io/dataplane-mode`: enrolled, opted out, or unsaid.
    mode: Option<bool>,
}

/// A namespace's pods, services and selector policies.
#[derive(Debug, Default)]
struct NamespaceState {
    labels: Option<Labels>,
    pods: BTreeMap<Box<str>, PodFacts>,
    pod_meta: BTreeMap<Box<str>, PodMeta>,
    services: BTreeMap<Box<str>, ServiceFacts>,
    /// Selector policies by name.
    selector_policies: BTreeMap<Box<str>, Selector>,
}

/// Everything the store holds.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: MeshConfig,
    pub(crate) revision: u64,
    namespaces: HashMap<Arc<str>, NamespaceState>,
    pub(crate) addresses: Table,
    pub(crate) authorizations: Table,
    shared: Shared,
    log: VecDeque<Change>,
    log_capacity: usize,
    /// Every change after this revision is in the log.
    log_start: u64,
    /// The last snapshot of each type, while some client still uses it.
    snapshots: [Mutex<Weak<Snapshot>>; 2],
}

/// Values pods share.
#[derive(Debug, Default)]
struct Shared {
    names: Interner<str>,
    labels: Interner<Labels>,
    ports: Interner<NamedPorts>,
}

impl Share for Shared {
    fn name(&mut self, name: &str) -> Arc<str> {
        self.names.intern(name, |name| Arc::from(name))
    }

    fn labels(&mut self, labels: &Labels) -> Arc<Labels> {
        self.labels
            .intern(labels, |labels| Arc::new(labels.clone()))
    }

    fn ports(&mut self, ports: Vec<(Box<str>, u32)>) -> Arc<NamedPorts> {
        self.ports
            .intern(ports.as_slice(), |ports| Arc::from(ports))
    }
}

impl Shared {
    /// Lets go of a pod's shared values, forgetting those no other pod uses.
    fn release(&mut self, pod: PodFacts) {
        let mut names = vec![pod.service_account.clone(), pod.workload_name.clone()];
        names.extend(pod.node.clone());
        let labels = pod.labels.clone();
        let ports = pod.named_ports.clone();
        drop(pod);
        // One clone per distinct value, so a count of 2 means: the interner and us.
        names.sort_by_key(|name| Arc::as_ptr(name).cast::<u8>());
        names.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for name in &names {
            self.names.release(name);
        }
        self.labels.release(&labels);
        self.ports.release(&ports);
    }
}

impl State {
    pub(crate) fn new(config: MeshConfig, log_capacity: usize) -> Self {
        Self {
            config,
            revision: 0,
            namespaces: HashMap::new(),
            shared: Shared::default(),
            addresses: Table::new(mesh_api::type_url::ADDRESS),
            authorizations: Table::new(mesh_api::type_url::AUTHORIZATION),
            log: VecDeque::new(),
            log_capacity: log_capacity.max(1),
            log_start: 0,
            snapshots: [Mutex::new(Weak::new()), Mutex::new(Weak::new())],
        }
    }

    /// The snapshot of `kind` at the current revision, in chunks of about
    /// `chunk_bytes`: the cached one if still current, else a new one.
    pub(crate) fn snapshot(&self, kind: ResourceType, chunk_bytes: usize) -> Arc<Snapshot> {
        let slot = &self.snapshots[match kind {
            ResourceType::Address => 0,
            ResourceType::Authorization => 1,
        }];
        let mut cached = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(snapshot) = cached.upgrade()
            && snapshot.revision == self.revision
        {
            return snapshot;
        }
        let mut chunks = Vec::new();
        let mut chunk = BytesMut::new();
        let table = self.table(kind);
        for (name, entry) in table.after(None) {
            if chunk.is_empty() {
                chunk.reserve(chunk_bytes + table.framed_len(name, entry));
            }
            table.frame(name, entry, &mut chunk);
            if chunk.len() >= chunk_bytes {
                chunks.push(chunk.split().freeze());
            }
        }
        if !chunk.is_empty() {
            chunks.push(chunk.freeze());
        }
        let snapshot = Arc::new(Snapshot {
            revision: self.revision,
            chunks,
        });
        *cached = Arc::downgrade(&snapshot);
        snapshot
    }

    pub(crate) fn table(&self, kind: ResourceType) -> &Table {
        match kind {
            ResourceType::Address => &self.addresses,
            ResourceType::Authorization => &self.authorizations,
        }
    }

    /// Changes after `revision`, or `None` if some were dropped from the log
    /// (the caller fell too far behind).
    pub(crate) fn changes_since(&self, revision: u64) -> Option<impl Iterator<Item = &Change>> {
        if revision < self.log_start {
            return None;
        }
        let start = self
            .log
            .partition_point(|change| change.revision <= revision);
        Some(self.log.range(start..))
    }

    /// Starts a batch of changes: they share the next revision.
    pub(crate) fn begin(&mut self) -> Batch<'_> {
        let revision = self.revision + 1;
        Batch {
            state: self,
            revision,
            changed: false,
        }
    }

    /// Whether a workload with `identity` runs on `node`.
    pub(crate) fn has_identity_on_node(&self, node: &str, identity: &Identity) -> bool {
        if identity.trust_domain() != self.config.trust_domain {
            return false;
        }
        // Every pod scheduled to the node, with an IP or not yet: a node
        // proxy asks for a pod's certificate as the pod starts.
        self.namespaces
            .get(identity.namespace())
            .is_some_and(|namespace| {
                namespace.pod_meta.values().any(|pod| {
                    pod.node.as_deref() == Some(node)
                        && *pod.service_account == *identity.service_account()
                })
            })
    }

    /// A pod's service account and whether it is enrolled (its label, else
    /// its namespace's); `None` if the pod or its namespace is unknown.
    pub(crate) fn pod_enrollment(&self, namespace: &str, name: &str) -> Option<(String, bool)> {
        let state = self.namespaces.get(namespace)?;
        let namespace_labels = state.labels.as_ref()?;
        let meta = state.pod_meta.get(name)?;
        let enrolled = meta
            .mode
            .or_else(|| enrollment(Some(namespace_labels)))
            .unwrap_or(false);
        Some((meta.service_account.to_string(), enrolled))
    }

    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let pods = self.namespaces.values().map(|ns| ns.pods.len()).sum();
        let services = self.namespaces.values().map(|ns| ns.services.len()).sum();
        (pods, services, self.authorizations.len())
    }
}

/// Changes applied under one revision.
pub(crate) struct Batch<'a> {
    state: &'a mut State,
    revision: u64,
    changed: bool,
}

impl Batch<'_> {
    /// Ends the batch; the new revision if anything changed.
    pub(crate) fn commit(self) -> Option<u64> {
        if self.changed {
            self.state.revision = self.revision;
            Some(self.revision)
        } else {
            None
        }
    }

    /// Applies (creates or replaces) an object.
    pub(crate) fn apply(&mut self, object: Object) -> Result<(), ObjectError> {
        let key = object.key();
        let error = |(path, message): (String, String)| ObjectError {
            document: None,
            object: key.to_string(),
            path,
            message,
        };
        if key.name.is_empty() {
            return Err(error(("metadata.name".into(), "missing".into())));
        }
        match object {
            Object::Namespace(namespace) => {
                let labels = namespace.metadata.labels.unwrap_or_default();
                let name = self.namespace_name(&key.name);
                let state = self.state.namespaces.entry(name.clone()).or_default();
                if state.labels.as_ref() != Some(&labels) {
                    state.labels = Some(labels);
                    self.refresh_pods(&name, |_| true);
                }
            }
            Object::Pod(pod) => {
                let facts = pod_facts(&pod, &mut self.state.shared).map_err(error)?;
                let namespace = self.namespace_name(&key.namespace);
                let meta = PodMeta {
                    service_account: pod
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.service_account_name.as_deref())
                        .filter(|account| !account.is_empty())
                        .unwrap_or("default")
                        .into(),
                    node: pod
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.node_name.as_deref())
                        .filter(|node| !node.is_empty())
                        .map(Box::from),
                    mode: enrollment(pod.metadata.labels.as_ref()),
                };
                self.state
                    .namespaces
                    .entry(namespace.clone())
                    .or_default()
                    .pod_meta
                    .insert(key.name.as_str().into(), meta);
                self.remove_pod_facts(&namespace, &key.name);
                if let Some(facts) = facts {
                    self.state
                        .namespaces
                        .entry(namespace.clone())
                        .or_default()
                        .pods
                        .insert(key.name.as_str().into(), facts);
                }
                self.refresh_pod(&namespace, &key.name);
            }
            Object::Service(service) => {
                let facts =
                    service_facts(&service, &key.namespace, &self.state.config).map_err(error)?;
                let namespace = self.namespace_name(&key.namespace);
                let old = self
                    .state
                    .namespaces
                    .get_mut(&namespace)
                    .and_then(|ns| ns.services.remove(key.name.as_str()));
                let mut affected = Vec::new();
                if let Some(old) = &old {
                    self.remove_service_resource(old);
                    affected.push(old.selector.clone());
                }
                if let Some(facts) = facts {
                    self.publish_service(&facts);
                    affected.push(facts.selector.clone());
                    self.state
                        .namespaces
                        .entry(namespace.clone())
                        .or_default()
                        .services
                        .insert(key.name.as_str().into(), facts);
                }
                self.refresh_selected(&namespace, &affected);
            }
            Object::AuthorizationPolicy(policy) => {
                let problems = authz::validate(&policy, crate::object::DEFAULT_NAMESPACE);
                if let Some(problem) = problems.into_iter().next() {
                    return Err(error((problem.path, problem.message)));
                }
                let conversion = authz::convert(
                    &policy,
                    &self.state.config.root_namespace,
                    crate::object::DEFAULT_NAMESPACE,
                );
                for warning in &conversion.warnings {
                    tracing::warn!(policy = %key, %warning, "authorization policy");
                }
                let namespace = self.namespace_name(&key.namespace);
                let old_selector = self.remove_policy(&namespace, &key.name);
                let resource_name = format!("{}/{}", key.namespace, key.name);
                match conversion.authorization {
                    Some(authorization) => {
                        self.upsert(
                            ResourceType::Authorization,
                            &resource_name,
                            &authorization.encode_to_vec(),
                            &[],
                        );
                    }
                    None => self.remove(ResourceType::Authorization, &resource_name),
                }
                let new_selector = conversion.selector.filter(|_| {
                    // Only policies that reach data planes are attached to workloads.
                    self.state.authorizations.get(&resource_name).is_some()
                });
                let affected = [old_selector.clone(), new_selector.clone()];
                if let Some(selector) = new_selector {
                    self.state
                        .namespaces
                        .entry(namespace.clone())
                        .or_default()
                        .selector_policies
                        .insert(key.name.as_str().into(), selector);
                }
                self.refresh_policy_targets(&namespace, &affected);
            }
        }
        Ok(())
    }

    /// Deletes an object; whether it was known.
    pub(crate) fn delete(&mut self, key: &ObjectKey) -> bool {
        match key.kind {
            Kind::Namespace => {
                let Some(state) = self.state.namespaces.get_mut(key.name.as_str()) else {
                    return false;
                };
                if state.labels.take().is_none() {
                    return false;
                }
                let name = self.namespace_name(&key.name);
                self.refresh_pods(&name, |_| true);
                true
            }
            Kind::Pod => {
                let namespace = self.namespace_name(&key.namespace);
                let had_meta = self
                    .state
                    .namespaces
                    .get_mut(&namespace)
                    .and_then(|ns| ns.pod_meta.remove(key.name.as_str()))
                    .is_some();
                let known = self.remove_pod_facts(&namespace, &key.name) || had_meta;
                self.refresh_pod(&namespace, &key.name);
                known
            }
            Kind::Service => {
                let namespace = self.namespace_name(&key.namespace);
                let Some(old) = self
                    .state
                    .namespaces
                    .get_mut(&namespace)
                    .and_then(|ns| ns.services.remove(key.name.as_str()))
                else {
                    return false;
                };
                self.remove_service_resource(&old);
                self.refresh_selected(&namespace, &[old.selector]);
                true
            }
            Kind::AuthorizationPolicy => {
                let namespace = self.namespace_name(&key.namespace);
                let resource_name = format!("{}/{}", key.namespace, key.name);
                let published = self.state.authorizations.get(&resource_name).is_some();
                let old_selector = self.remove_policy(&namespace, &key.name);
                self.remove(ResourceType::Authorization, &resource_name);
                self.refresh_policy_targets(&namespace, std::slice::from_ref(&old_selector));
                published || old_selector.is_some()
            }
        }
    }

    fn namespace_name(&mut self, name: &str) -> Arc<str> {
        match self.state.namespaces.get_key_value(name) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = name.into();
                self.state
                    .namespaces
                    .insert(name.clone(), NamespaceState::default());
                name
            }
        }
    }

    fn remove_pod_facts(&mut self, namespace: &Arc<str>, name: &str) -> bool {
        let Some(old) = self
            .state
            .namespaces
            .get_mut(namespace)
            .and_then(|ns| ns.pods.remove(name))
        else {
            return false;
        };
        self.state.shared.release(old);
        true
    }

    fn remove_policy(&mut self, namespace: &Arc<str>, name: &str) -> Option<Selector> {
        self.state
            .namespaces
            .get_mut(namespace)
            .and_then(|ns| ns.selector_policies.remove(name))
    }

    /// Re-publishes the workloads a selector policy did or does select.
    fn refresh_policy_targets(&mut self, namespace: &Arc<str>, selectors: &[Option<Selector>]) {
        let selectors: Vec<&Selector> = selectors.iter().flatten().collect();
        if selectors.is_empty() {
            return;
        }
        let root = selectors.iter().any(|selector| selector.root);
        let namespaces: Vec<Arc<str>> = if root {
            self.state.namespaces.keys().cloned().collect()
        } else {
            vec![namespace.clone()]
        };
        for namespace in namespaces {
            self.refresh_pods(&namespace, |(ns, labels)| {
                selectors
                    .iter()
                    .any(|selector| selector.selects(ns, labels))
            });
        }
    }

    /// Re-publishes the pods of `namespace` a service selector did or does select.
    fn refresh_selected(&mut self, namespace: &Arc<str>, selectors: &[Option<Labels>]) {
        let selectors: Vec<&Labels> = selectors.iter().flatten().collect();
        if selectors.is_empty() {
            return;
        }
        self.refresh_pods(namespace, |(_, labels)| {
            selectors
                .iter()
                .any(|selector| selector_matches(selector, labels))
        });
    }

    /// Re-publishes the pods of `namespace` whose labels pass `filter`.
    fn refresh_pods(&mut self, namespace: &Arc<str>, filter: impl Fn((&str, &Labels)) -> bool) {
        let names: Vec<Box<str>> = match self.state.namespaces.get(namespace) {
            Some(ns) => ns
                .pods
                .iter()
                .filter(|(_, pod)| filter((namespace, &pod.labels)))
                .map(|(name, _)| name.clone())
                .collect(),
            None => return,
        };
        for name in names {
            self.refresh_pod(namespace, &name);
        }
    }

    /// Publishes (or withdraws) one pod's workload.
    fn refresh_pod(&mut self, namespace: &Arc<str>, name: &str) {
        let uid = uid(&self.state.config, namespace, name);
        let state = &*self.state;
        let Some(ns) = state.namespaces.get(namespace) else {
            self.remove(ResourceType::Address, &uid);
            return;
        };
        let Some(pod) = ns.pods.get(name) else {
            self.remove(ResourceType::Address, &uid);
            return;
        };
        let mut policies: Vec<String> = ns
            .selector_policies
            .iter()
            .filter(|(_, selector)| selector.selects(namespace, &pod.labels))
            .map(|(policy, _)| format!("{namespace}/{policy}"))
            .collect();
        let root = &state.config.root_namespace;
        if **namespace != **root
            && let Some(root_ns) = state.namespaces.get(root.as_str())
        {
            policies.extend(
                root_ns
                    .selector_policies
                    .iter()
                    .filter(|(_, selector)| selector.selects(namespace, &pod.labels))
                    .map(|(policy, _)| format!("{root}/{policy}")),
            );
        }
        policies.sort();
        let context = WorkloadContext {
            config: &state.config,
            name,
            namespace,
            namespace_labels: ns.labels.as_ref(),
            services: ns
                .services
                .values()
                .filter(|service| service.selects(&pod.labels))
                .collect(),
            policies,
        };
        let workload = workload(pod, &context);
        let aliases: Vec<String> = pod
            .ips
            .iter()
            .map(|ip| {
                NetworkIp {
                    network: state.config.network.clone(),
                    ip: *ip,
                }
                .to_string()
            })
            .collect();
        let value = Address {
            r#type: Some(address::Type::Workload(workload)),
        }
        .encode_to_vec();
        self.upsert(ResourceType::Address, &uid, &value, &aliases);
    }

    fn publish_service(&mut self, facts: &ServiceFacts) {
        let name = format!("{}/{}", facts.wire.namespace, facts.hostname);
        let aliases: Vec<String> = facts
            .wire
            .addresses
            .iter()
            .filter_map(|address| {
                let ip = mesh_api::names::ip_from_wire(&address.address).ok()?;
                Some(
                    NetworkIp {
                        network: address.network.clone(),
                        ip,
                    }
                    .to_string(),
                )
            })
            .collect();
        let value = Address {
            r#type: Some(address::Type::Service(facts.wire.clone())),
        }
        .encode_to_vec();
        self.upsert(ResourceType::Address, &name, &value, &aliases);
    }

    fn remove_service_resource(&mut self, facts: &ServiceFacts) {
        let name = format!("{}/{}", facts.wire.namespace, facts.hostname);
        self.remove(ResourceType::Address, &name);
    }

    fn table_mut(&mut self, kind: ResourceType) -> &mut Table {
        match kind {
            ResourceType::Address => &mut self.state.addresses,
            ResourceType::Authorization => &mut self.state.authorizations,
        }
    }

    fn upsert(&mut self, kind: ResourceType, name: &str, value: &[u8], aliases: &[String]) {
        let table = self.table_mut(kind);
        if table.upsert(name, value, aliases) == Upserted::Changed {
            let name = table.shared_name(name);
            self.record(kind, name);
        }
    }

    fn remove(&mut self, kind: ResourceType, name: &str) {
        if self.table_mut(kind).remove(name) {
            self.record(kind, name.into());
        }
    }

    fn record(&mut self, kind: ResourceType, name: Arc<str>) {
        self.changed = true;
        let state = &mut *self.state;
        // Make room first, so the log never outgrows its capacity.
        while state.log.len() >= state.log_capacity {
            if let Some(dropped) = state.log.pop_front() {
                state.log_start = state.log_start.max(dropped.revision);
            }
        }
        state.log.push_back(Change {
            revision: self.revision,
            kind,
            name,
        });
    }
}
