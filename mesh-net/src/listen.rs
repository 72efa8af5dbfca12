//! Accepting connections on a caller-bound listener so that no client can
//! exhaust the process from outside:
//!
//! - **Deadlined handshakes.** Every accepted connection comes with a
//!   [`Handshake`]: a deadline for whatever it must send before it is worth
//!   keeping (the TLS handshake, the HTTP/2 preface, a SOCKS5 greeting). The
//!   caller runs its handshake [`Handshake::within`] it and drops the
//!   `Handshake` when done.
//! - **Bounded handshakes.** At most [`HandshakeLimits::max_in_progress`]
//!   connections are in handshake on one listener, and at most
//!   [`HandshakeLimits::max_in_progress_per_ip`] from one client address (an
//!   IPv6 client by its /64). A new connection over either bound makes room by
//!   ending the oldest one in handshake (of the same client when that client's
//!   bound is reached): idle connections cannot pile up to the file-descriptor
//!   limit, and cannot keep out a client that completes its handshake
//!   promptly, whose connection is the youngest.
//! - **Back-off.** When `accept` fails for want of resources (out of file
//!   descriptors, `EMFILE`/`ENFILE`, or memory), the listener waits before it
//!   tries again (10 ms, doubling up to 1 s) instead of spinning, and the
//!   failure is logged at a bounded rate ([`crate::Throttle`]). Errors that
//!   concern only the one connection (aborted before it was accepted) are
//!   skipped at once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Throttle;

/// How often a recurring accept problem is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// The first wait after `accept` failed for want of resources.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// A deadline that will not come: what a timeout too long for the clock
/// means (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(86400 * 365 * 30);
/// The longest wait after `accept` failed.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Bounds on connections that were accepted but have not finished their
/// handshake. The defaults are safe for a proxy or server facing its whole
/// cluster.
///
/// As configuration ([`crate::config`]): `timeout` (`"10s"`),
/// `maxInProgress`, `maxInProgressPerIp`; each optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct HandshakeLimits {
    /// How long a connection may take from accept to the end of its
    /// handshake (default 10 s).
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// Connections in handshake at once on one listener (default 1024).
    pub max_in_progress: usize,
    /// Connections in handshake at once from one client address, an IPv6
    /// address counted by its /64 (default 64).
    pub max_in_progress_per_ip: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_in_progress: 1024,
            max_in_progress_per_ip: 64,
        }
    }
}

impl HandshakeLimits {
    /// These limits with another handshake deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// These limits with another bound on connections in handshake.
    pub fn with_max_in_progress(mut self, max: usize) -> Self {
        self.max_in_progress = max;
        self
    }

    /// These limits with another bound on connections in handshake from one
    /// client address.
    pub fn with_max_in_progress_per_ip(mut self, max: usize) -> Self {
        self.max_in_progress_per_ip = max;
        self
    }
}

/// A listener that hands out connections with a [`Handshake`] each, within
/// its [`HandshakeLimits`], and backs off when the process is out of
/// resources.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    limits: HandshakeLimits,
    slots: Arc<Slots>,
    backoff: Option<Duration>,
    failures: u64,
    failures_since_accepted: u64,
    evicted_log: Throttle,
    failed_log: Throttle,
}

impl Acceptor {
    /// Accepts on `listener` (bound by the caller); `name` says which
    /// listener in log lines.
    pub fn new(listener: TcpListener, name: &'static str, limits: HandshakeLimits) -> Self {
        Self {
            listener,
            name,
            limits,
            slots: Arc::default(),
            backoff: None,
            failures: 0,
            failures_since_accepted: 0,
            evicted_log: Throttle::new(LOG_EVERY),
            failed_log: Throttle::new(LOG_EVERY),
        }
    }

    /// The listener.
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The limits in force.
    pub fn limits(&self) -> HandshakeLimits {
        self.limits
    }

    /// How many times `accept` failed (other than for one connection's
    /// sake) since this acceptor was made.
    pub fn accept_failures(&self) -> u64 {
        self.failures
    }

    /// Connections in handshake now.
    pub fn in_handshake(&self) -> usize {
        self.slots.lock().total()
    }

