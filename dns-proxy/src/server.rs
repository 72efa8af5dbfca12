//! The DNS server on caller-bound sockets. Both transports share one decision
//! (answer from the mesh, see [`resolve`](mod@crate::resolve), or forward),
//! with hickory-proto for the wire format. UDP, the hot path, runs on a
//! receive loop that answers mesh questions inline (profiling showed
//! hickory-server's per-question task and channel dominating); TCP
//! (`tcp`) on connections accepted through [`mesh_net::Acceptor`], so a
//! client must send its first question within the handshake deadline, the
//! connections waiting for one are bounded, and a process out of file
//! descriptors backs off instead of spinning.
//!
//! The proxy is the authority for the cluster domain: a name in it that the
//! mesh does not know gets NXDOMAIN (NODATA for the apex, `svc.<domain>` and
//! `<namespace>.svc.<domain>`, which exist as parents of service names), with
//! the domain's SOA, and is never forwarded.
//!
//! Malformed questions get FORMERR when their header can be read and are
//! dropped otherwise; questions larger than [`MAX_QUERY_BYTES`] are refused.
//! Any opcode but QUERY (UPDATE, NOTIFY, STATUS, ...) gets NOTIMP with the
//! request's ID and opcode.
//!
//! [`DnsProxy::spawn`] returns a [`DnsHandle`] with the verbs of every
//! podless component ([`mesh_net::lifecycle`]): `ready`, `drain` (stop
//! reading UDP questions and accepting TCP connections, let forwarded
//! questions and open connections finish their question), `shutdown` (close
//! everything now) and `join` (wait, never stop).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use mesh_net::{Acceptor, Drained, HandshakeLimits};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DnsConfig;
use crate::lookup::MeshDns;
use answers::AnswerCache;

mod answers;
mod tcp;
use crate::resolve::{Resolution, in_domain, resolve};
use crate::upstream::{Relayed, Start, Upstream, UpstreamConfig};

/// The largest question accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;

/// How long an idle TCP connection stays open between questions.
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(10);

/// The longest a negative answer for the cluster domain may be cached (the
/// SOA's TTL and minimum; the mesh TTL when that is shorter): a service
/// created just after a miss is found soon.
const NEGATIVE_TTL: u32 = 5;

/// Why a proxy could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No mesh state was given.
    #[error("a DNS proxy needs mesh state (MeshDns)")]
    NoMesh,
    /// The upstream configuration is unusable.
    #[error("upstream: {0}")]
    Upstream(String),
    /// The cluster domain is not a valid DNS name.
    #[error("cluster domain {domain:?}: {reason}")]
    Domain {
        /// The domain given.
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TTL of mesh answers is not a whole number of seconds that fits a
    /// DNS record ([`DnsConfig::ttl`]).
    #[error("ttl {ttl:?}: {reason}")]
    Ttl {
        /// The TTL given.
        ttl: Duration,
        /// What is wrong with it.
        reason: String,
    },
}

/// Builds a [`DnsProxy`]: from its setters, or from a [`DnsConfig`]
/// ([`config`](Self::config), or `DnsProxyBuilder::from(config)`) with the
/// mesh state added, which is not data.
///
/// ```
/// # use std::sync::Arc;
/// use dns_proxy::{DnsConfig, DnsProxy, DnsProxyBuilder, InMemoryMeshDns};
///
/// let config: DnsConfig = mesh_net::config::from_yaml("domain: mesh.test\n", "dns.yaml")?;
/// let proxy = DnsProxy::builder()
///     .config(config.clone())
///     .mesh(Arc::new(InMemoryMeshDns::new()))
///     .build()?;
/// assert_eq!(proxy.config().domain, "mesh.test");
/// let same = DnsProxyBuilder::from(config).mesh(Arc::new(InMemoryMeshDns::new())).build()?;
/// assert_eq!(same.config(), proxy.config());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct DnsProxyBuilder {
    mesh: Option<Arc<dyn MeshDns>>,
    config: DnsConfig,
}

impl std::fmt::Debug for DnsProxyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsProxyBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl From<DnsConfig> for DnsProxyBuilder {
    /// A builder with every field of `config` (see
    /// [`DnsProxyBuilder::config`]); the mesh state is still to give.
    fn from(config: DnsConfig) -> Self {
        DnsProxyBuilder::default().config(config)
    }
}

