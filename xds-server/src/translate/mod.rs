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

/// Mesh-wide facts the translation needs, given to
/// [`Store::new`](crate::Store::new).
///
/// As configuration ([`mesh_net::config`]; the `mesh` of a
/// [`ControlPlaneConfig`](crate::ControlPlaneConfig)): camelCase names,
/// every field optional, unknown fields refused.
///
/// ```yaml
/// clusterId: Kubernetes
/// domain: cluster.local
/// trustDomain: cluster.local
/// rootNamespace: istio-system
/// network: ""
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct MeshConfig {
    /// `clusterId`: the cluster's id (default `Kubernetes`): part of every
    /// pod's uid.
    pub cluster_id: String,
    /// `domain`: the cluster's DNS domain (default `cluster.local`): services
    /// are `<name>.<ns>.svc.<domain>`.
    pub domain: String,
    /// `trustDomain`: the trust domain of workload identities (default
    /// `cluster.local`).
    pub trust_domain: String,
    /// `rootNamespace`: policies in this namespace apply mesh-wide (default
    /// `istio-system`).
    pub root_namespace: String,
    /// `network`: the network of pods and services (default empty: the
    /// default network).
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
