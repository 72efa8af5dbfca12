//! A Kubernetes cluster as a config source (cargo feature `kube`): Pods,
//! Services, Namespaces and `security.istio.io/v1` AuthorizationPolicies
//! watched through kube-rs, into the store.
//!
//! The caller builds the [`kube::Client`] (and so chooses its TLS: enable
//! kube's `rustls-tls` and `aws-lc-rs` features in the binary for a real
//! cluster); this module reads no kubeconfig and no environment. Each kind has
//! its own watcher: a relist (at start, and after the watch expires) replaces
//! what the kind held, so objects deleted while disconnected go too. Objects the
//! store refuses (an invalid policy, a pod with a malformed IP) are logged and
//! skipped, keeping their previous version.

use std::collections::HashSet;
use std::fmt::Debug;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, TypeMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::{ConfigSource, SourceError};
use crate::object::{Kind, Object, ObjectKey, object_from_value};
use crate::store::Store;

/// The API resource of Istio's AuthorizationPolicy (no Rust type needed).
fn authorization_policy_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies")
}

/// Watches a cluster.
#[derive(Clone)]
pub struct KubeWatcher {
    client: Client,
}

impl Debug for KubeWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeWatcher").finish_non_exhaustive()
    }
}

impl KubeWatcher {
    /// A source over the cluster `client` talks to.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl ConfigSource for KubeWatcher {
    fn describe(&self) -> String {
        "Kubernetes API".to_owned()
    }

    fn run(
        self: Box<Self>,
        store: Store,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let client = self.client;
            let config = watcher::Config::default();
            let namespaces =
                watcher::watcher(Api::<Namespace>::all(client.clone()), config.clone())
                    .default_backoff()
                    .map(|event| {
                        event.map(|event| map_event(event, |ns| Object::Namespace(Box::new(ns))))
                    });
            let pods = watcher::watcher(Api::<Pod>::all(client.clone()), config.clone())
                .default_backoff()
                .map(|event| event.map(|event| map_event(event, |pod| Object::Pod(Box::new(pod)))));
            let services = watcher::watcher(Api::<Service>::all(client.clone()), config.clone())
                .default_backoff()
                .map(|event| {
                    event
                        .map(|event| map_event(event, |service| Object::Service(Box::new(service))))
                });
            let resource = authorization_policy_resource();
            let policies =
                watcher::watcher(Api::<DynamicObject>::all_with(client, &resource), config)
                    .default_backoff()
                    .map(move |event| event.map(|event| policy_event(event, &resource)));
            tokio::join!(
                follow(Kind::Namespace, namespaces, &store, &shutdown),
                follow(Kind::Pod, pods, &store, &shutdown),
                follow(Kind::Service, services, &store, &shutdown),
                follow(Kind::AuthorizationPolicy, policies, &store, &shutdown),
            );
            Ok(())
        })
    }
}

/// A watch event, with the object converted (or why it could not be).
enum Change {
    /// A relist starts.
    Relist,
    /// An object of the relist.
    Listed(Converted),
    /// The relist is complete: objects it did not list are gone.
    Relisted,
    /// An object was created or changed.
    Applied(Converted),
    /// An object was deleted.
    Deleted(ObjectKey),
}

/// An object, or why it could not be read (with its key when known).
type Converted = Result<Object, (Option<ObjectKey>, String)>;

fn map_event<K>(event: Event<K>, convert: impl Fn(K) -> Object) -> Change {
    match event {
        Event::Init => Change::Relist,
        Event::InitApply(object) => Change::Listed(Ok(convert(object))),
        Event::InitDone => Change::Relisted,
        Event::Apply(object) => Change::Applied(Ok(convert(object))),
        Event::Delete(object) => Change::Deleted(convert(object).key()),
    }
}

fn policy_event(event: Event<DynamicObject>, resource: &ApiResource) -> Change {
    let key = |object: &DynamicObject| {
        ObjectKey::new(
            Kind::AuthorizationPolicy,
            object
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(crate::object::DEFAULT_NAMESPACE),
            object.metadata.name.as_deref().unwrap_or_default(),
        )
    };
    let convert = |mut object: DynamicObject| -> Converted {
        let object_key = key(&object);
        if object.types.is_none() {
            // List items come without apiVersion and kind.
            object.types = Some(TypeMeta {
                api_version: resource.api_version.clone(),
                kind: resource.kind.clone(),
            });
        }
        let value = serde_json::to_value(&object)
            .map_err(|err| (Some(object_key.clone()), err.to_string()))?;
        match object_from_value(value) {
            Ok(Some(object)) => Ok(object),
            Ok(None) => Err((Some(object_key), "not an AuthorizationPolicy".into())),
            Err(errors) => Err((
                Some(object_key),
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    };
    match event {
        Event::Init => Change::Relist,
        Event::InitApply(object) => Change::Listed(convert(object)),
        Event::InitDone => Change::Relisted,
        Event::Apply(object) => Change::Applied(convert(object)),
        Event::Delete(object) => Change::Deleted(key(&object)),
    }
}

/// Applies one kind's changes to the store until the stream ends or shutdown.
async fn follow(
    kind: Kind,
    changes: impl Stream<Item = Result<Change, watcher::Error>>,
    store: &Store,
    shutdown: &CancellationToken,
) {
    let mut changes = std::pin::pin!(changes);
    // What this watcher put in the store, and what the current relist listed.
    let mut owned: HashSet<ObjectKey> = HashSet::new();
    let mut listed: Option<HashSet<ObjectKey>> = None;
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => return,
            change = changes.next() => match change {
                None => return,
                Some(Err(err)) => {
                    tracing::warn!(%kind, error = %err, "Kubernetes watch failed; retrying");
                    continue;
                }
                Some(Ok(change)) => change,
            },
        };
        match change {
            Change::Relist => listed = Some(HashSet::new()),
            Change::Listed(converted) | Change::Applied(converted) => {
                let key = match converted {
                    Ok(object) => {
                        let key = object.key();
                        match store.apply(object) {
                            Ok(()) => {
                                owned.insert(key.clone());
                            }
                            Err(err) => {
                                tracing::warn!(object = %key, error = %err, "skipped; the previous version stays");
                            }
                        }
                        Some(key)
                    }
                    Err((key, message)) => {
                        tracing::warn!(%kind, object = ?key, %message, "skipped; the previous version stays");
                        key
                    }
                };
                if let (Some(listed), Some(key)) = (listed.as_mut(), key) {
                    listed.insert(key);
                }
            }
            Change::Relisted => {
                let Some(listed) = listed.take() else {
                    continue;
                };
                let gone: Vec<ObjectKey> = owned.difference(&listed).cloned().collect();
                store.batch(|batch| {
                    for key in &gone {
                        batch.delete(key);
                    }
                });
                for key in &gone {
                    owned.remove(key);
                }
                tracing::info!(%kind, objects = owned.len(), "synced with the Kubernetes API");
            }
            Change::Deleted(key) => {
                store.delete(&key);
                owned.remove(&key);
            }
        }
    }
}
