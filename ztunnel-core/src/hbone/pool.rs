//! The HBONE client's pool: [`client`](super::client) connections shared
//! by (source identity, destination identity, destination address) as
//! WIRE.md §4 keys them, at most [`MAX_STREAMS_PER_CONNECTION`] streams each
//! (then another connection), each connection pinged every
//! [`PING_INTERVAL`] and closed after [`POOL_IDLE_TIMEOUT`] without streams.
//!
//! One connection is opened at a time per key: requests that find no free
//! connection wait for the one being opened and then share it (a burst of
//! 150 first requests to one destination opens 2 connections, not 150), and
//! if that open fails they fail with it rather than each trying again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use mesh_api::Identity;
use tokio_util::sync::CancellationToken;

#[cfg(doc)]
use super::MAX_STREAMS_PER_CONNECTION;
use super::client::{
    Connection, Dial, HboneError, HboneStream, KeepAlive, PendingStream, StreamSlot,
};
use super::{PING_INTERVAL, POOL_IDLE_TIMEOUT};
use crate::net::socket::SocketNamespace;
use crate::tls::WorkloadTls;

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

/// The pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HbonePool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<Connection>>>>,
    /// Per key with requests waiting for a connection: whose turn it is to
    /// open one, and why the last open failed.
    opening: Mutex<HashMap<PoolKey, Arc<Gate>>>,
    mark: Option<u32>,
    namespace: SocketNamespace,
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

impl HbonePool {
    /// A pool whose sockets carry `mark` (see [`crate::net::socket::PROXY_MARK`]); its
    /// connections close on `shutdown`.
    pub fn new(mark: Option<u32>, shutdown: &CancellationToken) -> Self {
        Self::with_keep_alive(mark, shutdown, PING_INTERVAL, POOL_IDLE_TIMEOUT)
    }

    /// [`HbonePool::new`] whose connections start in `namespace` (node
    /// mode: the served pod's).
    pub fn in_namespace(
        mark: Option<u32>,
        namespace: SocketNamespace,
        shutdown: &CancellationToken,
    ) -> Self {
        Self::assemble(mark, namespace, shutdown, PING_INTERVAL, POOL_IDLE_TIMEOUT)
    }

    /// [`HbonePool::new`] with its own PING interval and idle timeout (WIRE.md
    /// §4 gives 10 s and 5 minutes).
    pub fn with_keep_alive(
        mark: Option<u32>,
        shutdown: &CancellationToken,
        ping_interval: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self::assemble(
            mark,
            SocketNamespace::process(),
            shutdown,
            ping_interval,
            idle_timeout,
        )
    }

    fn assemble(
        mark: Option<u32>,
        namespace: SocketNamespace,
        shutdown: &CancellationToken,
        ping_interval: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                connections: Mutex::new(HashMap::new()),
                opening: Mutex::new(HashMap::new()),
                mark,
                namespace,
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
            .filter(|c| !c.is_closed())
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Arc<Connection>>>> {
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
        let (connection, slot) = match self.reuse(key) {
            Some(found) => found,
            // Boxed: the handshakes' state is large and needed only here, so
            // each connection's task stays small while it carries bytes.
            None => Box::pin(self.open_once(tls, key)).await?,
        };
        connection.request(slot, authority, headers).await
    }

    /// A pooled connection of `key` with a free stream slot.
    fn reuse(&self, key: &PoolKey) -> Option<(Arc<Connection>, StreamSlot)> {
        let mut connections = self.lock();
        let list = connections.get_mut(key)?;
        list.retain(|c| !c.is_closed());
        if list.is_empty() {
            // No entry left behind for a destination no longer in use.
            connections.remove(key);
            return None;
        }
        list.iter().find_map(|connection| {
            connection
                .take_slot()
                .map(|slot| (connection.clone(), slot))
        })
    }

    /// A connection for `key` with a slot taken, opened by this request or by
    /// the one whose turn it was before (one open per key at a time).
    async fn open_once(
        &self,
        tls: &WorkloadTls,
        key: &PoolKey,
    ) -> Result<(Arc<Connection>, StreamSlot), HboneError> {
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
    ) -> Result<(Arc<Connection>, StreamSlot), HboneError> {
        let dial = Dial {
            address: key.address,
            source_ip: key.source_ip,
            expected: &key.expected,
            mark: self.inner.mark,
            namespace: &self.inner.namespace,
            keep_alive: self.inner.keep_alive,
        };
        let (connection, slot) = Connection::open(tls, dial, &self.inner.shutdown).await?;
        self.lock()
            .entry(key.clone())
            .or_default()
            .push(connection.clone());
        Ok((connection, slot))
    }
}
