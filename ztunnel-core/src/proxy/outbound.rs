//! The outbound listener (15001): the served workload's connections,
//! redirected here, and the SOCKS5 listener's (their destination named by the
//! client, [`super::socks5`]). The destination is routed ([`super::route`]):
//! to a mesh workload over HBONE (or plain TCP if it takes no HBONE), else
//! plain TCP as it was going. A destination that cannot be routed, refused or
//! reached resets a redirected client; a SOCKS5 client gets a failure code.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use mesh_api::Identity;
use mesh_api::workload::Workload;
use mesh_net::{Acceptor, Handshake};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::accept::{Carried, Established, accept_handshakes, accept_loop, run_connection};
use super::context::Context;
use super::context::IdentityError;
use super::error::ConnectionError;
use super::local::{self, LocalLink};
use super::route::{Route, Upstream, first_ip, route};
use super::socks5;
use crate::hbone::headers::forwarded_for;
use crate::hbone::{HboneError, HboneStream, PoolKey};
use crate::net::copy::{Progress, copy_bidirectional, ready_bytes};
use crate::net::plain::copy_plain;
use crate::net::socket;
use crate::telemetry::{ByteCounts, ConnectionRecord, Direction, Recorder};

/// How long a connection to an unknown destination waits for an on-demand
/// lookup before leaving the mesh as plain TCP.
const DEMAND_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts outbound connections until `stop`.
pub(super) async fn serve(ctx: Arc<Context>, acceptor: Acceptor, stop: CancellationToken) {
    let random = Arc::new(Random::default());
    accept_loop(ctx, acceptor, stop, move |ctx, tcp, source| {
        run_connection(Box::pin(establish_outbound(
            ctx,
            tcp,
            source,
            random.clone(),
        )))
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

/// Sets up a connection redirected to the outbound listener.
async fn establish_outbound(
    ctx: Arc<Context>,
    tcp: TcpStream,
    source: SocketAddr,
    random: Arc<Random>,
) -> Option<Outbound> {
    let recorder = Recorder::new(ConnectionRecord::new(Direction::Outbound, source, None));
    match socket::original_destination(&tcp, source) {
        Ok(destination) => forward(&ctx, tcp, source, destination, &random, recorder)
            .await
            .map_err(NotForwarded::reset)
            .ok(),
        Err(err) => {
            socket::reset(tcp);
            recorder.failed(&ConnectionError::NoDestination(err));
            None
        }
    }
}

/// Accepts SOCKS5 connections until `stop`.
pub(super) async fn serve_socks5(ctx: Arc<Context>, acceptor: Acceptor, stop: CancellationToken) {
    let random = Arc::new(Random::default());
    accept_handshakes(ctx, acceptor, stop, move |ctx, tcp, source, handshake| {
        run_connection(Box::pin(establish_socks5(
            ctx,
            tcp,
            source,
            handshake,
            random.clone(),
        )))
    })
    .await;
}

/// Sets up a SOCKS5 connection: the handshake, then as if redirected.
async fn establish_socks5(
    ctx: Arc<Context>,
    mut tcp: TcpStream,
    source: SocketAddr,
    handshake: Handshake,
    random: Arc<Random>,
) -> Option<Outbound> {
    let recorder = Recorder::new(ConnectionRecord::new(Direction::Outbound, source, None));
    let target = match handshake.within(socks5::handshake(&mut tcp)).await {
        Ok(Ok(target)) => target,
        Ok(Err(err)) => {
            recorder.failed(&ConnectionError::Socks5(err));
            return None;
        }
        Err(ended) => {
            recorder.failed(&ConnectionError::Socks5Greeting(ended));
            return None;
        }
    };
    drop(handshake);
    let destination = match target {
        socks5::Target::Address(address) => Ok(address),
        socks5::Target::Domain(name, port) => resolve(&ctx, &name, port)
            .await
            .ok_or(ConnectionError::Unresolved { name, port }),
    };
    let destination = match destination {
        Ok(destination) => destination,
        Err(unresolved) => {
            let _ = tcp
                .write_all(&socks5::reply(socks5::Reply::HostUnreachable))
                .await;
            recorder.failed(&unresolved);
            return None;
        }
    };
    // Success is answered once the tunnel is up, a failure code otherwise.
    let mut outbound = match forward(&ctx, tcp, source, destination, &random, recorder).await {
        Ok(outbound) => outbound,
        Err(not_forwarded) => {
            not_forwarded.refuse_socks5().await;
            return None;
        }
    };
    let replied = outbound
        .tcp
        .write_all(&socks5::reply(socks5::Reply::Succeeded))
        .await;
    if let Err(err) = replied {
        let carried = Carried {
            bytes: ByteCounts::default(),
            error: Some(ConnectionError::Client {
                destination,
                source: err,
            }),
        };
        outbound.finish(&carried);
        return None;
    }
    Some(outbound)
}

/// A connection that could not be forwarded, and why.
struct NotForwarded {
    tcp: TcpStream,
    recorder: Recorder,
    error: ConnectionError,
}

impl NotForwarded {
    /// Resets the client (a redirected connection) and records why.
    fn reset(self) {
        socket::reset(self.tcp);
        self.recorder.failed(&self.error);
    }

    /// Answers a SOCKS5 client with a failure code and records why.
    async fn refuse_socks5(mut self) {
        let _ = self
            .tcp
            .write_all(&socks5::reply(socks5::Reply::GeneralFailure))
            .await;
        self.recorder.failed(&self.error);
    }
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

/// Routes a connection to `destination` and connects it there: what is left
/// to do is carrying its bytes. If that failed, the connection and why, for
/// the caller to answer (and record).
async fn forward(
    ctx: &Context,
    mut tcp: TcpStream,
    source: SocketAddr,
    destination: SocketAddr,
    random: &Random,
    mut recorder: Recorder,
) -> Result<Outbound, NotForwarded> {
    let record = &mut recorder.record;
    record.destination = Some(destination);
    if ctx.is_own_port(destination.port()) && is_local(ctx, destination.ip()) {
        return Err(NotForwarded {
            tcp,
            recorder,
            error: ConnectionError::SelfCall(destination),
        });
    }
    let route_now = |record: &mut ConnectionRecord| {
        let state = ctx.state.read();
        let served = state.workload(&ctx.served_uid).cloned();
        // The client is the served workload: its identity is the source's.
        record.source_identity = ctx.identity_of(served.as_deref()).ok();
        record.source_workload.clone_from(&served);
        route(
            &state,
            served.as_deref(),
            &ctx.network,
            destination,
            &mut |bound| random.below(bound),
        )
    };
    let mut routed = route_now(record);
    if let (Ok(Route::Passthrough(_)), Some(demander)) = (&routed, &ctx.demander) {
        // Unknown here: ask the control plane, then route again.
        let name = format!("{}/{}", ctx.network, destination.ip());
        if demander.demand(&name, DEMAND_WAIT).await {
            routed = route_now(record);
        }
    }
    let link = match routed {
        Err(source) => Err(ConnectionError::Route {
            destination,
            source,
        }),
        Ok(Route::Passthrough(address)) => plain(ctx, address).await,
        Ok(Route::Mesh(upstream)) => {
            record.destination = Some(upstream.address);
            record.destination_workload = Some(upstream.workload.clone());
            record.destination_identity.clone_from(&upstream.identity);
            record.service.clone_from(&upstream.service);
            let same_node = ctx.same_node.as_ref();
            let local = same_node.and_then(|same| same.get(&upstream.workload.uid));
            if let (true, Some(to)) = (upstream.hbone, local) {
                // The same-node shortcut: no TLS, no HTTP/2, the
                // destination's checks all the same.
                match (
                    record.source_identity.clone(),
                    expected_identities(&upstream),
                ) {
                    (_, Err(error)) => Err(error),
                    (Some(identity), Ok(expected)) => {
                        local::connect(ctx, to, identity, &expected, source, upstream.address)
                            .await
                            .map(|link| Link::Local(Box::new(link)))
                    }
                    (None, Ok(_)) => Err(ConnectionError::Identity {
                        destination: upstream.address,
                        source: ctx
                            .identity_of(record.source_workload.as_deref())
                            .err()
                            .unwrap_or_else(|| {
                                IdentityError::UnknownWorkload(ctx.served_uid.clone())
                            }),
                    }),
                }
            } else if upstream.hbone {
                let served = record.source_workload.clone();
                open_hbone(ctx, &mut tcp, source, &upstream, served.as_ref())
                    .await
                    .map(|(stream, early)| Link::Hbone(stream, early))
            } else {
                plain(ctx, upstream.address).await
            }
        }
    };
    match link {
        Ok(link) => {
            recorder.opened(ctx.metrics.as_ref());
            Ok(Outbound {
                tcp,
                link,
                recorder,
            })
        }
        Err(error) => Err(NotForwarded {
            tcp,
            recorder,
            error,
        }),
    }
}

/// Whether `ip` reaches this proxy: a loopback or unspecified address, or
/// one of the served workload's.
fn is_local(ctx: &Context, ip: std::net::IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let state = ctx.state.read();
    state.workload(&ctx.served_uid).is_some_and(|served| {
        served
            .addresses
            .iter()
            .any(|address| mesh_api::names::ip_from_wire(address).is_ok_and(|a| a == ip))
    })
}

/// A plain TCP connection to `address`.
async fn plain(ctx: &Context, address: SocketAddr) -> Result<Link, ConnectionError> {
    socket::connect_in(&ctx.sockets, address, ctx.mark)
        .await
        .map(Link::Plain)
        .map_err(|source| ConnectionError::Connect {
            destination: address,
            source,
        })
}

/// Where an established connection's bytes go.
enum Link {
    /// A CONNECT stream over HBONE, and how many of the client's bytes went
    /// with the request.
    Hbone(HboneStream, u64),
    /// Plain TCP.
    Plain(TcpStream),
    /// The destination's application, let in by its instance on this node
    /// (the same-node shortcut). Boxed: it carries the destination's
    /// record, and every outbound connection's task holds a `Link`.
    Local(Box<LocalLink>),
}

/// An established outbound connection.
struct Outbound {
    tcp: TcpStream,
    link: Link,
    recorder: Recorder,
}

impl Established for Outbound {
    async fn carry(&mut self) -> Carried {
        let progress = Progress::default();
        let (error, early) = match &mut self.link {
            Link::Plain(upstream) => (
                copy_plain(&mut self.tcp, upstream, &progress)
                    .await
                    .err()
                    .map(ConnectionError::Transfer),
                0,
            ),
            Link::Hbone(stream, early) => (
                copy_bidirectional(&mut self.tcp, &mut stream.send, &mut stream.recv, &progress)
                    .await
                    .err()
                    .map(ConnectionError::Transfer),
                *early,
            ),
            Link::Local(local) => {
                let error = tokio::select! {
                    copied = copy_plain(&mut self.tcp, &mut local.upstream, &progress) => {
                        copied.err().map(ConnectionError::Transfer)
                    }
                    // The destination's policy now denies it.
                    () = local.registered.revoked.cancelled() => Some(ConnectionError::Revoked),
                    () = local.closed.cancelled() => Some(ConnectionError::Transfer(
                        std::io::Error::other("the destination's proxy instance stopped"),
                    )),
                };
                (error, 0)
            }
        };
        // The request flows from the client's connection.
        Carried {
            bytes: ByteCounts {
                request: early + progress.read(),
                response: progress.written(),
            },
            error,
        }
    }

    /// An error resets both ends.
    fn finish(self, outcome: &Carried) {
        if outcome.is_err() {
            match self.link {
                Link::Plain(upstream) => socket::reset(upstream),
                Link::Hbone(mut stream, _) => stream.send.send_reset(h2::Reason::CONNECT_ERROR),
                Link::Local(mut local) => {
                    local.finish(outcome.bytes, outcome.error.as_ref());
                    // Reset when dropped, as `socket::reset` does.
                    let _ = local.upstream.set_zero_linger();
                }
            }
            socket::reset(self.tcp);
        } else if let Link::Local(mut local) = self.link {
            // The destination's record: the same bytes, seen from its side.
            local.finish(outcome.bytes, None);
        }
        self.recorder.finish(outcome.bytes, outcome.error.as_ref());
    }
}

/// Who `upstream` may be: the workload's own identity, or any its service
/// vouches for; a destination without an identity cannot be reached in the
/// mesh.
fn expected_identities(upstream: &Upstream) -> Result<Vec<Identity>, ConnectionError> {
    let Some(identity) = upstream.identity.clone() else {
        return Err(ConnectionError::NoPeerIdentity {
            workload: upstream.workload.uid.clone(),
            destination: upstream.address,
        });
    };
    let mut expected = vec![identity];
    if let Some(service) = &upstream.service {
        expected.extend(service.subject_alt_names.iter().filter_map(|san| {
            Identity::parse_uri(san)
                .or_else(|_| Identity::from_principal(san))
                .ok()
        }));
    }
    Ok(expected)
}

/// Opens the CONNECT stream to `upstream` for the served workload (`served`,
/// as the state knows it), sending what the client (`tcp`) has already
/// written along with the request: the stream, and how many bytes went early.
async fn open_hbone(
    ctx: &Context,
    tcp: &mut TcpStream,
    source: SocketAddr,
    upstream: &Upstream,
    served: Option<&Arc<Workload>>,
) -> Result<(HboneStream, u64), ConnectionError> {
    let destination = upstream.address;
    let expected = expected_identities(upstream)?;
    let hbone = |source| ConnectionError::Hbone {
        destination,
        source,
    };
    let no_identity = |source| ConnectionError::Identity {
        destination,
        source,
    };
    let served_workload = served.map(Arc::as_ref);
    let identity = ctx.identity_of(served_workload).map_err(no_identity)?;
    let tls = ctx.tls_for(&identity).await.map_err(no_identity)?;
    let key = PoolKey {
        source: tls.identity().clone(),
        expected,
        address: SocketAddr::new(destination.ip(), ctx.hbone_port),
        source_ip: served_workload.and_then(first_ip),
    };
    let forwarded = HeaderValue::try_from(forwarded_for(source)).map_err(|err| {
        hbone(HboneError::Request {
            authority: destination.to_string(),
            problem: err.to_string(),
        })
    })?;
    let headers = [
        ("forwarded", forwarded),
        (
            "baggage",
            served.map_or_else(|| HeaderValue::from_static(""), |w| ctx.baggage.of(w)),
        ),
    ];
    let mut pending = ctx
        .pool
        .request(&tls, &key, destination, &headers)
        .await
        .map_err(hbone)?;
    let mut early = 0;
    if let Some(first) = ready_bytes(tcp)
        .await
        .map_err(|source| ConnectionError::Client {
            destination,
            source,
        })?
    {
        early = first.len() as u64;
        // A server that refuses at once may have closed the stream already:
        // then its answer, not this send's failure, says why.
        if let Err(failed) = pending.send_early(first) {
            let answer = pending.established().await.map_err(hbone)?;
            drop(answer);
            return Err(hbone(failed));
        }
    }
    let stream = pending.established().await.map_err(hbone)?;
    Ok((stream, early))
}
