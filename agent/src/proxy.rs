//! The data plane: HTTP/1.1 and h2c listeners that route each request by host and forward it
//! to an endpoint over pooled keep-alive connections.
//!
//! Threading: one current-thread tokio runtime per worker, each with its own `SO_REUSEPORT`
//! listener and its own upstream pool. The kernel spreads connections over workers, a request
//! never crosses threads, and the only state shared between workers is the routing table
//! (read through `ArcSwap`, no lock) and atomic counters. This is the layout that measured
//! best on these machines (see DESIGN.md, performance notes).
//!
//! Each request is handled on its own: the table is loaded once per request, so a request
//! in flight keeps the route it started with while new requests see a new table at once.

use crate::metrics::{LocalReply, RouteCounters};
use crate::state::Shared;
use crate::table::{RouteRt, upstream_uri};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The body of a response: streamed from upstream, or a short local reply.
pub type Body = Either<Incoming, Full<Bytes>>;

/// Route timeout when the policy sets none (Envoy's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upstream TCP connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to send a complete request head (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `proxy-connection` and
/// `keep-alive`), never forwarded in either direction. hyper re-frames bodies on each side,
/// so `transfer-encoding` goes too.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const VIA_11: HeaderValue = HeaderValue::from_static("1.1 weir");
const VIA_2: HeaderValue = HeaderValue::from_static("2 weir");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_WEIR_ERROR: HeaderName = HeaderName::from_static("x-weir-error");

/// One worker's request handler: the shared table plus this worker's upstream pool.
pub struct Worker {
    shared: Arc<Shared>,
    client: Client<HttpConnector, Incoming>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self { shared, client }
    }

    /// Handles one request from `peer` (its IP pre-rendered as a header value).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: HeaderValue,
    ) -> Result<Response<Body>, Infallible> {
        if req.method() == Method::CONNECT {
            // weir is never a tunnel: CONNECT is refused whatever the authority.
            return Ok(local_reply(
                &self.shared.metrics.unrouted,
                LocalReply::BadRequest,
                "CONNECT is not supported",
            ));
        }
        // RFC 9112 §3.2.2: the request-target's authority wins over Host. For HTTP/2 the
        // URI holds :authority.
        let from_uri = req.uri().authority().is_some();
        let host_bytes: &[u8] = match req.uri().authority() {
            Some(a) => {
                if req.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
                    return Ok(local_reply(
                        &self.shared.metrics.unrouted,
                        LocalReply::BadRequest,
                        "only http:// absolute-form targets are accepted",
                    ));
                }
                a.as_str().as_bytes()
            }
            None => match req.headers().get(header::HOST) {
                Some(h) => h.as_bytes(),
                None => {
                    return Ok(local_reply(
                        &self.shared.metrics.unrouted,
                        LocalReply::BadRequest,
                        "request has no Host",
                    ));
                }
            },
        };
        let mut buf = [0u8; 256];
        let Some(host) = normalize_host(host_bytes, &mut buf) else {
            return Ok(local_reply(
                &self.shared.metrics.unrouted,
                LocalReply::BadRequest,
                "malformed Host",
            ));
        };

        let (route, target_uri_authority, timeout) = {
            let table = self.shared.table.load();
            let Some(route) = table.route(host) else {
                let msg = format!("no route for host {host:?}");
                return Ok(local_reply(
                    &self.shared.metrics.unrouted,
                    LocalReply::NoRoute,
                    &msg,
                ));
            };
            let Some(rule) = route.rule(req.method(), req.uri().path(), req.headers()) else {
                return Ok(local_reply(
                    &route.counters,
                    LocalReply::NoRoute,
                    "no rule of the route matches this request",
                ));
            };
            let Some(target) = rule.pick() else {
                return Ok(local_reply(
                    &route.counters,
                    LocalReply::NoHealthyEndpoint,
                    "no healthy endpoint",
                ));
            };
            (route.clone(), target.authority.clone(), route.timeout)
        };
        Ok(self
            .forward(req, &route, target_uri_authority, timeout, from_uri, peer)
            .await)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &RouteRt,
        authority: http::uri::Authority,
        timeout: Option<Duration>,
        host_from_uri: bool,
        peer: HeaderValue,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let downstream_version = parts.version;
        // An h2 request or an absolute-form one carries its host in the URI; the upstream
        // HTTP/1.1 request needs it as Host.
        if (host_from_uri || parts.headers.get(header::HOST).is_none())
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let pq = std::mem::take(&mut parts.uri).into_parts().path_and_query;
        parts.uri = match upstream_uri(&authority, pq) {
            Ok(u) => u,
            Err(_) => {
                return local_reply(
                    &route.counters,
                    LocalReply::BadRequest,
                    "bad request target",
                );
            }
        };
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        append_forwarded_for(&mut parts.headers, peer);
        parts.headers.append(
            header::VIA,
            if downstream_version == Version::HTTP_2 {
                VIA_2
            } else {
                VIA_11
            },
        );

        let fut = self.client.request(Request::from_parts(parts, body));
        let result = match tokio::time::timeout(timeout.unwrap_or(DEFAULT_TIMEOUT), fut).await {
            Ok(r) => r,
            Err(_) => {
                return local_reply(
                    &route.counters,
                    LocalReply::UpstreamTimeout,
                    "upstream did not answer in time",
                );
            }
        };
        match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.append(header::VIA, VIA_11);
                route.counters.response(parts.status);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(e) if e.is_connect() => {
                tracing::debug!(route = %route.name, target = %authority, error = %e, "upstream connect failed");
                local_reply(
                    &route.counters,
                    LocalReply::UpstreamConnect,
                    "upstream connection failed",
                )
            }
            Err(e) => {
                tracing::debug!(route = %route.name, target = %authority, error = %e, "upstream request failed");
                local_reply(
                    &route.counters,
                    LocalReply::UpstreamError,
                    "upstream request failed",
                )
            }
        }
    }
}

