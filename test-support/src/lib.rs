//! What podless's tests share, so each crate's tests stay about their crate:
//!
//! - [`example`]: the path of an example binary cargo built with the tests
//!   (tests never run cargo themselves), and [`help`]: its `--help` text;
//! - [`Ended`], [`ended`], [`still_open`], [`connect_from`]: how a server
//!   treated a connection (reset, closed, or still holding it), from a chosen
//!   loopback address;
//! - [`Captured`]: log lines written while a test's subscriber is set.
//!
//! A dev-dependency only; not published.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The example `name` of `package`, next to the running test's `deps/`
/// folder: cargo builds a package's examples with its tests (`cargo test`,
/// `cargo nextest run`), and the workspace's with the workspace's tests.
/// Panics, saying how to build it, when it is not there.
pub fn example(package: &str, name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("test path");
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("profile dir");
    let binary = profile_dir.join("examples").join(name);
    assert!(
        binary.exists(),
        "{} is not built: run the tests with cargo nextest run -p {package} (or --workspace), \
         which builds it, or cargo build -p {package} --example {name}",
        binary.display()
    );
    binary
}

/// What `binary --help` prints; panics unless it exits successfully.
pub fn help(binary: &Path) -> String {
    let output = std::process::Command::new(binary)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(output.status.success(), "--help failed: {output:?}");
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// How a server ended a connection, as its client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Reset (RST).
    Reset,
    /// Closed (FIN).
    Closed,
}

/// Waits for the server to end `stream`, reading and discarding what it
/// sends; a reset before the connect finished counts as a reset. Bounded (by
/// `patience`), so a connection left open fails the test instead of hanging
/// it.
pub async fn ended(stream: io::Result<TcpStream>, patience: Duration) -> Ended {
    let mut stream = match stream {
        Ok(stream) => stream,
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return Ended::Reset,
        Err(err) => panic!("connect: {err}"),
    };
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(patience, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open"),
            Ok(Ok(0)) => return Ended::Closed,
            Ok(Ok(_)) => {}
            Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionReset => return Ended::Reset,
            Ok(Err(err)) => panic!("unexpected error {err}"),
        }
    }
}

/// Whether the server still holds `stream` open: nothing read, no end, for
/// a moment (300 ms).
pub async fn still_open(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte))
        .await
        .is_err()
}

/// A TCP connection to `to` from the local address `source` (a loopback
/// address other than 127.0.0.1 stands for another client).
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// A SOCKS5 CONNECT (no authentication) through the listener at `socks5` to
/// the IPv4 `target`: the reply code (0 is success) and the stream.
pub async fn socks5(socks5: SocketAddr, target: SocketAddr) -> io::Result<(u8, TcpStream)> {
    let mut stream = TcpStream::connect(socks5).await?;
    stream.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice != [5, 0] {
        return Err(io::Error::other(format!("SOCKS5 method choice {choice:?}")));
    }
    let SocketAddr::V4(v4) = target else {
        return Err(io::Error::other("an IPv4 target only"));
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await?;
    Ok((reply[1], stream))
}

/// Opens `opened` idle connections to `address` from `source`, against a
/// listener that lets fewer of them wait in handshake: asserts that the
/// `closed` oldest are closed to make room (within 20 s) and the rest still
/// wait.
pub async fn assert_oldest_crowded_out(
    address: SocketAddr,
    source: IpAddr,
    opened: usize,
    closed: usize,
) {
    let mut idle = Vec::new();
    for _ in 0..opened {
        idle.push(connect_from(source, address).await.expect("connect"));
    }
    for stream in idle.drain(..closed) {
        assert_eq!(
            ended(Ok(stream), Duration::from_secs(20)).await,
            Ended::Closed,
            "one of the oldest in handshake"
        );
    }
    for stream in &mut idle {
        assert!(still_open(stream).await, "the newest wait for the deadline");
    }
}

/// Log lines written while it is a subscriber's writer (e.g.
/// `tracing_subscriber::fmt().with_writer(move || captured.clone())`).
#[derive(Clone, Debug, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Captures what this thread logs (plain text, no colours) until the
    /// guard is dropped: for a `current_thread` test, whose spawned tasks
    /// run on its thread too.
    pub fn install() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
