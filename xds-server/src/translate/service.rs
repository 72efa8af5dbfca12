//! Kubernetes Services to `istio.workload.Service`.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_api::names::ip_to_wire;
use mesh_api::workload::{
    AppProtocol, IpFamilies, LoadBalancing, NetworkAddress, Port, Service,
    load_balancing::{Mode, Scope},
};

use super::{Labels, MeshConfig};

/// The annotation (and `spec.trafficDistribution` value) asking for traffic to
/// stay close to the client.
const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";
const PREFER_CLOSE: &str = "PreferClose";

/// A service port as workloads need it: the target, by number or name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServicePort {
    pub(crate) port: u32,
    pub(crate) target: Target,
}

/// Where a service port sends traffic on a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A port number.
    Number(u32),
    /// A named container port, resolved per pod.
    Named(Box<str>),
}

/// What workloads need to know about a service, plus its wire form.
#[derive(Debug)]
pub(crate) struct ServiceFacts {
    pub(crate) hostname: Arc<str>,
    /// `None`: the service selects no pods (endpoints managed by hand).
    pub(crate) selector: Option<Labels>,
    pub(crate) ports: Box<[ServicePort]>,
    pub(crate) wire: Service,
}

impl ServiceFacts {
    /// Whether the service selects a pod with `labels` (same namespace assumed).
    pub(crate) fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|selector| selector_matches(selector, labels))
    }
}

/// Whether `labels` carry every label of `selector`.
pub(crate) fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Why a Service could not be translated.
pub(crate) type ServiceError = (String, String);

/// Extracts a service's facts. `Ok(None)` for services the mesh does not carry
/// (`ExternalName`).
pub(crate) fn service_facts(
    service: &KubeService,
    namespace: &str,
    config: &MeshConfig,
) -> Result<Option<ServiceFacts>, ServiceError> {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let Some(spec) = &service.spec else {
        return Err(("spec".into(), "missing".into()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let hostname: Arc<str> = format!("{name}.{namespace}.svc.{}", config.domain).into();

    let mut ports = Vec::new();
    let mut wire_ports = Vec::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        let path = |field: &str| format!("spec.ports[{index}].{field}");
        let service_port = port_number(port.port)
            .ok_or_else(|| (path("port"), format!("{} is not a port number", port.port)))?;
        let target = match &port.target_port {
            None => Target::Number(service_port),
            Some(IntOrString::Int(number)) => {
                Target::Number(port_number(*number).ok_or_else(|| {
                    (path("targetPort"), format!("{number} is not a port number"))
                })?)
            }
            Some(IntOrString::String(text)) => match text.parse::<i32>() {
                Ok(number) => Target::Number(port_number(number).ok_or_else(|| {
                    (path("targetPort"), format!("{number} is not a port number"))
                })?),
                Err(_) if !text.is_empty() => Target::Named(text.as_str().into()),
                Err(_) => return Err((path("targetPort"), "empty name".into())),
            },
        };
        wire_ports.push(Port {
            service_port,
            target_port: match &target {
                Target::Number(number) => *number,
                Target::Named(_) => 0,
            },
            app_protocol: app_protocol(port.app_protocol.as_deref()) as i32,
        });
        ports.push(ServicePort {
            port: service_port,
            target,
        });
    }

    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut vips: Vec<IpAddr> = Vec::new();
    if !headless {
        let cluster_ips = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter());
        let external = spec.external_ips.iter().flatten();
        let load_balancer = service
            .status
            .iter()
            .filter_map(|status| status.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|ingress| ingress.ip.as_ref());
        for (field, text) in cluster_ips
            .map(|ip| ("spec.clusterIPs", ip))
            .chain(external.map(|ip| ("spec.externalIPs", ip)))
            .chain(load_balancer.map(|ip| ("status.loadBalancer.ingress", ip)))
        {
            if text.is_empty() || text == "None" {
                continue;
            }
            let ip: IpAddr = text
                .parse()
                .map_err(|_| (field.to_owned(), format!("{text:?} is not an IP address")))?;
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
    }

    let ip_families = match spec.ip_families.as_deref() {
        Some([one]) if one == "IPv4" => IpFamilies::Ipv4Only,
        Some([one]) if one == "IPv6" => IpFamilies::Ipv6Only,
        Some([_, _]) => IpFamilies::Dual,
        _ => IpFamilies::Automatic,
    };
    let prefer_close = spec.traffic_distribution.as_deref() == Some(PREFER_CLOSE)
        || service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRAFFIC_DISTRIBUTION_ANNOTATION))
            .is_some_and(|value| value == PREFER_CLOSE);
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let load_balancing = (prefer_close || publish_not_ready).then(|| LoadBalancing {
        routing_preference: if prefer_close {
            [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone]
                .map(|scope| scope as i32)
                .to_vec()
        } else {
            Vec::new()
        },
        mode: if prefer_close {
            Mode::Failover as i32
        } else {
            Mode::UnspecifiedMode as i32
        },
        health_policy: if publish_not_ready {
            mesh_api::workload::load_balancing::HealthPolicy::AllowAll as i32
        } else {
            0
        },
        ..LoadBalancing::default()
    });

    let wire = Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: hostname.to_string(),
        addresses: vips
            .iter()
            .map(|ip| NetworkAddress {
                network: config.network.clone(),
                address: ip_to_wire(*ip),
                length: None,
            })
            .collect(),
        ports: wire_ports,
        load_balancing,
        ip_families: ip_families as i32,
        canonical: true,
        ..Service::default()
    };
    Ok(Some(ServiceFacts {
        hostname,
        selector: spec
            .selector
            .clone()
            .filter(|selector| !selector.is_empty()),
        ports: ports.into(),
        wire,
    }))
}

fn port_number(number: i32) -> Option<u32> {
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .map(u32::from)
}

fn app_protocol(declared: Option<&str>) -> AppProtocol {
    match declared.map(str::to_ascii_lowercase).as_deref() {
        Some("http") => AppProtocol::Http11,
        Some("http2" | "kubernetes.io/h2c") => AppProtocol::Http2,
        Some("grpc") => AppProtocol::Grpc,
        Some("tcp") => AppProtocol::Tcp,
        Some("tls" | "https") => AppProtocol::Tls,
        _ => AppProtocol::Unknown,
    }
}
