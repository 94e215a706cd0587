//! One worker's upstream connections, keyed by endpoint address: idle HTTP/1.1 keep-alive
//! connections and multiplexed HTTP/2 connections (see the [module doc](super) for how each is
//! reused), swept of idle ones every few seconds.

use super::h1;
use super::{Error, Forwarded, Lease, RespBody, StreamSlot};
use crate::http::body::UpBody;
use bytes::Bytes;
use http::{Request, Response};
use parking_lot::Mutex;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Idle HTTP/1.1 connections are closed after this long (below the 75 s nginx and most
/// servers use, so the server rarely closes one under us).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/2 connections are closed after this long.
pub(crate) const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Most HTTP/2 connections one worker opens to one endpoint.
pub(crate) const H2_MAX_CONNECTIONS: usize = 16;
/// Most idle HTTP/1.1 connections one worker keeps per endpoint (nginx's `keepalive`).
pub(crate) const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// An HTTP/2 connection is PINGed this often, idle or not, and closed when a PING goes
/// unanswered for [`H2_PING_TIMEOUT`] (a half-dead peer is found before calls hang on it).
pub(crate) const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Idle {
    conn: h1::Conn,
    since: Instant,
}

#[derive(Debug)]
struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    /// Set when the connection ended or can take no new streams (GOAWAY received).
    closed: Arc<AtomicBool>,
    last_used: Instant,
}

