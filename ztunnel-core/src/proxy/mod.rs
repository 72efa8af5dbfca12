//! The proxy instance: one served workload, its listeners (outbound 15001,
//! plaintext inbound 15006, HBONE 15008) and its lifecycle.
//!
//! An instance serves one workload ("dedicated" mode: a VM, a nodeless
//! instance, a single-workload host, or a pod's own network namespace). Every
//! per-workload fact (the served uid, its certificate, its listeners, its live
//! connections) lives in the instance, so a node agent runs one instance per
//! pod, each with listeners opened inside that pod's namespace, sharing the
//! state, the certificate manager and the runtime.
//!
//! The instance binds nothing: the caller binds its listeners (inside the
//! right network namespace, on the addresses it wants), preferably with
//! [`socket::listen_with_nodelay`], and hands them over in [`Listeners`].
//! The [`ZtunnelHandle`] it returns has the verbs of
//! [`mesh_net::lifecycle`]: addresses, `ready`, `drain`, `shutdown`, `join`.
//!
//! ```no_run
//! # async fn example(state: ztunnel_core::SharedState, certs: ztunnel_core::CertManager) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ztunnel_core::proxy::socket::listen_with_nodelay;
//! use ztunnel_core::{Listeners, Ztunnel};
//!
//! let listeners = Listeners {
//!     outbound: listen_with_nodelay("0.0.0.0:15001".parse()?)?,
//!     inbound_plaintext: listen_with_nodelay("0.0.0.0:15006".parse()?)?,
//!     hbone: listen_with_nodelay("0.0.0.0:15008".parse()?)?,
//!     socks5: None,
//! };
//! let handle = Ztunnel::builder()
//!     .state(state)
//!     .certificates(certs)
//!     .workload_uid("Kubernetes//Pod/default/shell")
//!     .build()?
//!     .spawn(listeners)?;
//! handle.ready(Duration::from_secs(30)).await?;
//! // ... later: let open connections finish for up to 5 s.
//! let drained = handle.drain(Duration::from_secs(5)).await;
//! handle.join().await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod authorize;
mod baggage;
mod inbound;
pub mod log;
mod outbound;
mod plain;
pub mod route;
pub mod socket;
pub mod socks5;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_api::Identity;
use mesh_api::workload::Workload;
use mesh_ca::WorkloadCertificate;
use mesh_net::{Acceptor, Drained, Handshake, HandshakeLimits};
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certs::{CertError, CertLease, CertManager};
use crate::hbone::HBONE_PORT;
use crate::hbone::pool::HbonePool;
use crate::metrics::Metrics;
use crate::state::SharedState;
use crate::tls::{TlsConfigs, TlsError, WorkloadTls};
use crate::xds::Demander;
use authorize::LiveConnections;
use baggage::BaggageCache;
pub use baggage::baggage;
use prometheus_client::registry::Registry;
use route::workload_identity;

/// The conventional outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// The conventional plaintext inbound port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// Why an instance could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A required part is missing.
    #[error("missing {0}: call Ztunnel::builder().{0}(..)")]
    Missing(&'static str),
}

/// Why the served workload cannot use TLS yet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The served workload is not in the state (not synced yet, or unknown).
    #[error("workload {0} is not known (yet)")]
    UnknownWorkload(String),
    /// Its identity is not valid.
    #[error("workload {0} has no valid identity")]
    NoIdentity(String),
    /// No certificate.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// The certificate cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The instance was shut down or drained.
    #[error("the proxy instance has stopped")]
    Stopped,
}

/// Why a running instance stopped other than by `drain` or `shutdown`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// One of its tasks (a listener's, or the policy watch) failed; the
    /// instance was stopped.
    #[error("the proxy instance's {task} task failed: {reason}")]
    Task {
        /// Which: `"outbound"`, `"inbound plaintext"`, `"HBONE"`, `"SOCKS5"`,
        /// `"policy watch"`.
        task: &'static str,
        /// What happened (a panic's message).
        reason: String,
    },
}

