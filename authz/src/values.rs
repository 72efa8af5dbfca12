//! Reading the string values of a policy: ports, IP ranges, service accounts and
//! wildcard strings. Validation and wire conversion share these, so a value that
//! validates is exactly a value that converts.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_api::security::{StringMatch, string_match::MatchType};

/// The most service accounts one `serviceAccounts` list may hold (Istio's limit).
pub(crate) const MAX_SERVICE_ACCOUNTS: usize = 16;

/// The longest service account value accepted (Istio's limit).
pub(crate) const MAX_SERVICE_ACCOUNT_LEN: usize = 320;

/// Parses a port the way Istio does (Go `strconv.ParseUint(s, 10)`, at most 65535):
/// decimal digits only, no sign, no spaces, no ranges.
pub(crate) fn parse_port(value: &str) -> Result<u16, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "bad port {value:?}: a port is a decimal number from 0 to 65535"
        ));
    }
    // Leading zeros are allowed, as in Go; overlong digit strings are out of range.
    let digits = value.trim_start_matches('0');
    match digits.parse::<u32>() {
        Ok(port) if port <= 65535 => Ok(u16::try_from(port).unwrap_or(u16::MAX)),
        _ if digits.is_empty() => Ok(0),
        _ => Err(format!("bad port {value:?}: ports go up to 65535")),
    }
}

/// An IP range with the address as written (host bits kept, as istiod sends it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IpRange {
    pub(crate) address: IpAddr,
    pub(crate) prefix_len: u8,
}

/// Parses an IP (`10.0.0.1`, meaning /32 or /128) or a CIDR (`10.0.0.0/8`).
pub(crate) fn parse_ip_range(value: &str) -> Result<IpRange, String> {
    if value.contains('/') {
        let net: IpNet = value
            .parse()
            .map_err(|_| format!("bad CIDR range {value:?}: expected an address/prefix-length like 10.0.0.0/8 or fd00::/8"))?;
        Ok(IpRange {
            address: net.addr(),
            prefix_len: net.prefix_len(),
        })
    } else {
        let address: IpAddr = value.parse().map_err(|_| {
            format!("bad IP address {value:?}: expected an IPv4 or IPv6 address or a CIDR range")
        })?;
        Ok(IpRange {
            address,
            prefix_len: if address.is_ipv4() { 32 } else { 128 },
        })
    }
}

/// Istio's wildcard strings: `*` (present), `*suffix`, `prefix*`, or exact. A `*`
/// elsewhere is literal.
pub(crate) fn string_match(value: &str) -> StringMatch {
    let match_type = if value == "*" {
        MatchType::Presence(())
    } else if let Some(suffix) = value.strip_prefix('*') {
        MatchType::Suffix(suffix.to_owned())
    } else if let Some(prefix) = value.strip_suffix('*') {
        MatchType::Prefix(prefix.to_owned())
    } else {
        MatchType::Exact(value.to_owned())
    };
    StringMatch {
        match_type: Some(match_type),
    }
}

/// Splits `ns/sa` (or a bare `sa`, meaning the policy's namespace).
pub(crate) fn service_account<'a>(value: &'a str, policy_namespace: &'a str) -> (&'a str, &'a str) {
    value.split_once('/').unwrap_or((policy_namespace, value))
}

/// Checks one `serviceAccounts` value: `sa` or `ns/sa`, no wildcards, not too long.
pub(crate) fn check_service_account(value: &str) -> Result<(), String> {
    const FORMAT: &str = "expected 'serviceAccount' or 'namespace/serviceAccount'";
    if value.is_empty() {
        return Err("empty value not allowed".into());
    }
    if value.contains('*') {
        return Err(format!(
            "{value:?}: wildcards are not allowed in service accounts"
        ));
    }
    if value.len() > MAX_SERVICE_ACCOUNT_LEN {
        return Err(format!(
            "a service account may be at most {MAX_SERVICE_ACCOUNT_LEN} characters, found {}",
            value.len()
        ));
    }
    match value.split('/').collect::<Vec<_>>().as_slice() {
        [_] => Ok(()),
        ["", _] => Err(format!("{FORMAT}, found {value:?} with an empty namespace")),
        [_, ""] => Err(format!(
            "{FORMAT}, found {value:?} with an empty service account"
        )),
        [_, _] => Ok(()),
        _ => Err(format!("{FORMAT}, found {value:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_go_parse_uint() {
        for (input, expected) in [
            ("80", Some(80)),
            ("0", Some(0)),
            ("080", Some(80)),
            ("65535", Some(65535)),
        ] {
            assert_eq!(parse_port(input).ok(), expected, "{input}");
        }
        for input in [
            "",
            "+80",
            "-1",
            " 80",
            "80-90",
            "65536",
            "99999999999999999999",
            "http",
        ] {
            assert!(parse_port(input).is_err(), "{input:?} accepted");
        }
    }

    #[test]
    fn ip_ranges_take_bare_addresses_and_cidrs() {
        assert_eq!(parse_ip_range("10.0.0.1").unwrap().prefix_len, 32);
        assert_eq!(parse_ip_range("fd00::1").unwrap().prefix_len, 128);
        let range = parse_ip_range("10.1.2.3/8").unwrap();
        assert_eq!(
            (range.address.to_string(), range.prefix_len),
            ("10.1.2.3".into(), 8)
        );
        for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "x", "10.0.0.0/"] {
            assert!(parse_ip_range(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn wildcards_become_string_matches() {
        let kind = |v: &str| string_match(v).match_type.unwrap();
        assert_eq!(kind("*"), MatchType::Presence(()));
        assert_eq!(kind("*.local"), MatchType::Suffix(".local".into()));
        assert_eq!(kind("ns-*"), MatchType::Prefix("ns-".into()));
        assert_eq!(kind("a*b"), MatchType::Exact("a*b".into()));
        assert_eq!(kind("**"), MatchType::Suffix("*".into()));
    }

    #[test]
    fn service_accounts_default_to_the_policy_namespace() {
        assert_eq!(service_account("sa", "ns"), ("ns", "sa"));
        assert_eq!(service_account("other/sa", "ns"), ("other", "sa"));
        assert!(check_service_account("a/b/c").is_err());
        assert!(check_service_account("/b").is_err());
        assert!(check_service_account("a/").is_err());
        assert!(check_service_account("a*").is_err());
        assert!(check_service_account("ns/sa").is_ok());
    }
}
