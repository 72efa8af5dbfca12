//! In-pod redirection: the rules, inside a pod's network namespace, that
//! send the pod's TCP to the data plane (WIRE.md §6), behind one trait
//! ([`Redirection`]) with two backends: [`Nftables`] (the default: one
//! `inet` table) and [`IptablesRestore`] (hosts without `nft`: chains in the
//! `nat` tables of `iptables` and `ip6tables`).
//!
//! The rules, for IPv4 and IPv6, with the ports and mark of a
//! [`RedirectSpec`] (defaults shown):
//!
//! - inbound (`nat` prerouting, priority `dstnat`): from `lo` → leave it;
//!   from the kubelet's probe address (169.254.7.127, SNATed on the host;
//!   IPv4 only) → leave it; TCP to HBONE (15008) → leave it; other TCP →
//!   redirect to the inbound plaintext port (15006);
//! - outbound (`nat` output, priority -100): sockets marked 0x539 (1337,
//!   compared under the mask 0xfff, as Istio does) → leave them; UDP and TCP
//!   to port 53 → redirect to the DNS port (15053), before the loopback
//!   exception so a resolver on 127.0.0.x is captured too (unless DNS
//!   capture is off); TCP to 127.0.0.0/8 or ::1 → leave it; other TCP →
//!   redirect to the outbound port (15001).
//!
//! - replies (`mangle`): a connection the data plane opens from its marked
//!   socket inside the pod (it arrives through `lo`) gets the connection
//!   mark 0x111; the application's packets on it carry that mark again, and
//!   a policy route (`ip rule fwmark 0x111/0xfff lookup 100`, `ip route add
//!   local 0.0.0.0/0 dev lo table 100`, and IPv6's) delivers them locally.
//!   This matters to a data plane that connects to the application with the
//!   client's address as its own (ztunnel's default); podless's own does
//!   not, and is indifferent to it.
//!
//! Inbound traffic is redirected with `REDIRECT`, not with Istio's
//! `TPROXY`: the data plane reads the original destination with
//! `SO_ORIGINAL_DST` on both sides (ztunnel does too).
//!
//! The backends run their programs (`nft`, `iptables-restore`, ...) inside
//! the namespace with [`Netns::run`]: they block, and async callers use
//! `spawn_blocking`. The host's own rules are never read nor touched.

mod iptables;
mod nftables;
mod program;
mod reply_route;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_net::netns::Netns;
use serde::{Deserialize, Serialize};

pub use iptables::IptablesRestore;
pub use nftables::Nftables;

/// The mask under which a socket's mark is compared with
/// [`RedirectSpec::mark`] (Istio's 0xfff).
pub const MARK_MASK: u32 = 0xfff;

/// What the rules redirect where: the data plane's ports inside the pod,
/// the mark of its own sockets and the kubelet's probe address. Plain data;
/// [`Default`] is Istio's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectSpec {
    /// Where the pod's outbound TCP goes (15001).
    pub outbound_port: u16,
    /// Where TCP into the pod goes, HBONE aside (15006).
    pub inbound_plaintext_port: u16,
    /// HBONE, which reaches the pod's data plane unredirected (15008).
    pub hbone_port: u16,
    /// Where the pod's DNS (UDP and TCP to port 53) goes (15053); `None`
    /// (`dnsPort: null`) leaves DNS alone.
    pub dns_port: Option<u16>,
    /// The mark of the data plane's own sockets, which pass unredirected
    /// (0x539 = 1337, compared under [`MARK_MASK`]: it must fit in it).
    pub mark: u32,
    /// The address the host SNATs the kubelet's probes to (169.254.7.127),
    /// whose connections into the pod are not redirected; `None` redirects
    /// them too.
    pub probe_source: Option<Ipv4Addr>,
    /// The connection mark (0x111, under [`MARK_MASK`]) given to
    /// connections the data plane opens from its marked sockets inside the
    /// pod, and restored onto the application's replies, so replies to a
    /// data plane that spoofed the client's address (ztunnel's default)
    /// come back to it.
    pub reply_mark: u32,
    /// The routing table those replies are looked up in (100), holding one
    /// local route.
    pub reply_table: u32,
}

