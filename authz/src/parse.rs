//! Reading `AuthorizationPolicy` resources from Kubernetes YAML.
//!
//! A file may hold several documents and other kinds (Deployments, Services,
//! `kind: List`); only `security.istio.io/v1` and `v1beta1` AuthorizationPolicies
//! are read, the rest is skipped. Every problem is reported with the policy, the
//! path to the field and, for the usual slips (`namespace:` for `namespaces:`),
//! what Istio expects instead.

use std::fmt;

use serde_json::Value;

use crate::model::AuthorizationPolicy;
use crate::validate::{ValidationError, validate};

const API_GROUP: &str = "security.istio.io";
const API_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const KIND: &str = "AuthorizationPolicy";

/// Why policies could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The text is not YAML.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// One or more policies are malformed or invalid; every problem is listed.
    #[error("{}", Problems(.0))]
    Invalid(Vec<ValidationError>),
}

struct Problems<'a>(&'a [ValidationError]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            problem.fmt(f)?;
        }
        Ok(())
    }
}

impl LoadError {
    /// The individual problems (empty for a YAML syntax error).
    pub fn problems(&self) -> &[ValidationError] {
        match self {
            Self::Yaml(_) => &[],
            Self::Invalid(problems) => problems,
        }
    }
}

/// Parses and validates every AuthorizationPolicy in `yaml`. Policies without a
/// namespace get `default_namespace` (as `kubectl apply` gives them the current
/// one). Fails if any policy is malformed or invalid, listing every problem.
pub fn load_policies(
    yaml: &str,
    default_namespace: &str,
) -> Result<Vec<AuthorizationPolicy>, LoadError> {
    let (policies, mut problems) = read_documents(yaml, default_namespace)?;
    // Policies that parsed are validated even when others did not parse, so that
    // every problem in the file is reported at once.
    problems.extend(
        policies
            .iter()
            .flat_map(|policy| validate(policy, default_namespace)),
    );
    if problems.is_empty() {
        Ok(policies)
    } else {
        Err(LoadError::Invalid(problems))
    }
}

/// Parses every AuthorizationPolicy in `yaml` without the semantic checks of
/// [`validate`](fn@validate): only syntax, field names and types.
pub fn parse_policies(
    yaml: &str,
    default_namespace: &str,
) -> Result<Vec<AuthorizationPolicy>, LoadError> {
    let (policies, problems) = read_documents(yaml, default_namespace)?;
    if problems.is_empty() {
        Ok(policies)
    } else {
        Err(LoadError::Invalid(problems))
    }
}

/// The policies that parsed, and the problems of those that did not.
fn read_documents(
    yaml: &str,
    default_namespace: &str,
) -> Result<(Vec<AuthorizationPolicy>, Vec<ValidationError>), LoadError> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|err| LoadError::Yaml(err.to_string()))?;
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for document in documents {
        collect(document, default_namespace, &mut policies, &mut problems);
    }
    Ok((policies, problems))
}

fn collect(
    document: Value,
    default_namespace: &str,
    policies: &mut Vec<AuthorizationPolicy>,
    problems: &mut Vec<ValidationError>,
) {
    let Value::Object(fields) = &document else {
        return; // empty documents, comments, scalars: nothing to read
    };
    let kind = fields
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let api_version = fields
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind == "List" {
        if let Some(Value::Array(items)) = fields.get("items") {
            for item in items.clone() {
                collect(item, default_namespace, policies, problems);
            }
        }
        return;
    }
    if kind != KIND || !api_version.starts_with(API_GROUP) {
        return;
    }
    match parse_document(document, default_namespace) {
        Ok(policy) => policies.push(policy),
        Err(problem) => problems.push(problem),
    }
}

/// Parses and validates one Kubernetes object that is an AuthorizationPolicy (for
/// callers that dispatch on `kind` themselves, e.g. a manifest reader or a
/// Kubernetes watch). A missing namespace becomes `default_namespace`. Every
/// problem is returned, each naming the policy and the path to the field.
pub fn policy_from_document(
    document: Value,
    default_namespace: &str,
) -> Result<AuthorizationPolicy, Vec<ValidationError>> {
    let policy = parse_document(document, default_namespace).map_err(|problem| vec![problem])?;
    let problems = validate(&policy, default_namespace);
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(problems)
    }
}

