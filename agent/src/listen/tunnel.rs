//! Upgraded connections (tunnels): the client's side of an upgrade the origin accepted
//! ([`route::Upgrade`](crate::route)), and the bytes copied both ways until either side
//! closes, nothing moves for the idle timeout (`--upgrade-idle-timeout`), or the agent exits.
//!
//! - HTTP/1.1: the client gets the origin's `101`; hyper then hands over the connection
//!   (`hyper::upgrade::on`) and a task of its own copies bytes between it and the origin's
//!   socket. The task counts as an open connection for the drain, so a SIGTERM waits for
//!   tunnels up to `--drain-timeout`, then the agent exits and they are cut.
//! - HTTP/2 (RFC 8441): the client's extended CONNECT stream gets `:status 200`; its DATA
//!   frames are the bytes to the origin, and the origin's bytes go back as DATA frames
//!   ([`H2Io`]). The stream lives on its client connection, which the drain already waits
//!   for. An idle or broken tunnel is ended with `RST_STREAM(CANCEL)`.

use super::drain::Drain;
use crate::route::{Body, Downstream, Switched, Upgrade, Worker};
use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// An HTTP/1.1 upgrade request: routed, sent to an origin, and on a `101` the tunnel started
/// once hyper has sent the `101` and handed over the connection.
pub(super) async fn h1(
    worker: Arc<Worker>,
    mut req: Request<Incoming>,
    upgrade: HeaderValue,
    peer: HeaderValue,
    idle: Duration,
    drain: Drain,
) -> Result<Response<Body>, Infallible> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _no_body) = req.into_parts();
    let Switched {
        head,
        io,
        early,
        hold,
    } = match worker
        .upgrade(parts, peer, Downstream::H1 { upgrade })
        .await
    {
        Upgrade::Reply(resp) => return Ok(resp),
        Upgrade::Switched(s) => s,
    };
    let guard = drain.track();
    tokio::spawn(async move {
        let (_guard, _hold) = (guard, hold);
        let client = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                tracing::debug!(error = %e, "client connection ended before the upgrade");
                return;
            }
        };
        run(client, io, early, idle).await.log();
    });
    Ok(Response::from_parts(
        head,
        Either::Right(Full::new(Bytes::new())),
    ))
}

/// An h2 extended CONNECT (RFC 8441): routed and translated to an HTTP/1.1 handshake (see
/// `route::upgrade`), answered `200` when the origin switched, and its stream tunnelled.
pub(super) async fn h2(
    worker: Arc<Worker>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: HeaderValue,
    idle: Duration,
) {
    let (parts, recv) = req.into_parts();
    let websocket = parts
        .extensions
        .get::<h2::ext::Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    let down = Downstream::H2Connect { websocket };
    let Switched {
        head,
        io,
        early,
        hold,
    } = match worker.upgrade(parts, peer, down).await {
        Upgrade::Reply(resp) => {
            super::h2::stream(Box::pin(async move { Ok(resp) }), respond).await;
            return;
        }
        Upgrade::Switched(s) => s,
    };
    let _hold = hold;
    let Ok(send) = respond.send_response(Response::from_parts(head, ()), false) else {
        return;
    };
    let mut client = H2Io {
        send,
        recv,
        buf: Bytes::new(),
    };
    let ended = run(&mut client, io, early, idle).await;
    if !matches!(ended, Ended::Closed) {
        client.send.send_reset(h2::Reason::CANCEL);
    }
    ended.log();
}

/// How a tunnel ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// Both sides closed their direction.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// A side failed (reset, broken pipe).
    Failed(io::Error),
}

impl Ended {
    fn log(&self) {
        match self {
            Ended::Closed => tracing::debug!("tunnel closed"),
            Ended::Idle => tracing::debug!("tunnel idle for the upgrade idle timeout; closed"),
            Ended::Failed(e) => tracing::debug!(error = %e, "tunnel failed"),
        }
    }
}

/// Copies bytes between the client and the origin (the origin's `early` bytes first) until
/// both directions are closed, one fails, or nothing has moved for `idle`.
pub(super) async fn run<C>(client: C, origin: TcpStream, early: Bytes, idle: Duration) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds from `start` to the last byte read on either side. An atomic only because
    // the task must be `Send`; it is touched by this task alone.
    let last = AtomicU64::new(0);
    let mut client = Watched {
        io: client,
        start,
        last: &last,
    };
    let mut origin = Watched {
        io: origin,
        start,
        last: &last,
    };
    let copy = async {
        if !early.is_empty() {
            client.io.write_all(&early).await?;
        }
        tokio::io::copy_bidirectional(&mut client, &mut origin).await
    };
    tokio::select! {
        r = copy => match r {
            Ok(_) => Ended::Closed,
            Err(e) => Ended::Failed(e),
        },
        () = idle_for(start, &last, idle) => Ended::Idle,
    }
}

/// Resolves once no byte has been read for `idle` (hand-written: `copy_bidirectional` has no
/// idle timeout, and a timer reset per read would cost a timer-wheel update per chunk).
async fn idle_for(start: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due.into()).await;
    }
}

/// One side of a tunnel, stamping the time of every read that brought bytes.
struct Watched<'a, T> {
    io: T,
    start: Instant,
    last: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An h2 stream as a byte stream: DATA frames in, DATA frames out, with flow control.
/// Hand-written because neither `h2` nor a maintained crate offers it (hyper's equivalent,
/// `H2Upgraded`, is private); it follows hyper's.
pub(super) struct H2Io {
    pub(super) send: h2::SendStream<Bytes>,
    pub(super) recv: h2::RecvStream,
    /// The rest of the last DATA frame received.
    pub(super) buf: Bytes,
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into())
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                // END_STREAM: the client closed its direction.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.buf = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => Ok(()),
                        _ => Err(h2_io_error(e)),
                    });
                }
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        // The window reopens as the bytes are taken, so a slow origin slows the client.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let data = Bytes::copy_from_slice(&buf[..n.min(buf.len())]);
                    let len = data.len();
                    return Poll::Ready(
                        self.send
                            .send_data(data, false)
                            .map(|()| len)
                            .map_err(h2_io_error),
                    );
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames are written by the connection's task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.send.send_data(Bytes::new(), true).map_err(h2_io_error))
    }
}