impl Default for RedirectSpec {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            dns_port: Some(15053),
            mark: mesh_net::PROXY_MARK,
            probe_source: Some(Ipv4Addr::new(169, 254, 7, 127)),
            reply_mark: 0x111,
            reply_table: 100,
        }
    }
}

impl RedirectSpec {
    /// Checks what the rules could not express: every port non-zero, the
    /// mark non-zero and within [`MARK_MASK`].
    pub fn validate(&self) -> Result<(), RedirectError> {
        let ports = [
            ("outboundPort", Some(self.outbound_port)),
            ("inboundPlaintextPort", Some(self.inbound_plaintext_port)),
            ("hbonePort", Some(self.hbone_port)),
            ("dnsPort", self.dns_port),
        ];
        if let Some((field, _)) = ports.iter().find(|(_, port)| *port == Some(0)) {
            return Err(RedirectError::InvalidSpec {
                reason: format!("{field} is 0"),
            });
        }
        for (field, mark) in [("mark", self.mark), ("replyMark", self.reply_mark)] {
            if mark == 0 || mark & !MARK_MASK != 0 {
                return Err(RedirectError::InvalidSpec {
                    reason: format!(
                        "{field} {mark:#x} is not a non-zero value within the mask {MARK_MASK:#x}"
                    ),
                });
            }
        }
        if self.mark == self.reply_mark {
            return Err(RedirectError::InvalidSpec {
                reason: format!("mark and replyMark are both {:#x}", self.mark),
            });
        }
        // 0 is unspecified; 253 to 255 are the kernel's default, main and
        // local tables.
        if self.reply_table == 0 || (253..=255).contains(&self.reply_table) {
            return Err(RedirectError::InvalidSpec {
                reason: format!("replyTable {} is one of the kernel's", self.reply_table),
            });
        }
        Ok(())
    }
}

/// Installs, replaces and removes the redirect rules inside a pod's network
/// namespace. Every call blocks (it runs programs inside the namespace).
pub trait Redirection: Send + Sync + fmt::Debug + 'static {
    /// The backend's name, for messages (`nftables`, `iptables`).
    fn name(&self) -> &'static str;

    /// Installs the rules of `spec` in `netns`, replacing whatever of ours
    /// is there (applying twice leaves one copy; a different spec replaces
    /// the old one). Atomic: one transaction (one per address family with
    /// iptables), which a failure leaves uninstalled. The spec is validated
    /// first ([`RedirectSpec::validate`]).
    fn apply(&self, netns: &Netns, spec: &RedirectSpec) -> Result<(), RedirectError>;

    /// Removes our rules from `netns`; rules that are absent are fine.
    fn remove(&self, netns: &Netns) -> Result<(), RedirectError>;

    /// Whether our rules are installed in `netns`.
    fn is_applied(&self, netns: &Netns) -> Result<bool, RedirectError>;
}

/// Which [`Redirection`] a node uses: configuration (`nftables`, the
/// default, or `iptables`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RedirectBackend {
    /// [`Nftables`], with `nft` from `PATH`.
    #[default]
    Nftables,
    /// [`IptablesRestore`], with `iptables-restore`, `ip6tables-restore`
    /// and their `-save` programs from `PATH`.
    Iptables,
}

impl RedirectBackend {
    /// The backend, with its programs from `PATH` (build one of the types
    /// yourself for other paths).
    pub fn build(self) -> Arc<dyn Redirection> {
        match self {
            Self::Nftables => Arc::new(Nftables::new()),
            Self::Iptables => Arc::new(IptablesRestore::new()),
        }
    }
}