/// Parses one AuthorizationPolicy document (syntax, field names and types).
fn parse_document(
    document: Value,
    default_namespace: &str,
) -> Result<AuthorizationPolicy, ValidationError> {
    let field = |name: &str| document.get(name).and_then(Value::as_str);
    let api_version = field("apiVersion").unwrap_or_default().to_owned();
    let metadata = |name: &str| {
        document
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
    };
    let name = metadata("name").unwrap_or("<unnamed>");
    let namespace = metadata("namespace").unwrap_or(default_namespace);
    let policy_key = format!("{namespace}/{name}");
    if field("kind") != Some(KIND) {
        return Err(ValidationError {
            policy: policy_key,
            path: "kind".into(),
            message: format!(
                "expected kind {KIND}, found {:?}",
                field("kind").unwrap_or("")
            ),
        });
    }
    if !API_VERSIONS.contains(&api_version.as_str()) {
        return Err(ValidationError {
            policy: policy_key,
            path: "apiVersion".into(),
            message: format!(
                "unsupported version {api_version:?}: use security.istio.io/v1 (or v1beta1)"
            ),
        });
    }
    let mut body = document;
    if let Value::Object(fields) = &mut body {
        // Resource framing and status are not part of the policy model.
        for framing in ["apiVersion", "kind", "status"] {
            fields.remove(framing);
        }
    }
    match serde_path_to_error::deserialize::<_, AuthorizationPolicy>(body) {
        Ok(mut policy) => {
            policy
                .metadata
                .namespace
                .get_or_insert_with(|| default_namespace.to_owned());
            Ok(policy)
        }
        Err(err) => {
            let path = err.path().to_string();
            let message = err.inner().to_string();
            let hint = hint_for(&path, &message);
            Err(ValidationError {
                policy: policy_key,
                path,
                message: match hint {
                    Some(hint) => format!("{message} ({hint})"),
                    None => message,
                },
            })
        }
    }
}

/// Suggestions for the usual slips, keyed by the object holding the field and the
/// field written.
const HINTS: &[(&str, &str, &str)] = &[
    (
        "source",
        "namespace",
        "Istio has `namespaces` (a list) and `principals`",
    ),
    ("source", "principal", "Istio has `principals` (a list)"),
    ("source", "ipBlock", "Istio has `ipBlocks` (a list)"),
    (
        "source",
        "serviceAccount",
        "Istio has `serviceAccounts` (a list)",
    ),
    (
        "source",
        "ports",
        "ports belong under `to: - operation: ports:`",
    ),
    ("operation", "port", "Istio has `ports` (a list of strings)"),
    ("operation", "method", "Istio has `methods` (a list)"),
    ("operation", "path", "Istio has `paths` (a list)"),
    ("operation", "host", "Istio has `hosts` (a list)"),
    (
        "operation",
        "principals",
        "principals belong under `from: - source:`",
    ),
    (
        "operation",
        "namespaces",
        "namespaces belong under `from: - source:`",
    ),
    ("spec", "rule", "Istio has `rules` (a list)"),
    (
        "spec",
        "workloadSelector",
        "Istio has `selector: matchLabels:`",
    ),
    (
        "spec",
        "matchLabels",
        "labels go under `selector: matchLabels:`",
    ),
    ("selector", "labels", "Istio has `matchLabels`"),
    ("rules", "source", "sources go in a list: `from: - source:`"),
    (
        "rules",
        "operation",
        "operations go in a list: `to: - operation:`",
    ),
    (
        "rules",
        "principals",
        "principals go under `from: - source:`",
    ),
    ("rules", "ports", "ports go under `to: - operation:`"),
    (
        "from",
        "principals",
        "principals go one level down, under `source:`",
    ),
    (
        "from",
        "namespaces",
        "namespaces go one level down, under `source:`",
    ),
    ("to", "ports", "ports go one level down, under `operation:`"),
    ("when", "value", "Istio has `values` (a list)"),
];

fn hint_for(path: &str, message: &str) -> Option<&'static str> {
    if message.contains("invalid type: integer") {
        return Some("Istio values are strings: quote numbers, e.g. \"8080\"");
    }
    let field = message.strip_prefix("unknown field `")?.split('`').next()?;
    // The object holding the field: the path names the field itself last.
    let parent = path
        .strip_suffix(field)
        .unwrap_or(path)
        .trim_end_matches('.');
    let parent = parent.rsplit('.').next().unwrap_or(parent);
    let parent = parent.split('[').next().unwrap_or(parent);
    HINTS
        .iter()
        .find(|(object, written, _)| *object == parent && *written == field)
        .map(|(_, _, hint)| *hint)
}
