//! The proxy's decision, free of I/O: answer a question from mesh state, or
//! forward it upstream.
//!
//! Pods resolve with Kubernetes' search list (`<ns>.svc.<domain>`,
//! `svc.<domain>`, `<domain>`), so a question may arrive with a search suffix
//! the resolver appended to a name that was already partly qualified
//! (`echo.other.default.svc.cluster.local`, `api.example.com.default.svc.cluster.local`).
//! The suffix is stripped and the rest read as `<svc>`, `<svc>.<ns>`,
//! `<svc>.<ns>.svc` or an external host; when the name answered differs from
//! the name asked, the answer carries a CNAME. Among services sharing a
//! hostname, the client's namespace wins, then a canonical one.
//!
//! Only A and AAAA are answered from the mesh; other types, and names the mesh
//! does not know, are [`Resolution::Forward`] here. The server then answers
//! names in the cluster domain itself (see [`in_domain`] and
//! [`server`](crate::server)) and forwards the rest.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::RecordType;

use crate::lookup::{MeshDns, ServiceRecord};

/// What to do with a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Answer from the mesh (authoritatively).
    Answer {
        /// The hostname answered, when it differs from the question (a CNAME
        /// from the question to it comes first).
        alias_of: Option<String>,
        /// The addresses of the asked family; empty means NOERROR with no data.
        addresses: Vec<IpAddr>,
    },
    /// Not the mesh's to answer.
    Forward,
}

/// Decides a question for `name` (lowercase, no trailing dot) of `record_type`
/// from a client in `namespace` (if known), in cluster `domain`.
pub fn resolve(
    mesh: &dyn MeshDns,
    domain: &str,
    namespace: Option<&str>,
    name: &str,
    record_type: RecordType,
) -> Resolution {
    let want_v4 = match record_type {
        RecordType::A => true,
        RecordType::AAAA => false,
        _ => return Resolution::Forward,
    };
    let answer = |hostname: &str| {
        let services = mesh.services(hostname)?;
        let service = preferred(&services, namespace)?;
        let addresses = service
            .addresses()
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv4() == want_v4)
            .collect();
        Some(Resolution::Answer {
            alias_of: (hostname != name).then(|| hostname.to_owned()),
            addresses,
        })
    };
    // The name as asked first: the common case allocates nothing more.
    if let Some(found) = answer(name) {
        return found;
    }
    candidates(domain, namespace, name)
        .iter()
        .find_map(|hostname| answer(hostname))
        .unwrap_or(Resolution::Forward)
}

/// Whether `name` (lowercase, no trailing dot) is `domain` or a name under it.
pub fn in_domain(domain: &str, name: &str) -> bool {
    name.strip_suffix(domain)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
}

/// The client's namespace first, then a canonical service, then any.
fn preferred<'a>(
    services: &'a [Arc<ServiceRecord>],
    namespace: Option<&str>,
) -> Option<&'a Arc<ServiceRecord>> {
    services
        .iter()
        .find(|s| Some(s.namespace.as_str()) == namespace)
        .or_else(|| services.iter().find(|s| s.canonical))
        .or_else(|| services.first())
}

