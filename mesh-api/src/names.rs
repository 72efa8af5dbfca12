//! Typed resource names of the workload API, and IP addresses in wire form.
//!
//! Delta ADS names resources with plain strings. The ones that matter are:
//! `"<network>/<ip>"` (an address alias, also the on-demand lookup key, e.g.
//! `"/10.0.0.5"` on the default network), `"<namespace>/<hostname>"` (a service, or
//! `"<namespace>/<name>"` for an authorization policy) and a workload's opaque uid
//! (for pods `"<cluster>//Pod/<namespace>/<name>"`). The types here parse and print
//! those strings, and [`Address::resource_name`] and [`Address::aliases`] give the
//! names a resource is published under.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::proto::istio::security::Authorization;
use crate::proto::istio::workload::{Address, Service, Workload, address};

/// An address alias: `"<network>/<ip>"`, with an empty network for the default one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkIp {
    /// Network name; empty for the default network.
    pub network: String,
    /// The IP address.
    pub ip: IpAddr,
}

/// A namespaced name: `"<namespace>/<name>"`. Services use their hostname as the
/// name (`"default/echo.default.svc.cluster.local"`), policies their own name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    /// Namespace.
    pub namespace: String,
    /// Hostname (services) or name (policies).
    pub name: String,
}

/// What an `istio.workload.Address` resource name refers to.
///
/// Strings are classified by shape: one `/` followed by an IP is a [`NetworkIp`];
/// one `/` between two non-empty parts is a [`NamespacedName`]; anything else that
/// is not empty is a workload uid. A uid made of exactly two parts is read as a
/// namespaced name: a server looks such names up both ways.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AddressName {
    /// `"<network>/<ip>"`.
    Ip(NetworkIp),
    /// `"<namespace>/<hostname>"`.
    Service(NamespacedName),
    /// A workload uid.
    Uid(String),
}

/// A resource name or wire IP address that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("resource name is empty")]
    Empty,
    /// A two-part name has no `/`.
    #[error("resource name {name:?} has no '/': expected {expected}")]
    MissingSlash {
        /// The name.
        name: String,
        /// The expected shape.
        expected: &'static str,
    },
    /// A two-part name has more than one `/`.
    #[error("resource name {name:?} has more than one '/': expected {expected}")]
    ExtraSlash {
        /// The name.
        name: String,
        /// The expected shape.
        expected: &'static str,
    },
    /// A part of a `"<namespace>/<name>"` is empty.
    #[error("resource name {name:?} has an empty {part}")]
    EmptyPart {
        /// The name.
        name: String,
        /// Which part is empty.
        part: &'static str,
    },
    /// The part after the `/` of a `"<network>/<ip>"` is not an IP address.
    #[error("resource name {name:?}: {ip:?} is not an IP address")]
    InvalidIp {
        /// The name.
        name: String,
        /// The text that should have been an IP.
        ip: String,
    },
    /// Wire IP bytes are neither 4 nor 16 long.
    #[error("an IP address on the wire is 4 or 16 bytes, got {len}")]
    InvalidIpLength {
        /// The number of bytes found.
        len: usize,
    },
}

const NETWORK_IP_SHAPE: &str = "\"<network>/<ip>\"";
const NAMESPACED_SHAPE: &str = "\"<namespace>/<name>\"";

impl NetworkIp {
    /// An address on the default network.
    pub fn default_network(ip: IpAddr) -> Self {
        Self {
            network: String::new(),
            ip,
        }
    }
}

impl FromStr for NetworkIp {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let Some((network, ip)) = name.split_once('/') else {
            return Err(NameError::MissingSlash {
                name: name.to_owned(),
                expected: NETWORK_IP_SHAPE,
            });
        };
        if ip.contains('/') {
            return Err(NameError::ExtraSlash {
                name: name.to_owned(),
                expected: NETWORK_IP_SHAPE,
            });
        }
        let ip = ip.parse().map_err(|_| NameError::InvalidIp {
            name: name.to_owned(),
            ip: ip.to_owned(),
        })?;
        Ok(Self {
            network: network.to_owned(),
            ip,
        })
    }
}

impl fmt::Display for NetworkIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.ip)
    }
}

impl NamespacedName {
    /// A name from its two parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl FromStr for NamespacedName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let Some((namespace, rest)) = name.split_once('/') else {
            return Err(NameError::MissingSlash {
                name: name.to_owned(),
                expected: NAMESPACED_SHAPE,
            });
        };
        if rest.contains('/') {
            return Err(NameError::ExtraSlash {
                name: name.to_owned(),
                expected: NAMESPACED_SHAPE,
            });
        }
        for (part, value) in [("namespace", namespace), ("name", rest)] {
            if value.is_empty() {
                return Err(NameError::EmptyPart {
                    name: name.to_owned(),
                    part,
                });
            }
        }
        Ok(Self::new(namespace, rest))
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for AddressName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if let Ok(ip) = name.parse::<NetworkIp>() {
            return Ok(Self::Ip(ip));
        }
        if let Ok(service) = name.parse::<NamespacedName>() {
            return Ok(Self::Service(service));
        }
        Ok(Self::Uid(name.to_owned()))
    }
}

impl fmt::Display for AddressName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Service(service) => service.fmt(f),
            Self::Uid(uid) => f.write_str(uid),
        }
    }
}

/// Reads an IP address from its wire form (4 or 16 bytes).
pub fn ip_from_wire(bytes: &[u8]) -> Result<IpAddr, NameError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(NameError::InvalidIpLength { len: bytes.len() })
    }
}

