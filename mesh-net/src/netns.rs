//! Network namespaces: an open namespace ([`Netns`]), code and programs run
//! inside one, and sockets opened in one.
//!
//! A thread's network namespace is its own (`setns(2)` with `CLONE_NEWNET`
//! moves only the calling thread), and a socket keeps the namespace it was
//! created in for its whole life. Two ways in follow from that:
//!
//! - [`Netns::run`] runs a closure on a fresh thread that joins the
//!   namespace and ends with the closure, so no thread is ever left in a
//!   foreign namespace. Child processes spawned from inside the closure
//!   (`std::process::Command`) are created by that thread and start in the
//!   namespace: this is how firewall programs run inside a pod's namespace,
//!   with no `pre_exec` and no `unsafe`.
//! - [`Netns::enter`] / [`Netns::enter_from`] switch the *current* thread in,
//!   run a short synchronous closure (typically: create a socket) and switch
//!   back, also when the closure panics. A node proxy opens a pod's listeners
//!   and per-connection sockets this way from a tokio worker thread; with the
//!   home namespace held open ([`Netns::enter_from`]) a call costs two
//!   `setns` system calls.
//!
//! Joining a namespace needs `CAP_SYS_ADMIN` (the node agent and the node
//! proxy run with it). A namespace lives as long as something refers to it:
//! an open [`Netns`] keeps it alive after `ip netns del` removed its name.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};

/// Where a thread's own network namespace is.
const THREAD_SELF: &str = "/proc/thread-self/ns/net";

/// An open network namespace (a file descriptor of it) and a description of
/// where it came from, for messages: the path it was opened at, or what the
/// caller said of a descriptor it was given.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's file descriptor (nsfs).
    fd: OwnedFd,
    /// Where it came from (e.g. `/var/run/netns/cni-1234`).
    description: String,
}

