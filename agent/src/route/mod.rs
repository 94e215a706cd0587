//! Routing one request: the host picks a route of the table in force and the request picks a
//! rule ([`Worker::handle`]); then either the cached path ([`cached`]) or straight to the try
//! loop ([`forward`]), which asks [`retry`] what each try's result means and [`outcome`] to
//! record it and build the answer.
//!
//! Each request is handled on its own: the table is loaded once per request, so a request in
//! flight keeps the route it started with while new requests see a new table at once.

mod cached;
mod forward;
pub(crate) mod matcher;
mod outcome;
pub(crate) mod retry;
pub(crate) mod table;
mod upgrade;

pub(crate) use upgrade::{Downstream, Switched, Upgrade};

use crate::cache::TeeBody;
use crate::health::Endpoints;
use crate::http::body::{ReqBody, UpBody};
use crate::http::grpc::is_grpc;
use crate::http::headers::normalize_host;
use crate::http::reply::{self, LocalReply};
use crate::metrics::{Metrics, RouteCounters};
use crate::upstream::{DownBody, Pool};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Body as _;
use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
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
}

impl Routing {
    pub(crate) fn new(metrics: Metrics, endpoints: Endpoints) -> Self {
        Self {
            table: ArcSwap::from_pointee(Table::default()),
            metrics,
            endpoints,
        }
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

    /// Handles one request from `peer` (its IP pre-rendered as a header value).
    pub(crate) async fn handle(
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
            });
        };
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
        local_reply(grpc, counters, u.kind, &u.msg)
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
}

impl Unrouted {
    fn bad(msg: &'static str) -> Self {
        Self {
            route: None,
            kind: LocalReply::BadRequest,
            msg: msg.into(),
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
