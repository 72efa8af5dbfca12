//! Inbound: HBONE on 15008 (mutual TLS, HTTP/2 CONNECT per connection, policy
//! with the peer's identity) and plaintext on 15006 (callers outside the mesh,
//! policy with no identity). Admitted connections are copied to the local
//! application and stay registered so a policy change can close them.
//!
//! HBONE answers: 400 for a request that is not a CONNECT to a workload this
//! proxy serves, or that is a CONNECT to one of the proxy's own ports (a
//! "self call", refused whatever the policy says: it would loop the proxy
//! into itself), 401 when policy denies, 503 when the application cannot be
//! reached, else 200 with a `baggage` header describing the workload.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use mesh_api::Identity;
use mesh_net::{Acceptor, Handshake};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::authorize::{Inbound, Registered, local_workload};
use super::log::{AccessLog, Direction};
use super::plain::copy_plain;
use super::{
    Carried, Context, Established, accept_handshakes, accept_loop, run_connection, socket,
};
use crate::hbone::copy::{Progress, copy_bidirectional};
use crate::hbone::headers::parse_authority;
use crate::hbone::{CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};

/// Accepts HBONE connections until `stop` (which also tells open HTTP/2
/// connections to go away).
pub(super) async fn serve_hbone(ctx: Arc<Context>, acceptor: Acceptor, stop: CancellationToken) {
    let draining = stop.clone();
    accept_handshakes(ctx, acceptor, stop, move |ctx, tcp, peer, handshake| {
        hbone_connection(ctx, tcp, peer, handshake, draining.clone())
    })
    .await;
}

/// Serves one HBONE connection: TLS and the HTTP/2 preface within the
/// handshake's deadline, then its CONNECT streams.
async fn hbone_connection(
    ctx: Arc<Context>,
    tcp: TcpStream,
    source: SocketAddr,
    handshake: Handshake,
    draining: CancellationToken,
) {
    // The certificate wait counts against the handshake's deadline too: an
    // evicted or timed-out connection never waits longer.
    let accepted = handshake
        .within(async {
            let tls = ctx.workload_tls().await.map_err(Refused::NoCertificate)?;
            let stream = TlsAcceptor::from(tls.server.clone())
                .accept(tcp)
                .await
                .map_err(Refused::Tls)?;
            Ok::<_, Refused>((tls, stream))
        })
        .await;
    let (tls, stream) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(Refused::NoCertificate(err))) => {
            tracing::warn!(%source, error = %err, "HBONE connection refused: no certificate to serve with");
            return;
        }
        Ok(Err(Refused::Tls(err))) => {
            let logged = ctx
                .tls_failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let peer = match tls.peer_identity(stream.get_ref().1) {
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
                .handshake::<_, Bytes>(stream),
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
            Ok((request, respond)) => {
                // Checking and connecting a stream takes far more state than
                // carrying its bytes: boxed, and freed once established, so
                // the stream's task stays small while it lives.
                let setup = Box::pin(establish_stream(
                    ctx.clone(),
                    peer.clone(),
                    source,
                    request,
                    respond,
                ));
                ctx.spawn_tracked(move || run_connection(setup));
            }
            Err(err) => {
                tracing::debug!(%source, error = %err, "HBONE connection ended");
                return;
            }
        }
    }
}

/// Why an HBONE connection did not get past TLS.
enum Refused {
    /// The served workload has no certificate (yet).
    NoCertificate(super::IdentityError),
    /// The TLS handshake failed.
    Tls(std::io::Error),
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    // The peer may be gone already; nothing more to do then.
    let _ = respond.send_response(response, true);
}

