//! Applying one delta response to the state, without I/O: decode every resource,
//! apply what is valid, remember versions of what was accepted, and answer with
//! an ACK, or a NACK that names every refused resource and why.

use std::collections::BTreeMap;

use mesh_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_api::rpc::Status as RpcStatus;
use mesh_api::security::Authorization;
use mesh_api::workload::Address;
use mesh_api::{ResourceType, any};

use crate::state::{ProxyState, Rejected};

/// The resources the client holds, by type: name → version. Sent back as
/// `initial_resource_versions` on reconnect so the server sends only changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownVersions {
    by_type: [BTreeMap<String, String>; 2],
}

impl KnownVersions {
    /// The versions held of `kind`.
    pub fn of(&self, kind: ResourceType) -> &BTreeMap<String, String> {
        &self.by_type[index(kind)]
    }

    fn of_mut(&mut self, kind: ResourceType) -> &mut BTreeMap<String, String> {
        &mut self.by_type[index(kind)]
    }
}

fn index(kind: ResourceType) -> usize {
    match kind {
        ResourceType::Address => 0,
        ResourceType::Authorization => 1,
    }
}

/// Applies `response` to `state`; returns the ACK or NACK to send. Refused
/// resources leave the state as it was and are not recorded as held (so a
/// reconnect asks for them again).
pub fn apply_response(
    state: &mut ProxyState,
    known: &mut KnownVersions,
    response: &DeltaDiscoveryResponse,
) -> DeltaDiscoveryRequest {
    let answer = |error: Option<String>| DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail: error.map(|message| RpcStatus {
            code: 3, // INVALID_ARGUMENT
            message,
            details: Vec::new(),
        }),
        ..DeltaDiscoveryRequest::default()
    };
    let Ok(kind) = response.type_url.parse::<ResourceType>() else {
        return answer(Some(format!("unknown type URL {:?}", response.type_url)));
    };
    let mut rejected: Vec<Rejected> = Vec::new();
    for name in &response.removed_resources {
        state.remove(kind, name);
        known.of_mut(kind).remove(name);
    }
    for resource in &response.resources {
        let refuse = |reason: String| Rejected {
            name: resource.name.clone(),
            reason,
        };
        let Some(body) = &resource.resource else {
            rejected.push(refuse("no resource body".into()));
            continue;
        };
        let applied = match kind {
            ResourceType::Address => any::unpack::<Address>(body)
                .map_err(|err| refuse(err.to_string()))
                .and_then(|address| state.apply_address(&resource.name, address)),
            ResourceType::Authorization => any::unpack::<Authorization>(body)
                .map_err(|err| refuse(err.to_string()))
                .and_then(|policy| state.apply_authorization(&resource.name, &policy)),
        };
        match applied {
            Ok(()) => {
                known
                    .of_mut(kind)
                    .insert(resource.name.clone(), resource.version.clone());
            }
            Err(refused) => {
                known.of_mut(kind).remove(&resource.name);
                rejected.push(refused);
            }
        }
    }
    if rejected.is_empty() {
        answer(None)
    } else {
        for refused in &rejected {
            tracing::warn!(%kind, resource = %refused.name, reason = %refused.reason, "refused a resource");
        }
        answer(Some(
            rejected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::discovery::Resource;
    use mesh_api::prost_types::Any;
    use mesh_api::workload::{Workload, address};

    use super::*;

    fn workload_resource(uid: &str, ip: [u8; 4]) -> Resource {
        let address = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                name: "echo".into(),
                namespace: "default".into(),
                addresses: vec![ip.to_vec()],
                ..Workload::default()
            })),
        };
        Resource {
            name: uid.into(),
            version: "v1".into(),
            resource: Some(any::pack(&address)),
            aliases: Vec::new(),
        }
    }

    #[test]
    fn bad_resources_are_nacked_by_name_and_the_rest_applied() {
        let mut state = ProxyState::new();
        let mut known = KnownVersions::default();
        let garbage = Resource {
            name: "garbage".into(),
            version: "v1".into(),
            resource: Some(Any {
                type_url: mesh_api::type_url::ADDRESS.into(),
                value: vec![0xff, 0xff],
            }),
            aliases: Vec::new(),
        };
        let mut bad_ip = workload_resource("uid-2", [10, 0, 0, 2]);
        if let Some(body) = &mut bad_ip.resource {
            let mut address: Address = any::unpack(body).expect("decodes");
            if let Some(address::Type::Workload(workload)) = &mut address.r#type {
                workload.addresses = vec![vec![1, 2, 3]];
            }
            *body = any::pack(&address);
        }
        let response = DeltaDiscoveryResponse {
            type_url: mesh_api::type_url::ADDRESS.into(),
            nonce: "7".into(),
            resources: vec![workload_resource("uid-1", [10, 0, 0, 1]), garbage, bad_ip],
            ..DeltaDiscoveryResponse::default()
        };
        let answer = apply_response(&mut state, &mut known, &response);
        assert_eq!(answer.response_nonce, "7");
        let error = answer.error_detail.expect("a NACK").message;
        assert!(error.contains("garbage: "), "{error}");
        assert!(error.contains("uid-2: addresses"), "{error}");
        assert!(state.workload("uid-1").is_some(), "the good one applied");
        assert!(state.workload_by_ip("", [10, 0, 0, 1].into()).is_some());
        assert_eq!(
            known.of(ResourceType::Address).keys().collect::<Vec<_>>(),
            ["uid-1"],
            "refused resources are not held"
        );

        // Removal; an ACK.
        let response = DeltaDiscoveryResponse {
            type_url: mesh_api::type_url::ADDRESS.into(),
            nonce: "8".into(),
            removed_resources: vec!["uid-1".into()],
            ..DeltaDiscoveryResponse::default()
        };
        let answer = apply_response(&mut state, &mut known, &response);
        assert!(answer.error_detail.is_none());
        assert!(state.workload("uid-1").is_none());
        assert!(state.workload_by_ip("", [10, 0, 0, 1].into()).is_none());
        assert!(known.of(ResourceType::Address).is_empty());
    }
}
