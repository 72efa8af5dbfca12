//! Arbitrary bytes as a stream of delta ADS requests (each prefixed by a length
//! byte): decoded as the server decodes them and fed to a session over a small
//! store, draining responses after each. Never a panic; every response decodes.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_api::prost::Message;
use xds_server::ads::Session;
use xds_server::{MeshConfig, Store, parse_manifest};

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: default, labels: {app: echo}}
spec: {serviceAccountName: echo, nodeName: node-a, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec: {selector: {matchLabels: {app: echo}}, rules: [{}]}
";

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = Store::new(MeshConfig::default());
        for object in parse_manifest(CLUSTER).expect("fixture").objects {
            store.apply(object).expect("fixture");
        }
        store
    })
}

fuzz_target!(|data: &[u8]| {
    let store = store();
    let mut session = Session::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        let Ok(request) = DeltaDiscoveryRequest::decode(message) else {
            continue;
        };
        if session.handle_request(&request, store).is_err() {
            return; // the server ends such a stream
        }
        for _ in 0..64 {
            match session.poll_response(store, 512) {
                Ok(Some(response)) => {
                    DeltaDiscoveryResponse::decode(response.to_bytes().as_slice())
                        .expect("responses decode");
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
});
