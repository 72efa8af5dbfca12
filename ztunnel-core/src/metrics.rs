//! Connection metrics with Istio's names and labels (WIRE.md §10), registered
//! into the caller's `prometheus_client` registry: connections opened and
//! closed, bytes sent and received, per source and destination workload,
//! principal and service, from this proxy's point of view (`reporter`).
//!
//! Bytes follow Istio's definitions for both reporters: `received` counts the
//! request's bytes (client to destination), `sent` the response's
//! (destination to client).
//!
//! A connection looks its label set up once, when it opens, and keeps the
//! counters themselves ([`ConnectionCounters`]): closing it touches no map and
//! no label strings stay with it while it lives. Connections between the same
//! peers (the same versions of the same workloads, identities and service)
//! share a label set, and the last few label sets' counters are remembered
//! by those peers ([`Peers`]): a new connection between them neither builds
//! label strings nor hashes them.

use std::sync::{Arc, Mutex, PoisonError};

use mesh_api::Identity;
use mesh_api::workload::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Istio's connection labels.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `source` (outbound) or `destination` (inbound).
    pub reporter: String,
    /// The client's workload name.
    pub source_workload: String,
    /// The client's namespace.
    pub source_workload_namespace: String,
    /// The client's principal (`spiffe://...`), `unknown` for plaintext.
    pub source_principal: String,
    /// The server's workload name.
    pub destination_workload: String,
    /// The server's namespace.
    pub destination_workload_namespace: String,
    /// The server's principal.
    pub destination_principal: String,
    /// The service hostname, if reached through one.
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
}

/// Which end of a connection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The client's proxy (outbound).
    Source,
    /// The server's proxy (inbound).
    Destination,
}

impl Reporter {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// Who a connection is between, as the proxy knows them: what its
/// [`ConnectionLabels`] are made of. A peer not known is `None` and its labels
/// are `unknown`.
#[derive(Clone, Copy, Debug)]
pub struct Peers<'a> {
    /// The end counting.
    pub reporter: Reporter,
    /// The client's workload, as the state knows it.
    pub source_workload: Option<&'a Arc<Workload>>,
    /// The client's identity (none for plaintext).
    pub source_identity: Option<&'a Identity>,
    /// The server's workload, as the state knows it.
    pub destination_workload: Option<&'a Arc<Workload>>,
    /// The server's identity.
    pub destination_identity: Option<&'a Identity>,
    /// The service the connection was addressed to.
    pub service: Option<&'a Arc<Service>>,
    /// Whether the connection is carried over mutual TLS.
    pub mutual_tls: bool,
}

impl Peers<'_> {
    /// The label set: workload names (a workload's `workload_name`, else its
    /// own name), namespaces, principals (SPIFFE URIs), the service's hostname.
    pub fn labels(&self) -> ConnectionLabels {
        let unknown = || "unknown".to_owned();
        let principal =
            |identity: Option<&Identity>| identity.map_or_else(unknown, |i| i.as_uri().to_owned());
        let name = |workload: Option<&Arc<Workload>>| {
            workload.map_or_else(unknown, |w| {
                if w.workload_name.is_empty() {
                    w.name.clone()
                } else {
                    w.workload_name.clone()
                }
            })
        };
        let namespace = |workload: Option<&Arc<Workload>>| {
            workload.map_or_else(unknown, |w| w.namespace.clone())
        };
        ConnectionLabels {
            reporter: self.reporter.as_str().to_owned(),
            source_workload: name(self.source_workload),
            source_workload_namespace: namespace(self.source_workload),
            source_principal: principal(self.source_identity),
            destination_workload: name(self.destination_workload),
            destination_workload_namespace: namespace(self.destination_workload),
            destination_principal: principal(self.destination_identity),
            destination_service: self
                .service
                .map_or_else(unknown, |service| service.hostname.clone()),
            connection_security_policy: if self.mutual_tls {
                "mutual_tls"
            } else {
                "none"
            }
            .to_owned(),
        }
    }
}

