//! Properties of the store and the delta protocol, over random clusters and
//! random change sequences:
//! - incremental updates publish exactly what a fresh store built from the
//!   final objects publishes (in any order);
//! - a wildcard client that applies every response, however responses are
//!   split and interleaved with changes, ends up holding exactly the store;
//! - manifest reading never panics, and reports the document at fault.

use std::collections::BTreeMap;

use mesh_api::ResourceType;
use mesh_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_api::prost::Message;
use proptest::prelude::*;
use xds_server::ads::Session;
use xds_server::{Kind, MeshConfig, Object, ObjectKey, Store, parse_manifest};

#[derive(Clone, Debug)]
enum Op {
    Apply(Spec),
    Delete(Kind, usize),
}

/// A small object description; the index picks the name (and a pod's IP).
#[derive(Clone, Debug)]
enum Spec {
    Namespace {
        index: usize,
        ambient: bool,
    },
    Pod {
        index: usize,
        namespace: usize,
        app: usize,
        ready: bool,
        named_port: bool,
    },
    Service {
        index: usize,
        namespace: usize,
        app: usize,
        headless: bool,
    },
    Policy {
        index: usize,
        namespace: usize,
        app: Option<usize>,
        deny: bool,
    },
}

impl Spec {
    fn yaml(&self) -> String {
        match self {
            Self::Namespace { index, ambient } => format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{index}\n  labels:\n    istio.io/dataplane-mode: {}\n",
                if *ambient { "ambient" } else { "none" }
            ),
            Self::Pod {
                index,
                namespace,
                app,
                ready,
                named_port,
            } => format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{index}\n  namespace: ns-{namespace}\n  labels:\n    app: app-{app}\nspec:\n  serviceAccountName: sa-{app}\n  nodeName: node-{}\n  containers:\n  - name: c\n    ports:\n    - name: {}\n      containerPort: {}\nstatus:\n  podIP: 10.0.{namespace}.{index}\n  conditions:\n  - type: Ready\n    status: \"{}\"\n",
                index % 2,
                if *named_port { "http" } else { "other" },
                8000 + index,
                if *ready { "True" } else { "False" }
            ),
            Self::Service {
                index,
                namespace,
                app,
                headless,
            } => format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{index}\n  namespace: ns-{namespace}\nspec:\n  clusterIP: {}\n  selector:\n    app: app-{app}\n  ports:\n  - port: 80\n    targetPort: http\n  - port: 81\n    targetPort: 9090\n",
                if *headless {
                    "None".to_owned()
                } else {
                    format!("10.96.{namespace}.{index}")
                }
            ),
            Self::Policy {
                index,
                namespace,
                app,
                deny,
            } => format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: pol-{index}\n  namespace: {}\nspec:\n{}  action: {}\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/ns-0/sa/sa-0]\n",
                if *namespace == 3 {
                    "istio-system".to_owned()
                } else {
                    format!("ns-{namespace}")
                },
                app.map(|app| format!("  selector:\n    matchLabels:\n      app: app-{app}\n"))
                    .unwrap_or_default(),
                if *deny { "DENY" } else { "ALLOW" }
            ),
        }
    }

    fn object(&self) -> Object {
        let mut manifest = parse_manifest(&self.yaml()).expect("YAML");
        assert!(manifest.errors.is_empty(), "{:?}", manifest.errors);
        manifest.objects.pop().expect("one object")
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (0..3usize, any::<bool>()).prop_map(|(index, ambient)| Spec::Namespace { index, ambient }),
        (
            0..8usize,
            0..3usize,
            0..2usize,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(index, namespace, app, ready, named_port)| Spec::Pod {
                index,
                namespace,
                app,
                ready,
                named_port
            }),
        (0..3usize, 0..3usize, 0..2usize, any::<bool>()).prop_map(
            |(index, namespace, app, headless)| Spec::Service {
                index,
                namespace,
                app,
                headless
            }
        ),
        (
            0..3usize,
            0..4usize,
            proptest::option::of(0..2usize),
            any::<bool>()
        )
            .prop_map(|(index, namespace, app, deny)| Spec::Policy {
                index,
                namespace,
                app,
                deny
            }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => spec().prop_map(Op::Apply),
        1 => (prop_oneof![Just(Kind::Namespace), Just(Kind::Pod), Just(Kind::Service), Just(Kind::AuthorizationPolicy)], 0..8usize)
            .prop_map(|(kind, index)| Op::Delete(kind, index)),
    ]
}

/// The key a spec's object has (namespaces of pods etc. come from the spec).
fn object_key(spec: &Spec) -> ObjectKey {
    spec.object().key()
}

fn delete_keys(kind: Kind, index: usize) -> Vec<ObjectKey> {
    match kind {
        Kind::Namespace => vec![ObjectKey::namespace(format!("ns-{index}"))],
        Kind::Pod => (0..3)
            .map(|ns| ObjectKey::new(kind, format!("ns-{ns}"), format!("pod-{index}")))
            .collect(),
        Kind::Service => (0..3)
            .map(|ns| ObjectKey::new(kind, format!("ns-{ns}"), format!("svc-{index}")))
            .collect(),
        _ => (0..3)
            .map(|ns| format!("ns-{ns}"))
            .chain(["istio-system".to_owned()])
            .map(|ns| ObjectKey::new(kind, ns, format!("pol-{index}")))
            .collect(),
    }
}