/// Listeners bound by the caller (e.g. inside a network namespace). Bound
/// with [`socket::listen_with_nodelay`] (or with `TCP_NODELAY` set before
/// listening), their connections inherit `TCP_NODELAY`; otherwise the proxy
/// sets it on each connection it accepts, a syscall apiece.
#[derive(Debug)]
pub struct Listeners {
    /// Outbound capture (15001).
    pub outbound: TcpListener,
    /// Plaintext inbound (15006).
    pub inbound_plaintext: TcpListener,
    /// HBONE (15008).
    pub hbone: TcpListener,
    /// SOCKS5, if wanted (conventionally on `127.0.0.1:15080`).
    pub socks5: Option<TcpListener>,
}

/// A builder of [`Ztunnel`].
#[derive(Debug)]
pub struct ZtunnelBuilder {
    state: Option<SharedState>,
    certificates: Option<CertManager>,
    workload_uid: Option<String>,
    identity: Option<Identity>,
    network: String,
    mark: Option<u32>,
    provider: Option<Arc<CryptoProvider>>,
    certificate_wait: Duration,
    hbone_port: u16,
    metrics: Option<Metrics>,
    demander: Option<Demander>,
    handshake_limits: HandshakeLimits,
}

impl Default for ZtunnelBuilder {
    fn default() -> Self {
        Self {
            state: None,
            certificates: None,
            workload_uid: None,
            identity: None,
            network: String::new(),
            mark: Some(socket::PROXY_MARK),
            provider: None,
            certificate_wait: Duration::from_secs(10),
            hbone_port: HBONE_PORT,
            metrics: None,
            demander: None,
            handshake_limits: HandshakeLimits::default(),
        }
    }
}

impl ZtunnelBuilder {
    /// The mesh state (kept up to date by an [`crate::XdsClient`], or by the
    /// embedder). Required.
    pub fn state(mut self, state: SharedState) -> Self {
        self.state = Some(state);
        self
    }

    /// Where certificates come from (one manager shared by every instance of
    /// a node agent). Required. The instance leases its served workload's
    /// identity while it runs: once no running instance serves an identity,
    /// the manager drops its certificate ([`CertManager::lease`]).
    pub fn certificates(mut self, certificates: CertManager) -> Self {
        self.certificates = Some(certificates);
        self
    }

    /// The uid of the served workload. Required.
    pub fn workload_uid(mut self, uid: impl Into<String>) -> Self {
        self.workload_uid = Some(uid.into());
        self
    }

    /// The served workload's identity, if it should not be derived from the
    /// state.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The network of the served workload (default: the default network "").
    pub fn network(mut self, network: impl Into<String>) -> Self {
        self.network = network.into();
        self
    }

    /// The mark on the proxy's own sockets (default 1337; `None` for none,
    /// e.g. where no redirect rules exist).
    pub fn socket_mark(mut self, mark: Option<u32>) -> Self {
        self.mark = mark;
        self
    }

    /// The rustls crypto provider (default: aws-lc-rs).
    pub fn crypto_provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// How long a connection waits for the served workload's certificate.
    pub fn certificate_wait(mut self, wait: Duration) -> Self {
        self.certificate_wait = wait;
        self
    }

    /// The port peers accept HBONE on (default 15008). Where this instance
    /// accepts HBONE is its [`Listeners::hbone`].
    pub fn hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// Counts connections into `registry` with Istio's metric names (see
    /// [`crate::metrics`]).
    pub fn metrics(mut self, registry: &mut Registry) -> Self {
        self.metrics = Some(Metrics::register(registry));
        self
    }

    /// Looks up unknown destinations (and the served workload) on demand,
    /// through an on-demand [`crate::XdsClient`]'s [`Demander`].
    pub fn demander(mut self, demander: Demander) -> Self {
        self.demander = Some(demander);
        self
    }

