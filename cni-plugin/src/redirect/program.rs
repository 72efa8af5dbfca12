//! Running a firewall program inside a namespace: its input on stdin, its
//! output captured, and every way it can fail as a [`RedirectError`] naming
//! the backend, the namespace and the command line.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use mesh_net::netns::Netns;

use super::RedirectError;

/// How long a firewall program may run before it is killed.
const PROGRAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One program of a backend, run inside a namespace.
#[derive(Debug)]
pub(super) struct Program<'a> {
    /// The backend's name, for errors.
    pub(super) backend: &'static str,
    /// The program's path (or name, looked up in `PATH`).
    pub(super) path: &'a Path,
}

/// What a program run ended with, successful or not.
#[derive(Debug)]
pub(super) struct Ran {
    /// Its command line, for errors.
    command: String,
    /// Its status and output.
    output: Output,
    /// The backend, for errors.
    backend: &'static str,
    /// The namespace's description, for errors.
    netns: String,
}

impl Program<'_> {
    /// Runs the program with `args` and `stdin` in the current thread's
    /// namespace (call it inside [`Netns::run`]; `netns` is for errors).
    /// The C locale makes its messages the ones callers look for.
    pub(super) fn run(
        &self,
        netns: &Netns,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Ran, RedirectError> {
        let command = self.command_line(args);
        let spawned = Command::new(self.path)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(RedirectError::ProgramNotFound {
                    backend: self.backend,
                    netns: netns.description().to_owned(),
                    program: self.path.to_owned(),
                });
            }
            Err(source) => return Err(self.spawn_error(netns, command, source)),
        };
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // Small scripts: the pipe takes them whole before the program
            // reads. A program that exits without reading says why on
            // stderr, which matters more than the broken pipe.
            if let Err(err) = pipe.write_all(input.as_bytes())
                && err.kind() != io::ErrorKind::BrokenPipe
            {
                return Err(self.spawn_error(netns, command, err));
            }
        }
        // A program that hangs (a stuck lock, a kernel in trouble) is killed:
        // the agent must not wedge on one pod.
        let pid = child.id();
        let (finished, watch) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let expired = matches!(
                watch.recv_timeout(PROGRAM_TIMEOUT),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if expired && let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            expired
        });
        let waited = child.wait_with_output();
        let _ = finished.send(());
        if watchdog.join().unwrap_or(false) {
            return Err(self.spawn_error(
                netns,
                command,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("killed after {PROGRAM_TIMEOUT:?}"),
                ),
            ));
        }
        let output = match waited {
            Ok(output) => output,
            Err(source) => return Err(self.spawn_error(netns, command, source)),
        };
        Ok(Ran {
            command,
            output,
            backend: self.backend,
            netns: netns.description().to_owned(),
        })
    }

    /// [`Program::run`], which must succeed; its stdout.
    pub(super) fn run_ok(
        &self,
        netns: &Netns,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, RedirectError> {
        self.run(netns, args, stdin)?.ok()
    }

    fn command_line(&self, args: &[&str]) -> String {
        let mut line = self.path.display().to_string();
        for arg in args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }

    fn spawn_error(&self, netns: &Netns, command: String, source: io::Error) -> RedirectError {
        RedirectError::Spawn {
            backend: self.backend,
            netns: netns.description().to_owned(),
            command,
            source,
        }
    }
}

impl Ran {
    /// Whether it exited with 0.
    pub(super) fn success(&self) -> bool {
        self.output.status.success()
    }

    /// What it wrote on stderr.
    pub(super) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr)
            .trim()
            .to_owned()
    }

    /// Its stdout if it succeeded, else the error naming it.
    pub(super) fn ok(self) -> Result<String, RedirectError> {
        if self.success() {
            Ok(String::from_utf8_lossy(&self.output.stdout).into_owned())
        } else {
            Err(self.failed())
        }
    }

    /// The error of its failure.
    pub(super) fn failed(self) -> RedirectError {
        let stderr = self.stderr();
        RedirectError::Failed {
            backend: self.backend,
            netns: self.netns,
            command: self.command,
            status: self.output.status.to_string(),
            stderr,
        }
    }
}

/// Runs `work` inside `netns` ([`Netns::run`]); failing to get there is a
/// [`RedirectError::Namespace`].
pub(super) fn in_netns<T: Send>(
    backend: &'static str,
    netns: &Netns,
    work: impl FnOnce() -> Result<T, RedirectError> + Send,
) -> Result<T, RedirectError> {
    netns
        .run(work)
        .map_err(|source| RedirectError::Namespace { backend, source })?
}
