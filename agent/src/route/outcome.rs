//! What a try leaves behind: the endpoint's health (failure counter, outlier ejection), the
//! route's counters, and the answer the client gets — the upstream's (with the gRPC tally
//! and the cache fill attached) or a local reply (or a stale copy that beats it).

use super::table::{RouteRt, RuleRt, Target};
use super::{Body, local_reply};
use crate::cache::{Fill, FillAction, TeeBody};
use crate::health::{DEFAULT_THROTTLE, Endpoints, Event, MAX_THROTTLE, Outcome, ms_at};
use crate::http::grpc::head_grpc_status;
use crate::http::headers::{VIA_11, retry_after, strip_hop_by_hop};
use crate::http::reply::LocalReply;
use crate::metrics::Metrics;
use crate::upstream::{self, DownBody, Lease, RespBody, RetryKind};
use http::header;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use std::time::{Instant, SystemTime};

/// Logs why a try failed (debug level: the counters carry the rates).
#[inline]
pub(super) fn log_error(route: &RouteRt, target: &Target, e: &upstream::Error, kind: RetryKind) {
    match kind {
        RetryKind::Connect => {
            tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream connect failed");
        }
        // Refused or cut off by a graceful GOAWAY before the endpoint saw it.
        RetryKind::Refused => {
            tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream did not process the request");
        }
        RetryKind::Reset => {
            tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream request failed");
        }
        RetryKind::ClientBody => {
            tracing::debug!(route = %route.name, target = %target.addr, error = %e, "client request body malformed");
        }
    }
}

/// Records one try's outcome on its endpoint: the failure counter, passive health, and an
/// ejection (announced to the health task) when outlier detection trips.
#[inline]
pub(super) fn record(
    endpoints: &Endpoints,
    route: &RouteRt,
    rule: &RuleRt,
    target: &Target,
    failure: bool,
    done: Instant,
) {
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
        endpoints.notify(Event::EjectedUntil(until));
    }
}

/// An endpoint that answers `429`, or `503` with `Retry-After`, asked for less traffic: the
/// pickers pass it over while another endpoint can take the request (see
/// `forward::pick_target`), for the time it asked (at most [`MAX_THROTTLE`]; a 429 without
/// `Retry-After` for [`DEFAULT_THROTTLE`]).
#[inline]
pub(super) fn note_throttle(resp: &Response<RespBody>, target: &Target, done: Instant) {
    let status = resp.status();
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return;
    }
    throttle(resp, status, target, done);
}

#[cold]
fn throttle(resp: &Response<RespBody>, status: StatusCode, target: &Target, done: Instant) {
    let asked = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| retry_after(v, SystemTime::now()));
    let wait = match asked {
        Some(wait) => wait.min(MAX_THROTTLE),
        None if status == StatusCode::TOO_MANY_REQUESTS => DEFAULT_THROTTLE,
        None => return,
    };
    if !wait.is_zero() {
        let until = ms_at(done) + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        target.health.throttle(until);
    }
}

/// The client's answer from the upstream's: hop-by-hop fields dropped (HTTP/2; `h1` does it
/// while parsing), `Via` added, the response counted, the gRPC call tallied, and the cache
/// filled as the body streams (or answered from it after a 304).
#[inline]
pub(super) fn respond(
    resp: Response<RespBody>,
    lease: Lease,
    target: &Target,
    route: &RouteRt,
    grpc: bool,
    metrics: &Metrics,
    fill: Option<Fill>,
) -> Response<Body> {
    let (mut rparts, rbody) = resp.into_parts();
    // An HTTP/1.1 head comes from `h1` without hop-by-hop fields and with `Via` already (it
    // saw every field once while parsing).
    if target.h2c {
        strip_hop_by_hop(&mut rparts.headers);
        rparts.headers.append(header::VIA, VIA_11);
    }
    route.counters.response(rparts.status);
    // Counted now if the head carries the status (Trailers-Only), else by the body when the
    // trailers pass.
    let tally = grpc
        .then(|| target.grpc_calls(&metrics.grpc_calls, &route.shared_name))
        .and_then(|t| match head_grpc_status(&rparts.headers) {
            Some(status) => {
                t.count(status);
                None
            }
            None => Some(t),
        });
    let body = DownBody::new(rbody, tally, lease);
    match fill.map(|f| f.on_response(&mut rparts, SystemTime::now())) {
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

/// The client's answer when every try failed: a stale copy where `staleIfError` allows,
/// else a local reply saying why.
#[inline]
pub(super) fn fail(
    reply: LocalReply,
    fill: Option<Fill>,
    grpc: bool,
    route: &RouteRt,
) -> Response<Body> {
    // staleIfError: a stale copy beats an error.
    if let Some(r) = fill.and_then(|f| f.fail(SystemTime::now())) {
        return r.map(|b| Either::Right(Full::new(b)));
    }
    let msg = match reply {
        LocalReply::UpstreamConnect => "upstream connection failed",
        LocalReply::UpstreamTimeout => "upstream did not answer in time",
        LocalReply::BadFraming => "malformed request body",
        _ => "upstream request failed",
    };
    local_reply(grpc, &route.counters, reply, msg)
}
