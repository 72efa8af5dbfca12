//! Inbound plaintext (15006): callers outside the mesh, redirected here.
//! Checked as an HBONE stream is (a workload this proxy serves, not one of
//! the proxy's own ports, policy), with no identity; admitted connections
//! are copied to the local application and stay registered so a policy
//! change can close them. Anything refused is reset.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_net::Acceptor;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::accept::accept_loop;
use super::authorize::{Inbound, local_workload};
use super::context::Context;
use super::error::ConnectionError;
use crate::net::copy::Progress;
use crate::net::plain::copy_plain;
use crate::net::socket;
use crate::telemetry::{ByteCounts, ConnectionRecord, Direction, Recorder};

/// Accepts plaintext inbound connections (redirected to 15006) until `stop`.
pub(super) async fn serve(ctx: Arc<Context>, acceptor: Acceptor, stop: CancellationToken) {
    accept_loop(ctx, acceptor, stop, connection).await;
}

async fn connection(ctx: Arc<Context>, mut tcp: TcpStream, source: SocketAddr) {
    let mut recorder = Recorder::new(ConnectionRecord::new(
        Direction::InboundPlaintext,
        source,
        None,
    ));
    let refuse = |tcp: TcpStream, recorder: Recorder, error: ConnectionError| {
        socket::reset(tcp);
        recorder.failed(&error);
    };
    let destination = match socket::original_destination(&tcp, source) {
        Ok(destination) => destination,
        Err(err) => {
            refuse(tcp, recorder, ConnectionError::NoDestination(err));
            return;
        }
    };
    recorder.record.destination = Some(destination);
    if ctx.is_own_port(destination.port()) {
        refuse(tcp, recorder, ConnectionError::SelfCall(destination));
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
            let error = ConnectionError::Denied {
                destination,
                reason: decision.reason,
            };
            refuse(tcp, recorder, error);
            return;
        }
        None => {
            refuse(tcp, recorder, ConnectionError::NotServed(destination));
            return;
        }
    };
    recorder.record.destination_workload = Some(workload);
    let registered = ctx.live.register(inbound);
    let mut upstream = match socket::connect_in(&ctx.sockets, destination, ctx.mark).await {
        Ok(upstream) => upstream,
        Err(source) => {
            let error = ConnectionError::ApplicationUnreachable {
                destination,
                source,
            };
            refuse(tcp, recorder, error);
            return;
        }
    };
    recorder.opened(ctx.metrics.as_ref());
    let progress = Progress::default();
    let error = tokio::select! {
        copied = copy_plain(&mut tcp, &mut upstream, &progress) => copied.err().map(ConnectionError::Transfer),
        () = registered.revoked.cancelled() => Some(ConnectionError::Revoked),
    };
    if error.is_some() {
        socket::reset(tcp);
        socket::reset(upstream);
    }
    let bytes = ByteCounts {
        request: progress.read(),
        response: progress.written(),
    };
    recorder.finish(bytes, error.as_ref());
}
