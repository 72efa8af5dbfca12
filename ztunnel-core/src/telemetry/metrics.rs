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
//! no label strings stay with it while it lives. The counters of the label
//! sets used most recently are remembered: a new connection whose peers
//! ([`Peers`]) give one of those label sets (compared value by value, straight
//! from the workloads, identities and service) neither builds label strings
//! nor hashes them.

use std::sync::{Arc, Mutex, PoisonError};

use mesh_api::Identity;
use mesh_api::workload::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::connection::{ConnectionRecord, Direction};

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

impl<'a> Peers<'a> {
    /// Who the connection `record` is between, counted by the end that took
    /// it (outbound: the source; inbound: the destination).
    pub fn of(record: &'a ConnectionRecord) -> Self {
        Self {
            reporter: match record.direction {
                Direction::Outbound => Reporter::Source,
                Direction::Inbound | Direction::InboundPlaintext => Reporter::Destination,
            },
            source_workload: record.source_workload.as_ref(),
            source_identity: record.source_identity.as_ref(),
            destination_workload: record.destination_workload.as_ref(),
            destination_identity: record.destination_identity.as_ref(),
            service: record.service.as_ref(),
            mutual_tls: record.mutual_tls(),
        }
    }

    /// The label set: workload names (a workload's `workload_name`, else its
    /// own name), namespaces, principals (SPIFFE URIs), the service's hostname.
    pub fn labels(&self) -> ConnectionLabels {
        let [
            reporter,
            source_workload,
            source_workload_namespace,
            source_principal,
            destination_workload,
            destination_workload_namespace,
            destination_principal,
            destination_service,
            connection_security_policy,
        ] = self.values().map(str::to_owned);
        ConnectionLabels {
            reporter,
            source_workload,
            source_workload_namespace,
            source_principal,
            destination_workload,
            destination_workload_namespace,
            destination_principal,
            destination_service,
            connection_security_policy,
        }
    }

    /// The label values, borrowed, in [`ConnectionLabels`]' order.
    fn values(&self) -> [&str; 9] {
        [
            self.reporter.as_str(),
            workload_name(self.source_workload),
            namespace(self.source_workload),
            principal(self.source_identity),
            workload_name(self.destination_workload),
            namespace(self.destination_workload),
            principal(self.destination_identity),
            self.service
                .map_or(UNKNOWN, |service| service.hostname.as_str()),
            if self.mutual_tls {
                "mutual_tls"
            } else {
                "none"
            },
        ]
    }
}

impl ConnectionLabels {
    /// The values, in field order.
    fn values(&self) -> [&str; 9] {
        [
            &self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_service,
            &self.connection_security_policy,
        ]
    }
}

/// A label's value for a peer not known.
const UNKNOWN: &str = "unknown";

/// A workload's name label: its `workload_name`, else its own name.
fn workload_name(workload: Option<&Arc<Workload>>) -> &str {
    workload.map_or(UNKNOWN, |w| {
        if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        }
    })
}

fn namespace(workload: Option<&Arc<Workload>>) -> &str {
    workload.map_or(UNKNOWN, |w| w.namespace.as_str())
}

fn principal(identity: Option<&Identity>) -> &str {
    identity.map_or(UNKNOWN, Identity::as_uri)
}

/// How many label sets' counters are remembered.
const REMEMBERED: usize = 16;

/// One label set and its counters.
#[derive(Debug)]
struct RememberedEntry {
    labels: ConnectionLabels,
    opened: Counter,
    counters: ConnectionCounters,
    /// When it was last used ([`Remembered::clock`]).
    used: u64,
}

/// The counters of the [`REMEMBERED`] label sets used most recently; the one
/// used least recently is replaced first.
#[derive(Debug, Default)]
struct Remembered {
    entries: Vec<RememberedEntry>,
    /// Counts uses.
    clock: u64,
}

impl Remembered {
    /// The entry of `peers`' label set, marked used.
    fn find(&mut self, peers: &Peers<'_>) -> Option<&RememberedEntry> {
        self.clock += 1;
        let clock = self.clock;
        // Compared without building the label set.
        let values = peers.values();
        let entry = self
            .entries
            .iter_mut()
            .find(|entry| entry.labels.values() == values)?;
        entry.used = clock;
        Some(entry)
    }

