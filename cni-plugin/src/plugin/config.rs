//! The network configuration on stdin: the spec's fields this plugin reads,
//! the previous plugins' result it passes on, and its own settings (where the
//! node agent listens, how long to wait for it, which namespaces never wait
//! for it). Other fields (`runtimeConfig`, `capabilities`, `args`) are the
//! runtime's and are ignored, as the spec expects of plugins.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::error::{CniError, ErrorCode};
use crate::protocol::Attachment;

/// The CNI spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

/// Where the node agent listens by default.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/podless/cni.sock";

/// How long a call waits for the node agent by default (it applies the rules
/// and waits for the data plane's ack, itself bounded by 5 s).
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The plugin's configuration, as the runtime passes it on stdin.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct NetConf {
    /// `cniVersion`: one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name`: the network's name.
    pub name: String,
    /// `type`: the plugin's binary name.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// `prevResult`: the previous plugins' result, passed on unchanged.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// `agentSocket`: the node agent's socket (default
    /// [`DEFAULT_AGENT_SOCKET`]).
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    /// `agentTimeout`: how long to wait for the agent (default 10 s).
    #[serde(default = "default_agent_timeout", with = "mesh_net::config::duration")]
    pub agent_timeout: Duration,
    /// `excludeNamespaces`: pods of these namespaces pass untouched, even
    /// with the agent down (default `["kube-system"]`).
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// `cni.dev/valid-attachments` (GC): what the runtime still has.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_agent_socket() -> PathBuf {
    DEFAULT_AGENT_SOCKET.into()
}

fn default_agent_timeout() -> Duration {
    DEFAULT_AGENT_TIMEOUT
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

impl NetConf {
    /// Reads stdin: JSON (else code 6), the fields right (else code 7,
    /// naming the field), a version this plugin speaks (else code 1).
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|err| {
            CniError::new(
                ErrorCode::Decode,
                "network configuration on stdin is not JSON",
                err.to_string(),
            )
        })?;
        let conf: Self = serde_path_to_error::deserialize(value).map_err(|err| {
            let path = err.path().to_string();
            CniError::new(
                ErrorCode::InvalidConfig,
                "invalid network configuration",
                if path == "." {
                    err.inner().to_string()
                } else {
                    format!("{path}: {}", err.inner())
                },
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "cniVersion {:?}: podless-cni speaks {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(" and ")
                ),
            ));
        }
        Ok(conf)
    }

    /// Whether pods of `namespace` pass untouched.
    pub fn excludes(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }

    /// Whether this configuration's version has `STATUS` and `GC` (1.1.0).
    pub fn has_status_and_gc(&self) -> bool {
        self.cni_version != "1.0.0"
    }

    /// The previous result, which a chained plugin must have (ADD, CHECK).
    pub fn require_prev_result(&self) -> Result<&Value, CniError> {
        match &self.prev_result {
            Some(result @ Value::Object(_)) => Ok(result),
            Some(_) => Err(CniError::new(
                ErrorCode::InvalidConfig,
                "invalid network configuration",
                "prevResult: not an object",
            )),
            None => Err(CniError::new(
                ErrorCode::InvalidConfig,
                "podless-cni is a chained plugin",
                "prevResult missing: list podless-cni after the plugins that set up the interface",
            )),
        }
    }

    /// The pod's addresses from the previous result's `ips`.
    pub fn prev_ips(&self) -> Vec<IpAddr> {
        let Some(ips) = self
            .prev_result
            .as_ref()
            .and_then(|result| result.get("ips"))
            .and_then(Value::as_array)
        else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| ip.get("address")?.as_str())
            .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_and_the_previous_result() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"podnet","type":"podless-cni",
                "runtimeConfig":{"x":1},
                "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.22.0.5/16"}]}}"#,
        )
        .expect("conf");
        assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(conf.agent_timeout, DEFAULT_AGENT_TIMEOUT);
        assert!(conf.excludes("kube-system"));
        assert_eq!(
            conf.prev_ips(),
            vec!["10.22.0.5".parse::<IpAddr>().expect("ip")]
        );
        assert!(!conf.has_status_and_gc());
    }

    #[test]
    fn bad_input_gets_the_specs_codes_and_names_the_field() {
        let err = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(err.code, ErrorCode::Decode);
        let err = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","agentTimeout":"soon"}"#,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        assert!(err.details.starts_with("agentTimeout: "), "{err}");
        let err = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
        assert!(err.details.contains("\"0.3.1\""), "{err}");
        let err = NetConf::parse(br#"{"cniVersion":"1.1.0","type":"t"}"#).unwrap_err();
        assert!(err.details.contains("name"), "{err}");
    }
}
