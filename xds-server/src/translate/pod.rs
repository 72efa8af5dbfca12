//! Kubernetes Pods to `istio.workload.Workload`.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use mesh_api::names::ip_to_wire;
use mesh_api::workload::{
    NetworkMode, Port, PortList, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};

use super::service::{ServiceFacts, Target};
use super::{Labels, MeshConfig, enrollment};

/// What a workload is built from: the parts of a pod that matter, kept instead
/// of the pod (a fraction of its size).
#[derive(Debug)]
pub(crate) struct PodFacts {
    pub(crate) labels: Arc<Labels>,
    pub(crate) service_account: Arc<str>,
    pub(crate) node: Option<Arc<str>>,
    pub(crate) ips: PodIps,
    pub(crate) healthy: bool,
    pub(crate) host_network: bool,
    /// Named TCP container ports, for services' named target ports.
    pub(crate) named_ports: Arc<NamedPorts>,
    /// The owning controller's name (a Deployment's, a Job's) or the pod's.
    pub(crate) workload_name: Arc<str>,
}

/// A pod's named TCP container ports.
pub(crate) type NamedPorts = [(Box<str>, u32)];

/// A pod's IPs: almost always one, kept inline.
#[derive(Debug)]
pub(crate) enum PodIps {
    One(IpAddr),
    Several(Box<[IpAddr]>),
}

impl PodIps {
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, IpAddr> {
        match self {
            Self::One(ip) => std::slice::from_ref(ip).iter(),
            Self::Several(ips) => ips.iter(),
        }
    }
}

/// Where a pod's facts get shared copies of values many pods have in common.
pub(crate) trait Share {
    /// A shared copy of a name (service account, workload name, node).
    fn name(&mut self, name: &str) -> Arc<str>;
    /// A shared copy of a label set.
    fn labels(&mut self, labels: &Labels) -> Arc<Labels>;
    /// A shared copy of a named-port list.
    fn ports(&mut self, ports: Vec<(Box<str>, u32)>) -> Arc<NamedPorts>;
}

impl PodFacts {
    /// The container port a service port targets on this pod.
    pub(crate) fn resolve_port(&self, target: &Target) -> Option<u32> {
        match target {
            Target::Number(number) => Some(*number),
            Target::Named(name) => self
                .named_ports
                .iter()
                .find(|(port_name, _)| port_name == name)
                .map(|(_, number)| *number),
        }
    }
}

/// Why a Pod could not be translated: the field and what was wrong.
pub(crate) type PodError = (String, String);

/// Extracts a pod's facts. `Ok(None)` for pods that are no workload (yet or any
/// more): without an IP, or finished (`Succeeded`, `Failed`).
pub(crate) fn pod_facts(pod: &Pod, share: &mut dyn Share) -> Result<Option<PodFacts>, PodError> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.into_iter().flat_map(|s| {
        s.pod_ips
            .iter()
            .flatten()
            .map(|ip| ("status.podIPs", &ip.ip))
    });
    let single = status
        .and_then(|s| s.pod_ip.as_ref())
        .map(|ip| ("status.podIP", ip));
    for (field, text) in listed.chain(single) {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| (field.to_owned(), format!("{text:?} is not an IP address")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }
    let spec = pod.spec.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|ready| ready.status == "True");
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let named_ports: Vec<(Box<str>, u32)> = spec
        .into_iter()
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|container| container.ports.iter().flatten())
        .filter(|port| port.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|port| {
            let name = port.name.as_deref().filter(|n| !n.is_empty())?;
            let number = u16::try_from(port.container_port).ok()?;
            Some((Box::from(name), u32::from(number)))
        })
        .collect();
    Ok(Some(PodFacts {
        labels: share.labels(pod.metadata.labels.as_ref().unwrap_or(&Labels::new())),
        service_account: share.name(
            spec.and_then(|s| s.service_account_name.as_deref())
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default"),
        ),
        node: spec
            .and_then(|s| s.node_name.as_deref())
            .filter(|node| !node.is_empty())
            .map(|node| share.name(node)),
        ips: match ips.as_slice() {
            [ip] => PodIps::One(*ip),
            _ => PodIps::Several(ips.into()),
        },
        healthy: ready && !terminating,
        host_network: spec.and_then(|s| s.host_network) == Some(true),
        named_ports: share.ports(named_ports),
        workload_name: share.name(workload_name(pod, name)),
    }))
}

