//! The chained CNI plugin (CNI 1.0.0 and 1.1.0, WIRE.md §7): [`run`] takes
//! one call of a container runtime (its `CNI_*` environment and stdin) and
//! gives what to print and the exit status. The `podless-cni` binary is a
//! thin shell around it, and the only place that reads the process
//! environment.
//!
//! - `ADD`: a pod in an excluded namespace, or a container that is not a
//!   pod, passes untouched. Otherwise the node agent is asked to capture the
//!   pod: captured or not enrolled, the previous result is passed on; a
//!   capture that failed fails the ADD (no enrolled pod ever runs
//!   uncaptured); the agent unreachable or not ready is "try again later"
//!   (code 11), so the runtime retries.
//! - `DEL`: the agent is told (best effort); always succeeds, also twice.
//! - `CHECK`: the agent confirms the capture of an enrolled pod.
//! - `VERSION`, `STATUS` (the agent can capture now), `GC` (the agent
//!   releases pods whose attachments the runtime no longer has).
//!
//! ```
//! use cni_plugin::plugin::{Environment, run};
//!
//! let env: Environment = [("CNI_COMMAND".to_owned(), "VERSION".to_owned())].into_iter().collect();
//! let outcome = run(&env, br#"{"cniVersion":"1.1.0"}"#);
//! assert_eq!(outcome.exit_code, 0);
//! assert!(outcome.stdout.contains(r#""supportedVersions":["1.0.0","1.1.0"]"#));
//! ```

mod agent_client;
mod config;
mod env;
mod error;

pub use config::{DEFAULT_AGENT_SOCKET, DEFAULT_AGENT_TIMEOUT, NetConf, SUPPORTED_VERSIONS};
pub use env::{Command, Environment, PodRef};
pub use error::{CniError, ErrorCode};

use serde_json::Value;

use crate::protocol::{AgentRequest, AgentResponse, Attachment, PodAttachment};

/// What a call prints on stdout and exits with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The result or error JSON (empty for DEL, CHECK, STATUS and GC on
    /// success).
    pub stdout: String,
    /// 0 on success, 1 on error.
    pub exit_code: i32,
    /// A line for the runtime's log (stderr), if something is worth saying:
    /// a DEL whose release the agent did not confirm, say.
    pub log: Option<String>,
}

/// Runs one plugin call.
pub fn run(env: &Environment, stdin: &[u8]) -> Outcome {
    // The version errors are reported in: the configuration's, when it can
    // be read.
    let version = || {
        serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|conf| conf.get("cniVersion")?.as_str().map(str::to_owned))
            .filter(|version| SUPPORTED_VERSIONS.contains(&version.as_str()))
            .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned())
    };
    match call(env, stdin) {
        Ok((stdout, log)) => Outcome {
            stdout,
            exit_code: 0,
            log,
        },
        Err(err) => Outcome {
            stdout: err.to_json(&version()),
            exit_code: 1,
            log: None,
        },
    }
}

fn call(env: &Environment, stdin: &[u8]) -> Result<(String, Option<String>), CniError> {
    let conf = || NetConf::parse(stdin);
    match env.command()? {
        Command::Version => Ok((version_json(stdin), None)),
        Command::Add => add(env, &conf()?).map(|out| (out, None)),
        // DEL never fails on what it is given: a pod must always be
        // deletable (an unreadable configuration is logged).
        Command::Del => Ok(match conf() {
            Ok(conf) => (String::new(), del(env, &conf)),
            Err(err) => (String::new(), Some(format!("DEL: {err}"))),
        }),
        Command::Check => check(env, &conf()?).map(|()| (String::new(), None)),
        Command::Status => status(&conf()?).map(|()| (String::new(), None)),
        Command::Gc => gc(&conf()?).map(|log| (String::new(), log)),
    }
}

/// The outcome when stdin could not be read at all.
pub fn run_failed_to_read(err: &std::io::Error) -> Outcome {
    Outcome {
        stdout: CniError::new(ErrorCode::Io, "cannot read stdin", err.to_string())
            .to_json(SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]),
        exit_code: 1,
        log: None,
    }
}

fn version_json(stdin: &[u8]) -> String {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|conf| conf.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned());
    serde_json::json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// The pod of an ADD, DEL or CHECK, and its attachment; `None` for a
