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
//!   IPv6 client by its /64). A connection over either bound is reset at once,
//!   so idle connections cannot pile up to the file-descriptor limit, and one
//!   client holding its share does not keep others out.
//! - **Back-off.** When `accept` fails for want of resources (out of file
//!   descriptors, `EMFILE`/`ENFILE`, or memory), the listener waits before it
//!   tries again (10 ms, doubling up to 1 s) instead of spinning, and the
//!   failure is logged at a bounded rate ([`crate::Throttle`]). Errors that
//!   concern only the one connection (aborted before it was accepted) are
//!   skipped at once.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio::time::error::Elapsed;

use crate::Throttle;

/// How often a recurring accept problem is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// The first wait after `accept` failed for want of resources.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait after `accept` failed.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Bounds on connections that were accepted but have not finished their
/// handshake. The defaults are safe for a proxy or server facing its whole
/// cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandshakeLimits {
    /// How long a connection may take from accept to the end of its
    /// handshake (default 10 s).
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
    refused_log: Throttle,
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
            refused_log: Throttle::new(LOG_EVERY),
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
        self.slots.lock().total
    }

    /// The next connection within the limits: the stream, the client's
    /// address, and its handshake. Connections over the limits are reset and
    /// never returned; failures to accept are waited out. Cancel-safe: a
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
                    if let Some(handshake) = self.slots.take(peer.ip(), &self.limits) {
                        return (stream, peer, handshake);
                    }
                    // Reset rather than close: the client learns at once.
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    if let Some(refused) = self.refused_log.tick() {
                        tracing::warn!(
                            listener = self.name,
                            %peer,
                            refused,
                            max_in_progress = self.limits.max_in_progress,
                            max_in_progress_per_ip = self.limits.max_in_progress_per_ip,
                            "too many connections in handshake: connection refused"
                        );
                    }
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
/// returned: the next one may be fine.
fn concerns_one_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// One accepted connection's place among those in handshake, and its
/// deadline. Dropping it ends the handshake (done, or given up).
#[derive(Debug)]
pub struct Handshake {
    slots: Arc<Slots>,
    client: IpAddr,
    deadline: Instant,
}

impl Handshake {
    /// When the handshake must be done.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Runs `work` (the handshake) until the deadline.
    pub async fn within<F: Future>(&self, work: F) -> Result<F::Output, Elapsed> {
        tokio::time::timeout_at(self.deadline, work).await
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.slots.give_back(self.client);
    }
}

/// Connections in handshake, in all and per client.
#[derive(Debug, Default)]
struct Slots {
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, Taken> {
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, if the limits allow one.
    fn take(self: &Arc<Self>, ip: IpAddr, limits: &HandshakeLimits) -> Option<Handshake> {
        let client = client_key(ip);
        let mut taken = self.lock();
        if taken.total >= limits.max_in_progress {
            return None;
        }
        let from_client = taken.per_client.entry(client).or_default();
        if *from_client >= limits.max_in_progress_per_ip {
            return None;
        }
        *from_client += 1;
        taken.total += 1;
        Some(Handshake {
            slots: self.clone(),
            client,
            deadline: Instant::now() + limits.timeout,
        })
    }

    fn give_back(&self, client: IpAddr) {
        let mut taken = self.lock();
        taken.total = taken.total.saturating_sub(1);
        if let Some(count) = taken.per_client.get_mut(&client) {
            *count -= 1;
            if *count == 0 {
                taken.per_client.remove(&client);
            }
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

    /// Whether the server end reset the connection (rather than keeping it).
    async fn was_reset(mut stream: TcpStream) -> bool {
        let mut byte = [0; 1];
        match stream.read(&mut byte).await {
            Err(err) => err.kind() == io::ErrorKind::ConnectionReset,
            Ok(n) => n == 0,
        }
    }

    #[tokio::test]
    async fn one_client_cannot_take_more_than_its_share() {
        let limits = HandshakeLimits::default()
            .with_max_in_progress(10)
            .with_max_in_progress_per_ip(2);
        let (mut acceptor, address) = acceptor(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let _client = connect_from([127, 0, 0, 2], address).await;
            held.push((acceptor.accept().await, _client));
        }
        assert_eq!(acceptor.in_handshake(), 2);
        // The third from the same address is reset; another address is served.
        let over = connect_from([127, 0, 0, 2], address).await;
        let other = connect_from([127, 0, 0, 3], address).await;
        let (_, peer, _handshake) = acceptor.accept().await;
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 3]));
        assert!(was_reset(over).await, "over its share: reset");
        drop(other);
        // A finished handshake frees its place.
        held.pop();
        let _again = connect_from([127, 0, 0, 2], address).await;
        let (_, peer, _) = acceptor.accept().await;
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 2]));
    }

    #[tokio::test]
    async fn connections_over_the_listener_bound_are_reset() {
        let limits = HandshakeLimits::default()
            .with_max_in_progress(3)
            .with_max_in_progress_per_ip(100);
        let (mut acceptor, address) = acceptor(limits).await;
        let mut held = Vec::new();
        for last in 2..5 {
            let client = connect_from([127, 0, 0, last], address).await;
            held.push((acceptor.accept().await, client));
        }
        let over = connect_from([127, 0, 0, 9], address).await;
        let accepted = tokio::time::timeout(Duration::from_millis(200), acceptor.accept()).await;
        assert!(accepted.is_err(), "nothing within the bounds to accept");
        assert!(was_reset(over).await);
        assert_eq!(acceptor.in_handshake(), 3);
        held.clear();
        assert_eq!(acceptor.in_handshake(), 0, "every place given back");
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
        assert!(read.is_err(), "timed out");
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
        // EMFILE: out of file descriptors.
        assert!(!concerns_one_connection(&io::Error::from_raw_os_error(24)));
    }
}
