//! The HBONE client's connection: one HTTP/2 connection over mutual TLS to a
//! peer's HBONE port, used only if the server proves one of the identities
//! expected of it, kept alive by PINGs and closed once idle; and the CONNECT
//! streams opened on it ([`PendingStream`], then [`HboneStream`]). Which
//! connection a request uses is the [`super::pool`]'s business.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use mesh_api::Identity;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW};
use crate::net::socket::{self, SocketNamespace};
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

/// Holds one of a connection's stream slots.
#[derive(Debug)]
pub(super) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a connection is pinged and when, idle, it closes.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeepAlive {
    /// The PING interval (a pong may take as long).
    pub(super) ping_interval: Duration,
    /// How long without streams before it closes.
    pub(super) idle_timeout: Duration,
}

/// Where and how a connection is opened.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dial<'a> {
    /// The server's HBONE address.
    pub(super) address: SocketAddr,
    /// The local address to connect from, if any.
    pub(super) source_ip: Option<IpAddr>,
    /// The identities the server may present.
    pub(super) expected: &'a [Identity],
    /// The mark on the socket.
    pub(super) mark: Option<u32>,
    /// Where the socket is made.
    pub(super) namespace: &'a SocketNamespace,
    /// Its keep-alive.
    pub(super) keep_alive: KeepAlive,
}

/// One client connection, shared by up to [`MAX_STREAMS_PER_CONNECTION`]
/// streams.
#[derive(Debug)]
pub(super) struct Connection {
    send: SendRequest<Bytes>,
    address: SocketAddr,
    streams: Arc<AtomicUsize>,
    closed: CancellationToken,
}

impl Connection {
    /// Opens a connection as `dial` says, presenting `tls`'s certificate:
    /// TCP, TLS, the server's identity, the HTTP/2 preface. It is driven by a
    /// task of its own until it fails, goes idle, misses a PING, or
    /// `shutdown`. One stream slot is taken, for the request that opened it.
    pub(super) async fn open(
        tls: &WorkloadTls,
        dial: Dial<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(Arc<Self>, StreamSlot), HboneError> {
        let address = dial.address;
        let tcp = socket::connect_from_in(dial.namespace, address, dial.source_ip, dial.mark)
            .await
            .map_err(|source| HboneError::Connect { address, source })?;
        let stream = TlsConnector::from(tls.client.clone())
            .connect(ServerName::IpAddress(address.ip().into()), tcp)
            .await
            .map_err(|source| HboneError::Handshake { address, source })?;
        let peer = tls
            .peer_identity(stream.get_ref().1)
            .map_err(|source| HboneError::Peer { address, source })?;
        check_server_identity(&peer, dial.expected)
            .map_err(|source| HboneError::Peer { address, source })?;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(http2_error(address))?;
        let streams = Arc::new(AtomicUsize::new(1));
        let closed = shutdown.child_token();
        let opened = Arc::new(Self {
            send,
            address,
            streams: streams.clone(),
            closed: closed.clone(),
        });
        let ping = connection.ping_pong();
        let timing = dial.keep_alive;
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
        let slot = StreamSlot(opened.streams.clone());
        Ok((opened, slot))
    }

    /// Whether it has closed.
    pub(super) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// One of its stream slots, if it has one free.
    pub(super) fn take_slot(&self) -> Option<StreamSlot> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS_PER_CONNECTION).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.streams.clone()))
    }

    /// Sends a CONNECT request for `authority` with `headers` added, in
    /// `slot` (one of this connection's), without waiting for the answer.
    pub(super) async fn request(
        &self,
        slot: StreamSlot,
        authority: SocketAddr,
        headers: &[(&'static str, HeaderValue)],
    ) -> Result<PendingStream, HboneError> {
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
        let address = self.address;
        let mut sender = self
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
