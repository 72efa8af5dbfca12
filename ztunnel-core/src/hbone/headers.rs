//! The headers of an HBONE CONNECT request, read strictly (they come from the
//! network) and written as ztunnel writes them:
//!
//! - `:authority`: the destination, `<ip>:<port>` or `[<ipv6>]:<port>`, never a
//!   name;
//! - `forwarded`: `for="<client ip:port>"` (RFC 7239), the original client;
//! - `baggage`: who the peer is, as comma-separated `key=value` pairs
//!   (`k8s.namespace.name`, `k8s.<type>.name`, `service.name`, ...).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Why an `:authority` was refused (the server answers 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// Empty.
    #[error("the authority is empty")]
    Empty,
    /// No `:<port>`.
    #[error("{0:?} has no port: expected <ip>:<port> or [<ipv6>]:<port>")]
    NoPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("{authority:?}: {port:?} is not a port (1-65535)")]
    BadPort {
        /// The authority.
        authority: String,
        /// The port text.
        port: String,
    },
    /// The host is not an IP address (HBONE carries addresses, not names).
    #[error("{authority:?}: {host:?} is not an IP address")]
    NotAnIp {
        /// The authority.
        authority: String,
        /// The host text.
        host: String,
    },
    /// An IPv6 address without brackets.
    #[error("{0:?}: an IPv6 address must be in brackets, [<ipv6>]:<port>")]
    Unbracketed(String),
}

/// Reads an `:authority` into the destination address.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, AuthorityError> {
    if authority.is_empty() {
        return Err(AuthorityError::Empty);
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| AuthorityError::NoPort(authority.to_owned()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| AuthorityError::NoPort(authority.to_owned()))?;
        let ip: Ipv6Addr = host.parse().map_err(|_| AuthorityError::NotAnIp {
            authority: authority.to_owned(),
            host: host.to_owned(),
        })?;
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| AuthorityError::NoPort(authority.to_owned()))?;
        if host.contains(':') {
            return Err(AuthorityError::Unbracketed(authority.to_owned()));
        }
        let ip: std::net::Ipv4Addr = host.parse().map_err(|_| AuthorityError::NotAnIp {
            authority: authority.to_owned(),
            host: host.to_owned(),
        })?;
        (IpAddr::V4(ip), port)
    };
    let bad_port = || AuthorityError::BadPort {
        authority: authority.to_owned(),
        port: port.to_owned(),
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_port());
    }
    let port: u16 = port.parse().map_err(|_| bad_port())?;
    if port == 0 {
        return Err(bad_port());
    }
    Ok(SocketAddr::new(host, port))
}

/// The `forwarded` header for a client: `for="<ip:port>"`.
pub fn forwarded_for(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

/// The client IP of a `forwarded` header: the first `for=` of the first
/// element, quoted or not, with or without a port. `None` if there is none or
/// it is not an IP (an obfuscated identifier, `unknown`).
pub fn parse_forwarded_for(header: &str) -> Option<IpAddr> {
    let first = header.split(',').next()?;
    let value = first.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let bracketed = value.strip_prefix('[')?.split_once(']')?.0;
    bracketed.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// Who a peer is, as the `baggage` header tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// The workload's kind and name: `k8s.<kind>.name` (kind `deployment`,
    /// `pod`, `job`, `cronjob`).
    pub workload: Option<(String, String)>,
    /// `service.name` (the canonical service).
    pub service: Option<String>,
    /// `service.version` (the canonical revision).
    pub revision: Option<String>,
    /// `cloud.region`.
    pub region: Option<String>,
    /// `cloud.availability_zone`.
    pub zone: Option<String>,
}

impl Baggage {
    /// Reads a `baggage` value. Unknown keys, empty values and malformed
    /// members are skipped: baggage is informational.
    pub fn parse(header: &str) -> Self {
        let mut baggage = Self::default();
        for member in header.split(',') {
            // Properties after `;` are not used.
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, value)) = member.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() {
                continue;
            }
            let value = value.to_owned();
            match key {
                "k8s.cluster.name" => baggage.cluster = Some(value),
                "k8s.namespace.name" => baggage.namespace = Some(value),
                "service.name" => baggage.service = Some(value),
                "service.version" => baggage.revision = Some(value),
                "cloud.region" => baggage.region = Some(value),
                "cloud.availability_zone" => baggage.zone = Some(value),
                other => {
                    if let Some(kind) = other
                        .strip_prefix("k8s.")
                        .and_then(|rest| rest.strip_suffix(".name"))
                        .filter(|kind| !kind.is_empty() && !kind.contains('.'))
                    {
                        baggage.workload = Some((kind.to_owned(), value));
                    }
                }
            }
        }
        baggage
    }
}

