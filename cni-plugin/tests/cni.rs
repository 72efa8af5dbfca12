//! The CNI plugin as a container runtime calls it: a conflist chaining
//! Debian's `bridge` and `host-local` (containernetworking-plugins, under
//! /usr/lib/cni) and `podless-cni`, each run through `CNI_COMMAND` and stdin
//! inside a "node" network namespace, for pods in namespaces of their own;
//! the node agent in this process, and a ZDS peer standing for the node's
//! data plane (it acks, and checks the namespace it is handed).
//!
//! Needs root (namespaces, nftables, iptables), as CI runs. Every check runs
//! with both redirection backends.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::process::Stdio;

use cni_plugin::agent::{DATAPLANE_MODE_LABEL, labels};
use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncWriteExt;

both_backends!(
    an_enrolled_pod_is_captured_checked_and_released_through_the_chain,
    without_the_agent_add_says_try_again_later_except_in_excluded_namespaces,
    a_pod_that_is_not_enrolled_passes_untouched,
    relabelling_enrols_and_releases_a_running_pod,
    pods_stay_captured_across_an_agent_restart,
);

async fn an_enrolled_pod_is_captured_checked_and_released_through_the_chain(backend: Backend) {
    let mut node = Node::new(backend);
    node.start_agent();
    let shell = node.pod("default", "shell");
    let mut data_plane = data_plane(node.zds_socket(), vec![shell.for_data_plane()]).await;
    assert_eq!(next(&mut data_plane).await, Seen::SnapshotSent);
    node.wait_for_data_planes(1).await;

    let added = node.chain("ADD", &shell, None).await;
    assert!(added.exit_ok, "{added:?}");
    let result = added.json();
    assert_eq!(result["cniVersion"], "1.0.0");
    let address = result["ips"][0]["address"].as_str().expect("an address");
    assert!(address.starts_with("10.85.0."), "{result}");
    assert!(
        result["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .any(|interface| interface["name"] == "eth0"),
        "{result}"
    );
    assert!(node.captured(&shell));
    assert_eq!(next(&mut data_plane).await, shell.seen_add());

    let checked = node.chain("CHECK", &shell, Some(&result)).await;
    assert!(checked.exit_ok, "{checked:?}");

    // DEL releases the pod, and is idempotent.
    let deleted = node.chain("DEL", &shell, Some(&result)).await;
    assert!(deleted.exit_ok, "{deleted:?}");
    assert_eq!(next(&mut data_plane).await, Seen::Del(shell.uid.clone()));
    assert!(!node.captured(&shell));
    assert!(node.agent().view().pods.is_empty());
    let deleted = node.chain("DEL", &shell, Some(&result)).await;
    assert!(deleted.exit_ok, "{deleted:?}");

    // CHECK notices rules that went missing.
    let again = Pod {
        container_id: format!("{}-again", shell.container_id),
        ..shell
    };
    let added = node.chain("ADD", &again, None).await;
    assert!(added.exit_ok, "{added:?}");
    assert_eq!(next(&mut data_plane).await, again.seen_add());
    backend
        .redirection()
        .remove(&again.netns.open())
        .expect("remove");
    let checked = node.chain("CHECK", &again, Some(&added.json())).await;
    assert_eq!(checked.error_code(), 101, "{checked:?}");

    // DEL with the agent gone still succeeds.
    node.stop_agent().await;
    let deleted = node.chain("DEL", &again, Some(&added.json())).await;
    assert!(deleted.exit_ok, "{deleted:?}");
}

async fn without_the_agent_add_says_try_again_later_except_in_excluded_namespaces(
    backend: Backend,
) {
    let mut node = Node::new(backend);
    let shell = node.pod("default", "shell");
    let added = node.chain("ADD", &shell, None).await;
    assert_eq!(added.error_code(), 11, "{added:?}");
    assert!(
        added.json()["details"]
            .as_str()
            .expect("details")
            .contains("cni.sock")
    );
    assert!(!node.captured(&shell));
    node.chain("DEL", &shell, None).await;

    let system = node.pod("kube-system", "coredns");
    let added = node.chain("ADD", &system, None).await;
    assert!(added.exit_ok, "{added:?}");
    assert!(!node.captured(&system));
    node.chain("DEL", &system, None).await;

    // An agent with no data plane connected: try again later, no rules.
    node.start_agent();
    node.agent().ready(WAIT).await.expect("ready");
    let added = node.chain("ADD", &shell, None).await;
    assert_eq!(added.error_code(), 11, "{added:?}");
    assert!(added.stdout.contains("no node proxy"), "{added:?}");
    assert!(!node.captured(&shell));
    node.chain("DEL", &shell, None).await;
    node.stop_agent().await;
}

async fn a_pod_that_is_not_enrolled_passes_untouched(backend: Backend) {
    let mut node = Node::new(backend);
    node.start_agent();
    let pod = node.pod("plain", "web");
    let mut data_plane = data_plane(node.zds_socket(), Vec::new()).await;
    assert_eq!(next(&mut data_plane).await, Seen::SnapshotSent);
    let added = node.chain("ADD", &pod, None).await;
    assert!(added.exit_ok, "{added:?}");
    assert!(!node.captured(&pod));
    let view = node.agent().view();
    assert_eq!(view.pods.len(), 1);
    assert!(!view.pods[0].captured);
    let deleted = node.chain("DEL", &pod, Some(&added.json())).await;
    assert!(deleted.exit_ok, "{deleted:?}");
    assert!(node.agent().view().pods.is_empty());

    // A pod whose namespace the source does not know yet cannot be judged
    // (its namespace may enrol it): try again later, no rules.
    let unjudged = node.pod("nowhere", "web");
    let added = node.chain("ADD", &unjudged, None).await;
    assert_eq!(added.error_code(), 11, "{added:?}");
    assert!(!node.captured(&unjudged));
    node.chain("DEL", &unjudged, None).await;
    node.stop_agent().await;
}

async fn relabelling_enrols_and_releases_a_running_pod(backend: Backend) {
    let mut node = Node::new(backend);
    node.start_agent();
    let pod = node.pod("plain", "web");
    let mut data_plane = data_plane(node.zds_socket(), vec![pod.for_data_plane()]).await;
    assert_eq!(next(&mut data_plane).await, Seen::SnapshotSent);
    let added = node.chain("ADD", &pod, None).await;
    assert!(added.exit_ok, "{added:?}");
    assert!(!node.captured(&pod));

    node.pods.set_pod(
        "plain",
        "web",
        "web",
        labels([(DATAPLANE_MODE_LABEL, "ambient")]),
    );
    assert_eq!(next(&mut data_plane).await, pod.seen_add());
    assert!(node.captured(&pod));

    node.pods.set_pod("plain", "web", "web", BTreeMap::new());
    assert_eq!(next(&mut data_plane).await, Seen::Del(pod.uid.clone()));
    assert!(!node.captured(&pod));
    node.chain("DEL", &pod, Some(&added.json())).await;
    node.stop_agent().await;
}

async fn pods_stay_captured_across_an_agent_restart(backend: Backend) {
    let mut node = Node::new(backend);
    node.start_agent();
    let shell = node.pod("default", "shell");
    let mut first = data_plane(node.zds_socket(), vec![shell.for_data_plane()]).await;
    assert_eq!(next(&mut first).await, Seen::SnapshotSent);
    node.wait_for_data_planes(1).await;
    let added = node.chain("ADD", &shell, None).await;
    assert!(added.exit_ok, "{added:?}");
    assert_eq!(next(&mut first).await, shell.seen_add());

    node.stop_agent().await;
    assert!(node.captured(&shell), "stopping the agent changes no pod");
    node.start_agent();
    node.agent().ready(WAIT).await.expect("ready");
    let view = node.agent().view();
    assert_eq!(view.pods.len(), 1);
    assert!(view.pods[0].captured);
    assert!(node.captured(&shell));
    // The data plane reconnects and is given the pod again.
    let mut second = data_plane(node.zds_socket(), vec![shell.for_data_plane()]).await;
    assert_eq!(next(&mut second).await, shell.seen_add());
    assert_eq!(next(&mut second).await, Seen::SnapshotSent);
    node.chain("DEL", &shell, Some(&added.json())).await;
    assert_eq!(next(&mut second).await, Seen::Del(shell.uid.clone()));
    node.stop_agent().await;
}

/// Calls of our plugin alone, with a hand-made previous result.
mod plugin_alone {
    use super::*;

    fn conf(node: &Node, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "podnet", "type": "podless-cni",
            "agentSocket": node.agent_socket(),
            "prevResult": {"cniVersion": version, "ips": [{"address": "10.85.0.9/24"}]},
        })
    }

    fn env<'a>(command: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c-1"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=shell;K8S_POD_UID=u-1",
            ),
        ]
    }

    #[test]
    fn help_says_what_it_is_and_a_stray_argument_is_refused() {
        let help = test_support::help(std::path::Path::new(PLUGIN));
        assert!(help.contains("agentSocket"), "{help}");
        let stray = std::process::Command::new(PLUGIN)
            .arg("ADD")
            .output()
            .expect("run");
        assert_eq!(stray.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&stray.stderr).contains("CNI_COMMAND"));
    }

    #[tokio::test]
    async fn version_lists_both_spec_versions() {
        let node = Node::new(Backend::Nftables);
        let called = node
            .call(
                "podless-cni",
                &[("CNI_COMMAND", "VERSION")],
                &json!({"cniVersion": "1.0.0"}),
            )
            .await;
        assert!(called.exit_ok, "{called:?}");
        assert_eq!(
            called.json(),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
    }

    #[tokio::test]
    async fn bad_input_gets_the_specs_error_codes() {
        let node = Node::new(Backend::Nftables);
        let pod = TestNetns::new("pod");
        let netns = pod.path();
        let add = env("ADD", &netns);
        // JSON, but not an object.
        let called = node.call("podless-cni", &add, &json!("{")).await;
        assert_eq!(called.error_code(), 7, "{called:?}");
        let mut program = tokio::process::Command::new(PLUGIN);
        program
            .env_clear()
            .envs(add.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = program.spawn().expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"{not json")
            .await
            .expect("write");
        let output = child.wait_with_output().await.expect("output");
        assert!(!output.status.success());
        let error: Value = serde_json::from_slice(&output.stdout).expect("error JSON");
        assert_eq!(error["code"], 6, "{error}");
        // An unsupported version.
        let mut old = conf(&node, "1.0.0");
        old["cniVersion"] = "0.3.1".into();
        let called = node.call("podless-cni", &add, &old).await;
        assert_eq!(called.error_code(), 1, "{called:?}");
        assert!(called.stdout.contains("0.3.1"), "{called:?}");
        // No CNI_NETNS on ADD.
        let without_netns: Vec<_> = add
            .iter()
            .copied()
            .filter(|(name, _)| *name != "CNI_NETNS")
            .collect();
        let called = node
            .call("podless-cni", &without_netns, &conf(&node, "1.0.0"))
            .await;
        assert_eq!(called.error_code(), 4, "{called:?}");
        assert!(called.stdout.contains("CNI_NETNS"), "{called:?}");
        // Not chained.
        let mut alone = conf(&node, "1.0.0");
        alone.as_object_mut().expect("object").remove("prevResult");
        let called = node.call("podless-cni", &add, &alone).await;
        assert_eq!(called.error_code(), 7, "{called:?}");
        assert!(called.stdout.contains("prevResult"), "{called:?}");
        // An unknown command.
        let called = node
            .call("podless-cni", &env("UPDATE", &netns), &conf(&node, "1.0.0"))
            .await;
        assert_eq!(called.error_code(), 4, "{called:?}");
    }

    #[tokio::test]
    async fn status_and_gc_follow_the_agent() {
        let mut node = Node::new(Backend::Nftables);
        let status = env("STATUS", "");
        let called = node
            .call("podless-cni", &status, &conf(&node, "1.1.0"))
            .await;
        assert_eq!(called.error_code(), 50, "{called:?}");
        // STATUS is CNI 1.1.0's.
        let called = node
            .call("podless-cni", &status, &conf(&node, "1.0.0"))
            .await;
        assert_eq!(called.error_code(), 1, "{called:?}");

        node.start_agent();
        let called = node
            .call("podless-cni", &status, &conf(&node, "1.1.0"))
            .await;
        assert_eq!(called.error_code(), 50, "no data plane yet: {called:?}");
        let shell = node.pod("default", "shell");
        let mut data_plane = data_plane(node.zds_socket(), vec![shell.for_data_plane()]).await;
        assert_eq!(next(&mut data_plane).await, Seen::SnapshotSent);
        node.wait_for_data_planes(1).await;
        let called = node
            .call("podless-cni", &status, &conf(&node, "1.1.0"))
            .await;
        assert!(called.exit_ok, "{called:?}");

        // A pod the runtime no longer lists is collected.
        let netns = shell.netns.path();
        let args = format!(
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=shell;K8S_POD_UID={}",
            shell.uid
        );
        let mut add = env("ADD", &netns);
        add.retain(|(name, _)| *name != "CNI_ARGS");
        add.push(("CNI_ARGS", &args));
        let called = node.call("podless-cni", &add, &conf(&node, "1.1.0")).await;
        assert!(called.exit_ok, "{called:?}");
        assert_eq!(next(&mut data_plane).await, shell.seen_add());
        // Without the runtime's list, nothing is collected.
        let called = node
            .call("podless-cni", &env("GC", ""), &conf(&node, "1.1.0"))
            .await;
        assert!(called.exit_ok, "{called:?}");
        assert!(node.captured(&shell), "GC without a list released a pod");
        let mut gc = conf(&node, "1.1.0");
        gc["cni.dev/valid-attachments"] = json!([{"containerID": "other", "ifname": "eth0"}]);
        let called = node.call("podless-cni", &env("GC", ""), &gc).await;
        assert!(called.exit_ok, "{called:?}");
        assert_eq!(next(&mut data_plane).await, Seen::Del(shell.uid.clone()));
        assert!(!node.captured(&shell));
        node.stop_agent().await;
    }
}
