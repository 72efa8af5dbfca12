//! SPIFFE identities of mesh workloads: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
//!
//! An [`Identity`] is parsed once, validated against the SPIFFE ID rules, and then
//! cheap to clone (one reference-counted string) and to compare. Istio also writes
//! identities in the *principal* form, without the scheme
//! (`<td>/ns/<namespace>/sa/<service-account>`, as in AuthorizationPolicy
//! `principals`); [`Identity::from_principal`] and [`Identity::principal`] convert
//! from and to it.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The URI scheme of every SPIFFE identity.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// The longest SPIFFE ID accepted, in bytes (the SPIFFE specification's limit).
pub const MAX_IDENTITY_LEN: usize = 2048;

/// The trust domain Istio uses when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The service account Kubernetes gives a pod when none is named.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How much of a rejected input an error message quotes.
const QUOTED_INPUT_LIMIT: usize = 128;

/// A workload's SPIFFE identity: trust domain, namespace and service account.
///
/// ```
/// use mesh_api::Identity;
///
/// let id: Identity = "spiffe://cluster.local/ns/default/sa/shell".parse()?;
/// assert_eq!(id.trust_domain(), "cluster.local");
/// assert_eq!(id.namespace(), "default");
/// assert_eq!(id.service_account(), "shell");
/// assert_eq!(id.principal(), "cluster.local/ns/default/sa/shell");
/// assert_eq!(Identity::from_principal(id.principal())?, id);
/// # Ok::<(), mesh_api::IdentityError>(())
/// ```
#[derive(Clone)]
pub struct Identity {
    /// The whole URI, `spiffe://td/ns/NS/sa/SA`.
    uri: Arc<str>,
    /// Byte offsets into `uri`; the URI is at most [`MAX_IDENTITY_LEN`] bytes.
    layout: Layout,
}

/// Where each part of an identity sits in its URI.
#[derive(Clone, Copy, Debug)]
struct Layout {
    trust_domain_end: u16,
    namespace_start: u16,
    namespace_end: u16,
    service_account_start: u16,
}

impl Identity {
    /// Builds an identity from its three parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let uri = format!("{SPIFFE_SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        // Check the parts separately first so a '/' inside one is reported as a bad
        // character of that part rather than as a malformed path.
        check_trust_domain(trust_domain).map_err(|problem| IdentityError::new(&uri, problem))?;
        check_segment(namespace, Segment::Namespace)
            .map_err(|problem| IdentityError::new(&uri, problem))?;
        check_segment(service_account, Segment::ServiceAccount)
            .map_err(|problem| IdentityError::new(&uri, problem))?;
        Self::parse_uri(&uri)
    }

    /// Parses the URI form, `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let Some(rest) = uri.strip_prefix(SPIFFE_SCHEME) else {
            return Err(IdentityError::new(uri, IdentityProblem::MissingScheme));
        };
        let layout = parse_after_scheme(uri.len(), rest)
            .map_err(|problem| IdentityError::new(uri, problem))?;
        Ok(Self {
            uri: Arc::from(uri),
            layout: layout.shifted(SPIFFE_SCHEME.len()),
        })
    }

    /// Parses the principal form used by Istio policies,
    /// `<td>/ns/<namespace>/sa/<service-account>` (no scheme).
    pub fn from_principal(principal: &str) -> Result<Self, IdentityError> {
        if principal.starts_with(SPIFFE_SCHEME) {
            return Err(IdentityError::new(
                principal,
                IdentityProblem::UnexpectedScheme,
            ));
        }
        let layout = parse_after_scheme(SPIFFE_SCHEME.len() + principal.len(), principal)
            .map_err(|problem| IdentityError::new(principal, problem))?;
        let mut uri = String::with_capacity(SPIFFE_SCHEME.len() + principal.len());
        uri.push_str(SPIFFE_SCHEME);
        uri.push_str(principal);
        Ok(Self {
            uri: Arc::from(uri),
            layout: layout.shifted(SPIFFE_SCHEME.len()),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SPIFFE_SCHEME.len()..usize::from(self.layout.trust_domain_end)]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.layout.namespace_start)..usize::from(self.layout.namespace_end)]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.layout.service_account_start)..]
    }

    /// The URI form, `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn as_uri(&self) -> &str {
        &self.uri
    }

    /// The principal form, `<td>/ns/<namespace>/sa/<service-account>`, as written in
    /// AuthorizationPolicy `principals` and compared by the policy engine.
    pub fn principal(&self) -> &str {
        &self.uri[SPIFFE_SCHEME.len()..]
    }
}

