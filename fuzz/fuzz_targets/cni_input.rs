//! Arbitrary bytes as what the CNI plugin and the node agent read from
//! outside: a network configuration on stdin, `CNI_ARGS`, and a line on the
//! agent's socket. Never a panic; a configuration that parses names a
//! version the plugin speaks; a plugin call that fails prints the spec's
//! error JSON.

#![no_main]

use cni_plugin::plugin::{Environment, NetConf, SUPPORTED_VERSIONS, run};
use cni_plugin::protocol::{AgentRequest, AgentResponse, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = NetConf::parse(data) {
        assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
    }
    let _ = decode::<AgentRequest>(data, "request");
    let _ = decode::<AgentResponse>(data, "answer");
    let text = String::from_utf8_lossy(data);
    let env: Environment = [
        ("CNI_COMMAND".to_owned(), "VERSION".to_owned()),
        ("CNI_ARGS".to_owned(), text.into_owned()),
    ]
    .into_iter()
    .collect();
    let _ = env.pod();
    // VERSION and the configuration's errors never reach the agent.
    let outcome = run(&env, data);
    if outcome.exit_code != 0 {
        let error: serde_json::Value = serde_json::from_str(&outcome.stdout).expect("error JSON");
        assert!(error["code"].is_u64());
    }
});