impl Netns {
    /// Opens the network namespace at `path` (e.g.
    /// `/var/run/netns/cni-1234` or `/proc/<pid>/ns/net`) and checks that it
    /// is one. Errors name the path; a file that is not a network namespace
    /// is [`io::ErrorKind::InvalidInput`].
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("opening network namespace {}: {err}", path.display()),
            )
        })?;
        Self::from_fd(OwnedFd::from(file), path.display().to_string())
    }

    /// A network namespace from a descriptor the caller already holds (e.g.
    /// one received over ZDS), described as `description` in messages.
    /// Checks that it is a network namespace, as [`Netns::open`] does.
    pub fn from_fd(fd: OwnedFd, description: impl Into<String>) -> io::Result<Self> {
        let netns = Self {
            fd,
            description: description.into(),
        };
        netns.check()?;
        Ok(netns)
    }

    /// The calling thread's network namespace
    /// (`/proc/thread-self/ns/net`), described by its identity
    /// (`net:[<inode>]`, as `ls -l /proc/self/ns` shows it).
    pub fn current() -> io::Result<Self> {
        let file = File::open(THREAD_SELF).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("opening this thread's network namespace ({THREAD_SELF}): {err}"),
            )
        })?;
        let fd = OwnedFd::from(file);
        let inode = nix::sys::stat::fstat(&fd).map_err(io::Error::from)?.st_ino;
        Ok(Self {
            fd,
            description: format!("net:[{inode}]"),
        })
    }

    /// The namespace's file descriptor (to pass it over ZDS, or to compare
    /// it with [`same_namespace`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Another handle on the same namespace (a duplicated descriptor), with
    /// the same description.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            description: self.description.clone(),
        })
    }

    /// Where it came from, as given to [`Netns::open`] or
    /// [`Netns::from_fd`].
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Runs `f` on a fresh thread that first joins this namespace, and
    /// returns its result. The thread ends with `f`: no thread is left in the
    /// namespace. Sockets `f` creates belong to the namespace, and so do the
    /// processes it spawns (`std::process::Command`). The call waits for
    /// the thread, so `f` may borrow from the caller.
    ///
    /// Errors are failing to start the thread or to join the namespace (they
    /// name it); a panic in `f` is resumed on the caller's thread.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        self.on_new_thread(f)?
            .map_err(|errno| self.entering_failed(errno))
    }

    /// Runs `f` on the current thread inside this namespace, then switches
    /// the thread back to the namespace it was in. Meant for short,
    /// synchronous work, above all creating a socket (it keeps this
    /// namespace). It opens the thread's namespace first
    /// ([`Netns::current`]); [`Netns::enter_from`] saves that.
    ///
    /// See [`Netns::enter_from`] for the errors, among them the one that
    /// leaves the thread in this namespace.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = Self::current()?;
        self.enter_from(&home, f)
    }

    /// Runs `f` on the current thread inside this namespace, then switches
    /// the thread back to `home`, also when `f` panics. `home` must be the
    /// namespace the thread is in now (e.g. the process's namespace, opened
    /// once with [`Netns::current`], on threads that never leave it; nested
    /// calls pass the outer call's namespace). A call costs two `setns`
    /// system calls.
    ///
    /// Errors: failing to enter this namespace (the thread has not moved, `f`
    /// has not run), or failing to return to `home` after `f` ran. The
    /// second leaves the thread in this namespace: every socket it creates
    /// from then on would land here, so the caller must treat it as fatal for
    /// the thread (it is also logged at error level). It cannot happen when
    /// `home` is a network namespace the thread could already enter, short of
    /// the process losing `CAP_SYS_ADMIN` meanwhile.
    pub fn enter_from<T>(&self, home: &Self, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| self.entering_failed(errno))?;
        let guard = ReturnHome {
            home,
            visited: self,
            done: false,
        };
        let value = f();
        guard.finish()?;
        Ok(value)
    }

    /// Runs `f` on a fresh thread that first joins this namespace: the
    /// outer error is failing to start the thread, the inner one failing to
    /// join the namespace (`f` has not run). A panic in `f` is resumed here.
    fn on_new_thread<T, F>(&self, f: F) -> io::Result<Result<T, Errno>>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("podless-netns".to_owned())
                .spawn_scoped(scope, || {
                    setns(self.fd(), CloneFlags::CLONE_NEWNET)?;
                    Ok(f())
                })
                .map_err(|err| {
                    io::Error::new(
                        err.kind(),
                        format!("starting a thread to run in network namespace {self}: {err}"),
                    )
                })?;
            Ok(thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })
    }

    /// Checks that the descriptor is a network namespace: `setns` with
    /// `CLONE_NEWNET` refuses anything else (`EINVAL`). It runs on a
    /// throwaway thread, so no thread moves.
    fn check(&self) -> io::Result<()> {
        match self.on_new_thread(|| ())? {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{self} is not a network namespace (setns refused it: EINVAL)"),
            )),
            Err(errno) => Err(self.entering_failed(errno)),
        }
    }

    /// The error of failing to join this namespace, naming it (and the
    /// capability, when that is what is missing).
    fn entering_failed(&self, errno: Errno) -> io::Error {
        let os = io::Error::from(errno);
        let hint = if errno == Errno::EPERM {
            " (joining a namespace needs CAP_SYS_ADMIN)"
        } else {
            ""
        };
        io::Error::new(
            os.kind(),
            format!("entering network namespace {self}: {os}{hint}"),
        )
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// Whether `a` and `b` are descriptors of the same namespace (the same
/// device and inode of nsfs), e.g. a [`Netns`] and [`Netns::current`] taken
/// inside [`Netns::run`].
pub fn same_namespace(a: impl AsFd, b: impl AsFd) -> io::Result<bool> {
    let a = nix::sys::stat::fstat(a).map_err(io::Error::from)?;
    let b = nix::sys::stat::fstat(b).map_err(io::Error::from)?;
    Ok((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino))
}

/// Switches the thread back to `home` when dropped (a panic in the visit)
/// or finished.
struct ReturnHome<'a> {
    /// Where the thread returns.
    home: &'a Netns,
    /// Where it is (for the message if it cannot leave).
    visited: &'a Netns,
    /// Whether it returned already.
    done: bool,
}

impl ReturnHome<'_> {
    /// Returns home; an error (also logged) leaves the thread where it is.
    fn finish(mut self) -> io::Result<()> {
        self.done = true;
        self.go_home()
    }

    fn go_home(&self) -> io::Result<()> {
        setns(self.home.fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
            let os = io::Error::from(errno);
            let err = io::Error::new(
                os.kind(),
                format!(
                    "returning this thread from network namespace {} to {}: {os}; the thread \
                     is left in {}",
                    self.visited, self.home, self.visited
                ),
            );
            tracing::error!(error = %err, "a thread could not leave a network namespace");
            err
        })
    }
}

