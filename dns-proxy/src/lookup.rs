//! What the proxy needs to know about the mesh: services by hostname, and the
//! namespace of the client asking. [`MeshDns`] is the trait; [`InMemoryMeshDns`]
//! is a thread-safe implementation an embedding binary (or the data plane's
//! state) keeps up to date.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A service as DNS sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// Namespace of the service.
    pub namespace: String,
    /// Hostname, lowercase without a trailing dot, e.g. `echo.default.svc.cluster.local`
    /// or an external host such as `api.example.com`.
    pub hostname: String,
    /// Virtual IPs; empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// Endpoint IPs, answered for a headless service.
    pub endpoints: Vec<IpAddr>,
    /// Preferred over services of other namespaces when the client's namespace
    /// has none with this hostname.
    pub canonical: bool,
}

impl ServiceRecord {
    /// The addresses to answer with: the VIPs, or the endpoints if headless.
    pub fn addresses(&self) -> &[IpAddr] {
        if self.vips.is_empty() {
            &self.endpoints
        } else {
            &self.vips
        }
    }
}

/// The services sharing one hostname, shared without copying.
pub type Services = Arc<[Arc<ServiceRecord>]>;

/// Mesh state for DNS. Implementations must be cheap to query: every DNS
/// question calls them, so they hand out shared data rather than copies.
pub trait MeshDns: Send + Sync + 'static {
    /// Every service with this hostname (lowercase, no trailing dot).
    fn services(&self, hostname: &str) -> Option<Services>;

    /// The namespace of the workload at `client`, if it is known.
    fn client_namespace(&self, client: IpAddr) -> Option<Arc<str>>;

    /// A number that grows whenever an answer could change (any service or
    /// client namespace). With one, the proxy reuses encoded answers until it
    /// moves; `None` (the default) means answers are worked out every time.
    fn generation(&self) -> Option<u64> {
        None
    }
}

#[derive(Debug, Default)]
struct State {
    by_hostname: HashMap<String, Services>,
    namespaces: HashMap<IpAddr, Arc<str>>,
}

/// Mesh state held in memory, updated service by service.
#[derive(Debug, Default, Clone)]
pub struct InMemoryMeshDns {
    state: Arc<RwLock<State>>,
    /// Moved on by every change, under the write lock, after the change.
    generation: Arc<AtomicU64>,
}

impl InMemoryMeshDns {
    /// Empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the service with this namespace and hostname.
    pub fn upsert_service(&self, mut service: ServiceRecord) {
        service.hostname = normalize(&service.hostname);
        let mut state = self.write();
        let hostname = service.hostname.clone();
        let mut entries: Vec<Arc<ServiceRecord>> = state
            .by_hostname
            .get(&hostname)
            .map(|existing| {
                existing
                    .iter()
                    .filter(|e| e.namespace != service.namespace)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        entries.push(Arc::new(service));
        state.by_hostname.insert(hostname, entries.into());
        self.changed();
    }

    /// Removes a service; `false` if it was not there.
    pub fn remove_service(&self, namespace: &str, hostname: &str) -> bool {
        let hostname = normalize(hostname);
        let mut state = self.write();
        let Some(existing) = state.by_hostname.get(&hostname) else {
            return false;
        };
        let remaining: Vec<Arc<ServiceRecord>> = existing
            .iter()
            .filter(|e| e.namespace != namespace)
            .cloned()
            .collect();
        let removed = remaining.len() != existing.len();
        if remaining.is_empty() {
            state.by_hostname.remove(&hostname);
        } else {
            state.by_hostname.insert(hostname, remaining.into());
        }
        if removed {
            self.changed();
        }
        removed
    }

    /// Records that the workload at `ip` is in `namespace` (`None` forgets it).
    pub fn set_client_namespace(&self, ip: IpAddr, namespace: Option<String>) {
        let mut state = self.write();
        match namespace {
            Some(namespace) => state.namespaces.insert(ip.to_canonical(), namespace.into()),
            None => state.namespaces.remove(&ip.to_canonical()),
        };
        self.changed();
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Lowercase, without a trailing dot.
pub(crate) fn normalize(hostname: &str) -> String {
    hostname.trim_end_matches('.').to_ascii_lowercase()
}

impl MeshDns for InMemoryMeshDns {
    fn services(&self, hostname: &str) -> Option<Services> {
        self.read().by_hostname.get(hostname).cloned()
    }

    fn client_namespace(&self, client: IpAddr) -> Option<Arc<str>> {
        self.read().namespaces.get(&client.to_canonical()).cloned()
    }

    fn generation(&self) -> Option<u64> {
        Some(self.generation.load(Ordering::Acquire))
    }
}
