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
//!   [`MAX_HEAD`] bytes). Interim 1xx answers are skipped; `101` is refused (hop-by-hop
//!   `Upgrade` is never forwarded, so no upstream may switch protocols).
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

use crate::proxy::X_FORWARDED_FOR;
use crate::replay::{BoxError, UpBody};
use crate::upstream::Forwarded;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
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
pub const MAX_HEADERS: usize = 100;
/// Longest response head (and trailer section) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Space made in the read buffer before each read.
const READ_SPACE: usize = 8 * 1024;
/// A body read straight into a buffer of its own (no copy) when this much or more remains.
const DIRECT_READ: u64 = 32 * 1024;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
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
pub struct Failed {
    pub error: H1Error,
    pub request: Option<Box<Request<UpBody>>>,
}

/// One upstream HTTP/1.1 connection and its buffers, reused across requests.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// The request head (and chunk framing) being written.
    wbuf: Vec<u8>,
    /// Bytes read since the current exchange began (interim answers included).
    seen: usize,
}

/// Where a response body hands its connection back.
#[derive(Debug, Clone)]
pub struct Home {
    pub pool: Arc<crate::upstream::Pool>,
    pub addr: SocketAddr,
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::with_capacity(512),
            seen: 0,
        }
    }

    /// Whether an idle connection may carry another request: not if the server closed it
    /// or sent bytes nobody asked for. Costs no syscall unless the socket turned readable.
    pub fn is_reusable(&self) -> bool {
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

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ReqFraming {
    None,
    /// Bytes of a `Content-Length` body still to read (never 0: that is `Done`).
    Length(u64),
    Chunked,
}

/// Bytes waiting to be written: `buf[pos..]`, then `data`, then `post` (a chunk's framing
/// around its data, so the data is never copied).
#[derive(Debug, Default)]
struct Out {
    pos: usize,
    data: Bytes,
    post: &'static [u8],
}

impl Out {
    fn is_empty(&self, buf: &[u8]) -> bool {
        self.pos == buf.len() && self.data.is_empty() && self.post.is_empty()
    }

    fn consume(&mut self, buf: &mut Vec<u8>, mut n: usize) {
        let head = (buf.len() - self.pos).min(n);
        self.pos += head;
        n -= head;
        let data = self.data.len().min(n);
        self.data.advance(data);
        n -= data;
        self.post = &self.post[n.min(self.post.len())..];
        if self.pos == buf.len() {
            buf.clear();
            self.pos = 0;
        }
    }
}

fn poll_write_out(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    out: &mut Out,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !out.is_empty(buf) {
        let slices = [
            IoSlice::new(&buf[out.pos..]),
            IoSlice::new(&out.data),
            IoSlice::new(out.post),
        ];
        let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        out.consume(buf, n);
    }
    Poll::Ready(Ok(()))
}

/// Appends `n` in decimal.
fn put_dec(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Appends `n` in hexadecimal (a chunk size).
fn put_hex(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

fn encode_head(
    buf: &mut Vec<u8>,
    req: &Request<UpBody>,
    framing: ReqFraming,
    fwd: Option<&Forwarded>,
) {
    buf.extend_from_slice(req.method().as_str().as_bytes());
    buf.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    // `X-Forwarded-For` values arrive one after another (the map iterates a name's values
    // together): they are joined on one line and the client's address appended to it.
    let mut in_xff = false;
    let mut had_xff = false;
    for (name, value) in req.headers() {
        // The framing is ours; the downstream's own framing headers do not pass.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        if let Some(fwd) = fwd {
            if name == X_FORWARDED_FOR {
                if in_xff {
                    buf.truncate(buf.len() - 2);
                    buf.extend_from_slice(b", ");
                } else {
                    buf.extend_from_slice(b"x-forwarded-for: ");
                }
                buf.extend_from_slice(value.as_bytes());
                buf.extend_from_slice(b"\r\n");
                in_xff = true;
                had_xff = true;
                continue;
            }
            if in_xff {
                append_peer(buf, &fwd.peer);
                in_xff = false;
            }
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if let Some(fwd) = fwd {
        if in_xff {
            append_peer(buf, &fwd.peer);
        } else if !had_xff {
            buf.extend_from_slice(b"x-forwarded-for: ");
            buf.extend_from_slice(fwd.peer.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        buf.extend_from_slice(b"via: ");
        buf.extend_from_slice(fwd.via.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            put_dec(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// Ends the `X-Forwarded-For` line just written with the client's address.
fn append_peer(buf: &mut Vec<u8>, peer: &HeaderValue) {
    buf.truncate(buf.len() - 2);
    buf.extend_from_slice(b", ");
    buf.extend_from_slice(peer.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

fn request_framing(req: &Request<UpBody>) -> ReqFraming {
    let body = req.body();
    let exact = body.size_hint().exact();
    if body.is_end_stream() || exact == Some(0) {
        // Servers may answer 411 to a POST without a length, so methods that carry a body
        // (and any request that said it had one) say it is empty.
        let says = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
            || req.headers().contains_key(CONTENT_LENGTH);
        return if says {
            ReqFraming::Length(0)
        } else {
            ReqFraming::None
        };
    }
    exact.map_or(ReqFraming::Chunked, ReqFraming::Length)
}

/// Frames one body chunk into `out` (its data is not copied).
fn queue_chunk(
    buf: &mut Vec<u8>,
    out: &mut Out,
    framing: ReqFraming,
    data: Bytes,
    left: &mut u64,
) -> Result<(), H1Error> {
    match framing {
        ReqFraming::Chunked => {
            put_hex(buf, data.len() as u64);
            buf.extend_from_slice(b"\r\n");
            out.post = b"\r\n";
        }
        ReqFraming::Length(_) => {
            let n = data.len() as u64;
            if n > *left {
                return Err(H1Error::RequestBody(
                    "request body longer than its content-length".into(),
                ));
            }
            *left -= n;
        }
        ReqFraming::None => {
            return Err(H1Error::RequestBody(
                "request body where none was announced".into(),
            ));
        }
    }
    out.data = data;
    Ok(())
}

/// The upload side of an exchange.
struct Upload {
    framing: ReqFraming,
    /// Bytes of a `Content-Length` body still to send.
    left: u64,
    out: Out,
    /// The body gave its last frame (the terminator may still be queued).
    body_done: bool,
    /// Everything was written.
    done: bool,
    /// The head has been written at least.
    head_sent: bool,
}

impl Upload {
    /// Writes what is queued and pulls more from the body until it ends; `Ready(Ok)` when all
    /// of the request is written.
    fn poll(
        &mut self,
        conn: &mut Conn,
        body: &mut UpBody,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), H1Error>> {
        loop {
            ready!(poll_write_out(
                &mut conn.io,
                &mut conn.wbuf,
                &mut self.out,
                cx
            ))?;
            self.head_sent = true;
            if self.body_done {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            ready!(self.pull(&mut conn.wbuf, body, cx))?;
        }
    }

    /// Takes the body's next frame and queues it (or the body's end) for writing.
    fn pull(
        &mut self,
        buf: &mut Vec<u8>,
        body: &mut UpBody,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), H1Error>> {
        match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                // Trailers of a request are dropped: HTTP/1.1 servers rarely read them.
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    queue_chunk(buf, &mut self.out, self.framing, data, &mut self.left)?;
                }
            }
            Some(Err(e)) => return Poll::Ready(Err(H1Error::RequestBody(e))),
            None => self.finish(buf)?,
        }
        Poll::Ready(Ok(()))
    }

    fn finish(&mut self, buf: &mut Vec<u8>) -> Result<(), H1Error> {
        self.body_done = true;
        match self.framing {
            ReqFraming::Chunked => buf.extend_from_slice(b"0\r\n\r\n"),
            ReqFraming::Length(_) if self.left > 0 => {
                return Err(H1Error::RequestBody(
                    "request body shorter than its content-length".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// A parsed response head, with how its body is framed.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Reads until a final (non-1xx) response head is complete.
fn poll_head(conn: &mut Conn, cx: &mut Context<'_>, head_req: bool) -> Poll<Result<Head, H1Error>> {
    loop {
        if !conn.rbuf.is_empty() {
            match parse_head(&mut conn.rbuf, head_req)? {
                Some(head) => return Poll::Ready(Ok(head)),
                None if conn.rbuf.len() >= MAX_HEAD => {
                    return Poll::Ready(Err(H1Error::Invalid("response head too large")));
                }
                None => {}
            }
        }
        if ready!(conn.poll_fill(cx))? == 0 {
            return Poll::Ready(Err(H1Error::Closed));
        }
    }
}

/// Parses a response head at the start of `rbuf`; `None` if it is not complete yet. An interim
/// (1xx) answer is consumed and the next head parsed.
fn parse_head(rbuf: &mut BytesMut, head_req: bool) -> Result<Option<Head>, H1Error> {
    loop {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, rbuf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Invalid("too many response headers"));
            }
            Err(_) => return Err(H1Error::Invalid("malformed response head")),
        };
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("bad response status"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(H1Error::Invalid(
                "101 Switching Protocols was not asked for",
            ));
        }
        if status.is_informational() {
            rbuf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // The head becomes one shared buffer the header values point into (no copy each);
        // its fields are located by offset, since the parse borrows the read buffer.
        let base = rbuf.as_ptr() as usize;
        let count = resp.headers.len();
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            *span = (
                n as u32,
                h.name.len() as u32,
                v as u32,
                h.value.len() as u32,
            );
        }
        let bytes = rbuf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        let mut length: Option<u64> = None;
        let mut lengths = 0;
        let mut te: Option<bool> = None; // Some(last coding is chunked)
        let mut close = version == Version::HTTP_10;
        // A `Connection` value naming more hop-by-hop fields than `close` / `keep-alive`.
        let mut names_more: Option<HeaderValue> = None;
        for &(n, nl, v, vl) in &spans[..count] {
            let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
            let name = HeaderName::from_bytes(&bytes[n..n + nl])
                .map_err(|_| H1Error::Invalid("bad response header name"))?;
            let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl))
                .map_err(|_| H1Error::Invalid("bad response header value"))?;
            if name == CONTENT_LENGTH {
                let n = parse_length(value.as_bytes())?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::Invalid("conflicting content-length"));
                }
                length = Some(n);
                lengths += 1;
            } else if name == TRANSFER_ENCODING {
                let last = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .unwrap_or(b"");
                te = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        if version == Version::HTTP_10 {
                            close = false;
                        }
                    } else if !token.is_empty() {
                        names_more = Some(value.clone());
                    }
                }
            }
            // Hop-by-hop fields end here; the proxy passes the rest on.
            if crate::proxy::hop_by_hop_index(&name).is_none() {
                headers.append(name, value);
            }
        }
        if let Some(conn) = names_more {
            crate::proxy::remove_connection_named(&mut headers, &conn);
        }
        headers.append(http::header::VIA, crate::proxy::VIA_11);
        let bodyless =
            head_req || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let framing = if bodyless {
            Framing::Done
        } else {
            match (te, length) {
                (Some(_), Some(_)) => {
                    return Err(H1Error::Invalid(
                        "both transfer-encoding and content-length",
                    ));
                }
                (Some(_), None) if version == Version::HTTP_10 => {
                    return Err(H1Error::Invalid(
                        "transfer-encoding in an HTTP/1.0 response",
                    ));
                }
                (Some(true), None) => Framing::Chunked(Chunk::Size),
                (Some(false), None) | (None, None) => {
                    close = true;
                    Framing::Eof
                }
                (None, Some(n)) => {
                    if lengths > 1 {
                        // Repeated (and equal): passed on once.
                        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
                    }
                    // A body still to read is never empty: `Length(0)` is not a state.
                    if n == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(n)
                    }
                }
            }
        };
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive: !close,
        }));
    }
}

fn parse_length(v: &[u8]) -> Result<u64, H1Error> {
    // A list of equal values ("5, 5") is allowed by RFC 9110 §8.6.
    let mut result: Option<u64> = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(H1Error::Invalid("bad content-length"));
        }
        let n = part
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        if result.is_some_and(|r| r != n) {
            return Err(H1Error::Invalid("conflicting content-length"));
        }
        result = Some(n);
    }
    result.ok_or(H1Error::Invalid("bad content-length"))
}

/// Sends `req` on `conn`, with `fwd` added to its head, and reads the response head; the
/// returned body reads the rest and hands the connection back to `home` when it is done.
/// `reused`: the connection came from the pool (so a close before any answer may be a
/// keep-alive race, see the module doc).
pub async fn exchange(
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
        match poll_head(&mut conn, cx, head_req) {
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
                && crate::proxy::is_idempotent(req.method());
            Err(Failed {
                error,
                request: raced.then(|| Box::new(req)),
            })
        }
    }
}

