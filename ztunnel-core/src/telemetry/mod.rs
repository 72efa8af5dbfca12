//! Telemetry, fed by one [`ConnectionRecord`] per connection: the proxy fills
//! the record in along a connection's path and, when it ends, hands it with
//! the outcome to the access log ([`log`]) and to the metrics ([`metrics`]),
//! which neither route nor decide anything.
//!
//! The crate's `Recorder` is the proxy's side of that: the record and, once the
//! connection is established, the metrics' counters it will close.

pub mod connection;
pub mod log;
pub mod metrics;

use std::fmt::Display;

pub use connection::{ByteCounts, ConnectionRecord, Direction};
use metrics::{ConnectionCounters, Metrics};

/// One connection's record and counters, from accept to end.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// What is known of the connection so far.
    pub(crate) record: ConnectionRecord,
    /// Its counters, once counted as opened.
    counters: Option<ConnectionCounters>,
}

impl Recorder {
    /// A connection from `record`'s source, accepted now.
    pub(crate) fn new(record: ConnectionRecord) -> Self {
        Self {
            record,
            counters: None,
        }
    }

    /// The connection is established: counts it as opened in `metrics`, the
    /// instance's (borrowed: the recorder, which lives as long as the
    /// connection, keeps only the connection's own counters).
    pub(crate) fn opened(&mut self, metrics: Option<&Metrics>) {
        if let Some(metrics) = metrics {
            self.counters = Some(metrics.opened_for(&self.record));
        }
    }

    /// The connection ended, having moved `bytes`, with `error` if it
    /// failed: the record goes to the metrics (if counted as opened) and to
    /// the access log.
    pub(crate) fn finish(self, bytes: ByteCounts, error: Option<&impl Display>) {
        if let Some(counters) = &self.counters {
            counters.closed(bytes.request, bytes.response);
        }
        log::connection_complete(
            &self.record,
            bytes,
            error.map(|error| error as &dyn Display),
        );
    }

    /// The connection failed with `error` before it moved any bytes.
    pub(crate) fn failed(self, error: &impl Display) {
        self.finish(ByteCounts::default(), Some(error));
    }
}