    /// Bounds on connections in handshake on the HBONE and SOCKS5 listeners:
    /// how long a client may take for its TLS handshake and HTTP/2 preface
    /// (or SOCKS5 greeting), and how many may be in handshake at once, in all
    /// and from one address (default: [`HandshakeLimits::default`], 10 s,
    /// 1024, 64). Over them, the oldest connection in handshake is closed to
    /// make room.
    pub fn handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.handshake_limits = limits;
        self
    }

    /// Checks and assembles; binds nothing.
    pub fn build(self) -> Result<Ztunnel, BuildError> {
        let shutdown = CancellationToken::new();
        let provider = self
            .provider
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let context = Context {
            state: self.state.ok_or(BuildError::Missing("state"))?,
            certs: self
                .certificates
                .ok_or(BuildError::Missing("certificates"))?,
            served_uid: self
                .workload_uid
                .ok_or(BuildError::Missing("workload_uid"))?,
            identity: self.identity,
            network: self.network,
            mark: self.mark,
            tls: TlsConfigs::new(provider),
            certificate_wait: self.certificate_wait,
            hbone_port: self.hbone_port,
            pool: HbonePool::new(self.mark, &shutdown),
            live: Arc::new(LiveConnections::default()),
            baggage: BaggageCache::default(),
            metrics: self.metrics,
            demander: self.demander,
            tasks: TaskTracker::new(),
            force_close: shutdown.child_token(),
            shutdown,
            lease: Mutex::new(None),
            own_ports: Vec::new(),
            tls_failures: Mutex::new(mesh_net::Throttle::new(Duration::from_secs(5))),
        };
        Ok(Ztunnel {
            context,
            handshake_limits: self.handshake_limits,
        })
    }
}

/// What every connection of an instance shares.
#[derive(Debug)]
struct Context {
    state: SharedState,
    certs: CertManager,
    served_uid: String,
    identity: Option<Identity>,
    network: String,
    mark: Option<u32>,
    tls: TlsConfigs,
    certificate_wait: Duration,
    hbone_port: u16,
    pool: HbonePool,
    live: Arc<LiveConnections>,
    baggage: BaggageCache,
    metrics: Option<Metrics>,
    demander: Option<Demander>,
    /// Connection tasks, waited for by a drain.
    tasks: TaskTracker,
    /// Ends every connection (drain deadline, shutdown).
    force_close: CancellationToken,
    /// Ends everything.
    shutdown: CancellationToken,
    /// The served identity's certificate, held while the instance runs
    /// (taken on first use; released when it stops).
    lease: Mutex<Option<Arc<CertLease>>>,
    /// Failed HBONE TLS handshakes, logged at a bounded rate (anyone can
    /// make them fail).
    tls_failures: Mutex<mesh_net::Throttle>,
    /// The ports of the instance's own listeners (and of HBONE): never a
    /// destination, or one request would loop the proxy into itself.
    own_ports: Vec<u16>,
}

impl Context {
    /// Whether `port` is one the proxy itself listens on: a connection
    /// there through the proxy would come back to it (a "self call").
    fn is_own_port(&self, port: u16) -> bool {
        self.own_ports.contains(&port)
    }

    /// The served workload's identity.
    fn served_identity(&self) -> Result<Identity, IdentityError> {
        self.identity_of(self.state.read().workload(&self.served_uid).map(|w| &**w))
    }

    /// The served workload's identity, given the workload as the state knows
    /// it (`None`: not known): the configured one, else the workload's.
    fn identity_of(&self, served: Option<&Workload>) -> Result<Identity, IdentityError> {
        if let Some(identity) = &self.identity {
            return Ok(identity.clone());
        }
        let workload =
            served.ok_or_else(|| IdentityError::UnknownWorkload(self.served_uid.clone()))?;
        workload_identity(workload)
            .ok_or_else(|| IdentityError::NoIdentity(self.served_uid.clone()))
    }

