//! Upstream connections: one pool per worker, keyed by endpoint address, on hyper's
//! connection API (`hyper::client::conn`).
//!
//! Why not hyper-util's `legacy::Client`: its pool is built for many threads sharing one
//! client — a mutex over a SipHash map keyed by cloned scheme + authority, a boxed race
//! between checkout and a lazy connect on every request, and a spawned task per HTTP/1
//! request to wait for the connection to become idle again. A worker here owns its pool and
//! never shares it across threads, so all of that is overhead on the hot path (it was the
//! largest single item of weir's own cost in the proxy profile). What this pool does:
//!
//! - **HTTP/1.1**: a LIFO stack of idle keep-alive connections per endpoint (the most recently
//!   used connection is the one least likely to have been closed by the server). A request
//!   takes one or opens a new one; the response body hands the connection back when it has
//!   been read to the end (`Lease`), so no task is spawned per request. A connection that
//!   turns out to be closed before the request was written gives the request back and the
//!   request goes to another connection, invisibly to the client.
//! - **HTTP/2 (h2c)**: a few multiplexed connections per endpoint. A call goes to the
//!   connection with the fewest streams in flight that is below the peer's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`; when every connection is full another one is opened
//!   (up to [`H2_MAX_CONNECTIONS`]), so a server with a low stream limit does not make calls
//!   queue behind each other. Connects to one endpoint are serialized, so a burst of calls
//!   opens one connection, not one per call.
//! - A connect failure returns the request untouched ([`Error::Connect`]), so retrying it
//!   costs no copy of its head.
//!
//! Idle HTTP/1.1 connections are closed after [`IDLE_TIMEOUT`], idle HTTP/2 connections after
//! [`H2_IDLE_TIMEOUT`] (they are kept alive with PINGs meanwhile), by a sweep every few
//! seconds ([`Pool::sweep`]).

use crate::replay::UpBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Idle HTTP/1.1 connections are closed after this long (below the 75 s nginx and most
/// servers use, so the server rarely closes one under us).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/2 connections are closed after this long.
pub const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Most HTTP/2 connections one worker opens to one endpoint.
pub const H2_MAX_CONNECTIONS: usize = 16;
/// Most idle HTTP/1.1 connections one worker keeps per endpoint (nginx's `keepalive`).
pub const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum Error {
    /// No connection could be opened (or every one tried closed before the request was
    /// written); the request was not sent and is given back.
    Connect(std::io::Error, Box<Request<UpBody>>),
    /// The exchange failed (the request may have reached the endpoint).
    Http(hyper::Error),
}

/// What a response body gives back when it is done with its connection.
#[derive(Debug, Default)]
pub enum Lease {
    #[default]
    None,
    /// An HTTP/1.1 connection, reusable once its response has been read to the end.
    Http1 {
        pool: Arc<Pool>,
        addr: SocketAddr,
        send: http1::SendRequest<UpBody>,
    },
    /// A stream slot on an HTTP/2 connection.
    Http2(StreamSlot),
}

impl Lease {
    /// The response was read to the end: the connection may carry another request.
    pub fn release(self) {
        if let Lease::Http1 { pool, addr, send } = self
            && !send.is_closed()
        {
            pool.put_idle(addr, send);
        }
    }
}

/// Counts one stream in flight on an HTTP/2 connection until dropped.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Idle {
    send: http1::SendRequest<UpBody>,
    since: Instant,
}

