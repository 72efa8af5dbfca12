//! The HBONE client: HTTP/2 connections pooled by (source identity,
//! destination identity, destination address) as WIRE.md §4 keys them, at most
//! [`MAX_STREAMS_PER_CONNECTION`] streams each (then another connection), each
//! connection pinged every [`PING_INTERVAL`] and closed after
//! [`POOL_IDLE_TIMEOUT`] without streams. A new connection is used only if the
//! server proves one of the identities expected of it.
//!
//! One connection is opened at a time per key: requests that find no free
//! connection wait for the one being opened and then share it (a burst of
//! 150 first requests to one destination opens 2 connections, not 150), and
//! if that open fails they fail with it rather than each trying again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use mesh_api::Identity;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION, PING_INTERVAL,
    POOL_IDLE_TIMEOUT, STREAM_WINDOW,
};
use crate::proxy::socket;
use crate::tls::{TlsError, WorkloadTls, check_server_identity};

/// Why an HBONE stream could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    /// TCP connect failed.
    #[error("connect to {address}: {source}")]
    Connect {
        /// The HBONE address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS with {address}: {source}")]
    Handshake {
        /// The HBONE address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The server is not who it should be.
    #[error("HBONE server {address}: {source}")]
    Peer {
        /// The HBONE address.
        address: SocketAddr,
        /// What was wrong.
        source: TlsError,
    },
    /// HTTP/2 failed.
    #[error("HTTP/2 with {address}: {source}")]
    Http2 {
        /// The HBONE address.
        address: SocketAddr,
        /// The error.
        source: h2::Error,
    },
    /// The server refused the CONNECT.
    #[error("HBONE server {address} answered {status} for {authority}")]
    Refused {
        /// The HBONE address.
        address: SocketAddr,
        /// The target asked for.
        authority: String,
        /// Its answer (401 denied, 503 unreachable, 400 bad request).
        status: StatusCode,
    },
    /// The connection this request waited for (opened for another request
    /// to the same destination) could not be opened.
    #[error("HBONE connection to {address} failed: {reason}")]
    Opening {
        /// The HBONE address.
        address: SocketAddr,
        /// Why the other request's open failed.
        reason: String,
    },
    /// The request could not be built.
    #[error("bad CONNECT request for {authority}: {problem}")]
    Request {
        /// The target.
        authority: String,
        /// What was wrong.
        problem: String,
    },
}

/// What a pooled connection is shared by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Whose certificate the client presents.
    pub source: Identity,
    /// The identities the server may present (usually one).
    pub expected: Vec<Identity>,
    /// The server's HBONE address (`ip:15008`).
    pub address: SocketAddr,
    /// The client's source address, if bound to one (the served workload's).
    pub source_ip: Option<IpAddr>,
}

/// An open CONNECT stream: send with `send`, receive with `recv`. Counts
/// against its connection's stream limit until dropped.
#[derive(Debug)]
pub struct HboneStream {
    /// Towards the server.
    pub send: SendStream<Bytes>,
    /// From the server.
    pub recv: RecvStream,
    _slot: StreamSlot,
}

/// A CONNECT request sent, its answer not yet read.
#[derive(Debug)]
pub struct PendingStream {
    send: SendStream<Bytes>,
    response: ResponseFuture,
    address: SocketAddr,
    authority: String,
    slot: StreamSlot,
}

impl PendingStream {
    /// Sends `data` ahead of the answer. HTTP/2 keeps it apart from the
    /// answer, so nothing is lost or mixed up: a server that refuses the
    /// stream discards it, one that accepts it hands it to the target first.
    pub fn send_early(&mut self, data: Bytes) -> Result<(), HboneError> {
        self.send
            .send_data(data, false)
            .map_err(http2_error(self.address))
    }

    /// Waits for the answer: the stream, if the server answered 200.
    pub async fn established(self) -> Result<HboneStream, HboneError> {
        self.established_with_headers()
            .await
            .map(|(stream, _headers)| stream)
    }

    /// [`PendingStream::established`], with the answer's headers (the
    /// server's `baggage`, for one: who the workload behind it is).
    pub async fn established_with_headers(self) -> Result<(HboneStream, HeaderMap), HboneError> {
        let response = self.response.await.map_err(http2_error(self.address))?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                address: self.address,
                authority: self.authority,
                status: response.status(),
            });
        }
        let (answer, recv) = response.into_parts();
        let stream = HboneStream {
            send: self.send,
            recv,
            _slot: self.slot,
        };
        Ok((stream, answer.headers))
    }
}

