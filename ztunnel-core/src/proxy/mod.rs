//! The proxy instance: one served workload, its listeners (outbound 15001,
//! plaintext inbound 15006, HBONE 15008, SOCKS5, admin), where connections go
//! and what policy lets through, and its lifecycle.
//!
//! An instance serves one workload ("dedicated" mode: a VM, a nodeless
//! instance, a single-workload host, or a pod's own network namespace). Every
//! per-workload fact (the served uid, its certificate, its listeners, its live
//! connections) lives in the instance, so a node agent runs one instance per
//! pod, each with listeners opened inside that pod's namespace, sharing the
//! state, the certificate manager and the runtime.
//!
//! The instance binds nothing: the caller binds its listeners (inside the
//! right network namespace, on the addresses it wants), preferably with
//! [`listen_with_nodelay`], and hands them over in [`Listeners`].
//! The [`ZtunnelHandle`] it returns has the verbs of
//! [`mesh_net::lifecycle`]: addresses, `ready`, `drain`, `shutdown`, `join`.
//!
//! ```no_run
//! # async fn example(state: ztunnel_core::SharedState, certs: ztunnel_core::CertManager) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ztunnel_core::net::socket::listen_with_nodelay;
//! use ztunnel_core::{Listeners, Ztunnel};
//!
//! let listeners = Listeners {
//!     outbound: listen_with_nodelay("0.0.0.0:15001".parse()?)?,
//!     inbound_plaintext: listen_with_nodelay("0.0.0.0:15006".parse()?)?,
//!     hbone: listen_with_nodelay("0.0.0.0:15008".parse()?)?,
//!     socks5: None,
//! };
//! let handle = Ztunnel::builder()
//!     .state(state)
//!     .certificates(certs)
//!     .workload_uid("Kubernetes//Pod/default/shell")
//!     .build()?
//!     .spawn(listeners)?;
//! handle.ready(Duration::from_secs(30)).await?;
//! // ... later: let open connections finish for up to 5 s.
//! let drained = handle.drain(Duration::from_secs(5)).await;
//! handle.join().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout, as a connection flows
//!
//! - `builder`: [`ZtunnelBuilder`] and [`Listeners`]; starting an instance.
//! - `context`: what the connections of an instance share.
//! - `accept`: the accept loops, and a connection's two stages (set up,
//!   then carry bytes).
//! - `outbound`: the outbound and SOCKS5 listeners ([`socks5`]: the
//!   protocol), [`route`] (VIP load balancing), then HBONE through
//!   [`crate::hbone::pool`] or plain TCP.
//! - `inbound`: CONNECT streams from [`crate::hbone::server`], checked by
//!   [`authorize`] and connected to the application; `plaintext`: the same
//!   for callers outside the mesh.
//! - [`ConnectionError`]: why a connection failed, recorded with its
//!   [`crate::telemetry::ConnectionRecord`].
//! - `handle`: [`ZtunnelHandle`] and the supervision of the instance's
//!   tasks; [`admin`]: its admin endpoints.

mod accept;
pub mod admin;
pub mod authorize;
mod baggage;
mod builder;
mod context;
mod error;
mod handle;
mod inbound;
mod local;
mod outbound;
mod plaintext;
pub mod route;
pub mod socks5;

pub use baggage::baggage;
pub use builder::{BuildError, Listeners, Ztunnel, ZtunnelBuilder, ZtunnelConfig};
pub use context::IdentityError;
pub use error::ConnectionError;
pub use handle::{ServeError, ZtunnelHandle};
pub use local::SameNode;

#[cfg(doc)]
use crate::net::socket::listen_with_nodelay;

/// The conventional outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// The conventional plaintext inbound port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
