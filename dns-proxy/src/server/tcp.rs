//! DNS over TCP (RFC 1035 §4.2.2, RFC 7766): each message carries a two-byte
//! length. Connections come through [`Acceptor`]: the first question must
//! arrive within the handshake deadline, the connections still waiting for
//! one are bounded (in all and per client address; a newer one ends the
//! oldest),
//! and a process out of file descriptors backs off. Questions on a connection
//! are answered one after another (a message larger than
//! [`MAX_QUERY_BYTES`](super::MAX_QUERY_BYTES)
//! gets FORMERR); a connection idle for [`TCP_IDLE`] between questions is
//! closed. At most [`MAX_CONNECTIONS`] connections are open at once; past
//! that a new one is closed at once (and that logged at a bounded rate), so
//! clients that ask a question every few seconds cannot pile connections up
//! to the file-descriptor limit. During a drain, a connection finishes the
//! question it is receiving or answering, then closes instead of waiting for
//! another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_net::{Acceptor, Handshake, Throttle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Handler, Lifecycle, TCP_IDLE};

/// The most TCP connections open at once.
pub(super) const MAX_CONNECTIONS: usize = 1024;

/// Accepts connections until `life.draining` (the listener then closes), and
/// serves each in a task of `life.work` until it closes or `life.stop`.
pub(super) async fn serve_tcp(handler: Handler, mut acceptor: Acceptor, life: Lifecycle) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused_log = Throttle::new(Duration::from_secs(5));
    loop {
        let (stream, client, handshake) = tokio::select! {
            biased;
            () = life.draining.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        let Ok(place) = open.clone().try_acquire_owned() else {
            drop((stream, handshake));
            if let Some(refused) = refused_log.tick() {
                tracing::warn!(%client, refused, "DNS over TCP: {MAX_CONNECTIONS} connections open, a new one closed");
            }
            continue;
        };
        let handler = handler.clone();
        let draining = life.draining.clone();
        let stop = life.stop.clone();
        life.work.spawn(async move {
            let _place = place;
            tokio::select! {
                () = connection(&handler, stream, client, handshake, &draining) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Answers the questions of one connection until it closes, goes idle, or
/// breaks the rules; once `draining`, until no question has begun arriving.
async fn connection(
    handler: &Handler,
    mut stream: TcpStream,
    client: SocketAddr,
    handshake: Handshake,
    draining: &CancellationToken,
) {
    let mut buffer = Vec::new();
    // The first question is the handshake: then its place is free again.
    let first = handshake
        .within(read_message(&mut stream, &mut buffer, draining))
        .await;
    drop(handshake);
    if !matches!(first, Ok(Ok(true))) {
        return;
    }
    loop {
        if let Some(answer) = handler.answer(&buffer, client).await
            && write_message(&mut stream, &answer).await.is_err()
        {
            return;
        }
        let deadline = Instant::now() + TCP_IDLE;
        let next = read_message(&mut stream, &mut buffer, draining);
        match tokio::time::timeout_at(deadline, next).await {
            Ok(Ok(true)) => {}
            // Closed, idle too long, or failed: nothing to answer.
            Ok(Ok(false) | Err(_)) | Err(_) => return,
        }
    }
}

/// Reads one length-prefixed message into `buffer`: `false` when the client
/// closed the connection before one began, or `draining` was cancelled
/// while waiting for one to begin (one that has begun arriving is read to
/// its end).
async fn read_message(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    draining: &CancellationToken,
) -> std::io::Result<bool> {
    let mut length = [0u8; 2];
    let first = tokio::select! {
        biased;
        read = stream.read(&mut length[..1]) => read?,
        () = draining.cancelled() => return Ok(false),
    };
    if first == 0 {
        return Ok(false);
    }
    match stream.read_exact(&mut length[1..]).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(err) => return Err(err),
    }
    buffer.resize(usize::from(u16::from_be_bytes(length)), 0);
    stream.read_exact(buffer).await?;
    Ok(true)
}

/// Writes `message` with its length, in one write.
async fn write_message(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let length = u16::try_from(message.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}