#[derive(Debug)]
struct H2Conn {
    send: http2::SendRequest<UpBody>,
    streams: Arc<AtomicUsize>,
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`, published by the connection task
    /// (hyper exposes it on the connection, not on the sender).
    max_streams: Arc<AtomicUsize>,
    last_used: Instant,
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
pub struct Pool {
    /// Only this worker's thread uses the map, so the lock is never contended; it exists
    /// because hyper's connection futures must be `Send`.
    endpoints: Mutex<hashbrown::HashMap<SocketAddr, Endpoint>>,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            endpoints: Mutex::new(hashbrown::HashMap::new()),
            connect_timeout,
        })
    }

    /// Sends `req` (origin-form URI and a Host header for HTTP/1.1; absolute URI for
    /// HTTP/2) to `addr`.
    pub fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        h2c: bool,
        req: Request<UpBody>,
        now: Instant,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), Error>> + Send + use<> {
        // Not an `async fn` over the two: that would add a layer that copies the inner
        // future into its own state on every request.
        let me = self.clone();
        if h2c {
            futures::future::Either::Left(me.send_h2(addr, req, now))
        } else {
            futures::future::Either::Right(me.send_h1(addr, req))
        }
    }

    async fn send_h1(
        self: Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Lease), Error> {
        loop {
            let (mut send, pooled) = match self.take_idle(addr) {
                Some(s) => (s, true),
                // Boxed: rare, and its future is large (TCP connect + handshake); inline it
                // would be copied with every request's future.
                None => match Box::pin(self.connect_h1(addr)).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(Error::Connect(e, Box::new(req))),
                },
            };
            if !send.is_ready() {
                // Released as soon as its response was read; the connection task may not
                // have caught up yet.
                if send.ready().await.is_err() {
                    continue;
                }
            }
            match send.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease::Http1 {
                        pool: self,
                        addr,
                        send,
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Closed before the request was written: nothing was sent, so it goes
                    // to another connection. A fresh connection that fails this way is a
                    // real error, not a stale pool entry.
                    Some(r) if pooled => req = r,
                    _ => return Err(Error::Http(e.into_error())),
                },
            }
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<UpBody>> {
        let mut map = self.endpoints.lock();
        let ep = map.get_mut(&addr)?;
        while let Some(idle) = ep.idle.pop() {
            if !idle.send.is_closed() {
                return Some(idle.send);
            }
        }
        None
    }

    fn put_idle(&self, addr: SocketAddr, send: http1::SendRequest<UpBody>) {
        let mut map = self.endpoints.lock();
        let ep = map.entry(addr).or_default();
        if ep.idle.len() < MAX_IDLE_PER_ENDPOINT {
            ep.idle.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    async fn tcp(&self, addr: SocketAddr) -> std::io::Result<TokioIo<tokio::net::TcpStream>> {
        let stream =
            tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(&self, addr: SocketAddr) -> std::io::Result<http1::SendRequest<UpBody>> {
        let io = self.tcp(addr).await?;
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(%addr, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(send)
    }

    async fn send_h2(
        self: Arc<Self>,
        addr: SocketAddr,
        mut req: Request<UpBody>,
        now: Instant,
    ) -> Result<(Response<Incoming>, Lease), Error> {
        // A connection found closed before the request went out gives the request back;
        // it then goes to another (or a new) connection. Bounded: a connection that keeps
        // closing under us is an endpoint problem, reported as such.
        for _ in 0..3 {
            let (mut send, slot) = match self.pick_h2(addr, now) {
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
            // HTTP/2 readiness only fails on a closed connection; the next pick skips it.
            if send.ready().await.is_err() {
                continue;
            }
            match send.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lease::Http2(slot))),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(Error::Http(e.into_error())),
                },
            }
        }
        let e = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "HTTP/2 connections to the endpoint kept closing before the request was sent",
        );
        Err(Error::Connect(e, Box::new(req)))
    }

    /// The least loaded open HTTP/2 connection with a free stream, or — when there is none
    /// and another connection may be opened — the lock to hold while opening it.
    #[allow(clippy::type_complexity)]
    fn pick_h2(
        &self,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<(http2::SendRequest<UpBody>, StreamSlot), Arc<tokio::sync::Mutex<()>>> {
        let mut map = self.endpoints.lock();
        let ep = map.entry(addr).or_default();
        ep.h2.retain(|c| !c.send.is_closed());
        let at_most = ep.h2.len() >= H2_MAX_CONNECTIONS;
        let best = ep
            .h2
            .iter_mut()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed));
        match best {
            Some(c)
                if c.streams.load(Ordering::Relaxed) < c.max_streams.load(Ordering::Relaxed)
                    || at_most =>
            {
                // When every connection is full and no more may be opened, the call waits
                // in the least loaded connection's queue for a stream.
                c.last_used = now;
                c.streams.fetch_add(1, Ordering::Relaxed);
                Ok((c.send.clone(), StreamSlot(c.streams.clone())))
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

    async fn connect_h2(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(http2::SendRequest<UpBody>, StreamSlot)> {
        let io = self.tcp(addr).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(std::io::Error::other)?;
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
                    .map(|c| c.max_streams.load(Ordering::Relaxed))
                    .min()
            })
            .unwrap_or(100);
        let max_streams = Arc::new(AtomicUsize::new(assumed));
        let published = max_streams.clone();
        let mut conn = conn;
        tokio::spawn(async move {
            let ended = std::future::poll_fn(|cx| {
                let polled = std::pin::Pin::new(&mut conn).poll(cx);
                published.store(conn.current_max_send_streams(), Ordering::Relaxed);
                polled
            })
            .await;
            if let Err(e) = ended {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        let streams = Arc::new(AtomicUsize::new(1));
        let slot = StreamSlot(streams.clone());
        let mut map = self.endpoints.lock();
        let ep = map.entry(addr).or_default();
        ep.h2_failed = None;
        ep.h2.push(H2Conn {
            send: send.clone(),
            streams,
            max_streams,
            last_used: Instant::now(),
        });
        Ok((send, slot))
    }

    /// Closes connections idle for too long and forgets endpoints with none left.
    pub fn sweep(&self, now: Instant) {
        let mut map = self.endpoints.lock();
        map.retain(|_, ep| {
            ep.idle
                .retain(|i| !i.send.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
            ep.h2.retain(|c| {
                !c.send.is_closed()
                    && (c.streams.load(Ordering::Relaxed) > 0
                        || now.duration_since(c.last_used) < H2_IDLE_TIMEOUT)
            });
            !ep.idle.is_empty() || !ep.h2.is_empty() || Arc::strong_count(&ep.h2_connecting) > 1
        });
    }

    /// Idle HTTP/1.1 and open HTTP/2 connections.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let map = self.endpoints.lock();
        map.values()
            .fold((0, 0), |(a, b), ep| (a + ep.idle.len(), b + ep.h2.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;

    /// An HTTP/1.1 server on loopback answering "ok", counting the connections it accepts.
    async fn origin() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
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
            let (resp, lease) = pool
                .send(addr, false, get(addr), Instant::now())
                .await
                .expect("send");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
            lease.release();
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
        let (_resp, lease) = pool
            .send(addr, false, get(addr), Instant::now())
            .await
            .expect("send");
        drop(lease); // abandoned mid-response: not handed back
        assert_eq!(pool.counts(), (0, 0));
        let (resp, lease) = pool
            .send(addr, false, get(addr), Instant::now())
            .await
            .expect("send");
        resp.into_body().collect().await.expect("body");
        lease.release();
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
        match pool.send(addr, false, req, Instant::now()).await {
            Err(Error::Connect(_, req)) => assert_eq!(req.headers()["x-kept"], "1"),
            other => panic!("expected a connect failure, got {other:?}"),
        }
    }
}