impl H2Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// A stream slot on an HTTP/2 connection, picked for one call.
struct H2Pick {
    send: h2::client::SendRequest<Bytes>,
    slot: StreamSlot,
    closed: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Endpoint {
    idle: Vec<Idle>,
    h2: Vec<H2Conn>,
    /// Serializes HTTP/2 connects, so a burst of calls opens one connection.
    h2_connecting: Arc<tokio::sync::Mutex<()>>,
    /// When the last HTTP/2 connect failed: callers that waited behind it fail at once
    /// instead of each trying again.
    h2_failed: Option<Instant>,
}

/// One worker's upstream connections.
#[derive(Debug)]
pub(crate) struct Pool {
    /// Only this worker's thread uses the map, so the lock is never contended; it exists
    /// because hyper's connection futures must be `Send`.
    endpoints: Mutex<hashbrown::HashMap<SocketAddr, Endpoint>>,
    connect_timeout: Duration,
}

impl Pool {
    pub(crate) fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            endpoints: Mutex::new(hashbrown::HashMap::new()),
            connect_timeout,
        })
    }

    /// Sends `req` (origin-form URI and a Host header for HTTP/1.1; absolute URI for
    /// HTTP/2) to `addr`, adding `fwd` to it as it is written.
    pub(crate) fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        h2c: bool,
        req: Request<UpBody>,
        now: Instant,
        fwd: Option<Forwarded>,
    ) -> impl Future<Output = Result<(Response<RespBody>, Lease), Error>> + Send + use<> {
        // Not an `async fn` over the two: that would add a layer that copies the inner
        // future into its own state on every request. The HTTP/2 future is boxed where it is
        // made: it is the larger of the two (1.5 KB), and moved inline it cost a gRPC call
        // 83.0k instructions against 76.3k boxed (`hot_path.py grpc-insn`); boxing the
        // HTTP/1.1 one as well cost its requests ~100 more instructions each.
        let me = self.clone();
        if h2c {
            futures::future::Either::Left(Box::pin(me.send_h2(addr, req, now, fwd)))
        } else {
            futures::future::Either::Right(me.send_h1(addr, req, fwd))
        }
    }

    async fn send_h1(
        self: Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpBody>,
        fwd: Option<Forwarded>,
    ) -> Result<(Response<RespBody>, Lease), Error> {
        loop {
            let (conn, reused) = match self.take_idle(addr) {
                Some(c) => (c, true),
                // Boxed: rare, and its future is large; inline it would be copied with every
                // request's future.
                None => match Box::pin(self.tcp(addr)).await {
                    Ok(io) => (h1::Conn::new(io), false),
                    Err(e) => return Err(Error::Connect(e, Box::new(req))),
                },
            };
            let home = h1::Home {
                pool: self.clone(),
                addr,
            };
            match h1::exchange(conn, req, reused, home, fwd.as_ref()).await {
                Ok(resp) => return Ok((resp.map(RespBody::Left), None)),
                // A pooled connection the server had closed: nothing was answered and the
                // request may go again (see `h1`). A fresh connection is never retried.
                Err(h1::Failed {
                    request: Some(r), ..
                }) => req = *r,
                Err(f) => return Err(Error::Http(f.error)),
            }
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<h1::Conn> {
        let mut map = self.endpoints.lock();
        let ep = map.get_mut(&addr)?;
        while let Some(idle) = ep.idle.pop() {
            if idle.conn.is_reusable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Takes back a connection whose response was read to the end.
    pub(crate) fn put_idle(&self, addr: SocketAddr, conn: h1::Conn) {
        let mut map = self.endpoints.lock();
        let ep = map.entry(addr).or_default();
        if ep.idle.len() < MAX_IDLE_PER_ENDPOINT {
            ep.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// A fresh connection to `addr` (never pooled: upgrades take one for good).
    pub(crate) async fn tcp(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let stream =
            tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn send_h2(
        self: Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpBody>,
        now: Instant,
        fwd: Option<Forwarded>,
    ) -> Result<(Response<RespBody>, Lease), Error> {
        // A connection found closed before the request went out keeps the request; it then
        // goes to another (or a new) connection. Bounded: a connection that keeps closing
        // under us is an endpoint problem, reported as such.
        for _ in 0..3 {
            let H2Pick {
                mut send,
                slot,
                closed,
            } = match self.pick_h2(addr, now) {
                Ok(picked) => picked,
                Err(connecting) => {
                    let waited_from = Instant::now();
                    let _guard = connecting.lock().await;
                    // Someone else may have opened a connection, or failed to, meanwhile.
                    match self.pick_h2(addr, Instant::now()) {
                        Ok(picked) => picked,
                        Err(_) if self.h2_failed_since(addr, waited_from) => {
                            let e = std::io::Error::new(
                                std::io::ErrorKind::ConnectionRefused,
                                "connect failed (shared with a concurrent call)",
                            );
                            return Err(Error::Connect(e, Box::new(req)));
                        }
                        Err(_) => match Box::pin(self.connect_h2(addr)).await {
                            Ok(picked) => picked,
                            Err(e) => {
                                if let Some(ep) = self.endpoints.lock().get_mut(&addr) {
                                    ep.h2_failed = Some(Instant::now());
                                }
                                return Err(Error::Connect(e, Box::new(req)));
                            }
                        },
                    }
                }
            };
            // Not ready only when the connection is gone or was told GOAWAY: nothing was
            // sent, so the next pick skips it and the request goes elsewhere.
            if std::future::poll_fn(|cx| send.poll_ready(cx))
                .await
                .is_err()
            {
                closed.store(true, Ordering::Relaxed);
                continue;
            }
            if let Some(fwd) = fwd {
                fwd.apply(req.headers_mut());
            }
            return match super::h2::exchange(&mut send, req).await {
                Ok(resp) => Ok((resp.map(RespBody::Right), Some(slot))),
                Err(e) => Err(Error::H2(e)),
            };
        }
        let e = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "HTTP/2 connections to the endpoint kept closing before the request was sent",
        );
        Err(Error::Connect(e, Box::new(req)))
    }

    /// The least loaded open HTTP/2 connection with a free stream, or — when there is none
    /// and another connection may be opened — the lock to hold while opening it.
    fn pick_h2(
        &self,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<H2Pick, Arc<tokio::sync::Mutex<()>>> {
        let mut map = self.endpoints.lock();
        let ep = map.entry(addr).or_default();
        ep.h2.retain(|c| !c.is_closed());
        let at_most = ep.h2.len() >= H2_MAX_CONNECTIONS;
        let best = ep
            .h2
            .iter_mut()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed));
        match best {
            Some(c)
                if at_most
                    || c.streams.load(Ordering::Relaxed) < c.send.current_max_send_streams() =>
            {
                // When every connection is full and no more may be opened, the call waits
                // in the least loaded connection's queue for a stream.
                c.last_used = now;
                c.streams.fetch_add(1, Ordering::Relaxed);
                Ok(H2Pick {
                    send: c.send.clone(),
                    slot: StreamSlot(c.streams.clone()),
                    closed: c.closed.clone(),
                })
            }
            _ => Err(ep.h2_connecting.clone()),
        }
    }

    fn h2_failed_since(&self, addr: SocketAddr, since: Instant) -> bool {
        self.endpoints
            .lock()
            .get(&addr)
            .and_then(|ep| ep.h2_failed)
            .is_some_and(|t| t >= since)
    }

    async fn connect_h2(&self, addr: SocketAddr) -> std::io::Result<H2Pick> {
        let io = self.tcp(addr).await?;
        // Until the peer's SETTINGS arrive, assume what its other connections were told or,
        // for the first, RFC 9113's recommended minimum of 100 (a cold burst beyond the real
        // limit waits in h2's queue on this connection; later bursts spread).
        let assumed = self
            .endpoints
            .lock()
            .get(&addr)
            .and_then(|ep| {
                ep.h2
                    .iter()
                    .map(|c| c.send.current_max_send_streams())
                    .min()
            })
            .unwrap_or(100);
        // Windows as hyper's client sets them (2 MiB per stream, 5 MiB per connection): h2's
        // 64 KiB defaults would cap a stream at one window per round trip.
        let (send, mut conn) = h2::client::Builder::new()
            .initial_max_send_streams(assumed)
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .max_header_list_size(64 * 1024)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(std::io::Error::other)?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        let keepalive =
            crate::http::h2::keepalive(conn.ping_pong(), H2_PING_INTERVAL, H2_PING_TIMEOUT);
        tokio::spawn(async move {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended with an error");
                    }
                }
                () = keepalive => {
                    tracing::debug!(%addr, "upstream HTTP/2 connection did not answer a PING; closing it");
                }
            }
            ended.store(true, Ordering::Relaxed);
        });
        let streams = Arc::new(AtomicUsize::new(1));
        let slot = StreamSlot(streams.clone());
        let mut map = self.endpoints.lock();
        let ep = map.entry(addr).or_default();
        ep.h2_failed = None;
        ep.h2.push(H2Conn {
            send: send.clone(),
            streams,
            closed: closed.clone(),
            last_used: Instant::now(),
        });
        Ok(H2Pick { send, slot, closed })
    }

    /// Closes connections idle for too long and forgets endpoints with none left.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut map = self.endpoints.lock();
        map.retain(|_, ep| {
            ep.idle
                .retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT && i.conn.is_reusable());
            ep.h2.retain(|c| {
                !c.is_closed()
                    && (c.streams.load(Ordering::Relaxed) > 0
                        || now.duration_since(c.last_used) < H2_IDLE_TIMEOUT)
            });
            !ep.idle.is_empty() || !ep.h2.is_empty() || Arc::strong_count(&ep.h2_connecting) > 1
        });
    }

    /// Idle HTTP/1.1 and open HTTP/2 connections.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let map = self.endpoints.lock();
        map.values()
            .fold((0, 0), |(a, b), ep| (a + ep.idle.len(), b + ep.h2.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::DownBody;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;

    /// A loopback listener that counts the connections it accepts and hands each to
    /// `serve` on a task of its own.
    async fn listener<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, accepted)
    }

    /// An HTTP/1.1 server on loopback answering "ok", counting the connections it accepts.
    async fn origin() -> (SocketAddr, Arc<AtomicUsize>) {
        listener(|stream| async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        })
        .await
    }

    /// An origin that answers one request per connection (without `Connection: close`) and
    /// closes the connection when told to, reporting each close.
    async fn origin_answering_once() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        Arc<tokio::sync::Notify>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let close = Arc::new(tokio::sync::Notify::new());
        let told = close.clone();
        let (addr, accepted) = listener(move |mut stream| {
            let (tx, told) = (tx.clone(), told.clone());
            async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                told.notified().await;
                drop(stream);
                let _ = tx.send(());
            }
        })
        .await;
        (addr, accepted, close, rx)
    }

    fn get(addr: SocketAddr) -> Request<UpBody> {
        let mut req = Request::new(UpBody::Empty);
        *req.uri_mut() = http::Uri::from_static("/");
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_str(&addr.to_string()).expect("host"),
        );
        req
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_keep_alive_connection() {
        let (addr, accepted) = origin().await;
        let pool = Pool::new(Duration::from_secs(2));
        for _ in 0..20 {
            let (resp, _lease) = pool
                .send(addr, false, get(addr), Instant::now(), None)
                .await
                .expect("send");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.counts(), (1, 0));
        // Idle beyond the timeout: swept.
        pool.sweep(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1));
        assert_eq!(pool.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_connection_whose_response_was_not_read_is_not_reused() {
        let (addr, accepted) = origin().await;
        let pool = Pool::new(Duration::from_secs(2));
        // Abandoned mid-response: the body still holds the connection, so it is not idle.
        let (_resp, _lease) = pool
            .send(addr, false, get(addr), Instant::now(), None)
            .await
            .expect("send");
        assert_eq!(pool.counts(), (0, 0));
        let (resp, _lease) = pool
            .send(addr, false, get(addr), Instant::now(), None)
            .await
            .expect("send");
        resp.into_body().collect().await.expect("body");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_origin_closed_is_not_used() {
        let (addr, accepted, close, mut closed) = origin_answering_once().await;
        let pool = Pool::new(Duration::from_secs(2));
        let (resp, lease) = pool
            .send(addr, false, get(addr), Instant::now(), None)
            .await
            .expect("send");
        DownBody::new(resp.into_body(), None, lease)
            .collect()
            .await
            .expect("body");
        assert_eq!(pool.counts(), (1, 0));
        // The origin closed that connection after answering (keep-alive was implied, so the
        // pool kept it). No task watches an idle connection: the next request must notice
        // the close and open another connection instead of failing.
        close.notify_one();
        closed
            .recv()
            .await
            .expect("origin closed the first connection");
        let (resp, lease) = pool
            .send(addr, false, get(addr), Instant::now(), None)
            .await
            .expect("send after the idle connection was closed");
        let body = DownBody::new(resp.into_body(), None, lease)
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connect_failure_gives_the_request_back_untouched() {
        // A port nothing listens on: bind, learn the port, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let pool = Pool::new(Duration::from_secs(2));
        let mut req = get(addr);
        req.headers_mut()
            .insert("x-kept", http::HeaderValue::from_static("1"));
        match pool.send(addr, false, req, Instant::now(), None).await {
            Err(Error::Connect(_, req)) => assert_eq!(req.headers()["x-kept"], "1"),
            other => panic!("expected a connect failure, got {other:?}"),
        }
    }
}
