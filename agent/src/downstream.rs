//! Client connections: telling HTTP/1.1 from h2c on an accepted socket, and serving h2c
//! straight on the `h2` crate.
//!
//! Why not hyper's HTTP/2 server: it spawns a task per stream, so every gRPC call crossed
//! the connection's task, the stream's task and the upstream connection's task, with a
//! wake-up at each hand-off, and each hand-off waited in the run queue behind other calls'
//! work. Here a connection's streams are futures polled by the connection's own task (as
//! nginx handles a connection's streams in its event loop): a call crosses the client's
//! connection and the upstream's, nothing else. Frames the streams queue are written by the
//! connection's next poll, so the answers of calls that finished together leave in one
//! write. With the two write fixes in `h2c.rs`, weir's p50 went from 1.15–1.26× nginx's to
//! 0.85–1.08× (`tests/bench/CACHE_AND_GRPC.md`, session 4).
//!
//! HTTP/1.1 connections still go to hyper, over [`Rewind`] so that it sees the bytes read
//! for the protocol check.

use crate::h2c::{self, H2Body, Pipe};
use crate::proxy::{self, Worker};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use http::HeaderValue;
use http::header::CONTENT_LENGTH;
use http_body::Body as _;
use http_body_util::Either;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 client connections are PINGed this often, busy or not, and closed when a PING
/// goes unanswered for [`PING_TIMEOUT`] (the values the agent used with hyper's server).
const PING_INTERVAL: Duration = Duration::from_secs(60);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The protocol a client speaks, decided by its first bytes.
pub enum Protocol {
    Http1(Rewind),
    H2(Rewind),
}

/// Reads until the first bytes either differ from the HTTP/2 preface (HTTP/1.1: the first
/// byte of any method but `PRI` does) or match all of it. `None` when the client closed or
/// broke the connection first.
pub async fn detect(mut io: TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let read = io.read(&mut buf[n..]).await.ok()?;
        if read == 0 {
            return None;
        }
        n += read;
        if buf[..n] != PREFACE[..n] {
            return Some(Protocol::Http1(Rewind::new(io, &buf[..n])));
        }
    }
    Some(Protocol::H2(Rewind::new(io, &buf)))
}

/// A socket that first gives back the bytes the protocol check read.
pub struct Rewind {
    io: TcpStream,
    head: [u8; PREFACE.len()],
    pos: u8,
    len: u8,
}

impl Rewind {
    fn new(io: TcpStream, read: &[u8]) -> Self {
        let mut head = [0u8; PREFACE.len()];
        head[..read.len()].copy_from_slice(read);
        Self {
            io,
            head,
            pos: 0,
            len: read.len() as u8,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.len {
            let rest = &this.head[this.pos as usize..this.len as usize];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Serves an h2c connection until the client closes it, it fails, or a PING goes
/// unanswered.
///
/// Abuse limits, per connection: a rapid-reset flood (CVE-2023-44487) hits the cap on
/// streams reset before they were accepted and the connection is closed with GOAWAY; header
/// blocks (CONTINUATION floods) are capped at 64 KiB; a stream the client resets drops its
/// request future, which cancels the upstream request.
pub async fn serve_h2(io: Rewind, worker: Arc<Worker>, peer: HeaderValue) {
    // Windows as hyper's server sets them (1 MiB per stream and per connection).
    let conn = h2::server::Builder::new()
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256))
        .max_header_list_size(64 * 1024)
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buffer_size(400 * 1024)
        .handshake::<_, Bytes>(io)
        .await;
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            tracing::trace!(error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let keepalive = h2c::keepalive(conn.ping_pong(), PING_INTERVAL, PING_TIMEOUT);
    let mut streams = FuturesUnordered::new();
    let wake = Arc::new(ConnWake {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let conn_waker = Waker::from(wake.clone());
    let served = poll_fn(|cx| {
        wake.task.register(cx.waker());
        // The connection is polled only when it asked to be (its socket is ready, or a
        // stream queued frames), not whenever a stream is woken; frames the streams queue
        // below are written by its next poll. Polling it at every wake-up measured the same
        // in a short A/B but 6–8 % more CPU per call in a 5-round grpc_bench.py run
        // (session 4, tests/bench/CACHE_AND_GRPC.md), so the own waker stays.
        if wake.woken.swap(false, Ordering::AcqRel) {
            let mut ccx = Context::from_waker(&conn_waker);
            loop {
                match conn.poll_accept(&mut ccx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
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
    tokio::select! {
        biased;
        r = served => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "HTTP/2 connection ended with an error");
            }
        }
        () = keepalive => {
            tracing::debug!("HTTP/2 client did not answer a PING; closing the connection");
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
async fn stream<F>(mut handle: Pin<Box<F>>, mut respond: h2::server::SendResponse<Bytes>)
where
    F: Future<Output = Result<http::Response<proxy::Body>, std::convert::Infallible>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Accepts one connection whose client writes `sent` and then closes its side; returns
    /// what `detect` made of it and everything read back through the `Rewind`.
    async fn detect_bytes(sent: &'static [u8]) -> Option<(bool, Vec<u8>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(sent).await.expect("write");
            c.shutdown().await.expect("shutdown");
            c
        });
        let (io, _) = listener.accept().await.expect("accept");
        let proto = detect(io).await;
        let _client = client.await.expect("client");
        let (h2, mut io) = match proto? {
            Protocol::H2(io) => (true, io),
            Protocol::Http1(io) => (false, io),
        };
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.expect("read back");
        Some((h2, back))
    }

    #[tokio::test]
    async fn a_request_shorter_than_the_preface_is_http1_and_reaches_hyper_whole() {
        let req = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(detect_bytes(req).await, Some((false, req.to_vec())));
    }

    #[tokio::test]
    async fn the_preface_is_h2_and_is_given_back_with_what_follows() {
        let sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(detect_bytes(sent).await, Some((true, sent.to_vec())));
    }

    #[tokio::test]
    async fn bytes_that_leave_the_preface_late_are_http1() {
        let sent = b"PRI * HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(detect_bytes(sent).await, Some((false, sent.to_vec())));
    }

    #[tokio::test]
    async fn a_client_that_closes_mid_preface_is_dropped() {
        assert_eq!(detect_bytes(b"PRI * HTTP/2").await, None);
    }
}
