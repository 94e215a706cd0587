//! Upstream HTTP/1.1 exchanges on a pooled connection, driven by the request's own task.
//!
//! Why not hyper's client (`hyper::client::conn::http1`), which weir used before: hyper runs
//! every connection as a task of its own, so a proxied request crossed from the client
//! connection's task to the upstream connection's task through a channel and came back
//! through a oneshot, the response body through another channel, and the connection's
//! dispatcher ran several times per request (to flush, to read, to decide on keep-alive).
//! In the HTTP/1.1 instruction profile that task was 39 % of weir's user-space cost
//! (13.5k of 34.4k instructions per request). A proxy that owns its pool needs none of it:
//! here the request's task writes the head to the connection, reads the answer from it, and
//! the response body reads the rest and puts the connection back into the pool when it has
//! read the response to its end. nginx and HAProxy work the same way.
//!
//! What is hand-written, and kept strict because an upstream is not trusted either:
//! - **Request framing** is weir's: `Content-Length` from the body's exact size, else
//!   `Transfer-Encoding: chunked`; the downstream's own framing headers are not copied.
//! - **Response heads** are parsed by `httparse` (at most [`MAX_HEADERS`] headers and
//!   [`MAX_HEAD`] bytes). Interim 1xx answers are skipped; `101` is refused on a pooled
//!   exchange (`Upgrade` is hop-by-hop and stripped from plain requests, so no upstream may
//!   switch protocols unasked).
//! - **Upgrades** (WebSocket and any other `Upgrade` token, see [`upgrade`]) never use the
//!   pool: the request goes on a connection of its own with `Connection: upgrade` and
//!   `Upgrade` kept; a `101` hands that connection to the caller for good (the listener copies
//!   bytes both ways), any other answer is read as a normal response and the connection
//!   closed after it.
//! - **Response framing** follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304;
//!   chunked when it is the last transfer coding (decoded here, trailers passed on);
//!   `Content-Length` when present (several must agree); otherwise the body runs to the
//!   connection's end. A response with both `Transfer-Encoding` and `Content-Length` is
//!   refused: it is how response splitting is attempted.
//! - **Proxy fields**: hop-by-hop fields of the response (and those its `Connection` names)
//!   are dropped and `Via` added while the head is parsed; `X-Forwarded-For` and `Via` are
//!   written into the request head as it is encoded. Each head is gone over once.
//! - **Reuse**: a connection goes back to the pool only when its response was read to the
//!   end, nothing followed it, the request was sent whole, and neither side said
//!   `Connection: close` (HTTP/1.0 answers need `keep-alive`).
//! - **An idle connection the server closed** is found when it is taken from the pool (a
//!   read without a syscall unless the socket turned readable) or, if the close raced the
//!   request, by an end of stream before any byte of the answer: then an idempotent request
//!   without a body is given back to go to another connection, as RFC 9110 §9.2.2 allows.
//!
//! An early answer (the upstream responds before it has read the whole request body) stops
//! the upload and is passed on; the connection is closed after it.

mod body;
mod encode;
mod parse;
mod upgrade;

pub(crate) use body::H1Body;
use body::*;
use encode::*;
use parse::*;
pub(crate) use upgrade::{Answer, upgrade};

use super::Forwarded;
use crate::http::body::{BoxError, UpBody};
use crate::http::headers::{
    VIA_11, X_FORWARDED_FOR, hop_by_hop_index, is_idempotent, remove_connection_named,
};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// Most header fields a response head (or a trailer section) may carry; hyper's default.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest response head (and trailer section) accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Space made in the read buffer before each read.
const READ_SPACE: usize = 8 * 1024;
/// A body read straight into a buffer of its own (no copy) when this much or more remains.
const DIRECT_READ: u64 = 32 * 1024;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    #[error("invalid upstream response: {0}")]
    Invalid(&'static str),
    #[error("request body: {0}")]
    RequestBody(BoxError),
}

