//! `podless-cni`: the chained CNI plugin a container runtime runs. It reads
//! the `CNI_*` environment and stdin, prints the result or the spec's error
//! JSON, and exits with its status; the work is in
//! [`cni_plugin::plugin::run`].

use std::io::{Read, Write};

fn main() {
    let env = cni_plugin::plugin::Environment::from_vars(std::env::vars_os());
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        Ok(_) => cni_plugin::plugin::run(&env, &stdin),
        Err(err) => cni_plugin::plugin::run_failed_to_read(&err),
    };
    if let Some(line) = &outcome.log {
        let _ = writeln!(std::io::stderr(), "podless-cni: {line}");
    }
    let _ = std::io::stdout().write_all(outcome.stdout.as_bytes());
    std::process::exit(outcome.exit_code);
}