    /// The next connection: the stream, the client's address, and its
    /// handshake. Over the limits, the oldest connection in handshake is ended
    /// to make room. Failures to accept are waited out. Cancel-safe: a
    /// connection is either returned or still queued in the listener.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Handshake) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = None;
                    if self.failures_since_accepted > 0 {
                        tracing::info!(
                            listener = self.name,
                            failures = std::mem::take(&mut self.failures_since_accepted),
                            "accepting again"
                        );
                    }
                    let (handshake, evicted) = self.slots.take(peer.ip(), &self.limits);
                    if let Some(evicted) = evicted
                        && let Some(count) = self.evicted_log.tick()
                    {
                        tracing::warn!(
                            listener = self.name,
                            client = %evicted,
                            evicted = count,
                            max_in_progress = self.limits.max_in_progress,
                            max_in_progress_per_ip = self.limits.max_in_progress_per_ip,
                            "too many connections in handshake: the oldest were closed"
                        );
                    }
                    return (stream, peer, handshake);
                }
                Err(err) if concerns_one_connection(&err) => {}
                Err(err) => {
                    self.failures += 1;
                    self.failures_since_accepted += 1;
                    let wait = self
                        .backoff
                        .map_or(FIRST_BACKOFF, |last| (last * 2).min(MAX_BACKOFF));
                    self.backoff = Some(wait);
                    if let Some(failures) = self.failed_log.tick() {
                        tracing::warn!(
                            listener = self.name,
                            error = %err,
                            failures,
                            backoff_ms = wait.as_millis() as u64,
                            "accept failed: backing off"
                        );
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// An `accept` error that concerns only the connection it would have
/// returned: the next one may be fine. Linux also reports the network errors
/// of a connection that failed before it was accepted (accept(2): `EPROTO`,
/// `ENOPROTOOPT`, `EHOSTDOWN`, `ENONET`, `EHOSTUNREACH`, `EOPNOTSUPP`,
/// `ENETUNREACH`, `ENETDOWN`, and `EPERM` from a firewall rule). Anything else
/// (out of descriptors or memory, or unknown) is waited out.
fn concerns_one_connection(err: &io::Error) -> bool {
    use nix::libc;
    let by_kind = matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    );
    by_kind
        || err.raw_os_error().is_some_and(|code| {
            matches!(
                code,
                libc::EPROTO
                    | libc::ENOPROTOOPT
                    | libc::EHOSTDOWN
                    | libc::ENONET
                    | libc::EHOSTUNREACH
                    | libc::EOPNOTSUPP
                    | libc::ENETUNREACH
                    | libc::ENETDOWN
                    | libc::EPERM
            )
        })
}

/// Why a handshake was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeEnded {
    /// Its deadline passed.
    #[error("the handshake timed out")]
    TimedOut,
    /// Newer connections needed its place (too many in handshake).
    #[error("the handshake was ended to make room for newer connections")]
    Evicted,
}

/// One accepted connection's place among those in handshake, and its
/// deadline. Dropping it ends the handshake (done, or given up).
#[derive(Debug)]
pub struct Handshake {
    slots: Arc<Slots>,
    id: u64,
    deadline: Instant,
    evicted: CancellationToken,
}

impl Handshake {
    /// When the handshake must be done.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Runs `work` (the handshake, or part of it) until the deadline, or
    /// until the connection is evicted to make room for newer ones.
    pub async fn within<F: Future>(&self, work: F) -> Result<F::Output, HandshakeEnded> {
        tokio::select! {
            done = work => Ok(done),
            ended = self.ended() => Err(ended),
        }
    }

    /// Resolves when the handshake must end: its deadline, or an eviction.
    /// Owns what it needs, for callers that keep it in a connection.
    pub fn ended(&self) -> impl Future<Output = HandshakeEnded> + Send + 'static {
        let deadline = self.deadline;
        let evicted = self.evicted.clone();
        async move {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => HandshakeEnded::TimedOut,
                () = evicted.cancelled_owned() => HandshakeEnded::Evicted,
            }
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.slots.give_back(self.id);
    }
}

/// Connections in handshake, oldest first, and how many per client.
#[derive(Debug, Default)]
struct Slots {
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    next_id: u64,
    /// (id, client, eviction signal), oldest first.
    order: VecDeque<(u64, IpAddr, CancellationToken)>,
    per_client: HashMap<IpAddr, usize>,
}

impl Taken {
    fn total(&self) -> usize {
        self.order.len()
    }

    /// Removes the entry at `index` (counts included); its signal.
    fn remove_at(&mut self, index: usize) -> Option<(IpAddr, CancellationToken)> {
        let (_, client, evicted) = self.order.remove(index)?;
        if let Some(count) = self.per_client.get_mut(&client) {
            *count -= 1;
            if *count == 0 {
                self.per_client.remove(&client);
            }
        }
        Some((client, evicted))
    }
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, Taken> {
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, made by evicting the oldest
    /// connection in handshake (of `ip` when its share is used up, else of
    /// anyone) if the limits are reached; the evicted one's client.
    fn take(self: &Arc<Self>, ip: IpAddr, limits: &HandshakeLimits) -> (Handshake, Option<IpAddr>) {
        let client = client_key(ip);
        let mut taken = self.lock();
        let mut evicted = None;
        let from_client = taken.per_client.get(&client).copied().unwrap_or(0);
        let victim = if from_client >= limits.max_in_progress_per_ip.max(1) {
            taken
                .order
                .iter()
                .position(|(_, owner, _)| *owner == client)
        } else if taken.total() >= limits.max_in_progress.max(1) {
            Some(0)
        } else {
            None
        };
        if let Some((owner, signal)) = victim.and_then(|index| taken.remove_at(index)) {
            signal.cancel();
            evicted = Some(owner);
        }
        let id = taken.next_id;
        taken.next_id += 1;
        let signal = CancellationToken::new();
        taken.order.push_back((id, client, signal.clone()));
        *taken.per_client.entry(client).or_default() += 1;
        let handshake = Handshake {
            slots: self.clone(),
            id,
            // A timeout too long for the clock is as good as none.
            deadline: Instant::now()
                .checked_add(limits.timeout)
                .unwrap_or_else(|| Instant::now() + FAR_FUTURE),
            evicted: signal,
        };
        (handshake, evicted)
    }

    /// Gives back handshake `id`'s place (nothing if it was evicted).
    fn give_back(&self, id: u64) {
        let mut taken = self.lock();
        if let Some(index) = taken.order.iter().position(|(entry, _, _)| *entry == id) {
            taken.remove_at(index);
        }
    }
}

/// Whom a connection is counted against: an IPv4 address (also when mapped
/// into IPv6), or an IPv6 address's /64, which one client usually holds whole.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpSocket;

