//! Where the node agent learns which pods are enrolled: a [`PodSource`],
//! answering as the control plane sees the pods (`istio.io/dataplane-mode`
//! on the pod, else on its namespace: `ambient` enrolls, `none` opts out)
//! and signalling every change, so running pods are enrolled and released
//! live.
//!
//! [`MemoryPods`] is filled by the embedder (a k3s fork's informers, tests);
//! with the `xds-store` feature, `StorePods` reads a control plane's
//! `xds_server::Store`, fed in memory, by a manifest directory or (feature
//! `kube`) by Kubernetes.
//! A pod is asked about at its CNI ADD, before it has an IP: a source must
//! know pods from their creation, not only once they are workloads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The label that enrolls a namespace or pod (`ambient`) or opts a pod out
/// (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// What the agent needs to know of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PodInfo {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its service account (its identity's last part).
    pub service_account: String,
    /// Whether it is in the mesh.
    pub enrolled: bool,
}

impl PodInfo {
    /// A pod's facts.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        service_account: impl Into<String>,
        enrolled: bool,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            enrolled,
        }
    }
}

/// Pods as the control plane sees them.
pub trait PodSource: Send + Sync + std::fmt::Debug + 'static {
    /// The pod `namespace/name` now, or `None` if the source cannot answer
    /// (yet): the pod, or its namespace, is unknown. `None` never changes a
    /// running pod's capture, and makes its ADD "try again later".
    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo>;

    /// A receiver whose value changes whenever any pod's answer may have
    /// changed.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Whether a pod with `pod_labels` in a namespace with `namespace_labels` is
/// enrolled: the pod's label decides, else the namespace's; `none` on the
/// pod opts it out of an enrolled namespace.
pub fn enrolled(pod_labels: &Labels, namespace_labels: Option<&Labels>) -> bool {
    fn mode(labels: &Labels) -> Option<bool> {
        match labels.get(DATAPLANE_MODE_LABEL)?.as_str() {
            "ambient" => Some(true),
            "none" => Some(false),
            _ => None,
        }
    }
    mode(pod_labels)
        .or_else(|| namespace_labels.and_then(mode))
        .unwrap_or(false)
}

/// Pods and namespaces held in memory, set by the embedder. Cheap to clone;
/// clones share the pods.
#[derive(Clone, Debug)]
pub struct MemoryPods {
    inner: Arc<Mutex<Memory>>,
    changes: Arc<watch::Sender<u64>>,
}

#[derive(Debug, Default)]
struct Memory {
    namespaces: HashMap<String, Labels>,
    pods: HashMap<(String, String), (String, Labels)>,
}

impl Default for MemoryPods {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPods {
    /// No pods, no namespaces.
    pub fn new() -> Self {
        Self {
            inner: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Creates or replaces a namespace's labels.
    pub fn set_namespace(&self, name: &str, labels: Labels) {
        self.change(|memory| {
            memory.namespaces.insert(name.to_owned(), labels);
        });
    }

    /// Creates or replaces a pod.
    pub fn set_pod(&self, namespace: &str, name: &str, service_account: &str, labels: Labels) {
        self.change(|memory| {
            memory.pods.insert(
                (namespace.to_owned(), name.to_owned()),
                (service_account.to_owned(), labels),
            );
        });
    }

    /// Removes a pod.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.change(|memory| {
            memory.pods.remove(&(namespace.to_owned(), name.to_owned()));
        });
    }

    fn change(&self, apply: impl FnOnce(&mut Memory)) {
        apply(
            &mut self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.changes.send_modify(|revision| *revision += 1);
    }
}

impl PodSource for MemoryPods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let memory = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (service_account, labels) =
            memory.pods.get(&(namespace.to_owned(), name.to_owned()))?;
        // Without its namespace a pod cannot be judged (its label may be
        // the namespace's).
        let namespace_labels = memory.namespaces.get(namespace)?;
        Some(PodInfo::new(
            namespace,
            name,
            service_account,
            enrolled(labels, Some(namespace_labels)),
        ))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Labels from `key=value` pairs.
pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_label_decides_else_the_namespace() {
        let ambient = labels([(DATAPLANE_MODE_LABEL, "ambient")]);
        let none = labels([(DATAPLANE_MODE_LABEL, "none")]);
        let plain = labels([("app", "echo")]);
        assert!(enrolled(&plain, Some(&ambient)));
        assert!(!enrolled(&none, Some(&ambient)));
        assert!(enrolled(&ambient, None));
        assert!(!enrolled(&plain, Some(&plain)));
        assert!(!enrolled(&plain, None));
    }

    #[test]
    fn memory_pods_answer_and_signal_changes() {
        let pods = MemoryPods::new();
        let mut changes = pods.changes();
        assert_eq!(pods.pod("default", "shell"), None);
        pods.set_namespace("default", labels([(DATAPLANE_MODE_LABEL, "ambient")]));
        pods.set_pod("default", "shell", "shell", Labels::new());
        assert!(changes.has_changed().expect("open"));
        changes.mark_unchanged();
        assert_eq!(
            pods.pod("default", "shell"),
            Some(PodInfo::new("default", "shell", "shell", true))
        );
        pods.set_pod(
            "default",
            "shell",
            "shell",
            labels([(DATAPLANE_MODE_LABEL, "none")]),
        );
        assert!(changes.has_changed().expect("open"));
        assert!(!pods.pod("default", "shell").expect("known").enrolled);
        pods.remove_pod("default", "shell");
        assert_eq!(pods.pod("default", "shell"), None);
    }
}
