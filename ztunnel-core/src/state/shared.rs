//! The state shared between its writer (the xDS client, or an embedder's own
//! source) and its readers (listeners, DNS, the admin server), with a signal
//! of each change so live connections can be re-checked against new policies.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use tokio::sync::watch;

use super::ProxyState;

/// A handle on the state; cheap to clone, all clones see the same state.
#[derive(Clone, Debug)]
pub struct SharedState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<ProxyState>,
    /// The generation after the last update.
    changes: watch::Sender<u64>,
}

impl Default for SharedState {
    fn default() -> Self {
        Self::new(ProxyState::new())
    }
}

impl SharedState {
    /// Shares `state`.
    pub fn new(state: ProxyState) -> Self {
        let (changes, _) = watch::channel(state.generation());
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                changes,
            }),
        }
    }

    /// Reads the state. Hold the guard briefly: writers wait for it.
    pub fn read(&self) -> RwLockReadGuard<'_, ProxyState> {
        self.inner
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state with `change`, then tells subscribers if its
    /// generation moved.
    pub fn update<R>(&self, change: impl FnOnce(&mut ProxyState) -> R) -> R {
        let (result, generation) = {
            let mut state = self
                .inner
                .state
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let result = change(&mut state);
            (result, state.generation())
        };
        self.inner.changes.send_if_modified(|current| {
            let moved = *current != generation;
            *current = generation;
            moved
        });
        result
    }

    /// The generation after each change (`changed().await` wakes on the next).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}
