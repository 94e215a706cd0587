//! Traffic mirroring (`rules[].mirror`): a share of a rule's requests is copied to a shadow
//! Service; the copy's answer is read and thrown away.
//!
//! The real request never waits on the copy: the copy is a task of its own on the worker's
//! runtime, its body is fed through a bounded channel that cuts it when the shadow lags
//! ([`crate::http::tee`]), and copies beyond [`MAX_IN_FLIGHT`] per route and worker are
//! dropped before they start. Which requests are copied is decided by a counter rather than
//! a random draw, so `percent: 10` copies exactly 1 request in 10, evenly spread.

use super::forward::upstream_uri;
use crate::http::body::UpBody;
use crate::http::tee::tee;
use crate::metrics::MirrorCounters;
use crate::upstream::{Forwarded, Pool};
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Version};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use weir_proto::v1 as pb;

/// Copies in flight per route (in each agent) before new ones are dropped: a shadow that
/// stops answering must not pile up connections and memory in the agent.
pub(crate) const MAX_IN_FLIGHT: u32 = 64;

/// Marks a mirrored copy, so the shadow can tell it from real traffic.
pub(crate) static X_WEIR_MIRROR: HeaderName = HeaderName::from_static("x-weir-mirror");

/// A rule's mirror: the shadow's ready endpoints and the share copied.
#[derive(Debug)]
pub(crate) struct MirrorRt {
    pub(crate) service: Box<str>,
    pub(crate) percent: u32,
    targets: Box<[(SocketAddr, Authority)]>,
    h2c: bool,
    /// Requests seen, for sampling; also spreads copies over the targets.
    seen: AtomicU64,
    picked: AtomicU64,
    in_flight: Arc<AtomicU32>,
    counters: MirrorCounters,
}

impl MirrorRt {
    /// The mirror `proto` asks for (`None` without one, or when its Service has no ready
    /// endpoint: then there is nothing to copy to).
    pub(crate) fn build(
        proto: &pb::Mirror,
        counters: MirrorCounters,
    ) -> Result<Option<Self>, String> {
        let Some(backend) = proto.backend.as_ref() else {
            return Ok(None);
        };
        let mut targets = Vec::new();
        for ep in backend.endpoints.iter().filter(|e| e.ready) {
            let addr: SocketAddr = ep.address.parse().map_err(|e| {
                format!(
                    "mirror {}: bad endpoint address {:?}: {e}",
                    backend.service, ep.address
                )
            })?;
            let authority = Authority::try_from(addr.to_string().as_str())
                .map_err(|e| format!("mirror endpoint {addr}: {e}"))?;
            targets.push((addr, authority));
        }
        Ok(Some(Self {
            service: backend.service.as_str().into(),
            percent: proto.percent.clamp(1, 100),
            targets: targets.into_boxed_slice(),
            h2c: backend.protocol == pb::Protocol::H2c as i32,
            seen: AtomicU64::new(0),
            picked: AtomicU64::new(0),
            in_flight: Arc::new(AtomicU32::new(0)),
            counters,
        }))
    }

    /// The shadow's endpoints that get copies.
    pub(crate) fn targets(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.targets.iter().map(|(a, _)| *a)
    }

