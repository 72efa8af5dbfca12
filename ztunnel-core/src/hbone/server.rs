//! The HBONE server: what accepts HBONE on 15008. Per connection: mutual TLS
//! with the served workload's certificate, the peer's verified identity, the
//! HTTP/2 preface, all within the listener's handshake deadline; then its
//! CONNECT streams, each handed on as a [`ConnectRequest`] until the
//! connection ends or the listener drains (a GOAWAY: open streams finish, no
//! new ones come).
//!
//! What a stream is let through to (which workloads are served here, what
//! policy says) is the caller's business: [`crate::proxy`]'s inbound path
//! answers each [`ConnectRequest`] with [`ConnectRequest::accept`] or
//! [`ConnectRequest::refuse`].

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use mesh_api::Identity;
use mesh_net::{Handshake, Throttle};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::headers::{AuthorityError, parse_authority};
use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::tls::WorkloadTls;

/// Why a CONNECT request was malformed (the server answers 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Another method than CONNECT.
    #[error("not a CONNECT request")]
    NotConnect,
    /// The `:authority` is not `<ip>:<port>`.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

/// The server side of HBONE for one listener. Shared by its connections.
#[derive(Debug)]
pub struct HboneServer {
    /// Failed TLS handshakes, logged at a bounded rate (anyone can make them
    /// fail).
    tls_failures: Mutex<Throttle>,
}

impl Default for HboneServer {
    fn default() -> Self {
        Self {
            tls_failures: Mutex::new(Throttle::new(Duration::from_secs(5))),
        }
    }
}

impl HboneServer {
    /// Serves one accepted connection from `source`. Within `handshake`'s
    /// deadline: `tls` (the served workload's TLS, which may wait for its
    /// certificate), the TLS handshake, the peer's identity and the HTTP/2
    /// preface. Then each CONNECT stream goes to `stream`, until the
    /// connection ends or `draining` is cancelled (then a GOAWAY, and the
    /// streams already open finish). A connection that fails before its
    /// streams is logged (TLS failures at a bounded rate) and closed.
    pub async fn serve<T, E>(
        &self,
        tcp: TcpStream,
        source: SocketAddr,
        handshake: Handshake,
        tls: T,
        draining: &CancellationToken,
        mut stream: impl FnMut(ConnectRequest),
    ) where
        T: Future<Output = Result<WorkloadTls, E>>,
        E: Display,
    {
        // The certificate wait counts against the handshake's deadline too:
        // an evicted or timed-out connection never waits longer.
        let accepted = handshake
            .within(async {
                let tls = tls
                    .await
                    .map_err(|err| Refused::NoCertificate(err.to_string()))?;
                let stream = TlsAcceptor::from(tls.server.clone())
                    .accept(tcp)
                    .await
                    .map_err(Refused::Tls)?;
                Ok::<_, Refused>((tls, stream))
            })
            .await;
        let (tls, tls_stream) = match accepted {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(Refused::NoCertificate(err))) => {
                tracing::warn!(%source, error = %err, "HBONE connection refused: no certificate to serve with");
                return;
            }
            Ok(Err(Refused::Tls(err))) => {
                let logged = self
                    .tls_failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .tick();
                if let Some(failures) = logged {
                    tracing::info!(%source, error = %err, failures, "HBONE TLS handshake failed");
                }
                return;
            }
            Err(ended) => {
                tracing::debug!(%source, error = %ended, "HBONE TLS handshake given up");
                return;
            }
        };
        let peer = match tls.peer_identity(tls_stream.get_ref().1) {
            Ok(peer) => peer,
            Err(err) => {
                tracing::info!(%source, error = %err, "HBONE peer refused");
                return;
            }
        };
        let preface = handshake
            .within(
                h2::server::Builder::new()
                    .initial_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_frame_size(MAX_FRAME_SIZE)
                    .handshake::<_, Bytes>(tls_stream),
            )
            .await;
        let mut connection = match preface {
            Ok(Ok(connection)) => connection,
            Ok(Err(err)) => {
                tracing::info!(%source, error = %err, "HBONE HTTP/2 handshake failed");
                return;
            }
            Err(ended) => {
                tracing::debug!(%source, error = %ended, "HBONE HTTP/2 preface given up");
                return;
            }
        };
        drop(handshake);
        let mut going_away = false;
        loop {
            let accepted = tokio::select! {
                accepted = connection.accept() => accepted,
                () = draining.cancelled(), if !going_away => {
                    // GOAWAY: streams already open finish, no new ones come.
                    going_away = true;
                    connection.graceful_shutdown();
                    continue;
                }
            };
            let Some(accepted) = accepted else { return };
            match accepted {
                Ok((request, respond)) => stream(ConnectRequest {
                    peer: peer.clone(),
                    source,
                    request,
                    respond,
                }),
                Err(err) => {
                    tracing::debug!(%source, error = %err, "HBONE connection ended");
                    return;
                }
            }
        }
    }
}

/// Why an HBONE connection did not get past TLS.
enum Refused {
    /// The served workload has no certificate (yet): why.
    NoCertificate(String),
    /// The TLS handshake failed.
    Tls(std::io::Error),
}

/// A CONNECT stream a peer asked for, not answered yet.
#[derive(Debug)]
pub struct ConnectRequest {
    peer: Identity,
    source: SocketAddr,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

impl ConnectRequest {
    /// The peer's verified identity (from its certificate).
    pub fn peer(&self) -> &Identity {
        &self.peer
    }

    /// The peer's address.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// The request's headers (`forwarded`, `baggage`).
    pub fn headers(&self) -> &HeaderMap {
        self.request.headers()
    }

    /// Where the peer wants to go: a CONNECT's `:authority`, read strictly.
    pub fn destination(&self) -> Result<SocketAddr, RequestError> {
        if self.request.method() != Method::CONNECT {
            return Err(RequestError::NotConnect);
        }
        let authority = self.request.uri().authority().map_or("", |a| a.as_str());
        Ok(parse_authority(authority)?)
    }

    /// Answers `status` (400 bad request, 401 denied, 503 unreachable) and
    /// ends the stream. A peer already gone is not an error.
    pub fn refuse(mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        // The peer may be gone already; nothing more to do then.
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 200 with `baggage` (who the workload is): the stream's two
    /// directions, to copy from and to.
    pub fn accept(
        mut self,
        baggage: HeaderValue,
    ) -> Result<(SendStream<Bytes>, RecvStream), h2::Error> {
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("baggage", baggage)
            .body(())
            .unwrap_or_default();
        let send = self.respond.send_response(response, false)?;
        Ok((send, self.request.into_body()))
    }
}
