//! Graceful drain: the signal that tells every worker's accept loop and connections to wind
//! down, and the count of client connections still open, which the shutdown waits on.
//!
//! Shared by all workers (each on its own runtime). Every connection's task waits on
//! [`Drain::started`] beside its connection, so that future is polled on every wake-up of
//! every connection: it is one atomic load, plus a lock-free `AtomicWaker` registration
//! (a tokio `Notify` or `CancellationToken` here took a mutex shared by all workers on each
//! poll, ~1.3k instructions per proxied request in `hot_path.py insn`). The registry of
//! wakers is touched once per connection; the open count once when a connection opens and
//! once when it closes — never per request.

use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The drain signal and the open-connection count, cloned into every worker.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    open: AtomicUsize,
    /// The wakers of the [`Started`] futures alive; dead entries are pruned as it grows.
    wakers: Mutex<Vec<Weak<AtomicWaker>>>,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: listeners close, idle connections close, busy ones finish what
    /// they are serving.
    pub fn start(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.lock());
        for waker in wakers.iter().filter_map(Weak::upgrade) {
            waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<AtomicWaker>>> {
        self.inner.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once draining has started.
    pub(crate) fn started(&self) -> Started {
        Started {
            drain: self.clone(),
            waker: None,
        }
    }

    /// Client connections not closed yet.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn track(&self) -> ConnGuard {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.inner.clone())
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
pub(crate) struct ConnGuard(Arc<Inner>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The future of [`Drain::started`].
pub(crate) struct Started {
    drain: Drain,
    waker: Option<Arc<AtomicWaker>>,
}

impl Future for Started {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let draining = &this.drain.inner.draining;
        if draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let waker = this.waker.get_or_insert_with(|| {
            let waker = Arc::new(AtomicWaker::new());
            let mut wakers = this.drain.lock();
            // Amortised pruning of futures already gone (closed connections).
            if wakers.len() >= 64 && wakers.len().is_power_of_two() {
                wakers.retain(|w| w.strong_count() > 0);
            }
            wakers.push(Arc::downgrade(&waker));
            waker
        });
        waker.register(cx.waker());
        // Checked again after registering: a `start` between the first check and the
        // registration has either woken this waker or is seen here.
        if draining.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_when_draining_starts_and_later_ones_resolve_at_once() {
        let drain = Drain::new();
        let waiters: Vec<_> = (0..100).map(|_| tokio::spawn(drain.started())).collect();
        tokio::task::yield_now().await;
        drain.start();
        for w in waiters {
            w.await.expect("waiter");
        }
        drain.started().await;
        let guard = drain.track();
        assert_eq!(drain.open(), 1);
        drop(guard);
        assert_eq!(drain.open(), 0);
    }
}
