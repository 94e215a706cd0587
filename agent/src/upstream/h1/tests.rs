//! Tests of the upstream HTTP/1.1 exchange against scripted loopback origins.

use super::*;
use crate::upstream::{self, Pool};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// What a scripted origin does with a request it has read.
enum Act {
    /// Writes these bytes and waits for the next request on the connection.
    Reply(&'static [u8]),
    /// Writes these bytes and closes the connection.
    ReplyClose(&'static [u8]),
    /// Closes the connection without answering.
    Close,
}

/// A loopback origin that reads whole requests and acts as its script says.
struct Origin {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    /// Each request read: (connection index, raw bytes). Sent before the origin acts on it.
    seen: mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    /// The index of each connection the origin closed (or saw closed).
    closed: mpsc::UnboundedReceiver<usize>,
}

impl Origin {
    /// The requests seen so far.
    fn requests(&mut self) -> Vec<(usize, Vec<u8>)> {
        let mut all = Vec::new();
        while let Ok(r) = self.seen.try_recv() {
            all.push(r);
        }
        all
    }

    /// The connection indexes the requests seen so far came on.
    fn conns(&mut self) -> Vec<usize> {
        self.requests().into_iter().map(|(c, _)| c).collect()
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Starts an origin; `script(connection index, request index over all connections)` says
/// what to do with each request.
async fn origin<F>(script: F) -> Origin
where
    F: Fn(usize, usize) -> Act + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let script = Arc::new(script);
    let count = accepts.clone();
    tokio::spawn(async move {
        let nth = Arc::new(AtomicUsize::new(0));
        while let Ok((mut stream, _)) = listener.accept().await {
            let conn = count.fetch_add(1, Ordering::SeqCst);
            let (script, nth) = (script.clone(), nth.clone());
            let (seen_tx, closed_tx) = (seen_tx.clone(), closed_tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(raw) = read_request(&mut stream, &mut buf).await {
                    let _ = seen_tx.send((conn, raw));
                    match script(conn, nth.fetch_add(1, Ordering::SeqCst)) {
                        Act::Reply(bytes) => {
                            if stream.write_all(bytes).await.is_err() {
                                break;
                            }
                        }
                        Act::ReplyClose(bytes) => {
                            let _ = stream.write_all(bytes).await;
                            break;
                        }
                        Act::Close => break,
                    }
                }
                drop(stream);
                let _ = closed_tx.send(conn);
            });
        }
    });
    Origin {
        addr,
        accepts,
        seen,
        closed,
    }
}

/// A keep-alive answer with a 2-byte body, `ok`.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// An origin that answers [`OK`], except that it closes the connection under the second
/// request it reads without answering it (the keep-alive race).
async fn closing_the_second_request() -> Origin {
    origin(|_, nth| if nth == 1 { Act::Close } else { Act::Reply(OK) }).await
}

/// An origin giving every request the same keep-alive answer.
async fn always(response: &'static [u8]) -> Origin {
    origin(move |_, _| Act::Reply(response)).await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request (its head, and its body as the head frames it) from `stream`; `buf`
/// keeps what was read beyond it. `None` when the stream ends (or fails) first.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    async fn fill(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<()> {
        match stream.read_buf(buf).await {
            Ok(n) if n > 0 => Some(()),
            _ => None,
        }
    }
    let head_len = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        fill(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().expect("request content-length"));
    let end = if let Some(n) = length {
        while buf.len() < head_len + n {
            fill(stream, buf).await?;
        }
        head_len + n
    } else if head.contains("transfer-encoding: chunked") {
        let mut pos = head_len;
        loop {
            match httparse::parse_chunk_size(&buf[pos..]) {
                Ok(httparse::Status::Complete((used, size))) => {
                    // The last chunk is followed by an empty trailer section.
                    let next = pos + used + size as usize + 2;
                    while buf.len() < next {
                        fill(stream, buf).await?;
                    }
                    pos = next;
                    if size == 0 {
                        break pos;
                    }
                }
                Ok(httparse::Status::Partial) => fill(stream, buf).await?,
                Err(_) => panic!("bad chunk size in the request"),
            }
        }
    } else {
        head_len
    };
    Some(buf.drain(..end).collect())
}

/// The payload of a chunked message body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete((_, 0))) => return out,
            Ok(httparse::Status::Complete((used, size))) => {
                let size = size as usize;
                out.extend_from_slice(&body[used..used + size]);
                body = &body[used + size + 2..];
            }
            other => panic!("bad chunked body: {other:?}"),
        }
    }
}