/// Why redirect rules could not be installed, removed or read: each names
/// the backend and the namespace, and, for a program, what was run and what
/// it said.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedirectError {
    /// The spec cannot be expressed as rules.
    #[error("invalid redirect spec: {reason}")]
    InvalidSpec {
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A program the backend needs is not there.
    #[error(
        "{backend} in {netns}: program `{}` not found (install it, or configure its path)",
        program.display()
    )]
    ProgramNotFound {
        /// The backend (`nftables`, `iptables`).
        backend: &'static str,
        /// The namespace's description.
        netns: String,
        /// The program as configured.
        program: PathBuf,
    },
    /// A program could not be started or talked to.
    #[error("{backend} in {netns}: cannot run `{command}`: {source}")]
    Spawn {
        /// The backend (`nftables`, `iptables`).
        backend: &'static str,
        /// The namespace's description.
        netns: String,
        /// The command line.
        command: String,
        /// The error.
        source: std::io::Error,
    },
    /// A program failed.
    #[error("{backend} in {netns}: `{command}` failed ({status}): {stderr}")]
    Failed {
        /// The backend (`nftables`, `iptables`).
        backend: &'static str,
        /// The namespace's description.
        netns: String,
        /// The command line.
        command: String,
        /// How it ended (`exit status: 1`).
        status: String,
        /// What it wrote on stderr, trimmed.
        stderr: String,
    },
    /// The namespace could not be entered.
    #[error("{backend}: {source}")]
    Namespace {
        /// The backend (`nftables`, `iptables`).
        backend: &'static str,
        /// The error, naming the namespace.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_istios_and_valid() {
        let spec = RedirectSpec::default();
        assert_eq!(
            (
                spec.outbound_port,
                spec.inbound_plaintext_port,
                spec.hbone_port
            ),
            (15001, 15006, 15008)
        );
        assert_eq!(spec.dns_port, Some(15053));
        assert_eq!(spec.mark, 0x539);
        assert_eq!(spec.probe_source, Some(Ipv4Addr::new(169, 254, 7, 127)));
        spec.validate().expect("valid");
    }

    #[test]
    fn what_rules_cannot_express_is_refused_by_field() {
        let zero_dns = RedirectSpec {
            dns_port: Some(0),
            ..RedirectSpec::default()
        };
        let err = zero_dns.validate().expect_err("port 0").to_string();
        assert_eq!(err, "invalid redirect spec: dnsPort is 0");
        for mark in [0, 0x1000, 0x1539] {
            let spec = RedirectSpec {
                mark,
                ..RedirectSpec::default()
            };
            let err = spec.validate().expect_err("mark").to_string();
            assert!(err.contains("within the mask 0xfff"), "{err}");
        }
    }

    #[test]
    fn specs_and_backends_read_as_config() {
        let spec: RedirectSpec =
            serde_json::from_str(r#"{"outboundPort": 16001, "dnsPort": null}"#).expect("parse");
        assert_eq!(
            spec,
            RedirectSpec {
                outbound_port: 16001,
                dns_port: None,
                ..RedirectSpec::default()
            }
        );
        let err = serde_json::from_str::<RedirectSpec>(r#"{"outbound": 1}"#).expect_err("unknown");
        assert!(
            err.to_string().contains("unknown field `outbound`"),
            "{err}"
        );
        let probe: RedirectSpec =
            serde_json::from_str(r#"{"probeSource": "169.254.7.1"}"#).expect("parse");
        assert_eq!(probe.probe_source, Some(Ipv4Addr::new(169, 254, 7, 1)));

        let backend: RedirectBackend = serde_json::from_str(r#""iptables""#).expect("parse");
        assert_eq!(backend, RedirectBackend::Iptables);
        assert_eq!(backend.build().name(), "iptables");
        assert_eq!(RedirectBackend::default().build().name(), "nftables");
        assert_eq!(
            serde_json::to_string(&RedirectBackend::Nftables).expect("write"),
            r#""nftables""#
        );
    }
}
