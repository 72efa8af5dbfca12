//! From Kubernetes objects to the workload API, the way istiod does it for
//! ambient. Pure functions: facts are extracted from objects once
//! ([`pod::PodFacts`], [`service::ServiceFacts`]) and resources are built from
//! facts plus context (the namespace's labels, the services selecting a pod, the
//! policies selecting it).

pub(crate) mod pod;
pub(crate) mod service;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels of a Kubernetes object.
pub(crate) type Labels = BTreeMap<String, String>;

/// The label that enrolls a namespace or a pod in the ambient mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Mesh-wide facts the translation needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct MeshConfig {
    /// The cluster's id (`Kubernetes` by default): part of every pod's uid.
    pub cluster_id: String,
    /// The cluster's DNS domain (`cluster.local`): services are
    /// `<name>.<ns>.svc.<domain>`.
    pub domain: String,
    /// The trust domain of workload identities (`cluster.local`).
    pub trust_domain: String,
    /// Policies in this namespace apply mesh-wide (`istio-system`).
    pub root_namespace: String,
    /// The network of pods and services; empty for the default network.
    pub network: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".into(),
            domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: authz::DEFAULT_ROOT_NAMESPACE.into(),
            network: String::new(),
        }
    }
}

impl MeshConfig {
    /// The trust domain as sent in workloads: empty for `cluster.local`, which
    /// data planes assume (as istiod does).
    pub(crate) fn wire_trust_domain(&self) -> &str {
        if self.trust_domain == "cluster.local" {
            ""
        } else {
            &self.trust_domain
        }
    }
}

/// Whether labels enroll in the mesh (`Some(true)`), opt out (`Some(false)`) or
/// say nothing.
pub(crate) fn enrollment(labels: Option<&Labels>) -> Option<bool> {
    match labels?.get(DATAPLANE_MODE_LABEL)?.as_str() {
        "ambient" => Some(true),
        "none" => Some(false),
        _ => None,
    }
}