    fn keep(&mut self, labels: ConnectionLabels, opened: Counter, counters: ConnectionCounters) {
        if self.entries.iter().any(|entry| entry.labels == labels) {
            return;
        }
        self.clock += 1;
        let entry = RememberedEntry {
            labels,
            opened,
            counters,
            used: self.clock,
        };
        if self.entries.len() < REMEMBERED {
            self.entries.push(entry);
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|entry| entry.used) {
            *oldest = entry;
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
    /// and looked up only if it is not among those used most recently.
    pub fn opened_between(&self, peers: &Peers<'_>) -> ConnectionCounters {
        if let Some(entry) = self.remembered().find(peers) {
            entry.opened.inc();
            return entry.counters.clone();
        }
        // Built and looked up without the lock: other connections' hits
        // need not wait for it.
        let labels = peers.labels();
        let opened = self.opened.get_or_create(&labels).clone();
        opened.inc();
        let counters = self.counters(&labels);
        self.remembered().keep(labels, opened, counters.clone());
        counters
    }

    /// The connection `record` describes was established: counted under its
    /// peers' label set ([`Peers::of`]), and its closing counters returned.
    pub fn opened_for(&self, record: &ConnectionRecord) -> ConnectionCounters {
        self.opened_between(&Peers::of(record))
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

    #[test]
    fn pods_of_one_workload_share_one_remembered_label_set() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        for pod in 0..REMEMBERED * 3 {
            let replica = Arc::new(Workload {
                workload_name: "echo".to_owned(),
                ..(*workload(&format!("echo-{pod}"))).clone()
            });
            metrics.opened_between(&peers(&replica));
        }
        assert_eq!(metrics.remembered().entries.len(), 1, "one label set");
        let text = encoded(&registry);
        let opened = "istio_tcp_connections_opened_total{";
        assert_eq!(
            sample(&text, opened).as_deref(),
            Some((REMEMBERED * 3).to_string().as_str())
        );
    }

    #[test]
    fn peers_that_differ_in_any_label_get_their_own_label_set() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let echo = workload("echo");
        let service = Arc::new(Service {
            hostname: "echo.default.svc.cluster.local".to_owned(),
            ..Service::default()
        });
        let shell = Identity::parse_uri("spiffe://cluster.local/ns/default/sa/shell").unwrap();
        let echo_id = Identity::parse_uri("spiffe://cluster.local/ns/default/sa/echo").unwrap();
        let base = peers(&echo);
        let variants = [
            base,
            Peers {
                reporter: Reporter::Destination,
                ..base
            },
            Peers {
                mutual_tls: true,
                ..base
            },
            Peers {
                service: Some(&service),
                ..base
            },
            Peers {
                source_identity: Some(&shell),
                ..base
            },
            Peers {
                destination_identity: Some(&echo_id),
                ..base
            },
            Peers {
                source_workload: Some(&echo),
                ..base
            },
        ];
        for peers in &variants {
            metrics.opened_between(peers);
            metrics.opened_between(peers);
        }
        assert_eq!(metrics.remembered().entries.len(), variants.len());
        let text = encoded(&registry);
        let lines: Vec<_> = text
            .lines()
            .filter(|line| line.starts_with("istio_tcp_connections_opened_total{"))
            .collect();
        assert_eq!(lines.len(), variants.len(), "{text}");
        assert!(lines.iter().all(|line| line.ends_with(" 2")), "{text}");
    }

    #[test]
    fn a_record_is_labelled_from_the_end_that_took_it() {
        let echo = workload("echo");
        let source = "10.0.0.1:5000".parse().expect("address");
        let mut inbound = ConnectionRecord::new(Direction::Inbound, source, None);
        inbound.destination_workload = Some(echo.clone());
        let peers = Peers::of(&inbound);
        assert_eq!(peers.reporter, Reporter::Destination);
        assert!(peers.mutual_tls, "HBONE is mutual TLS");
        assert_eq!(peers.labels().destination_workload, "echo");
        let plaintext = ConnectionRecord::new(Direction::InboundPlaintext, source, None);
        assert!(!Peers::of(&plaintext).mutual_tls);
        let mut outbound = ConnectionRecord::new(Direction::Outbound, source, None);
        assert_eq!(Peers::of(&outbound).reporter, Reporter::Source);
        assert!(!Peers::of(&outbound).mutual_tls, "no identity: plain TCP");
        outbound.destination_identity = Identity::new("cluster.local", "default", "echo").ok();
        assert!(Peers::of(&outbound).mutual_tls);
    }

    #[test]
    fn the_label_set_used_last_is_kept_over_older_ones() {
        let metrics = Metrics::default();
        let busy = workload("busy");
        metrics.opened_between(&peers(&busy));
        let others: Vec<_> = (0..REMEMBERED)
            .map(|i| workload(&format!("w{i}")))
            .collect();
        for (i, other) in others.iter().enumerate() {
            metrics.opened_between(&peers(other));
            if i == REMEMBERED / 2 {
                metrics.opened_between(&peers(&busy));
            }
        }
        let remembered = metrics.remembered();
        assert_eq!(remembered.entries.len(), REMEMBERED);
        let kept = |name: &str| {
            remembered
                .entries
                .iter()
                .any(|entry| entry.labels.destination_workload == name)
        };
        assert!(kept("busy"), "used recently, so kept");
        assert!(!kept("w0"), "the least recently used went");
    }
}