/// An exchange that failed; `request` is given back when it may go to another connection
/// unchanged (see the module doc).
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: H1Error,
    pub(crate) request: Option<Box<Request<UpBody>>>,
}

/// One upstream HTTP/1.1 connection and its buffers, reused across requests.
#[derive(Debug)]
pub(crate) struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// The request head (and chunk framing) being written.
    wbuf: Vec<u8>,
    /// Bytes read since the current exchange began (interim answers included).
    seen: usize,
}

/// Where a response body hands its connection back.
#[derive(Debug, Clone)]
pub(crate) struct Home {
    pub(crate) pool: Arc<super::pool::Pool>,
    pub(crate) addr: SocketAddr,
}

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::with_capacity(512),
            seen: 0,
        }
    }

    /// Whether an idle connection may carry another request: not if the server closed it
    /// or sent bytes nobody asked for. Costs no syscall unless the socket turned readable.
    pub(crate) fn is_reusable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.rbuf.reserve(READ_SPACE);
        // tokio's `poll_read` (unlike `try_read`) notes that a short read drained the socket,
        // so the next read waits for epoll instead of making a syscall that finds nothing.
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        self.seen += n;
        Poll::Ready(Ok(n))
    }
}

/// Sends `req` on `conn`, with `fwd` added to its head, and reads the response head; the
/// returned body reads the rest and hands the connection back to `home` when it is done.
/// `reused`: the connection came from the pool (so a close before any answer may be a
/// keep-alive race, see the module doc).
pub(crate) async fn exchange(
    mut conn: Conn,
    req: Request<UpBody>,
    reused: bool,
    home: Home,
    fwd: Option<&Forwarded>,
) -> Result<Response<H1Body>, Failed> {
    let mut req = req;
    conn.seen = 0;
    let framing = request_framing(&req);
    encode_head(&mut conn.wbuf, &req, framing, fwd);
    let mut up = Upload {
        framing,
        left: match framing {
            ReqFraming::Length(n) => n,
            _ => 0,
        },
        out: Out::default(),
        body_done: framing == ReqFraming::None || framing == ReqFraming::Length(0),
        done: false,
        head_sent: false,
    };
    let head_req = req.method() == Method::HEAD;
    let mut write_error: Option<H1Error> = None;
    let result = std::future::poll_fn(|cx| {
        if !up.done && write_error.is_none() {
            // The first chunk of a body that is already here goes out with the head.
            if !up.head_sent
                && !up.body_done
                && up.out.data.is_empty()
                && let Poll::Ready(Err(e)) = up.pull(&mut conn.wbuf, req.body_mut(), cx)
            {
                return Poll::Ready(Err(e));
            }
            match up.poll(&mut conn, req.body_mut(), cx) {
                Poll::Ready(Err(H1Error::Io(e))) if up.head_sent => {
                    // The server may have answered early and closed: read that answer.
                    write_error = Some(H1Error::Io(e));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        if !up.head_sent {
            return Poll::Pending;
        }
        match poll_head(&mut conn, cx, head_req, false) {
            Poll::Ready(Ok(head)) => Poll::Ready(Ok(head)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(write_error.take().unwrap_or(e))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    match result {
        Ok(head) => {
            // An answer before the whole request was sent ends the connection's use.
            let keep = head.keep_alive && up.done && write_error.is_none();
            let mut resp = Response::new(H1Body {
                conn: Some(conn),
                framing: head.framing,
                keep,
                home,
            });
            *resp.status_mut() = head.status;
            *resp.version_mut() = head.version;
            *resp.headers_mut() = head.headers;
            if resp.body().is_end_stream() {
                resp.body_mut().finish();
            }
            Ok(resp)
        }
        Err(error) => {
            let raced = reused
                && conn.seen == 0
                && matches!(&error, H1Error::Closed | H1Error::Io(_))
                && matches!(req.body(), UpBody::Empty)
                && is_idempotent(req.method());
            Err(Failed {
                error,
                request: raced.then(|| Box::new(req)),
            })
        }
    }
}

#[cfg(test)]
mod tests;
