//! Pods from an `xds_server::Store` (feature `xds-store`): enrollment exactly
//! as the control plane decides it, for every way the store is fed, in
//! memory (`Store::apply`), from a watched manifest directory
//! (`xds_server::ManifestDir`) or from a Kubernetes API server (feature
//! `kube`: `xds_server::KubeWatcher`). A pod is known from its creation,
//! before it has an IP.

use tokio::sync::watch;
use xds_server::Store;

use super::pods::{PodInfo, PodSource};

/// The pods of a control plane's store.
#[derive(Clone, Debug)]
pub struct StorePods {
    store: Store,
}

impl StorePods {
    /// The pods of `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl PodSource for StorePods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let pod = self.store.pod_enrollment(namespace, name)?;
        Some(PodInfo::new(
            namespace,
            name,
            pod.service_account,
            pod.enrolled,
        ))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.store.object_changes()
    }
}
