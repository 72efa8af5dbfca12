//! The `baggage` header that tells a peer who a workload is (WIRE.md §4):
//! sent with every CONNECT request (the client's workload) and every answer
//! (the server's). A workload changes only with its configuration, so the
//! header's value is built once per version of it, not once per connection.

use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderValue;
use mesh_api::workload::{Workload, WorkloadType};

use crate::hbone::headers::Baggage;

/// A workload described as a `baggage` header value.
pub fn baggage(workload: &Workload) -> String {
    let kind = match WorkloadType::try_from(workload.workload_type) {
        Ok(WorkloadType::Cronjob) => "cronjob",
        Ok(WorkloadType::Pod) => "pod",
        Ok(WorkloadType::Job) => "job",
        _ => "deployment",
    };
    let some = |value: &str| (!value.is_empty()).then(|| value.to_owned());
    let locality = workload.locality.clone().unwrap_or_default();
    Baggage {
        cluster: some(&workload.cluster_id),
        namespace: some(&workload.namespace),
        workload: some(&workload.workload_name)
            .or_else(|| some(&workload.name))
            .map(|name| (kind.to_owned(), name)),
        service: some(&workload.canonical_name),
        revision: some(&workload.canonical_revision),
        region: some(&locality.region),
        zone: some(&locality.zone),
    }
    .to_string()
}

/// The header value of the last workload asked for. An instance serves one
/// workload, and the state hands out the same `Arc` until that workload's
/// configuration changes: one entry is all it takes, and a new version (a
/// different `Arc`) replaces it.
#[derive(Debug, Default)]
pub(super) struct BaggageCache {
    last: Mutex<Option<(Arc<Workload>, HeaderValue)>>,
}

impl BaggageCache {
    /// `workload`'s header value (empty if the workload has nothing that a
    /// header may carry).
    pub(super) fn of(&self, workload: &Arc<Workload>) -> HeaderValue {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((cached, value)) = &*last
            && Arc::ptr_eq(cached, workload)
        {
            return value.clone();
        }
        let value = HeaderValue::try_from(baggage(workload))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        *last = Some((workload.clone(), value.clone()));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            ..Workload::default()
        })
    }

    #[test]
    fn a_workload_keeps_its_value_and_a_new_version_gets_its_own() {
        let cache = BaggageCache::default();
        let first = workload("shell");
        let value = cache.of(&first);
        assert_eq!(value.to_str().unwrap(), baggage(&first));
        assert!(value.to_str().unwrap().contains("shell"));
        assert_eq!(cache.of(&first), value);
        // The same workload, reconfigured: a different Arc.
        let renamed = workload("echo");
        let value = cache.of(&renamed);
        assert!(value.to_str().unwrap().contains("echo"), "{value:?}");
        assert!(!value.to_str().unwrap().contains("shell"));
    }
}
