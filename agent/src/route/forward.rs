//! The try loop: a request goes to an endpoint of its rule, and again to another where the
//! retry policy, the body, the budget and the deadline allow; what each try means is decided
//! by [`super::retry::classify`] and recorded by [`super::outcome`].

use super::outcome;
use super::retry;
use super::table::{RouteRt, RuleRt, Target};
use super::{Body, DEFAULT_TIMEOUT, Routed, Worker, local_reply};
use crate::balance::InFlight;
use crate::cache::Fill;
use crate::health::{ms_at, nanos_at};
use crate::http::body::{ReplayBody, UpBody};
use crate::http::grpc::grpc_timeout;
use crate::http::headers::{VIA_2, VIA_11, is_idempotent, strip_hop_by_hop};
use crate::http::reply::LocalReply;
use crate::upstream::{Forwarded, RetryKind};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Version};
use http_body_util::{Either, Full};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

/// Largest request body kept in memory so the request can be retried (gRPC's default
/// message size limit is 4 MiB; most retried requests are far smaller).
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

impl Worker {
    /// Sends the request to an endpoint of the rule, retrying where that is safe, and maps
    /// failures to local replies.
    pub(super) async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: UpBody,
        routed: Routed,
        mut fill: Option<Fill>,
    ) -> Response<Body> {
        let Routed {
            route,
            rule_idx,
            host_from_uri,
            peer,
            grpc,
        } = routed;
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

        if let Some(mirror) = rule.mirror.as_ref().filter(|m| m.sample()) {
            first_body = first_body.map(|body| {
                mirror.start(
                    &self.pool,
                    &parts.method,
                    &parts.headers,
                    pq.clone(),
                    body,
                    &fwd,
                    budget,
                )
            });
        }

        let mut tries = 0u32;
        let mut previous: Option<SocketAddr> = None;
        // A request the pool gave back unsent (connect failure): the next try reuses it.
        let mut unsent: Option<Request<UpBody>> = None;
        // Whether `parts.headers` still holds the head, for a try after one that was sent.
        let mut have_head = true;
        let resends = route.retry.resends_after_send(idempotent, grpc);
        loop {
            let now_ms = if tries == 0 {
                ms_at(started)
            } else {
                ms_at(Instant::now())
            };
            let Some(target) = pick_target(rule, hash, previous, route.max_per_endpoint, now_ms)
            else {
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
                        // Mirrored: the copy is fed from the first try, a retry replays.
                        Some(UpBody::Tee(t)) => {
                            if let UpBody::Replay(b) = t.inner() {
                                replay = b.replica();
                            }
                            UpBody::Tee(t)
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
            if let Some(Ok((resp, _))) = &result {
                outcome::note_throttle(resp, target, done);
            }
            let verdict = retry::classify(result.as_ref(), &route.retry, idempotent, grpc);
            let outcome = match result {
                Some(Ok(answer)) => Ok(answer),
                Some(Err(e)) => {
                    let kind = e.retry_kind();
                    outcome::log_error(&route, target, &e, kind);
                    // A request never sent is given back: the next try reuses it.
                    unsent = e.into_unsent();
                    Err(match kind {
                        RetryKind::Connect => LocalReply::UpstreamConnect,
                        // The client's body broke mid-upload: its fault, answered 400.
                        RetryKind::ClientBody => LocalReply::BadFraming,
                        RetryKind::Refused | RetryKind::Reset => LocalReply::UpstreamError,
                    })
                }
                None => Err(LocalReply::UpstreamTimeout),
            };
            outcome::record(
                &self.routing.endpoints,
                &route,
                rule,
                target,
                verdict.failure,
                done,
            );
            if tries > 0 {
                route.end_retry();
            }

            let can_retry = verdict.retryable
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
            let mut resp = match outcome {
                Ok((resp, lease)) => outcome::respond(
                    resp,
                    lease,
                    target,
                    &route,
                    grpc,
                    &self.routing.metrics,
                    fill.take(),
                ),
                Err(reply) => outcome::fail(reply, fill.take(), grpc, &route),
            };
            if self.routing.observing() {
                resp.extensions_mut()
                    .insert(crate::observe::Upstream(target.addr));
            }
            return resp;
        }
    }
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

/// Picks an endpoint below its in-flight limit, preferring one other than `avoid` (the
/// endpoint a retry is moving away from) and one that has not asked for less traffic (a 429
/// or a 503 with `Retry-After`, see `outcome::note_throttle`). A few draws, not a scan: the
/// pickers already favour lightly loaded endpoints. A throttled endpoint still gets the
/// request when no other can take it: a slow answer beats none.
pub(super) fn pick_target(
    rule: &RuleRt,
    hash: Option<u64>,
    avoid: Option<SocketAddr>,
    max_in_flight: u32,
    now_ms: u64,
) -> Option<&Target> {
    let usable = |t: &Target| t.health.load.in_flight() < max_in_flight;
    let mut fallback: Option<&Target> = None;
    for _ in 0..3 {
        let t = rule.pick(hash)?;
        if !usable(t) {
            continue;
        }
        let throttled = t.health.is_throttled(now_ms);
        if !throttled && (Some(t.addr) != avoid || rule.targets.len() == 1) {
            return Some(t);
        }
        // A second choice that is not throttled beats one that is.
        if fallback.is_none_or(|f| !throttled && f.health.is_throttled(now_ms)) {
            fallback = Some(t);
        }
        if hash.is_some() {
            break; // the same key keeps mapping to the same endpoint
        }
    }
    pick_fallback(rule, fallback, max_in_flight, now_ms)
}

/// Past the draws: the second choice unless it is throttled, else the first usable endpoint
/// that is not, else any usable one.
#[cold]
fn pick_fallback<'r>(
    rule: &'r RuleRt,
    fallback: Option<&'r Target>,
    max_in_flight: u32,
    now_ms: u64,
) -> Option<&'r Target> {
    let usable = |t: &Target| t.health.load.in_flight() < max_in_flight;
    if let Some(f) = fallback.filter(|f| !f.health.is_throttled(now_ms)) {
        return Some(f);
    }
    rule.targets
        .iter()
        .find(|t| usable(t) && !t.health.is_throttled(now_ms))
        .or(fallback)
        .or_else(|| rule.targets.iter().find(|t| usable(t)))
}

/// Builds the upstream URI for the request's path and query: absolute (scheme and the
/// endpoint's authority) when `authority` is given, as HTTP/2 needs; origin form otherwise,
/// which is what an HTTP/1.1 connection to the endpoint sends.
#[inline]
pub(crate) fn upstream_uri(
    authority: Option<&Authority>,
    pq: Option<PathAndQuery>,
) -> Result<http::Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    if let Some(authority) = authority {
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority.clone());
    }
    parts.path_and_query = Some(pq.unwrap_or_else(|| PathAndQuery::from_static("/")));
    Ok(http::Uri::from_parts(parts)?)
}
