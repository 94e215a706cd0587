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

use crate::cache::{Cache, Fill, FillAction, Lookup, TeeBody, XCache};
use crate::downstream;
use crate::health::{Event, Outcome, ms_at, nanos_at};
use crate::metrics::{LocalReply, RouteCounters};
use crate::pick::InFlight;
use crate::replay::{DownBody, ReplayBody, ReqBody, UpBody};
use crate::state::Shared;
use crate::table::{RouteRt, RuleRt, Target, upstream_uri};
use crate::upstream::{self, Forwarded, Pool};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

/// The body of a response: streamed from upstream, or a short local reply.
pub type Body = Either<Either<DownBody, TeeBody<DownBody>>, Full<Bytes>>;

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

pub(crate) const VIA_11: HeaderValue = HeaderValue::from_static("1.1 weir");
const VIA_2: HeaderValue = HeaderValue::from_static("2 weir");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_WEIR_ERROR: HeaderName = HeaderName::from_static("x-weir-error");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// One worker's request handler: the shared table plus this worker's upstream pool.
pub struct Worker {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            pool: Pool::new(CONNECT_TIMEOUT),
        }
    }

    /// Handles one request from `peer` (its IP pre-rendered as a header value).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<ReqBody>,
        peer: HeaderValue,
    ) -> Result<Response<Body>, Infallible> {
        let grpc = is_grpc(req.headers());
        if req.method() == Method::CONNECT {
            // weir is never a tunnel: CONNECT is refused whatever the authority.
            return Ok(local_reply(
                grpc,
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
                        grpc,
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
                        grpc,
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
                grpc,
                &self.shared.metrics.unrouted,
                LocalReply::BadRequest,
                "malformed Host",
            ));
        };

        let (route, rule_idx) = {
            let table = self.shared.table.load();
            let Some(route) = table.route(host) else {
                let msg = format!("no route for host {host:?}");
                return Ok(local_reply(
                    grpc,
                    &self.shared.metrics.unrouted,
                    LocalReply::NoRoute,
                    &msg,
                ));
            };
            let method = req.method();
            let (path, headers) = (req.uri().path(), req.headers());
            let Some(idx) = route
                .rules
                .iter()
                .position(|r| r.matches(method, path, headers))
            else {
                return Ok(local_reply(
                    grpc,
                    &route.counters,
                    LocalReply::NoRoute,
                    "no rule of the route matches this request",
                ));
            };
            (route.clone(), idx)
        };
        let (parts, body) = req.into_parts();
        let Some(cache) = route.cache.clone() else {
            let body = up_body(body);
            return Ok(self
                .forward(parts, body, route, rule_idx, from_uri, peer, grpc, None)
                .await);
        };
        let host = host.to_string();
        // Boxed: the cache path's future is large, and keeping it inline would make every
        // request's future (which hyper moves into place) that large too.
        Ok(Box::pin(self.cached(
            cache, host, parts, body, route, rule_idx, from_uri, peer, grpc,
        ))
        .await)
    }

    /// A request on a route with a response cache: answered from the cache where RFC 9111
    /// allows, otherwise forwarded with the cache filled from the answer as it streams to the
    /// client (concurrent misses for one object wait for the first one's answer).
    #[allow(clippy::too_many_arguments)]
    async fn cached(
        self: &Arc<Self>,
        cache: Cache,
        host: String,
        mut parts: http::request::Parts,
        body: ReqBody,
        route: Arc<RouteRt>,
        rule_idx: usize,
        from_uri: bool,
        peer: HeaderValue,
        grpc: bool,
    ) -> Response<Body> {
        let now = SystemTime::now();
        let full = |r: Response<Bytes>| r.map(|b| Either::Right(Full::new(b)));
        let fill = match cache.lookup(&host, &parts, now) {
            Lookup::Hit(r) => return full(r),
            Lookup::Stale { response, refresh } => {
                if let Some(fill) = refresh {
                    // Answer stale now, refresh once in the background.
                    let me = self.clone();
                    let (route, peer) = (route.clone(), peer.clone());
                    tokio::spawn(async move {
                        let mut fill = fill;
                        let head = fill.refresh_request();
                        let _ = me
                            .forward(
                                head,
                                UpBody::Empty,
                                route,
                                rule_idx,
                                from_uri,
                                peer,
                                false,
                                Some(fill),
                            )
                            .await
                            .into_body()
                            .collect()
                            .await;
                    });
                }
                return full(response);
            }
            Lookup::Miss(mut fill) => {
                fill.add_validators(&mut parts.headers);
                Some(fill)
            }
            Lookup::Wait(waiter) => match waiter.wait(&parts.headers, now).await {
                Some(r) => return full(r),
                None => None,
            },
            Lookup::Bypass => None,
        };
        let bypass = fill.is_none();
        let method = parts.method.clone();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        // Kept only for what may be answered stale when the upstream fails.
        let stale_key = (bypass && (method == Method::GET || method == Method::HEAD))
            .then(|| head_copy(&parts));
        let mut resp = self
            .forward(
                parts,
                up_body(body),
                route,
                rule_idx,
                from_uri,
                peer,
                grpc,
                fill,
            )
            .await;
        if bypass {
            // A failed upstream may still be covered by a stale copy (staleIfError).
            if resp.headers().contains_key(X_WEIR_ERROR)
                && let Some(head) = &stale_key
                && let Some(r) = cache.stale_for_error(&host, head, SystemTime::now())
            {
                return full(r);
            }
            if !method.is_safe() {
                cache.invalidate_after_unsafe(&host, &method, &pq, resp.status(), resp.headers());
            }
            XCache::Bypass.mark(resp.headers_mut());
        }
        resp
    }

    /// Sends the request to an endpoint of the rule, retrying where that is safe, and maps
    /// failures to local replies.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: UpBody,
        route: Arc<RouteRt>,
        rule_idx: usize,
        host_from_uri: bool,
        peer: HeaderValue,
        grpc: bool,
        mut fill: Option<Fill>,
    ) -> Response<Body> {
        let started = Instant::now();
        let _active = Active::new(&route);
        let rule = &route.rules[rule_idx];
        let hash = route.request_hash(parts.uri.path(), &parts.headers);
        let idempotent = is_idempotent(&parts.method);
        let mut budget = route.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if grpc && let Some(t) = grpc_timeout(&parts.headers) {
            budget = budget.min(t);
        }
        let deadline = started + budget;

        // A request can be tried again only if its body can be sent again: it streams
        // through at once, and a copy of up to REPLAY_LIMIT bytes is kept for retries.
        let body_empty = matches!(body, UpBody::Empty);
        let mut first_body = match body {
            UpBody::Stream(b) if route.retry.attempts > 0 => {
                Some(UpBody::Replay(ReplayBody::new(b, REPLAY_LIMIT)))
            }
            other => Some(other),
        };
        let mut replay: Option<ReplayBody> = None;

        let downstream_version = parts.version;
        if (host_from_uri || parts.headers.get(header::HOST).is_none())
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let pq = std::mem::take(&mut parts.uri).into_parts().path_and_query;
        let te_trailers = parts
            .headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut parts.headers);
        // Added as each try is written (see `upstream::Forwarded`).
        let fwd = Forwarded {
            peer,
            via: if downstream_version == Version::HTTP_2 {
                VIA_2
            } else {
                VIA_11
            },
        };

        let mut tries = 0u32;
        let mut previous: Option<SocketAddr> = None;
        // A request the pool gave back unsent (connect failure): the next try reuses it.
        let mut unsent: Option<Request<UpBody>> = None;
        // Whether `parts.headers` still holds the head, for a try after one that was sent.
        let mut have_head = true;
        let resends = route.retry.resends_after_send(idempotent, grpc);
        loop {
            let Some(target) = pick_target(rule, hash, previous, route.max_per_endpoint) else {
                let reply = if rule.targets.is_empty() {
                    (LocalReply::NoHealthyEndpoint, "no healthy endpoint")
                } else {
                    (
                        LocalReply::CircuitOpen,
                        "every endpoint is at its limit of requests in flight",
                    )
                };
                if let Some(r) = fill.take().and_then(|f| f.fail(SystemTime::now())) {
                    return r.map(|b| Either::Right(Full::new(b)));
                }
                return local_reply(grpc, &route.counters, reply.0, reply.1);
            };
            let authority = target.h2c.then_some(&target.authority);
            let Ok(uri) = upstream_uri(authority, pq.clone()) else {
                return local_reply(
                    grpc,
                    &route.counters,
                    LocalReply::BadRequest,
                    "bad request target",
                );
            };
            let mut up = match unsent.take() {
                Some(up) => up,
                None => {
                    let body = match first_body.take() {
                        Some(UpBody::Replay(b)) => {
                            let replica = b.replica();
                            replay = replica;
                            UpBody::Replay(b)
                        }
                        Some(other) => other,
                        None if body_empty => UpBody::Empty,
                        None => match replay.as_ref().and_then(ReplayBody::replica) {
                            Some(b) => UpBody::Replay(b),
                            None => {
                                return local_reply(
                                    grpc,
                                    &route.counters,
                                    LocalReply::UpstreamError,
                                    "upstream request failed",
                                );
                            }
                        },
                    };
                    let mut up = Request::new(body);
                    *up.method_mut() = parts.method.clone();
                    // The head is copied only when a retry may follow a try that was sent.
                    *up.headers_mut() = if route.retry.attempts > tries && (resends || target.h2c) {
                        parts.headers.clone()
                    } else {
                        have_head = false;
                        std::mem::take(&mut parts.headers)
                    };
                    up
                }
            };
            *up.uri_mut() = uri;
            if target.h2c {
                *up.version_mut() = Version::HTTP_2;
                if te_trailers || grpc {
                    up.headers_mut()
                        .insert(header::TE, HeaderValue::from_static("trailers"));
                }
            } else {
                *up.version_mut() = Version::HTTP_11;
                up.headers_mut().remove(header::TE);
            }

            // The clock is read once before and once after each try; every time figure
            // below is derived from those two reads.
            let now = if tries == 0 { started } else { Instant::now() };
            let remaining = deadline.saturating_duration_since(now);
            let per_try = route
                .retry
                .per_try_timeout
                .map_or(remaining, |p| p.min(remaining));
            let in_flight = InFlight::new(target.health.load.clone());
            target.health.counters.requests.inc();
            // `None`: the try timed out.
            let result = tokio::time::timeout(
                per_try,
                self.pool
                    .send(target.addr, target.h2c, up, now, Some(fwd.clone())),
            )
            .await
            .ok();
            let done = Instant::now();
            let latency = done.saturating_duration_since(now);
            in_flight.finish(latency, nanos_at(done));
            // A gRPC call whose deadline passed while its answer was on the way (the endpoint
            // ran out the same `grpc-timeout`, and tonic, for one, answers CANCELLED) timed
            // out too: the client has given up by now, so it gets DEADLINE_EXCEEDED, not a
            // race. (Decided before the `match`: a guard arm there cost 9k instructions.)
            let result = result.filter(|_| !(grpc && done >= deadline));
            let (failure, retryable, outcome) = match result {
                Some(Ok((resp, lease))) => {
                    let status = resp.status().as_u16();
                    if grpc {
                        // A failed call before any message: a Trailers-Only answer.
                        let code = head_grpc_status(resp.headers());
                        let failed = status >= 500 || matches!(code, Some(4 | 8 | 13 | 14 | 15));
                        let retry = code.is_some_and(|c| route.retry.on_grpc.contains(&c));
                        (failed, retry, Ok((resp, lease)))
                    } else {
                        let failed = status >= 500;
                        let retry = route.retry.retry_status(status) && idempotent;
                        (failed, retry, Ok((resp, lease)))
                    }
                }
                Some(Err(upstream::Error::Connect(e, req))) => {
                    tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream connect failed");
                    unsent = Some(*req);
                    (
                        true,
                        route.retry.on_connect_failure,
                        Err(LocalReply::UpstreamConnect),
                    )
                }
                Some(Err(e)) if e.never_processed() => {
                    // Refused or cut off by a graceful GOAWAY before the endpoint saw it:
                    // as safe to send again as a connect failure.
                    tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream did not process the request");
                    (false, true, Err(LocalReply::UpstreamError))
                }
                Some(Err(e)) => {
                    tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream request failed");
                    (
                        true,
                        route.retry.on_reset && (idempotent || grpc),
                        Err(LocalReply::UpstreamError),
                    )
                }
                None => (
                    true,
                    route.retry.on_timeout && idempotent,
                    Err(LocalReply::UpstreamTimeout),
                ),
            };
            let outcome_kind = if failure {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            if failure {
                target.health.counters.failures.inc();
            }
            let now_ms = ms_at(done);
            let max_ejection = route.outlier.max_ejection_percent;
            if let Some(until) = target
                .health
                .record(outcome_kind, &route.outlier, now_ms, || {
                    rule.may_eject(max_ejection, now_ms)
                })
            {
                tracing::warn!(route = %route.name, endpoint = %target.addr, "endpoint ejected by outlier detection");
                self.shared.endpoints.notify(Event::EjectedUntil(until));
            }
            if tries > 0 {
                route.end_retry();
            }

            let can_retry = retryable
                && (unsent.is_some()
                    || (have_head
                        && (body_empty || replay.as_ref().is_some_and(ReplayBody::replayable))))
                && tries < route.retry.attempts
                && done < deadline
                && route.try_begin_retry();
            if can_retry {
                tries += 1;
                route.counters.retries.inc();
                previous = Some(target.addr);
                continue;
            }
            route
                .counters
                .latency
                .observe(done.saturating_duration_since(started));
            return match outcome {
                Ok((resp, lease)) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    // An HTTP/1.1 head comes from `h1c` without hop-by-hop fields and with
                    // `Via` already (it saw every field once while parsing).
                    if target.h2c {
                        strip_hop_by_hop(&mut rparts.headers);
                        rparts.headers.append(header::VIA, VIA_11);
                    }
                    route.counters.response(rparts.status);
                    // Counted now if the head carries the status (Trailers-Only), else by the
                    // body when the trailers pass.
                    let tally = grpc
                        .then(|| {
                            target.grpc_calls(&self.shared.metrics.grpc_calls, &route.shared_name)
                        })
                        .and_then(|t| match head_grpc_status(&rparts.headers) {
                            Some(status) => {
                                t.count(status);
                                None
                            }
                            None => Some(t),
                        });
                    let body = DownBody::new(rbody, tally, lease);
                    match fill
                        .take()
                        .map(|f| f.on_response(&mut rparts, SystemTime::now()))
                    {
                        Some(FillAction::Respond(r)) => r.map(|b| Either::Right(Full::new(b))),
                        Some(FillAction::Store(collector)) => Response::from_parts(
                            rparts,
                            Either::Left(Either::Right(TeeBody::new(body, collector))),
                        ),
                        Some(FillAction::Forward) | None => {
                            Response::from_parts(rparts, Either::Left(Either::Left(body)))
                        }
                    }
                }
                Err(reply) => {
                    // staleIfError: a stale copy beats an error.
                    if let Some(r) = fill.take().and_then(|f| f.fail(SystemTime::now())) {
                        return r.map(|b| Either::Right(Full::new(b)));
                    }
                    let msg = match reply {
                        LocalReply::UpstreamConnect => "upstream connection failed",
                        LocalReply::UpstreamTimeout => "upstream did not answer in time",
                        _ => "upstream request failed",
                    };
                    local_reply(grpc, &route.counters, reply, msg)
                }
            };
        }
    }
}

