//! Type URLs of the resources carried over delta ADS.

use std::fmt;
use std::str::FromStr;

/// The prefix of every type URL.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// `istio.workload.Address`: workloads and services.
pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";

/// `istio.security.Authorization`: L4 authorization policies.
pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";

/// The resource types of the ambient workload API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// [`ADDRESS`].
    Address,
    /// [`AUTHORIZATION`].
    Authorization,
}

impl ResourceType {
    /// Every type, in a fixed order.
    pub const ALL: [Self; 2] = [Self::Address, Self::Authorization];

    /// The type URL.
    pub const fn type_url(self) -> &'static str {
        match self {
            Self::Address => ADDRESS,
            Self::Authorization => AUTHORIZATION,
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_url())
    }
}

/// A type URL that is not one of the workload API's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported type URL {0:?}: expected \"{ADDRESS}\" or \"{AUTHORIZATION}\"")]
pub struct UnknownTypeUrl(pub String);

impl FromStr for ResourceType {
    type Err = UnknownTypeUrl;

    fn from_str(type_url: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|ty| ty.type_url() == type_url)
            .ok_or_else(|| UnknownTypeUrl(type_url.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Name;

    #[test]
    fn constants_match_the_generated_message_names() {
        assert_eq!(ADDRESS, crate::workload::Address::type_url());
        assert_eq!(AUTHORIZATION, crate::security::Authorization::type_url());
        assert!(ADDRESS.starts_with(TYPE_URL_PREFIX));
    }

    #[test]
    fn type_urls_parse_and_unknown_ones_are_named() {
        for ty in ResourceType::ALL {
            assert_eq!(ty.type_url().parse(), Ok(ty));
        }
        let err = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
            .parse::<ResourceType>()
            .unwrap_err();
        assert!(err.to_string().contains("envoy.config.cluster.v3.Cluster"));
    }
}
