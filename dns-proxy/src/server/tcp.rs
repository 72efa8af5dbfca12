//! DNS over TCP (RFC 1035 §4.2.2, RFC 7766): each message carries a two-byte
//! length. Connections come through [`Acceptor`]: the first question must
//! arrive within the handshake deadline, the connections still waiting for
//! one are bounded (in all and per client address; a newer one ends the
//! oldest),
//! and a process out of file descriptors backs off. Questions on a connection
//! are answered one after another (a message larger than
//! [`MAX_QUERY_BYTES`](super::MAX_QUERY_BYTES)
//! gets FORMERR); a connection idle for [`TCP_IDLE`] between questions is
//! closed.

use std::net::SocketAddr;

use mesh_net::{Acceptor, Handshake};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Handler, TCP_IDLE};

/// Accepts and serves connections until `shutdown`, then waits for them.
pub(super) async fn serve_tcp(
    handler: Handler,
    mut acceptor: Acceptor,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (stream, client, handshake) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            tokio::select! {
                () = connection(&handler, stream, client, handshake) => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Answers the questions of one connection until it closes, goes idle, or
/// breaks the rules.
async fn connection(
    handler: &Handler,
    mut stream: TcpStream,
    client: SocketAddr,
    handshake: Handshake,
) {
    let mut buffer = Vec::new();
    // The first question is the handshake: then its place is free again.
    let first = handshake
        .within(read_message(&mut stream, &mut buffer))
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
        match tokio::time::timeout_at(deadline, read_message(&mut stream, &mut buffer)).await {
            Ok(Ok(true)) => {}
            // Closed, idle too long, or failed: nothing to answer.
            Ok(Ok(false) | Err(_)) | Err(_) => return,
        }
    }
}

/// Reads one length-prefixed message into `buffer`: `false` when the client
/// closed the connection before one began.
async fn read_message(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut length = [0u8; 2];
    match stream.read_exact(&mut length).await {
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
