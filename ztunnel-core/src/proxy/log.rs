//! One structured access-log event per connection (target `access`), when it
//! ends: direction, addresses, identities, workloads, bytes, duration, and
//! the error if it failed; and the connection's metrics (opened when it is
//! established, closed with its bytes when it ends).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::Identity;
use mesh_api::workload::{Service, Workload};
use tokio::time::Instant;

use crate::metrics::{ConnectionCounters, Metrics, Peers, Reporter};

/// Which listener took the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the served workload (15001).
    Outbound,
    /// HBONE from a mesh peer (15008).
    Inbound,
    /// Plaintext from outside the mesh (15006).
    InboundPlaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// What is known of a connection, filled in as it goes.
#[derive(Debug)]
pub struct AccessLog {
    direction: Direction,
    source: SocketAddr,
    source_identity: Option<Identity>,
    /// The original destination.
    pub destination: Option<SocketAddr>,
    /// The destination workload, once known.
    pub destination_workload: Option<Arc<Workload>>,
    /// The destination's identity, once known.
    pub destination_identity: Option<Identity>,
    /// The source workload, once known.
    pub source_workload: Option<Arc<Workload>>,
    /// The service reached through, once known.
    pub service: Option<Arc<Service>>,
    counters: Option<ConnectionCounters>,
}

impl AccessLog {
    /// A connection from `source`.
    pub fn new(
        direction: Direction,
        source: SocketAddr,
        source_identity: Option<Identity>,
    ) -> Self {
        Self {
            direction,
            source,
            source_identity,
            destination: None,
            destination_workload: None,
            destination_identity: None,
            source_workload: None,
            service: None,
            counters: None,
        }
    }

    /// The connection is established: counts it as opened in `metrics`,
    /// the instance's (borrowed: the log, which lives as long as the
    /// connection, keeps only the connection's own counters).
    pub fn opened(&mut self, metrics: Option<&Metrics>) {
        let Some(metrics) = metrics else {
            return;
        };
        let peers = Peers {
            reporter: match self.direction {
                Direction::Outbound => Reporter::Source,
                Direction::Inbound | Direction::InboundPlaintext => Reporter::Destination,
            },
            source_workload: self.source_workload.as_ref(),
            source_identity: self.source_identity.as_ref(),
            destination_workload: self.destination_workload.as_ref(),
            destination_identity: self.destination_identity.as_ref(),
            service: self.service.as_ref(),
            mutual_tls: self.direction == Direction::Inbound || self.destination_identity.is_some(),
        };
        self.counters = Some(metrics.opened_between(&peers));
    }

    /// Emits the event of a connection that ended, with the bytes it moved
    /// (request, response: client to destination, destination to client),
    /// also when it failed with `error` after moving them.
    pub fn finish(&self, started: Instant, bytes: (u64, u64), error: Option<&str>) {
        self.emit(started, bytes, error);
    }

    /// Emits the event of a connection that failed with `error` before it
    /// moved any bytes.
    pub fn failed(&self, started: Instant, error: &str) {
        self.emit(started, (0, 0), Some(error));
    }

    /// The bytes are (request, response), as [`AccessLog::finish`]'s. They
    /// are arguments rather than fields: the log lives as long as its
    /// connection, inside the connection's task, so every field it need not
    /// keep makes each open connection smaller.
    fn emit(
        &self,
        started: Instant,
        (request_bytes, response_bytes): (u64, u64),
        error: Option<&str>,
    ) {
        if let Some(counters) = &self.counters {
            counters.closed(request_bytes, response_bytes);
        }
        // Formatted straight into the event's line: no strings of their own.
        let destination = self.destination.as_ref().map(tracing::field::display);
        let workload = self
            .destination_workload
            .as_deref()
            .map(|w| tracing::field::display(NamespacedName(w)));
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.source,
            src.identity = self.source_identity.as_ref().map(Identity::as_uri),
            dst.addr = destination,
            dst.workload = workload,
            dst.identity = self.destination_identity.as_ref().map(Identity::as_uri),
            bytes_request = request_bytes,
            bytes_response = response_bytes,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error,
            "connection complete"
        );
    }
}

/// A workload as `<namespace>/<name>`.
struct NamespacedName<'a>(&'a Workload);

impl std::fmt::Display for NamespacedName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.namespace, self.0.name)
    }
}
