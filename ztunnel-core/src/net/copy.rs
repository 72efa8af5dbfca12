//! Bytes both ways between a TCP connection and an HBONE stream, each
//! direction closed on its own (half-close): the TCP peer's FIN ends the
//! stream's sending side (an empty DATA frame with END_STREAM), and the
//! stream's END_STREAM shuts the TCP connection's write side. When the TCP
//! peer had finished first, that is the copy's last step: the write side is
//! left to the caller's close, which sends the FIN anyway (one syscall
//! fewer), and [`Progress::tcp_write_open`] says so. A reset or read error on
//! either side aborts both.
//!
//! The bytes moved are counted in a [`Progress`] the caller owns, so they
//! are known also when the copy fails, or is dropped by a caller that goes
//! on (a connection that policy now denies): a connection reset after moving
//! data still reports what it moved.
//!
//! Flow control is HTTP/2's: data received is released back to the peer once
//! written to TCP, and data is sent only within the capacity granted.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

/// The largest TLS record's plaintext (TLS 1.3, no record size limit).
const TLS_RECORD: usize = 16 << 10;
/// An HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// The largest read per direction: large reads mean fewer, larger DATA
/// frames, fewer syscalls and fewer wake-ups per byte for both proxies and
/// their peers. 256 KiB against 64 KiB, on the 2-core bench machine: 4% less
/// CPU per byte with one stream, 9% with eight (512 KiB gained nothing
/// more); ztunnel's own copy grows to the same size. Only a connection
/// moving bulk data holds a buffer this large: reads grow to it only while
/// they come back full, and it is held until the frame it became is sent
/// (within HTTP/2 flow control). A frame is written whole, so a small
/// message on another stream of the same pooled connection may wait behind
/// one: up to 256 KiB of bulk data instead of 64 KiB.
///
/// Reads are sized so that a full read's DATA frame, header included, fills
/// whole TLS records: a round size would leave its last 9 bytes to a record
/// of their own, often written by a syscall of their own.
const READ_CHUNK: usize = 16 * TLS_RECORD - FRAME_HEADER;
/// The first read's size: small, so short exchanges cost little memory.
const FIRST_CHUNK: usize = TLS_RECORD - FRAME_HEADER;

/// How far a copy has got: the bytes it read from and wrote to the TCP
/// connection so far, and (for its two directions) the TCP side's state.
/// Readable at any time, also after the copy failed or was dropped. One per
/// copy (the TCP side's state is that copy's).
#[derive(Debug)]
pub struct Progress {
    read: AtomicU64,
    written: AtomicU64,
    tcp: AtomicU8,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            tcp: AtomicU8::new(TCP_READING),
        }
    }
}

impl Progress {
    /// Bytes read from the TCP connection (counted as read: after a failure,
    /// the last of them may not have been passed on).
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written to the TCP connection.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// After a copy that succeeded: whether it left the TCP write side open
    /// for the caller's close (the TCP peer finished first), so the FIN goes
    /// with the close. A caller that keeps the connection open after a copy
    /// shuts it down itself. Not meaningful after a failure.
    pub fn tcp_write_open(&self) -> bool {
        self.tcp.load(Ordering::Relaxed) == TCP_WRITE_LEFT_OPEN
    }

