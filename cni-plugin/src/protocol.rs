//! What the CNI plugin and the node agent say to each other on the agent's
//! local socket: one JSON request line, one JSON response line, each at most
//! [`MAX_LINE`] bytes. The agent is the only listener; the plugin connects
//! once per call.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::plugin::PodRef;

/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// Where a pod's network is attached: the runtime's container id and the
/// interface (as the CNI spec's attachments are keyed).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attachment {
    /// `CNI_CONTAINERID` (`containerID` in the spec's GC list).
    #[serde(alias = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// A pod's attachment as the plugin sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodAttachment {
    /// The network's name (the configuration's `name`).
    pub network: String,
    /// The attachment.
    pub attachment: Attachment,
    /// The pod's network namespace (`CNI_NETNS`; may be gone on DEL).
    #[serde(default)]
    pub netns: Option<String>,
    /// The pod.
    pub pod: PodRef,
    /// The pod's addresses, from the previous plugins' result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// A request from the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "camelCase", deny_unknown_fields)]
pub enum AgentRequest {
    /// ADD: capture the pod if it is enrolled.
    Add(PodAttachment),
    /// DEL: release the pod (best effort).
    Del(PodAttachment),
    /// CHECK: is the pod captured as it should be?
    Check(PodAttachment),
    /// STATUS: can the agent capture pods now?
    Status,
    /// GC: release every pod of `network` whose attachment is not listed.
    Gc {
        /// The network's name.
        network: String,
        /// The attachments the runtime still has on it.
        valid: Vec<Attachment>,
    },
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase", deny_unknown_fields)]
pub enum AgentResponse {
    /// Done: the pod is captured (ADD, CHECK), released (DEL), the agent is
    /// ready (STATUS) or collected (GC).
    Ok,
    /// The pod is not enrolled in the mesh: nothing was done (ADD, CHECK).
    NotEnrolled,
    /// The agent cannot do it now; the runtime should try again later (no
    /// data plane connected, the pod not known yet, the agent not ready).
    Unavailable {
        /// Why.
        message: String,
    },
    /// It failed (an enrolled pod's capture, a CHECK that found no capture).
    Failed {
        /// What failed.
        message: String,
    },
}

/// Reads one request or response line, with an error naming what was wrong.
pub fn decode<'de, T: Deserialize<'de>>(line: &'de [u8], what: &str) -> Result<T, String> {
    if line.len() > MAX_LINE {
        return Err(format!("{what} longer than {MAX_LINE} bytes"));
    }
    serde_json::from_slice(line).map_err(|err| format!("malformed {what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_name_what_was_wrong() {
        let add = AgentRequest::Add(PodAttachment {
            network: "podnet".into(),
            attachment: Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            netns: Some("/var/run/netns/cni-1".into()),
            pod: PodRef {
                namespace: "default".into(),
                name: "shell".into(),
                uid: "u1".into(),
            },
            ips: vec!["10.0.0.2".parse().expect("ip")],
        });
        let line = serde_json::to_vec(&add).expect("encode");
        assert_eq!(decode::<AgentRequest>(&line, "request"), Ok(add));
        let err = decode::<AgentRequest>(br#"{"request":"add","bogus":1}"#, "request").unwrap_err();
        assert!(err.starts_with("malformed request: "), "{err}");
        let gc: AgentRequest = decode(
            br#"{"request":"gc","network":"podnet","valid":[{"containerID":"c","ifname":"eth0"}]}"#,
            "request",
        )
        .expect("gc");
        assert!(
            matches!(gc, AgentRequest::Gc { valid, network } if valid.len() == 1 && network == "podnet")
        );
    }
}
