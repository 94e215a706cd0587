//! Protocol upgrades — HTTP/1.1 `Upgrade` (WebSocket and any other token) and WebSocket over
//! an h2 extended CONNECT (RFC 8441) — routed and balanced like any request: the same host
//! and rule matching (never an open proxy), the same pickers, circuit breaker and outlier
//! detection. What differs from [`super::forward`]:
//!
//! - the request goes on a fresh upstream connection of its own (never pooled: if the origin
//!   switches protocols the connection is the tunnel's for good), as HTTP/1.1 with
//!   `Connection: upgrade` and `Upgrade` kept (an extended CONNECT becomes a `GET` WebSocket
//!   handshake, see `http::upgrade`); h2c backends are not offered upgrades (`502`);
//! - only a connect failure is tried again (on another endpoint, as often as the route's
//!   retry attempts allow, at least once): once the head is sent nothing is retried;
//! - no cache, whatever the route says;
//! - a `101` leaves the endpoint's in-flight count raised while the tunnel is open (the
//!   pickers see a WebSocket as the load it is), via the [`TunnelHold`] the listener keeps.
//!
//! The listener (`listen::tunnel`) sends the answer and copies the bytes.

use super::forward::{pick_target, upstream_uri};
use super::outcome;
use super::table::RouteRt;
use super::{Body, DEFAULT_TIMEOUT, Selected, Worker, local_reply};
use crate::balance::InFlight;
use crate::health::nanos_at;
use crate::http::headers::{VIA_2, VIA_11};
use crate::http::reply::LocalReply;
use crate::http::upgrade::{
    BadSwitch, forward_h1, h1_101_to_h1, h1_101_to_h2, h2_to_h1, websocket_key,
};
use crate::metrics::UpgradeCounters;
use crate::upstream::h1::{self, Answer};
use crate::upstream::{Forwarded, RespBody};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;

/// Where the upgrade request came from.
#[derive(Debug, Clone)]
pub(crate) enum Downstream {
    /// An HTTP/1.1 request with `Connection: upgrade` and this `Upgrade` value.
    H1 { upgrade: HeaderValue },
    /// An h2 extended CONNECT; `websocket`: its `:protocol` is `websocket`, the only one
    /// translated (others are refused with `400`).
    H2Connect { websocket: bool },
}

/// What became of an upgrade request.
pub(crate) enum Upgrade {
    /// The client's answer: a local reply, or the origin's when it did not switch.
    Reply(Response<Body>),
    /// The origin switched protocols.
    Switched(Switched),
}

/// An upgrade the origin accepted: what the client gets, and the origin's side of the tunnel.
pub(crate) struct Switched {
    /// `101` with `Connection: upgrade` and the origin's `Upgrade` (HTTP/1.1 client), or
    /// `200` (h2 client).
    pub(crate) head: http::response::Parts,
    /// The connection to the origin, now speaking the new protocol.
    pub(crate) io: TcpStream,
    /// Bytes of the new protocol the origin sent with its `101`: the client's first.
    pub(crate) early: Bytes,
    /// Keep until the tunnel closes.
    pub(crate) hold: TunnelHold,
}

/// Counts an open tunnel: on its endpoint's in-flight figure and in the open-tunnels gauge.
pub(crate) struct TunnelHold {
    _in_flight: InFlight,
    counters: UpgradeCounters,
}

impl Drop for TunnelHold {
    fn drop(&mut self) {
        self.counters.open.dec();
    }
}

impl Worker {
    /// Routes an upgrade request (its head; an upgrade carries no body, and an extended
    /// CONNECT's stream stays with the listener) and asks an endpoint to switch protocols.
    pub(crate) async fn upgrade(
        self: Arc<Self>,
        mut parts: http::request::Parts,
        peer: HeaderValue,
        down: Downstream,
    ) -> Upgrade {
        let mut buf = [0u8; 256];
        let selected = self.select(&parts.method, &parts.uri, &parts.headers, &mut buf);
        let Selected {
            route,
            rule_idx,
            from_uri,
            ..
        } = match selected {
            Ok(s) => s,
            Err(u) => return Upgrade::Reply(self.refuse(false, u)),
        };
        let (key, via) = match down {
            Downstream::H1 { upgrade } => {
                forward_h1(&mut parts.headers, upgrade);
                (None, VIA_11)
            }
            Downstream::H2Connect { websocket: false } => {
                return Upgrade::Reply(local_reply(
                    false,
                    &route.counters,
                    LocalReply::BadRequest,
                    "extended CONNECT is supported for :protocol websocket only",
                ));
            }
            Downstream::H2Connect { websocket: true } => {
                let key = websocket_key();
                h2_to_h1(&mut parts.headers, key.clone());
                parts.method = Method::GET;
                (Some(key), VIA_2)
            }
        };
        if (from_uri || !parts.headers.contains_key(header::HOST))
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let hash = route.request_hash(parts.uri.path(), &parts.headers);
        let Ok(uri) = upstream_uri(None, parts.uri.path_and_query().cloned()) else {
            return Upgrade::Reply(local_reply(
                false,
                &route.counters,
                LocalReply::BadRequest,
                "bad request target",
            ));
        };
        let mut req = Request::new(crate::http::body::UpBody::Empty);
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = parts.headers;
        let fwd = Forwarded { peer, via };
        self.try_upgrade(&route, rule_idx, hash, &req, &fwd, key.as_ref())
            .await
    }

