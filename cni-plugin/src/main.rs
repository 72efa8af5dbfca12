//! `podless-cni`: the chained CNI plugin a container runtime runs. It reads
//! the `CNI_*` environment and stdin, prints the result or the spec's error
//! JSON, and exits with its status; the work is in
//! [`cni_plugin::plugin::run`]. Run by hand with `--help` or `--version`, it
//! says what it is.

use std::io::{Read, Write};

const ABOUT: &str = "podless-cni: the podless CNI plugin (chained; CNI 1.0.0 and 1.1.0)

A container runtime runs it as the last plugin of a network configuration
list, with CNI_COMMAND (ADD, DEL, CHECK, VERSION, STATUS, GC), CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME and CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME,
K8S_POD_UID) in its environment and the network configuration on stdin. It
asks the podless node agent to capture the pod and passes the previous
result on. Its own configuration fields:

  agentSocket        the node agent's socket (default /var/run/podless/cni.sock)
  agentTimeout       how long to wait for the agent (default 10s)
  excludeNamespaces  pods of these namespaces pass untouched (default [kube-system])

Exit status 0 on success; otherwise 1, with the spec's error JSON on stdout
(code 11, try again later, while the node agent is unreachable).
";

fn main() {
    if let Some(arg) = std::env::args().nth(1) {
        let text = match arg.as_str() {
            "-h" | "--help" => ABOUT.to_owned(),
            "-V" | "--version" => format!("podless-cni {}\n", env!("CARGO_PKG_VERSION")),
            other => {
                let _ = writeln!(
                    std::io::stderr(),
                    "podless-cni: unexpected argument {other:?}: a CNI plugin takes its call from \
                     CNI_COMMAND and stdin (see --help)"
                );
                std::process::exit(2);
            }
        };
        let _ = std::io::stdout().write_all(text.as_bytes());
        return;
    }
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