/// An HTTP/2 failure with the HBONE server at `address`.
fn http2_error(address: SocketAddr) -> impl FnOnce(h2::Error) -> HboneError {
    move |source| HboneError::Http2 { address, source }
}

/// One pooled connection.
#[derive(Debug)]
struct Pooled {
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    closed: CancellationToken,
}

/// Holds one of a connection's stream slots.
#[derive(Debug)]
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HbonePool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    /// Per key with requests waiting for a connection: whose turn it is to
    /// open one, and why the last open failed.
    opening: Mutex<HashMap<PoolKey, Arc<Gate>>>,
    mark: Option<u32>,
    shutdown: CancellationToken,
    keep_alive: KeepAlive,
}

/// Taken by the one request that opens a connection for a key; the others
/// wait their turn, then reuse what it opened or fail with its reason.
type Gate = tokio::sync::Mutex<Option<String>>;

/// How long opening a connection (TCP, TLS, HTTP/2) may take: one stalled
/// peer must not hold every request to it for longer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A request's place at a key's gate: on drop (done, failed or cancelled),
/// the last one through removes the gate, so the next request starts afresh.
struct GateTurn<'a> {
    opening: &'a Mutex<HashMap<PoolKey, Arc<Gate>>>,
    key: &'a PoolKey,
    gate: Arc<Gate>,
}

impl GateTurn<'_> {
    /// Takes the gate out of the map now (its open failed): requests already
    /// waiting keep it and learn why; new ones get a fresh gate.
    fn retire(&self) {
        let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        if opening
            .get(self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &self.gate))
        {
            opening.remove(self.key);
        }
    }
}

impl Drop for GateTurn<'_> {
    fn drop(&mut self) {
        let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the map's lock no one takes a new clone: only the map's and
        // this one left means no one else waits.
        if Arc::strong_count(&self.gate) == 2
            && opening
                .get(self.key)
                .is_some_and(|current| Arc::ptr_eq(current, &self.gate))
        {
            opening.remove(self.key);
        }
    }
}

/// When pooled connections are pinged and when idle ones close.
#[derive(Clone, Copy, Debug)]
struct KeepAlive {
    ping_interval: Duration,
    idle_timeout: Duration,
}

impl HbonePool {
    /// A pool whose sockets carry `mark` (see [`socket::PROXY_MARK`]); its
    /// connections close on `shutdown`.
    pub fn new(mark: Option<u32>, shutdown: &CancellationToken) -> Self {
        Self::with_keep_alive(mark, shutdown, PING_INTERVAL, POOL_IDLE_TIMEOUT)
    }

