//! Routing one request: the host picks a route of the table in force and the request picks a
//! rule ([`Worker::handle`]); then either the cached path ([`cached`]) or straight to the try
//! loop ([`forward`]) (a cache miss may ask the owning peer agent first, [`peer`]), which
//! asks [`retry`] what each try's result means and [`outcome`] to
//! record it and build the answer.
//!
//! Each request is handled on its own: the table is loaded once per request, so a request in
//! flight keeps the route it started with while new requests see a new table at once.

mod cached;
mod forward;
pub(crate) mod limit;
pub(crate) mod matcher;
pub(crate) mod mirror;
mod outcome;
pub(crate) mod peer;
pub(crate) mod retry;
pub(crate) mod table;
mod upgrade;

pub use peer::PeerSet;
pub(crate) use upgrade::{Downstream, Switched, Upgrade};

use crate::cache::TeeBody;
use crate::health::Endpoints;
use crate::http::body::{ReqBody, UpBody};
use crate::http::grpc::is_grpc;
use crate::http::headers::normalize_host;
use crate::http::reply::{self, LocalReply};
use crate::metrics::{Metrics, RouteCounters};
use crate::observe::{Exchange, Observe, Outcome};
use crate::upstream::{DownBody, Pool};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Body as _;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use table::{RouteRt, Table};

/// The body of a response: streamed from upstream, or a short local reply.
pub(crate) type Body = Either<Either<DownBody, TeeBody<DownBody>>, Full<Bytes>>;

/// Route timeout when the policy sets none (Envoy's default).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upstream TCP connect timeout.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the request path reads, shared by all workers: the table in force (swapped whole by
/// the control side, read here without a lock), the counters, and endpoint health (to which
/// an ejection is announced).
pub struct Routing {
    pub(crate) table: ArcSwap<Table>,
    pub(crate) metrics: Metrics,
    pub(crate) endpoints: Endpoints,
    /// Access logs and tracing, set once at start (unset: off).
    observe: OnceLock<Observe>,
    /// The cache peers of this agent's zone, as the controller last sent them (see
    /// [`peer`]).
    pub(crate) peers: ArcSwap<PeerSet>,
}

impl Routing {
    pub(crate) fn new(metrics: Metrics, endpoints: Endpoints) -> Self {
        Self {
            table: ArcSwap::from_pointee(Table::default()),
            metrics,
            endpoints,
            observe: OnceLock::new(),
            peers: ArcSwap::from_pointee(PeerSet::default()),
        }
    }

    /// Puts a new cache peer set in force (peers marked down in the old one start up).
    pub fn set_peers(&self, peers: PeerSet) {
        self.peers.store(Arc::new(peers));
    }

    /// Switches on access logs and tracing; only the first call counts (at start, before
    /// the workers serve).
    pub fn set_observe(&self, observe: Observe) {
        let _ = self.observe.set(observe);
    }

    /// Access logs or tracing is on.
    #[inline]
    pub(crate) fn observing(&self) -> bool {
        self.observe.get().is_some_and(Observe::enabled)
    }
}

/// One worker's request handler: what all workers share plus this worker's upstream pool.
pub(crate) struct Worker {
    routing: Arc<Routing>,
    pool: Arc<Pool>,
}

/// Where a request goes and who sent it: what [`Worker::handle`] decided, carried through
/// the cached path and the try loop.
#[derive(Clone)]
struct Routed {
    route: Arc<RouteRt>,
    rule_idx: usize,
    /// The authority came from the request-target (absolute form, or HTTP/2's `:authority`)
    /// rather than from `Host`.
    host_from_uri: bool,
    /// The client's IP, pre-rendered for `X-Forwarded-For`.
    peer: HeaderValue,
    grpc: bool,
}

impl Worker {
    pub(crate) fn new(routing: Arc<Routing>) -> Self {
        Self {
            routing,
            pool: Pool::new(CONNECT_TIMEOUT),
        }
    }

    /// This worker's upstream pool (for the listener's idle sweep).
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Handles one request from `peer` (its IP pre-rendered as a header value). Not an
    /// `async fn` over the two paths: that would wrap every request's future in one more
    /// layer; unobserved requests get [`Worker::route`]'s future as it is.
    pub(crate) fn handle(
        self: Arc<Self>,
        req: Request<ReqBody>,
        peer: HeaderValue,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        if self.routing.observing() {
            futures::future::Either::Left(Box::pin(self.handle_observed(req, peer)))
        } else {
            futures::future::Either::Right(self.route(req, peer))
        }
    }

    /// [`Worker::route`] with an access log line and a span, where they are sampled.
    #[cold]
    async fn handle_observed(
        self: Arc<Self>,
        mut req: Request<ReqBody>,
        peer: HeaderValue,
    ) -> Result<Response<Body>, Infallible> {
        let routing = self.routing.clone();
        let Some(observe) = routing.observe.get() else {
            return self.route(req, peer).await;
        };
        let (method, version, uri) = (req.method().clone(), req.version(), req.uri().clone());
        let exchange: Option<Exchange> =
            observe.begin(&method, version, &uri, req.headers_mut(), &peer);
        let Some(exchange) = exchange else {
            return self.route(req, peer).await;
        };
        let route = self.route_name(&req);
        let resp = self.route(req, peer).await?;
        exchange.finish(observe, &Outcome::of(&resp, route.as_ref()));
        Ok(resp)
    }

