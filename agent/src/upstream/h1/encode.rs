//! Writing a request to an upstream HTTP/1.1 connection: the head (with `X-Forwarded-For` and
//! `Via` added as it is encoded), weir's own body framing, and the upload that streams the
//! body without copying its data.

use super::*;

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum ReqFraming {
    None,
    /// Bytes of a `Content-Length` body still to read (never 0: that is `Done`).
    Length(u64),
    Chunked,
}

/// Bytes waiting to be written: `buf[pos..]`, then `data`, then `post` (a chunk's framing
/// around its data, so the data is never copied).
#[derive(Debug, Default)]
pub(super) struct Out {
    pub(super) pos: usize,
    pub(super) data: Bytes,
    pub(super) post: &'static [u8],
}

impl Out {
    pub(super) fn is_empty(&self, buf: &[u8]) -> bool {
        self.pos == buf.len() && self.data.is_empty() && self.post.is_empty()
    }

    pub(super) fn consume(&mut self, buf: &mut Vec<u8>, mut n: usize) {
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

pub(super) fn poll_write_out(
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
pub(super) fn put_dec(buf: &mut Vec<u8>, mut n: u64) {
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
pub(super) fn put_hex(buf: &mut Vec<u8>, mut n: u64) {
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

pub(super) fn encode_head(
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
pub(super) fn append_peer(buf: &mut Vec<u8>, peer: &HeaderValue) {
    buf.truncate(buf.len() - 2);
    buf.extend_from_slice(b", ");
    buf.extend_from_slice(peer.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

pub(super) fn request_framing(req: &Request<UpBody>) -> ReqFraming {
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
pub(super) fn queue_chunk(
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
pub(super) struct Upload {
    pub(super) framing: ReqFraming,
    /// Bytes of a `Content-Length` body still to send.
    pub(super) left: u64,
    pub(super) out: Out,
    /// The body gave its last frame (the terminator may still be queued).
    pub(super) body_done: bool,
    /// Everything was written.
    pub(super) done: bool,
    /// The head has been written at least.
    pub(super) head_sent: bool,
}

impl Upload {
    /// Writes what is queued and pulls more from the body until it ends; `Ready(Ok)` when all
    /// of the request is written.
    pub(super) fn poll(
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
    pub(super) fn pull(
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

    pub(super) fn finish(&mut self, buf: &mut Vec<u8>) -> Result<(), H1Error> {
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
