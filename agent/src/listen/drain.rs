//! Graceful drain: the signal that tells every worker's accept loop and connections to wind
//! down, and the count of client connections still open, which the shutdown waits on.
//!
//! Shared by all workers (each on its own runtime): a `CancellationToken` wakes tasks on any
//! runtime, and the count is one atomic, touched once when a connection opens and once when
//! it closes — never per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The drain signal and the open-connection count, cloned into every worker.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    token: CancellationToken,
    open: Arc<AtomicUsize>,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: listeners close, idle connections close, busy ones finish what
    /// they are serving.
    pub fn start(&self) {
        self.token.cancel();
    }

    /// Resolves once draining has started.
    pub(crate) async fn started(&self) {
        self.token.cancelled().await;
    }

    /// Client connections not closed yet.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn track(&self) -> ConnGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.open.clone())
    }

    /// Waits until every client connection has closed or `timeout` has passed; returns how
    /// many were still open (cut) then.
    pub async fn wait_closed(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        // Polled rather than notified: this runs once, at exit, and a poll cannot miss a
        // wake-up between the check and the wait.
        loop {
            let open = self.open();
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One open client connection (see [`Drain::track`]).
pub(crate) struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
