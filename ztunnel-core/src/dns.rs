//! The data plane's state as `dns-proxy`'s mesh view: services by hostname
//! (VIPs, or the endpoints' IPs for headless services), and a client's namespace
//! from its IP. Answers are built once per hostname and state generation, then
//! shared, since every DNS question asks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use dns_proxy::lookup::Services;
use dns_proxy::{MeshDns, ServiceRecord};
use mesh_api::names::ip_from_wire;
use mesh_api::workload::WorkloadStatus;

use crate::state::SharedState;

/// `dns-proxy`'s view of a [`SharedState`].
#[derive(Debug)]
pub struct StateDns {
    state: SharedState,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    generation: Option<u64>,
    services: HashMap<String, Option<Services>>,
    namespaces: HashMap<IpAddr, Option<Arc<str>>>,
}

impl StateDns {
    /// A view of `state`.
    pub fn new(state: SharedState) -> Self {
        Self {
            state,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Runs `lookup` against the cache of the current generation.
    fn cached<T>(&self, lookup: impl FnOnce(&crate::ProxyState, &mut Cache) -> T) -> T {
        let state = self.state.read();
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.generation != Some(state.generation()) {
            *cache = Cache {
                generation: Some(state.generation()),
                ..Cache::default()
            };
        }
        lookup(&state, &mut cache)
    }
}

impl MeshDns for StateDns {
    fn services(&self, hostname: &str) -> Option<Services> {
        self.cached(|state, cache| {
            if let Some(hit) = cache.services.get(hostname) {
                return hit.clone();
            }
            let records: Vec<Arc<ServiceRecord>> = state
                .services_by_hostname(hostname)
                .map(|service| {
                    let name = format!("{}/{}", service.namespace, service.hostname);
                    let vips = service
                        .addresses
                        .iter()
                        .filter_map(|address| ip_from_wire(&address.address).ok())
                        .collect::<Vec<_>>();
                    let endpoints = if vips.is_empty() {
                        state
                            .endpoints(&name)
                            .filter(|workload| workload.status == WorkloadStatus::Healthy as i32)
                            .flat_map(|workload| workload.addresses.iter())
                            .filter_map(|bytes| ip_from_wire(bytes).ok())
                            .collect()
                    } else {
                        Vec::new()
                    };
                    Arc::new(ServiceRecord {
                        namespace: service.namespace.clone(),
                        hostname: service.hostname.clone(),
                        vips,
                        endpoints,
                        canonical: service.canonical,
                    })
                })
                .collect();
            let services = (!records.is_empty()).then(|| Services::from(records));
            cache.services.insert(hostname.to_owned(), services.clone());
            services
        })
    }

    fn client_namespace(&self, client: IpAddr) -> Option<Arc<str>> {
        self.cached(|state, cache| {
            cache
                .namespaces
                .entry(client)
                .or_insert_with(|| {
                    state
                        .workload_by_ip("", client)
                        .map(|workload| Arc::from(workload.namespace.as_str()))
                })
                .clone()
        })
    }

    fn generation(&self) -> Option<u64> {
        Some(self.state.read().generation())
    }
}