impl Layout {
    fn shifted(self, by: usize) -> Self {
        // `by` is the scheme length and every offset fits u16 after the length check.
        let by = u16::try_from(by).unwrap_or(u16::MAX);
        Self {
            trust_domain_end: self.trust_domain_end + by,
            namespace_start: self.namespace_start + by,
            namespace_end: self.namespace_end + by,
            service_account_start: self.service_account_start + by,
        }
    }
}

/// Validates `rest` (everything after `spiffe://`) and returns offsets into it.
/// `uri_len` is the length of the full URI, for the length limit.
fn parse_after_scheme(uri_len: usize, rest: &str) -> Result<Layout, IdentityProblem> {
    if uri_len > MAX_IDENTITY_LEN {
        return Err(IdentityProblem::TooLong { len: uri_len });
    }
    let trust_domain = rest.split('/').next().unwrap_or_default();
    check_trust_domain(trust_domain)?;

    // The path as written, with its leading '/' (empty when there is none).
    let path = &rest[trust_domain.len()..];
    let mut parts = path.strip_prefix('/').unwrap_or_default().split('/');
    let shape = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    );
    let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = shape else {
        return Err(IdentityProblem::WrongPath {
            path: path.to_owned(),
        });
    };
    check_segment(namespace, Segment::Namespace)?;
    check_segment(service_account, Segment::ServiceAccount)?;

    // The offsets fit in u16: the whole URI is at most MAX_IDENTITY_LEN bytes.
    let offset = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    let namespace_start = trust_domain.len() + "/ns/".len();
    let namespace_end = namespace_start + namespace.len();
    Ok(Layout {
        trust_domain_end: offset(trust_domain.len()),
        namespace_start: offset(namespace_start),
        namespace_end: offset(namespace_end),
        service_account_start: offset(namespace_end + "/sa/".len()),
    })
}

fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityProblem> {
    if trust_domain.is_empty() {
        return Err(IdentityProblem::EmptyTrustDomain);
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    match trust_domain.chars().find(|&c| !allowed(c)) {
        Some(character) => Err(IdentityProblem::InvalidTrustDomainChar { character }),
        None => Ok(()),
    }
}

fn check_segment(value: &str, segment: Segment) -> Result<(), IdentityProblem> {
    if value.is_empty() {
        return Err(IdentityProblem::EmptySegment { segment });
    }
    if value == "." || value == ".." {
        return Err(IdentityProblem::DotSegment { segment });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    match value.chars().find(|&c| !allowed(c)) {
        Some(character) => Err(IdentityProblem::InvalidSegmentChar { segment, character }),
        None => Ok(()),
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses the URI form; see [`Identity::parse_uri`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_uri(s)
    }
}

impl TryFrom<&str> for Identity {
    type Error = IdentityError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse_uri(s)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&&*self.uri).finish()
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Must agree with `str`'s hash for the `Borrow<str>` impl.
        self.uri.hash(state);
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.uri.cmp(&other.uri)
    }
}

impl Borrow<str> for Identity {
    /// Borrows the URI form, so maps keyed by identity can be queried by URI.
    fn borrow(&self) -> &str {
        &self.uri
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let uri = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse_uri(&uri).map_err(serde::de::Error::custom)
    }
}

/// A part of the identity path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Segment {
    /// The namespace, after `/ns/`.
    Namespace,
    /// The service account, after `/sa/`.
    ServiceAccount,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Namespace => "namespace",
            Self::ServiceAccount => "service account",
        })
    }
}

