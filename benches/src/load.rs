//! Load for the benchmarks, from inside network namespaces: runtimes whose
//! threads live in one, echo and sink applications, and the clients that
//! measure throughput, request/response latency and connection rate.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::stats::percentile;

/// The mark that keeps a plain-baseline client's sockets out of the redirect
/// rules (the data plane's own, 1337).
pub const BYPASS_MARK: u32 = 1337;

/// A multi-threaded runtime whose threads live in the network namespace at
/// `netns` (a path, e.g. `/var/run/netns/<name>`).
pub fn runtime_in(netns: &str) -> tokio::runtime::Runtime {
    let path = netns.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        // Worker threads are created from this thread: they inherit its namespace.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
    .join()
    .expect("runtime thread")
}

/// Runs `future` on one of `runtime`'s workers (inside its namespace), not on
/// the calling thread as `block_on` alone would.
pub fn on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> T {
    runtime
        .block_on(runtime.spawn(future))
        .expect("the task finished")
}

/// Echoes every connection's bytes back, until the listener fails.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.split();
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
            let _ = writer.shutdown().await;
        });
    }
}

/// Reads until EOF, then answers with the byte count.
pub async fn serve_sink(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(&total.to_be_bytes()).await;
        });
    }
}

/// Connects to `to` with `TCP_NODELAY`; with `bypass`, from a socket marked
/// [`BYPASS_MARK`] (out of the redirect rules).
pub async fn connect(to: SocketAddr, bypass: bool) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if bypass {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &BYPASS_MARK)
            .map_err(std::io::Error::from)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(to).await
}

/// Sends for `seconds` on each of `streams` connections: the bytes received
/// and the time taken.
pub async fn bulk(to: SocketAddr, bypass: bool, streams: usize, seconds: u64) -> (u64, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut stream = connect(to, bypass).await.expect("connect");
            let chunk = vec![0x5au8; 256 << 10];
            while Instant::now() < deadline {
                stream.write_all(&chunk).await.expect("send");
            }
            stream.shutdown().await.expect("shutdown");
            let mut count = [0u8; 8];
            stream.read_exact(&mut count).await.expect("count");
            u64::from_be_bytes(count)
        }));
    }
    let mut total = 0u64;
    for task in tasks {
        total += task.await.expect("stream");
    }
    (total, started.elapsed())
}

/// Round trips measured in the request/response test.
pub const ROUND_TRIPS: usize = 5000;
/// Round trips made before those measured.
pub const RR_WARM_UP: usize = 200;

/// A round-trip latency distribution.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    /// The median.
    pub p50: Duration,
    /// The 90th percentile.
    pub p90: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The 99.9th percentile.
    pub p999: Duration,
}

/// 1 KiB request/response on one connection.
pub async fn request_response(to: SocketAddr, bypass: bool, count: usize) -> Latency {
    let mut stream = connect(to, bypass).await.expect("connect");
    let request = vec![7u8; 1024];
    let mut response = vec![0u8; 1024];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + RR_WARM_UP {
        let started = Instant::now();
        stream.write_all(&request).await.expect("request");
        stream.read_exact(&mut response).await.expect("response");
        if i >= RR_WARM_UP {
            samples.push(started.elapsed());
        }
    }
    let at = |p: f64| percentile(&samples, p).expect("samples");
    Latency {
        p50: at(50.0),
        p90: at(90.0),
        p99: at(99.0),
        p999: at(99.9),
    }
}

/// Connect, 1-byte echo, close, from `parallel` loops for `seconds`:
/// connections per second.
/// Returns how many connections completed, and in what time.
pub async fn connection_rate(
    to: SocketAddr,
    bypass: bool,
    parallel: usize,
    seconds: u64,
) -> (u64, Duration) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut stream = connect(to, bypass).await.expect("connect");
                stream.write_all(b"x").await.expect("write");
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.expect("echo");
                drop(stream);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("loop");
    }
    (done.load(Ordering::Relaxed), started.elapsed())
}

/// Opens `count` connections through the mesh, each with one exchange.
pub async fn open_many(to: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = connect(to, false).await.expect("connect");
        stream.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("echo");
        open.push(stream);
    }
    open
}
