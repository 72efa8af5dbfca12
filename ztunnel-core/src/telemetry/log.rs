//! The access log: one structured event per connection (target `access`),
//! when it ends, from its [`ConnectionRecord`]: direction, addresses,
//! identities, destination workload, bytes, duration, and the error if it
//! failed.

use std::fmt::Display;

use mesh_api::Identity;
use mesh_api::workload::Workload;

use super::connection::{ByteCounts, ConnectionRecord};

/// Emits the event of the connection `record` describes, which ended with
/// `error` (if it failed).
pub fn connection_complete(
    record: &ConnectionRecord,
    bytes: ByteCounts,
    error: Option<&dyn Display>,
) {
    // Formatted straight into the event's line: no strings of their own.
    let destination = record.destination.as_ref().map(tracing::field::display);
    let workload = record
        .destination_workload
        .as_deref()
        .map(|w| tracing::field::display(NamespacedName(w)));
    let error = error.map(tracing::field::display);
    tracing::info!(
        target: "access",
        direction = record.direction.as_str(),
        src.addr = %record.source,
        src.identity = record.source_identity.as_ref().map(Identity::as_uri),
        dst.addr = destination,
        dst.workload = workload,
        dst.identity = record.destination_identity.as_ref().map(Identity::as_uri),
        bytes_request = bytes.request,
        bytes_response = bytes.response,
        duration_ms = u64::try_from(record.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        error,
        "connection complete"
    );
}

/// A workload as `<namespace>/<name>`.
struct NamespacedName<'a>(&'a Workload);

impl Display for NamespacedName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.namespace, self.0.name)
    }
}
