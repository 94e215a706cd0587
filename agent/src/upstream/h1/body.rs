//! A response body read from an upstream HTTP/1.1 connection (length-delimited, chunked or
//! to the connection's end), which hands the connection back to the pool once read to its
//! end.

use super::*;

/// How the rest of a response body is delimited.
#[derive(Debug, Clone, Copy)]
pub(super) enum Framing {
    /// Bytes of a `Content-Length` body still to read (never 0: that is `Done`).
    Length(u64),
    Chunked(Chunk),
    /// Until the connection ends.
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// A response body read from an upstream HTTP/1.1 connection.
#[derive(Debug)]
pub(crate) struct H1Body {
    pub(super) conn: Option<Conn>,
    pub(super) framing: Framing,
    /// The connection may carry another request once this body is read to the end.
    pub(super) keep: bool,
    pub(super) home: Home,
}

impl H1Body {
    /// The body is read to its end: the connection goes back to the pool if it may.
    pub(super) fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep
            && conn.rbuf.is_empty()
        {
            self.home.pool.put_idle(self.home.addr, conn);
        }
    }

    /// Takes up to `n` bytes already read.
    pub(super) fn take(conn: &mut Conn, n: u64) -> Bytes {
        let n = conn
            .rbuf
            .len()
            .min(usize::try_from(n).unwrap_or(usize::MAX));
        conn.rbuf.split_to(n).freeze()
    }

    pub(super) fn cut_short() -> H1Error {
        H1Error::Invalid("response body cut short")
    }

    pub(super) fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
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
    pub(super) fn poll_chunked(
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
