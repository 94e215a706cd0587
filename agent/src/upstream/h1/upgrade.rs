//! An upgrade handshake on a connection of its own: the request head is written (an upgrade
//! request has no body), and the answer is either `101 Switching Protocols` — the connection
//! then leaves HTTP for good and is handed to the caller with the bytes the origin already
//! sent in the new protocol — or any other answer, read like a normal response (its
//! connection is closed after it, never pooled).

use super::*;
use tokio::io::AsyncWriteExt;

/// What the origin answered to an upgrade request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// `101`: its head (hop-by-hop fields dropped but `Upgrade`), the connection, and the
    /// bytes of the new protocol read with the head.
    Switched {
        head: http::response::Parts,
        io: TcpStream,
        early: Bytes,
    },
    /// Any other answer: passed on as a response.
    Refused(Response<H1Body>),
}

/// Sends the upgrade request `req` (no body; `Connection: upgrade` and `Upgrade` already in
/// its head) on the fresh connection `io`, adding `fwd`, and reads the answer.
pub(crate) async fn upgrade(
    io: TcpStream,
    req: &Request<UpBody>,
    home: Home,
    fwd: Option<&Forwarded>,
) -> Result<Answer, H1Error> {
    let mut conn = Conn::new(io);
    encode_head(&mut conn.wbuf, req, ReqFraming::None, fwd);
    conn.io.write_all(&conn.wbuf).await?;
    conn.wbuf.clear();
    let head_req = req.method() == Method::HEAD;
    let head = std::future::poll_fn(|cx| poll_head(&mut conn, cx, head_req, true)).await?;
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = head.status;
        parts.headers = head.headers;
        let early = conn.rbuf.split().freeze();
        return Ok(Answer::Switched {
            head: parts,
            io: conn.io,
            early,
        });
    }
    let mut resp = Response::new(H1Body {
        conn: Some(conn),
        framing: head.framing,
        keep: false,
        home,
    });
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    if resp.body().is_end_stream() {
        resp.body_mut().finish();
    }
    Ok(Answer::Refused(resp))
}