/// What was wrong with a rejected identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityProblem {
    /// The URI form must start with `spiffe://`.
    #[error("it must start with \"spiffe://\"")]
    MissingScheme,
    /// The principal form has no scheme.
    #[error("a principal has no \"spiffe://\" prefix")]
    UnexpectedScheme,
    /// Longer than [`MAX_IDENTITY_LEN`].
    #[error("it is {len} bytes long; a SPIFFE ID has at most {MAX_IDENTITY_LEN}")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// Nothing between the scheme and the path.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `a-z 0-9 . - _`.
    #[error("the trust domain has {character:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    InvalidTrustDomainChar {
        /// The first offending character.
        character: char,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("the path must be /ns/<namespace>/sa/<service-account>, got {path:?}")]
    WrongPath {
        /// The path found (empty when there was none).
        path: String,
    },
    /// The namespace or service account is empty.
    #[error("the {segment} is empty")]
    EmptySegment {
        /// Which part.
        segment: Segment,
    },
    /// The namespace or service account is `.` or `..`.
    #[error("the {segment} may not be \".\" or \"..\"")]
    DotSegment {
        /// Which part.
        segment: Segment,
    },
    /// The namespace or service account has a character outside `A-Z a-z 0-9 . - _`.
    #[error("the {segment} has {character:?}; only letters, digits, '.', '-' and '_' are allowed")]
    InvalidSegmentChar {
        /// Which part.
        segment: Segment,
        /// The first offending character.
        character: char,
    },
}

/// A rejected identity: the input (shortened if long) and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE identity {input:?}: {problem}")]
pub struct IdentityError {
    input: String,
    problem: IdentityProblem,
}

impl IdentityError {
    fn new(input: &str, problem: IdentityProblem) -> Self {
        let input = match input.char_indices().nth(QUOTED_INPUT_LIMIT) {
            Some((cut, _)) => format!("{}...", &input[..cut]),
            None => input.to_owned(),
        };
        Self { input, problem }
    }

    /// What was wrong.
    pub fn problem(&self) -> &IdentityProblem {
        &self.problem
    }

    /// The rejected input, shortened to its first 128 characters if longer.
    pub fn input(&self) -> &str {
        &self.input
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_a_typical_identity() {
        let id = Identity::parse_uri("spiffe://cluster.local/ns/default/sa/shell").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "shell");
        assert_eq!(id.as_uri(), "spiffe://cluster.local/ns/default/sa/shell");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/shell");
        assert_eq!(id.to_string(), id.as_uri());
    }

    #[test]
    fn new_agrees_with_parse() {
        let built = Identity::new("td", "ns1", "sa-1").unwrap();
        let parsed: Identity = "spiffe://td/ns/ns1/sa/sa-1".parse().unwrap();
        assert_eq!(built, parsed);
    }

    #[test]
    fn new_reports_a_slash_inside_a_part_as_a_bad_character() {
        let err = Identity::new("td", "a/b", "sa").unwrap_err();
        assert_eq!(
            err.problem(),
            &IdentityProblem::InvalidSegmentChar {
                segment: Segment::Namespace,
                character: '/'
            }
        );
    }

    #[test]
    fn serde_uses_the_uri_form_and_validates() {
        let id = Identity::new("cluster.local", "a", "b").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
        let err = serde_json::from_str::<Identity>("\"spiffe://x/ns/a\"").unwrap_err();
        assert!(
            err.to_string()
                .contains("/ns/<namespace>/sa/<service-account>")
        );
    }

    #[test]
    fn error_quotes_long_input_shortened() {
        let long = format!("spiffe://{}", "a".repeat(5000));
        let err = Identity::parse_uri(&long).unwrap_err();
        assert!(matches!(
            err.problem(),
            IdentityProblem::TooLong { len: 5009 }
        ));
        assert!(err.input().len() < 200);
        assert!(err.to_string().contains("at most 2048"));
    }

    #[test]
    fn maps_keyed_by_identity_can_be_queried_by_uri() {
        let mut set = std::collections::HashSet::new();
        set.insert(Identity::new("td", "a", "b").unwrap());
        assert!(set.contains("spiffe://td/ns/a/sa/b"));
    }
}