    /// Runs a connection's work, made by `make`, as a task a drain waits for
    /// and a forced close ends.
    ///
    /// The work is made inside the task rather than passed in: a future
    /// captured by the task and then raced would be stored twice in it, and
    /// each connection's task lives as long as the connection.
    fn spawn_tracked<Work>(&self, make: impl FnOnce() -> Work + Send + 'static)
    where
        Work: Future<Output = ()> + Send,
    {
        let force_close = self.force_close.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = make() => {}
                () = force_close.cancelled() => {}
            }
        });
    }

    /// TLS with the served workload's current certificate.
    async fn workload_tls(&self) -> Result<WorkloadTls, IdentityError> {
        self.tls_for(&self.served_identity()?).await
    }

    /// TLS with the served `identity`'s current certificate.
    async fn tls_for(&self, identity: &Identity) -> Result<WorkloadTls, IdentityError> {
        let certificate = self.certificate(identity, self.certificate_wait).await?;
        Ok(self.tls.for_certificate(&certificate)?)
    }

    /// The served `identity`'s current certificate, waiting up to `wait` for
    /// the first, through the instance's lease on it.
    async fn certificate(
        &self,
        identity: &Identity,
        wait: Duration,
    ) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        // The lease is held while waiting, so a stop meanwhile cannot leave
        // a certificate nobody holds.
        let lease = self.lease_for(identity)?;
        Ok(lease.certificate(wait).await?)
    }

    /// The instance's lease on `identity`: taken on first use, replaced if
    /// the served workload's identity changed; none once stopped.
    fn lease_for(&self, identity: &Identity) -> Result<Arc<CertLease>, IdentityError> {
        let mut held = self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock: `stop` cancels before it takes the lease.
        if self.shutdown.is_cancelled() {
            return Err(IdentityError::Stopped);
        }
        if let Some(lease) = held.as_ref().filter(|lease| lease.identity() == identity) {
            return Ok(lease.clone());
        }
        let lease = Arc::new(self.certs.lease(identity)?);
        *held = Some(lease.clone());
        Ok(lease)
    }

    /// Stops everything at once: listeners, connections, the policy watch;
    /// gives back the certificate lease (connections still closing hold it
    /// until they end).
    fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let lease = self
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(lease);
    }
}

/// The next connection `acceptor` admits, with `TCP_NODELAY`, or `None`
/// once `stop` is cancelled.
async fn next_connection(
    acceptor: &mut Acceptor,
    inherits_nodelay: bool,
    stop: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr, Handshake)> {
    let (tcp, peer, handshake) = tokio::select! {
        () = stop.cancelled() => return None,
        accepted = acceptor.accept() => accepted,
    };
    if !inherits_nodelay {
        let _ = tcp.set_nodelay(true);
    }
    Some((tcp, peer, handshake))
}

/// Accepts until `stop`; each connection runs `handle` as a task the
/// instance tracks (a drain waits for it) and a forced close ends. For
/// listeners whose clients owe no handshake: each connection's place among
/// those in handshake is given back at once.
async fn accept_loop<F, Fut>(
    ctx: Arc<Context>,
    mut acceptor: Acceptor,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(Arc<Context>, tokio::net::TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let inherits_nodelay = socket::accepted_have_nodelay(acceptor.listener());
    while let Some((tcp, peer, handshake)) =
        next_connection(&mut acceptor, inherits_nodelay, &stop).await
    {
        drop(handshake);
        let connection = ctx.clone();
        let handle = handle.clone();
        ctx.spawn_tracked(move || handle(connection, tcp, peer));
    }
}

/// [`accept_loop`] for listeners whose clients owe a handshake (TLS,
/// SOCKS5): `handle` gets the [`Handshake`], runs the client's handshake
/// within its deadline, and drops it when done.
async fn accept_handshakes<F, Fut>(
    ctx: Arc<Context>,
    mut acceptor: Acceptor,
    stop: CancellationToken,
    handle: F,
) where
    F: Fn(Arc<Context>, tokio::net::TcpStream, SocketAddr, Handshake) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let inherits_nodelay = socket::accepted_have_nodelay(acceptor.listener());
    while let Some((tcp, peer, handshake)) =
        next_connection(&mut acceptor, inherits_nodelay, &stop).await
    {
        let connection = ctx.clone();
        let handle = handle.clone();
        ctx.spawn_tracked(move || handle(connection, tcp, peer, handshake));
    }
}

/// The outcome of carrying a connection: the bytes it moved (request,
/// response: client to destination and back), also when it failed, and what
/// went wrong if it did.
#[derive(Debug)]
struct Carried {
    bytes: (u64, u64),
    error: Option<String>,
}

impl Carried {
    fn is_err(&self) -> bool {
        self.error.is_some()
    }
}

/// A connection past its setup: all that carrying its bytes needs.
trait Established: Send {
    /// Copies both ways until both ends closed. Borrowed, so the future holds
    /// no second copy of the connection.
    fn carry(&mut self) -> impl Future<Output = Carried> + Send;

