//! The nftables backend: the rules as one table, `inet podless` (IPv4 and
//! IPv6 together), replaced whole in one `nft -f -` transaction.

use std::fmt::Write as _;
use std::path::PathBuf;

use mesh_net::netns::Netns;

use super::program::{Program, in_netns};
use super::{MARK_MASK, RedirectError, RedirectSpec, Redirection, reply_route};

/// The backend's name in errors.
const NAME: &str = "nftables";

/// The [`Redirection`] through `nft`: a table of ours
/// ([`Nftables::TABLE`], family `inet`) holding a `prerouting` and an
/// `output` nat chain and two for marks. Applying replaces the rules in one
/// transaction (create the table if missing, flush it, add the chains and
/// rules); removing deletes it.
#[derive(Clone, Debug)]
pub struct Nftables {
    /// The `nft` program.
    program: PathBuf,
}

impl Nftables {
    /// The name of our table (family `inet`).
    pub const TABLE: &'static str = "podless";

    /// With `nft` from `PATH`.
    pub fn new() -> Self {
        Self::with_program("nft")
    }

    /// With the `nft` program at `program`.
    pub fn with_program(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// The table that [`Redirection::apply`] installs for `spec`, as `nft`
    /// reads it.
    pub fn table(spec: &RedirectSpec) -> String {
        let mut prerouting = String::from(
            "\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"lo\" return\n",
        );
        if let Some(probe) = spec.probe_source {
            let _ = writeln!(prerouting, "\t\tip saddr {probe} return");
        }
        let _ = writeln!(prerouting, "\t\ttcp dport {} return", spec.hbone_port);
        let _ = writeln!(
            prerouting,
            "\t\tmeta l4proto tcp redirect to :{}",
            spec.inbound_plaintext_port
        );

        let mut output = format!(
            "\t\ttype nat hook output priority -100; policy accept;\n\
             \t\tmeta mark & {MARK_MASK:#x} == {:#x} return\n",
            spec.mark
        );
        if let Some(dns) = spec.dns_port {
            let _ = writeln!(output, "\t\tudp dport 53 redirect to :{dns}");
            let _ = writeln!(output, "\t\ttcp dport 53 redirect to :{dns}");
        }
        output.push_str("\t\tip daddr 127.0.0.0/8 return\n\t\tip6 daddr ::1 return\n");
        let _ = writeln!(
            output,
            "\t\tmeta l4proto tcp redirect to :{}",
            spec.outbound_port
        );

        let reply = spec.reply_mark;
        let mark_prerouting = format!(
            "\t\ttype filter hook prerouting priority mangle; policy accept;\n\
             \t\tmeta mark & {MARK_MASK:#x} == {:#x} ct mark set ct mark & {:#x} | {reply:#x}\n",
            spec.mark, !MARK_MASK
        );
        let mark_output = format!(
            "\t\ttype route hook output priority mangle; policy accept;\n\
             \t\tct mark & {MARK_MASK:#x} == {reply:#x} meta mark set ct mark\n"
        );
        format!(
            "table inet {table} {{\n\tchain prerouting {{\n{prerouting}\t}}\n\n\
             \tchain output {{\n{output}\t}}\n\n\
             \tchain mark_prerouting {{\n{mark_prerouting}\t}}\n\n\
             \tchain mark_output {{\n{mark_output}\t}}\n}}\n",
            table = Self::TABLE
        )
    }

    /// The script that empties our table's chains, created if missing: the
    /// prefix of an apply, whose chains and rules follow in the same
    /// transaction. Flushing, not deleting: deleting a table waits for the
    /// kernel's RCU grace period (measured: 50 ms a pod's ADD, against 7 ms).
    fn flush_script() -> String {
        format!(
            "table inet {table} {{}}\nflush table inet {table}\n",
            table = Self::TABLE
        )
    }

    /// The script that removes our table, whether it is there or not
    /// (declaring a table that exists changes nothing).
    fn delete_script() -> String {
        format!(
            "table inet {table} {{}}\ndelete table inet {table}\n",
            table = Self::TABLE
        )
    }

    fn program(&self) -> Program<'_> {
        Program {
            backend: NAME,
            path: &self.program,
        }
    }
}

