//! The iptables backend, for hosts without `nft`: two chains of ours in the
//! `nat` table ([`IptablesRestore::PREROUTING_CHAIN`],
//! [`IptablesRestore::OUTPUT_CHAIN`]) and the jumps to them from
//! `PREROUTING` and `OUTPUT`, for IPv4 (`iptables-restore`) and IPv6
//! (`ip6tables-restore`), each family in one `--noflush` transaction. Works
//! with either iptables flavour (nf_tables or legacy).

use std::fmt::Write as _;
use std::path::PathBuf;

use mesh_net::netns::Netns;

use super::program::{Program, in_netns};
use super::{MARK_MASK, RedirectError, RedirectSpec, Redirection, reply_route};

/// The backend's name in errors.
const NAME: &str = "iptables";

/// How long a restore waits for the xtables lock that legacy iptables
/// takes (the nf_tables flavour ignores it).
const WAIT: &str = "--wait=10";

/// The [`Redirection`] through `iptables-restore` and `ip6tables-restore`.
///
/// Applying reads the family's `nat` table (`iptables-save -t nat`), then
/// restores with `--noflush`: our chains declared (which creates or empties
/// them), their rules, and the jumps from `PREROUTING` and `OUTPUT` added
/// only where missing (extra copies deleted). Removing deletes the jumps and
/// the chains that are there. The read and the restore are two steps: calls
/// on one namespace must not run concurrently (the node agent handles a pod
/// at a time). Each family is one transaction; when IPv6 fails after IPv4
/// succeeded, IPv4 keeps the new rules and the error says which failed.
/// What iptables creates on first use (the `nat` table and its built-in
/// chains, empty, policy `ACCEPT`) stays after removal.
#[derive(Clone, Debug)]
pub struct IptablesRestore {
    /// IPv4's programs.
    ipv4: Family,
    /// IPv6's programs, unless IPv6 is left alone.
    ipv6: Option<Family>,
}

/// The programs of one address family.
#[derive(Clone, Debug)]
struct Family {
    /// `iptables-restore` or `ip6tables-restore`.
    restore: PathBuf,
    /// `iptables-save` or `ip6tables-save`.
    save: PathBuf,
    /// Whether it is IPv6.
    ipv6: bool,
}

impl IptablesRestore {
    /// Our chain in the `nat` table that `PREROUTING` jumps to.
    pub const PREROUTING_CHAIN: &'static str = "PODLESS_PREROUTING";
    /// Our chain in the `nat` table that `OUTPUT` jumps to.
    pub const OUTPUT_CHAIN: &'static str = "PODLESS_OUTPUT";
    /// Our chain in the `mangle` table that `PREROUTING` jumps to.
    pub const MARK_PREROUTING_CHAIN: &'static str = "PODLESS_MARK_PREROUTING";
    /// Our chain in the `mangle` table that `OUTPUT` jumps to.
    pub const MARK_OUTPUT_CHAIN: &'static str = "PODLESS_MARK_OUTPUT";

    /// With `iptables-restore`, `iptables-save`, `ip6tables-restore` and
    /// `ip6tables-save` from `PATH`.
    pub fn new() -> Self {
        Self {
            ipv4: Family {
                restore: "iptables-restore".into(),
                save: "iptables-save".into(),
                ipv6: false,
            },
            ipv6: Some(Family {
                restore: "ip6tables-restore".into(),
                save: "ip6tables-save".into(),
                ipv6: true,
            }),
        }
    }

    /// With IPv4's programs at `restore` and `save` (e.g.
    /// `iptables-legacy-restore` and `iptables-legacy-save`).
    #[must_use]
    pub fn ipv4_programs(mut self, restore: impl Into<PathBuf>, save: impl Into<PathBuf>) -> Self {
        self.ipv4.restore = restore.into();
        self.ipv4.save = save.into();
        self
    }

    /// With IPv6's programs at `restore` and `save` (this also undoes
    /// [`IptablesRestore::without_ipv6`]).
    #[must_use]
    pub fn ipv6_programs(mut self, restore: impl Into<PathBuf>, save: impl Into<PathBuf>) -> Self {
        self.ipv6 = Some(Family {
            restore: restore.into(),
            save: save.into(),
            ipv6: true,
        });
        self
    }

    /// IPv4 only, for hosts without IPv6: `ip6tables` is never run.
    #[must_use]
    pub fn without_ipv6(mut self) -> Self {
        self.ipv6 = None;
        self
    }

