//! Bytes both ways between two TCP connections, without a tunnel (traffic to
//! destinations outside the mesh, callers outside it), counted as they are
//! read from and written to the first connection: a connection that fails
//! still reports what it moved.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::copy::Progress;

/// Copies between `tcp` and `other` until both directions ended (each
/// half-closed on its own), counting `tcp`'s bytes into `progress`.
pub async fn copy_plain(
    tcp: &mut TcpStream,
    other: &mut TcpStream,
    progress: &Progress,
) -> io::Result<()> {
    let mut counted = Counted {
        inner: tcp,
        progress,
    };
    tokio::io::copy_bidirectional(&mut counted, other)
        .await
        .map(|_| ())
}

/// A TCP connection whose reads and writes are counted.
struct Counted<'a> {
    inner: &'a mut TcpStream,
    progress: &'a Progress,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut *self.inner).poll_read(cx, buf))?;
        self.progress.count_read(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut *self.inner).poll_write(cx, buf))?;
        self.progress.count_written(written);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs))?;
        self.progress.count_written(written);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::test_support::tcp_pair;

    /// A copy running between two connections: the client's far end, the
    /// server's, what it counted, and the copy.
    struct Running {
        client: TcpStream,
        server: TcpStream,
        progress: Arc<Progress>,
        copy: JoinHandle<io::Result<()>>,
    }

    async fn running() -> Running {
        let (mut client_side, client) = tcp_pair().await;
        let (mut server_side, server) = tcp_pair().await;
        let progress = Arc::new(Progress::default());
        let counted = progress.clone();
        let copy =
            tokio::spawn(
                async move { copy_plain(&mut client_side, &mut server_side, &counted).await },
            );
        Running {
            client,
            server,
            progress,
            copy,
        }
    }

    #[tokio::test]
    async fn both_ways_are_counted_on_the_first_connection() {
        let mut run = running().await;
        run.client.write_all(b"request").await.unwrap();
        run.client.shutdown().await.unwrap();
        let mut request = Vec::new();
        run.server.read_to_end(&mut request).await.unwrap();
        run.server.write_all(b"answer").await.unwrap();
        drop(run.server);
        let mut answer = Vec::new();
        run.client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(
            (request.as_slice(), answer.as_slice()),
            (&b"request"[..], &b"answer"[..])
        );
        run.copy.await.unwrap().unwrap();
        assert_eq!((run.progress.read(), run.progress.written()), (7, 6));
    }

    #[tokio::test]
    async fn a_reset_connection_still_counts_what_went_before() {
        let mut run = running().await;
        run.client.write_all(b"request").await.unwrap();
        let mut request = [0u8; 7];
        run.server.read_exact(&mut request).await.unwrap();
        run.server.write_all(b"partial").await.unwrap();
        let mut partial = [0u8; 7];
        run.client.read_exact(&mut partial).await.unwrap();
        // A reset: linger 0, then close.
        run.server.set_zero_linger().unwrap();
        drop(run.server);
        assert!(run.copy.await.unwrap().is_err(), "the reset fails the copy");
        assert_eq!((run.progress.read(), run.progress.written()), (7, 7));
    }
}