/// Writes an IP address in its wire form (4 or 16 bytes).
pub fn ip_to_wire(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl Workload {
    /// The resource name: the uid.
    pub fn resource_name(&self) -> &str {
        &self.uid
    }

    /// `"<network>/<ip>"` for each address. Fails on an address that is not 4 or 16 bytes.
    pub fn aliases(&self) -> Result<Vec<NetworkIp>, NameError> {
        self.addresses
            .iter()
            .map(|bytes| {
                Ok(NetworkIp {
                    network: self.network.clone(),
                    ip: ip_from_wire(bytes)?,
                })
            })
            .collect()
    }
}

impl Service {
    /// The resource name: `"<namespace>/<hostname>"`.
    pub fn resource_name(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.hostname)
    }

    /// `"<network>/<ip>"` for each VIP. Fails on an address that is not 4 or 16 bytes.
    pub fn aliases(&self) -> Result<Vec<NetworkIp>, NameError> {
        self.addresses
            .iter()
            .map(|vip| {
                Ok(NetworkIp {
                    network: vip.network.clone(),
                    ip: ip_from_wire(&vip.address)?,
                })
            })
            .collect()
    }
}

impl Address {
    /// The resource name: a workload's uid or `"<namespace>/<hostname>"` for a
    /// service; `None` when the address holds neither.
    pub fn resource_name(&self) -> Option<String> {
        match self.r#type.as_ref()? {
            address::Type::Workload(workload) => Some(workload.uid.clone()),
            address::Type::Service(service) => Some(service.resource_name().to_string()),
        }
    }

    /// The `"<network>/<ip>"` aliases of the workload or service.
    pub fn aliases(&self) -> Result<Vec<NetworkIp>, NameError> {
        match &self.r#type {
            Some(address::Type::Workload(workload)) => workload.aliases(),
            Some(address::Type::Service(service)) => service.aliases(),
            None => Ok(Vec::new()),
        }
    }
}

impl From<Workload> for Address {
    fn from(workload: Workload) -> Self {
        Self {
            r#type: Some(address::Type::Workload(workload)),
        }
    }
}

impl From<Service> for Address {
    fn from(service: Service) -> Self {
        Self {
            r#type: Some(address::Type::Service(service)),
        }
    }
}

impl Authorization {
    /// The resource name: `"<namespace>/<name>"`.
    pub fn resource_name(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::istio::workload::NetworkAddress;

    #[test]
    fn address_names_are_classified_by_shape() {
        let cases = [
            ("/10.0.0.5", "ip"),
            ("net1/fd00::1", "ip"),
            ("default/echo.default.svc.cluster.local", "service"),
            ("Kubernetes//Pod/default/shell-0", "uid"),
            ("0ae5c03d-5fb3-4eb9-9de8-2bd4b51606ba", "uid"),
        ];
        for (name, kind) in cases {
            let parsed: AddressName = name.parse().unwrap();
            let found = match &parsed {
                AddressName::Ip(_) => "ip",
                AddressName::Service(_) => "service",
                AddressName::Uid(_) => "uid",
            };
            assert_eq!(found, kind, "{name}");
            assert_eq!(parsed.to_string(), name);
        }
        assert_eq!("".parse::<AddressName>(), Err(NameError::Empty));
    }

    #[test]
    fn network_ip_rejections_name_the_problem() {
        let err = "10.0.0.5".parse::<NetworkIp>().unwrap_err();
        assert!(err.to_string().contains("no '/'"), "{err}");
        let err = "net/10.0.0.500".parse::<NetworkIp>().unwrap_err();
        assert!(
            err.to_string().contains("\"10.0.0.500\" is not an IP"),
            "{err}"
        );
        let err = "a/b/10.0.0.5".parse::<NetworkIp>().unwrap_err();
        assert!(err.to_string().contains("more than one '/'"), "{err}");
    }

    #[test]
    fn namespaced_name_rejections_name_the_problem() {
        let err = "ns/".parse::<NamespacedName>().unwrap_err();
        assert!(err.to_string().contains("empty name"), "{err}");
        let err = "/x".parse::<NamespacedName>().unwrap_err();
        assert!(err.to_string().contains("empty namespace"), "{err}");
        assert!("a/b/c".parse::<NamespacedName>().is_err());
    }

    #[test]
    fn wire_ips_round_trip_and_bad_lengths_are_refused() {
        for ip in ["10.1.2.3", "fd00::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_wire(&ip_to_wire(ip)), Ok(ip));
        }
        assert_eq!(
            ip_from_wire(&[1, 2, 3]),
            Err(NameError::InvalidIpLength { len: 3 })
        );
    }

    #[test]
    fn resources_report_their_names_and_aliases() {
        let workload = Workload {
            uid: "c//Pod/ns/p".into(),
            network: "n".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        let address = Address::from(workload);
        assert_eq!(address.resource_name().as_deref(), Some("c//Pod/ns/p"));
        assert_eq!(address.aliases().unwrap()[0].to_string(), "n/10.0.0.1");

        let service = Service {
            namespace: "ns".into(),
            hostname: "svc.ns.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
                length: None,
            }],
            ..Default::default()
        };
        let address = Address::from(service);
        assert_eq!(
            address.resource_name().as_deref(),
            Some("ns/svc.ns.svc.cluster.local")
        );
        assert_eq!(address.aliases().unwrap()[0].to_string(), "/10.96.0.1");
        assert_eq!(Address::default().resource_name(), None);
    }
}