    /// Logs the connection; an error resets it.
    fn finish(self, outcome: &Carried);
}

/// Runs a connection. Setting up (routing, lookups, certificates, policy,
/// the CONNECT) takes far more state than carrying bytes: `setup` comes boxed
/// and is freed once established, so a connection's task stays small while
/// it lives.
async fn run_connection<E: Established>(setup: Pin<Box<impl Future<Output = Option<E>>>>) {
    let Some(mut established) = setup.await else {
        return;
    };
    let outcome = established.carry().await;
    established.finish(&outcome);
}

/// A proxy instance, built but not running.
#[derive(Debug)]
pub struct Ztunnel {
    context: Context,
    handshake_limits: HandshakeLimits,
}

impl Ztunnel {
    /// A builder.
    pub fn builder() -> ZtunnelBuilder {
        ZtunnelBuilder::default()
    }

    /// Runs on the caller's listeners, on the current runtime. Fails at once
    /// if the socket mark cannot be set (no `CAP_NET_ADMIN`), rather than on
    /// every connection later.
    pub fn spawn(self, listeners: Listeners) -> io::Result<ZtunnelHandle> {
        let mut context = self.context;
        if let Some(mark) = context.mark {
            mesh_net::check_mark(mark)?;
        }
        let addresses = [
            listeners.outbound.local_addr()?,
            listeners.inbound_plaintext.local_addr()?,
            listeners.hbone.local_addr()?,
        ];
        let socks5 = match &listeners.socks5 {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        context.own_ports = addresses
            .iter()
            .chain(&socks5)
            .map(SocketAddr::port)
            .chain([context.hbone_port])
            .collect();
        let ctx = Arc::new(context);
        let limits = self.handshake_limits;
        let accepting = ctx.shutdown.child_token();
        let mut tasks = Tasks::default();
        tasks.spawn(
            "outbound",
            outbound::serve_outbound(
                ctx.clone(),
                Acceptor::new(listeners.outbound, "outbound", limits),
                accepting.clone(),
            ),
        );
        tasks.spawn(
            "inbound plaintext",
            inbound::serve_plaintext(
                ctx.clone(),
                Acceptor::new(listeners.inbound_plaintext, "inbound plaintext", limits),
                accepting.clone(),
            ),
        );
        tasks.spawn(
            "HBONE",
            inbound::serve_hbone(
                ctx.clone(),
                Acceptor::new(listeners.hbone, "HBONE", limits),
                accepting.clone(),
            ),
        );
        if let Some(listener) = listeners.socks5 {
            tasks.spawn(
                "SOCKS5",
                outbound::serve_socks5(
                    ctx.clone(),
                    Acceptor::new(listener, "SOCKS5", limits),
                    accepting.clone(),
                ),
            );
        }
        tasks.spawn(
            "policy watch",
            ctx.live.clone().watch(
                ctx.state.clone(),
                ctx.served_uid.clone(),
                ctx.network.clone(),
                ctx.shutdown.clone(),
            ),
        );
        let stopped = TaskTracker::new();
        let supervisor = stopped.spawn(tasks.supervise(ctx.clone()));
        stopped.close();
        Ok(ZtunnelHandle {
            ctx,
            addresses,
            socks5,
            accepting,
            stopped,
            supervisor,
        })
    }
}

/// The long-running tasks of an instance, by name.
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    names: Vec<(tokio::task::Id, &'static str)>,
}

impl Tasks {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.push((id, name));
    }

    /// Waits for every task to end; the first that fails stops the instance
    /// and is the outcome. Then waits for the connections to end (a stopped
    /// instance has closed them).
    async fn supervise(mut self, ctx: Arc<Context>) -> Result<(), ServeError> {
        let mut failure = None;
        while let Some(ended) = self.set.join_next().await {
            let Err(err) = ended else { continue };
            let task = self
                .names
                .iter()
                .find(|(id, _)| *id == err.id())
                .map_or("background", |(_, name)| *name);
            tracing::error!(task, error = %err, "a proxy task failed; stopping the instance");
            ctx.stop();
            failure.get_or_insert(ServeError::Task {
                task,
                reason: err.to_string(),
            });
        }
        ctx.tasks.close();
        ctx.tasks.wait().await;
        failure.map_or(Ok(()), Err)
    }
}

