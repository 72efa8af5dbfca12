//! The one shape of every long-running component's handle (xDS server, CA
//! server, the control plane, DNS proxy, proxy instance, xDS client,
//! certificate manager, and those to come). A component is built (builder or
//! `Config`, validated, nothing bound or spawned), started on sockets the
//! caller bound, and returns a handle with these verbs, which mean the same
//! everywhere:
//!
//! | verb | meaning |
//! |---|---|
//! | `local_addr()` (or `<listener>_addr()`) | what it serves on |
//! | `ready(wait).await` | `Ok` once it can do its job; after `wait`, `Err` saying why not (unauthenticated, not synced, no certificate, ...) |
//! | `drain(deadline).await` | stop taking new work, let work in progress finish for up to `deadline`, close what is left: [`Drained`] says which |
//! | `shutdown()` | stop now, closing everything; idempotent, returns at once |
//! | `join().await` | wait until it has stopped (after `drain` or `shutdown`, or a fatal error), with that error; never stops it |
//!
//! `drain` and `shutdown` take `&self`, so one handle can be told to stop
//! from one place and joined from another; `join` takes the handle.

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Drained {
    /// All work in progress finished on its own before the deadline.
    Complete,
    /// The deadline passed: `left` pieces of work (connections, streams,
    /// calls) were still open, and were closed.
    TimedOut {
        /// How many were closed.
        left: usize,
    },
}

impl Drained {
    /// Whether everything finished on its own.
    pub fn is_complete(self) -> bool {
        self == Self::Complete
    }
}

impl std::fmt::Display for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Complete => f.write_str("drained: all work finished"),
            Self::TimedOut { left } => write!(f, "drain timed out: {left} closed"),
        }
    }
}