    /// Counts `bytes` more read from the TCP connection.
    pub(crate) fn count_read(&self, bytes: usize) {
        self.read.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `bytes` more written to the TCP connection.
    pub(crate) fn count_written(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// How far the TCP side has got, shared by the two directions.
const TCP_READING: u8 = 0;
/// The TCP peer's FIN was read.
const TCP_FINISHED: u8 = 1;
/// ... and then the stream ended: the write side is left to the close.
const TCP_WRITE_LEFT_OPEN: u8 = 2;

/// Copies until both directions ended, counting into `progress`. On error,
/// the stream is reset with `CONNECT_ERROR`, as RFC 9113 §8.5 has a proxy
/// report a failed TCP connection (the TCP connection is dropped by the
/// caller, reset with linger 0 if it wants). On success, see [`Progress::tcp_write_open`].
pub async fn copy_bidirectional(
    tcp: &mut TcpStream,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    progress: &Progress,
) -> io::Result<()> {
    let (reader, writer) = tcp.split();
    let outcome = tokio::try_join!(
        tcp_to_stream(reader, send, progress),
        stream_to_tcp(recv, writer, progress)
    );
    if outcome.is_err() {
        send.send_reset(h2::Reason::CONNECT_ERROR);
    }
    outcome.map(|((), ())| ())
}

/// TCP → stream until the TCP peer's FIN, then END_STREAM.
///
/// Memory follows the traffic: nothing is allocated until the socket is
/// readable, and an idle connection holds no buffer. Reads start at
/// [`FIRST_CHUNK`] into a buffer on the thread's stack, copied out into an
/// allocation of the read's own size, so a short message costs a few bytes
/// rather than a mostly empty 16 KiB block (which would also fragment the
/// heap between long-lived connections). Reads that fill it double up to
/// [`READ_CHUNK`], read in place; a read shorter than the first size goes
/// back to it.
///
/// A read shorter than asked for means the socket is drained (tokio's reads
/// then wait for the next readiness event), so a message costs one read, not
/// a second one that finds nothing.
///
/// The TCP side becomes [`TCP_FINISHED`] once the peer's FIN is read.
async fn tcp_to_stream(
    mut reader: ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    progress: &Progress,
) -> io::Result<()> {
    let mut chunk_size = FIRST_CHUNK;
    let mut buffer = BytesMut::new();
    loop {
        let mut chunk =
            poll_fn(|cx| poll_read_chunk(&mut reader, cx, &mut buffer, chunk_size)).await?;
        if chunk.is_empty() {
            progress.tcp.store(TCP_FINISHED, Ordering::Relaxed);
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(());
        }
        progress.count_read(chunk.len());
        if chunk.len() < chunk_size {
            // A short read: the peer may now go quiet. An idle connection
            // keeps no buffer; a small message starts small again.
            buffer = BytesMut::new();
            if chunk.len() < FIRST_CHUNK {
                chunk_size = FIRST_CHUNK;
            }
        } else if chunk_size < READ_CHUNK {
            chunk_size = (chunk_size + FRAME_HEADER) * 2 - FRAME_HEADER;
        }
        send.reserve_capacity(chunk.len());
        while !chunk.is_empty() {
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted.map_err(h2_error)?,
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            send.send_data(part, false).map_err(h2_error)?;
        }
    }
}

/// One read of at most `chunk_size` bytes once the socket is readable;
/// empty at the end of the stream. The first size reads into the stack (only
/// for the length of this call: nothing is held while waiting) and copies
/// out what came; larger ones read into `buffer` in place.
fn poll_read_chunk(
    reader: &mut ReadHalf<'_>,
    cx: &mut Context<'_>,
    buffer: &mut BytesMut,
    chunk_size: usize,
) -> Poll<io::Result<Bytes>> {
    if chunk_size <= FIRST_CHUNK {
        return poll_read_small(Pin::new(reader), cx, chunk_size);
    }
    // Readable before the buffer is taken: a waiting connection holds none.
    ready!(reader.as_ref().poll_read_ready(cx))?;
    buffer.reserve(chunk_size);
    ready!(tokio_util::io::poll_read_buf(
        Pin::new(reader),
        cx,
        &mut buffer.limit(chunk_size)
    ))?;
    Poll::Ready(Ok(buffer.split().freeze()))
}

/// One read of at most `size` (up to [`FIRST_CHUNK`]) bytes into the stack,
/// copied out into an allocation of the read's own size.
fn poll_read_small(
    reader: Pin<&mut impl AsyncRead>,
    cx: &mut Context<'_>,
    size: usize,
) -> Poll<io::Result<Bytes>> {
    // Uninitialised: the read fills what it returns (no 16 KiB memset per
    // read).
    let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_CHUNK];
    let mut read = ReadBuf::uninit(&mut stack[..size.min(FIRST_CHUNK)]);
    ready!(reader.poll_read(cx, &mut read))?;
    Poll::Ready(Ok(Bytes::copy_from_slice(read.filled())))
}

/// What `tcp`'s peer has already sent, up to one TLS record's worth, without
/// waiting: `None` if nothing is there yet or the peer has finished sending
/// (its FIN stays for the copy to see). Sent along with a CONNECT request,
/// a client's first bytes save the round trip to the server's answer.
pub async fn ready_bytes(tcp: &mut TcpStream) -> io::Result<Option<Bytes>> {
    poll_fn(
        |cx| match poll_read_small(Pin::new(&mut *tcp), cx, FIRST_CHUNK) {
            Poll::Ready(read) => {
                Poll::Ready(read.map(|bytes| (!bytes.is_empty()).then_some(bytes)))
            }
            Poll::Pending => Poll::Ready(Ok(None)),
        },
    )
    .await
}

/// Stream → TCP until END_STREAM, then shuts the TCP write side, unless the
/// TCP peer has finished already: then it marks the write side
/// [`TCP_WRITE_LEFT_OPEN`] for the caller's close.
async fn stream_to_tcp(
    recv: &mut RecvStream,
    mut writer: WriteHalf<'_>,
    progress: &Progress,
) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        writer.write_all(&data).await?;
        progress.count_written(data.len());
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(h2_error)?;
    }
    // A reset after the data shows up as trailers' error.
    if let Err(err) = poll_fn(|cx| recv.poll_trailers(cx)).await {
        return Err(h2_error(err));
    }
    let peer_finished = progress
        .tcp
        .compare_exchange(
            TCP_FINISHED,
            TCP_WRITE_LEFT_OPEN,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_ok();
    if !peer_finished {
        writer.shutdown().await?;
    }
    Ok(())
}

/// An HTTP/2 error as I/O.
pub(crate) fn h2_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io().unwrap_or_else(|| io::Error::other("h2 I/O"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tcp_pair;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    /// An HTTP/2 stream over memory: the server's ends (for the copy), and
    /// the client's (the peer proxy).
    async fn stream_pair() -> (
        (SendStream<Bytes>, RecvStream),
        (SendStream<Bytes>, RecvStream),
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let client = async {
            let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
            tokio::spawn(connection);
            let mut sender = sender.ready().await.unwrap();
            let request = http::Request::builder()
                .uri("http://peer/")
                .body(())
                .unwrap();
            let (response, send) = sender.send_request(request, false).unwrap();
            (response, send)
        };
        let server = async {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            (send, request.into_body())
        };
        let ((response, client_send), server_ends) = tokio::join!(client, server);
        let client_recv = response.await.unwrap().into_body();
        (server_ends, (client_send, client_recv))
    }

    async fn read_all(recv: &mut RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(data) = recv.data().await {
            let data = data.unwrap();
            recv.flow_control().release_capacity(data.len()).unwrap();
            all.extend_from_slice(&data);
        }
        all
    }

    /// A copy running between the proxy's end of a TCP connection and the
    /// server's ends of a stream: the application's end, the peer's ends,
    /// what the copy counted, and the copy (which hands back the proxy's end).
    struct Running {
        application: TcpStream,
        peer_send: SendStream<Bytes>,
        peer_recv: RecvStream,
        progress: Arc<Progress>,
        copy: tokio::task::JoinHandle<(io::Result<()>, TcpStream)>,
    }

    async fn running() -> Running {
        let (mut proxy_tcp, application) = tcp_pair().await;
        let ((mut send, mut recv), (peer_send, peer_recv)) = stream_pair().await;
        let progress = Arc::new(Progress::default());
        let counted = progress.clone();
        let copy = tokio::spawn(async move {
            let copied = copy_bidirectional(&mut proxy_tcp, &mut send, &mut recv, &counted).await;
            (copied, proxy_tcp)
        });
        Running {
            application,
            peer_send,
            peer_recv,
            progress,
            copy,
        }
    }

    #[tokio::test]
    async fn a_tcp_peer_that_finished_first_gets_its_fin_from_the_close() {
        let mut run = running().await;
        run.application.write_all(b"request").await.unwrap();
        run.application.shutdown().await.unwrap();
        assert_eq!(read_all(&mut run.peer_recv).await, b"request");
        run.peer_send
            .send_data(Bytes::from_static(b"answer"), true)
            .unwrap();
        let (copied, proxy_tcp) = run.copy.await.unwrap();
        copied.unwrap();
        let progress = run.progress;
        assert_eq!((progress.read(), progress.written()), (7, 6));
        assert!(
            progress.tcp_write_open(),
            "no shutdown once the peer had finished"
        );
        drop(proxy_tcp);
        let mut answer = Vec::new();
        run.application.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer", "the close delivered the FIN");
    }

    #[tokio::test]
    async fn a_stream_that_ends_first_half_closes_the_tcp_connection() {
        let mut run = running().await;
        run.peer_send
            .send_data(Bytes::from_static(b"request"), true)
            .unwrap();
        // EOF while the copy still runs: the write side was shut down.
        let mut request = Vec::new();
        run.application.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        run.application.write_all(b"late answer").await.unwrap();
        run.application.shutdown().await.unwrap();
        assert_eq!(read_all(&mut run.peer_recv).await, b"late answer");
        run.copy.await.unwrap().0.unwrap();
        let progress = run.progress;
        assert_eq!((progress.read(), progress.written()), (11, 7));
        assert!(!progress.tcp_write_open());
    }

    #[tokio::test]
    async fn a_reset_stream_still_counts_what_went_before() {
        let mut run = running().await;
        run.application.write_all(b"request").await.unwrap();
        let first = run.peer_recv.data().await.unwrap().unwrap();
        assert_eq!(first, "request");
        run.peer_send
            .send_data(Bytes::from_static(b"partial"), false)
            .unwrap();
        let mut partial = [0u8; 7];
        run.application.read_exact(&mut partial).await.unwrap();
        run.peer_send.send_reset(h2::Reason::INTERNAL_ERROR);
        assert!(
            run.copy.await.unwrap().0.is_err(),
            "the reset fails the copy"
        );
        assert_eq!((run.progress.read(), run.progress.written()), (7, 7));
    }
}
