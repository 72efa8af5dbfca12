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

/// The most YAML documents (`---`-separated) one manifest may hold; a longer
/// manifest fails as a whole, with a message saying so. Other limits guard the
/// reader against hostile input, per manifest: 250,000 YAML nodes, nesting 64
/// levels deep, 64 MiB of text values, 50,000 aliases.
pub const MAX_DOCUMENTS: usize = 1_024;

/// Reads every Namespace, Pod, Service and AuthorizationPolicy in a
/// (multi-document) YAML manifest. Syntax errors, and more than
/// [`MAX_DOCUMENTS`] documents, fail the whole text; a document with wrong
/// fields is reported in [`Manifest::errors`] and the rest are kept.
pub fn parse_manifest(yaml: &str) -> Result<Manifest, ObjectError> {
    let mut manifest = Manifest::default();
    for document in read_documents(yaml)? {
        match document.read {
            Ok(object) => manifest.objects.push(object),
            Err(failed) => manifest.errors.extend(failed.errors),
        }
    }
    Ok(manifest)
}

/// One object of a manifest, as read, and the document it came from (the items
/// of a `kind: List` share their document).
#[derive(Debug)]
pub(crate) struct Document {
    /// The document's position in the text, from 1, counting every
    /// `---`-separated document (empty ones too, as a reader counts them).
    pub(crate) position: usize,
    /// The object, or why it could not be read.
    pub(crate) read: Result<Object, Failed>,
}

/// A document that names an object the control plane reads but fails.
#[derive(Debug)]
pub(crate) struct Failed {
    /// The object it defines, when its kind and name could be read.
    pub(crate) key: Option<ObjectKey>,
    /// What is wrong (at least one), each naming the document.
    pub(crate) errors: Vec<ObjectError>,
}

/// Reads the objects of a (multi-document) manifest one document at a time, so
/// that a caller can keep the good ones and tell which document failed.
pub(crate) fn read_documents(yaml: &str) -> Result<Vec<Document>, ObjectError> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let documents: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(yaml, options).map_err(|err| ObjectError {
            document: None,
            object: "manifest".into(),
            path: String::new(),
            message: yaml_error(&err),
        })?;
    let lines: Vec<u64> = documents
        .iter()
        .map(|document| document.referenced.line())
        .collect();
    let positions = document_positions(yaml, &lines);
    let mut read = Vec::new();
    for (document, position) in documents.into_iter().zip(positions) {
        read_document(document.value, position, &mut read);
    }
    Ok(read)
}

/// A YAML error as one sentence: the reader's limits in plain words.
fn yaml_error(err: &serde_saphyr::Error) -> String {
    use serde_saphyr::budget::BudgetBreach;
    let limits = serde_saphyr::Budget::default();
    let what = match err.without_snippet() {
        serde_saphyr::Error::Budget { breach, .. } => match breach {
            BudgetBreach::Documents { .. } => {
                return format!(
                    "the file has more than {MAX_DOCUMENTS} YAML documents, the most one \
                     manifest file may hold: split it into several files"
                );
            }
            BudgetBreach::Nodes { .. } => format!("more than {} YAML nodes", limits.max_nodes),
            BudgetBreach::Events { .. } => {
                format!("more than {} YAML parser events", limits.max_events)
            }
            BudgetBreach::Depth { .. } => {
                format!(
                    "collections nested more than {} levels deep",
                    limits.max_depth
                )
            }
            BudgetBreach::ScalarBytes { .. } => format!(
                "more than {} MiB of text values",
                limits.max_total_scalar_bytes / (1024 * 1024)
            ),
            BudgetBreach::Aliases { .. }
            | BudgetBreach::Anchors { .. }
            | BudgetBreach::AliasAnchorRatio { .. }
            | BudgetBreach::MergeKeys { .. } => {
                "too many YAML aliases, anchors or merge keys".into()
            }
            other => format!("{other:?}"),
        },
        _ => return format!("invalid YAML: {err}"),
    };
    format!("the file is too large or too complex to read safely: it has {what}")
}

/// The position (from 1) of each document whose root node starts on `lines`
/// (1-based; 0 when unknown), counting the documents the YAML reader skips
/// (empty ones, comments only: what a templating tool often leaves), as
/// someone reading the file counts them: by its `---` separators.
fn document_positions(yaml: &str, lines: &[u64]) -> Vec<usize> {
    let mut markers = Vec::new(); // the lines of `---` document markers
    let mut content_before_first_marker = false;
    let mut seen_content_or_marker = false;
    for (index, line) in yaml.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}');
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if marker {
            markers.push(index as u64 + 1);
            seen_content_or_marker = true;
            continue;
        }
        let trimmed = line.trim_start();
        let content = !(trimmed.is_empty() || trimmed.starts_with(['#', '%']));
        if content && !seen_content_or_marker {
            content_before_first_marker = true;
            seen_content_or_marker = true;
        }
    }
    let implicit_first = usize::from(content_before_first_marker || markers.is_empty());
    let mut positions = Vec::with_capacity(lines.len());
    let mut previous = 0;
    for &line in lines {
        let counted = implicit_first + markers.partition_point(|&marker| marker <= line);
        // Unknown lines, and documents the count cannot see (after a `...`
        // end marker), follow the previous one.
        let position = if line == 0 || counted <= previous {
            previous + 1
        } else {
            counted
        };
        positions.push(position);
        previous = position;
    }
    positions
}