/// Largest request body kept in memory so the request can be retried (gRPC's default
/// message size limit is 4 MiB; most retried requests are far smaller).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The upstream body for a client's request body. Most requests have none: nothing to
/// stream, nothing to keep for a retry.
fn up_body(body: ReqBody) -> UpBody {
    if body.is_end_stream() {
        UpBody::Empty
    } else {
        UpBody::Stream(body)
    }
}

/// A copy of a request head (`request::Parts` is not `Clone`: extensions are left behind).
fn head_copy(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Counts a request as live on its route (for the retry budget and the in-flight gauge).
struct Active<'a>(&'a RouteRt);

impl<'a> Active<'a> {
    fn new(route: &'a RouteRt) -> Self {
        route.active.fetch_add(1, Ordering::Relaxed);
        route.counters.in_flight.inc();
        Self(route)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.counters.in_flight.dec();
    }
}

/// Methods RFC 9110 §9.2.2 calls idempotent: safe to send twice.
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Picks an endpoint below its in-flight limit, preferring one other than `avoid` (the
/// endpoint a retry is moving away from). A few draws, not a scan: the pickers already favour
/// lightly loaded endpoints.
fn pick_target(
    rule: &RuleRt,
    hash: Option<u64>,
    avoid: Option<SocketAddr>,
    max_in_flight: u32,
) -> Option<&Target> {
    let mut fallback = None;
    for _ in 0..3 {
        let t = rule.pick(hash)?;
        if t.health.load.in_flight() >= max_in_flight {
            continue;
        }
        if Some(t.addr) != avoid || rule.targets.len() == 1 {
            return Some(t);
        }
        fallback = Some(t);
        if hash.is_some() {
            break; // the same key keeps mapping to the same endpoint
        }
    }
    fallback.or_else(|| {
        rule.targets
            .iter()
            .find(|t| t.health.load.in_flight() < max_in_flight)
    })
}

/// An answer from the agent itself. HTTP clients get a short plain-text body with
/// `x-weir-error` naming the reason; gRPC clients cannot read that, so they get a gRPC
/// "Trailers-Only" answer: HTTP 200 with `grpc-status` and a `grpc-message` saying why.
pub fn local_reply(
    grpc: bool,
    counters: &RouteCounters,
    reply: LocalReply,
    msg: &str,
) -> Response<Body> {
    counters.reply(reply);
    let body = if grpc {
        Bytes::new()
    } else {
        Bytes::from(format!("weir: {msg}\n"))
    };
    let mut resp = Response::new(Either::Right(Full::new(body)));
    if !grpc {
        *resp.status_mut() = reply.status();
    }
    let h = resp.headers_mut();
    h.insert(X_WEIR_ERROR, HeaderValue::from_static(reply.code()));
    if grpc {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(GRPC_STATUS, HeaderValue::from(reply.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc(&format!("weir: {msg}"))) {
            h.insert(GRPC_MESSAGE, v);
        }
        return resp;
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if reply.status() == StatusCode::BAD_REQUEST {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec): everything outside printable
/// ASCII, and `%` itself.
fn percent_encode_grpc(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether the request is a gRPC call (`content-type: application/grpc[+proto|…]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The call's `grpc-timeout` (e.g. `300m`, `2S`), if it has a valid one.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` of a response whose head already carries it (a Trailers-Only answer,
/// which is how servers fail a call before sending any message).
fn head_grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
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
    // One pass over the names finds which hop-by-hop headers are present, so only those are
    // removed: most messages carry none or only `Connection`, and nine hashed removals per
    // message showed in the instruction profile (tests/bench/insn_bench.py).
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0
        && let Some(conn) = headers.get(header::CONNECTION).cloned()
    {
        remove_connection_named(headers, &conn);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// Removes the headers a `Connection` value names (tokens other than the usual `close` and
/// `keep-alive`): they are hop-by-hop too (RFC 9110 §7.6.1).
pub(crate) fn remove_connection_named(headers: &mut HeaderMap, conn: &HeaderValue) {
    for t in conn.to_str().unwrap_or("").split(',').map(str::trim) {
        if !t.eq_ignore_ascii_case("close")
            && !t.eq_ignore_ascii_case("keep-alive")
            && let Ok(n) = HeaderName::from_bytes(t.as_bytes())
        {
            headers.remove(n);
        }
    }
}

/// The index of `name` in [`HOP_BY_HOP`]: a `match` on the string compiles to a length
/// switch and at most one comparison, cheaper than comparing with each name in turn.
pub(crate) fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

pub(crate) fn append_forwarded_for(headers: &mut HeaderMap, peer: HeaderValue) {
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

/// Limits that protect the listener from slow or greedy clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive within this time, or the connection is closed.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// Accepts and serves connections on `listener` until the runtime stops.
///
/// Request heads larger than 64 KiB get `431`, malformed ones `400` (hyper's strict parser);
/// a request carrying both `Content-Length` and `Transfer-Encoding` is decoded as chunked,
/// its `Content-Length` dropped and the connection closed after the answer (RFC 9112 §6.1),
/// and since the agent re-frames every message it forwards, no ambiguity reaches upstreams.
pub async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let worker = Arc::new(Worker::new(shared));
    let pool = Arc::downgrade(&worker.pool);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            pool.sweep(Instant::now());
        }
    });
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    let http1 = Arc::new(http1);
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
        let http1 = http1.clone();
        let first_bytes = limits.header_read_timeout;
        tokio::spawn(async move {
            let peer = peer_header(peer.ip());
            // A client that never sends its first bytes is a slowloris too.
            let Ok(Some(proto)) =
                tokio::time::timeout(first_bytes, downstream::detect(stream)).await
            else {
                return;
            };
            match proto {
                downstream::Protocol::H2(io) => downstream::serve_h2(io, worker, peer).await,
                downstream::Protocol::Http1(io) => {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        worker.clone().handle(req.map(Either::Left), peer.clone())
                    });
                    if let Err(e) = http1.serve_connection(TokioIo::new(io), svc).await {
                        tracing::trace!(error = %e, "connection ended with an error");
                    }
                }
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
    fn hop_by_hop_index_matches_the_table() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i), "{n}");
        }
        assert_eq!(hop_by_hop_index(&header::HOST), None);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, HeaderValue::from_static("10.0.0.2"));
        assert_eq!(h.get(&X_FORWARDED_FOR).expect("xff"), "10.0.0.1, 10.0.0.2");
    }
}
