//! Network namespaces for end-to-end tests: created with unique names,
//! joined by a bridge, removed on drop (also when a test fails), and a way to
//! run async code whose sockets live inside one of them.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Runs a command; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program} {args:?}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `ip netns exec <namespace>`, to which the command to run is appended
/// (`ip` execs it, so the child's pid is the command's).
fn exec_in(namespace: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]);
    command
}

/// Runs `command` with `stdin` inside `namespace`.
pub fn run_with_input(namespace: &str, command: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = exec_in(namespace)
        .args(command)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{command:?} in {namespace}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl Netns {
    fn create(name: String) -> Self {
        run("ip", &["netns", "add", &name]);
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `command` (program, then arguments) inside this namespace;
    /// panics with its output if it fails.
    pub fn exec(&self, command: &[&str]) {
        let output = exec_in(&self.name)
            .args(command)
            .output()
            .unwrap_or_else(|err| panic!("{command:?} in {}: {err}", self.name));
        assert!(
            output.status.success(),
            "{command:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `make` on a thread inside this namespace, with its own runtime:
    /// every socket the future opens belongs to the namespace.
    /// The thread starts at once; the returned future waits for its result.
    pub fn run<T, F, Fut>(&self, make: F) -> impl Future<Output = T> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _ = done.send(runtime.block_on(make()));
        });
        async move { result.await.expect("the namespace thread finished") }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A name prefix no other test process uses.
pub fn unique_prefix(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "pl{}{}{n}",
        std::process::id() % 100_000,
        &test[..test.len().min(3)]
    )
}

/// A control-plane namespace holding a bridge, and workload namespaces each
/// joined to it by a veth pair, all on `10.77.0.0/24` (private to these
/// namespaces): the control plane is `.1`, workloads `.2`, `.3`, ...
#[derive(Debug)]
pub struct Topology {
    /// The control plane's namespace.
    pub control: Netns,
    /// The workloads' namespaces, in order.
    pub workloads: Vec<Netns>,
}

impl Topology {
    /// Builds it with `count` workload namespaces.
    pub fn new(test: &str, count: usize) -> Self {
        let prefix = unique_prefix(test);
        let control = Netns::create(format!("{prefix}-cp"));
        control.ip(&["link", "add", "br0", "type", "bridge"]);
        control.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"]);
        control.ip(&["link", "set", "br0", "up"]);
        let mut workloads = Vec::new();
        for i in 0..count {
            let netns = Netns::create(format!("{prefix}-w{i}"));
            let outside = format!("v{i}");
            control.ip(&[
                "link",
                "add",
                &outside,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ]);
            control.ip(&["link", "set", &outside, "master", "br0"]);
            control.ip(&["link", "set", &outside, "up"]);
            let address = format!("10.77.0.{}/24", i + 2);
            netns.ip(&["addr", "add", &address, "dev", "eth0"]);
            netns.ip(&["link", "set", "eth0", "up"]);
            netns.ip(&["route", "add", "default", "via", "10.77.0.1"]);
            workloads.push(netns);
        }
        Self { control, workloads }
    }

    /// The address of workload `i`.
    pub fn workload_ip(i: usize) -> String {
        format!("10.77.0.{}", i + 2)
    }
}

/// Redirect rules for a workload namespace running its own proxy (WIRE.md §6
/// for dedicated mode): its outbound TCP to 15001 and inbound TCP (except
/// HBONE) to 15006; the proxy's own sockets (mark 1337) pass.
pub fn install_redirect(netns: &Netns) {
    install_redirect_except(netns, &[]);
}

/// [`install_redirect`], with inbound `exempt` ports left alone (a baseline
/// measured without the mesh between the same namespaces).
pub fn install_redirect_except(netns: &Netns, exempt: &[u16]) {
    let exempt: String = exempt
        .iter()
        .map(|port| format!("    tcp dport {port} return\n"))
        .collect();
    run_with_input(
        &netns.name,
        &["nft", "-f", "-"],
        &format!(
            "table inet podless {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"lo\" return
    tcp dport 15008 return
{exempt}    meta l4proto tcp redirect to :15006
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    ip daddr 127.0.0.0/8 return
    meta l4proto tcp redirect to :15001
  }}
}}
"
        ),
    );
}

/// An example binary of the workspace in the cargo `profile`'s folder
/// (`"dev"`, `"release"`, or a custom one such as `"proxy"`) of the running
/// test's or bench's target directory. Tests take the one cargo built with
/// the workspace's tests (`cargo nextest run --workspace`, as `scripts/test`
/// runs it) and never run cargo themselves; benches build theirs first.
pub fn example(package: &str, name: &str, profile: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("test path");
    let target_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target dir");
    let folder = if profile == "dev" { "debug" } else { profile };
    let binary = target_dir.join(folder).join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is not built: run the tests of the workspace (cargo nextest run --workspace), \
         or build it first (cargo build -p {package} --example {name} --profile {profile})",
        binary.display()
    );
    binary
}

/// What a proxy instance at the control plane `control_plane` is told: the
/// root certificate file, its token and its workload's uid, as `ztunnel-run`'s
/// arguments (options may follow).
pub fn ztunnel_run_args<'a>(
    control_plane: &'a str,
    root: &'a str,
    token: &'a str,
    workload_uid: &'a str,
) -> Vec<&'a str> {
    vec![
        "--control-plane",
        control_plane,
        "--root",
        root,
        "--token",
        token,
        "--workload-uid",
        workload_uid,
    ]
}

/// `program` to run in `netns`.
fn in_netns(netns: &Netns, program: &Path) -> Command {
    let mut command = exec_in(&netns.name);
    command.arg(program);
    command
}

/// A child process, killed on drop; its stderr lines are kept.
pub struct Process {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `program` in `netns` and waits for a stdout line starting with
    /// `ready_prefix`.
    pub fn start(netns: &Netns, program: &Path, args: &[&str], ready_prefix: &str) -> Self {
        let mut command = in_netns(netns, program);
        command.args(args);
        Self::spawn(command, program, |line| line.starts_with(ready_prefix))
    }

    /// Starts `program` in `netns` with `env`, in directory `dir`, and waits
    /// for a stdout line containing `ready`; stdout is read on after that.
    pub fn start_in(
        netns: &Netns,
        dir: &Path,
        env: &[(&str, &str)],
        program: &Path,
        ready: &str,
    ) -> Self {
        let mut command = in_netns(netns, program);
        command.current_dir(dir).envs(env.iter().copied());
        Self::spawn(command, program, |line| line.contains(ready))
    }

    fn spawn(mut command: Command, program: &Path, ready: impl Fn(&str) -> bool) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
        let out = child.stdout.take().expect("stdout");
        let process = Self { child, stderr };
        let mut lines = BufReader::new(out).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|line| ready(&line));
        assert!(
            ready,
            "{} never said it was ready: {:?}",
            program.display(),
            process.stderr_lines()
        );
        // Keep reading, so a program that logs to stdout never blocks on it.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        process
    }

    /// What it printed on stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("lines").clone()
    }

    /// Sends it `signal` (e.g. `HUP`).
    pub fn signal(&self, signal: &str) {
        // `ip netns exec` execs the program: the child's pid is the program's.
        run(
            "kill",
            &[&format!("-{signal}"), &self.child.id().to_string()],
        );
    }
}

impl Process {
    /// Its process id (the program's: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
