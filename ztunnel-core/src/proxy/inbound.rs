//! Inbound over HBONE (15008): the [`crate::hbone::server`] accepts the
//! connections and their CONNECT streams; here each stream is checked
//! (a workload this proxy serves, not one of the proxy's own ports, what
//! policy says with the peer's identity), connected to the local application,
//! and stays registered so a policy change can close it.
//!
//! Answers: 400 for a request that is not a CONNECT to a workload this proxy
//! serves, or that is a CONNECT to one of the proxy's own ports (a "self
//! call", refused whatever the policy says: it would loop the proxy into
//! itself), 401 when policy denies, 503 when the application cannot be
//! reached, else 200 with a `baggage` header describing the workload.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::StatusCode;
use mesh_api::Identity;
use mesh_api::workload::Workload;
use mesh_net::Acceptor;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::accept::{Carried, Established, accept_handshakes, run_connection};
use super::authorize::{Inbound, Registered, local_workload};
use super::context::Context;
use super::error::ConnectionError;
use crate::hbone::{ConnectRequest, HboneServer};
use crate::net::copy::{Progress, copy_bidirectional};
use crate::net::socket;
use crate::telemetry::{ByteCounts, ConnectionRecord, Direction, Recorder};

/// Accepts HBONE connections until `stop` (which also tells open HTTP/2
/// connections to go away).
pub(super) async fn serve(ctx: Arc<Context>, acceptor: Acceptor, stop: CancellationToken) {
    let draining = stop.clone();
    let server = Arc::new(HboneServer::default());
    accept_handshakes(ctx, acceptor, stop, move |ctx, tcp, source, handshake| {
        let server = server.clone();
        let draining = draining.clone();
        async move {
            let tls = ctx.workload_tls();
            server
                .serve(tcp, source, handshake, tls, &draining, |request| {
                    // Checking and connecting a stream takes far more state
                    // than carrying its bytes: boxed, and freed once
                    // established, so the stream's task stays small while it
                    // lives.
                    let setup = Box::pin(establish_stream(ctx.clone(), request));
                    ctx.spawn_tracked(move || run_connection(setup));
                })
                .await;
        }
    })
    .await;
}

/// Checks a CONNECT stream (authority, policy) and connects it to the
/// application. `None` if refused (answered, and recorded).
async fn establish_stream(ctx: Arc<Context>, request: ConnectRequest) -> Option<InboundStream> {
    let source = request.source();
    let mut recorder = Recorder::new(ConnectionRecord::new(
        Direction::Inbound,
        source,
        Some(request.peer().clone()),
    ));
    let destination = match request.destination() {
        Ok(destination) => destination,
        Err(err) => {
            request.refuse(StatusCode::BAD_REQUEST);
            recorder.failed(&ConnectionError::from(err));
            return None;
        }
    };
    let peer = Some(request.peer().clone());
    let admitted = match admit(&ctx, peer, source, destination, &mut recorder.record).await {
        Ok(admitted) => admitted,
        Err((status, error)) => {
            request.refuse(status);
            recorder.failed(&error);
            return None;
        }
    };
    let (send, recv) = match request.accept(ctx.baggage.of(&admitted.workload)) {
        Ok(stream) => stream,
        Err(source) => {
            recorder.failed(&ConnectionError::PeerGone {
                destination,
                source,
            });
            return None;
        }
    };
    recorder.opened(ctx.metrics.as_ref());
    Some(InboundStream {
        upstream: admitted.upstream,
        send,
        recv,
        registered: admitted.registered,
        recorder,
    })
}

/// An inbound connection let in: the workload it is for, its registration
/// (a policy change can revoke it) and its connection to the application.
pub(super) struct Admitted {
    pub(super) workload: Arc<Workload>,
    pub(super) registered: Registered,
    pub(super) upstream: TcpStream,
}

/// Lets in a connection from `peer` at `source` to `destination`, the
/// checks every inbound connection passes whichever way it came (HBONE, or
/// the same-node shortcut): not one of the proxy's own ports (a self call),
/// a workload this instance serves, allowed by policy; then registered and
/// connected to the application. `record` learns what is found. Refused:
/// the HBONE status that says so, and why.
pub(super) async fn admit(
    ctx: &Context,
    peer: Option<Identity>,
    source: SocketAddr,
    destination: SocketAddr,
    record: &mut ConnectionRecord,
) -> Result<Admitted, (StatusCode, ConnectionError)> {
    record.destination = Some(destination);
    if ctx.is_own_port(destination.port()) {
        return Err((
            StatusCode::BAD_REQUEST,
            ConnectionError::SelfCall(destination),
        ));
    }
    let inbound = Inbound {
        peer,
        source,
        destination,
    };
    let (workload, decision) = {
        let state = ctx.state.read();
        record.source_workload = state.workload_by_ip(&ctx.network, source.ip()).cloned();
        match local_workload(&state, &ctx.served_uid, &ctx.network, destination.ip()) {
            Some(workload) => {
                let decision = inbound.evaluate(&state, &workload);
                (workload, decision)
            }
            None => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    ConnectionError::NotServed(destination),
                ));
            }
        }
    };
    record.destination_identity = ctx.identity_of(Some(&workload)).ok();
    record.destination_workload = Some(workload.clone());
    if !decision.is_allowed() {
        return Err((
            StatusCode::UNAUTHORIZED,
            ConnectionError::Denied {
                destination,
                reason: decision.reason,
            },
        ));
    }
    let registered = ctx.live.register(inbound);
    match socket::connect_in(&ctx.sockets, destination, ctx.mark).await {
        Ok(upstream) => Ok(Admitted {
            workload,
            registered,
            upstream,
        }),
        Err(source) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ConnectionError::ApplicationUnreachable {
                destination,
                source,
            },
        )),
    }
}

/// An established inbound stream.
struct InboundStream {
    upstream: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    registered: Registered,
    recorder: Recorder,
}

impl Established for InboundStream {
    /// Also ends when policy revokes the connection.
    async fn carry(&mut self) -> Carried {
        let progress = Progress::default();
        let error = tokio::select! {
            copied = copy_bidirectional(&mut self.upstream, &mut self.send, &mut self.recv, &progress) => copied
                .err()
                .map(ConnectionError::Transfer),
            () = self.registered.revoked.cancelled() => Some(ConnectionError::Revoked),
        };
        // The request flows from the stream to the application.
        Carried {
            bytes: ByteCounts {
                request: progress.written(),
                response: progress.read(),
            },
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
        self.recorder.finish(outcome.bytes, outcome.error.as_ref());
    }
}
