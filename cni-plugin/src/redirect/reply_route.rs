//! The policy route that brings the application's replies back to the data
//! plane when it connected to the application with the client's address as
//! its own (a transparent socket, as ztunnel does by default): packets marked
//! [`RedirectSpec::reply_mark`] (the mangle rules restore it from the
//! connection's mark) are looked up in table [`RedirectSpec::reply_table`],
//! whose one route delivers everything locally (WIRE.md §6:
//! `ip rule add fwmark 0x111/0xfff lookup 100`,
//! `ip route add local 0.0.0.0/0 dev lo table 100`), for IPv4 and, where the
//! namespace has it, IPv6.
//!
//! Run with `ip` inside the namespace (call these inside `Netns::run`), one
//! process per family: a pod's ADD waits for them. Idempotent: the route is
//! replaced, the rule added unless there. The rule is told apart by its
//! priority (Istio's 32764) and its form (`fwmark ... lookup ...`); a rule
//! of another form there is left alone.

use std::path::Path;

use mesh_net::netns::Netns;

use super::program::Program;
use super::{MARK_MASK, RedirectError, RedirectSpec};

/// The rule's priority (Istio's).
const PRIORITY: &str = "32764";

/// The two families: `ip`'s flag and the "everything" prefix.
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

fn ip(backend: &'static str) -> Program<'static> {
    Program {
        backend,
        path: Path::new("ip"),
    }
}

/// The families to route: IPv4, and IPv6 unless it is left alone (`ipv6`
/// false) or off in the namespace (the calling thread's).
fn families(ipv6: bool) -> impl Iterator<Item = (&'static str, &'static str)> {
    let ipv6_on = ipv6
        && std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
            .is_ok_and(|disabled| disabled.trim() == "0");
    FAMILIES
        .into_iter()
        .filter(move |(family, _)| *family == "-4" || ipv6_on)
}

/// Our rules among `ip rule show pref 32764`'s lines: their mark and table.
fn our_rules(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                let at = words.iter().position(|word| *word == key)?;
                words.get(at + 1).map(|word| (*word).to_owned())
            };
            Some((after("fwmark")?, after("lookup")?))
        })
        .collect()
}

/// Installs the route, then the rule (`ipv6`: IPv6 too, where it is on):
/// one `ip -batch` per family. A rule already there answers "File exists",
/// which is fine (the kernel refuses a duplicate rule); a rule of ours left
/// by an earlier spec (another mark or table) stays until [`remove`].
pub(super) fn apply(
    backend: &'static str,
    netns: &Netns,
    spec: &RedirectSpec,
    ipv6: bool,
) -> Result<(), RedirectError> {
    let ip = ip(backend);
    let table = spec.reply_table;
    let mark = format!("{:#x}/{MARK_MASK:#x}", spec.reply_mark);
    let one = |family: &str, everything: &str| {
        let script = format!(
            "route replace local {everything} dev lo table {table}\n\
             rule add fwmark {mark} pref {PRIORITY} lookup {table}\n"
        );
        let ran = ip.run(netns, &[family, "-force", "-batch", "-"], Some(&script))?;
        if ran.success() || only_already_there(&ran.stderr()) {
            Ok(())
        } else {
            Err(ran.failed())
        }
    };
    // The families at once, each on its own thread (inside the namespace).
    std::thread::scope(|scope| {
        let running: Vec<_> = families(ipv6)
            .map(|(family, everything)| scope.spawn(move || one(family, everything)))
            .collect();
        running.into_iter().try_for_each(|thread| {
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// Runs [`apply`] and `rules` at the same time (the route's `ip`
/// processes beside the firewall's): both errors are reported, the rules'
/// first. Called on a thread inside the namespace: the threads it starts
/// begin there too.
pub(super) fn alongside(
    backend: &'static str,
    netns: &Netns,
    spec: &RedirectSpec,
    ipv6: bool,
    rules: impl FnOnce() -> Result<(), RedirectError> + Send,
) -> Result<(), RedirectError> {
    std::thread::scope(|scope| {
        let route = scope.spawn(|| apply(backend, netns, spec, ipv6));
        let rules = rules();
        let route = route
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        rules.and(route)
    })
}

/// Whether every failure `ip -batch` reported is a rule already there.
fn only_already_there(stderr: &str) -> bool {
    let mut failed = 0;
    let mut existed = 0;
    for line in stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        if line == "RTNETLINK answers: File exists" {
            existed += 1;
        } else if line.starts_with("Command failed") {
            failed += 1;
        } else {
            return false;
        }
    }
    existed == failed
}

/// Removes our rules and the routes of the tables they named (absent is
/// fine).
pub(super) fn remove(
    backend: &'static str,
    netns: &Netns,
    ipv6: bool,
) -> Result<(), RedirectError> {
    let ip = ip(backend);
    for (family, _) in families(ipv6) {
        let listing = ip.run_ok(netns, &[family, "rule", "show", "pref", PRIORITY], None)?;
        for (mark, table) in our_rules(&listing) {
            ip.run_ok(
                netns,
                &[
                    family, "rule", "del", "pref", PRIORITY, "fwmark", &mark, "lookup", &table,
                ],
                None,
            )?;
            let flushed = ip.run(netns, &[family, "route", "flush", "table", &table], None)?;
            if !flushed.success() && !flushed.stderr().contains("FIB table does not exist") {
                return Err(flushed.failed());
            }
        }
    }
    Ok(())
}

/// Whether our IPv4 rule is there.
pub(super) fn is_applied(backend: &'static str, netns: &Netns) -> Result<bool, RedirectError> {
    let listing = ip(backend).run_ok(netns, &["-4", "rule", "show", "pref", PRIORITY], None)?;
    Ok(!our_rules(&listing).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_rules_are_read_by_their_words() {
        let listing = "32764:\tfrom all fwmark 0x111/0xfff lookup 100\n\
                       32764:\tfrom all fwmark 0x111/0xfff lookup 1000\n\
                       32764:\tfrom 10.0.0.0/8 lookup main\n";
        assert_eq!(
            our_rules(listing),
            vec![
                ("0x111/0xfff".to_owned(), "100".to_owned()),
                ("0x111/0xfff".to_owned(), "1000".to_owned()),
            ]
        );
        assert!(our_rules("").is_empty());
    }

    #[test]
    fn only_a_rule_already_there_is_fine() {
        assert!(only_already_there(
            "RTNETLINK answers: File exists\nCommand failed -:2\n"
        ));
        assert!(only_already_there(""));
        assert!(!only_already_there(
            "Error: Nexthop device is not up.\nCommand failed -:1\n"
        ));
    }
}
