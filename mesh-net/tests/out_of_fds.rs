//! A listener whose process runs out of file descriptors backs off instead of
//! spinning on `accept`, and serves again once descriptors are free. Its own
//! test binary: it lowers this process's descriptor limit.

use std::time::Duration;

use mesh_net::{Acceptor, HandshakeLimits};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::{TcpListener, TcpStream};

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64
}

#[tokio::test(flavor = "current_thread")]
async fn accept_backs_off_while_out_of_descriptors_and_recovers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let mut acceptor = Acceptor::new(listener, "test", HandshakeLimits::default());
    // Room for a few more descriptors only.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 8, hard).expect("setrlimit");
    // Clients until no descriptor is left: the last ones wait in the
    // listener's queue, which `accept` cannot take for want of a descriptor.
    let mut clients = Vec::new();
    loop {
        match TcpStream::connect(address).await {
            Ok(client) => clients.push(client),
            Err(err) if err.raw_os_error() == Some(24) => break,
            Err(err) => panic!("connect: {err}"),
        }
    }
    assert!(!clients.is_empty());
    // For about a second every accept fails with EMFILE.
    let stalled = tokio::time::timeout(Duration::from_secs(1), acceptor.accept()).await;
    assert!(stalled.is_err(), "no descriptor to accept with");
    let failures = acceptor.accept_failures();
    assert!(failures >= 1, "accept failed");
    // Backing off (10 ms doubling): a handful of tries, where a spinning
    // loop makes hundreds of thousands.
    assert!(failures <= 12, "{failures} accept attempts in a second");
    // Descriptors free again: the queued connections are served.
    clients.truncate(clients.len() - 4);
    let (_stream, _peer, _handshake) = acceptor.accept().await;
}
