//! Outbound (15001): the served workload's connections, redirected here. The
//! original destination is routed ([`super::route`]): to a mesh workload over
//! HBONE (or plain TCP if it takes no HBONE), else plain TCP as it was going.
//! A destination that cannot be routed, refused or reached resets the client.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_api::Identity;
use mesh_api::workload::Workload;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::log::{AccessLog, Direction};
use super::route::{Route, Upstream, first_ip, route};
use super::{Context, accept_loop, baggage, socket, socks5};
use crate::hbone::copy::copy_bidirectional;
use crate::hbone::headers::forwarded_for;
use crate::hbone::pool::{HboneStream, PoolKey};

/// How long a connection to an unknown destination waits for an on-demand
/// lookup before leaving the mesh as plain TCP.
const DEMAND_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts outbound connections until `stop`.
pub(super) async fn serve_outbound(
    ctx: Arc<Context>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let random = Arc::new(Random::default());
    accept_loop(ctx, listener, stop, "outbound", move |ctx, tcp, source| {
        let random = random.clone();
        async move { outbound_connection(ctx, tcp, source, &random).await }
    })
    .await;
}

/// Numbers for load balancing: cheap, and different per connection.
#[derive(Debug, Default)]
struct Random {
    seed: RandomState,
    counter: AtomicU64,
}

impl Random {
    fn below(&self, bound: u64) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.seed.hash_one(n) % bound.max(1)
    }
}

async fn outbound_connection(
    ctx: Arc<Context>,
    tcp: TcpStream,
    source: SocketAddr,
    random: &Random,
) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let log = AccessLog::new(Direction::Outbound, source, None, ctx.metrics.clone());
    match socket::original_destination(&tcp) {
        Ok(destination) => forward(&ctx, tcp, source, destination, random, log, started).await,
        Err(err) => {
            socket::reset(tcp);
            log.failed(started, &format!("no destination: {err}"));
        }
    }
}

/// Accepts SOCKS5 connections until `stop`.
pub(super) async fn serve_socks5(
    ctx: Arc<Context>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let random = Arc::new(Random::default());
    accept_loop(ctx, listener, stop, "SOCKS5", move |ctx, tcp, source| {
        let random = random.clone();
        async move { socks5_connection(ctx, tcp, source, &random).await }
    })
    .await;
}

async fn socks5_connection(
    ctx: Arc<Context>,
    mut tcp: TcpStream,
    source: SocketAddr,
    random: &Random,
) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let log = AccessLog::new(Direction::Outbound, source, None, ctx.metrics.clone());
    let target = match socks5::handshake(&mut tcp).await {
        Ok(target) => target,
        Err(err) => {
            log.failed(started, &format!("SOCKS5: {err}"));
            return;
        }
    };
    let destination = match target {
        socks5::Target::Address(address) => Some(address),
        socks5::Target::Domain(name, port) => resolve(&ctx, &name, port).await,
    };
    let Some(destination) = destination else {
        let _ = tcp
            .write_all(&socks5::reply(socks5::Reply::HostUnreachable))
            .await;
        log.failed(started, "SOCKS5: the name does not resolve");
        return;
    };
    if tcp
        .write_all(&socks5::reply(socks5::Reply::Succeeded))
        .await
        .is_err()
    {
        log.failed(started, "SOCKS5: the client went away");
        return;
    }
    forward(&ctx, tcp, source, destination, random, log, started).await;
}