impl DnsProxyBuilder {
    /// The mesh state to answer from.
    pub fn mesh(mut self, mesh: Arc<dyn MeshDns>) -> Self {
        self.mesh = Some(mesh);
        self
    }

    /// Every field of `config` (domain, TTL, upstream, TCP handshake
    /// limits), replacing what was set before; setters called after it
    /// change single fields. Checked by [`build`](Self::build).
    pub fn config(mut self, config: DnsConfig) -> Self {
        self.config = config;
        self
    }

    /// The cluster domain (default `cluster.local`).
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.config.domain = domain.into();
        self
    }

    /// TTL of mesh answers in seconds (default 30).
    pub fn ttl(mut self, seconds: u32) -> Self {
        self.config.ttl = Duration::from_secs(seconds.into());
        self
    }

    /// Upstream resolvers and their behaviour, including the bound on
    /// questions waiting for them ([`UpstreamConfig::max_in_flight`]); with
    /// none, unknown names outside the cluster domain get SERVFAIL.
    pub fn upstream(mut self, upstream: UpstreamConfig) -> Self {
        self.config.upstream = upstream;
        self
    }

    /// Bounds on TCP clients that have not sent their first question yet
    /// (default 10 s for it, at most 256 waiting at once, 32 from one
    /// address; over that the oldest waiting is closed).
    pub fn handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.config.handshake_limits = limits;
        self
    }

    /// Validates and assembles; binds nothing.
    pub fn build(self) -> Result<DnsProxy, BuildError> {
        let mesh = self.mesh.ok_or(BuildError::NoMesh)?;
        let mut config = self.config;
        let upstream = if config.upstream.servers.is_empty() {
            None
        } else {
            Some(Upstream::new(&config.upstream).map_err(BuildError::Upstream)?)
        };
        config.domain = config.domain.trim_end_matches('.').to_ascii_lowercase();
        let ttl = ttl_seconds(config.ttl).map_err(|reason| BuildError::Ttl {
            ttl: config.ttl,
            reason,
        })?;
        let domain = config.domain.clone();
        let soa = soa(&domain, ttl.min(NEGATIVE_TTL)).map_err(|reason| BuildError::Domain {
            domain: domain.clone(),
            reason,
        })?;
        Ok(DnsProxy {
            handler: Handler {
                mesh,
                domain,
                ttl,
                upstream,
                soa: Arc::new(soa),
            },
            config: Arc::new(config),
        })
    }
}

/// A TTL as a DNS record's: whole seconds, at most `u32::MAX`.
fn ttl_seconds(ttl: Duration) -> Result<u32, String> {
    if ttl.subsec_nanos() != 0 {
        return Err("not a whole number of seconds".into());
    }
    u32::try_from(ttl.as_secs()).map_err(|_| format!("over {} seconds", u32::MAX))
}

/// The SOA record of the cluster domain, sent with its negative answers.
fn soa(domain: &str, negative_ttl: u32) -> Result<Record, String> {
    let name = |prefix: &str| {
        let text = match (prefix.is_empty(), domain.is_empty()) {
            (_, true) => format!("{prefix}."),
            (true, false) => format!("{domain}."),
            (false, false) => format!("{prefix}.{domain}."),
        };
        Name::from_ascii(&text).map_err(|err| err.to_string())
    };
    if domain.is_empty() {
        return Err("empty".into());
    }
    Ok(Record::from_rdata(
        name("")?,
        negative_ttl,
        RData::SOA(SOA::new(
            name("ns.dns")?,
            name("hostmaster")?,
            1,
            7200,
            1800,
            86400,
            negative_ttl,
        )),
    ))
}

/// Counters an embedder can read (and export as metrics), from
/// [`DnsProxy::stats`] or [`DnsHandle::stats`]. All zero without an upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DnsStats {
    /// Questions sent to the upstream (the cache could not answer them)
    /// since the proxy was built.
    pub forwarded: u64,
    /// Forwarded questions waiting for the upstream now, at most
    /// [`UpstreamConfig::max_in_flight`].
    pub forwards_in_flight: usize,
    /// Questions answered SERVFAIL at once, without asking the upstream,
    /// because `max_in_flight` questions were already waiting.
    pub forwards_refused: u64,
    /// UDP sockets towards the upstream open now: one per waiting question
    /// at most.
    pub upstream_sockets: usize,
}