/// Fails a test that would otherwise hang.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

fn request(method: Method, uri: &'static str) -> Request<UpBody> {
    let mut req = Request::new(UpBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = http::Uri::from_static(uri);
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_static("x"));
    req
}

fn get(uri: &'static str) -> Request<UpBody> {
    request(Method::GET, uri)
}

/// Runs `exchange` on a new connection to `origin`, handing it back to `pool` when done.
async fn send(
    origin: &Origin,
    pool: &Arc<Pool>,
    req: Request<UpBody>,
    reused: bool,
) -> Result<Response<H1Body>, Failed> {
    let io = tokio::net::TcpStream::connect(origin.addr)
        .await
        .expect("connect");
    let home = Home {
        pool: pool.clone(),
        addr: origin.addr,
    };
    within(exchange(Conn::new(io), req, reused, home, None)).await
}

/// Sends `req` through the pool (an idle connection if it has one).
async fn pooled(
    origin: &Origin,
    pool: &Arc<Pool>,
    req: Request<UpBody>,
) -> Result<Response<upstream::RespBody>, upstream::Error> {
    within(pool.send(origin.addr, false, req, Instant::now(), None))
        .await
        .map(|(resp, _lease)| resp)
}

async fn body<B>(resp: Response<B>) -> Result<Bytes, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    within(resp.into_body().collect())
        .await
        .map(|c| c.to_bytes())
        .map_err(Into::into)
}

fn new_pool() -> Arc<Pool> {
    Pool::new(Duration::from_secs(2))
}

fn invalid(result: Result<Response<H1Body>, Failed>) -> &'static str {
    match result {
        Err(Failed {
            error: H1Error::Invalid(why),
            request: None,
        }) => why,
        other => panic!("expected an invalid response, got {other:?}"),
    }
}

#[tokio::test]
async fn a_get_goes_out_in_origin_form_and_its_response_is_read_whole() {
    let mut o = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello").await;
    let pool = new_pool();
    let mut req = get("http://ignored.example/path?q=1");
    req.headers_mut()
        .insert("x-custom", HeaderValue::from_static("v"));
    let resp = send(&o, &pool, req, false).await.expect("exchange");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.headers()["x-up"], "1");
    assert_eq!(resp.headers()[CONTENT_LENGTH], "5");
    assert_eq!(resp.body().size_hint().exact(), Some(5));
    assert_eq!(&body(resp).await.expect("body")[..], b"hello");
    let seen = o.requests();
    assert_eq!(seen.len(), 1);
    let raw = String::from_utf8(seen[0].1.clone()).expect("utf-8");
    assert!(raw.starts_with("GET /path?q=1 HTTP/1.1\r\n"), "{raw:?}");
    assert!(raw.contains("\r\nhost: x\r\n"), "{raw:?}");
    assert!(raw.contains("\r\nx-custom: v\r\n"), "{raw:?}");
    assert!(!raw.contains("content-length"), "{raw:?}");
    assert!(!raw.contains("transfer-encoding"), "{raw:?}");
    assert!(raw.ends_with("\r\n\r\n"), "{raw:?}");
}

#[tokio::test]
async fn keep_alive_responses_reuse_one_connection() {
    let mut o = always(OK).await;
    let pool = new_pool();
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    }
    assert_eq!(o.accepts(), 1);
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn connection_close_in_the_response_ends_the_connection() {
    let mut o =
        always(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok").await;
    let pool = new_pool();
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    }
    assert_eq!(o.accepts(), 2);
    assert_eq!(o.conns(), [0, 1]);
}