/// [`Peers`] kept: the workloads and service by their `Arc` (the state hands
/// out the same one until the configuration changes, and a kept one cannot be
/// freed and its address reused), identities by value.
#[derive(Debug)]
struct KeptPeers {
    reporter: Reporter,
    source_workload: Option<Arc<Workload>>,
    source_identity: Option<Identity>,
    destination_workload: Option<Arc<Workload>>,
    destination_identity: Option<Identity>,
    service: Option<Arc<Service>>,
    mutual_tls: bool,
}

impl KeptPeers {
    fn of(peers: &Peers<'_>) -> Self {
        Self {
            reporter: peers.reporter,
            source_workload: peers.source_workload.cloned(),
            source_identity: peers.source_identity.cloned(),
            destination_workload: peers.destination_workload.cloned(),
            destination_identity: peers.destination_identity.cloned(),
            service: peers.service.cloned(),
            mutual_tls: peers.mutual_tls,
        }
    }

    fn is(&self, peers: &Peers<'_>) -> bool {
        fn same<T>(kept: Option<&Arc<T>>, other: Option<&Arc<T>>) -> bool {
            match (kept, other) {
                (Some(kept), Some(other)) => Arc::ptr_eq(kept, other),
                (None, None) => true,
                _ => false,
            }
        }
        self.reporter == peers.reporter
            && self.mutual_tls == peers.mutual_tls
            && same(self.source_workload.as_ref(), peers.source_workload)
            && same(
                self.destination_workload.as_ref(),
                peers.destination_workload,
            )
            && same(self.service.as_ref(), peers.service)
            && self.source_identity.as_ref() == peers.source_identity
            && self.destination_identity.as_ref() == peers.destination_identity
    }
}

/// How many label sets' counters are remembered.
const REMEMBERED: usize = 16;

/// One label set's counters, and whose they are.
#[derive(Debug)]
struct RememberedEntry {
    peers: KeptPeers,
    opened: Counter,
    counters: ConnectionCounters,
}

/// The counters of the last [`REMEMBERED`] peer sets that opened a
/// connection, the oldest replaced first.
#[derive(Debug, Default)]
struct Remembered {
    entries: Vec<RememberedEntry>,
    /// The entry replaced next, once all are taken.
    next: usize,
}

impl Remembered {
    fn find(&self, peers: &Peers<'_>) -> Option<&RememberedEntry> {
        self.entries.iter().find(|entry| entry.peers.is(peers))
    }

    fn keep(&mut self, entry: RememberedEntry) {
        if self.entries.len() < REMEMBERED {
            self.entries.push(entry);
        } else {
            self.entries[self.next] = entry;
            self.next = (self.next + 1) % REMEMBERED;
        }
    }
}

/// The counters.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    /// Shared by clones, which count into the same families.
    remembered: Arc<Mutex<Remembered>>,
}

impl Metrics {
    /// Counters registered into `registry`: `istio_tcp_connections_opened_total`,
    /// `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total`,
    /// `istio_tcp_received_bytes_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            metrics.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            metrics.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes of TCP connections' responses (destination to client)",
            metrics.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes of TCP connections' requests (client to destination)",
            metrics.received.clone(),
        );
        metrics
    }

    /// A connection with `labels` was established: counted, and its
    /// closing counters returned.
    pub fn opened(&self, labels: &ConnectionLabels) -> ConnectionCounters {
        self.opened.get_or_create(labels).inc();
        self.counters(labels)
    }

    /// A connection between `peers` was established: counted under their
    /// label set, and its closing counters returned. The label set is built
    /// and looked up only if these peers are not among the last few.
    pub fn opened_between(&self, peers: &Peers<'_>) -> ConnectionCounters {
        let mut remembered = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = remembered.find(peers) {
            entry.opened.inc();
            return entry.counters.clone();
        }
        let labels = peers.labels();
        let opened = self.opened.get_or_create(&labels).clone();
        opened.inc();
        let counters = self.counters(&labels);
        remembered.keep(RememberedEntry {
            peers: KeptPeers::of(peers),
            opened,
            counters: counters.clone(),
        });
        counters
    }

    /// The closing counters of `labels`.
    fn counters(&self, labels: &ConnectionLabels) -> ConnectionCounters {
        ConnectionCounters {
            closed: self.closed.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
        }
    }
}

