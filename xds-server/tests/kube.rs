//! The Kubernetes source against kube's mock service: lists and watches of
//! Namespaces, Pods, Services and AuthorizationPolicies, applied to the store;
//! a relist after the watch expired drops what disappeared meanwhile.

#![cfg(feature = "kube")]

mod common;

use std::collections::HashMap;

use common::eventually;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use mesh_api::ResourceType;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use xds_server::source::KubeWatcher;
use xds_server::{ConfigSource, MeshConfig, Store};

fn pod(name: &str, version: &str, app: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": version,
                     "labels": {"app": app}},
        "spec": {"serviceAccountName": name, "nodeName": "node-a",
                 "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn list(kind: &str, version: &str, items: Vec<Value>) -> Value {
    json!({"kind": format!("{kind}List"), "metadata": {"resourceVersion": version}, "items": Value::Array(items)})
}

fn event(kind: &str, object: Value) -> Value {
    let mut event = serde_json::Map::new();
    event.insert("type".into(), kind.into());
    event.insert("object".into(), object);
    Value::Object(event)
}

fn reply(value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("json")))
        .expect("response")
}

fn stream(events: &[Value]) -> Response<Body> {
    let mut body = Vec::new();
    for event in events {
        serde_json::to_writer(&mut body, event).expect("json");
        body.push(b'\n');
    }
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::from(body))
        .expect("response")
}

/// What the mock API server answers, per resource path: the lists in order,
/// and the watches in order (later requests wait forever).
struct Script {
    lists: Vec<Value>,
    watches: Vec<Response<Body>>,
}

fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    mut scripts: HashMap<&'static str, Script>,
) {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let watch = request
                .uri()
                .query()
                .is_some_and(|q| q.contains("watch=true"));
            let Some(script) = scripts.get_mut(path.as_str()) else {
                panic!("unexpected request {}", request.uri());
            };
            let answer = if watch {
                (!script.watches.is_empty()).then(|| script.watches.remove(0))
            } else {
                (!script.lists.is_empty()).then(|| reply(&script.lists.remove(0)))
            };
            match answer {
                Some(answer) => respond.send_response(answer),
                None => held.push(respond),
            }
        }
    });
}

#[tokio::test]
async fn lists_and_watches_reach_the_store_and_a_relist_drops_what_went() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let expired = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
        "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}});
    let scripts = HashMap::from([
        (
            "/api/v1/namespaces",
            Script {
                lists: vec![list(
                    "Namespace",
                    "10",
                    vec![json!({"metadata": {"name": "default",
                    "resourceVersion": "9", "labels": {"istio.io/dataplane-mode": "ambient"}}})],
                )],
                watches: vec![],
            },
        ),
        (
            "/api/v1/services",
            Script {
                lists: vec![list(
                    "Service",
                    "10",
                    vec![json!({"metadata": {"name": "echo",
                    "namespace": "default", "resourceVersion": "8"},
                    "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "echo"},
                             "ports": [{"port": 80, "targetPort": "http"}]}})],
                )],
                watches: vec![],
            },
        ),
        (
            "/api/v1/pods",
            Script {
                lists: vec![
                    list("Pod", "20", vec![pod("echo-1", "11", "echo", "10.0.0.1")]),
                    // After the watch expired: echo-1 went while we were away.
                    list("Pod", "40", vec![pod("echo-2", "22", "echo", "10.0.0.2")]),
                ],
                watches: vec![
                    stream(&[
                        event("ADDED", pod("echo-2", "21", "echo", "10.0.0.2")),
                        event("MODIFIED", pod("echo-2", "22", "echo", "10.0.0.2")),
                        event("ADDED", pod("bad", "23", "echo", "ten.zero.zero.one")),
                    ]),
                    stream(&[expired]),
                ],
            },
        ),
        (
            "/apis/security.istio.io/v1/authorizationpolicies",
            Script {
                lists: vec![json!({"metadata": {"resourceVersion": "30"}, "items": [
                    {"metadata": {"name": "allow-shell", "namespace": "default", "resourceVersion": "29"},
                     "spec": {"selector": {"matchLabels": {"app": "echo"}},
                              "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/shell"]}}]}]}}
                ]})],
                watches: vec![stream(&[
                    // Invalid (a singular `namespace`): refused, logged, skipped.
                    event(
                        "ADDED",
                        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "typo", "namespace": "default", "resourceVersion": "31"},
                        "spec": {"rules": [{"from": [{"source": {"namespace": "x"}}]}]}}),
                    ),
                    event(
                        "ADDED",
                        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "deny-db", "namespace": "default", "resourceVersion": "32"},
                        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}]}}),
                    ),
                    event(
                        "DELETED",
                        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "allow-shell", "namespace": "default", "resourceVersion": "33"},
                        "spec": {}}),
                    ),
                ])],
            },
        ),
    ]);
    serve(handle, scripts);

    let store = Store::new(MeshConfig::default());
    let shutdown = CancellationToken::new();
    let source = Box::new(KubeWatcher::new(client));
    assert_eq!(source.describe(), "Kubernetes API");
    let running = tokio::spawn(source.run(store.clone(), shutdown.clone()));

    let addresses = || store.versions(ResourceType::Address);
    let policies = || store.versions(ResourceType::Authorization);
    eventually("the deny policy arrives and allow-shell goes", || {
        let policies = policies();
        policies.contains_key("default/deny-db") && !policies.contains_key("default/allow-shell")
    })
    .await;
    assert!(
        !policies().contains_key("default/typo"),
        "invalid policies are skipped"
    );
    eventually("echo-1 goes with the relist; echo-2 stays", || {
        let addresses = addresses();
        addresses.contains_key("Kubernetes//Pod/default/echo-2")
            && !addresses.contains_key("Kubernetes//Pod/default/echo-1")
    })
    .await;
    let addresses = addresses();
    assert!(addresses.contains_key("default/echo.default.svc.cluster.local"));
    assert!(
        !addresses.contains_key("Kubernetes//Pod/default/bad"),
        "a pod with a bad IP is skipped"
    );
    assert_eq!(store.stats().workloads, 1);

    shutdown.cancel();
    running.await.expect("join").expect("source");
}
