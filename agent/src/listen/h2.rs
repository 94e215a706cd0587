//! Serving h2c client connections straight on the `h2` crate.
//!
//! Why not hyper's HTTP/2 server: it spawns a task per stream, so every gRPC call crossed
//! the connection's task, the stream's task and the upstream connection's task, with a
//! wake-up at each hand-off, and each hand-off waited in the run queue behind other calls'
//! work. Here a connection's streams are futures polled by the connection's own task (as
//! nginx handles a connection's streams in its event loop): a call crosses the client's
//! connection and the upstream's, nothing else. Frames the streams queue are written by the
//! connection's next poll, so the answers of calls that finished together leave in one
//! write. With the two write fixes in `http/h2.rs`, weir's p50 went from 1.15–1.26× nginx's to
//! 0.85–1.08× (`tests/bench/CACHE_AND_GRPC.md`, session 4).

use super::detect::Rewind;
use super::drain::Drain;
use super::tunnel;
use crate::http::h2::{H2Body, Pipe, keepalive};
use crate::route::{Body, Worker};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Method};
use http_body::Body as _;
use http_body_util::Either;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// HTTP/2 client connections are PINGed this often, busy or not, and closed when a PING
/// goes unanswered for [`PING_TIMEOUT`] (the values the agent used with hyper's server).
const PING_INTERVAL: Duration = Duration::from_secs(60);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves an h2c connection until the client closes it, it fails, or a PING goes
/// unanswered.
///
/// Abuse limits, per connection: a rapid-reset flood (CVE-2023-44487) hits the cap on
/// streams reset before they were accepted and the connection is closed with GOAWAY; header
/// blocks (CONTINUATION floods) are capped at 64 KiB; a stream the client resets drops its
/// request future, which cancels the upstream request.
///
/// When `drain` starts, the client gets a GOAWAY (h2's graceful shutdown: a first one with
/// the largest stream id, then one naming the last stream accepted); the streams in
/// flight finish and the connection closes when they have.
///
/// Extended CONNECT (RFC 8441) is on: a CONNECT with `:protocol` is a WebSocket for the
/// origin ([`tunnel::h2`], a task of its own holding the stream); a plain CONNECT goes to
/// the router, which refuses it (weir is never a tunnel).
pub(super) async fn serve_h2(
    io: Rewind,
    worker: Arc<Worker>,
    peer: HeaderValue,
    drain: &Drain,
    upgrade_idle: Duration,
) {
    // Windows as hyper's server sets them (1 MiB per stream and per connection).
    let conn = h2::server::Builder::new()
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256))
        .max_header_list_size(64 * 1024)
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buffer_size(400 * 1024)
        .enable_connect_protocol()
        .handshake::<_, Bytes>(io)
        .await;
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            tracing::trace!(error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let keepalive = keepalive(conn.ping_pong(), PING_INTERVAL, PING_TIMEOUT);
    let mut streams = FuturesUnordered::new();
    let wake = Arc::new(ConnWake {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let conn_waker = Waker::from(wake.clone());
    // Set once draining starts; read only when the connection is polled anyway.
    let draining = AtomicBool::new(false);
    let mut goaway_sent = false;
    let served = poll_fn(|cx| {
        wake.task.register(cx.waker());
        // The connection is polled only when it asked to be (its socket is ready, or a
        // stream queued frames), not whenever a stream is woken; frames the streams queue
        // below are written by its next poll. Polling it at every wake-up measured the same
        // in a short A/B but 6–8 % more CPU per call in a 5-round grpc_bench.py run
        // (session 4, tests/bench/CACHE_AND_GRPC.md), so the own waker stays.
        if wake.woken.swap(false, Ordering::AcqRel) {
            let mut ccx = Context::from_waker(&conn_waker);
            if !goaway_sent && draining.load(Ordering::Relaxed) {
                goaway_sent = true;
                conn.graceful_shutdown();
            }
            loop {
                match conn.poll_accept(&mut ccx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        if req.method() == Method::CONNECT
                            && req.extensions().get::<h2::ext::Protocol>().is_some()
                        {
                            let tunnel = tunnel::h2(
                                worker.clone(),
                                req,
                                respond,
                                peer.clone(),
                                upgrade_idle,
                            );
                            tokio::spawn(tunnel);
                            continue;
                        }
                        let len = content_length(req.headers());
                        let req = req.map(|recv| Either::Right(H2Body::request(recv, len)));
                        // Boxed where it is made: the request future is large, and every
                        // move of it (into the stream's future, into the set) is a memcpy.
                        let handle = Box::pin(worker.clone().handle(req, peer.clone()));
                        streams.push(stream(handle, respond));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
        }
        // FuturesUnordered hands back control after polling 32 futures (it wakes the task
        // and returns Pending). With more streams ready than that, the upstream connections
        // would write the first 32 calls, and the rest in a write of their own (64 calls in
        // flight on one connection: 0.64 → 0.56 writes per call). So it gets one more turn
        // per 32 streams, which still bounds the work of one poll.
        let mut turns = (streams.len() / 32).min(8);
        loop {
            match streams.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => {}
                Poll::Ready(None) => break,
                Poll::Pending if turns == 0 => break,
                Poll::Pending => turns -= 1,
            }
        }
        Poll::Pending
    });
    tokio::pin!(served, keepalive);
    let drain_started = drain.started();
    tokio::pin!(drain_started);
    loop {
        tokio::select! {
            biased;
            r = &mut served => {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            () = &mut keepalive => {
                tracing::debug!("HTTP/2 client did not answer a PING; closing the connection");
                return;
            }
            () = &mut drain_started, if !draining.load(Ordering::Relaxed) => {
                // The connection's next poll (right away: it is marked woken) sends GOAWAY.
                draining.store(true, Ordering::Relaxed);
                wake.wake_by_ref();
            }
        }
    }
}

/// The connection's own waker: marks that the connection needs polling, then wakes the task.
struct ConnWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// The `Content-Length` a request announced, for the body's size hint (an HTTP/1.1 upstream
/// then gets the same framing); h2 itself resets a stream whose data does not match it.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// One stream: the request handled, its answer sent, its body piped with flow control.
/// Dropped (cancelling the upstream call) as soon as the client resets the stream.
pub(super) async fn stream<F>(mut handle: Pin<Box<F>>, mut respond: h2::server::SendResponse<Bytes>)
where
    F: Future<Output = Result<http::Response<Body>, std::convert::Infallible>>,
{
    let resp = poll_fn(|cx| {
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        handle.as_mut().poll(cx).map(Some)
    })
    .await;
    let Some(Ok(resp)) = resp else { return };
    let (mut parts, body) = resp.into_parts();
    // A local `400` says `Connection: close` for HTTP/1.1 clients; HTTP/2 forbids that field,
    // and h2 would refuse the whole head (the client would see a bare RST_STREAM).
    if parts.status == http::StatusCode::BAD_REQUEST {
        parts.headers.remove(http::header::CONNECTION);
    }
    if let Some(n) = body.size_hint().exact()
        && !parts.headers.contains_key(CONTENT_LENGTH)
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    let eos = body.is_end_stream();
    let Ok(send) = respond.send_response(http::Response::from_parts(parts, ()), eos) else {
        return;
    };
    if !eos {
        Pipe::new(body, send).await;
    }
}