    #[tokio::test]
    async fn a_timeout_too_long_for_the_clock_is_no_deadline() {
        let (mut acceptor, address) =
            acceptor(HandshakeLimits::default().with_timeout(Duration::MAX)).await;
        let _client = TcpStream::connect(address).await.unwrap();
        let (_stream, _peer, handshake) = acceptor.accept().await;
        assert!(handshake.deadline() > Instant::now() + Duration::from_secs(86400 * 365));
    }

    async fn acceptor(limits: HandshakeLimits) -> (Acceptor, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (Acceptor::new(listener, "test", limits), address)
    }

    /// A connection to `address` from the loopback address `source`.
    async fn connect_from(source: [u8; 4], address: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(address).await.unwrap()
    }

    /// Whether the server ended the handshake of `stream` (its end closed).
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut byte = [0; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Accepts one connection and keeps it "in handshake" until its handshake
    /// ends; then drops it, as a server would.
    fn hold(
        accepted: (TcpStream, SocketAddr, Handshake),
    ) -> tokio::task::JoinHandle<HandshakeEnded> {
        tokio::spawn(async move {
            let (stream, _, handshake) = accepted;
            let ended = handshake.ended().await;
            drop((stream, handshake));
            ended
        })
    }

    #[tokio::test]
    async fn a_clients_oldest_handshakes_make_room_for_its_newest() {
        let limits = HandshakeLimits::default()
            .with_timeout(Duration::from_secs(60))
            .with_max_in_progress(10)
            .with_max_in_progress_per_ip(2);
        let (mut acceptor, address) = acceptor(limits).await;
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..5 {
            clients.push(connect_from([127, 0, 0, 2], address).await);
            held.push(hold(acceptor.accept().await));
        }
        // Another client's connection evicts none of them.
        let _other = connect_from([127, 0, 0, 3], address).await;
        held.push(hold(acceptor.accept().await));
        assert_eq!(acceptor.in_handshake(), 3, "2 of 127.0.0.2, 1 of 127.0.0.3");
        for (index, task) in held.drain(..3).enumerate() {
            assert_eq!(task.await.unwrap(), HandshakeEnded::Evicted, "#{index}");
        }
        for mut client in clients.drain(..3) {
            assert!(closed_by_server(&mut client).await);
        }
        // The newest two are still in handshake.
        for task in &held {
            assert!(!task.is_finished());
        }
    }

    #[tokio::test]
    async fn over_the_listener_bound_the_oldest_handshake_ends() {
        let limits = HandshakeLimits::default()
            .with_timeout(Duration::from_secs(60))
            .with_max_in_progress(3)
            .with_max_in_progress_per_ip(100);
        let (mut acceptor, address) = acceptor(limits).await;
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for last in 2..6 {
            clients.push(connect_from([127, 0, 0, last], address).await);
            held.push(hold(acceptor.accept().await));
        }
        assert_eq!(acceptor.in_handshake(), 3);
        let oldest = held.remove(0);
        assert_eq!(oldest.await.unwrap(), HandshakeEnded::Evicted);
        assert!(closed_by_server(&mut clients[0]).await);
        for task in held {
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_ends_at_its_deadline() {
        let limits = HandshakeLimits::default().with_timeout(Duration::from_secs(3));
        let (mut acceptor, address) = acceptor(limits).await;
        let _client = connect_from([127, 0, 0, 1], address).await;
        let (mut stream, _, handshake) = acceptor.accept().await;
        let mut byte = [0; 1];
        // The client never sends anything.
        let read = handshake.within(stream.read(&mut byte)).await;
        assert_eq!(read.err(), Some(HandshakeEnded::TimedOut));
        assert!(Instant::now() >= handshake.deadline());
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn per_connection_errors_are_not_waited_out() {
        assert!(concerns_one_connection(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(concerns_one_connection(&io::Error::from_raw_os_error(
            nix::libc::EPROTO
        )));
        // EMFILE: out of file descriptors.
        assert!(!concerns_one_connection(&io::Error::from_raw_os_error(24)));
    }
}
