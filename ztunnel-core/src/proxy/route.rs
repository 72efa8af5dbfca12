//! Where an outbound connection goes (sans-IO): a service VIP is balanced to
//! one of its endpoints, a workload IP is that workload, anything else leaves
//! the mesh as plain TCP.
//!
//! Endpoint selection follows the service's `load_balancing`: only healthy
//! endpoints unless the health policy allows all; with routing preferences,
//! STRICT keeps only endpoints sharing every listed scope with the client, and
//! FAILOVER keeps those sharing the longest prefix of the listed scopes; then a
//! random pick weighted by each endpoint's capacity (1 when unset). The target
//! port is the endpoint's own mapping of the service port (named ports differ
//! per pod), else the service's target port.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_api::Identity;
use mesh_api::names::ip_from_wire;
use mesh_api::workload::load_balancing::{HealthPolicy, Mode, Scope};
use mesh_api::workload::{Service, TunnelProtocol, Workload, WorkloadStatus};

use crate::state::ProxyState;

/// A mesh workload to connect to.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The workload chosen.
    pub workload: Arc<Workload>,
    /// Its address and target port.
    pub address: SocketAddr,
    /// Its identity (what its HBONE server must present).
    pub identity: Option<Identity>,
    /// Whether it takes HBONE (else plain TCP).
    pub hbone: bool,
    /// The service it was reached through, if any.
    pub service: Option<Arc<Service>>,
}

/// The outcome of routing.
#[derive(Clone, Debug)]
pub enum Route {
    /// A mesh workload.
    Mesh(Upstream),
    /// Outside the mesh: plain TCP to the original destination.
    Passthrough(SocketAddr),
}

/// Why no destination could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The service does not expose the port.
    #[error("service {service} has no port {port}")]
    UnknownPort {
        /// `namespace/hostname`.
        service: String,
        /// The port asked for.
        port: u16,
    },
    /// No endpoint qualifies.
    #[error("service {service} has no usable endpoint for port {port}")]
    NoEndpoint {
        /// `namespace/hostname`.
        service: String,
        /// The port asked for.
        port: u16,
    },
}

/// Routes a connection from `source` (the proxied workload; `None` for a
/// caller outside the mesh) to `destination`, on `network`. `random(n)`
/// returns a number below `n`.
pub fn route(
    state: &ProxyState,
    source: Option<&Workload>,
    network: &str,
    destination: SocketAddr,
    random: &mut impl FnMut(u64) -> u64,
) -> Result<Route, RouteError> {
    if let Some(service) = state.service_by_vip(network, destination.ip()) {
        return balance(state, service, source, destination.port(), random).map(Route::Mesh);
    }
    if let Some(workload) = state.workload_by_ip(network, destination.ip()) {
        return Ok(Route::Mesh(upstream(
            workload,
            destination.ip(),
            destination.port(),
            None,
        )));
    }
    Ok(Route::Passthrough(destination))
}

fn upstream(
    workload: &Arc<Workload>,
    ip: IpAddr,
    port: u16,
    service: Option<&Arc<Service>>,
) -> Upstream {
    Upstream {
        workload: workload.clone(),
        address: SocketAddr::new(ip, port),
        identity: workload_identity(workload),
        hbone: workload.tunnel_protocol == TunnelProtocol::Hbone as i32,
        service: service.cloned(),
    }
}

/// A workload's first address that decodes.
pub fn first_ip(workload: &Workload) -> Option<IpAddr> {
    workload
        .addresses
        .iter()
        .find_map(|bytes| ip_from_wire(bytes).ok())
}

/// A workload's SPIFFE identity, if its parts make one.
pub fn workload_identity(workload: &Workload) -> Option<Identity> {
    let trust_domain = if workload.trust_domain.is_empty() {
        "cluster.local"
    } else {
        &workload.trust_domain
    };
    let service_account = if workload.service_account.is_empty() {
        "default"
    } else {
        &workload.service_account
    };
    Identity::new(trust_domain, &workload.namespace, service_account).ok()
}

fn balance(
    state: &ProxyState,
    service: &Arc<Service>,
    source: Option<&Workload>,
    port: u16,
    random: &mut impl FnMut(u64) -> u64,
) -> Result<Upstream, RouteError> {
    let key = format!("{}/{}", service.namespace, service.hostname);
    let Some(service_port) = service
        .ports
        .iter()
        .find(|p| p.service_port == u32::from(port))
    else {
        return Err(RouteError::UnknownPort { service: key, port });
    };
    let policy = service.load_balancing.as_ref();
    let allow_unhealthy =
        policy.is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll as i32);
    let scopes: Vec<Scope> = policy
        .map(|lb| {
            lb.routing_preference
                .iter()
                .filter_map(|scope| Scope::try_from(*scope).ok())
                .collect()
        })
        .unwrap_or_default();
    let mode = policy
        .and_then(|lb| Mode::try_from(lb.mode).ok())
        .unwrap_or(Mode::UnspecifiedMode);

    // (endpoint, its target port, how many leading scopes it shares)
    let mut candidates: Vec<(&Arc<Workload>, u16, usize)> = Vec::new();
    for endpoint in state.endpoints(&key) {
        if !allow_unhealthy && endpoint.status != WorkloadStatus::Healthy as i32 {
            continue;
        }
        let target = endpoint
            .services
            .get(&key)
            .and_then(|ports| {
                ports
                    .ports
                    .iter()
                    .find(|p| p.service_port == service_port.service_port)
            })
            .map_or(service_port.target_port, |p| p.target_port);
        let Ok(target) = u16::try_from(target) else {
            continue;
        };
        if target == 0 {
            continue;
        }
        let shared = source.map_or(0, |source| shared_scopes(&scopes, source, endpoint));
        if mode == Mode::Strict && shared < scopes.len() {
            continue;
        }
        candidates.push((endpoint, target, shared));
    }
    if mode == Mode::Failover
        && let Some(best) = candidates.iter().map(|c| c.2).max()
    {
        candidates.retain(|c| c.2 == best);
    }
    let weight = |endpoint: &Workload| u64::from(endpoint.capacity.unwrap_or(1));
    let total: u64 = candidates.iter().map(|c| weight(c.0)).sum();
    if total == 0 {
        return Err(RouteError::NoEndpoint { service: key, port });
    }
    let mut pick = random(total);
    for (endpoint, target, _) in &candidates {
        let w = weight(endpoint);
        if pick < w {
            let Some(ip) = first_ip(endpoint) else {
                break;
            };
            return Ok(upstream(endpoint, ip, *target, Some(service)));
        }
        pick -= w;
    }
    Err(RouteError::NoEndpoint { service: key, port })
}

/// How many of `scopes`, in order, `a` and `b` share.
fn shared_scopes(scopes: &[Scope], a: &Workload, b: &Workload) -> usize {
    let locality = |w: &Workload| w.locality.clone().unwrap_or_default();
    let (la, lb) = (locality(a), locality(b));
    scopes
        .iter()
        .take_while(|scope| match scope {
            Scope::Region => la.region == lb.region,
            Scope::Zone => la.zone == lb.zone,
            Scope::Subzone => la.subzone == lb.subzone,
            Scope::Node => a.node == b.node,
            Scope::Cluster => a.cluster_id == b.cluster_id,
            Scope::Network => a.network == b.network,
            Scope::UnspecifiedScope => true,
        })
        .count()
}

#[cfg(test)]
mod tests;
