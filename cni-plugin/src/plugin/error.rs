//! The CNI spec's error result: a code from the spec's table (or 100 and up
//! for this plugin's own), a message and details, printed as JSON on stdout
//! with a non-zero exit status.

use serde::Serialize;

/// Error codes of the CNI spec (1.0.0 and 1.1.0) and this plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not one this plugin speaks.
    IncompatibleVersion,
    /// 2: a field of the configuration is not supported.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a `CNI_*` environment variable is missing or wrong.
    InvalidEnvironment,
    /// 5: an I/O failure.
    Io,
    /// 6: stdin could not be decoded.
    Decode,
    /// 7: the configuration is invalid.
    InvalidConfig,
    /// 11: try again later (the node agent is not reachable or not ready).
    TryAgainLater,
    /// 50: the plugin cannot serve ADD now (`STATUS`, CNI 1.1.0).
    NotAvailable,
    /// 100: the node agent could not capture the pod.
    CaptureFailed,
    /// 101: the pod's capture is missing or wrong (`CHECK`).
    CaptureMissing,
}

impl ErrorCode {
    /// The number the spec gives it.
    pub fn code(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::UnknownContainer => 3,
            Self::InvalidEnvironment => 4,
            Self::Io => 5,
            Self::Decode => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::NotAvailable => 50,
            Self::CaptureFailed => 100,
            Self::CaptureMissing => 101,
        }
    }
}

/// A failed plugin call, as the spec prints it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {} ({msg}){}", code.code(), if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's code.
    pub code: ErrorCode,
    /// A short message.
    pub msg: String,
    /// What was wrong with which input.
    pub details: String,
}

impl CniError {
    /// An error with `code`, a short `msg` and `details`.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error JSON for a configuration of `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Printed<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Printed {
            cni_version,
            code: self.code.code(),
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code.code()))
    }
}
