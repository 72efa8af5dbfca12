//! What the data plane knows of the mesh: workloads by uid and by address,
//! services by name and by VIP, and the authorization policies (an `authz`
//! engine), kept up to date from xDS.
//!
//! Updates are validated before anything changes: a resource that does not
//! decode, or that is not what its name says, is refused with a reason (the xDS
//! client NACKs it) and the previous state stays: last known good.

mod shared;

pub use shared::SharedState;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use authz::Engine;
use mesh_api::names::ip_from_wire;
use mesh_api::security::Authorization;
use mesh_api::workload::{Address, Service, Workload, address};
use mesh_api::{NetworkIp, ResourceType};

/// A resource that was refused, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct Rejected {
    /// The resource name.
    pub name: String,
    /// What was wrong.
    pub reason: String,
}

/// Resource names by network and IP, looked up without allocating (every
/// connection asks).
#[derive(Debug, Default)]
struct AddressIndex {
    by_network: HashMap<String, HashMap<IpAddr, String>>,
}

impl AddressIndex {
    fn get(&self, network: &str, ip: IpAddr) -> Option<&String> {
        self.by_network.get(network)?.get(&ip)
    }

    fn insert(&mut self, network: &str, ip: IpAddr, name: &str) {
        self.by_network
            .entry(network.to_owned())
            .or_default()
            .insert(ip, name.to_owned());
    }

    /// Removes the entry of `network`/`ip` if it still names `name`.
    fn remove(&mut self, network: &str, ip: IpAddr, name: &str) {
        if let Some(ips) = self.by_network.get_mut(network)
            && ips.get(&ip).map(String::as_str) == Some(name)
        {
            ips.remove(&ip);
            if ips.is_empty() {
                self.by_network.remove(network);
            }
        }
    }
}

/// The mesh as this data plane knows it.
#[derive(Debug, Default)]
pub struct ProxyState {
    workloads: HashMap<String, Arc<Workload>>,
    workloads_by_ip: AddressIndex,
    services: HashMap<String, Arc<Service>>,
    services_by_vip: AddressIndex,
    services_by_hostname: HashMap<String, BTreeSet<String>>,
    /// Workload uids by the service (`ns/hostname`) they are endpoints of.
    endpoints: HashMap<String, BTreeSet<String>>,
    policies: Engine,
    generation: u64,
}

impl ProxyState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// A workload by uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload with an address on a network.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        let uid = self.workloads_by_ip.get(network, ip)?;
        self.workloads.get(uid)
    }

    /// A service by `namespace/hostname`.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The service with a VIP on a network.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        let name = self.services_by_vip.get(network, ip)?;
        self.services.get(name)
    }

    /// The services with a hostname (one per namespace that has it).
    pub fn services_by_hostname(&self, hostname: &str) -> impl Iterator<Item = &Arc<Service>> {
        self.services_by_hostname
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|name| self.services.get(name))
    }

    /// The workloads that are endpoints of a service (`ns/hostname`).
    pub fn endpoints(&self, service: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid))
    }

    /// A number that changes with every change to the state (for caches).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The authorization policies.
    pub fn policies(&self) -> &Engine {
        &self.policies
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// How many workloads, services and policies are known.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    /// Applies an `Address` resource published under `name`.
    pub fn apply_address(&mut self, name: &str, address: Address) -> Result<(), Rejected> {
        let reject = |reason: String| Rejected {
            name: name.to_owned(),
            reason,
        };
        match address.r#type {
            Some(address::Type::Workload(workload)) => {
                if workload.uid != name {
                    return Err(reject(format!(
                        "a workload published under another name than its uid {:?}",
                        workload.uid
                    )));
                }
                let ips = workload
                    .addresses
                    .iter()
                    .map(|bytes| ip_from_wire(bytes))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| reject(format!("addresses: {err}")))?;
                self.remove_workload(name);
                for service in workload.services.keys() {
                    self.endpoints
                        .entry(service.clone())
                        .or_default()
                        .insert(name.to_owned());
                }
                for ip in ips {
                    self.workloads_by_ip.insert(&workload.network, ip, name);
                }
                self.workloads.insert(name.to_owned(), Arc::new(workload));
                self.generation += 1;
                Ok(())
            }
            Some(address::Type::Service(service)) => {
                let expected = format!("{}/{}", service.namespace, service.hostname);
                if expected != name {
                    return Err(reject(format!(
                        "a service published under another name than {expected:?}"
                    )));
                }
                let vips = service
                    .addresses
                    .iter()
                    .map(|address| {
                        ip_from_wire(&address.address).map(|ip| NetworkIp {
                            network: address.network.clone(),
                            ip,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| reject(format!("addresses: {err}")))?;
                self.remove_service(name);
                for vip in vips {
                    self.services_by_vip.insert(&vip.network, vip.ip, name);
                }
                self.services_by_hostname
                    .entry(service.hostname.clone())
                    .or_default()
                    .insert(name.to_owned());
                self.services.insert(name.to_owned(), Arc::new(service));
                self.generation += 1;
                Ok(())
            }
            None => Err(reject(
                "an Address with neither workload nor service".into(),
            )),
        }
    }

    /// Applies an `Authorization` resource.
    pub fn apply_authorization(
        &mut self,
        name: &str,
        policy: &Authorization,
    ) -> Result<(), Rejected> {
        let expected = format!("{}/{}", policy.namespace, policy.name);
        if expected != name {
            return Err(Rejected {
                name: name.to_owned(),
                reason: format!("a policy published under another name than {expected:?}"),
            });
        }
        self.policies.upsert(policy).map_err(|err| Rejected {
            name: name.to_owned(),
            reason: err.to_string(),
        })?;
        self.generation += 1;
        Ok(())
    }

    /// Removes a resource of `kind` by name; whether it was known.
    pub fn remove(&mut self, kind: ResourceType, name: &str) -> bool {
        let removed = match kind {
            ResourceType::Address => {
                self.remove_workload(name)
                    || self.remove_service(name)
                    || self.remove_by_alias(name)
            }
            ResourceType::Authorization => self.policies.remove(name),
        };
        if removed {
            self.generation += 1;
        }
        removed
    }

    /// An on-demand client asked by address (`<network>/<ip>`): the server
    /// may announce the removal under that name.
    fn remove_by_alias(&mut self, name: &str) -> bool {
        let Ok(alias) = name.parse::<NetworkIp>() else {
            return false;
        };
        if let Some(uid) = self.workloads_by_ip.get(&alias.network, alias.ip).cloned() {
            return self.remove_workload(&uid);
        }
        if let Some(service) = self.services_by_vip.get(&alias.network, alias.ip).cloned() {
            return self.remove_service(&service);
        }
        false
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for service in old.services.keys() {
            if let Some(uids) = self.endpoints.get_mut(service) {
                uids.remove(uid);
                if uids.is_empty() {
                    self.endpoints.remove(service);
                }
            }
        }
        for bytes in &old.addresses {
            if let Ok(ip) = ip_from_wire(bytes) {
                self.workloads_by_ip.remove(&old.network, ip, uid);
            }
        }
        true
    }

    fn remove_service(&mut self, name: &str) -> bool {
        let Some(old) = self.services.remove(name) else {
            return false;
        };
        if let Some(names) = self.services_by_hostname.get_mut(&old.hostname) {
            names.remove(name);
            if names.is_empty() {
                self.services_by_hostname.remove(&old.hostname);
            }
        }
        for address in &old.addresses {
            if let Ok(ip) = ip_from_wire(&address.address) {
                self.services_by_vip.remove(&address.network, ip, name);
            }
        }
        true
    }
}