impl DnsStats {
    fn of(upstream: Option<&Upstream>) -> Self {
        upstream.map_or_else(Self::default, |upstream| Self {
            forwarded: upstream.forwarded(),
            forwards_in_flight: upstream.in_flight(),
            forwards_refused: upstream.refused(),
            upstream_sockets: upstream.sockets(),
        })
    }
}

/// A DNS proxy ready to serve.
#[derive(Clone)]
pub struct DnsProxy {
    handler: Handler,
    /// What it was built with, the domain as served.
    config: Arc<DnsConfig>,
}

impl std::fmt::Debug for DnsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsProxy")
            .field("domain", &self.handler.domain)
            .finish_non_exhaustive()
    }
}

impl DnsProxy {
    /// A builder.
    pub fn builder() -> DnsProxyBuilder {
        DnsProxyBuilder::default()
    }

    /// The configuration it was built with, the domain as served (in lower
    /// case, without a final dot): a builder given it builds the same proxy.
    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// The counters, shared by every clone and the running proxy.
    pub fn stats(&self) -> DnsStats {
        DnsStats::of(self.handler.upstream.as_ref())
    }

    /// Serves on the caller's sockets until `shutdown` is cancelled, then
    /// closes everything at once (for a drain, use [`DnsProxy::spawn`] and
    /// [`DnsHandle::drain`]). An error when a serving task failed.
    pub async fn serve(
        self,
        udp: UdpSocket,
        tcp: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        self.run(udp, tcp, Lifecycle::new(shutdown)).await
    }

    /// Serves until `life.stop`: the receive and accept loops (until
    /// `life.draining`) in `life.intake`, what they start in `life.work`.
    async fn run(
        self,
        udp: UdpSocket,
        tcp: TcpListener,
        life: Lifecycle,
    ) -> Result<(), ServeError> {
        let tcp = life.intake.spawn(tcp::serve_tcp(
            self.handler.clone(),
            Acceptor::new(tcp, "DNS over TCP", self.config.handshake_limits),
            life.clone(),
        ));
        let udp = life
            .intake
            .spawn(serve_udp(self.handler, Arc::new(udp), life.clone()));
        life.intake.close();
        // A loop that fails stops the proxy.
        let watch = |task: tokio::task::JoinHandle<()>| {
            let stop = life.stop.clone();
            async move {
                let ended = task.await;
                if ended.is_err() {
                    stop.cancel();
                }
                ended
            }
        };
        let (udp, tcp) = tokio::join!(watch(udp), watch(tcp));
        life.stop.cancelled().await;
        life.work.close();
        life.work.wait().await;
        udp.and(tcp)?;
        Ok(())
    }

    /// Spawns the proxy on the current runtime, serving the caller's sockets.
    /// It is ready at once (see [`DnsHandle::ready`]).
    pub fn spawn(self, udp: UdpSocket, tcp: TcpListener) -> std::io::Result<DnsHandle> {
        let udp_addr = udp.local_addr()?;
        let tcp_addr = tcp.local_addr()?;
        let life = Lifecycle::new(CancellationToken::new());
        let stopped = CancellationToken::new();
        let upstream = self.handler.upstream.clone();
        let task = tokio::spawn({
            let life = life.clone();
            // Cancelled when the task ends, even by a panic.
            let stopped = stopped.clone().drop_guard();
            async move {
                let _stopped = stopped;
                self.run(udp, tcp, life).await
            }
        });
        Ok(DnsHandle {
            udp_addr,
            tcp_addr,
            life,
            stopped,
            upstream,
            task,
        })
    }
}

/// Why a proxy stopped with an error, from [`DnsHandle::join`] or
/// [`DnsProxy::serve`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A serving task failed (panicked, or was cancelled by the runtime
    /// shutting down).
    #[error("DNS proxy task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why a proxy is not ready, from [`DnsHandle::ready`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// The proxy has stopped or is stopping: it was drained or shut down, or
    /// a serving task failed.
    #[error("the DNS proxy has stopped (drained, shut down, or failed)")]
    Stopped,
}