/// Applies `ops` to `store`; returns the objects that remain, by key.
fn run(store: &Store, ops: &[Op]) -> BTreeMap<ObjectKey, Spec> {
    let mut live: BTreeMap<ObjectKey, Spec> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Apply(spec) => {
                // A pod or service moving namespace is a different object.
                store.apply(spec.object()).expect("valid object");
                live.insert(object_key(spec), spec.clone());
            }
            Op::Delete(kind, index) => {
                for key in delete_keys(*kind, *index) {
                    store.delete(&key);
                    live.remove(&key);
                }
            }
        }
    }
    live
}

fn published(store: &Store) -> [BTreeMap<String, String>; 2] {
    [
        store.versions(ResourceType::Address),
        store.versions(ResourceType::Authorization),
    ]
}

/// What a wildcard client holds, from the responses it applied.
#[derive(Default)]
struct Client {
    held: [BTreeMap<String, String>; 2],
}

impl Client {
    fn apply(&mut self, bytes: &[u8]) {
        let response = DeltaDiscoveryResponse::decode(bytes).expect("a valid response");
        let index = match response.type_url.as_str() {
            mesh_api::type_url::ADDRESS => 0,
            mesh_api::type_url::AUTHORIZATION => 1,
            other => panic!("type {other}"),
        };
        for name in &response.removed_resources {
            assert!(
                response.resources.iter().all(|r| r.name != *name),
                "{name} both sent and removed in one response"
            );
            self.held[index].remove(name);
        }
        for resource in response.resources {
            self.held[index].insert(resource.name, resource.version);
        }
    }
}

fn subscribe(session: &mut Session, store: &Store) {
    for type_url in [
        mesh_api::type_url::ADDRESS,
        mesh_api::type_url::AUTHORIZATION,
    ] {
        let request = DeltaDiscoveryRequest {
            type_url: type_url.into(),
            ..DeltaDiscoveryRequest::default()
        };
        session.handle_request(&request, store).expect("subscribe");
    }
}

fn drain(session: &mut Session, store: &Store, client: &mut Client, max_bytes: usize) {
    while let Some(response) = session.poll_response(store, max_bytes).expect("not behind") {
        client.apply(&response.to_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_updates_equal_a_fresh_build(ops in proptest::collection::vec(op(), 1..40)) {
        let store = Store::new(MeshConfig::default());
        let live = run(&store, &ops);
        let fresh = Store::new(MeshConfig::default());
        // The fresh store gets the survivors in reverse key order: order must not matter.
        for spec in live.values().rev() {
            fresh.apply(spec.object()).expect("valid object");
        }
        prop_assert_eq!(published(&store), published(&fresh));
    }

    #[test]
    fn a_wildcard_client_converges_on_the_store(
        before in proptest::collection::vec(op(), 0..20),
        batches in proptest::collection::vec((proptest::collection::vec(op(), 0..6), 0..3usize), 1..8),
        max_bytes in 1..4000usize,
    ) {
        let store = Store::new(MeshConfig::default());
        run(&store, &before);
        let mut session = Session::new();
        let mut client = Client::default();
        subscribe(&mut session, &store);
        for (ops, polls) in &batches {
            run(&store, ops);
            // Some responses now, the rest later: changes pile up in between.
            for _ in 0..*polls {
                if let Some(response) = session.poll_response(&store, max_bytes).expect("not behind") {
                    client.apply(&response.to_bytes());
                }
            }
        }
        drain(&mut session, &store, &mut client, max_bytes);
        prop_assert_eq!(&client.held, &published(&store));
    }

    #[test]
    fn manifest_reading_never_panics(text in "\\PC{0,400}") {
        let _ = parse_manifest(&text);
    }

    #[test]
    fn a_bad_document_is_reported_by_position_and_the_others_kept(
        good_before in 0..3usize,
        good_after in 0..3usize,
    ) {
        let pod = |index: usize| Spec::Pod { index, namespace: 0, app: 0, ready: true, named_port: true }.yaml();
        let mut documents: Vec<String> = (0..good_before).map(pod).collect();
        documents.push("apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\nspec:\n  containers: 7\n".into());
        documents.extend((good_before..good_before + good_after).map(pod));
        let manifest = parse_manifest(&documents.join("---\n")).expect("YAML");
        prop_assert_eq!(manifest.objects.len(), good_before + good_after);
        prop_assert_eq!(manifest.errors.len(), 1);
        let error = &manifest.errors[0];
        prop_assert_eq!(error.document, Some(good_before + 1));
        prop_assert!(error.object.contains("Pod default/broken") || error.object.contains("broken"), "{}", error);
        prop_assert!(error.path.contains("spec.containers"), "{}", error);
    }
}
