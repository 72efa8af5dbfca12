//! The versioned resource store: Kubernetes objects in, workload-API resources
//! out, with a revision that data-plane streams watch.
//!
//! Every write ([`Store::apply`], [`Store::delete`], a [`Store::batch`]) updates
//! the facts it concerns, recomputes exactly the resources those facts feed
//! (a pod's workload; a service's and the workloads it selects; a policy's and
//! the workloads it selects; a namespace's workloads), and publishes the ones
//! whose encoding changed under a new revision. Resources are encoded once, when
//! they change; a version is a hash of the encoding.

mod intern;
mod state;
pub(crate) mod table;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use mesh_api::Identity;
use tokio::sync::watch;

pub(crate) use state::{Snapshot, State};

use crate::object::{Object, ObjectError, ObjectKey};
use crate::translate::MeshConfig;

/// How many resource changes the store remembers for streams catching up. A
/// stream further behind is asked to reconnect (and then resyncs by versions).
pub const DEFAULT_CHANGE_LOG_CAPACITY: usize = 1 << 16;

/// The store. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    revision: watch::Sender<u64>,
    /// Counts batches: every change of objects, whether it changed a
    /// resource or not (a pod without an IP yet, say).
    objects: watch::Sender<u64>,
}

/// A pod as a node agent asks about it (see [`Store::pod_enrollment`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PodEnrollment {
    /// Its service account.
    pub service_account: String,
    /// Whether it is in the mesh: its `istio.io/dataplane-mode` label,
    /// else its namespace's (`ambient` enrolls, `none` opts out).
    pub enrolled: bool,
}

/// How many objects and resources the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// The current revision (0 before the first change).
    pub revision: u64,
    /// Pods that are workloads.
    pub workloads: usize,
    /// Services.
    pub services: usize,
    /// Published `Address` resources (workloads and services).
    pub addresses: usize,
    /// Published `Authorization` resources.
    pub authorizations: usize,
}

impl Store {
    /// An empty store.
    pub fn new(config: MeshConfig) -> Self {
        Self::with_change_log(config, DEFAULT_CHANGE_LOG_CAPACITY)
    }

    /// An empty store remembering `capacity` changes for streams catching up.
    pub fn with_change_log(config: MeshConfig, capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State::new(config, capacity)),
                revision: watch::Sender::new(0),
                objects: watch::Sender::new(0),
            }),
        }
    }

    /// The mesh configuration the store translates with.
    pub fn config(&self) -> MeshConfig {
        self.read().config.clone()
    }

    /// Creates or replaces an object. On error nothing changed.
    pub fn apply(&self, object: Object) -> Result<(), ObjectError> {
        let mut result = Ok(());
        self.batch(|batch| result = batch.apply(object));
        result
    }

    /// Deletes an object; whether it was known.
    pub fn delete(&self, key: &ObjectKey) -> bool {
        let mut known = false;
        self.batch(|batch| known = batch.delete(key));
        known
    }

    /// Applies several changes under one revision: streams see them together.
    pub fn batch(&self, changes: impl FnOnce(&mut Batch<'_>)) {
        let committed = {
            let mut state = self.write();
            let mut batch = Batch {
                inner: state.begin(),
            };
            changes(&mut batch);
            batch.inner.commit()
        };
        if let Some(revision) = committed {
            self.shared.revision.send_replace(revision);
        }
        self.shared.objects.send_modify(|count| *count += 1);
    }

    /// A pod as a node agent asks about it, from its creation (with or
    /// without an IP): its service account and whether it is enrolled, the
    /// same rule that gives its workload HBONE. `None` if the pod, or its
    /// namespace, is not known (yet).
    pub fn pod_enrollment(&self, namespace: &str, name: &str) -> Option<PodEnrollment> {
        self.read()
            .pod_enrollment(namespace, name)
            .map(|(service_account, enrolled)| PodEnrollment {
                service_account,
                enrolled,
            })
    }

    /// A receiver whose value changes with every change of the store's
    /// objects (each [`Store::apply`], [`Store::delete`], [`Store::batch`]).
    pub fn object_changes(&self) -> watch::Receiver<u64> {
        self.shared.objects.subscribe()
    }

    /// Counts of what the store holds.
    pub fn stats(&self) -> StoreStats {
        let state = self.read();
        let (workloads, services, _) = state.counts();
        StoreStats {
            revision: state.revision,
            workloads,
            services,
            addresses: state.addresses.len(),
            authorizations: state.authorizations.len(),
        }
    }

    /// Whether a workload with `identity` runs on `node` (for impersonation
    /// checks by the CA).
    pub fn has_identity_on_node(&self, node: &str, identity: &Identity) -> bool {
        self.read().has_identity_on_node(node, identity)
    }

    /// The version clients are sent for a resource, if it is published.
    pub fn resource_version(&self, kind: mesh_api::ResourceType, name: &str) -> Option<String> {
        self.read().table(kind).get(name).map(table::Entry::version)
    }

    /// Every published resource of a type, by name, with its version: what a
    /// wildcard client holds once synced.
    pub fn versions(
        &self,
        kind: mesh_api::ResourceType,
    ) -> std::collections::BTreeMap<String, String> {
        self.read()
            .table(kind)
            .after(None)
            .map(|(name, entry)| (name.to_string(), entry.version()))
            .collect()
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.shared
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver of the store's revision, which changes with every commit.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }
}

/// Changes applied together (see [`Store::batch`]).
pub struct Batch<'a> {
    inner: state::Batch<'a>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// Creates or replaces an object. On error the object is left as it was.
    pub fn apply(&mut self, object: Object) -> Result<(), ObjectError> {
        self.inner.apply(object)
    }

    /// Deletes an object; whether it was known.
    pub fn delete(&mut self, key: &ObjectKey) -> bool {
        self.inner.delete(key)
    }
}
