//! Configuration files: every component's `Config` is plain data with
//! `Default`, serde, `camelCase` field names (as Istio's and Kubernetes'
//! YAML), unknown fields refused, and durations written as humantime text
//! (`"10s"`, `"150ms"`, `"1h 30m"`; [`duration`]). Booleans are YAML 1.2's
//! (`true`, `false`): `off`, `no` and `y` are text. One YAML (or JSON) file can
//! hold the `Config`s of every component a binary runs.
//!
//! [`from_yaml`] reads such a file into any `Config`, with errors that name
//! the file and the path of the field that was wrong:
//!
//! ```
//! use mesh_net::HandshakeLimits;
//!
//! let limits: HandshakeLimits = mesh_net::config::from_yaml("timeout: 5s\n", "limits.yaml")?;
//! assert_eq!(limits.timeout, std::time::Duration::from_secs(5));
//! assert_eq!(limits.max_in_progress, 1024); // the default
//!
//! let wrong = mesh_net::config::from_yaml::<HandshakeLimits>("timeout: soon\n", "limits.yaml");
//! assert!(wrong.unwrap_err().to_string().starts_with("limits.yaml: timeout: "));
//! # Ok::<(), mesh_net::config::ConfigError>(())
//! ```

use serde::de::DeserializeOwned;

/// Durations as humantime text (`"10s"`, `"2m 30s"`), for
/// `#[serde(with = "mesh_net::config::duration")]`.
pub use humantime_serde as duration;

/// Why a configuration could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {}{message}", if path.is_empty() || path == "." { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    /// The file (or other source) it came from.
    pub source_name: String,
    /// The field that was wrong (`proxy.handshakeLimits.timeout`), empty
    /// when the text itself was not YAML.
    pub path: String,
    /// What was wrong.
    pub message: String,
}

/// Reads `text` (YAML, or JSON) from `source_name` into `T`.
pub fn from_yaml<T: DeserializeOwned>(text: &str, source_name: &str) -> Result<T, ConfigError> {
    let error = |path: String, message: String| ConfigError {
        source_name: source_name.to_owned(),
        path,
        message,
    };
    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        // YAML 1.2 booleans only: `off`, `no`, `y` stay text (a node called
        // `n` is not `false`).
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        serde_saphyr::from_str_with_options(text, options)
            .map_err(|err| error(String::new(), err.without_snippet().to_string()))?
    };
    serde_path_to_error::deserialize(value)
        .map_err(|err| error(err.path().to_string(), err.inner().to_string()))
}