/// What the serving tasks and the handle share to stop.
#[derive(Clone, Debug)]
struct Lifecycle {
    /// Cancelled to take no new work: the UDP loop stops receiving, the TCP
    /// loop stops accepting, connections close between questions. A child of
    /// `stop`.
    draining: CancellationToken,
    /// Cancelled to close everything now.
    stop: CancellationToken,
    /// The UDP receive loop and the TCP accept loop.
    intake: TaskTracker,
    /// Work in progress: UDP questions waiting for the upstream, and TCP
    /// connections.
    work: TaskTracker,
}

impl Lifecycle {
    fn new(stop: CancellationToken) -> Self {
        Self {
            draining: stop.child_token(),
            stop,
            intake: TaskTracker::new(),
            work: TaskTracker::new(),
        }
    }
}

/// A running proxy, with the verbs every podless component's handle has (see
/// [`mesh_net::lifecycle`]). Dropping it leaves the proxy running.
#[derive(Debug)]
pub struct DnsHandle {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    life: Lifecycle,
    /// Cancelled when the proxy's task has ended.
    stopped: CancellationToken,
    upstream: Option<Upstream>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl DnsHandle {
    /// The address served: the UDP one ([`DnsHandle::udp_addr`]), DNS's
    /// main transport; see also [`DnsHandle::tcp_addr`].
    pub fn local_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The UDP address served.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The TCP address served.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The counters (see [`DnsStats`]).
    pub fn stats(&self) -> DnsStats {
        DnsStats::of(self.upstream.as_ref())
    }

    /// `Ok` while the proxy answers: it is ready as soon as it is spawned (on
    /// sockets the caller bound), so this returns at once, without using
    /// `wait`. [`NotReady::Stopped`] once [`drain`](Self::drain) or
    /// [`shutdown`](Self::shutdown) was called, or a serving task failed.
    pub async fn ready(&self, wait: Duration) -> Result<(), NotReady> {
        let _ = wait;
        if self.life.draining.is_cancelled() || self.stopped.is_cancelled() {
            return Err(NotReady::Stopped);
        }
        Ok(())
    }

    /// Stops taking new work and lets the work in progress finish for up to
    /// `deadline`, then closes what is left and waits for the proxy to stop.
    ///
    /// UDP questions are no longer read and TCP connections no longer
    /// accepted (the listener closes). Questions forwarded to the upstream
    /// get their answer (or SERVFAIL within `timeout × attempts`); an open
    /// TCP connection answers the question it is receiving or answering (and
    /// any it has already received), then closes instead of waiting for the
    /// next one. [`Drained::TimedOut`]'s `left` counts the forwarded UDP
    /// questions and the TCP connections still open at the deadline.
    ///
    /// The proxy has stopped when this returns: [`join`](Self::join)
    /// returns at once. On a proxy already stopped, [`Drained::Complete`].
    pub async fn drain(&self, deadline: Duration) -> Drained {
        let deadline = tokio::time::Instant::now() + deadline;
        self.life.draining.cancel();
        let finished = tokio::time::timeout_at(deadline, async {
            // Once the loops have stopped, no work starts.
            self.life.intake.wait().await;
            self.life.work.close();
            self.life.work.wait().await;
        })
        .await
        .is_ok();
        let left = if finished { 0 } else { self.life.work.len() };
        self.life.stop.cancel();
        self.stopped.cancelled().await;
        if left == 0 {
            Drained::Complete
        } else {
            Drained::TimedOut { left }
        }
    }

    /// Stops now: stops reading and accepting, closes every TCP connection
    /// and drops the questions waiting for the upstream. Idempotent; returns
    /// at once ([`join`](Self::join) waits until the proxy has stopped).
    pub fn shutdown(&self) {
        self.life.stop.cancel();
    }

    /// Waits until the proxy has stopped (after [`drain`](Self::drain),
    /// [`shutdown`](Self::shutdown), or a failure, which is returned). Never
    /// stops it: dropping this future leaves the proxy running.
    pub async fn join(self) -> Result<(), ServeError> {
        self.task.await?
    }
}

#[derive(Clone)]
struct Handler {
    mesh: Arc<dyn MeshDns>,
    domain: String,
    ttl: u32,
    upstream: Option<Upstream>,
    /// The cluster domain's SOA, for negative answers.
    soa: Arc<Record>,
}

/// What the handler sends back.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
}