    /// The rules of our two chains for `spec`, as `iptables-restore` reads
    /// them (`-A` lines), for IPv4 or IPv6. IPv6 has no probe rule (the
    /// probe address is IPv4).
    pub fn rules(spec: &RedirectSpec, ipv6: bool) -> String {
        let (pre, out) = (Self::PREROUTING_CHAIN, Self::OUTPUT_CHAIN);
        let mut rules = format!("-A {pre} -i lo -j RETURN\n");
        if let (Some(probe), false) = (spec.probe_source, ipv6) {
            let _ = writeln!(rules, "-A {pre} -s {probe}/32 -j RETURN");
        }
        let _ = writeln!(
            rules,
            "-A {pre} -p tcp -m tcp --dport {} -j RETURN",
            spec.hbone_port
        );
        let _ = writeln!(
            rules,
            "-A {pre} -p tcp -j REDIRECT --to-ports {}",
            spec.inbound_plaintext_port
        );
        let _ = writeln!(
            rules,
            "-A {out} -m mark --mark {:#x}/{MARK_MASK:#x} -j RETURN",
            spec.mark
        );
        if let Some(dns) = spec.dns_port {
            let _ = writeln!(
                rules,
                "-A {out} -p udp -m udp --dport 53 -j REDIRECT --to-ports {dns}"
            );
            let _ = writeln!(
                rules,
                "-A {out} -p tcp -m tcp --dport 53 -j REDIRECT --to-ports {dns}"
            );
        }
        let loopback = if ipv6 { "::1/128" } else { "127.0.0.0/8" };
        let _ = writeln!(rules, "-A {out} -d {loopback} -p tcp -j RETURN");
        let _ = writeln!(
            rules,
            "-A {out} -p tcp -j REDIRECT --to-ports {}",
            spec.outbound_port
        );
        rules
    }

    /// The rules of our two `mangle` chains for `spec`: a connection the
    /// data plane opened from its own marked socket (arriving through `lo`)
    /// is connmarked, and the application's replies on it carry that mark,
    /// which routes them back to the data plane (table
    /// [`RedirectSpec::reply_table`]) even when it spoofed the client's
    /// address.
    pub fn mark_rules(spec: &RedirectSpec) -> String {
        format!(
            "-A {pre} -m mark --mark {mark:#x}/{MARK_MASK:#x} -j CONNMARK --set-xmark {reply:#x}/{MARK_MASK:#x}\n\
             -A {out} -m connmark --mark {reply:#x}/{MARK_MASK:#x} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n",
            pre = Self::MARK_PREROUTING_CHAIN,
            out = Self::MARK_OUTPUT_CHAIN,
            mark = spec.mark,
            reply = spec.reply_mark,
        )
    }

    /// The families we manage, IPv4 first.
    fn families(&self) -> impl Iterator<Item = &Family> {
        std::iter::once(&self.ipv4).chain(self.ipv6.as_ref())
    }
}

impl Default for IptablesRestore {
    fn default() -> Self {
        Self::new()
    }
}

impl Family {
    fn save(&self) -> Program<'_> {
        Program {
            backend: NAME,
            path: &self.save,
        }
    }

    fn restore(&self) -> Program<'_> {
        Program {
            backend: NAME,
            path: &self.restore,
        }
    }

    /// What of ours the family's table of `chains` holds now.
    fn read(&self, netns: &Netns, chains: &Chains) -> Result<Installed, RedirectError> {
        let saved = self.save().run_ok(netns, &["-t", chains.table], None)?;
        Ok(Installed::parse(&saved, chains))
    }

    /// Restores `input` with `--noflush`.
    fn restore_input(&self, netns: &Netns, input: &str) -> Result<(), RedirectError> {
        self.restore()
            .run_ok(netns, &["--noflush", WAIT], Some(input))
            .map(drop)
    }
}

/// Our two chains in one table, and the built-in chains that jump to them.
#[derive(Debug)]
struct Chains {
    /// The table (`nat`, `mangle`).
    table: &'static str,
    /// Ours, jumped to from `PREROUTING`.
    prerouting: &'static str,
    /// Ours, jumped to from `OUTPUT`.
    output: &'static str,
}

/// The redirection: `nat`.
const NAT: Chains = Chains {
    table: "nat",
    prerouting: IptablesRestore::PREROUTING_CHAIN,
    output: IptablesRestore::OUTPUT_CHAIN,
};

/// The reply routing of transparent connections: `mangle`.
const MANGLE: Chains = Chains {
    table: "mangle",
    prerouting: IptablesRestore::MARK_PREROUTING_CHAIN,
    output: IptablesRestore::MARK_OUTPUT_CHAIN,
};

