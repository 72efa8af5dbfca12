//! The connection record: what the proxy knows of one connection (who from,
//! to where, which workloads, identities and service, when it started),
//! filled in along the path as each fact is learnt, and handed once the
//! connection ends, with the bytes it moved ([`ByteCounts`]), to both the
//! access log and the metrics. The record lives as long as its connection,
//! so it holds nothing it does not need to: the byte counts and any error
//! exist only at the end (measured: keeping the 16 bytes of counts in the
//! record put each inbound stream's task into the allocator's next size
//! class, 225 bytes more per connection).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::Identity;
use mesh_api::workload::{Service, Workload};
use tokio::time::Instant;

/// Which listener took the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// From the served workload (15001, or SOCKS5).
    Outbound,
    /// HBONE from a mesh peer (15008).
    Inbound,
    /// Plaintext from outside the mesh (15006).
    InboundPlaintext,
}

impl Direction {
    /// As the access log writes it: `outbound`, `inbound`,
    /// `inbound_plaintext`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
            Self::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// The bytes a connection moved, as Istio counts them for both reporters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCounts {
    /// The request's: from the client to the destination.
    pub request: u64,
    /// The response's: from the destination to the client.
    pub response: u64,
}

/// What is known of one connection. Every fact but the first three is
/// learnt along the way: a connection that failed early has fewer.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectionRecord {
    /// Which listener took it.
    pub direction: Direction,
    /// The client's address.
    pub source: SocketAddr,
    /// The client's identity: the peer's, verified (inbound HBONE), or the
    /// served workload's (outbound).
    pub source_identity: Option<Identity>,
    /// The client's workload, once known.
    pub source_workload: Option<Arc<Workload>>,
    /// Where it goes: the original destination, then the endpoint chosen.
    pub destination: Option<SocketAddr>,
    /// The destination's workload, once known.
    pub destination_workload: Option<Arc<Workload>>,
    /// The destination's identity, once known: the one it must prove
    /// (outbound), or the served workload's (inbound).
    pub destination_identity: Option<Identity>,
    /// The service it was reached through, if any.
    pub service: Option<Arc<Service>>,
    /// When it was accepted.
    pub started: Instant,
}

impl ConnectionRecord {
    /// A connection from `source` (with `source_identity`, if verified),
    /// accepted now.
    pub fn new(
        direction: Direction,
        source: SocketAddr,
        source_identity: Option<Identity>,
    ) -> Self {
        Self {
            direction,
            source,
            source_identity,
            source_workload: None,
            destination: None,
            destination_workload: None,
            destination_identity: None,
            service: None,
            started: Instant::now(),
        }
    }

    /// Whether it is carried in mutual TLS: inbound over HBONE, or outbound
    /// to a destination with an identity.
    pub fn mutual_tls(&self) -> bool {
        self.direction == Direction::Inbound || self.destination_identity.is_some()
    }
}