/// Hostnames to try after the name itself, in order.
fn candidates(domain: &str, namespace: Option<&str>, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(namespace) = namespace {
        for suffix in [
            format!("{namespace}.svc.{domain}"),
            format!("svc.{domain}"),
            domain.to_owned(),
        ] {
            if let Some(base) = name
                .strip_suffix(suffix.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .filter(|base| !base.is_empty())
            {
                out.extend(base_forms(domain, Some(namespace), base));
            }
        }
    }
    if !name.ends_with(domain) {
        out.extend(base_forms(domain, namespace, name));
    }
    out
}

/// The hostnames a partly qualified name stands for: itself (an external host),
/// `<svc>` in the client's namespace, `<svc>.<ns>`, `<svc>.<ns>.svc`.
fn base_forms<'a>(
    domain: &'a str,
    namespace: Option<&'a str>,
    base: &'a str,
) -> impl Iterator<Item = String> + 'a {
    let dots = base.matches('.').count();
    let expanded = match (dots, namespace) {
        (0, Some(namespace)) => Some(format!("{base}.{namespace}.svc.{domain}")),
        (1, _) => Some(format!("{base}.svc.{domain}")),
        (2, _) if base.ends_with(".svc") => Some(format!("{base}.{domain}")),
        _ => None,
    };
    std::iter::once(base.to_owned()).chain(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::InMemoryMeshDns;

    fn mesh() -> InMemoryMeshDns {
        let mesh = InMemoryMeshDns::new();
        let service = |namespace: &str, hostname: &str, vips: &[&str], canonical| ServiceRecord {
            namespace: namespace.into(),
            hostname: hostname.into(),
            vips: vips.iter().map(|ip| ip.parse().unwrap()).collect(),
            endpoints: Vec::new(),
            canonical,
        };
        mesh.upsert_service(service(
            "default",
            "echo.default.svc.cluster.local",
            &["10.96.0.10", "fd00::10"],
            false,
        ));
        mesh.upsert_service(service(
            "other",
            "echo.other.svc.cluster.local",
            &["10.96.0.20"],
            false,
        ));
        mesh.upsert_service(service("default", "api.example.com", &["240.0.0.1"], false));
        mesh.upsert_service(service("other", "api.example.com", &["240.0.0.2"], false));
        mesh.upsert_service(service("third", "shared.example.com", &["240.0.0.3"], true));
        mesh.upsert_service(service(
            "fourth",
            "shared.example.com",
            &["240.0.0.4"],
            false,
        ));
        mesh
    }

    fn answer(namespace: &str, name: &str, record_type: RecordType) -> Resolution {
        resolve(&mesh(), "cluster.local", Some(namespace), name, record_type)
    }

    fn a(alias_of: Option<&str>, addresses: &[&str]) -> Resolution {
        Resolution::Answer {
            alias_of: alias_of.map(str::to_owned),
            addresses: addresses.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn fully_qualified_names_answer_directly() {
        assert_eq!(
            answer("default", "echo.default.svc.cluster.local", RecordType::A),
            a(None, &["10.96.0.10"])
        );
        assert_eq!(
            answer(
                "default",
                "echo.default.svc.cluster.local",
                RecordType::AAAA
            ),
            a(None, &["fd00::10"])
        );
        assert_eq!(
            answer("other", "echo.other.svc.cluster.local", RecordType::AAAA),
            a(None, &[])
        );
    }

    #[test]
    fn search_suffixes_are_stripped_with_a_cname() {
        let echo_other = Some("echo.other.svc.cluster.local");
        assert_eq!(
            answer(
                "default",
                "echo.other.default.svc.cluster.local",
                RecordType::A
            ),
            a(echo_other, &["10.96.0.20"])
        );
        assert_eq!(
            answer(
                "default",
                "echo.other.svc.default.svc.cluster.local",
                RecordType::A
            ),
            a(echo_other, &["10.96.0.20"])
        );
        assert_eq!(
            answer("default", "echo.other.svc.svc.cluster.local", RecordType::A),
            a(echo_other, &["10.96.0.20"])
        );
        assert_eq!(
            answer(
                "default",
                "api.example.com.default.svc.cluster.local",
                RecordType::A
            ),
            a(Some("api.example.com"), &["240.0.0.1"])
        );
    }

    #[test]
    fn unqualified_names_use_the_client_namespace() {
        assert_eq!(
            answer("default", "echo", RecordType::A),
            a(Some("echo.default.svc.cluster.local"), &["10.96.0.10"])
        );
        assert_eq!(
            answer("other", "echo", RecordType::A),
            a(Some("echo.other.svc.cluster.local"), &["10.96.0.20"])
        );
        assert_eq!(
            answer("default", "echo.other", RecordType::A),
            a(Some("echo.other.svc.cluster.local"), &["10.96.0.20"])
        );
    }

    #[test]
    fn shared_hostnames_prefer_the_clients_namespace_then_canonical() {
        assert_eq!(
            answer("default", "api.example.com", RecordType::A),
            a(None, &["240.0.0.1"])
        );
        assert_eq!(
            answer("other", "api.example.com", RecordType::A),
            a(None, &["240.0.0.2"])
        );
        assert_eq!(
            answer("default", "shared.example.com", RecordType::A),
            a(None, &["240.0.0.3"])
        );
    }

    #[test]
    fn names_in_the_domain() {
        assert!(in_domain("cluster.local", "cluster.local"));
        assert!(in_domain("cluster.local", "echo.default.svc.cluster.local"));
        assert!(!in_domain("cluster.local", "mycluster.local"));
        assert!(!in_domain("cluster.local", "cluster.local.example.com"));
        assert!(!in_domain("cluster.local", "local"));
    }

    #[test]
    fn other_types_and_unknown_names_are_forwarded() {
        assert_eq!(
            answer("default", "echo.default.svc.cluster.local", RecordType::MX),
            Resolution::Forward
        );
        assert_eq!(
            answer("default", "nope.default.svc.cluster.local", RecordType::A),
            Resolution::Forward
        );
        assert_eq!(
            answer("default", "www.example.org", RecordType::A),
            Resolution::Forward
        );
        assert_eq!(
            resolve(&mesh(), "cluster.local", None, "echo", RecordType::A),
            Resolution::Forward,
            "a short name needs the client's namespace"
        );
    }
}