    /// Whether this request is one of the share copied: request n is copied when
    /// ⌊n·p/100⌋ steps, which happens p times in every 100 requests, evenly spaced.
    #[inline]
    pub(crate) fn sample(&self) -> bool {
        if self.percent >= 100 {
            return true;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let p = u64::from(self.percent);
        (n + 1) * p / 100 != n * p / 100
    }

    /// Starts a copy of the request whose head is `method`/`headers`/`pq`, and returns the
    /// body the real request must send instead of `body` (the same body, teed when it has
    /// one). A copy that cannot start (no endpoint, too many in flight) is dropped and
    /// counted; the real request is unaffected either way.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &self,
        pool: &Arc<Pool>,
        method: &http::Method,
        headers: &http::HeaderMap,
        pq: Option<PathAndQuery>,
        body: UpBody,
        fwd: &Forwarded,
        timeout: Duration,
    ) -> UpBody {
        if self.targets.is_empty() {
            self.counters.dropped.inc();
            return body;
        }
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.counters.dropped.inc();
            return body;
        }
        let i = self.picked.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len();
        let (addr, authority) = &self.targets[i];
        let Ok(uri) = upstream_uri(self.h2c.then_some(authority), pq) else {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.counters.dropped.inc();
            return body;
        };
        let (real, copy) = if http_body::Body::is_end_stream(&body) {
            (body, UpBody::Empty)
        } else {
            let (real, copy) = tee(body);
            (UpBody::Tee(Box::new(real)), UpBody::Shadow(copy))
        };
        let mut req = Request::new(copy);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers.clone();
        req.headers_mut()
            .insert(X_WEIR_MIRROR.clone(), HeaderValue::from_static("1"));
        *req.version_mut() = if self.h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let send = pool.send(*addr, self.h2c, req, Instant::now(), Some(fwd.clone()));
        let in_flight = self.in_flight.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(timeout, async move {
                let (resp, _lease) = send.await.ok()?;
                // Read to the end so the connection can serve the next copy.
                resp.into_body().collect().await.ok()
            })
            .await;
            let outcome = match answered {
                Ok(Some(_)) => &counters.sent,
                _ => &counters.failed,
            };
            outcome.inc();
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        real
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(percent: u32) -> MirrorRt {
        let proto = pb::Mirror {
            backend: Some(pb::Backend {
                service: "shadow".into(),
                endpoints: vec![pb::Endpoint {
                    address: "127.0.0.1:9".into(),
                    ready: true,
                    ..pb::Endpoint::default()
                }],
                ..pb::Backend::default()
            }),
            percent,
        };
        let metrics = crate::metrics::Metrics::new();
        MirrorRt::build(&proto, metrics.mirror_counters("r"))
            .expect("valid")
            .expect("a mirror")
    }

    #[test]
    fn sampling_copies_exactly_the_share_evenly_spread() {
        for percent in [1, 10, 25, 33, 50, 99, 100] {
            let m = mirror(percent);
            let copied: Vec<bool> = (0..1000).map(|_| m.sample()).collect();
            let n = copied.iter().filter(|c| **c).count();
            assert_eq!(n as u32, percent * 10, "{percent}%");
            // Never two copies in a row below 50 %: the share is spread, not bunched.
            if percent <= 50 {
                assert!(!copied.windows(2).any(|w| w[0] && w[1]), "{percent}%");
            }
        }
    }

    #[test]
    fn only_ready_endpoints_get_copies() {
        let proto = pb::Mirror {
            backend: Some(pb::Backend {
                service: "shadow".into(),
                endpoints: vec![
                    pb::Endpoint {
                        address: "127.0.0.1:1".into(),
                        ready: false,
                        ..pb::Endpoint::default()
                    },
                    pb::Endpoint {
                        address: "127.0.0.1:2".into(),
                        ready: true,
                        ..pb::Endpoint::default()
                    },
                ],
                ..pb::Backend::default()
            }),
            percent: 100,
        };
        let metrics = crate::metrics::Metrics::new();
        let m = MirrorRt::build(&proto, metrics.mirror_counters("r"))
            .expect("valid")
            .expect("a mirror");
        let targets: Vec<SocketAddr> = m.targets().collect();
        assert_eq!(
            targets,
            ["127.0.0.1:2".parse::<SocketAddr>().expect("addr")]
        );
        let bad = pb::Mirror {
            backend: Some(pb::Backend {
                service: "shadow".into(),
                endpoints: vec![pb::Endpoint {
                    address: "nope".into(),
                    ready: true,
                    ..pb::Endpoint::default()
                }],
                ..pb::Backend::default()
            }),
            percent: 100,
        };
        let err = MirrorRt::build(&bad, metrics.mirror_counters("r")).expect_err("bad");
        assert!(err.contains("bad endpoint address"), "{err}");
    }
}
