//! The policy route that brings the application's replies back to the data
//! plane when it connected to the application with the client's address as
//! its own (a transparent socket, as ztunnel does by default): packets marked
//! [`RedirectSpec::reply_mark`] (the mangle rules restore it from the
//! connection's mark) are looked up in table [`RedirectSpec::reply_table`],
//! whose one route delivers everything locally (WIRE.md §6:
//! `ip rule add fwmark 0x111/0xfff lookup 100`,
//! `ip route add local 0.0.0.0/0 dev lo table 100`), for IPv4 and IPv6.
//!
//! Run with `ip` inside the namespace (call these inside `Netns::run`).
//! Idempotent: the rule is added only where missing, the route replaced.

use std::path::Path;

use mesh_net::netns::Netns;

use super::program::Program;
use super::{MARK_MASK, RedirectError, RedirectSpec};

/// The rule's priority (Istio's), which also identifies it.
const PRIORITY: &str = "32764";

/// The two families: `ip`'s flag and the "everything" prefix.
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

fn ip(backend: &'static str) -> Program<'static> {
    Program {
        backend,
        path: Path::new("ip"),
    }
}

/// Whether IPv6 is off in the namespace (then only IPv4 is routed).
fn no_ipv6(stderr: &str) -> bool {
    stderr.contains("Address family not supported")
}

/// Installs the rule and the route.
pub(super) fn apply(
    backend: &'static str,
    netns: &Netns,
    spec: &RedirectSpec,
) -> Result<(), RedirectError> {
    let ip = ip(backend);
    let table = spec.reply_table.to_string();
    let mark = format!("{:#x}/{MARK_MASK:#x}", spec.reply_mark);
    for (family, everything) in FAMILIES {
        let rules = ip.run(netns, &[family, "rule", "show", "pref", PRIORITY], None)?;
        if !rules.success() && family == "-6" && no_ipv6(&rules.stderr()) {
            continue;
        }
        let rules = rules.ok()?;
        let wanted = format!("fwmark {mark} lookup {table}");
        if !rules.contains(&wanted) {
            if !rules.trim().is_empty() {
                // Ours, from a spec with another mark or table.
                ip.run_ok(netns, &[family, "rule", "del", "pref", PRIORITY], None)?;
            }
            ip.run_ok(
                netns,
                &[
                    family, "rule", "add", "fwmark", &mark, "pref", PRIORITY, "lookup", &table,
                ],
                None,
            )?;
        }
        ip.run_ok(
            netns,
            &[
                family, "route", "replace", "local", everything, "dev", "lo", "table", &table,
            ],
            None,
        )?;
    }
    Ok(())
}

/// Removes the rule and the routes of the table it named (absent is fine).
pub(super) fn remove(backend: &'static str, netns: &Netns) -> Result<(), RedirectError> {
    let ip = ip(backend);
    for (family, _) in FAMILIES {
        let rules = ip.run(netns, &[family, "rule", "show", "pref", PRIORITY], None)?;
        if !rules.success() && family == "-6" && no_ipv6(&rules.stderr()) {
            continue;
        }
        let rules = rules.ok()?;
        if rules.trim().is_empty() {
            continue;
        }
        ip.run_ok(netns, &[family, "rule", "del", "pref", PRIORITY], None)?;
        let table = rules
            .split_whitespace()
            .skip_while(|word| *word != "lookup")
            .nth(1)
            .map(str::to_owned);
        if let Some(table) = table {
            let flushed = ip.run(netns, &[family, "route", "flush", "table", &table], None)?;
            if !flushed.success() && !flushed.stderr().contains("FIB table does not exist") {
                return Err(flushed.failed());
            }
        }
    }
    Ok(())
}

/// Whether the IPv4 rule is there.
pub(super) fn is_applied(backend: &'static str, netns: &Netns) -> Result<bool, RedirectError> {
    let rules = ip(backend).run_ok(netns, &["-4", "rule", "show", "pref", PRIORITY], None)?;
    Ok(!rules.trim().is_empty())
}
