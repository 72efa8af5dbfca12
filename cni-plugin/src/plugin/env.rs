//! The `CNI_*` environment of one plugin call, read from variables the caller
//! hands over (the binary passes its process environment; nothing else here
//! reads it).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;

use super::error::{CniError, ErrorCode};

/// A CNI command (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Set up (for a chained plugin: capture the pod).
    Add,
    /// Tear down; best effort, idempotent.
    Del,
    /// Check that what ADD set up is still there.
    Check,
    /// Print the versions the plugin speaks.
    Version,
    /// Whether the plugin can serve ADD now (CNI 1.1.0).
    Status,
    /// Release everything not in the valid attachments (CNI 1.1.0).
    Gc,
}

impl Command {
    /// Reads `CNI_COMMAND`'s value.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        })
    }
}

/// The pod a call is for, from `CNI_ARGS` (`K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME`, `K8S_POD_UID`), as Kubernetes runtimes pass it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid, if the runtime passed one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The `CNI_*` variables of one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// From `(name, value)` pairs; only `CNI_*` names are kept, and a name
    /// or value that is not UTF-8 is dropped (then reported as missing).
    pub fn from_vars(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Self {
        vars.into_iter()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect()
    }

    /// One variable, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// `CNI_COMMAND`.
    pub fn command(&self) -> Result<Command, CniError> {
        let text = self.required("CNI_COMMAND")?;
        Command::parse(text).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                "unknown CNI_COMMAND",
                format!("CNI_COMMAND={text:?}: expected ADD, DEL, CHECK, VERSION, STATUS or GC"),
            )
        })
    }

    /// A variable that must be set and not empty.
    pub fn required(&self, name: &str) -> Result<&str, CniError> {
        match self.get(name) {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("{name} is not set"),
                format!("the runtime must set {name} for this command"),
            )),
        }
    }

    /// The pod from `CNI_ARGS`, if the runtime named one (a Kubernetes pod);
    /// `Ok(None)` for a container that is not a pod. A malformed `CNI_ARGS`
    /// is an error.
    pub fn pod(&self) -> Result<Option<PodRef>, CniError> {
        let args = parse_args(self.get("CNI_ARGS").unwrap_or_default())?;
        let (Some(namespace), Some(name)) =
            (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
        else {
            return Ok(None);
        };
        if namespace.is_empty() || name.is_empty() {
            return Ok(None);
        }
        Ok(Some(PodRef {
            namespace: (*namespace).to_owned(),
            name: (*name).to_owned(),
            uid: args
                .get("K8S_POD_UID")
                .copied()
                .unwrap_or_default()
                .to_owned(),
        }))
    }
}

impl FromIterator<(String, String)> for Environment {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(vars: I) -> Self {
        Self {
            vars: vars
                .into_iter()
                .filter(|(name, _)| name.starts_with("CNI_"))
                .collect(),
        }
    }
}

/// `K=V;K2=V2` (`CNI_ARGS`). Empty parts are skipped; a part without `=` is
/// an error naming it.
fn parse_args(text: &str) -> Result<BTreeMap<&str, &str>, CniError> {
    text.split(';')
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.split_once('=').ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "malformed CNI_ARGS",
                    format!("CNI_ARGS part {part:?} is not KEY=VALUE"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Environment {
        vars.iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn the_pod_comes_from_cni_args() {
        let env = env(&[(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=shell;K8S_POD_UID=u-1",
        )]);
        assert_eq!(
            env.pod().expect("args"),
            Some(PodRef {
                namespace: "default".into(),
                name: "shell".into(),
                uid: "u-1".into()
            })
        );
    }

    #[test]
    fn a_container_that_is_not_a_pod_has_no_pod() {
        assert_eq!(env(&[("CNI_ARGS", "IgnoreUnknown=1")]).pod(), Ok(None));
        assert_eq!(env(&[]).pod(), Ok(None));
    }

    #[test]
    fn malformed_args_name_the_part() {
        let err = env(&[("CNI_ARGS", "K8S_POD_NAME=a;garbage")])
            .pod()
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.details.contains("\"garbage\""), "{err}");
    }

    #[test]
    fn commands_and_missing_variables() {
        assert_eq!(env(&[("CNI_COMMAND", "GC")]).command(), Ok(Command::Gc));
        let err = env(&[("CNI_COMMAND", "add")]).command().unwrap_err();
        assert!(err.details.contains("\"add\""), "{err}");
        let err = env(&[("CNI_NETNS", "")]).required("CNI_NETNS").unwrap_err();
        assert_eq!(err.msg, "CNI_NETNS is not set");
    }

    proptest::proptest! {
        #[test]
        fn any_cni_args_parse_or_name_the_bad_part(text in ".{0,200}") {
            if let Err(err) = env(&[("CNI_ARGS", &text)]).pod() {
                proptest::prop_assert_eq!(err.code, ErrorCode::InvalidEnvironment);
                proptest::prop_assert!(err.details.starts_with("CNI_ARGS part "));
            }
        }

        #[test]
        fn the_pod_comes_back_from_the_args_a_runtime_writes(
            namespace in "[a-z0-9-]{1,20}",
            name in "[a-z0-9.-]{1,40}",
            uid in "[a-f0-9-]{0,36}",
        ) {
            let args = format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
            );
            let pod = env(&[("CNI_ARGS", &args)]).pod().expect("valid").expect("a pod");
            proptest::prop_assert_eq!(pod, PodRef { namespace, name, uid });
        }
    }

    #[test]
    fn only_cni_variables_are_kept() {
        let env = Environment::from_vars([
            (OsString::from("HOME"), OsString::from("/root")),
            (OsString::from("CNI_IFNAME"), OsString::from("eth0")),
        ]);
        assert_eq!(env.get("HOME"), None);
        assert_eq!(env.get("CNI_IFNAME"), Some("eth0"));
    }
}