impl Reply {
    fn code(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
        }
    }

    fn relayed(relayed: Relayed) -> Self {
        let Relayed {
            code,
            answers,
            authorities,
        } = relayed;
        Self {
            code,
            authoritative: false,
            answers,
            authorities,
        }
    }
}

/// What the mesh says about one question.
enum Decision {
    Reply(Reply),
    Forward(Name, RecordType),
}

impl Handler {
    /// The encoded answer to the question in `packet` from `client`, for a
    /// stream transport (no size limit but DNS's own): NOTIMP for opcodes
    /// other than QUERY, FORMERR for what does not read as one question,
    /// otherwise the mesh's answer or the upstream's. `None` when nothing
    /// should be sent (a response, or not even a header).
    async fn answer(&self, packet: &[u8], client: SocketAddr) -> Option<Vec<u8>> {
        if let Some(refusal) = refusal(packet) {
            return Some(refusal);
        }
        let request = Message::from_vec(packet).ok()?;
        if packet.len() > MAX_QUERY_BYTES {
            return encode(request, Reply::code(ResponseCode::FormErr), None);
        }
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let namespace = self.mesh.client_namespace(client.ip());
        let reply = match request.queries.as_slice() {
            [query] => match self.decide(query, namespace.as_deref()) {
                Decision::Reply(reply) => reply,
                Decision::Forward(name, record_type) => self.forward(&name, record_type).await,
            },
            _ => Reply::code(ResponseCode::FormErr),
        };
        encode(request, reply, None)
    }

    /// Answers from the mesh for a client in `namespace` without waiting for
    /// anything, or says to forward.
    fn decide(&self, query: &Query, namespace: Option<&str>) -> Decision {
        let question = query.name();
        let record_type = query.query_type();
        if query.query_class() != DNSClass::IN {
            return Decision::Forward(question.clone(), record_type);
        }
        let mut name = question.to_ascii();
        name.make_ascii_lowercase();
        if name.ends_with('.') {
            name.pop();
        }
        match resolve(
            self.mesh.as_ref(),
            &self.domain,
            namespace,
            &name,
            record_type,
        ) {
            Resolution::Answer {
                alias_of,
                addresses,
            } => self.mesh_answer(question, &name, alias_of, addresses),
            Resolution::Forward if in_domain(&self.domain, &name) => {
                self.authority(question, &name, record_type, namespace)
            }
            Resolution::Forward => Decision::Forward(question.clone(), record_type),
        }
    }

    /// The answer to a name in the cluster domain that the mesh has no
    /// records of the asked type for: NODATA for a name that exists (a
    /// service asked for another type, or a parent of service names), the SOA
    /// for the apex, NXDOMAIN for the rest. With the SOA, so resolvers cache
    /// the miss briefly.
    fn authority(
        &self,
        question: &Name,
        name: &str,
        record_type: RecordType,
        namespace: Option<&str>,
    ) -> Decision {
        let apex = name == self.domain;
        if apex && record_type == RecordType::SOA {
            let mut soa = (*self.soa).clone();
            soa.name = question.clone();
            return Decision::Reply(Reply {
                code: ResponseCode::NoError,
                authoritative: true,
                answers: vec![soa],
                authorities: Vec::new(),
            });
        }
        if !matches!(record_type, RecordType::A | RecordType::AAAA)
            && let Resolution::Answer { alias_of, .. } = resolve(
                self.mesh.as_ref(),
                &self.domain,
                namespace,
                name,
                RecordType::A,
            )
        {
            return self.mesh_answer(question, name, alias_of, Vec::new());
        }
        let parent = name
            .strip_suffix(self.domain.as_str())
            .and_then(|rest| rest.strip_suffix(".svc."))
            .is_some_and(|namespace| !namespace.contains('.'));
        let exists = apex || parent || name == format!("svc.{}", self.domain);
        Decision::Reply(Reply {
            code: if exists {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            },
            authoritative: true,
            answers: Vec::new(),
            authorities: vec![(*self.soa).clone()],
        })
    }