impl fmt::Display for Baggage {
    /// The header value, members in ztunnel's order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload_key = self
            .workload
            .as_ref()
            .map(|(kind, _)| format!("k8s.{kind}.name"));
        let members = [
            ("k8s.cluster.name", self.cluster.as_deref()),
            ("k8s.namespace.name", self.namespace.as_deref()),
            (
                workload_key.as_deref().unwrap_or_default(),
                self.workload.as_ref().map(|(_, name)| name.as_str()),
            ),
            ("service.name", self.service.as_deref()),
            ("service.version", self.revision.as_deref()),
            ("cloud.region", self.region.as_deref()),
            ("cloud.availability_zone", self.zone.as_deref()),
        ];
        let mut first = true;
        for (key, value) in members {
            let Some(value) = value else { continue };
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn authorities_are_addresses_with_ports() {
        assert_eq!(
            parse_authority("10.0.0.5:8080"),
            Ok("10.0.0.5:8080".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[fd00::5]:80"),
            Ok("[fd00::5]:80".parse().unwrap())
        );
        let refused = [
            ("", "empty"),
            ("10.0.0.5", "has no port"),
            ("10.0.0.5:", "is not a port"),
            ("10.0.0.5:0", "is not a port"),
            ("10.0.0.5:65536", "is not a port"),
            ("10.0.0.5:+80", "is not a port"),
            ("echo.default.svc:80", "is not an IP address"),
            ("fd00::5:80", "must be in brackets"),
            ("[fd00::5]80", "has no port"),
            ("[fd00::5", "has no port"),
            ("[10.0.0.5]:80", "is not an IP address"),
            ("[fe80::1%eth0]:80", "is not an IP address"),
        ];
        for (authority, why) in refused {
            let err = parse_authority(authority).expect_err(authority);
            assert!(err.to_string().contains(why), "{authority:?}: {err}");
        }
    }

    #[test]
    fn forwarded_gives_the_client_ip() {
        assert_eq!(
            forwarded_for("10.0.0.1:4321".parse().unwrap()),
            "for=\"10.0.0.1:4321\""
        );
        assert_eq!(
            forwarded_for("[fd00::1]:80".parse().unwrap()),
            "for=\"[fd00::1]:80\""
        );
        let cases = [
            ("for=\"10.0.0.1:4321\"", Some("10.0.0.1")),
            ("for=10.0.0.1", Some("10.0.0.1")),
            ("For=\"[fd00::1]:80\"", Some("fd00::1")),
            ("for=\"[fd00::1]\"", Some("fd00::1")),
            ("proto=http;for=10.0.0.2, for=10.0.0.3", Some("10.0.0.2")),
            ("for=unknown", None),
            ("for=_hidden", None),
            ("by=10.0.0.9", None),
            ("", None),
        ];
        for (header, want) in cases {
            assert_eq!(
                parse_forwarded_for(header),
                want.map(|ip| ip.parse().unwrap()),
                "{header}"
            );
        }
    }

    #[test]
    fn baggage_reads_what_ztunnel_writes() {
        let baggage = Baggage::parse(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=shell,\
             service.name=shell,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-1,x=y,broken",
        );
        assert_eq!(baggage.namespace.as_deref(), Some("default"));
        assert_eq!(
            baggage.workload,
            Some(("deployment".into(), "shell".into()))
        );
        assert_eq!(baggage.zone.as_deref(), Some("eu-1"));
        assert_eq!(
            baggage.to_string(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=shell,\
             service.name=shell,service.version=v1,cloud.region=eu,cloud.availability_zone=eu-1"
        );
        assert_eq!(Baggage::parse(""), Baggage::default());
        assert_eq!(Baggage::default().to_string(), "");
    }

    fn value() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[a-z0-9][a-z0-9-]{0,12}")
    }

    proptest! {
        #[test]
        fn authorities_round_trip(addr in any::<SocketAddr>().prop_filter("port", |a| a.port() != 0)) {
            let addr = match addr {
                SocketAddr::V6(v6) => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()),
                v4 => v4,
            };
            prop_assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
        }

        #[test]
        fn forwarded_round_trips(addr in any::<SocketAddr>()) {
            prop_assert_eq!(parse_forwarded_for(&forwarded_for(addr)), Some(addr.ip()));
        }

        #[test]
        fn baggage_round_trips(
            cluster in value(), namespace in value(), service in value(), revision in value(),
            region in value(), zone in value(), workload in proptest::option::of(("[a-z]{1,10}", "[a-z0-9-]{1,12}")),
        ) {
            let baggage = Baggage { cluster, namespace, workload, service, revision, region, zone };
            prop_assert_eq!(Baggage::parse(&baggage.to_string()), baggage);
        }

        #[test]
        fn header_parsers_never_panic(text in "\\PC{0,80}") {
            let _ = parse_authority(&text);
            let _ = parse_forwarded_for(&text);
            let _ = Baggage::parse(&text);
        }
    }
}
