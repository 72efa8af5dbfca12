//! Forwarding what the mesh does not answer to the node's resolvers, through
//! hickory's resolver: UDP with TCP on truncation, timeouts and attempts, and a
//! cache that honours record TTLs and negative TTLs (from the SOA).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};

/// How upstream queries behave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The resolvers, tried in order.
    pub servers: Vec<SocketAddr>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Attempts per server.
    pub attempts: usize,
    /// Cached responses at most.
    pub cache_size: u64,
    /// Shortest time a negative answer is cached (when the SOA says less).
    pub negative_min_ttl: Duration,
    /// Longest time a negative answer is cached.
    pub negative_max_ttl: Duration,
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
        }
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

/// The upstream resolvers with a shared cache.
#[derive(Clone)]
pub struct Upstream {
    resolver: Resolver<TokioRuntimeProvider>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    /// A forwarder to `config.servers` (no system configuration is read).
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        if config.servers.is_empty() {
            return Err("no upstream resolvers".into());
        }
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
        options.attempts = config.attempts;
        options.cache_size = config.cache_size;
        options.negative_min_ttl = Some(config.negative_min_ttl);
        options.negative_max_ttl = Some(config.negative_max_ttl);
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|err| err.to_string())?;
        Ok(Self { resolver })
    }

    /// Asks the upstream (or the cache). NXDOMAIN and NODATA come back as
    /// answers with their SOA; failures to get any answer are SERVFAIL.
    pub async fn query(&self, name: &Name, record_type: RecordType) -> Relayed {
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        match self.resolver.lookup(fqdn, record_type).await {
            Ok(lookup) => {
                let message = lookup.message();
                Relayed {
                    code: message.metadata.response_code,
                    answers: lookup.answers().to_vec(),
                    authorities: message.authorities.clone(),
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(no_records))) => Relayed {
                code: no_records.response_code,
                answers: Vec::new(),
                authorities: no_records
                    .soa
                    .map(|soa| vec![soa.into_record_of_rdata()])
                    .unwrap_or_default(),
            },
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Relayed {
                code,
                answers: Vec::new(),
                authorities: Vec::new(),
            },
            Err(err) => {
                tracing::debug!(%name, ?record_type, error = %err, "upstream failed");
                Relayed {
                    code: ResponseCode::ServFail,
                    answers: Vec::new(),
                    authorities: Vec::new(),
                }
            }
        }
    }
}