impl Default for Nftables {
    fn default() -> Self {
        Self::new()
    }
}

impl Redirection for Nftables {
    fn name(&self) -> &'static str {
        NAME
    }

    fn apply(&self, netns: &Netns, spec: &RedirectSpec) -> Result<(), RedirectError> {
        spec.validate()?;
        let script = format!("{}{}", Self::flush_script(), Self::table(spec));
        in_netns(NAME, netns, || {
            // The route and the rules at once (a pod's ADD waits for both);
            // a failure of either is the caller's to undo with `remove`.
            reply_route::alongside(NAME, netns, spec, true, || {
                self.program()
                    .run_ok(netns, &["-f", "-"], Some(&script))
                    .map(drop)
            })
        })?;
        tracing::debug!(netns = %netns, "nftables redirect rules applied");
        Ok(())
    }

    fn remove(&self, netns: &Netns) -> Result<(), RedirectError> {
        let script = Self::delete_script();
        in_netns(NAME, netns, || {
            self.program().run_ok(netns, &["-f", "-"], Some(&script))?;
            reply_route::remove(NAME, netns, true)
        })?;
        tracing::debug!(netns = %netns, "nftables redirect rules removed");
        Ok(())
    }

    fn is_applied(&self, netns: &Netns) -> Result<bool, RedirectError> {
        in_netns(NAME, netns, || {
            let ran = self
                .program()
                .run(netns, &["list", "table", "inet", Self::TABLE], None)?;
            if ran.success() {
                reply_route::is_applied(NAME, netns)
            } else if ran.stderr().contains("No such file or directory") {
                // The table is not there (ENOENT, in the C locale).
                Ok(false)
            } else {
                Err(ran.failed())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_is_istios_rules() {
        assert_eq!(
            Nftables::table(&RedirectSpec::default()),
            "table inet podless {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"lo\" return
\t\tip saddr 169.254.7.127 return
\t\ttcp dport 15008 return
\t\tmeta l4proto tcp redirect to :15006
\t}

\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark & 0xfff == 0x539 return
\t\tudp dport 53 redirect to :15053
\t\ttcp dport 53 redirect to :15053
\t\tip daddr 127.0.0.0/8 return
\t\tip6 daddr ::1 return
\t\tmeta l4proto tcp redirect to :15001
\t}

\tchain mark_prerouting {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tmeta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111
\t}

\tchain mark_output {
\t\ttype route hook output priority mangle; policy accept;
\t\tct mark & 0xfff == 0x111 meta mark set ct mark
\t}
}
"
        );
    }

    #[test]
    fn without_dns_or_probes_their_rules_are_left_out() {
        let spec = RedirectSpec {
            dns_port: None,
            probe_source: None,
            outbound_port: 1,
            inbound_plaintext_port: 2,
            hbone_port: 3,
            mark: 0x10,
            reply_mark: 0x20,
            reply_table: 7,
        };
        let table = Nftables::table(&spec);
        assert!(
            table.contains("ct mark set ct mark & 0xfffff000 | 0x20"),
            "{table}"
        );
        assert!(!table.contains("dport 53"), "{table}");
        assert!(!table.contains("saddr"), "{table}");
        assert!(table.contains("redirect to :1\n"), "{table}");
        assert!(table.contains("redirect to :2\n"), "{table}");
        assert!(table.contains("tcp dport 3 return"), "{table}");
        assert!(table.contains("== 0x10 return"), "{table}");
    }

    #[test]
    fn removing_declares_the_table_first() {
        assert_eq!(
            Nftables::delete_script(),
            "table inet podless {}\ndelete table inet podless\n"
        );
    }
}