/// The workload a pod belongs to, as istiod names it: a Deployment's name for
/// pods of a ReplicaSet it created, otherwise the controller's, otherwise the pod's.
fn workload_name<'a>(pod: &'a Pod, pod_name: &'a str) -> &'a str {
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
    else {
        return pod_name;
    };
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get("pod-template-hash"));
    match (owner.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|name| name.strip_suffix('-'))
            .unwrap_or(&owner.name),
        _ => &owner.name,
    }
}

/// The pod's resource name: `<cluster>//Pod/<ns>/<name>`.
pub(crate) fn uid(config: &MeshConfig, namespace: &str, name: &str) -> String {
    format!("{}//Pod/{namespace}/{name}", config.cluster_id)
}

/// What a workload needs beyond its pod.
pub(crate) struct WorkloadContext<'a> {
    pub(crate) config: &'a MeshConfig,
    /// The pod's name.
    pub(crate) name: &'a str,
    pub(crate) namespace: &'a str,
    pub(crate) namespace_labels: Option<&'a Labels>,
    /// Services of the pod's namespace that select it.
    pub(crate) services: Vec<&'a ServiceFacts>,
    /// Selector policies (`ns/name`) that apply to it, sorted.
    pub(crate) policies: Vec<String>,
}

/// Builds a pod's workload.
pub(crate) fn workload(pod: &PodFacts, context: &WorkloadContext<'_>) -> Workload {
    let config = context.config;
    let ambient = enrollment(Some(&pod.labels))
        .or_else(|| enrollment(context.namespace_labels))
        .unwrap_or(false);
    let label = |keys: &[&str]| keys.iter().find_map(|key| pod.labels.get(*key).cloned());
    let services = context
        .services
        .iter()
        .map(|service| {
            let ports = service
                .ports
                .iter()
                .filter_map(|port| {
                    Some(Port {
                        service_port: port.port,
                        target_port: pod.resolve_port(&port.target)?,
                        app_protocol: 0,
                    })
                })
                .collect();
            (
                format!("{}/{}", context.namespace, service.hostname),
                PortList { ports },
            )
        })
        .collect();
    Workload {
        uid: uid(config, context.namespace, context.name),
        name: context.name.to_owned(),
        namespace: context.namespace.to_owned(),
        addresses: pod.ips.iter().map(|ip| ip_to_wire(*ip)).collect(),
        network: config.network.clone(),
        tunnel_protocol: if ambient {
            TunnelProtocol::Hbone as i32
        } else {
            TunnelProtocol::None as i32
        },
        trust_domain: config.wire_trust_domain().to_owned(),
        service_account: pod.service_account.to_string(),
        node: pod.node.as_deref().unwrap_or_default().to_owned(),
        canonical_name: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| pod.workload_name.to_string()),
        canonical_revision: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned()),
        workload_type: WorkloadType::Pod as i32,
        workload_name: pod.workload_name.to_string(),
        services,
        authorization_policies: context.policies.clone(),
        status: if pod.healthy {
            WorkloadStatus::Healthy as i32
        } else {
            WorkloadStatus::Unhealthy as i32
        },
        cluster_id: config.cluster_id.clone(),
        network_mode: if pod.host_network {
            NetworkMode::HostNetwork as i32
        } else {
            NetworkMode::Standard as i32
        },
        ..Workload::default()
    }
}