/// A mesh hostname's VIP from the state, else the system resolver's answer.
async fn resolve(ctx: &Context, name: &str, port: u16) -> Option<SocketAddr> {
    let vip = {
        let state = ctx.state.read();
        let name = name.trim_end_matches('.');
        state.services_by_hostname(name).find_map(|service| {
            service
                .addresses
                .iter()
                .find(|address| address.network == ctx.network)
                .and_then(|address| mesh_api::names::ip_from_wire(&address.address).ok())
        })
    };
    if let Some(ip) = vip {
        return Some(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((name, port)).await.ok()?.next()
}

/// Routes and carries a connection to `destination`.
async fn forward(
    ctx: &Context,
    mut tcp: TcpStream,
    source: SocketAddr,
    destination: SocketAddr,
    random: &Random,
    mut log: AccessLog,
    started: Instant,
) {
    log.destination = Some(destination);
    let route_now = |log: &mut AccessLog| {
        let state = ctx.state.read();
        let served = state.workload(&ctx.served_uid).cloned();
        log.source_workload.clone_from(&served);
        route(
            &state,
            served.as_deref(),
            &ctx.network,
            destination,
            &mut |bound| random.below(bound),
        )
    };
    let mut routed = route_now(&mut log);
    if let (Ok(Route::Passthrough(_)), Some(demander)) = (&routed, &ctx.demander) {
        // Unknown here: ask the control plane, then route again.
        let name = format!("{}/{}", ctx.network, destination.ip());
        if demander.demand(&name, DEMAND_WAIT).await {
            routed = route_now(&mut log);
        }
    }
    let outcome = match routed {
        Err(err) => Err(err.to_string()),
        Ok(Route::Passthrough(address)) => plain(&mut tcp, address, ctx.mark, &mut log).await,
        Ok(Route::Mesh(upstream)) => {
            log.destination = Some(upstream.address);
            log.destination_workload = Some(upstream.workload.clone());
            log.destination_identity.clone_from(&upstream.identity);
            log.service = upstream.service.as_ref().map(|s| s.hostname.clone());
            if upstream.hbone {
                hbone(ctx, &mut tcp, source, &upstream, &mut log).await
            } else {
                plain(&mut tcp, upstream.address, ctx.mark, &mut log).await
            }
        }
    };
    if outcome.is_err() {
        socket::reset(tcp);
    }
    log.finish(started, &outcome);
}

async fn plain(
    tcp: &mut TcpStream,
    address: SocketAddr,
    mark: Option<u32>,
    log: &mut AccessLog,
) -> Result<(u64, u64), String> {
    let mut upstream = socket::connect(address, mark)
        .await
        .map_err(|err| format!("connect to {address}: {err}"))?;
    log.opened();
    match tokio::io::copy_bidirectional(tcp, &mut upstream).await {
        Ok(copied) => Ok(copied),
        Err(err) => {
            socket::reset(upstream);
            Err(err.to_string())
        }
    }
}

async fn hbone(
    ctx: &Context,
    tcp: &mut TcpStream,
    source: SocketAddr,
    upstream: &Upstream,
    log: &mut AccessLog,
) -> Result<(u64, u64), String> {
    // Boxed: setting up (certificate, pool, CONNECT) takes far more state than
    // carrying bytes, and a connection's task should stay small while it lives.
    // The served workload as routing saw it: no second look at the state.
    let served = log.source_workload.clone();
    let stream = Box::pin(open_hbone(ctx, source, upstream, served.as_deref())).await?;
    log.opened();
    let copied = copy_bidirectional(tcp, stream.send, stream.recv)
        .await
        .map_err(|err| err.to_string())?;
    Ok((copied.tcp_to_stream, copied.stream_to_tcp))
}

/// Opens the CONNECT stream to `upstream` for the served workload (`served`,
/// as the state knows it).
async fn open_hbone(
    ctx: &Context,
    source: SocketAddr,
    upstream: &Upstream,
    served: Option<&Workload>,
) -> Result<HboneStream, String> {
    let Some(identity) = upstream.identity.clone() else {
        return Err(format!(
            "workload {} has no valid identity",
            upstream.workload.uid
        ));
    };
    // The workload's own identity, or any the service vouches for.
    let mut expected = vec![identity];
    if let Some(service) = &upstream.service {
        expected.extend(service.subject_alt_names.iter().filter_map(|san| {
            Identity::parse_uri(san)
                .or_else(|_| Identity::from_principal(san))
                .ok()
        }));
    }
    let identity = ctx.identity_of(served).map_err(|err| err.to_string())?;
    let tls = ctx
        .tls_for(&identity)
        .await
        .map_err(|err| err.to_string())?;
    let key = PoolKey {
        source: tls.identity().clone(),
        expected,
        address: SocketAddr::new(upstream.address.ip(), ctx.hbone_port),
        source_ip: served.and_then(first_ip),
    };
    let headers = [
        ("forwarded", forwarded_for(source)),
        ("baggage", served.map(baggage).unwrap_or_default()),
    ];
    ctx.pool
        .connect(&tls, &key, upstream.address, &headers)
        .await
        .map_err(|err| err.to_string())
}