impl Drop for ReturnHome<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Unwinding from a panic in the visit: the error is logged.
            let _ = self.go_home();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    /// A namespace made with `ip netns add` (a name unique to this process
    /// and test), its loopback up; deleted on drop, also when a test fails.
    struct TestNamespace {
        name: String,
    }

    impl TestNamespace {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "pl-netns-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            ip(&["netns", "add", &name]);
            let namespace = Self { name };
            ip(&["-n", &namespace.name, "link", "set", "lo", "up"]);
            namespace
        }

        fn path(&self) -> String {
            format!("/var/run/netns/{}", self.name)
        }

        fn open(&self) -> Netns {
            Netns::open(self.path()).expect("open the test namespace")
        }
    }

    impl Drop for TestNamespace {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .output();
        }
    }

    fn ip(args: &[&str]) {
        let output = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            output.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn same(a: &Netns, b: &Netns) -> bool {
        same_namespace(a, b).expect("fstat")
    }

    #[test]
    fn run_happens_in_the_namespace_and_enter_comes_back() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        let host = Netns::current().expect("current");
        assert!(!same(&netns, &host));

        let inside = netns.run(Netns::current).expect("run").expect("current");
        assert!(same(&inside, &netns), "run saw {inside}, not {netns}");
        assert!(same(&Netns::current().expect("current"), &host));

        let entered = netns
            .enter(Netns::current)
            .expect("enter")
            .expect("current");
        assert!(same(&entered, &netns));
        assert!(
            same(&Netns::current().expect("current"), &host),
            "enter came back"
        );

        let entered = netns
            .enter_from(&host, Netns::current)
            .expect("enter_from")
            .expect("current");
        assert!(same(&entered, &netns));
        assert!(same(&Netns::current().expect("current"), &host));
    }

    #[test]
    fn enter_comes_back_when_the_closure_panics() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        let host = Netns::current().expect("current");
        let panicked = std::panic::catch_unwind(|| {
            netns.enter(|| panic!("in the namespace")).expect("enter");
        });
        assert!(panicked.is_err());
        assert!(same(&Netns::current().expect("current"), &host));
    }

    #[test]
    fn a_panic_in_run_reaches_the_caller() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        let panicked = std::panic::catch_unwind(|| netns.run(|| panic!("in the namespace")));
        assert!(panicked.is_err());
    }

    #[test]
    fn a_listener_opened_inside_is_reached_only_from_inside() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        let listener = netns
            .enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("enter")
            .expect("bind inside");
        let address = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");

        // From the host's loopback: refused (or, should some host program
        // hold the same port, not our listener).
        let _ = TcpStream::connect_timeout(&address, Duration::from_secs(1));
        let err = listener.accept().expect_err("nothing from the host");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        let mut client = netns
            .run(|| TcpStream::connect_timeout(&address, Duration::from_secs(5)))
            .expect("run")
            .expect("connect inside");
        listener.set_nonblocking(false).expect("blocking");
        let (mut accepted, peer) = listener.accept().expect("accept");
        assert_eq!(peer, client.local_addr().expect("client address"));
        accepted
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        client.write_all(b"hi").expect("write");
        let mut buf = [0; 2];
        accepted.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn programs_spawned_inside_run_in_the_namespace() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        let inode = nix::sys::stat::fstat(netns.fd()).expect("fstat").st_ino;
        let output = netns
            .run(|| Command::new("readlink").arg("/proc/self/ns/net").output())
            .expect("run")
            .expect("readlink");
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("net:[{inode}]")
        );
    }

    #[test]
    fn clones_and_descriptors_name_the_same_namespace() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        assert_eq!(netns.description(), namespace.path());
        assert_eq!(netns.to_string(), namespace.path());
        let clone = netns.try_clone().expect("clone");
        assert!(same(&clone, &netns));
        assert_eq!(clone.description(), netns.description());
        let owned = netns.fd().try_clone_to_owned().expect("dup");
        let from_fd = Netns::from_fd(owned, "fd").expect("from_fd");
        assert!(same(&from_fd, &netns));
        assert_eq!(from_fd.to_string(), "fd");
        let current = Netns::current().expect("current");
        assert!(current.description().starts_with("net:["), "{current}");
    }

    #[test]
    fn an_open_namespace_outlives_its_name() {
        let namespace = TestNamespace::new();
        let netns = namespace.open();
        let path = namespace.path();
        drop(namespace);
        let err = Netns::open(&path).expect_err("its name is gone");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains(&path), "{err}");
        let inside = netns.run(Netns::current).expect("run").expect("current");
        assert!(same(&inside, &netns));
    }

    #[test]
    fn what_is_not_a_network_namespace_is_refused_by_name() {
        let err = Netns::open("/etc/hostname").expect_err("a plain file");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string()
                .contains("/etc/hostname is not a network namespace"),
            "{err}"
        );

        let err = Netns::open("/proc/thread-self/ns/uts").expect_err("another namespace type");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");

        let err = Netns::open("/nonexistent/netns").expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");

        let file = File::open("/etc/hostname").expect("open");
        let err = Netns::from_fd(OwnedFd::from(file), "a hostname file").expect_err("plain");
        assert!(
            err.to_string()
                .contains("a hostname file is not a network namespace"),
            "{err}"
        );
    }
}
