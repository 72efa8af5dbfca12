//! The redirect backends against real network namespaces (as root): rules
//! installed once however often they are applied, replaced, removed without
//! a trace, traffic really redirected (outbound, inbound, DNS, the
//! exceptions), the host's rules untouched, and clear errors. Every test runs
//! for each backend: nftables, iptables (the nf_tables flavour) and, where
//! installed, legacy iptables.
//!
//! Each test makes a pod namespace and a peer namespace joined by a veth
//! pair (10.250.1.2 and fd00:250:1::2 in the pod, .1 and ::1 in the peer,
//! which also holds the kubelet's probe address 169.254.7.127), with unique
//! names, deleted on drop. Traffic stays inside them.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cni_plugin::redirect::{IptablesRestore, Nftables, RedirectError, RedirectSpec, Redirection};
use mesh_net::netns::Netns;
use nix::sys::socket::{self, SockFlag, SockType, SockaddrStorage, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

/// How long a connection or datagram may take to land.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A backend under test and how to read its rules inside a namespace.
struct Backend {
    redirection: Box<dyn Redirection>,
    /// Programs (with arguments) whose output lists its rules.
    listings: &'static [&'static [&'static str]],
    /// Lines that appear once per installed copy of the rules, and how many
    /// copies one install makes (nftables: one `inet` table; iptables: one
    /// per family).
    anchors: &'static [&'static str],
    copies: usize,
}

fn nftables() -> Option<Backend> {
    Some(Backend {
        redirection: Box::new(Nftables::new()),
        listings: &[&["nft", "list", "ruleset"]],
        anchors: &["table inet podless {"],
        copies: 1,
    })
}

fn iptables() -> Option<Backend> {
    Some(Backend {
        redirection: Box::new(IptablesRestore::new()),
        listings: &[&["iptables-save"], &["ip6tables-save"]],
        anchors: &[
            "-A PREROUTING -j PODLESS_PREROUTING",
            "-A OUTPUT -j PODLESS_OUTPUT",
            ":PODLESS_PREROUTING - [0:0]",
            ":PODLESS_OUTPUT - [0:0]",
        ],
        copies: 2,
    })
}

/// Legacy iptables, where its programs are installed (else the test is
/// skipped, saying so).
fn iptables_legacy() -> Option<Backend> {
    if !Path::new("/usr/sbin/iptables-legacy-restore").exists() {
        return None;
    }
    Some(Backend {
        redirection: Box::new(
            IptablesRestore::new()
                .ipv4_programs("iptables-legacy-restore", "iptables-legacy-save")
                .ipv6_programs("ip6tables-legacy-restore", "ip6tables-legacy-save"),
        ),
        listings: &[&["iptables-legacy-save"], &["ip6tables-legacy-save"]],
        ..iptables().expect("iptables")
    })
}

impl Backend {
    /// Its rules in `netns`, comments (dates) left out.
    fn listing(&self, netns: &Netns) -> String {
        self.listings
            .iter()
            .map(|command| output_in(netns, command))
            .collect()
    }

    /// Asserts that `netns` holds exactly one install of `spec`'s rules.
    fn assert_installed_once(&self, netns: &Netns, spec: &RedirectSpec) {
        let listing = self.listing(netns);
        for anchor in self.anchors {
            assert_eq!(
                count(&listing, anchor),
                self.copies,
                "{anchor:?} in\n{listing}"
            );
        }
        // Inbound, outbound, and DNS over UDP and TCP.
        let redirects = if spec.dns_port.is_some() { 4 } else { 2 };
        assert_eq!(
            count(&listing.to_lowercase(), "redirect"),
            redirects * self.copies,
            "{listing}"
        );
    }

    /// Asserts that nothing of ours is left in `netns`, in any listing.
    fn assert_nothing_left(&self, netns: &Netns) {
        let listing = self.listing(netns) + &output_in(netns, &["nft", "list", "ruleset"]);
        assert!(
            !listing.to_lowercase().contains("podless"),
            "left over:\n{listing}"
        );
        assert_eq!(count(&listing.to_lowercase(), "redirect"), 0, "{listing}");
    }
}

/// Lines of `text` containing `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|line| line.contains(needle)).count()
}

