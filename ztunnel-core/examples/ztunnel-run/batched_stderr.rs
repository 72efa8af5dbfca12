//! Log lines gathered in memory and written to stderr in batches, as Envoy and
//! nginx buffer their access logs: one `write` per batch instead of one per
//! line. A busy proxy logs one line per connection; written one by one, each
//! line was a syscall that also woke whatever reads stderr (a container
//! runtime, journald, a test harness), about 5% of the machine's CPU in the
//! connection-rate bench.
//!
//! A batch is written when it reaches [`BATCH_LIMIT`] bytes, by the thread
//! whose line filled it, or [`FLUSH_AFTER`] after its first line, by
//! [`BatchedStderr::flush_periodically`] (a task on the proxy's own runtime:
//! no thread of its own, and nothing runs while nothing is logged).
//! [`BatchedStderr::flush`] writes what is left before the process exits.
//! Lines stay whole and in order: one event is one `write_all` into the
//! batch, and batches are written under the batch's lock.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// A batch this large is written at once.
pub(crate) const BATCH_LIMIT: usize = 64 << 10;
/// The longest a line waits in a batch that is not full.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// The writer to give `tracing_subscriber::fmt().with_writer(..)`. Cheap to
/// clone: clones share one batch.
#[derive(Clone, Debug, Default)]
pub(crate) struct BatchedStderr {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    batch: Mutex<Vec<u8>>,
    /// Told when a line starts a new batch.
    started: tokio::sync::Notify,
}

impl BatchedStderr {
    /// Writes the batch now, if it holds anything.
    pub(crate) fn flush(&self) {
        self.shared.write_out(&mut self.shared.lock());
    }

    /// Writes each batch [`FLUSH_AFTER`] after its first line; runs until
    /// the runtime stops.
    pub(crate) async fn flush_periodically(self) {
        loop {
            self.shared.started.notified().await;
            tokio::time::sleep(FLUSH_AFTER).await;
            self.flush();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `batch` to stderr and empties it, keeping its allocation for
    /// the next batch. A failed write drops the batch: there is nowhere
    /// else to report it.
    fn write_out(&self, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            let _ = io::stderr().write_all(batch);
            batch.clear();
        }
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.shared)
    }
}

/// Appends one event's text to the batch.
#[derive(Debug)]
pub(crate) struct LineWriter<'a>(&'a Shared);

impl Write for LineWriter<'_> {
    fn write(&mut self, text: &[u8]) -> io::Result<usize> {
        let mut batch = self.0.lock();
        let first = batch.is_empty();
        batch.extend_from_slice(text);
        if batch.len() >= BATCH_LIMIT {
            self.0.write_out(&mut batch);
        } else if first {
            self.0.started.notify_one();
        }
        Ok(text.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