/// The counters an open connection updates when it closes (shared with
/// every connection of the same labels).
#[derive(Clone, Debug)]
pub struct ConnectionCounters {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl ConnectionCounters {
    /// The connection ended, having carried `request_bytes` from its client
    /// to its destination and `response_bytes` back.
    pub fn closed(&self, request_bytes: u64, response_bytes: u64) {
        self.closed.inc();
        self.received.inc_by(request_bytes);
        self.sent.inc_by(response_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_are_exported() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let labels = ConnectionLabels {
            reporter: "destination".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/shell".into(),
            destination_workload: "echo".into(),
            connection_security_policy: "mutual_tls".into(),
            ..ConnectionLabels::default()
        };
        let counters = metrics.opened(&labels);
        counters.closed(10, 20);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for expected in [
            "istio_tcp_connections_opened_total{reporter=\"destination\"",
            "istio_tcp_connections_closed_total{",
            "istio_tcp_sent_bytes_total{",
            "istio_tcp_received_bytes_total{",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/shell\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        let value = |name: &str| {
            text.lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            value("istio_tcp_received_bytes_total{").as_deref(),
            Some("10")
        );
        assert_eq!(value("istio_tcp_sent_bytes_total{").as_deref(), Some("20"));
        assert_eq!(
            value("istio_tcp_connections_closed_total{").as_deref(),
            Some("1")
        );
    }

    fn workload(name: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            ..Workload::default()
        })
    }

    fn peers(destination: &Arc<Workload>) -> Peers<'_> {
        Peers {
            reporter: Reporter::Source,
            source_workload: None,
            source_identity: None,
            destination_workload: Some(destination),
            destination_identity: None,
            service: None,
            mutual_tls: false,
        }
    }

    /// The value of the one line of `text` that starts with `prefix`.
    fn sample(text: &str, prefix: &str) -> Option<String> {
        let mut lines = text.lines().filter(|line| line.starts_with(prefix));
        let value = lines.next()?.rsplit(' ').next()?.to_owned();
        assert!(lines.next().is_none(), "one {prefix} line in\n{text}");
        Some(value)
    }

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    #[test]
    fn connections_between_the_same_peers_count_into_one_label_set() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let echo = workload("echo");
        for bytes in [3, 4] {
            metrics.opened_between(&peers(&echo)).closed(bytes, 0);
        }
        let text = encoded(&registry);
        let opened =
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"unknown\"";
        assert_eq!(sample(&text, opened).as_deref(), Some("2"));
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total{").as_deref(),
            Some("7")
        );
        assert!(text.contains("destination_workload=\"echo\""), "{text}");
        assert!(
            text.contains("connection_security_policy=\"none\""),
            "{text}"
        );
    }

    #[test]
    fn a_new_version_of_a_workload_gets_the_labels_it_now_has() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let first = workload("echo");
        metrics.opened_between(&peers(&first));
        let renamed = Arc::new(Workload {
            workload_name: "echo-v2".to_owned(),
            ..(*first).clone()
        });
        metrics.opened_between(&peers(&renamed));
        let text = encoded(&registry);
        for name in ["echo", "echo-v2"] {
            let line = format!("destination_workload=\"{name}\"");
            let opened = text
                .lines()
                .filter(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{") && l.contains(&line)
                })
                .count();
            assert_eq!(opened, 1, "{name} in\n{text}");
        }
    }

    #[test]
    fn peers_beyond_those_remembered_are_still_counted() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let workloads: Vec<_> = (0..REMEMBERED * 2)
            .map(|i| workload(&format!("w{i}")))
            .collect();
        for _ in 0..2 {
            for workload in &workloads {
                metrics.opened_between(&peers(workload)).closed(1, 0);
            }
        }
        let text = encoded(&registry);
        for i in 0..REMEMBERED * 2 {
            let line = format!("destination_workload=\"w{i}\"");
            let opened: Vec<_> = text
                .lines()
                .filter(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{") && l.contains(&line)
                })
                .collect();
            assert_eq!(opened.len(), 1, "w{i} in\n{text}");
            assert!(opened[0].ends_with(" 2"), "{}", opened[0]);
        }
    }
}
