//! Forwarding what the mesh does not answer to the node's resolvers, through
//! hickory's resolver: UDP with TCP on truncation, timeouts and attempts, and a
//! cache (hickory's) that honours record TTLs and negative TTLs (from the SOA).
//!
//! Forwarding is bounded, so a flood of names the upstream does not answer
//! cannot take the process's memory or file descriptors:
//!
//! - The cache is asked first, and answers without limit.
//! - At most [`UpstreamConfig::max_in_flight`] questions wait for the
//!   upstream at a time. Beyond that a question gets SERVFAIL at once (counted
//!   in [`DnsStats::forwards_refused`](crate::DnsStats::forwards_refused)).
//! - A forwarded question gets its answer or SERVFAIL within
//!   `timeout × attempts` (at most [`MAX_FORWARD_TIME`]).
//! - Each waiting question holds one UDP socket of its own, on a fresh random
//!   port, closed when it ends (see `sockets`): the sockets open never
//!   outnumber `max_in_flight`, and no source port is reused (RFC 5452).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::{ResponseCache, TtlConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use sockets::{SocketPool, UpstreamConnections, UpstreamRuntime};

mod sockets;

/// The most [`UpstreamConfig::max_in_flight`] may be: each question in flight
/// holds a socket, and far fewer descriptors are there to hold.
pub const MAX_IN_FLIGHT_LIMIT: usize = 1 << 20;

/// The default of [`UpstreamConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// The longest a forwarded question may wait for the upstream
/// (`timeout × attempts`); longer configurations are refused.
pub const MAX_FORWARD_TIME: Duration = Duration::from_secs(30);

/// How upstream queries behave. As configuration ([`mesh_net::config`], the
/// `upstream` field of [`DnsConfig`](crate::DnsConfig)): `camelCase` names,
/// each optional, durations as text (`"2s"`), servers as `"IP:PORT"`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `servers`: the resolvers, tried in order, as `"IP:PORT"` (default
    /// none: names outside the cluster domain get SERVFAIL).
    pub servers: Vec<SocketAddr>,
    /// `timeout`: per-attempt timeout, not zero (default `2s`).
    #[serde(with = "mesh_net::config::duration")]
    pub timeout: Duration,
    /// `attempts`: tries of each question (at least one; default 2), one
    /// upstream at a time, each one datagram. A question is answered, or gets
    /// SERVFAIL, within `timeout × attempts`, which may not exceed
    /// [`MAX_FORWARD_TIME`].
    pub attempts: usize,
    /// `cacheSize`: cached responses at most (default 4096).
    pub cache_size: u64,
    /// `negativeMinTtl`: shortest time a negative answer is cached, when the
    /// SOA says less (default `1s`).
    #[serde(with = "mesh_net::config::duration")]
    pub negative_min_ttl: Duration,
    /// `negativeMaxTtl`: longest time a negative answer is cached (default
    /// `5m`).
    #[serde(with = "mesh_net::config::duration")]
    pub negative_max_ttl: Duration,
    /// `maxInFlight`: questions waiting for the upstream at most (at least
    /// one); the cache answers beyond it, and questions it cannot answer get
    /// SERVFAIL at once. Each waiting question holds one UDP socket, so keep
    /// this well under the process's file descriptor limit. Default
    /// [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            cache_size: 4096,
            negative_min_ttl: Duration::from_secs(1),
            negative_max_ttl: Duration::from_secs(300),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl UpstreamConfig {
    /// Why this configuration cannot be used, if it cannot.
    fn check(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("no upstream resolvers".into());
        }
        if self.timeout.is_zero() {
            return Err("the upstream timeout is zero".into());
        }
        if self.attempts == 0 {
            return Err("upstream attempts must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        if self.max_in_flight > MAX_IN_FLIGHT_LIMIT {
            return Err(format!(
                "max_in_flight {} is more than {MAX_IN_FLIGHT_LIMIT}",
                self.max_in_flight
            ));
        }
        let total = u32::try_from(self.attempts)
            .ok()
            .and_then(|attempts| self.timeout.checked_mul(attempts))
            .filter(|total| *total <= MAX_FORWARD_TIME);
        if total.is_none() {
            return Err(format!(
                "timeout {:?} × {} attempts exceeds {MAX_FORWARD_TIME:?}",
                self.timeout, self.attempts
            ));
        }
        Ok(())
    }
}