/// What `command` prints inside `netns` (it must succeed), without comment
/// lines.
fn output_in(netns: &Netns, command: &[&str]) -> String {
    let output = netns
        .run(|| Command::new(command[0]).args(&command[1..]).output())
        .expect("run in the namespace")
        .unwrap_or_else(|err| panic!("{command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} in {netns}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Runs `ip` with `args`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A pod namespace and a peer namespace joined by a veth pair; both deleted
/// on drop.
struct Namespaces {
    pod: String,
    peer: String,
}

impl Namespaces {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("pl-redirect-{}-{n}", std::process::id());
        let namespaces = Self {
            pod: format!("{base}-pod"),
            peer: format!("{base}-peer"),
        };
        for name in [&namespaces.pod, &namespaces.peer] {
            ip(&["netns", "add", name]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        let (pod, peer) = (namespaces.pod.as_str(), namespaces.peer.as_str());
        ip(&[
            "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer,
        ]);
        for (name, v4, v6) in [
            (pod, "10.250.1.2/24", "fd00:250:1::2/64"),
            (peer, "10.250.1.1/24", "fd00:250:1::1/64"),
        ] {
            ip(&["-n", name, "addr", "add", v4, "dev", "eth0"]);
            ip(&["-n", name, "addr", "add", v6, "dev", "eth0", "nodad"]);
            ip(&["-n", name, "link", "set", "eth0", "up"]);
        }
        ip(&["-n", peer, "addr", "add", "169.254.7.127/32", "dev", "eth0"]);
        ip(&["-n", pod, "route", "add", "default", "via", "10.250.1.1"]);
        ip(&[
            "-n",
            pod,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:250:1::1",
        ]);
        namespaces
    }

    fn pod(&self) -> Netns {
        Netns::open(format!("/var/run/netns/{}", self.pod)).expect("open the pod namespace")
    }

    fn peer(&self) -> Netns {
        Netns::open(format!("/var/run/netns/{}", self.peer)).expect("open the peer namespace")
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

/// A listener on `address` inside `netns`, non-blocking.
fn listen(netns: &Netns, address: &str) -> TcpListener {
    let address = addr(address);
    let listener = netns
        .enter(|| TcpListener::bind(address))
        .expect("enter")
        .unwrap_or_else(|err| panic!("bind {address} in {netns}: {err}"));
    listener.set_nonblocking(true).expect("nonblocking");
    listener
}

/// The next connection on `listener`, within [`TIMEOUT`].
fn accept(listener: &TcpListener) -> Option<TcpStream> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Some(stream),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// Whether `listener` has no connection waiting.
fn nothing_pending(listener: &TcpListener) -> bool {
    matches!(listener.accept(), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
}

/// A connection from inside `netns` to `to`, from `from` and with `mark`
/// when given.
fn connect(netns: &Netns, to: &str, from: Option<&str>, mark: Option<u32>) -> TcpStream {
    let (to, from) = (addr(to), from.map(addr));
    netns
        .enter(|| connect_socket(to, from, mark))
        .expect("enter")
        .unwrap_or_else(|err| panic!("connect to {to} from {from:?} in {netns}: {err}"))
}

fn connect_socket(
    to: SocketAddr,
    from: Option<SocketAddr>,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    let family = if to.is_ipv4() {
        socket::AddressFamily::Inet
    } else {
        socket::AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // A blocking connect gives up after the send timeout.
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::seconds(5))?;
    if let Some(mark) = mark {
        mesh_net::set_mark(&fd, mark)?;
    }
    if let Some(from) = from {
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(from))?;
    }
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// Where a redirected connection was going (`SO_ORIGINAL_DST`).
fn original_destination(stream: &TcpStream) -> SocketAddr {
    let local = stream.local_addr().expect("local address");
    if local.is_ipv4() {
        let raw = socket::getsockopt(stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
        SocketAddr::new(
            IpAddr::from(u32::from_be(raw.sin_addr.s_addr).to_be_bytes()),
            u16::from_be(raw.sin_port),
        )
    } else {
        let raw =
            socket::getsockopt(stream, sockopt::Ip6tOriginalDst).expect("IP6T_SO_ORIGINAL_DST");
        SocketAddr::new(
            IpAddr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
        )
    }
}

/// Asserts that a connection from `client` landed on `listener`, for
/// `original` when given (the address it was going to), and carries data.
fn assert_lands(listener: &TcpListener, mut client: TcpStream, original: Option<&str>) {
    let mut accepted = accept(listener).unwrap_or_else(|| {
        panic!(
            "the connection to {:?} never reached {:?}",
            client.peer_addr(),
            listener.local_addr()
        )
    });
    if let Some(original) = original {
        assert_eq!(original_destination(&accepted), addr(original));
    }
    accepted.set_nonblocking(false).expect("blocking");
    accepted.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    client.write_all(b"ping").expect("write");
    let mut buf = [0; 4];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");
}

fn applies_once_replaces_and_removes_cleanly(backend: &Backend) {
    let namespaces = Namespaces::new();
    let pod = namespaces.pod();
    let redirection = &backend.redirection;
    assert!(!redirection.is_applied(&pod).expect("is_applied"));
    redirection
        .remove(&pod)
        .expect("removing what is not there");

    let spec = RedirectSpec::default();
    redirection.apply(&pod, &spec).expect("apply");
    assert!(redirection.is_applied(&pod).expect("is_applied"));
    backend.assert_installed_once(&pod, &spec);
    // The replies' policy route, once per family.
    for family in ["-4", "-6"] {
        let rules = output_in(&pod, &["ip", family, "rule", "show", "pref", "32764"]);
        assert_eq!(
            rules.matches("fwmark 0x111/0xfff lookup 100").count(),
            1,
            "{rules}"
        );
        let routes = output_in(&pod, &["ip", family, "route", "show", "table", "100"]);
        assert!(routes.starts_with("local "), "{routes}");
    }
    redirection.apply(&pod, &spec).expect("apply again");
    assert!(redirection.is_applied(&pod).expect("is_applied"));
    backend.assert_installed_once(&pod, &spec);

    let other = RedirectSpec {
        outbound_port: 16001,
        dns_port: None,
        ..RedirectSpec::default()
    };
    redirection.apply(&pod, &other).expect("apply another spec");
    backend.assert_installed_once(&pod, &other);
    let listing = backend.listing(&pod);
    assert!(listing.contains("16001"), "{listing}");
    assert!(!listing.contains("15001"), "{listing}");
    assert!(!listing.contains("15053"), "{listing}");

    redirection.remove(&pod).expect("remove");
    assert!(!redirection.is_applied(&pod).expect("is_applied"));
    backend.assert_nothing_left(&pod);
    for family in ["-4", "-6"] {
        let rules = output_in(&pod, &["ip", family, "rule", "show", "pref", "32764"]);
        assert!(rules.trim().is_empty(), "{rules}");
    }
    redirection.remove(&pod).expect("remove again");
    backend.assert_nothing_left(&pod);
}

fn redirects_traffic(backend: &Backend) {
    let namespaces = Namespaces::new();
    let (pod, peer) = (namespaces.pod(), namespaces.peer());
    backend
        .redirection
        .apply(&pod, &RedirectSpec::default())
        .expect("apply");

    // The pod's data plane and applications.
    let outbound = listen(&pod, "127.0.0.1:15001");
    let outbound6 = listen(&pod, "[::1]:15001");
    let inbound = listen(&pod, "10.250.1.2:15006");
    let inbound6 = listen(&pod, "[fd00:250:1::2]:15006");
    let hbone = listen(&pod, "0.0.0.0:15008");
    let dns_tcp = listen(&pod, "127.0.0.1:15053");
    let app = listen(&pod, "0.0.0.0:8080");
    let local = listen(&pod, "127.0.0.1:7000");
    let dns_udp = pod
        .enter(|| UdpSocket::bind("127.0.0.1:15053"))
        .expect("enter")
        .expect("bind UDP 15053");
    dns_udp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    // Outside the pod.
    let remote = listen(&peer, "0.0.0.0:9000");

    // Outbound TCP lands on 15001, which learns where it was going.
    let client = connect(&pod, "10.250.0.9:80", None, None);
    assert_lands(&outbound, client, Some("10.250.0.9:80"));
    let client = connect(&pod, "[fd00:250:9::9]:80", None, None);
    assert_lands(&outbound6, client, Some("[fd00:250:9::9]:80"));
    let client = connect(&pod, "10.250.1.1:9000", None, None);
    assert_lands(&outbound, client, Some("10.250.1.1:9000"));
    assert!(nothing_pending(&remote));

    // The data plane's own sockets (mark 1337) go where they were going.
    let client = connect(&pod, "10.250.1.1:9000", None, Some(mesh_net::PROXY_MARK));
    assert_lands(&remote, client, None);
    // So does loopback.
    let client = connect(&pod, "127.0.0.1:7000", None, None);
    assert_lands(&local, client, None);
    assert!(nothing_pending(&outbound));

    // DNS, over UDP and TCP, lands on 15053.
    let resolver = pod
        .enter(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("enter")
        .expect("bind UDP");
    resolver.send_to(b"query", "10.250.0.53:53").expect("send");
    let mut buf = [0; 16];
    let (len, from) = dns_udp
        .recv_from(&mut buf)
        .expect("the query reached 15053");
    assert_eq!(&buf[..len], b"query");
    assert_eq!(from.port(), resolver.local_addr().expect("address").port());
    let client = connect(&pod, "10.250.0.53:53", None, None);
    assert_lands(&dns_tcp, client, Some("10.250.0.53:53"));

    // Inbound TCP lands on 15006, HBONE on 15008, the kubelet's probes on
    // the application.
    let client = connect(&peer, "10.250.1.2:8080", None, None);
    assert_lands(&inbound, client, Some("10.250.1.2:8080"));
    let client = connect(&peer, "[fd00:250:1::2]:8080", None, None);
    assert_lands(&inbound6, client, Some("[fd00:250:1::2]:8080"));
    let client = connect(&peer, "10.250.1.2:15008", None, None);
    assert_lands(&hbone, client, None);
    let client = connect(&peer, "10.250.1.2:8080", Some("169.254.7.127:0"), None);
    assert_lands(&app, client, None);
    assert!(nothing_pending(&inbound));

    // Removed, nothing is redirected.
    backend.redirection.remove(&pod).expect("remove");
    let client = connect(&pod, "10.250.1.1:9000", None, None);
    assert_lands(&remote, client, None);
    let client = connect(&peer, "10.250.1.2:8080", None, None);
    assert_lands(&app, client, None);
}

/// The host's rules, from every program that lists some, without comments.
fn host_rules() -> String {
    let mut listings = vec![
        vec!["nft", "list", "ruleset"],
        vec!["iptables-save"],
        vec!["ip6tables-save"],
    ];
    if Path::new("/usr/sbin/iptables-legacy-save").exists() {
        listings.push(vec!["iptables-legacy-save"]);
        listings.push(vec!["ip6tables-legacy-save"]);
    }
    let host = Netns::current().expect("this thread's namespace");
    listings
        .iter()
        .map(|command| {
            format!(
                "{command:?}:\n{}",
                without_counters(&output_in(&host, command))
            )
        })
        .collect()
}

/// A listing without its packet counters (`[12:3456]` of iptables-save,
/// `counter packets 1 bytes 60` of nft), which move with any traffic on the
/// host, other tests' included.
fn without_counters(listing: &str) -> String {
    listing
        .lines()
        .map(|line| {
            let line = match (line.find(" ["), line.starts_with(':')) {
                (Some(at), true) => &line[..at],
                _ => line,
            };
            match line.find("counter packets") {
                Some(at) => line[..at].to_owned(),
                None => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn leaves_the_hosts_rules_alone(backend: &Backend) {
    let before = host_rules();
    let namespaces = Namespaces::new();
    let pod = namespaces.pod();
    backend
        .redirection
        .apply(&pod, &RedirectSpec::default())
        .expect("apply");
    assert_eq!(host_rules(), before, "applied in the pod");
    backend.redirection.remove(&pod).expect("remove");
    drop(namespaces);
    assert_eq!(host_rules(), before, "removed in the pod");
}

fn an_open_namespace_whose_name_was_deleted_still_works(backend: &Backend) {
    let namespaces = Namespaces::new();
    let pod = namespaces.pod();
    let path = format!("/var/run/netns/{}", namespaces.pod);
    drop(namespaces);
    // The descriptor keeps the namespace alive: rules go in and out.
    backend
        .redirection
        .apply(&pod, &RedirectSpec::default())
        .expect("apply");
    assert!(backend.redirection.is_applied(&pod).expect("is_applied"));
    backend.redirection.remove(&pod).expect("remove");
    // Its name is gone: opening it again says which.
    let err = Netns::open(&path).expect_err("deleted");
    assert!(err.to_string().contains(&path), "{err}");
}

fn an_invalid_spec_is_refused_before_anything_runs(backend: &Backend) {
    let namespaces = Namespaces::new();
    let pod = namespaces.pod();
    let spec = RedirectSpec {
        mark: 0x1_0000,
        ..RedirectSpec::default()
    };
    let err = backend.redirection.apply(&pod, &spec).expect_err("invalid");
    assert!(matches!(err, RedirectError::InvalidSpec { .. }), "{err}");
    assert!(!backend.redirection.is_applied(&pod).expect("is_applied"));
}

/// One test per backend for each scenario.
macro_rules! for_each_backend {
    ($($scenario:ident),* $(,)?) => {
        for_each_backend!(@backend nftables, $($scenario),*);
        for_each_backend!(@backend iptables, $($scenario),*);
        for_each_backend!(@backend iptables_legacy, $($scenario),*);
    };
    (@backend $backend:ident, $($scenario:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $scenario() {
                    match super::$backend() {
                        Some(backend) => super::$scenario(&backend),
                        None => println!("{} is not installed: skipped", stringify!($backend)),
                    }
                }
            )*
        }
    };
}

for_each_backend!(
    applies_once_replaces_and_removes_cleanly,
    redirects_traffic,
    leaves_the_hosts_rules_alone,
    an_open_namespace_whose_name_was_deleted_still_works,
    an_invalid_spec_is_refused_before_anything_runs,
);

#[test]
fn a_missing_program_is_named() {
    let namespaces = Namespaces::new();
    let pod = namespaces.pod();
    let nft = Nftables::with_program("/nonexistent/nft");
    let err = nft
        .apply(&pod, &RedirectSpec::default())
        .expect_err("no such program");
    assert!(
        matches!(err, RedirectError::ProgramNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "nftables in {pod}: program `/nonexistent/nft` not found (install it, or configure \
             its path)"
        )
    );
    for err in [nft.remove(&pod), nft.is_applied(&pod).map(drop)] {
        let err = err.expect_err("no such program").to_string();
        assert!(err.contains("/nonexistent/nft"), "{err}");
    }

    let iptables = IptablesRestore::new()
        .ipv4_programs("iptables-restore", "/nonexistent/iptables-save")
        .without_ipv6();
    let err = iptables
        .apply(&pod, &RedirectSpec::default())
        .expect_err("no such program")
        .to_string();
    assert!(err.starts_with(&format!("iptables in {pod}: ")), "{err}");
    assert!(err.contains("/nonexistent/iptables-save"), "{err}");
}

#[test]
fn a_failing_program_is_quoted() {
    let namespaces = Namespaces::new();
    let pod = namespaces.pod();
    let dir = tempfile::tempdir().expect("temporary directory");
    let fake = dir.path().join("nft");
    std::fs::write(&fake, "#!/bin/sh\necho \"boom: $*\" >&2\nexit 3\n").expect("write");
    let mut permissions = std::fs::metadata(&fake).expect("metadata").permissions();
    permissions.set_mode(0o755);
    std::fs::set_permissions(&fake, permissions).expect("chmod");

    let nft = Nftables::with_program(&fake);
    let err = nft
        .apply(&pod, &RedirectSpec::default())
        .expect_err("it fails");
    assert_eq!(
        err.to_string(),
        format!(
            "nftables in {pod}: `{} -f -` failed (exit status: 3): boom: -f -",
            fake.display()
        )
    );
    // Not "not applied": a failure to read is an error.
    let err = nft.is_applied(&pod).expect_err("it fails").to_string();
    assert!(err.contains("boom: list table inet podless"), "{err}");
}
