//! Bytes both ways between a TCP connection and an HBONE stream, each
//! direction closed on its own (half-close): the TCP peer's FIN ends the
//! stream's sending side (an empty DATA frame with END_STREAM), and the
//! stream's END_STREAM shuts the TCP connection's write side (unless the TCP
//! peer had already finished: then nothing is left to carry, and the close
//! that follows sends the FIN, one syscall fewer). A reset or read error on
//! either side aborts both.
//!
//! Flow control is HTTP/2's: data received is released back to the peer once
//! written to TCP, and data is sent only within the capacity granted.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// more). Only a connection moving bulk data holds a buffer this large, and
/// only while its socket has more to give.
///
/// Reads are sized so that a full read's DATA frame, header included, fills
/// whole TLS records: a round size would leave its last 9 bytes to a record
/// of their own, often written by a syscall of their own.
const READ_CHUNK: usize = 16 * TLS_RECORD - FRAME_HEADER;
/// The first read's size: small, so short exchanges cost little memory.
const FIRST_CHUNK: usize = TLS_RECORD - FRAME_HEADER;

/// Bytes moved by a finished copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// From the TCP connection into the stream.
    pub tcp_to_stream: u64,
    /// From the stream into the TCP connection.
    pub stream_to_tcp: u64,
}

/// Copies until both directions ended. On error, the stream is reset (the
/// TCP connection is dropped by the caller, reset with linger 0 if it wants).
/// On success the caller drops `tcp` next: if the TCP peer finished first,
/// that close is what sends the FIN.
pub async fn copy_bidirectional(
    tcp: &mut TcpStream,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
) -> io::Result<Copied> {
    let (reader, writer) = tcp.split();
    let tcp_finished = AtomicBool::new(false);
    let outcome = tokio::try_join!(
        tcp_to_stream(reader, send, &tcp_finished),
        stream_to_tcp(recv, writer, &tcp_finished)
    );
    match outcome {
        Ok((tcp_to_stream, stream_to_tcp)) => Ok(Copied {
            tcp_to_stream,
            stream_to_tcp,
        }),
        Err(err) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(err)
        }
    }
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
/// `finished` is set once the peer's FIN is read.
async fn tcp_to_stream(
    mut reader: ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    finished: &AtomicBool,
) -> io::Result<u64> {
    let mut chunk_size = FIRST_CHUNK;
    let mut buffer = BytesMut::new();
    let mut total = 0u64;
    loop {
        let mut chunk =
            poll_fn(|cx| poll_read_chunk(&mut reader, cx, &mut buffer, chunk_size)).await?;
        if chunk.is_empty() {
            finished.store(true, Ordering::Relaxed);
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(total);
        }
        total += chunk.len() as u64;
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
/// TCP peer has `finished` (the caller's close is about to).
async fn stream_to_tcp(
    recv: &mut RecvStream,
    mut writer: WriteHalf<'_>,
    tcp_finished: &AtomicBool,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        writer.write_all(&data).await?;
        total += data.len() as u64;
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(h2_error)?;
    }
    // A reset after the data shows up as trailers' error.
    if let Err(err) = poll_fn(|cx| recv.poll_trailers(cx)).await {
        return Err(h2_error(err));
    }
    if !tcp_finished.load(Ordering::Relaxed) {
        writer.shutdown().await?;
    }
    Ok(total)
}

/// An HTTP/2 error as I/O.
pub(crate) fn h2_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io().unwrap_or_else(|| io::Error::other("h2 I/O"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, err)
    }
}