/// A running instance: its addresses, readiness and lifecycle, as every
/// component's handle ([`mesh_net::lifecycle`]). Dropping it leaves the
/// instance running.
#[derive(Debug)]
pub struct ZtunnelHandle {
    ctx: Arc<Context>,
    addresses: [SocketAddr; 3],
    socks5: Option<SocketAddr>,
    /// Stops the listeners (a drain).
    accepting: CancellationToken,
    /// Empty once the instance has stopped.
    stopped: TaskTracker,
    supervisor: JoinHandle<Result<(), ServeError>>,
}

impl ZtunnelHandle {
    /// What peers reach the instance on: its HBONE listener's address (as
    /// [`ZtunnelHandle::hbone_addr`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.hbone_addr()
    }

    /// The outbound listener's address.
    pub fn outbound_addr(&self) -> SocketAddr {
        self.addresses[0]
    }

    /// The plaintext inbound listener's address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.addresses[1]
    }

    /// The HBONE listener's address.
    pub fn hbone_addr(&self) -> SocketAddr {
        self.addresses[2]
    }

    /// The SOCKS5 listener's address, if it has one.
    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        self.socks5
    }

    /// The admin endpoints of this instance, with `registry` (the one given
    /// to [`ZtunnelBuilder::metrics`]) for `/metrics`. Serve them with
    /// [`admin::Admin::serve`].
    pub fn admin(&self, registry: Option<Arc<Registry>>) -> admin::Admin {
        admin::Admin::new(self.ctx.clone(), registry)
    }

    /// Inbound connections open now.
    pub fn live_inbound(&self) -> usize {
        self.ctx.live.len()
    }

    /// Pooled outbound HBONE connections open now.
    pub fn pooled_connections(&self) -> usize {
        self.ctx.pool.connection_count()
    }

    /// Waits up to `wait` until the served workload is known and has its
    /// certificate: the instance can then carry traffic both ways. Otherwise
    /// why not (unknown workload, no identity, no certificate, stopped).
    pub async fn ready(&self, wait: Duration) -> Result<(), IdentityError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.ctx.state.changes();
        if let (Err(IdentityError::UnknownWorkload(uid)), Some(demander)) =
            (self.ctx.served_identity(), &self.ctx.demander)
        {
            demander.demand(&uid, wait).await;
        }
        let identity = loop {
            match self.ctx.served_identity() {
                Ok(identity) => break identity,
                Err(err) => {
                    if tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_err()
                    {
                        return Err(err);
                    }
                }
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.ctx.certificate(&identity, left).await?;
        Ok(())
    }

    /// Stops accepting, lets open connections (and HBONE streams) finish for
    /// up to `deadline`, then closes what is left and stops, as
    /// [`ZtunnelHandle::shutdown`]. Returns once the instance has stopped:
    /// [`Drained::TimedOut`] counts what was closed at the deadline:
    /// connections, and each HBONE connection's open streams too.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.accepting.cancel();
        self.ctx.tasks.close();
        let drained = match tokio::time::timeout(deadline, self.ctx.tasks.wait()).await {
            Ok(()) => Drained::Complete,
            Err(_) => match self.ctx.tasks.len() {
                // The last ended as the deadline passed.
                0 => Drained::Complete,
                left => Drained::TimedOut { left },
            },
        };
        self.shutdown();
        self.stopped.wait().await;
        drained
    }

    /// Stops now: closes the listeners and every connection, and gives back
    /// the served identity's certificate lease (the certificate manager
    /// drops the certificate once no running instance serves that
    /// identity). Idempotent; returns at once (see [`ZtunnelHandle::join`]).
    pub fn shutdown(&self) {
        self.ctx.stop();
    }

    /// Waits until the instance has stopped (after [`ZtunnelHandle::drain`]
    /// or [`ZtunnelHandle::shutdown`], or when one of its tasks failed, which
    /// is the error). Never stops it.
    pub async fn join(self) -> Result<(), ServeError> {
        match self.supervisor.await {
            Ok(outcome) => outcome,
            Err(err) => Err(ServeError::Task {
                task: "supervisor",
                reason: err.to_string(),
            }),
        }
    }
}
