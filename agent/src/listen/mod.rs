//! The listener: binds the `SO_REUSEPORT` sockets ([`bind`]), tells each connection's protocol
//! by its first bytes ([`detect`]) and serves it — HTTP/1.1 through hyper ([`h1`]), h2c on the
//! `h2` crate ([`h2`]) — handing every request to a [`route::Worker`](crate::route); upgraded
//! connections (WebSocket and other `Upgrade`s, h2 extended CONNECT) become [`tunnel`]s.
//!
//! Threading: one current-thread tokio runtime per worker, each with its own `SO_REUSEPORT`
//! listener and its own upstream pool. The kernel spreads connections over workers, a request
//! never crosses threads, and the only state shared between workers is the routing table
//! (read through `ArcSwap`, no lock) and atomic counters. This is the layout that measured
//! best on these machines (see DESIGN.md, performance notes).

mod bind;
mod detect;
mod drain;
mod framing;
mod h1;
mod h2;
pub mod handoff;
mod tunnel;

pub use bind::bind_listeners;
pub use drain::Drain;

use crate::http::headers::peer_header;
use crate::route::{Routing, Worker};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time a client has to send a complete request head (slowloris guard).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An upgraded connection (tunnel) with no byte either way for this long is closed. Envoy's
/// stream idle timeout: WebSocket libraries ping every 20–60 s, so a live tunnel is never
/// this quiet, while a dead peer (gone without a FIN) stops counting against its endpoint's
/// in-flight figure and frees its sockets within minutes rather than hours.
pub const UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a connection accepted just before draining started may take to send its first
/// bytes.
const DRAIN_FIRST_BYTES_GRACE: Duration = Duration::from_millis(250);

/// Limits that protect the listener from slow or greedy clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive within this time, or the connection is closed.
    pub header_read_timeout: Duration,
    /// A tunnel (upgraded connection) idle this long is closed.
    pub upgrade_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            upgrade_idle_timeout: UPGRADE_IDLE_TIMEOUT,
        }
    }
}

/// Accepts and serves connections on `listeners` (one, or several sockets inherited from an
/// agent with more workers: see [`handoff`]) until `drain` starts; then closes this process's
/// copy of each listener (so a new agent can bind the address, or, after a hand-off, so that
/// only the new agent accepts) and keeps serving the open connections, which wind down on
/// their own (see [`h1::serve_h1`], [`h2::serve_h2`]). Never returns once draining: the
/// process exits when the connections are done or the drain times out.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    routing: Arc<Routing>,
    limits: Limits,
    drain: Drain,
) -> std::io::Result<()> {
    let worker = Arc::new(Worker::new(routing));
    let pool = Arc::downgrade(worker.pool());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            pool.sweep(Instant::now());
        }
    });
    let http1 = Arc::new(h1::builder(limits));
    let mut accepting = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        accepting.push(tokio::spawn(accept_loop(
            listener,
            worker.clone(),
            http1.clone(),
            limits,
            drain.clone(),
        )));
    }
    drop(worker);
    for a in accepting {
        let _ = a.await;
    }
    tracing::debug!("listeners closed; draining connections");
    std::future::pending::<()>().await;
    Ok(())
}

/// Accepts on one listener until `drain` starts, then drops it.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    worker: Arc<Worker>,
    http1: Arc<hyper::server::conn::http1::Builder>,
    limits: Limits,
    drain: Drain,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = drain.started() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let worker = worker.clone();
        let http1 = http1.clone();
        let first_bytes = limits.header_read_timeout;
        let upgrade_idle = limits.upgrade_idle_timeout;
        let drain = drain.clone();
        let guard = drain.track();
        tokio::spawn(async move {
            let _guard = guard;
            let peer = peer_header(peer.ip());
            // A client that never sends its first bytes is a slowloris too; one that has
            // sent nothing when draining starts has nothing in flight, and is closed after
            // a short grace: accepted just before the drain (a hand-off's last accepts), its
            // request is usually on its way, and closing would fail it.
            let detect = tokio::time::timeout(first_bytes, detect::detect(stream));
            tokio::pin!(detect);
            let detected = tokio::select! {
                biased;
                d = &mut detect => d,
                () = drain.started() => {
                    match tokio::time::timeout(DRAIN_FIRST_BYTES_GRACE, &mut detect).await {
                        Ok(d) => d,
                        Err(_) => return,
                    }
                }
            };
            let Ok(Some(proto)) = detected else {
                return;
            };
            match proto {
                detect::Protocol::H2(io) => {
                    h2::serve_h2(io, worker, peer, &drain, upgrade_idle).await;
                }
                detect::Protocol::Http1(io) => {
                    h1::serve_h1(&http1, io, worker, peer, &drain, upgrade_idle).await;
                }
            }
        });
    }
    // Closing the listener refuses new connections (and frees the address); connections
    // already accepted but not yet taken by `accept` are reset by the kernel. After a
    // hand-off the new agent holds the same socket: this closes only this process's copy,
    // and the queued connections are the new agent's to accept.
    drop(listener);
}