/// The jumps to our chains and the chains, as found in `iptables-save -t
/// <table>`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Installed {
    /// `-A PREROUTING -j PODLESS_PREROUTING` lines.
    prerouting_jumps: usize,
    /// `-A OUTPUT -j PODLESS_OUTPUT` lines.
    output_jumps: usize,
    /// Whether our prerouting chain exists.
    prerouting_chain: bool,
    /// Whether our output chain exists.
    output_chain: bool,
}

impl Chains {
    /// The rule in `PREROUTING` that jumps to our chain.
    fn prerouting_jump(&self) -> String {
        format!("PREROUTING -j {}", self.prerouting)
    }

    /// The rule in `OUTPUT` that jumps to our chain.
    fn output_jump(&self) -> String {
        format!("OUTPUT -j {}", self.output)
    }

    /// Our chains' declarations (with `--noflush`, a declared chain is
    /// created or emptied).
    fn declarations(&self) -> String {
        format!(":{} - [0:0]\n:{} - [0:0]\n", self.prerouting, self.output)
    }
}

impl Installed {
    fn parse(saved: &str, chains: &Chains) -> Self {
        let (prerouting_jump, output_jump) = (
            format!("-A {}", chains.prerouting_jump()),
            format!("-A {}", chains.output_jump()),
        );
        let prerouting_chain = format!(":{} ", chains.prerouting);
        let output_chain = format!(":{} ", chains.output);
        let mut installed = Self::default();
        for line in saved.lines().map(str::trim_end) {
            if line == prerouting_jump {
                installed.prerouting_jumps += 1;
            } else if line == output_jump {
                installed.output_jumps += 1;
            } else if line.starts_with(&prerouting_chain) {
                installed.prerouting_chain = true;
            } else if line.starts_with(&output_chain) {
                installed.output_chain = true;
            }
        }
        installed
    }

    /// Whether everything of ours is there.
    fn complete(&self) -> bool {
        self.prerouting_chain
            && self.output_chain
            && self.prerouting_jumps > 0
            && self.output_jumps > 0
    }

    /// Whether anything of ours is there.
    fn any(&self) -> bool {
        *self != Self::default()
    }

    /// The restore input that installs `rules` (of [`IptablesRestore::rules`])
    /// over what is there: one jump to each chain in the end.
    fn apply_input(&self, chains: &Chains, rules: &str) -> String {
        let mut input = format!("*{}\n{}", chains.table, chains.declarations());
        input.push_str(rules);
        for (jumps, jump) in [
            (self.prerouting_jumps, chains.prerouting_jump()),
            (self.output_jumps, chains.output_jump()),
        ] {
            if jumps == 0 {
                let _ = writeln!(input, "-A {jump}");
            }
            for _ in 1..jumps {
                let _ = writeln!(input, "-D {jump}");
            }
        }
        input.push_str("COMMIT\n");
        input
    }

    /// The restore input that removes the jumps and our chains.
    fn remove_input(&self, chains: &Chains) -> String {
        let mut input = format!("*{}\n", chains.table);
        for (jumps, jump) in [
            (self.prerouting_jumps, chains.prerouting_jump()),
            (self.output_jumps, chains.output_jump()),
        ] {
            for _ in 0..jumps {
                let _ = writeln!(input, "-D {jump}");
            }
        }
        // Declared (created or emptied), then deleted: absent or not before.
        input.push_str(&chains.declarations());
        for chain in [chains.prerouting, chains.output] {
            let _ = writeln!(input, "-X {chain}");
        }
        input.push_str("COMMIT\n");
        input
    }
}