    /// The tries of an upgrade: another endpoint after a connect failure, nothing after the
    /// head was sent.
    async fn try_upgrade(
        &self,
        route: &Arc<RouteRt>,
        rule_idx: usize,
        hash: Option<u64>,
        req: &Request<crate::http::body::UpBody>,
        fwd: &Forwarded,
        key: Option<&HeaderValue>,
    ) -> Upgrade {
        let rule = &route.rules[rule_idx];
        let metrics = &self.routing.metrics;
        let started = Instant::now();
        let deadline = started + route.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let tries = 1 + route.retry.attempts.max(1);
        let mut previous = None;
        let mut tried = 0;
        loop {
            tried += 1;
            let Some(target) = pick_target(
                rule,
                hash,
                previous,
                route.max_per_endpoint,
                crate::health::ms_at(std::time::Instant::now()),
            ) else {
                let (kind, msg) = if rule.targets.is_empty() {
                    (LocalReply::NoHealthyEndpoint, "no healthy endpoint")
                } else {
                    (
                        LocalReply::CircuitOpen,
                        "every endpoint is at its limit of requests in flight",
                    )
                };
                return Upgrade::Reply(local_reply(false, &route.counters, kind, msg));
            };
            if target.h2c {
                return Upgrade::Reply(local_reply(
                    false,
                    &route.counters,
                    LocalReply::UpstreamError,
                    "upgrades are not forwarded to h2c backends",
                ));
            }
            let in_flight = InFlight::new(target.health.load.clone());
            target.health.counters.requests.inc();
            let home = h1::Home {
                pool: self.pool.clone(),
                addr: target.addr,
            };
            let attempt = tokio::time::timeout_at(deadline.into(), async {
                let io = self.pool.tcp(target.addr).await.map_err(Failed::Connect)?;
                h1::upgrade(io, req, home, Some(fwd))
                    .await
                    .map_err(Failed::Exchange)
            })
            .await;
            let done = Instant::now();
            let record = |failure: bool| {
                outcome::record(&self.routing.endpoints, route, rule, target, failure, done);
            };
            let answer = match attempt {
                Err(_) => {
                    record(true);
                    return Upgrade::Reply(local_reply(
                        false,
                        &route.counters,
                        LocalReply::UpstreamTimeout,
                        "upstream did not answer the upgrade in time",
                    ));
                }
                Ok(Err(Failed::Connect(e))) => {
                    record(true);
                    tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upstream connect failed (upgrade)");
                    if tried < tries && done < deadline && rule.targets.len() > 1 {
                        previous = Some(target.addr);
                        route.counters.retries.inc();
                        continue;
                    }
                    return Upgrade::Reply(local_reply(
                        false,
                        &route.counters,
                        LocalReply::UpstreamConnect,
                        "upstream connection failed",
                    ));
                }
                Ok(Err(Failed::Exchange(e))) => {
                    record(true);
                    tracing::debug!(route = %route.name, target = %target.addr, error = %e, "upgrade request failed");
                    return Upgrade::Reply(local_reply(
                        false,
                        &route.counters,
                        LocalReply::UpstreamError,
                        "upstream upgrade failed",
                    ));
                }
                Ok(Ok(answer)) => answer,
            };
            route
                .counters
                .latency
                .observe(done.saturating_duration_since(started));
            return match answer {
                Answer::Refused(resp) => {
                    record(resp.status().is_server_error());
                    metrics.upgrades.refused.inc();
                    in_flight.finish(done.saturating_duration_since(started), nanos_at(done));
                    Upgrade::Reply(outcome::respond(
                        resp.map(RespBody::Left),
                        None,
                        target,
                        route,
                        false,
                        metrics,
                        None,
                    ))
                }
                Answer::Switched {
                    mut head,
                    io,
                    early,
                } => {
                    let switched = match key {
                        None => h1_101_to_h1(&mut head.headers)
                            .ok_or("the origin's 101 names no protocol"),
                        Some(key) => {
                            head.status = StatusCode::OK;
                            h1_101_to_h2(&mut head.headers, key).map_err(BadSwitch::as_str)
                        }
                    };
                    if let Err(why) = switched {
                        record(true);
                        tracing::debug!(route = %route.name, target = %target.addr, why, "upgrade answer refused");
                        return Upgrade::Reply(local_reply(
                            false,
                            &route.counters,
                            LocalReply::UpstreamError,
                            why,
                        ));
                    }
                    record(false);
                    route.counters.response(head.status);
                    metrics.upgrades.accepted.inc();
                    metrics.upgrades.open.inc();
                    Upgrade::Switched(Switched {
                        head,
                        io,
                        early,
                        hold: TunnelHold {
                            _in_flight: in_flight,
                            counters: metrics.upgrades.clone(),
                        },
                    })
                }
            };
        }
    }
}

/// Why a try of an upgrade failed.
enum Failed {
    /// No connection: nothing was sent.
    Connect(std::io::Error),
    /// The head was sent (or the answer broke): never tried again.
    Exchange(h1::H1Error),
}
