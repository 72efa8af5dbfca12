//! Wire policies checked and compiled into a form that is quick to match: typed
//! IP ranges and ports, empty matches removed ahead of time.
//!
//! Matching follows ztunnel exactly: a policy matches if any rule matches (no
//! rules: never); a rule if every clause matches (no clauses: always); a clause if
//! any non-empty match matches (no matches at all: always; only empty matches:
//! never); a match if each of its fields holds, where a field holds when its list
//! is empty or one entry matches, and none of its `not_` entries matches.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_api::names::ip_from_wire;
use mesh_api::security::{self, Authorization, string_match::MatchType};

/// A wire policy that cannot be used. The engine keeps its previous state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("authorization {policy:?}: {path}: {problem}")]
pub struct WirePolicyError {
    /// The policy, as `<namespace>/<name>`.
    pub policy: String,
    /// Where, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub path: String,
    /// What is wrong.
    pub problem: String,
}

/// What the engine needs to know about a connection, prepared once per decision.
pub(crate) struct Peer<'a> {
    /// Principal (`td/ns/x/sa/y`) of the source; `None` for plaintext.
    pub(crate) principal: Option<&'a str>,
    /// Namespace and service account of the source; `None` for plaintext.
    pub(crate) account: Option<(&'a str, &'a str)>,
    /// Source namespace, empty for plaintext (so `presence` does not match it).
    pub(crate) namespace: &'a str,
    pub(crate) source_ip: IpAddr,
    pub(crate) destination_ip: IpAddr,
    pub(crate) destination_port: u16,
}

#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    pub(crate) key: Arc<str>,
    pub(crate) namespace: Box<str>,
    pub(crate) scope: security::Scope,
    pub(crate) action: security::Action,
    pub(crate) dry_run: bool,
    rules: Box<[CompiledRule]>,
}

#[derive(Debug)]
struct CompiledRule {
    clauses: Box<[CompiledClause]>,
}

#[derive(Debug)]
struct CompiledClause {
    /// The clause had no matches at all: it always holds.
    always: bool,
    /// Its non-empty matches.
    matches: Box<[CompiledMatch]>,
}

#[derive(Debug, Default)]
struct CompiledMatch {
    namespaces: Field<Text>,
    principals: Field<Text>,
    source_ips: Field<IpNet>,
    destination_ips: Field<IpNet>,
    destination_ports: Field<u16>,
    service_accounts: Field<(Box<str>, Box<str>)>,
}

/// A positive and a negative list of one attribute.
#[derive(Debug)]
struct Field<T> {
    any_of: Box<[T]>,
    none_of: Box<[T]>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            any_of: Box::new([]),
            none_of: Box::new([]),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }

    #[inline]
    fn holds(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&matches))
            && !self.none_of.iter().any(matches)
    }
}

#[derive(Debug)]
enum Text {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Present,
}

impl Text {
    #[inline]
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == &**exact,
            Self::Prefix(prefix) => value.starts_with(&**prefix),
            Self::Suffix(suffix) => value.ends_with(&**suffix),
            Self::Present => !value.is_empty(),
        }
    }
}

impl CompiledPolicy {
    /// Checks and compiles a wire policy.
    pub(crate) fn compile(policy: &Authorization) -> Result<Self, WirePolicyError> {
        let key = format!("{}/{}", policy.namespace, policy.name);
        let fail = |path: String, problem: String| WirePolicyError {
            policy: key.clone(),
            path,
            problem,
        };
        if policy.name.is_empty() {
            return Err(fail("name".into(), "must be set".into()));
        }
        let scope = security::Scope::try_from(policy.scope)
            .map_err(|_| fail("scope".into(), format!("unknown scope {}", policy.scope)))?;
        let action = security::Action::try_from(policy.action)
            .map_err(|_| fail("action".into(), format!("unknown action {}", policy.action)))?;
        let mut rules = Vec::with_capacity(policy.rules.len());
        for (r, rule) in policy.rules.iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for (c, clause) in rule.clauses.iter().enumerate() {
                let mut matches = Vec::with_capacity(clause.matches.len());
                for (m, wire) in clause.matches.iter().enumerate() {
                    let path = format!("rules[{r}].clauses[{c}].matches[{m}]");
                    let compiled = compile_match(wire)
                        .map_err(|(field, problem)| fail(format!("{path}.{field}"), problem))?;
                    if !compiled.is_empty() {
                        matches.push(compiled);
                    }
                }
                clauses.push(CompiledClause {
                    always: clause.matches.is_empty(),
                    matches: matches.into_boxed_slice(),
                });
            }
            rules.push(CompiledRule {
                clauses: clauses.into_boxed_slice(),
            });
        }
        Ok(Self {
            key: Arc::from(key),
            namespace: policy.namespace.clone().into_boxed_str(),
            scope,
            action,
            dry_run: policy.dry_run,
            rules: rules.into_boxed_slice(),
        })
    }

    /// Whether the policy matches the connection.
    #[inline]
    pub(crate) fn matches(&self, peer: &Peer<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.clauses
                .iter()
                .all(|clause| clause.always || clause.matches.iter().any(|m| m.matches(peer)))
        })
    }
}