/// An upstream answer, ready to relay. Relayed answers are never marked
/// authoritative: the proxy is not the authority, and they may come from its cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relayed {
    /// The response code.
    pub code: ResponseCode,
    /// Answer records.
    pub answers: Vec<Record>,
    /// Authority records (the SOA of a negative answer).
    pub authorities: Vec<Record>,
}

impl Relayed {
    pub(crate) fn servfail() -> Self {
        Self {
            code: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
        }
    }

    /// From an upstream response, or its failure (as the cache keeps them).
    fn from_result(
        name: &Name,
        record_type: RecordType,
        result: Result<Message, NetError>,
    ) -> Self {
        match result {
            Ok(message) => Self {
                code: message.metadata.response_code,
                answers: message.answers,
                authorities: message.authorities,
            },
            Err(NetError::Dns(DnsError::NoRecordsFound(no_records))) => Self {
                code: no_records.response_code,
                answers: Vec::new(),
                authorities: no_records
                    .soa
                    .map(|soa| vec![soa.into_record_of_rdata()])
                    .unwrap_or_default(),
            },
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Self {
                code,
                answers: Vec::new(),
                authorities: Vec::new(),
            },
            Err(err) => {
                tracing::debug!(%name, ?record_type, error = %err, "upstream failed");
                Self::servfail()
            }
        }
    }
}

/// The upstream resolvers with a shared cache and a bound on the questions
/// waiting for them. Clones share all of it.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