/// A short plain-text answer from the agent itself, with `x-weir-error` naming the reason.
pub fn local_reply(counters: &RouteCounters, reply: LocalReply, msg: &str) -> Response<Body> {
    counters.reply(reply);
    let body = format!("weir: {msg}\n");
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = reply.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(X_WEIR_ERROR, HeaderValue::from_static(reply.code()));
    if reply.status() == StatusCode::BAD_REQUEST {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Lower-cases the host part of a Host / authority value (port and userinfo dropped) into
/// `buf`, without allocating. `None` for anything that is not a plausible host.
pub fn normalize_host<'b>(raw: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b str> {
    // userinfo is not allowed in Host, but may appear in an absolute-form authority.
    let raw = match raw.iter().rposition(|&b| b == b'@') {
        Some(i) => &raw[i + 1..],
        None => raw,
    };
    let host = if raw.first() == Some(&b'[') {
        let end = raw.iter().position(|&b| b == b']')?;
        &raw[..=end]
    } else {
        match raw.iter().position(|&b| b == b':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    // A trailing dot names the same host (FQDN form).
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > buf.len() {
        return None;
    }
    for (d, s) in buf.iter_mut().zip(host) {
        if !(s.is_ascii_alphanumeric() || matches!(s, b'-' | b'.' | b'_' | b'[' | b']' | b':')) {
            return None;
        }
        *d = s.to_ascii_lowercase();
    }
    std::str::from_utf8(&buf[..host.len()]).ok()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        // Collect first: the names borrow the map we are about to change. Rare enough
        // (mostly `keep-alive`/`close`, which are handled below anyway) to allocate.
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: HeaderValue) {
    match headers.get(&X_FORWARDED_FOR) {
        None => {
            headers.insert(X_FORWARDED_FOR, peer);
        }
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
    }
}

/// Renders a client's IP once per connection.
pub fn peer_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Binds `n` listeners on `addr` with `SO_REUSEPORT`, one per worker.
///
/// `SO_REUSEPORT` would also let a second agent (or anything else of the same user) bind the
/// same address and silently take a share of the connections, so the address is first probed
/// with an exclusive bind: a port already in use is an error, as operators expect.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    probe.listen(1)?;
    drop(probe);
    (0..n)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .collect()
}

/// Accepts and serves connections on `listener` until the runtime stops.
pub async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let worker = Arc::new(Worker::new(shared));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let worker = worker.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let peer = peer_header(peer.ip());
            let svc =
                hyper::service::service_fn(move |req| worker.clone().handle(req, peer.clone()));
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_lower_cased_and_port_dropped() {
        let mut b = [0; 256];
        assert_eq!(
            normalize_host(b"Shop.Example:8080", &mut b),
            Some("shop.example")
        );
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"[::1]:80", &mut b), Some("[::1]"));
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"shop.", &mut b), Some("shop"));
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"bad host", &mut b), None);
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"", &mut b), None);
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, HeaderValue::from_static("10.0.0.2"));
        assert_eq!(h.get(&X_FORWARDED_FOR).expect("xff"), "10.0.0.1, 10.0.0.2");
    }
}