fn read_document(document: Value, position: usize, read: &mut Vec<Document>) {
    if !document.is_object() {
        return; // empty documents and comments
    }
    let text = |name: &str| document.get(name).and_then(Value::as_str).unwrap_or("");
    if text("kind") == "List" {
        if let Some(Value::Array(items)) = document.get("items") {
            for item in items.clone() {
                read_document(item, position, read);
            }
        }
        return;
    }
    let result = match read_object(document) {
        Ok(Some(object)) => Ok(object),
        Ok(None) => return,
        Err(mut failed) => {
            for error in &mut failed.errors {
                error.document = Some(position);
            }
            Err(failed)
        }
    };
    read.push(Document {
        position,
        read: result,
    });
}

/// Reads one Kubernetes object given as JSON (e.g. from a watch). `Ok(None)` for
/// kinds the control plane does not read.
pub fn object_from_value(document: Value) -> Result<Option<Object>, Vec<ObjectError>> {
    read_object(document).map_err(|failed| failed.errors)
}

fn read_object(document: Value) -> Result<Option<Object>, Failed> {
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
    let read_kind = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Some(Kind::Namespace),
        ("v1", "Pod") => Some(Kind::Pod),
        ("v1", "Service") => Some(Kind::Service),
        (_, "AuthorizationPolicy") if api_version.starts_with("security.istio.io/") => {
            Some(Kind::AuthorizationPolicy)
        }
        _ => None,
    };
    let key = read_kind
        .zip(metadata("name").filter(|name| !name.is_empty()))
        .map(|(kind, name)| {
            let namespace = match kind {
                Kind::Namespace => String::new(),
                _ => metadata("namespace").unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            };
            ObjectKey::new(kind, namespace, name)
        });
    let error = |path: String, message: String| ObjectError {
        document: None,
        object: label.clone(),
        path,
        message,
    };
    let failed = |errors: Vec<ObjectError>| Failed {
        key: key.clone(),
        errors,
    };
    if metadata("name").is_none_or(|name| name.is_empty()) {
        let known = matches!(
            (api_version.as_str(), kind.as_str()),
            ("v1", "Pod" | "Service" | "Namespace")
        ) || kind == "AuthorizationPolicy";
        if known {
            return Err(failed(vec![error(
                "metadata.name".into(),
                "missing: every object needs a name".into(),
            )]));
        }
    }
    let object = match read_kind {
        Some(Kind::Namespace) => {
            Object::Namespace(Box::new(typed(document, &error).map_err(failed)?))
        }
        Some(Kind::Pod) => Object::Pod(Box::new(typed(document, &error).map_err(failed)?)),
        Some(Kind::Service) => Object::Service(Box::new(typed(document, &error).map_err(failed)?)),
        Some(Kind::AuthorizationPolicy) => {
            let policy =
                authz::policy_from_document(document, DEFAULT_NAMESPACE).map_err(|problems| {
                    failed(
                        problems
                            .into_iter()
                            .map(|problem| error(problem.path, problem.message))
                            .collect(),
                    )
                })?;
            Object::AuthorizationPolicy(Box::new(policy))
        }
        None => return Ok(None),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_numbered_as_a_reader_counts_them() {
        let pod = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{containers: 7}}\n"
            )
        };
        // An implicit first document, an empty one, a comment-only one, one
        // on its marker's line, and a directive before the first marker.
        let text = format!(
            "{}---\n---\n# only a comment\n---\n{}--- {{apiVersion: v1, kind: Pod, metadata: {{name: c}}, spec: {{containers: 7}}}}\n",
            pod("a"),
            pod("b")
        );
        let positions: Vec<usize> = read_documents(&text)
            .expect("YAML")
            .iter()
            .map(|document| document.position)
            .collect();
        assert_eq!(positions, [1, 4, 5]);
        let text = format!("%YAML 1.2\n---\n{}---\n\n---\n{}", pod("a"), pod("b"));
        let errors = parse_manifest(&text).expect("YAML").errors;
        let documents: Vec<Option<usize>> = errors.iter().map(|error| error.document).collect();
        assert_eq!(documents, [Some(1), Some(3)]);
    }
}
