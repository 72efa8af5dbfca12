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
//! no label strings stay with it while it lives.

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

/// The counters.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
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
}
