//! One structured access-log event per connection (target `access`), when it
//! ends: direction, addresses, identities, workloads, bytes, duration, and
//! the error if it failed.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::Identity;
use mesh_api::workload::Workload;
use tokio::time::Instant;

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
    /// Bytes from the connection's client towards the destination.
    pub sent: u64,
    /// Bytes from the destination back to the client.
    pub received: u64,
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
            sent: 0,
            received: 0,
        }
    }

    /// Emits the event of a connection that completed.
    pub fn done(&self, started: Instant) {
        self.emit(started, None);
    }

    /// Emits the event of a connection that failed with `error`.
    pub fn failed(&self, started: Instant, error: &str) {
        self.emit(started, Some(error));
    }

    fn emit(&self, started: Instant, error: Option<&str>) {
        let destination = self.destination.map(|d| d.to_string());
        let workload = self
            .destination_workload
            .as_ref()
            .map(|w| format!("{}/{}", w.namespace, w.name));
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.source,
            src.identity = self.source_identity.as_ref().map(Identity::as_uri),
            dst.addr = destination.as_deref(),
            dst.workload = workload.as_deref(),
            dst.identity = self.destination_identity.as_ref().map(Identity::as_uri),
            bytes_sent = self.sent,
            bytes_recv = self.received,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error,
            "connection complete"
        );
    }
}