impl Redirection for IptablesRestore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply(&self, netns: &Netns, spec: &RedirectSpec) -> Result<(), RedirectError> {
        spec.validate()?;
        in_netns(NAME, netns, || {
            // The route and the rules at once (a pod's ADD waits for both);
            // a failure of either is the caller's to undo with `remove`.
            reply_route::alongside(NAME, netns, spec, self.ipv6.is_some(), || {
                for family in self.families() {
                    // Both tables in one transaction.
                    let nat = family.read(netns, &NAT)?;
                    let mangle = family.read(netns, &MANGLE)?;
                    let mut input = nat.apply_input(&NAT, &Self::rules(spec, family.ipv6));
                    input.push_str(&mangle.apply_input(&MANGLE, &Self::mark_rules(spec)));
                    family.restore_input(netns, &input)?;
                }
                Ok(())
            })
        })?;
        tracing::debug!(netns = %netns, "iptables redirect rules applied");
        Ok(())
    }

    fn remove(&self, netns: &Netns) -> Result<(), RedirectError> {
        in_netns(NAME, netns, || {
            for family in self.families() {
                let mut input = String::new();
                for chains in [&NAT, &MANGLE] {
                    let installed = family.read(netns, chains)?;
                    if installed.any() {
                        input.push_str(&installed.remove_input(chains));
                    }
                }
                if !input.is_empty() {
                    family.restore_input(netns, &input)?;
                }
            }
            reply_route::remove(NAME, netns, self.ipv6.is_some())
        })?;
        tracing::debug!(netns = %netns, "iptables redirect rules removed");
        Ok(())
    }

    /// True when every family has both chains and the jumps to them (a
    /// partial install reads as not applied, so it is applied again).
    fn is_applied(&self, netns: &Netns) -> Result<bool, RedirectError> {
        in_netns(NAME, netns, || {
            for family in self.families() {
                for chains in [&NAT, &MANGLE] {
                    if !family.read(netns, chains)?.complete() {
                        return Ok(false);
                    }
                }
            }
            reply_route::is_applied(NAME, netns)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rules_are_istios() {
        assert_eq!(
            IptablesRestore::rules(&RedirectSpec::default(), false),
            "-A PODLESS_PREROUTING -i lo -j RETURN
-A PODLESS_PREROUTING -s 169.254.7.127/32 -j RETURN
-A PODLESS_PREROUTING -p tcp -m tcp --dport 15008 -j RETURN
-A PODLESS_PREROUTING -p tcp -j REDIRECT --to-ports 15006
-A PODLESS_OUTPUT -m mark --mark 0x539/0xfff -j RETURN
-A PODLESS_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-A PODLESS_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A PODLESS_OUTPUT -d 127.0.0.0/8 -p tcp -j RETURN
-A PODLESS_OUTPUT -p tcp -j REDIRECT --to-ports 15001
"
        );
        let ipv6 = IptablesRestore::rules(&RedirectSpec::default(), true);
        assert!(!ipv6.contains("169.254"), "{ipv6}");
        assert!(ipv6.contains("-d ::1/128 -p tcp -j RETURN"), "{ipv6}");
    }

    #[test]
    fn without_dns_there_is_no_dns_rule() {
        let spec = RedirectSpec {
            dns_port: None,
            probe_source: None,
            ..RedirectSpec::default()
        };
        let rules = IptablesRestore::rules(&spec, false);
        assert!(!rules.contains("--dport 53"), "{rules}");
        assert!(!rules.contains("-s "), "{rules}");
    }

    #[test]
    fn jumps_are_added_once_and_extra_copies_deleted() {
        let saved = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:PODLESS_OUTPUT - [0:0]
:PODLESS_PREROUTING - [0:0]
-A PREROUTING -j PODLESS_PREROUTING
-A OUTPUT -j PODLESS_OUTPUT
-A OUTPUT -j PODLESS_OUTPUT
-A OUTPUT -j PODLESS_OUTPUT -m comment --comment other
COMMIT
";
        let installed = Installed::parse(saved, &NAT);
        assert_eq!(
            installed,
            Installed {
                prerouting_jumps: 1,
                output_jumps: 2,
                prerouting_chain: true,
                output_chain: true,
            }
        );
        assert!(installed.complete());
        assert_eq!(
            installed.apply_input(&NAT, "RULES\n"),
            "*nat
:PODLESS_PREROUTING - [0:0]
:PODLESS_OUTPUT - [0:0]
RULES
-D OUTPUT -j PODLESS_OUTPUT
COMMIT
"
        );

        let empty = Installed::parse("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", &NAT);
        assert!(!empty.any());
        assert!(!empty.complete());
        assert_eq!(
            empty.apply_input(&NAT, ""),
            "*nat
:PODLESS_PREROUTING - [0:0]
:PODLESS_OUTPUT - [0:0]
-A PREROUTING -j PODLESS_PREROUTING
-A OUTPUT -j PODLESS_OUTPUT
COMMIT
"
        );
    }

    #[test]
    fn removing_deletes_every_jump_then_the_chains() {
        let installed = Installed {
            prerouting_jumps: 2,
            output_jumps: 0,
            prerouting_chain: true,
            output_chain: false,
        };
        assert!(installed.any());
        assert_eq!(
            installed.remove_input(&NAT),
            "*nat
-D PREROUTING -j PODLESS_PREROUTING
-D PREROUTING -j PODLESS_PREROUTING
:PODLESS_PREROUTING - [0:0]
:PODLESS_OUTPUT - [0:0]
-X PODLESS_PREROUTING
-X PODLESS_OUTPUT
COMMIT
"
        );
    }
}