/// container that is not a pod or a pod of an excluded namespace.
fn attachment(
    env: &Environment,
    conf: &NetConf,
    needs_netns: bool,
) -> Result<Option<PodAttachment>, CniError> {
    let container_id = env.required("CNI_CONTAINERID")?.to_owned();
    let ifname = env.required("CNI_IFNAME")?.to_owned();
    let netns = if needs_netns {
        Some(env.required("CNI_NETNS")?.to_owned())
    } else {
        env.get("CNI_NETNS")
            .filter(|netns| !netns.is_empty())
            .map(str::to_owned)
    };
    let Some(pod) = env.pod()? else {
        return Ok(None);
    };
    if conf.excludes(&pod.namespace) {
        return Ok(None);
    }
    Ok(Some(PodAttachment {
        network: conf.name.clone(),
        attachment: Attachment {
            container_id,
            ifname,
        },
        netns,
        pod,
        ips: conf.prev_ips(),
    }))
}

fn ask(conf: &NetConf, request: &AgentRequest) -> Result<AgentResponse, CniError> {
    agent_client::ask(&conf.agent_socket, conf.agent_timeout, request)
        .map_err(|err| CniError::new(ErrorCode::TryAgainLater, "node agent unreachable", err))
}

fn add(env: &Environment, conf: &NetConf) -> Result<String, CniError> {
    let mut result = conf.require_prev_result()?.clone();
    if let Some(pod) = attachment(env, conf, true)? {
        let name = pod.pod.to_string();
        match ask(conf, &AgentRequest::Add(pod))? {
            AgentResponse::Ok | AgentResponse::NotEnrolled => {}
            AgentResponse::Unavailable { message } => {
                return Err(CniError::new(
                    ErrorCode::TryAgainLater,
                    "node agent not ready",
                    format!("pod {name}: {message}"),
                ));
            }
            AgentResponse::Failed { message } => {
                return Err(CniError::new(
                    ErrorCode::CaptureFailed,
                    "pod capture failed",
                    format!("pod {name}: {message}"),
                ));
            }
        }
    }
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    Ok(result.to_string())
}

fn del(env: &Environment, conf: &NetConf) -> Option<String> {
    let pod = match attachment(env, conf, false) {
        Ok(Some(pod)) => pod,
        Ok(None) => return None,
        Err(err) => return Some(format!("DEL: {err}")),
    };
    let name = pod.pod.to_string();
    match ask(conf, &AgentRequest::Del(pod)) {
        Ok(AgentResponse::Ok | AgentResponse::NotEnrolled) => None,
        Ok(other) => Some(format!(
            "DEL of pod {name}: the node agent answered {other:?}"
        )),
        Err(err) => Some(format!("DEL of pod {name}: {err}")),
    }
}

fn check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    conf.require_prev_result()?;
    let Some(pod) = attachment(env, conf, true)? else {
        return Ok(());
    };
    let name = pod.pod.to_string();
    match ask(conf, &AgentRequest::Check(pod))? {
        AgentResponse::Ok | AgentResponse::NotEnrolled => Ok(()),
        AgentResponse::Unavailable { message } => Err(CniError::new(
            ErrorCode::TryAgainLater,
            "node agent not ready",
            format!("pod {name}: {message}"),
        )),
        AgentResponse::Failed { message } => Err(CniError::new(
            ErrorCode::CaptureMissing,
            "pod capture missing",
            format!("pod {name}: {message}"),
        )),
    }
}

fn needs_1_1(conf: &NetConf, command: Command) -> Result<(), CniError> {
    if conf.has_status_and_gc() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            "incompatible CNI version",
            format!(
                "{command} needs cniVersion 1.1.0; the configuration has {}",
                conf.cni_version
            ),
        ))
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1(conf, Command::Status)?;
    let not_available = |detail: String| {
        CniError::new(
            ErrorCode::NotAvailable,
            "podless-cni cannot capture pods now",
            detail,
        )
    };
    match agent_client::ask(
        &conf.agent_socket,
        conf.agent_timeout,
        &AgentRequest::Status,
    ) {
        Ok(AgentResponse::Ok) => Ok(()),
        Ok(AgentResponse::Unavailable { message } | AgentResponse::Failed { message }) => {
            Err(not_available(message))
        }
        Ok(other) => Err(not_available(format!("the node agent answered {other:?}"))),
        Err(err) => Err(not_available(err)),
    }
}

fn gc(conf: &NetConf) -> Result<Option<String>, CniError> {
    needs_1_1(conf, Command::Gc)?;
    // Without the list there is nothing to tell stale from live: collect
    // nothing (releasing everything would uncapture running pods).
    let Some(valid) = conf.valid_attachments.clone() else {
        return Ok(Some(
            "GC without cni.dev/valid-attachments: nothing collected".into(),
        ));
    };
    let network = conf.name.clone();
    // Best effort, like DEL: an agent that is down has nothing to collect
    // now, and will be asked again.
    Ok(match ask(conf, &AgentRequest::Gc { network, valid }) {
        Ok(AgentResponse::Ok) => None,
        Ok(other) => Some(format!("GC: the node agent answered {other:?}")),
        Err(err) => Some(format!("GC: {err}")),
    })
}
