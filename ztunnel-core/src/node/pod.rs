//! One pod served by the node proxy: its proxy instance (the same code path
//! as dedicated mode) and its DNS proxy, with every listener opened inside
//! the pod's network namespace from the descriptor ZDS handed over, and
//! every socket the instance makes started there too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dns_proxy::lookup::Services;
use dns_proxy::{DnsHandle, DnsProxy, MeshDns};
use mesh_api::Identity;
use mesh_api::zds::WorkloadInfo;
use mesh_net::Drained;
use mesh_net::netns::Netns;

use super::NodeProxyShared;
use crate::dns::StateDns;
use crate::net::socket::SocketNamespace;
use crate::proxy::{Listeners, Ztunnel, ZtunnelHandle};

/// A running pod.
#[derive(Debug)]
pub(super) struct Pod {
    pub(super) info: WorkloadInfo,
    /// Where its sockets are made (its network namespace).
    pub(super) sockets: SocketNamespace,
    pub(super) proxy: ZtunnelHandle,
    pub(super) dns: Option<DnsHandle>,
}

impl Pod {
    /// Starts serving the pod whose network namespace is `netns`.
    pub(super) fn start(
        shared: &NodeProxyShared,
        info: WorkloadInfo,
        netns: Netns,
    ) -> Result<Self, String> {
        let config = &shared.config;
        let identity = Identity::new(&config.trust_domain, &info.namespace, &info.service_account)
            .map_err(|err| format!("identity: {err}"))?;
        let description = netns.description().to_owned();
        let sockets = SocketNamespace::pod(netns).map_err(|err| err.to_string())?;
        let listen = |address: SocketAddr| {
            sockets
                .listen(address)
                .map_err(|err| format!("listening on {address} in {description}: {err}"))
        };
        let addresses = &config.listeners;
        let listeners = Listeners {
            outbound: listen(addresses.outbound)?,
            inbound_plaintext: listen(addresses.inbound_plaintext)?,
            hbone: listen(addresses.hbone)?,
            socks5: None,
        };
        let dns = match addresses.dns {
            Some(address) => {
                let udp = sockets
                    .udp(address)
                    .map_err(|err| format!("DNS on {address}/udp in {description}: {err}"))?;
                let tcp = listen(address)?;
                let mesh = Arc::new(PodDns {
                    state: StateDns::new(shared.state.clone()),
                    namespace: Arc::from(info.namespace.as_str()),
                });
                let proxy = DnsProxy::builder()
                    .config(config.dns.clone())
                    .mesh(mesh)
                    .build()
                    .map_err(|err| format!("DNS: {err}"))?;
                Some(proxy.spawn(udp, tcp).map_err(|err| format!("DNS: {err}"))?)
            }
            None => None,
        };
        let started = Self::start_proxy(shared, &info, identity, &sockets, listeners);
        match started {
            Ok(proxy) => {
                // The pod's certificate is asked for now, not on its first
                // connection.
                proxy.prefetch_certificate();
                Ok(Self {
                    info,
                    sockets,
                    proxy,
                    dns,
                })
            }
            Err(err) => {
                // Nothing of the pod is left running (its sockets would hold
                // its namespace, and its ports for the next try).
                if let Some(dns) = &dns {
                    dns.shutdown();
                }
                Err(err)
            }
        }
    }

    fn start_proxy(
        shared: &NodeProxyShared,
        info: &WorkloadInfo,
        identity: Identity,
        sockets: &SocketNamespace,
        listeners: Listeners,
    ) -> Result<ZtunnelHandle, String> {
        let config = &shared.config;
        let uid = format!(
            "{}//Pod/{}/{}",
            config.cluster_id, info.namespace, info.name
        );
        let mut builder = Ztunnel::builder()
            .config(config.proxy.clone())
            .workload_uid(uid)
            .identity(identity)
            .state(shared.state.clone())
            .certificates(shared.certs.clone())
            .sockets(sockets.clone())
            .crypto_provider(shared.provider.clone());
        if let Some(metrics) = &shared.metrics {
            builder = builder.shared_metrics(metrics.clone());
        }
        if let Some(demander) = &shared.demander {
            builder = builder.demander(demander.clone());
        }
        if config.same_node_shortcut {
            builder = builder.same_node(shared.same_node.clone());
        }
        builder
            .build()
            .map_err(|err| err.to_string())?
            .spawn(listeners)
            .map_err(|err| format!("starting the proxy: {err}"))
    }

    /// Stops now.
    pub(super) fn shutdown(&self) {
        self.proxy.shutdown();
        if let Some(dns) = &self.dns {
            dns.shutdown();
        }
    }

    /// Stops taking connections and lets open ones finish, up to `deadline`.
    pub(super) async fn drain(self, deadline: Duration) -> Drained {
        let dns = async {
            if let Some(dns) = &self.dns {
                let _ = dns.drain(deadline).await;
            }
        };
        let (drained, ()) = tokio::join!(self.proxy.drain(deadline), dns);
        drained
    }
}

/// The mesh as a pod's DNS proxy sees it: the node's state, and the pod's
/// own namespace for search expansion whoever the client address is.
#[derive(Debug)]
struct PodDns {
    state: StateDns,
    namespace: Arc<str>,
}

impl MeshDns for PodDns {
    fn services(&self, hostname: &str) -> Option<Services> {
        self.state.services(hostname)
    }

    fn client_namespace(&self, _client: IpAddr) -> Option<Arc<str>> {
        Some(self.namespace.clone())
    }

    fn generation(&self) -> Option<u64> {
        self.state.generation()
    }
}