/// How the rest of a response body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Bytes of a `Content-Length` body still to read (never 0: that is `Done`).
    Length(u64),
    Chunked(Chunk),
    /// Until the connection ends.
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// A response body read from an upstream HTTP/1.1 connection.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    /// The connection may carry another request once this body is read to the end.
    keep: bool,
    home: Home,
}

impl H1Body {
    /// The body is read to its end: the connection goes back to the pool if it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep
            && conn.rbuf.is_empty()
        {
            self.home.pool.put_idle(self.home.addr, conn);
        }
    }

    /// Takes up to `n` bytes already read.
    fn take(conn: &mut Conn, n: u64) -> Bytes {
        let n = conn
            .rbuf
            .len()
            .min(usize::try_from(n).unwrap_or(usize::MAX));
        conn.rbuf.split_to(n).freeze()
    }

    fn cut_short() -> H1Error {
        H1Error::Invalid("response body cut short")
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) => {
                    if conn.rbuf.is_empty() {
                        if left >= DIRECT_READ {
                            // A large body is read into a buffer of its own and passed on as is.
                            let mut own = BytesMut::with_capacity(left.min(64 * 1024) as usize);
                            let n = ready!(tokio_util::io::poll_read_buf(
                                Pin::new(&mut conn.io),
                                cx,
                                &mut own
                            ))?;
                            if n == 0 {
                                return Poll::Ready(Some(Err(Self::cut_short())));
                            }
                            conn.rbuf = own;
                        } else if ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(Self::cut_short())));
                        }
                    }
                    let data = Self::take(conn, left);
                    let rest = left - data.len() as u64;
                    self.framing = Framing::Length(rest);
                    if rest == 0 {
                        // hyper stops polling a body whose length is reached, so the
                        // connection goes back with the last bytes, not at a later poll.
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Eof => {
                    if conn.rbuf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        self.framing = Framing::Done;
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(conn.rbuf.split().freeze()))));
                }
                Framing::Chunked(state) => {
                    if let Some(frame) = ready!(self.poll_chunked(cx, state))? {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    // A state change without a frame: go round.
                }
            }
        }
    }

    /// One step of the chunked decoder: `Some(frame)` to pass on, `None` when only the state
    /// moved (or the body ended: then the framing is `Done`).
    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        state: Chunk,
    ) -> Poll<Result<Option<Frame<Bytes>>, H1Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        match state {
            Chunk::Size => match httparse::parse_chunk_size(&conn.rbuf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    conn.rbuf.advance(used);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                    Poll::Ready(Ok(None))
                }
                Ok(httparse::Status::Partial) if conn.rbuf.len() < MAX_CHUNK_LINE => {
                    if ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(Self::cut_short()));
                    }
                    Poll::Ready(Ok(None))
                }
                _ => Poll::Ready(Err(H1Error::Invalid("bad chunk size"))),
            },
            Chunk::Data(left) => {
                if conn.rbuf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                    return Poll::Ready(Err(Self::cut_short()));
                }
                let data = Self::take(conn, left);
                let rest = left - data.len() as u64;
                self.framing = Framing::Chunked(if rest == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rest)
                });
                Poll::Ready(Ok(Some(Frame::data(data))))
            }
            Chunk::DataEnd => {
                if conn.rbuf.len() < 2 {
                    if ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(Self::cut_short()));
                    }
                    return Poll::Ready(Ok(None));
                }
                if &conn.rbuf[..2] != b"\r\n" {
                    return Poll::Ready(Err(H1Error::Invalid("chunk not followed by CRLF")));
                }
                conn.rbuf.advance(2);
                self.framing = Framing::Chunked(Chunk::Size);
                Poll::Ready(Ok(None))
            }
            Chunk::Trailers => {
                if conn.rbuf.starts_with(b"\r\n") {
                    conn.rbuf.advance(2);
                    self.finish();
                    return Poll::Ready(Ok(None));
                }
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(&conn.rbuf, &mut slots) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            if let (Ok(n), Ok(v)) = (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) {
                                trailers.append(n, v);
                            }
                        }
                        conn.rbuf.advance(used);
                        self.finish();
                        Poll::Ready(Ok(Some(Frame::trailers(trailers))))
                    }
                    Ok(httparse::Status::Partial) if conn.rbuf.len() < MAX_HEAD => {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(Self::cut_short()));
                        }
                        Poll::Ready(Ok(None))
                    }
                    _ => Poll::Ready(Err(H1Error::Invalid("bad trailers"))),
                }
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match ready!(this.poll_body(cx)) {
            Some(Err(e)) => {
                // A broken body leaves the connection mid-message: it is closed.
                this.framing = Framing::Done;
                this.conn = None;
                Poll::Ready(Some(Err(e.into())))
            }
            other => Poll::Ready(other.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
#[path = "h1c_tests.rs"]
mod tests;
