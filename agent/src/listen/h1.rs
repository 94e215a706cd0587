//! Serving HTTP/1.1 client connections through hyper's server (over [`Rewind`], so hyper sees
//! the bytes read for the protocol check).
//!
//! Request heads larger than 64 KiB get `431`, malformed ones `400` (hyper's strict parser);
//! a request carrying both `Content-Length` and `Transfer-Encoding` is decoded as chunked,
//! its `Content-Length` dropped and the connection closed after the answer (RFC 9112 §6.1),
//! and since the agent re-frames every message it forwards, no ambiguity reaches upstreams.

use super::Limits;
use super::detect::Rewind;
use super::drain::Drain;
use crate::route::Worker;
use http::{HeaderValue, Request};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;

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
) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        worker.clone().handle(req.map(Either::Left), peer.clone())
    });
    let conn = http1.serve_connection(TokioIo::new(io), svc);
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
