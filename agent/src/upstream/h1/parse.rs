//! Reading an upstream's HTTP/1.1 response head: strict parsing with `httparse`, interim
//! answers skipped, RFC 9112 §6.3 body framing decided, hop-by-hop fields dropped and `Via`
//! added in the same pass.

use super::*;

/// A parsed response head, with how its body is framed.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
}

/// Reads until a final (non-1xx) response head is complete; with `upgrade` (the request
/// asked to switch protocols) a `101` is final too.
pub(super) fn poll_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    head_req: bool,
    upgrade: bool,
) -> Poll<Result<Head, H1Error>> {
    loop {
        if !conn.rbuf.is_empty() {
            match parse_head(&mut conn.rbuf, head_req, upgrade)? {
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
/// (1xx) answer is consumed and the next head parsed. A `101` is refused unless `upgrade`
/// (the request asked for it): then it is the final head, keeps its `Upgrade` field, and
/// what follows it in `rbuf` is the new protocol's.
pub(super) fn parse_head(
    rbuf: &mut BytesMut,
    head_req: bool,
    upgrade: bool,
) -> Result<Option<Head>, H1Error> {
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
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if switched && !upgrade {
            return Err(H1Error::Invalid(
                "101 Switching Protocols was not asked for",
            ));
        }
        if status.is_informational() && !switched {
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
            // Hop-by-hop fields end here; the proxy passes the rest on (and a `101`'s
            // `Upgrade`, which names the protocol the client is switched to).
            if hop_by_hop_index(&name).is_none() || (switched && name == UPGRADE) {
                headers.append(name, value);
            }
        }
        if let Some(conn) = names_more {
            // A `101` says `Connection: upgrade`; its `Upgrade` stays all the same.
            let up = if switched {
                headers.remove(UPGRADE)
            } else {
                None
            };
            remove_connection_named(&mut headers, &conn);
            if let Some(up) = up {
                headers.insert(UPGRADE, up);
            }
        }
        headers.append(http::header::VIA, VIA_11);
        if switched {
            // No body: the bytes after the head belong to the new protocol.
            return Ok(Some(Head {
                status,
                version,
                headers,
                framing: Framing::Done,
                keep_alive: false,
            }));
        }
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

pub(super) fn parse_length(v: &[u8]) -> Result<u64, H1Error> {
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