/// Checks a CONNECT stream (authority, policy) and connects it to the
/// application. `None` if refused (answered, and logged).
async fn establish_stream(
    ctx: Arc<Context>,
    peer: Identity,
    source: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<InboundStream> {
    let started = Instant::now();
    let mut log = AccessLog::new(Direction::Inbound, source, Some(peer.clone()));
    if request.method() != Method::CONNECT {
        refuse(&mut respond, StatusCode::BAD_REQUEST);
        log.failed(started, "not a CONNECT request");
        return None;
    }
    let authority = request.uri().authority().map_or("", |a| a.as_str());
    let destination = match parse_authority(authority) {
        Ok(destination) => destination,
        Err(err) => {
            refuse(&mut respond, StatusCode::BAD_REQUEST);
            log.failed(started, &err.to_string());
            return None;
        }
    };
    log.destination = Some(destination);
    if ctx.is_own_port(destination.port()) {
        refuse(&mut respond, StatusCode::BAD_REQUEST);
        log.failed(started, &self_call(destination));
        return None;
    }
    let inbound = Inbound {
        peer: Some(peer),
        source,
        destination,
    };
    let (workload, decision) = {
        let state = ctx.state.read();
        log.source_workload = state.workload_by_ip(&ctx.network, source.ip()).cloned();
        match local_workload(&state, &ctx.served_uid, &ctx.network, destination.ip()) {
            Some(workload) => {
                let decision = inbound.evaluate(&state, &workload);
                (workload, decision)
            }
            None => {
                drop(state);
                refuse(&mut respond, StatusCode::BAD_REQUEST);
                log.failed(started, &format!("{destination} is not served here"));
                return None;
            }
        }
    };
    log.destination_workload = Some(workload.clone());
    if !decision.is_allowed() {
        refuse(&mut respond, StatusCode::UNAUTHORIZED);
        log.failed(
            started,
            &format!("denied by policy ({:?})", decision.reason),
        );
        return None;
    }
    let registered = ctx.live.register(inbound);
    let upstream = match socket::connect(destination, ctx.mark).await {
        Ok(upstream) => upstream,
        Err(err) => {
            refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.failed(started, &format!("application unreachable: {err}"));
            return None;
        }
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("baggage", ctx.baggage.of(&workload))
        .body(())
        .unwrap_or_default();
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(err) => {
            log.failed(started, &format!("the peer went away: {err}"));
            return None;
        }
    };
    let recv = request.into_body();
    log.opened(ctx.metrics.as_ref());
    Some(InboundStream {
        upstream,
        send,
        recv,
        registered,
        log,
        started,
    })
}

/// An established inbound stream.
struct InboundStream {
    upstream: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    registered: Registered,
    log: AccessLog,
    started: Instant,
}

impl Established for InboundStream {
    /// Also ends when policy revokes the connection.
    async fn carry(&mut self) -> Carried {
        let progress = Progress::default();
        let error = tokio::select! {
            copied = copy_bidirectional(&mut self.upstream, &mut self.send, &mut self.recv, &progress) => copied
                .err()
                .map(|err| err.to_string()),
            () = self.registered.revoked.cancelled() => Some(REVOKED.to_owned()),
        };
        // The request flows from the stream to the application.
        Carried {
            bytes: (progress.written(), progress.read()),
            error,
        }
    }

    /// An error (a revocation too) resets both sides: the application's TCP
    /// connection, and the stream with `CONNECT_ERROR`, so the client's
    /// application sees a reset rather than an end it could take for a
    /// complete answer (a dropped stream would go out as `CANCEL`, which
    /// ztunnel passes on as a clean close).
    fn finish(mut self, outcome: &Carried) {
        if outcome.is_err() {
            self.send.send_reset(h2::Reason::CONNECT_ERROR);
            socket::reset(self.upstream);
        }
        self.log
            .finish(self.started, outcome.bytes, outcome.error.as_deref());
    }
}

/// Accepts plaintext inbound connections (redirected to 15006) until `stop`.
pub(super) async fn serve_plaintext(
    ctx: Arc<Context>,
    acceptor: Acceptor,
    stop: CancellationToken,
) {
    accept_loop(ctx, acceptor, stop, plaintext_connection).await;
}

async fn plaintext_connection(ctx: Arc<Context>, mut tcp: TcpStream, source: SocketAddr) {
    let started = Instant::now();
    let mut log = AccessLog::new(Direction::InboundPlaintext, source, None);
    let destination = match socket::original_destination(&tcp, source) {
        Ok(destination) => destination,
        Err(err) => {
            socket::reset(tcp);
            log.failed(started, &format!("no destination: {err}"));
            return;
        }
    };
    log.destination = Some(destination);
    if ctx.is_own_port(destination.port()) {
        socket::reset(tcp);
        log.failed(started, &self_call(destination));
        return;
    }
    let inbound = Inbound {
        peer: None,
        source,
        destination,
    };
    let admitted = {
        let state = ctx.state.read();
        local_workload(&state, &ctx.served_uid, &ctx.network, destination.ip()).map(|workload| {
            let decision = inbound.evaluate(&state, &workload);
            (workload, decision)
        })
    };
    let workload = match admitted {
        Some((workload, decision)) if decision.is_allowed() => workload,
        Some((_, decision)) => {
            socket::reset(tcp);
            log.failed(
                started,
                &format!("denied by policy ({:?})", decision.reason),
            );
            return;
        }
        None => {
            socket::reset(tcp);
            log.failed(started, &format!("{destination} is not served here"));
            return;
        }
    };
    log.destination_workload = Some(workload);
    let registered = ctx.live.register(inbound);
    let mut upstream = match socket::connect(destination, ctx.mark).await {
        Ok(upstream) => upstream,
        Err(err) => {
            socket::reset(tcp);
            log.failed(started, &format!("application unreachable: {err}"));
            return;
        }
    };
    log.opened(ctx.metrics.as_ref());
    let progress = Progress::default();
    let error = tokio::select! {
        copied = copy_plain(&mut tcp, &mut upstream, &progress) => copied.err().map(|err| err.to_string()),
        () = registered.revoked.cancelled() => Some(REVOKED.to_owned()),
    };
    if error.is_some() {
        socket::reset(tcp);
        socket::reset(upstream);
    }
    log.finish(
        started,
        (progress.read(), progress.written()),
        error.as_deref(),
    );
}

/// Why a connection to one of the proxy's own ports was refused.
pub(super) fn self_call(destination: SocketAddr) -> String {
    format!("refused: {destination} is one of the proxy's own ports (a self call)")
}

/// Why a connection that policy now denies was closed.
const REVOKED: &str = "closed: policy now denies it";