#[tokio::test]
async fn http_1_0_responses_are_reused_only_with_keep_alive() {
    let mut o = always(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let pool = new_pool();
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        assert_eq!(resp.version(), Version::HTTP_10);
        assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    }
    assert_eq!(o.conns(), [0, 1]);

    let mut o =
        always(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok").await;
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    }
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn a_chunked_response_is_decoded_with_its_trailers_and_the_connection_reused() {
    let mut o = always(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
          3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nx-checksum: abc\r\n\r\n",
    )
    .await;
    let pool = new_pool();
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body().size_hint().exact(), None);
    let collected = within(resp.into_body().collect()).await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(trailers.len(), 1);
    assert_eq!(&collected.to_bytes()[..], b"hello");
    // The connection went back to the pool: the next request goes over it.
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"hello");
    assert_eq!(o.accepts(), 1);
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn a_chunked_response_without_trailers_ends_and_is_reused() {
    let mut o = always(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let pool = new_pool();
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        let mut b = resp.into_body();
        let mut data = Vec::new();
        while let Some(frame) = within(b.frame()).await {
            let frame = frame.expect("frame");
            assert!(frame.is_data(), "no trailers were sent: {frame:?}");
            data.extend_from_slice(&frame.into_data().expect("data"));
        }
        assert_eq!(data, b"hello");
    }
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn a_chunked_response_with_a_bad_chunk_size_fails_its_body() {
    let o =
        always(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
            .await;
    let pool = new_pool();
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert!(body(resp).await.is_err());
}

#[tokio::test]
async fn an_interim_100_continue_is_skipped() {
    let mut o = always(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    let pool = new_pool();
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key("link"));
    assert_eq!(&body(resp).await.expect("body")[..], b"hello");
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&body(resp).await.expect("body")[..], b"hello");
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn both_transfer_encoding_and_content_length_are_refused() {
    let o = always(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let pool = new_pool();
    invalid(send(&o, &pool, get("/"), false).await);
    // Either order.
    let o = always(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    invalid(send(&o, &pool, get("/"), false).await);
}

#[tokio::test]
async fn switching_protocols_is_refused() {
    let o = always(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await;
    let pool = new_pool();
    invalid(send(&o, &pool, get("/"), false).await);
}

#[tokio::test]
async fn a_head_response_has_no_body_and_the_connection_is_reused() {
    let mut o = origin(|_, nth| {
        if nth == 0 {
            Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        } else {
            Act::Reply(OK)
        }
    })
    .await;
    let pool = new_pool();
    let resp = send(&o, &pool, request(Method::HEAD, "/"), false)
        .await
        .expect("exchange");
    assert_eq!(resp.headers()[CONTENT_LENGTH], "100");
    assert!(resp.body().is_end_stream());
    let mut b = resp.into_body();
    assert!(within(b.frame()).await.is_none());
    // The next request goes over the same connection (and is not mistaken for the body).
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    let seen = o.requests();
    assert_eq!(seen.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [0, 0]);
    assert!(seen[0].1.starts_with(b"HEAD / HTTP/1.1\r\n"));
    assert_eq!(o.accepts(), 1);
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    for response in [
        &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\netag: \"a\"\r\n\r\n",
    ] {
        let mut o = origin(move |_, nth| {
            if nth == 0 {
                Act::Reply(response)
            } else {
                Act::Reply(OK)
            }
        })
        .await;
        let pool = new_pool();
        let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
        assert!(resp.status() == 204 || resp.status() == 304);
        assert!(resp.body().is_end_stream());
        assert!(body(resp).await.expect("body").is_empty());
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        assert_eq!(&body(resp).await.expect("body")[..], b"ok");
        assert_eq!(o.conns(), [0, 0]);
    }
}

#[tokio::test]
async fn a_close_delimited_body_is_read_to_the_end_and_not_reused() {
    let mut o = origin(|_, _| Act::ReplyClose(b"HTTP/1.1 200 OK\r\n\r\nhello, world")).await;
    let pool = new_pool();
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert_eq!(resp.body().size_hint().exact(), None);
    assert_eq!(&body(resp).await.expect("body")[..], b"hello, world");
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"hello, world");
    assert_eq!(o.accepts(), 2);
    assert_eq!(o.conns(), [0, 1]);
}

#[tokio::test]
async fn a_large_body_is_read_whole_and_the_connection_reused() {
    // Past the size where the body is read into buffers of its own.
    const LEN: usize = 200 * 1024;
    static RESPONSE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let response = RESPONSE.get_or_init(|| {
        let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").into_bytes();
        r.extend((0..LEN).map(|i| (i % 251) as u8));
        r
    });
    let mut o = always(response).await;
    let pool = new_pool();
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        let got = body(resp).await.expect("body");
        assert_eq!(got.len(), LEN);
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error() {
    let o =
        origin(|_, _| Act::ReplyClose(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd")).await;
    let pool = new_pool();
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert!(body(resp).await.is_err());
    // Same for a chunked body that stops mid-chunk.
    let o = origin(|_, _| {
        Act::ReplyClose(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\nabcd")
    })
    .await;
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert!(body(resp).await.is_err());
}

#[tokio::test]
async fn a_malformed_response_head_is_invalid() {
    for response in [
        &b"HTTP/1.1 abc OK\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: five\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"SMTP ready\r\n\r\n",
    ] {
        let o = always(response).await;
        let pool = new_pool();
        let why = invalid(send(&o, &pool, get("/"), false).await);
        assert!(!why.is_empty());
    }
}

#[tokio::test]
async fn content_lengths_must_agree() {
    let o =
        always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").await;
    let pool = new_pool();
    invalid(send(&o, &pool, get("/"), false).await);
    let o = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!").await;
    invalid(send(&o, &pool, get("/"), false).await);

    let o = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello").await;
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    let lengths: Vec<_> = resp.headers().get_all(CONTENT_LENGTH).iter().collect();
    assert_eq!(lengths, ["5"]);
    assert_eq!(&body(resp).await.expect("body")[..], b"hello");
    // A list of equal values is one length too.
    let o = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello").await;
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    assert_eq!(resp.body().size_hint().exact(), Some(5));
    assert_eq!(&body(resp).await.expect("body")[..], b"hello");
}

#[tokio::test]
async fn an_idle_connection_closed_after_its_answer_is_replaced() {
    let mut o = origin(|_, _| Act::ReplyClose(OK)).await;
    let pool = new_pool();
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    // The answer implied keep-alive, so the pool kept the connection the origin then closed.
    assert_eq!(within(o.closed.recv()).await, Some(0));
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    assert_eq!(o.accepts(), 2);
    assert_eq!(o.conns(), [0, 1]);
}

#[tokio::test]
async fn a_pooled_connection_closed_under_a_get_is_retried_on_a_new_one() {
    // The second request reaches the pooled connection and the origin closes it unanswered
    // (the keep-alive race): the GET goes again on a new connection.
    let mut o = closing_the_second_request().await;
    let pool = new_pool();
    for _ in 0..2 {
        let resp = pooled(&o, &pool, get("/")).await.expect("send");
        assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    }
    assert_eq!(o.accepts(), 2);
    assert_eq!(o.conns(), [0, 0, 1]);
}

#[tokio::test]
async fn a_pooled_connection_closed_under_a_post_is_not_retried() {
    let mut o = closing_the_second_request().await;
    let pool = new_pool();
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    match pooled(&o, &pool, request(Method::POST, "/")).await {
        Err(upstream::Error::Http(H1Error::Closed | H1Error::Io(_))) => {}
        other => panic!("expected the POST to fail, got {other:?}"),
    }
    assert_eq!(o.accepts(), 1);
    assert_eq!(o.conns(), [0, 0]);
}

#[tokio::test]
async fn a_close_before_any_answer_gives_back_only_a_reused_idempotent_request() {
    let o = origin(|_, _| Act::Close).await;
    let pool = new_pool();

    let mut req = get("/again");
    req.headers_mut()
        .insert("x-kept", HeaderValue::from_static("1"));
    let failed = send(&o, &pool, req, true).await.expect_err("no answer");
    assert!(
        matches!(failed.error, H1Error::Closed | H1Error::Io(_)),
        "{:?}",
        failed.error
    );
    let back = failed.request.expect("a reused GET is given back");
    assert_eq!(back.method(), Method::GET);
    assert_eq!(back.uri(), "/again");
    assert_eq!(back.headers()["x-kept"], "1");

    let failed = send(&o, &pool, request(Method::POST, "/"), true)
        .await
        .expect_err("no answer");
    assert!(
        matches!(failed.error, H1Error::Closed | H1Error::Io(_)),
        "{:?}",
        failed.error
    );
    assert!(failed.request.is_none(), "a POST is not given back");

    let failed = send(&o, &pool, get("/"), false)
        .await
        .expect_err("no answer");
    assert!(
        matches!(failed.error, H1Error::Closed | H1Error::Io(_)),
        "{:?}",
        failed.error
    );
    assert!(
        failed.request.is_none(),
        "a fresh connection is not retried"
    );
}

#[tokio::test]
async fn a_close_after_part_of_the_head_does_not_give_the_request_back() {
    let o = origin(|_, _| Act::ReplyClose(b"HTTP/1.1 200 O")).await;
    let pool = new_pool();
    let failed = send(&o, &pool, get("/"), true).await.expect_err("cut head");
    assert!(
        matches!(failed.error, H1Error::Closed),
        "{:?}",
        failed.error
    );
    assert!(failed.request.is_none());
}

#[tokio::test]
async fn a_close_after_an_interim_answer_does_not_give_the_request_back() {
    let o = origin(|_, _| Act::ReplyClose(b"HTTP/1.1 100 Continue\r\n\r\n")).await;
    let pool = new_pool();
    let failed = send(&o, &pool, get("/"), true)
        .await
        .expect_err("no final answer");
    assert!(
        matches!(failed.error, H1Error::Closed),
        "{:?}",
        failed.error
    );
    assert!(
        failed.request.is_none(),
        "a byte of the answer arrived: the request must not be given back"
    );
}

#[tokio::test]
async fn a_post_without_a_body_says_content_length_0() {
    let mut o = always(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let pool = new_pool();
    for method in [Method::POST, Method::PUT, Method::PATCH] {
        let resp = send(&o, &pool, request(method.clone(), "/p"), false)
            .await
            .expect("exchange");
        assert!(body(resp).await.expect("body").is_empty());
        let seen = o.requests();
        let raw = String::from_utf8(seen[0].1.clone()).expect("utf-8");
        assert!(
            raw.starts_with(&format!("{method} /p HTTP/1.1\r\n")),
            "{raw:?}"
        );
        assert!(raw.contains("\r\ncontent-length: 0\r\n"), "{raw:?}");
        assert!(!raw.contains("transfer-encoding"), "{raw:?}");
    }
    // A downstream's own framing header is not copied; a DELETE without a body says nothing.
    let mut req = request(Method::DELETE, "/p");
    req.headers_mut()
        .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    let resp = send(&o, &pool, req, false).await.expect("exchange");
    assert!(body(resp).await.expect("body").is_empty());
    let raw = String::from_utf8(o.requests()[0].1.clone()).expect("utf-8");
    assert!(!raw.contains("transfer-encoding"), "{raw:?}");
    assert!(!raw.contains("content-length"), "{raw:?}");
}

/// A request body as hyper's server gives it: `raw` (a whole request) is written to a
/// loopback hyper server, whose service hands the request over. The returned stream is the
/// client side, to write more of the body on.
async fn incoming(raw: &'static [u8]) -> (Request<hyper::body::Incoming>, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let svc = hyper::service::service_fn(move |req| {
            let _ = tx.send(req);
            // Never answers: the test owns the request body and reads it at its own pace.
            std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, std::io::Error>>()
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    client.write_all(raw).await.expect("write");
    let req = within(rx.recv()).await.expect("request");
    (req, client)
}

/// A request to send upstream carrying the downstream request's headers and body.
fn forwarded(down: Request<hyper::body::Incoming>) -> Request<UpBody> {
    let (parts, incoming) = down.into_parts();
    let mut req = Request::new(UpBody::Stream(http_body_util::Either::Left(incoming)));
    *req.method_mut() = parts.method;
    *req.uri_mut() = parts.uri;
    *req.headers_mut() = parts.headers;
    req
}

#[tokio::test]
async fn a_streamed_body_of_unknown_length_goes_out_chunked() {
    let mut o = always(OK).await;
    let pool = new_pool();
    let (down, mut client) =
        incoming(b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            .await;
    let mut req = forwarded(down);
    // A bogus length from downstream must not pass either.
    req.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
    let home = Home {
        pool: pool.clone(),
        addr: o.addr,
    };
    let io = tokio::net::TcpStream::connect(o.addr)
        .await
        .expect("connect");
    let exchanged = tokio::spawn(exchange(Conn::new(io), req, false, home, None));
    // The rest of the body arrives after the exchange has started.
    client
        .write_all(b"4\r\ndefg\r\n0\r\n\r\n")
        .await
        .expect("write");
    let resp = within(exchanged).await.expect("task").expect("exchange");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    let raw = o.requests().remove(0).1;
    let head_len = find(&raw, b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8(raw[..head_len].to_vec()).expect("utf-8");
    assert!(head.starts_with("POST /up HTTP/1.1\r\n"), "{head:?}");
    assert_eq!(
        head.matches("transfer-encoding: chunked\r\n").count(),
        1,
        "{head:?}"
    );
    assert!(!head.contains("content-length"), "{head:?}");
    assert!(raw.ends_with(b"\r\n0\r\n\r\n"));
    assert_eq!(dechunk(&raw[head_len..]), b"abcdefg");
    // The request went out whole and the answer was kept alive: reused.
    let resp = pooled(&o, &pool, get("/")).await.expect("send");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    assert_eq!(o.conns(), [0]);
    assert_eq!(o.accepts(), 1);
}

#[tokio::test]
async fn a_streamed_body_of_known_length_goes_out_with_content_length() {
    let mut o = always(OK).await;
    let pool = new_pool();
    let (down, _client) =
        incoming(b"PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nabcdef").await;
    let req = forwarded(down);
    assert_eq!(req.body().size_hint().exact(), Some(6));
    let resp = send(&o, &pool, req, false).await.expect("exchange");
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
    let raw = String::from_utf8(o.requests().remove(0).1).expect("utf-8");
    assert!(raw.starts_with("PUT /up HTTP/1.1\r\n"), "{raw:?}");
    assert_eq!(raw.matches("content-length: 6\r\n").count(), 1, "{raw:?}");
    assert!(!raw.contains("transfer-encoding"), "{raw:?}");
    assert!(raw.ends_with("\r\n\r\nabcdef"), "{raw:?}");
}

#[tokio::test]
async fn the_client_address_joins_x_forwarded_for_and_via_is_added() {
    let mut o = always(OK).await;
    let pool = new_pool();
    let fwd = Forwarded {
        peer: HeaderValue::from_static("10.0.0.9"),
        via: HeaderValue::from_static("1.1 weir"),
    };
    let mut seen = Vec::new();
    // Without, with one and with two earlier values (two lines become one list).
    for earlier in [&[][..], &["10.0.0.1"][..], &["10.0.0.1", "10.0.0.2"][..]] {
        let mut req = get("/");
        for v in earlier {
            req.headers_mut()
                .append("x-forwarded-for", HeaderValue::from_static(v));
        }
        req.headers_mut()
            .insert("x-after", HeaderValue::from_static("1"));
        let resp = within(pool.send(o.addr, false, req, Instant::now(), Some(fwd.clone())))
            .await
            .expect("send")
            .0;
        // The answer carries Via, without the hop-by-hop fields of the upstream's head.
        assert_eq!(resp.headers()["via"], "1.1 weir");
        body(resp).await.expect("body");
        seen.push(
            String::from_utf8(o.requests().last().expect("request").1.clone()).expect("utf-8"),
        );
    }
    for (raw, want) in seen.iter().zip([
        "x-forwarded-for: 10.0.0.9\r\n",
        "x-forwarded-for: 10.0.0.1, 10.0.0.9\r\n",
        "x-forwarded-for: 10.0.0.1, 10.0.0.2, 10.0.0.9\r\n",
    ]) {
        assert_eq!(raw.matches("x-forwarded-for").count(), 1, "{raw:?}");
        assert!(raw.contains(want), "{raw:?}");
        assert!(raw.contains("\r\nvia: 1.1 weir\r\n"), "{raw:?}");
        assert!(raw.contains("\r\nx-after: 1\r\n"), "{raw:?}");
    }
}

#[tokio::test]
async fn hop_by_hop_fields_of_a_response_stay_behind() {
    let o = always(
        b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nkeep-alive: timeout=5\r\nx-secret: 1\r\nx-kept: 1\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let pool = new_pool();
    let resp = send(&o, &pool, get("/"), false).await.expect("exchange");
    let mut names: Vec<&str> = resp.headers().keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-length", "via", "x-kept"]);
    assert_eq!(&body(resp).await.expect("body")[..], b"ok");
}

/// Sends the upgrade request `req` to `origin` on a fresh connection.
async fn send_upgrade(origin: &Origin, pool: &Arc<Pool>, req: &Request<UpBody>) -> Answer {
    let io = tokio::net::TcpStream::connect(origin.addr)
        .await
        .expect("connect");
    let home = Home {
        pool: pool.clone(),
        addr: origin.addr,
    };
    within(upgrade(io, req, home, None)).await.expect("upgrade")
}

fn websocket_upgrade() -> Request<UpBody> {
    let mut req = get("/chat");
    let h = req.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    req
}

#[tokio::test]
async fn an_upgrade_answered_101_hands_over_the_connection_with_the_bytes_already_sent() {
    let mut o = always(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nx-origin: a\r\n\r\n\x81\x02hi",
    )
    .await;
    let pool = new_pool();
    let Answer::Switched {
        head,
        mut io,
        early,
    } = send_upgrade(&o, &pool, &websocket_upgrade()).await
    else {
        panic!("expected a switch");
    };
    assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
    // `Upgrade` survives although `Connection` names it; `Connection` itself does not.
    assert_eq!(head.headers["upgrade"], "websocket");
    assert!(!head.headers.contains_key("connection"));
    assert_eq!(head.headers["x-origin"], "a");
    assert_eq!(&early[..], b"\x81\x02hi");
    // The request went out with its upgrade fields.
    let (_, raw) = o.requests().pop().expect("request");
    let raw = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(raw.starts_with("get /chat http/1.1\r\n"), "{raw}");
    assert!(raw.contains("connection: upgrade\r\n") && raw.contains("upgrade: websocket\r\n"));
    // The connection is the caller's now: it speaks the new protocol, not HTTP.
    io.write_all(b"ping").await.expect("write");
    assert_eq!(
        pool.counts().0,
        0,
        "an upgrade's connection is never pooled"
    );
}

#[tokio::test]
async fn an_upgrade_answered_otherwise_is_a_normal_response_and_its_connection_not_kept() {
    let o = always(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 4\r\n\r\nnope").await;
    let pool = new_pool();
    let Answer::Refused(resp) = send_upgrade(&o, &pool, &websocket_upgrade()).await else {
        panic!("expected a refusal");
    };
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(&body(resp).await.expect("body")[..], b"nope");
    assert_eq!(
        pool.counts().0,
        0,
        "an upgrade's connection is never pooled"
    );
}