    /// An authoritative answer from the mesh to `question` (`name` in
    /// lowercase, without the final dot): a CNAME to `alias_of` if given, then
    /// the addresses; with the SOA when there are none and the name answered
    /// is in the cluster domain.
    fn mesh_answer(
        &self,
        question: &Name,
        name: &str,
        alias_of: Option<String>,
        addresses: Vec<IpAddr>,
    ) -> Decision {
        let mut answers = Vec::with_capacity(addresses.len() + 1);
        let mut owner = question.clone();
        let soa =
            addresses.is_empty() && in_domain(&self.domain, alias_of.as_deref().unwrap_or(name));
        if let Some(target) = alias_of {
            let Ok(target) = Name::from_ascii(format!("{target}.")) else {
                return Decision::Reply(Reply::code(ResponseCode::ServFail));
            };
            answers.push(Record::from_rdata(
                question.clone(),
                self.ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            owner = target;
        }
        answers.extend(addresses.into_iter().map(|ip| {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            Record::from_rdata(owner.clone(), self.ttl, rdata)
        }));
        Decision::Reply(Reply {
            code: ResponseCode::NoError,
            authoritative: true,
            answers,
            authorities: if soa {
                vec![(*self.soa).clone()]
            } else {
                Vec::new()
            },
        })
    }

    /// Starts forwarding: answered at once (from the cache, SERVFAIL with no
    /// upstream or no free place), or a question to ask the upstream.
    fn start_forward(&self, name: &Name, record_type: RecordType) -> Start {
        match &self.upstream {
            Some(upstream) => upstream.start(name, record_type),
            None => Start::Answered(Relayed::servfail()),
        }
    }

    async fn forward(&self, name: &Name, record_type: RecordType) -> Reply {
        Reply::relayed(match self.start_forward(name, record_type) {
            Start::Answered(relayed) => relayed,
            Start::Forward(forward) => forward.answer().await,
        })
    }
}

/// The UDP side: one receive loop that answers mesh questions inline (no task
/// or channel per question), and cached or refused forwards too; only a
/// question that waits for the upstream gets a task (at most
/// `max_in_flight` at a time). hickory-proto reads and writes the messages;
/// a mesh answer is kept encoded and reused for the same question while the
/// mesh state is unchanged. Other opcodes than QUERY get NOTIMP; unreadable
/// datagrams with a query header get FORMERR; shorter ones, and responses,
/// are dropped.
///
/// Receives until `life.draining`; the questions waiting for the upstream are
/// tasks in `life.work`, each ended by `life.stop`.
async fn serve_udp(handler: Handler, socket: Arc<UdpSocket>, life: Lifecycle) {
    let mut buffer = vec![0u8; MAX_QUERY_BYTES];
    let mut answers = AnswerCache::default();
    loop {
        let (len, client) = tokio::select! {
            biased;
            () = life.draining.cancelled() => break,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(err) => {
                    tracing::debug!(error = %err, "UDP receive failed");
                    continue;
                }
            },
        };
        if client.port() == 0 {
            continue;
        }
        let packet = &buffer[..len];
        if not_implemented(packet).is_some() {
            if let Some(reply) = refusal(packet) {
                send(&socket, &reply, client).await;
            }
            continue;
        }
        let namespace = handler.mesh.client_namespace(client.ip());
        let generation = handler.mesh.generation();
        if let Some(generation) = generation
            && let Some(answer) = answers.get(generation, packet, namespace.as_deref())
        {
            send(&socket, answer, client).await;
            continue;
        }
        let Ok(request) = Message::from_vec(packet) else {
            if let Some(reply) = refusal(packet) {
                send(&socket, &reply, client).await;
            }
            continue;
        };
        if request.metadata.message_type != MessageType::Query {
            continue;
        }
        let decision = match request.queries.as_slice() {
            [query] => handler.decide(query, namespace.as_deref()),
            _ => Decision::Reply(Reply::code(ResponseCode::FormErr)),
        };
        match decision {
            Decision::Reply(reply) => {
                if let Some(bytes) = encode_udp(request, reply) {
                    if let Some(generation) = generation {
                        answers.insert(generation, packet, namespace.as_deref(), &bytes);
                    }
                    send(&socket, &bytes, client).await;
                }
            }
            Decision::Forward(name, record_type) => {
                match handler.start_forward(&name, record_type) {
                    // From the cache, or SERVFAIL: no task needed.
                    Start::Answered(relayed) => {
                        if let Some(bytes) = encode_udp(request, Reply::relayed(relayed)) {
                            send(&socket, &bytes, client).await;
                        }
                    }
                    // At most `max_in_flight` of these at a time.
                    Start::Forward(forward) => {
                        let socket = socket.clone();
                        let stop = life.stop.clone();
                        life.work.spawn(async move {
                            let answer = async {
                                let reply = Reply::relayed(forward.answer().await);
                                if let Some(bytes) = encode_udp(request, reply) {
                                    send(&socket, &bytes, client).await;
                                }
                            };
                            tokio::select! {
                                () = answer => {}
                                () = stop.cancelled() => {}
                            }
                        });
                    }
                }
            }
        }
    }
}

/// What to answer a packet that is not a question we take, whatever the
/// transport: NOTIMP for an opcode other than QUERY (with the question or zone
/// section and EDNS when readable, else a bare header), FORMERR for a query
/// header followed by what does not read. `None` for a readable QUERY (to be
/// answered) and for what is not even a query header (to be dropped).
fn refusal(packet: &[u8]) -> Option<Vec<u8>> {
    if let Some(bare) = not_implemented(packet) {
        let full = Message::from_vec(packet)
            .ok()
            .and_then(|request| encode_udp(request, Reply::code(ResponseCode::NotImp)));
        return Some(full.unwrap_or_else(|| bare.to_vec()));
    }
    if Message::from_vec(packet).is_ok() || packet.len() < 12 || packet[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// The response to a request with an opcode other than QUERY (UPDATE, NOTIFY,
/// STATUS, unassigned ones), as a bare header: the same ID, opcode and RD
/// flag, QR set and NOTIMP. `None` for a QUERY, a response, or less than a
/// header.
fn not_implemented(packet: &[u8]) -> Option<[u8; 12]> {
    let flags = *packet.get(2)?;
    let is_query = flags & 0x80 == 0;
    let op_code = (flags >> 3) & 0x0f;
    if packet.len() < 12 || !is_query || op_code == 0 {
        return None;
    }
    let mut reply = [0u8; 12];
    reply[..2].copy_from_slice(&packet[..2]);
    // QR, the opcode and RD as asked; RA and NOTIMP (4).
    reply[2] = 0x80 | (flags & 0x79);
    reply[3] = 0x80 | ResponseCode::NotImp.low();
    Some(reply)
}

/// A UDP response to `request`, cut to an empty truncated answer (the client
/// then asks over TCP) when it exceeds 512 bytes, or the EDNS size (at most 1232).
fn encode_udp(request: Message, reply: Reply) -> Option<Vec<u8>> {
    let limit = request
        .edns
        .as_ref()
        .map_or(512, |asked| asked.max_payload().clamp(512, 1232));
    encode(request, reply, Some(limit))
}

/// The response to `request`, with EDNS if it asked with EDNS; with a
/// `limit` (UDP), cut to an empty truncated answer when larger.
fn encode(request: Message, reply: Reply, limit: Option<u16>) -> Option<Vec<u8>> {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = reply.authoritative;
    response.metadata.response_code = reply.code;
    response.queries = request.queries;
    response.answers = reply.answers;
    response.authorities = reply.authorities;
    if let Some(asked) = request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(limit.unwrap_or_else(|| asked.max_payload().clamp(512, 1232)));
        response.set_edns(edns);
    }
    let bytes = response.to_vec().ok()?;
    let Some(limit) = limit else {
        return Some(bytes);
    };
    if bytes.len() <= usize::from(limit) {
        return Some(bytes);
    }
    response.answers.clear();
    response.authorities.clear();
    response.metadata.truncation = true;
    response.to_vec().ok()
}

/// Sends a datagram, without a future when the socket can take it at once.
async fn send(socket: &UdpSocket, bytes: &[u8], client: SocketAddr) {
    match socket.try_send_to(bytes, client) {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
            let _ = socket.send_to(bytes, client).await;
        }
        _ => {}
    }
}