    /// [`HbonePool::new`] with its own PING interval and idle timeout (WIRE.md
    /// §4 gives 10 s and 5 minutes).
    pub fn with_keep_alive(
        mark: Option<u32>,
        shutdown: &CancellationToken,
        ping_interval: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connections: Mutex::new(HashMap::new()),
                opening: Mutex::new(HashMap::new()),
                mark,
                shutdown: shutdown.child_token(),
                keep_alive: KeepAlive {
                    ping_interval,
                    idle_timeout,
                },
            }),
        }
    }

    /// Open connections, for tests and the admin view.
    pub fn connection_count(&self) -> usize {
        self.lock()
            .values()
            .flatten()
            .filter(|c| !c.closed.is_cancelled())
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Arc<Pooled>>>> {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a CONNECT stream to `authority` (`ip:port` of the target) through
    /// the server at `key.address`, presenting `tls`'s certificate, with
    /// `headers` added to the request, and waits for the server's answer.
    pub async fn connect(
        &self,
        tls: &WorkloadTls,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &[(&'static str, HeaderValue)],
    ) -> Result<HboneStream, HboneError> {
        self.request(tls, key, authority, headers)
            .await?
            .established()
            .await
    }

    /// Sends the CONNECT request of [`HbonePool::connect`] without waiting for
    /// the answer: bytes the client has already written can follow at once
    /// ([`PendingStream::send_early`]) instead of a round trip later.
    pub async fn request(
        &self,
        tls: &WorkloadTls,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &[(&'static str, HeaderValue)],
    ) -> Result<PendingStream, HboneError> {
        let (pooled, slot) = match self.reuse(key) {
            Some(found) => found,
            // Boxed: the handshakes' state is large and needed only here, so
            // each connection's task stays small while it carries bytes.
            None => Box::pin(self.open_once(tls, key)).await?,
        };
        let authority = authority.to_string();
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.as_str());
        for (name, value) in headers {
            request = request.header(*name, value.clone());
        }
        let request = request.body(()).map_err(|err| HboneError::Request {
            authority: authority.clone(),
            problem: err.to_string(),
        })?;
        let address = key.address;
        let mut sender = pooled
            .send
            .clone()
            .ready()
            .await
            .map_err(http2_error(address))?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(http2_error(address))?;
        Ok(PendingStream {
            send,
            response,
            address,
            authority,
            slot,
        })
    }

    /// A pooled connection of `key` with a free stream slot.
    fn reuse(&self, key: &PoolKey) -> Option<(Arc<Pooled>, StreamSlot)> {
        let mut connections = self.lock();
        let list = connections.get_mut(key)?;
        list.retain(|c| !c.closed.is_cancelled());
        if list.is_empty() {
            // No entry left behind for a destination no longer in use.
            connections.remove(key);
            return None;
        }
        list.iter().find_map(|pooled| {
            let taken = pooled
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < MAX_STREAMS_PER_CONNECTION).then_some(n + 1)
                })
                .is_ok();
            taken.then(|| (pooled.clone(), StreamSlot(pooled.streams.clone())))
        })
    }

    /// A connection for `key` with a slot taken, opened by this request or by
    /// the one whose turn it was before (one open per key at a time).
    async fn open_once(
        &self,
        tls: &WorkloadTls,
        key: &PoolKey,
    ) -> Result<(Arc<Pooled>, StreamSlot), HboneError> {
        let gate = self
            .inner
            .opening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        // Leaves the gate however this request ends (a cancelled waiter too).
        let turn = GateTurn {
            opening: &self.inner.opening,
            key,
            gate,
        };
        let mut reason = turn.gate.lock().await;
        if let Some(found) = self.reuse(key) {
            return Ok(found);
        }
        if let Some(reason) = reason.as_ref() {
            return Err(HboneError::Opening {
                address: key.address,
                reason: reason.clone(),
            });
        }
        let opened = match tokio::time::timeout(OPEN_TIMEOUT, self.open(tls, key)).await {
            Ok(opened) => opened,
            Err(_) => Err(HboneError::Connect {
                address: key.address,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no HBONE connection within {OPEN_TIMEOUT:?}"),
                ),
            }),
        };
        if let Err(err) = &opened {
            // Those waiting now fail with it; later requests try afresh.
            *reason = Some(err.to_string());
            turn.retire();
        }
        opened
    }

    /// Opens a new connection for `key` and pools it, one slot taken.
    async fn open(
        &self,
        tls: &WorkloadTls,
        key: &PoolKey,
    ) -> Result<(Arc<Pooled>, StreamSlot), HboneError> {
        let address = key.address;
        let tcp = socket::connect_from(address, key.source_ip, self.inner.mark)
            .await
            .map_err(|source| HboneError::Connect { address, source })?;
        let stream = TlsConnector::from(tls.client.clone())
            .connect(ServerName::IpAddress(address.ip().into()), tcp)
            .await
            .map_err(|source| HboneError::Handshake { address, source })?;
        let peer = tls
            .peer_identity(stream.get_ref().1)
            .map_err(|source| HboneError::Peer { address, source })?;
        check_server_identity(&peer, &key.expected)
            .map_err(|source| HboneError::Peer { address, source })?;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(http2_error(address))?;
        let streams = Arc::new(AtomicUsize::new(1));
        let closed = self.inner.shutdown.child_token();
        let pooled = Arc::new(Pooled {
            send,
            streams: streams.clone(),
            closed: closed.clone(),
        });
        let ping = connection.ping_pong();
        let timing = self.inner.keep_alive;
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(err) = result {
                        tracing::debug!(%address, error = %err, "HBONE connection ended");
                    }
                }
                () = keep_alive(ping, streams, timing) => {}
                () = closed.cancelled() => {}
            }
            closed.cancel();
        });
        self.lock()
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        let slot = StreamSlot(pooled.streams.clone());
        Ok((pooled, slot))
    }
}

/// Returns when the connection should close: idle too long, or a PING went
/// unanswered.
async fn keep_alive(ping: Option<h2::PingPong>, streams: Arc<AtomicUsize>, timing: KeepAlive) {
    let mut idle_for = Duration::ZERO;
    let mut ping = ping;
    loop {
        tokio::time::sleep(timing.ping_interval).await;
        if streams.load(Ordering::Acquire) == 0 {
            idle_for += timing.ping_interval;
            if idle_for >= timing.idle_timeout {
                return;
            }
        } else {
            idle_for = Duration::ZERO;
        }
        if let Some(pinger) = ping.as_mut() {
            let pong =
                tokio::time::timeout(timing.ping_interval, pinger.ping(h2::Ping::opaque())).await;
            if !matches!(pong, Ok(Ok(_))) {
                return;
            }
        }
    }
}
