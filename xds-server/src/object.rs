//! The Kubernetes objects the control plane reads, and reading them from YAML.
//!
//! Pods, Services and Namespaces are `k8s-openapi` types; AuthorizationPolicies
//! are `authz`'s model. A manifest may hold several documents, `kind: List`, and
//! kinds the control plane does not read (Deployments, ConfigMaps, ...), which
//! are skipped. A document that fails to parse is reported, naming the document,
//! the object and the field, and does not stop the others.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde_json::Value;

/// The namespace of a namespaced object whose metadata names none (as `kubectl`
/// would use).
pub const DEFAULT_NAMESPACE: &str = "default";

/// A Kubernetes object the control plane builds resources from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Object {
    /// A namespace: its labels enroll pods in the mesh.
    Namespace(Box<Namespace>),
    /// A pod: becomes a `Workload`.
    Pod(Box<Pod>),
    /// A service: becomes a `Service`, and gives workloads their `services`.
    Service(Box<Service>),
    /// An authorization policy: becomes an `Authorization`.
    AuthorizationPolicy(Box<authz::AuthorizationPolicy>),
}

/// The kinds of [`Object`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1/Namespace`.
    Namespace,
    /// `v1/Pod`.
    Pod,
    /// `v1/Service`.
    Service,
    /// `security.istio.io/v1/AuthorizationPolicy`.
    AuthorizationPolicy,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
        })
    }
}

/// Which object: kind, namespace (empty for namespaces) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// The kind.
    pub kind: Kind,
    /// The namespace; empty for cluster-scoped objects (namespaces).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A namespaced object's key.
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A namespace's key.
    pub fn namespace(name: impl Into<String>) -> Self {
        Self::new(Kind::Namespace, "", name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    /// The object's key; a missing namespace is [`DEFAULT_NAMESPACE`].
    pub fn key(&self) -> ObjectKey {
        fn meta(
            kind: Kind,
            metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> ObjectKey {
            let namespace = match kind {
                Kind::Namespace => "",
                _ => metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
            };
            ObjectKey::new(
                kind,
                namespace,
                metadata.name.as_deref().unwrap_or_default(),
            )
        }
        match self {
            Self::Namespace(namespace) => meta(Kind::Namespace, &namespace.metadata),
            Self::Pod(pod) => meta(Kind::Pod, &pod.metadata),
            Self::Service(service) => meta(Kind::Service, &service.metadata),
            Self::AuthorizationPolicy(policy) => ObjectKey::new(
                Kind::AuthorizationPolicy,
                policy.namespace_or(DEFAULT_NAMESPACE),
                policy.metadata.name.as_str(),
            ),
        }
    }
}

/// Why a document could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// The document's position in its file (from 1), when read from a file.
    pub document: Option<usize>,
    /// The object (`Pod default/echo`), or what is known of it.
    pub object: String,
    /// The path to the offending field (`spec.containers[0].ports`), or empty.
    pub path: String,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(document) = self.document {
            write!(f, "document {document}: ")?;
        }
        write!(f, "{}: ", self.object)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ObjectError {}

/// What a manifest held: the objects read, and the documents that failed.
#[derive(Debug, Default)]
pub struct Manifest {
    /// Objects of the kinds the control plane reads, in file order.
    pub objects: Vec<Object>,
    /// Documents that failed to parse.
    pub errors: Vec<ObjectError>,
}

/// Reads every Namespace, Pod, Service and AuthorizationPolicy in a
/// (multi-document) YAML manifest. Syntax errors fail the whole text; a document
/// with wrong fields is reported in [`Manifest::errors`] and the rest are kept.
pub fn parse_manifest(yaml: &str) -> Result<Manifest, ObjectError> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|err| ObjectError {
        document: None,
        object: "manifest".into(),
        path: String::new(),
        message: format!("invalid YAML: {err}"),
    })?;
    let mut manifest = Manifest::default();
    for (index, document) in documents.into_iter().enumerate() {
        read_document(document, index + 1, &mut manifest);
    }
    Ok(manifest)
}

fn read_document(document: Value, position: usize, manifest: &mut Manifest) {
    if !document.is_object() {
        return; // empty documents and comments
    }
    let text = |name: &str| document.get(name).and_then(Value::as_str).unwrap_or("");
    if text("kind") == "List" {
        if let Some(Value::Array(items)) = document.get("items") {
            for item in items.clone() {
                read_document(item, position, manifest);
            }
        }
        return;
    }
    match object_from_value(document) {
        Ok(Some(object)) => manifest.objects.push(object),
        Ok(None) => {}
        Err(mut errors) => {
            for error in &mut errors {
                error.document = Some(position);
            }
            manifest.errors.extend(errors);
        }
    }
}

/// Reads one Kubernetes object given as JSON (e.g. from a watch). `Ok(None)` for
/// kinds the control plane does not read.
pub fn object_from_value(document: Value) -> Result<Option<Object>, Vec<ObjectError>> {
    let text = |name: &str| document.get(name).and_then(Value::as_str).unwrap_or("");
    let kind = text("kind").to_owned();
    let api_version = text("apiVersion").to_owned();
    let metadata = |name: &str| {
        document
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let label = match (metadata("namespace"), metadata("name")) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => format!("{kind} <unnamed>"),
    };
    let error = |path: String, message: String| ObjectError {
        document: None,
        object: label.clone(),
        path,
        message,
    };
    if metadata("name").is_none_or(|name| name.is_empty()) {
        let known = matches!(
            (api_version.as_str(), kind.as_str()),
            ("v1", "Pod" | "Service" | "Namespace")
        ) || kind == "AuthorizationPolicy";
        if known {
            return Err(vec![error(
                "metadata.name".into(),
                "missing: every object needs a name".into(),
            )]);
        }
    }
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(Box::new(typed(document, &error)?)),
        ("v1", "Pod") => Object::Pod(Box::new(typed(document, &error)?)),
        ("v1", "Service") => Object::Service(Box::new(typed(document, &error)?)),
        (_, "AuthorizationPolicy") if api_version.starts_with("security.istio.io/") => {
            let policy =
                authz::policy_from_document(document, DEFAULT_NAMESPACE).map_err(|problems| {
                    problems
                        .into_iter()
                        .map(|problem| error(problem.path, problem.message))
                        .collect::<Vec<_>>()
                })?;
            Object::AuthorizationPolicy(Box::new(policy))
        }
        _ => return Ok(None),
    };
    Ok(Some(object))
}

fn typed<T: serde::de::DeserializeOwned>(
    document: Value,
    error: &dyn Fn(String, String) -> ObjectError,
) -> Result<T, Vec<ObjectError>> {
    serde_path_to_error::deserialize(document)
        .map_err(|err| vec![error(err.path().to_string(), err.inner().to_string())])
}