impl CompiledMatch {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.principals.is_empty()
            && self.source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.service_accounts.is_empty()
    }

    #[inline]
    fn matches(&self, peer: &Peer<'_>) -> bool {
        self.destination_ports
            .holds(|port| *port == peer.destination_port)
            && self
                .destination_ips
                .holds(|net| net.contains(&peer.destination_ip))
            && self.source_ips.holds(|net| net.contains(&peer.source_ip))
            && self.service_accounts.holds(|(ns, sa)| {
                peer.account
                    .is_some_and(|(peer_ns, peer_sa)| peer_ns == &**ns && peer_sa == &**sa)
            })
            && self
                .principals
                .holds(|text| peer.principal.is_some_and(|p| text.matches(p)))
            && self.namespaces.holds(|text| text.matches(peer.namespace))
    }
}

/// Where in a match (e.g. `source_ips[2]`) and what is wrong there.
type FieldError = (String, String);

fn compile_match(wire: &security::Match) -> Result<CompiledMatch, FieldError> {
    Ok(CompiledMatch {
        namespaces: field(
            "namespaces",
            &wire.namespaces,
            "not_namespaces",
            &wire.not_namespaces,
            text,
        )?,
        principals: field(
            "principals",
            &wire.principals,
            "not_principals",
            &wire.not_principals,
            text,
        )?,
        source_ips: field(
            "source_ips",
            &wire.source_ips,
            "not_source_ips",
            &wire.not_source_ips,
            ip_net,
        )?,
        destination_ips: field(
            "destination_ips",
            &wire.destination_ips,
            "not_destination_ips",
            &wire.not_destination_ips,
            ip_net,
        )?,
        destination_ports: field(
            "destination_ports",
            &wire.destination_ports,
            "not_destination_ports",
            &wire.not_destination_ports,
            port,
        )?,
        service_accounts: field(
            "service_accounts",
            &wire.service_accounts,
            "not_service_accounts",
            &wire.not_service_accounts,
            |account: &security::ServiceAccountMatch| {
                Ok((
                    account.namespace.clone().into_boxed_str(),
                    account.service_account.clone().into_boxed_str(),
                ))
            },
        )?,
    })
}

fn field<W, T>(
    any_name: &'static str,
    any_of: &[W],
    none_name: &'static str,
    none_of: &[W],
    compile: impl Fn(&W) -> Result<T, String>,
) -> Result<Field<T>, FieldError> {
    let list = |name: &'static str, values: &[W]| -> Result<Box<[T]>, FieldError> {
        values
            .iter()
            .enumerate()
            .map(|(index, value)| {
                compile(value).map_err(|problem| (format!("{name}[{index}]"), problem))
            })
            .collect()
    };
    Ok(Field {
        any_of: list(any_name, any_of)?,
        none_of: list(none_name, none_of)?,
    })
}

fn text(wire: &security::StringMatch) -> Result<Text, String> {
    Ok(match &wire.match_type {
        Some(MatchType::Exact(exact)) => Text::Exact(exact.as_str().into()),
        Some(MatchType::Prefix(prefix)) => Text::Prefix(prefix.as_str().into()),
        Some(MatchType::Suffix(suffix)) => Text::Suffix(suffix.as_str().into()),
        Some(MatchType::Presence(())) => Text::Present,
        None => return Err("string match without exact, prefix, suffix or presence".into()),
    })
}

fn ip_net(wire: &security::Address) -> Result<IpNet, String> {
    let address = ip_from_wire(&wire.address).map_err(|err| err.to_string())?;
    let length = u8::try_from(wire.length).unwrap_or(u8::MAX);
    IpNet::new(address, length)
        .map_err(|_| format!("prefix length {} is too long for {address}", wire.length))
}

fn port(wire: &u32) -> Result<u16, String> {
    u16::try_from(*wire).map_err(|_| format!("port {wire} is above 65535"))
}