    /// The name of the route a request goes to (for logs and spans).
    fn route_name(&self, req: &Request<ReqBody>) -> Option<Arc<str>> {
        let host = match req.uri().authority() {
            Some(a) => a.as_str().as_bytes(),
            None => req.headers().get(header::HOST)?.as_bytes(),
        };
        let mut buf = [0u8; 256];
        let host = normalize_host(host, &mut buf)?;
        let table = self.routing.table.load();
        table.route(host).map(|r| r.shared_name.clone())
    }

    /// Routes one request: the host picks the route, the request a rule; then the cache or
    /// the try loop.
    async fn route(
        self: Arc<Self>,
        req: Request<ReqBody>,
        peer: HeaderValue,
    ) -> Result<Response<Body>, Infallible> {
        let grpc = is_grpc(req.headers());
        if req.method() == Method::CONNECT {
            // weir is never a tunnel: CONNECT is refused whatever the authority.
            return Ok(local_reply(
                grpc,
                &self.routing.metrics.unrouted,
                LocalReply::BadRequest,
                "CONNECT is not supported",
            ));
        }
        let mut buf = [0u8; 256];
        let Selected {
            route,
            rule_idx,
            from_uri,
            host,
        } = match self.select(req.method(), req.uri(), req.headers(), &mut buf) {
            Ok(s) => s,
            Err(u) => return Ok(self.refuse(grpc, u)),
        };
        let (parts, body) = req.into_parts();
        let routed = Routed {
            route,
            rule_idx,
            host_from_uri: from_uri,
            peer,
            grpc,
        };
        let Some(cache) = routed.route.cache.clone() else {
            let body = up_body(body);
            return Ok(self.forward(parts, body, routed, None).await);
        };
        let host = host.to_string();
        // Boxed: the cache path's future is large, and keeping it inline would make every
        // request's future (which hyper moves into place) that large too.
        Ok(Box::pin(self.cached(cache, host, parts, body, routed)).await)
    }

    /// The route and rule of a request, by its authority (RFC 9112 §3.2.2: the
    /// request-target's authority wins over Host; for HTTP/2 the URI holds `:authority`),
    /// then its method, path and headers. `host` is normalized into `buf`.
    #[inline(always)]
    fn select<'b>(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        buf: &'b mut [u8; 256],
    ) -> Result<Selected<'b>, Unrouted> {
        let from_uri = uri.authority().is_some();
        let host_bytes: &[u8] = match uri.authority() {
            Some(a) => {
                if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
                    return Err(Unrouted::bad(
                        "only http:// absolute-form targets are accepted",
                    ));
                }
                a.as_str().as_bytes()
            }
            None => match headers.get(header::HOST) {
                Some(h) => h.as_bytes(),
                None => return Err(Unrouted::bad("request has no Host")),
            },
        };
        let Some(host) = normalize_host(host_bytes, buf) else {
            return Err(Unrouted::bad("malformed Host"));
        };
        let table = self.routing.table.load();
        let Some(route) = table.route(host) else {
            return Err(Unrouted {
                route: None,
                kind: LocalReply::NoRoute,
                msg: format!("no route for host {host:?}").into(),
                retry_after: None,
            });
        };
        if let Some(limit) = &route.rate_limit
            && let Err(wait) = limit.check()
        {
            return Err(Unrouted {
                route: Some(route.clone()),
                kind: LocalReply::RateLimited,
                msg: "rate limit exceeded".into(),
                retry_after: Some(limit::retry_after_secs(wait)),
            });
        }
        let path = uri.path();
        let Some(rule_idx) = route
            .rules
            .iter()
            .position(|r| r.matches(method, path, headers))
        else {
            return Err(Unrouted {
                route: Some(route.clone()),
                kind: LocalReply::NoRoute,
                msg: "no rule of the route matches this request".into(),
                retry_after: None,
            });
        };
        Ok(Selected {
            route: route.clone(),
            rule_idx,
            from_uri,
            host,
        })
    }

    /// The local reply to a request [`Worker::select`] could not route.
    #[cold]
    fn refuse(&self, grpc: bool, u: Unrouted) -> Response<Body> {
        let counters = match &u.route {
            Some(r) => &r.counters,
            None => &self.routing.metrics.unrouted,
        };
        let mut resp = local_reply(grpc, counters, u.kind, &u.msg);
        // A rate-limited request learns when a token is due.
        if let Some(secs) = u.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// What [`Worker::select`] chose.
struct Selected<'b> {
    route: Arc<RouteRt>,
    rule_idx: usize,
    /// The authority came from the request-target rather than from `Host`.
    from_uri: bool,
    /// The normalized host.
    host: &'b str,
}

/// Why [`Worker::select`] found no route: the reply's kind and message, and the route when
/// the host had one (its counters count the reply).
struct Unrouted {
    route: Option<Arc<RouteRt>>,
    kind: LocalReply,
    msg: Cow<'static, str>,
    /// `Retry-After` in seconds (rate limiting).
    retry_after: Option<u64>,
}

impl Unrouted {
    fn bad(msg: &'static str) -> Self {
        Self {
            route: None,
            kind: LocalReply::BadRequest,
            msg: msg.into(),
            retry_after: None,
        }
    }
}

/// A local reply, counted on the route (or on the unrouted counters).
pub(crate) fn local_reply(
    grpc: bool,
    counters: &RouteCounters,
    kind: LocalReply,
    msg: &str,
) -> Response<Body> {
    counters.reply(kind);
    reply::local_reply(grpc, kind, msg).map(Either::Right)
}

/// The upstream body for a client's request body. Most requests have none: nothing to
/// stream, nothing to keep for a retry.
fn up_body(body: ReqBody) -> UpBody {
    if body.is_end_stream() {
        UpBody::Empty
    } else {
        UpBody::Stream(body)
    }
}
