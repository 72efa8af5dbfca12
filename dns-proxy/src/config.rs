//! The proxy's configuration as data ([`DnsConfig`]), so one file can drive a
//! whole binary ([`mesh_net::config`]): read with
//! [`mesh_net::config::from_yaml`], applied with
//! [`DnsProxyBuilder::config`](crate::DnsProxyBuilder::config). The mesh state
//! and the sockets are not data: they stay with the builder and
//! [`DnsProxy::spawn`](crate::DnsProxy::spawn).

use std::time::Duration;

use mesh_net::HandshakeLimits;

use crate::upstream::UpstreamConfig;

/// Everything about a [`DnsProxy`](crate::DnsProxy) that is data, as
/// configuration ([`mesh_net::config`]: `camelCase` names, every field
/// optional with the builder's default, unknown fields refused, durations as
/// text such as `"30s"`):
///
/// ```yaml
/// domain: cluster.local      # the cluster domain
/// ttl: 30s                   # TTL of mesh answers, whole seconds
/// upstream:                  # forwarding (UpstreamConfig)
///   servers: [10.0.0.10:53]  # none: names outside the domain get SERVFAIL
///   timeout: 2s
///   attempts: 2
///   cacheSize: 4096
///   negativeMinTtl: 1s
///   negativeMaxTtl: 5m
///   maxInFlight: 256
/// handshakeLimits:           # TCP clients before their first question
///   timeout: 10s
///   maxInProgress: 256
///   maxInProgressPerIp: 32
/// ```
///
/// Values are checked by [`DnsProxyBuilder::build`](crate::DnsProxyBuilder::build),
/// with the builder's errors.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct DnsConfig {
    /// `domain`: the cluster domain the proxy is authoritative for (default
    /// `cluster.local`); a final dot and upper case are dropped.
    pub domain: String,
    /// `ttl`: the TTL of mesh answers (default `30s`), in whole seconds (at
    /// most `u32::MAX`); negative answers for the domain are cached for the
    /// shorter of this and 5 s.
    #[serde(with = "mesh_net::config::duration")]
    pub ttl: Duration,
    /// `upstream`: the resolvers for names outside the domain and how
    /// forwarding is bounded (default [`UpstreamConfig::default`]: no
    /// servers, `timeout: 2s`, `attempts: 2`, `cacheSize: 4096`,
    /// `negativeMinTtl: 1s`, `negativeMaxTtl: 5m`, `maxInFlight: 256`).
    pub upstream: UpstreamConfig,
    /// `handshakeLimits`: bounds on TCP clients that have not sent their
    /// first question yet (default `timeout: 10s`, `maxInProgress: 256`,
    /// `maxInProgressPerIp: 32`; see [`HandshakeLimits`]).
    pub handshake_limits: HandshakeLimits,
}

/// The default of [`DnsConfig::domain`].
pub(crate) const DEFAULT_DOMAIN: &str = "cluster.local";

/// The default of [`DnsConfig::ttl`], in seconds.
pub(crate) const DEFAULT_TTL: u32 = 30;

/// The default of [`DnsConfig::handshake_limits`]: 10 s for the first
/// question (as long as a connection may stay idle between questions), at
/// most 256 waiting at once, 32 from one address.
pub(crate) fn default_handshake_limits() -> HandshakeLimits {
    HandshakeLimits::default()
        .with_timeout(crate::server::TCP_IDLE)
        .with_max_in_progress(256)
        .with_max_in_progress_per_ip(32)
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.into(),
            ttl: Duration::from_secs(DEFAULT_TTL.into()),
            upstream: UpstreamConfig::default(),
            handshake_limits: default_handshake_limits(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default() {
        let config: DnsConfig = mesh_net::config::from_yaml("", "dns.yaml").unwrap();
        assert_eq!(config, DnsConfig::default());
        let config: DnsConfig = mesh_net::config::from_yaml("{}", "dns.json").unwrap();
        assert_eq!(config, DnsConfig::default());
    }
}