/// What clones of one [`Upstream`] share.
struct Shared {
    resolver: Resolver<UpstreamConnections>,
    cache: ResponseCache,
    places: Arc<Semaphore>,
    max_in_flight: usize,
    /// `timeout × attempts`.
    deadline: Duration,
    sockets: Arc<SocketPool>,
    forwarded: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("max_in_flight", &self.shared.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// The first step of forwarding a question: answered already (from the cache,
/// or SERVFAIL when too many questions wait), or holding a place to ask.
pub(crate) enum Start {
    /// Nothing to wait for.
    Answered(Relayed),
    /// Ask the upstream with [`Forward::answer`].
    Forward(Forward),
}

/// A question holding one of the [`UpstreamConfig::max_in_flight`] places,
/// released when it is answered or dropped.
pub(crate) struct Forward {
    upstream: Upstream,
    query: Query,
    _place: OwnedSemaphorePermit,
}

impl Upstream {
    /// A forwarder to `config.servers` (no system configuration is read).
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        config.check()?;
        let servers = config
            .servers
            .iter()
            .map(|server| {
                let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut name_server.connections {
                    connection.port = server.port();
                }
                name_server
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.timeout = config.timeout;
        // hickory's `attempts` counts the retries after the first try.
        options.attempts = config.attempts - 1;
        options.negative_min_ttl = Some(config.negative_min_ttl);
        options.negative_max_ttl = Some(config.negative_max_ttl);
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        // One server at a time, so a question holds one socket at most.
        options.num_concurrent_reqs = 1;
        // The cache in front of the resolver is ours (asked before taking a
        // place); the resolver's own would only hold copies.
        let cache = ResponseCache::new(config.cache_size, TtlConfig::from_opts(&options));
        options.cache_size = 0;
        let sockets = Arc::new(SocketPool::default());
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            UpstreamConnections::new(UpstreamRuntime::new(sockets.clone())),
        )
        .with_options(options)
        .build()
        .map_err(|err| err.to_string())?;
        let attempts = u32::try_from(config.attempts).unwrap_or(u32::MAX);
        Ok(Self {
            shared: Arc::new(Shared {
                resolver,
                cache,
                places: Arc::new(Semaphore::new(config.max_in_flight)),
                max_in_flight: config.max_in_flight,
                deadline: config.timeout.saturating_mul(attempts),
                sockets,
                forwarded: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        })
    }

    /// Asks the upstream (or the cache). NXDOMAIN and NODATA come back as
    /// answers with their SOA; failures to get any answer are SERVFAIL, and so
    /// is a question the cache cannot answer while
    /// [`UpstreamConfig::max_in_flight`] questions already wait.
    pub async fn query(&self, name: &Name, record_type: RecordType) -> Relayed {
        match self.start(name, record_type) {
            Start::Answered(relayed) => relayed,
            Start::Forward(forward) => forward.answer().await,
        }
    }

    /// Answers from the cache, or takes a place to ask the upstream, or
    /// answers SERVFAIL when there is none; never waits.
    pub(crate) fn start(&self, name: &Name, record_type: RecordType) -> Start {
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        let query = Query::query(fqdn, record_type);
        if let Some(cached) = self.shared.cache.get(&query, now()) {
            return Start::Answered(Relayed::from_result(name, record_type, cached));
        }
        match self.shared.places.clone().try_acquire_owned() {
            Ok(place) => {
                self.shared.forwarded.fetch_add(1, Ordering::Relaxed);
                Start::Forward(Forward {
                    upstream: self.clone(),
                    query,
                    _place: place,
                })
            }
            Err(_) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%name, ?record_type, "too many questions upstream: SERVFAIL");
                Start::Answered(Relayed::servfail())
            }
        }
    }

    /// Questions forwarded (cache misses given a place) since this was built.
    pub(crate) fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// Questions waiting for the upstream now.
    pub(crate) fn in_flight(&self) -> usize {
        self.shared
            .max_in_flight
            .saturating_sub(self.shared.places.available_permits())
    }

    /// Questions answered SERVFAIL because the places were all taken.
    pub(crate) fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// UDP sockets towards the upstream open now (one per exchange in flight).
    pub(crate) fn sockets(&self) -> usize {
        self.shared.sockets.open()
    }
}

impl Forward {
    /// Asks the upstream, within `timeout × attempts`, and caches what is
    /// cacheable (answers and negative answers).
    pub(crate) async fn answer(self) -> Relayed {
        let upstream = &self.upstream.shared;
        let name = self.query.name().clone();
        let record_type = self.query.query_type();
        let result = match tokio::time::timeout(
            upstream.deadline,
            upstream.resolver.lookup(name.clone(), record_type),
        )
        .await
        {
            Ok(Ok(lookup)) => Ok(lookup.message().clone()),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(NetError::Timeout),
        };
        match &result {
            Ok(_) | Err(NetError::Dns(DnsError::NoRecordsFound(_))) => {
                upstream.cache.insert(self.query, result.clone(), now());
            }
            Err(_) => {}
        }
        Relayed::from_result(&name, record_type, result)
    }
}

/// The cache's clock, from Tokio's.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> UpstreamConfig {
        UpstreamConfig {
            servers: vec!["127.0.0.1:53".parse().unwrap()],
            ..UpstreamConfig::default()
        }
    }

    #[test]
    fn the_default_configuration_is_bounded() {
        let config = config();
        assert_eq!(config.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(config.check(), Ok(()));
        assert!(config.timeout * u32::try_from(config.attempts).unwrap() <= MAX_FORWARD_TIME);
    }

    #[test]
    fn unbounded_or_empty_configurations_are_refused() {
        let refused = |change: fn(&mut UpstreamConfig)| {
            let mut config = config();
            change(&mut config);
            config.check().unwrap_err()
        };
        assert!(refused(|c| c.servers.clear()).contains("no upstream"));
        assert!(refused(|c| c.timeout = Duration::ZERO).contains("timeout"));
        assert!(refused(|c| c.attempts = 0).contains("attempts"));
        assert!(refused(|c| c.max_in_flight = 0).contains("max_in_flight"));
        assert!(refused(|c| c.timeout = Duration::from_secs(16)).contains("exceeds"));
        assert!(refused(|c| c.attempts = usize::MAX).contains("exceeds"));
        let mut longest = config();
        longest.timeout = Duration::from_secs(10);
        longest.attempts = 3;
        assert_eq!(longest.check(), Ok(()));
    }
}
