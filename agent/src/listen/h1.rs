//! Serving HTTP/1.1 client connections through hyper's server (over [`Rewind`], so hyper sees
//! the bytes read for the protocol check).
//!
//! Request heads larger than 64 KiB get `431`, malformed ones `400` (hyper's strict parser:
//! invalid or conflicting `Content-Length`, a final coding other than `chunked`); a request
//! with both `Content-Length` and `Transfer-Encoding`, or with a `Transfer-Encoding` other
//! than exactly `chunked`, gets `400` with `x-weir-error: bad-framing` and the connection
//! closed, never forwarded (RFC 9112 §6.1; see `framing`).

use super::Limits;
use super::detect::Rewind;
use super::drain::Drain;
use super::framing::{FramingScan, bad_framing};
use super::tunnel;
use crate::http::reply::{LocalReply, local_reply};
use crate::http::upgrade;
use crate::route::Worker;
use futures::future;
use http::{HeaderValue, Method, Request};
use http_body_util::Either;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// hyper's HTTP/1.1 server, configured once per worker.
pub(super) fn builder(limits: Limits) -> Builder {
    let mut http1 = Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    http1
}

/// Serves one HTTP/1.1 connection until it closes. When `drain` starts, an idle connection
/// is closed at once, and a busy one after the answer in progress (sent with
/// `Connection: close`): hyper's graceful shutdown turns keep-alive off.
pub(super) async fn serve_h1(
    http1: &Builder,
    io: Rewind,
    worker: Arc<Worker>,
    peer: HeaderValue,
    drain: &Drain,
    upgrade_idle: Duration,
) {
    // Tunnels outlive the connection's task: they count as open connections of their own.
    let tunnel_drain = drain.clone();
    let ambiguous = Arc::new(AtomicBool::new(false));
    let mut io = io;
    io.scan_framing(FramingScan::new(ambiguous.clone()));
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        if let Some(why) = bad_framing(req.headers(), &ambiguous) {
            // Never forwarded; `Connection: close` makes hyper close after the answer.
            let resp = local_reply(false, LocalReply::BadFraming, why).map(Either::Right);
            return future::Either::Left(future::ready(Ok(resp)));
        }
        // An upgrade carries no body; one that comes with a body goes on as a plain request
        // (its `Upgrade` dropped as hop-by-hop).
        if let Some(upgrade) = upgrade::requested(req.headers())
            && req.method() != Method::CONNECT
            && req.body().is_end_stream()
        {
            let upgrade = upgrade.clone();
            let tunnel = tunnel::h1(
                worker.clone(),
                req,
                upgrade,
                peer.clone(),
                upgrade_idle,
                tunnel_drain.clone(),
            );
            return future::Either::Right(future::Either::Right(Box::pin(tunnel)));
        }
        let handle = worker.clone().handle(req.map(Either::Left), peer.clone());
        future::Either::Right(future::Either::Left(handle))
    });
    let conn = http1
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let served = tokio::select! {
        biased;
        r = conn.as_mut() => r,
        () = drain.started() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::trace!(error = %e, "connection ended with an error");
    }
}
