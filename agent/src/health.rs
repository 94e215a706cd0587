//! Endpoint health as the agent sees it: active checks and passive outlier detection, on top
//! of the EndpointSlice readiness the controller sends.
//!
//! State is kept per endpoint address in an [`Endpoints`] registry that outlives routing
//! tables: a table rebuild looks every endpoint up, so in-flight counts, latency estimates,
//! ejections and check verdicts carry over. Workers only touch atomics; a health transition
//! is sent as an [`Event`] to the control thread, the single writer, which rebuilds the table
//! with the new verdicts (weights, failover spill and panic recomputed by
//! `weir_proto::weights`, exactly as the controller would).
//!
//! Slow start is kept here too: each endpoint remembers when it last started serving, which
//! a table build notes ([`EndpointHealth::note_serving`]) and turns into a weight factor
//! ([`slow_start_permille`]) — so the ramp costs nothing per request.

use crate::balance::EndpointLoad;
use crate::metrics::{EndpointCounters, Metrics};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds on a monotonic clock private to this process (never 0).
pub(crate) fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] at `t`, for a caller that already read the clock.
pub(crate) fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

/// Nanoseconds on the same monotonic clock, for latency estimates.
pub(crate) fn now_nanos() -> u64 {
    nanos_at(Instant::now())
}

/// [`now_nanos`] at `t`.
pub(crate) fn nanos_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

/// What the control thread must react to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// An endpoint's verdict changed: rebuild the table.
    Changed,
    /// An endpoint was ejected until this time (`now_ms` clock): rebuild, and again then.
    EjectedUntil(u64),
}

/// The outcome of one try against an endpoint, as passive outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// 5xx, connect failure, reset or timeout.
    Failure,
}

/// Passive outlier detection settings of a route (from `outlierDetection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutlierConfig {
    pub(crate) consecutive_errors: u32,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    /// Envoy's defaults: 5 consecutive errors, 30 s, at most 10 % ejected. weir allows 50 %
    /// by default so that one bad endpoint of two can still be ejected.
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

/// Health and load of one endpoint address.
#[derive(Debug)]
pub(crate) struct EndpointHealth {
    pub(crate) addr: SocketAddr,
    pub(crate) load: Arc<EndpointLoad>,
    pub(crate) counters: EndpointCounters,
    /// Verdict of the active health check; true until a check says otherwise.
    active_ok: AtomicBool,
    /// `now_ms` until which the endpoint is ejected; 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Why the endpoint is unhealthy, for `/config` (written only on transitions).
    reason: Mutex<Option<String>>,
    /// `now_ms` when the endpoint last started serving (for slow start): [`NOT_SERVING`]
    /// while it is not, [`SERVING_FROM_START`] if it already served in the agent's first
    /// table. Written only by table builds.
    serving_since: AtomicU64,
    /// `now_ms` until which the endpoint asked for less traffic (429 / 503 with
    /// `Retry-After`); 0 when it did not. Read by every pick, written by such answers.
    throttled_until: AtomicU64,
}

/// How long an endpoint that answers 429 without `Retry-After` gets less traffic.
pub(crate) const DEFAULT_THROTTLE: Duration = Duration::from_secs(1);
/// The longest `Retry-After` honoured: a bogus or mistaken header must not starve an endpoint
/// for hours (Envoy caps its rate-limited retry back-off similarly).
pub(crate) const MAX_THROTTLE: Duration = Duration::from_secs(60);

/// [`EndpointHealth::serving_since`] of an endpoint that is not serving (or not seen yet).
const NOT_SERVING: u64 = u64::MAX;
/// [`EndpointHealth::serving_since`] of an endpoint that was serving when the agent built
/// its first table: it did not just start, so it does not ramp.
const SERVING_FROM_START: u64 = 0;

/// The share of its weight a warming endpoint gets, in per mille: linear in the time since it
/// started serving, never below `min_percent`, 1000 once the window is over (or with no
/// window).
pub(crate) fn slow_start_permille(elapsed_ms: u64, window_ms: u64, min_percent: u32) -> u32 {
    if window_ms == 0 || elapsed_ms >= window_ms {
        return 1000;
    }
    let ramp = (elapsed_ms * 1000 / window_ms) as u32;
    ramp.max(min_percent.min(100) * 10)
}

impl EndpointHealth {
    fn new(addr: SocketAddr, metrics: &Metrics) -> Self {
        Self {
            addr,
            load: Arc::new(EndpointLoad::new()),
            counters: metrics.endpoint_counters(addr),
            active_ok: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            reason: Mutex::new(None),
            serving_since: AtomicU64::new(NOT_SERVING),
            throttled_until: AtomicU64::new(0),
        }
    }

    /// Notes at a table build whether the endpoint serves. An endpoint that starts serving
    /// starts its slow start at `now_ms`, unless `initial` (the agent's first table: these
    /// endpoints were serving before the agent came up).
    pub(crate) fn note_serving(&self, serving: bool, now_ms: u64, initial: bool) {
        let since = self.serving_since.load(Ordering::Relaxed);
        if !serving {
            self.serving_since.store(NOT_SERVING, Ordering::Relaxed);
        } else if since == NOT_SERVING {
            let start = if initial { SERVING_FROM_START } else { now_ms };
            self.serving_since.store(start, Ordering::Relaxed);
        }
    }

    /// When (`now_ms` clock) the slow start of a `window_ms` window ends, while it has not.
    pub(crate) fn warming_until(&self, now_ms: u64, window_ms: u64) -> Option<u64> {
        let since = self.serving_since.load(Ordering::Relaxed);
        if window_ms == 0 || since == NOT_SERVING || since == SERVING_FROM_START {
            return None;
        }
        let until = since.saturating_add(window_ms);
        (until > now_ms).then_some(until)
    }

    /// This endpoint's slow-start factor in per mille at `now_ms` (1000: full weight).
    pub(crate) fn slow_start_permille(&self, now_ms: u64, window_ms: u64, min_percent: u32) -> u32 {
        match self.warming_until(now_ms, window_ms) {
            None => 1000,
            Some(until) => slow_start_permille(
                now_ms.saturating_sub(until - window_ms),
                window_ms,
                min_percent,
            ),
        }
    }

    /// Healthy as far as this agent knows (active check passing and not ejected).
    pub(crate) fn is_healthy(&self, now_ms: u64) -> bool {
        self.active_ok.load(Ordering::Relaxed) && !self.is_ejected(now_ms)
    }

    /// Whether the active health check passes (true while none ran or none is configured).
    pub(crate) fn active_check_passing(&self) -> bool {
        self.active_ok.load(Ordering::Relaxed)
    }

    /// The endpoint asked for less traffic until `until_ms` (a later answer may extend it,
    /// never shorten it).
    pub(crate) fn throttle(&self, until_ms: u64) {
        if self.throttled_until.fetch_max(until_ms, Ordering::Relaxed) < until_ms {
            self.counters.throttles.inc();
        }
    }

    /// Whether the endpoint asked for less traffic and the time it asked for is not over.
    #[inline]
    pub(crate) fn is_throttled(&self, now_ms: u64) -> bool {
        self.throttled_until.load(Ordering::Relaxed) > now_ms
    }

    /// When the current throttle ends, if the endpoint is throttled at `now_ms`.
    pub(crate) fn throttled_until(&self, now_ms: u64) -> Option<u64> {
        let until = self.throttled_until.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now_ms
    }

    /// When the current ejection ends, if ejected.
    pub(crate) fn ejected_until(&self) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0).then_some(until)
    }

    pub(crate) fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Why the endpoint is not healthy, or `None`.
    pub(crate) fn reason(&self, now_ms: u64) -> Option<String> {
        if self.is_healthy(now_ms) {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_reason(&self, why: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Records an active check verdict; true if it changed.
    pub(crate) fn set_active(&self, ok: bool, why: &str) -> bool {
        let changed = self.active_ok.swap(ok, Ordering::Relaxed) != ok;
        if changed && !ok {
            self.set_reason(format!("active health check failing: {why}"));
        }
        changed
    }

    /// Ends an ejection whose time is up. True if the endpoint was ejected.
    pub(crate) fn readmit_if_due(&self, now_ms: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 && until <= now_ms {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Counts a try's outcome. Returns `Some(until)` when this failure ejects the endpoint;
    /// `may_eject` says whether the route's `maxEjectionPercent` leaves room for it.
    pub(crate) fn record(
        &self,
        outcome: Outcome,
        cfg: &OutlierConfig,
        now_ms: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<u64> {
        match outcome {
            Outcome::Success => {
                // Read first: a write on every success would bounce the cache line between
                // workers for nothing.
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                None
            }
            Outcome::Failure => {
                let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if cfg.consecutive_errors == 0
                    || n < cfg.consecutive_errors
                    || self.is_ejected(now_ms)
                    || !may_eject()
                {
                    return None;
                }
                let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
                let until = now_ms + cfg.base_ejection.as_millis() as u64 * u64::from(times);
                // Only one worker wins the ejection of an endpoint.
                if self
                    .ejected_until
                    .compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                {
                    self.ejections.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.counters.ejected();
                self.set_reason(format!(
                    "ejected by outlier detection after {n} consecutive errors (ejection #{times}, {} s)",
                    (until - now_ms) / 1000
                ));
                Some(until)
            }
        }
    }
}

/// Every endpoint the agent knows, by address. Written only when tables are built.
pub(crate) struct Endpoints {
    map: Mutex<HashMap<SocketAddr, Arc<EndpointHealth>>>,
    events: mpsc::UnboundedSender<Event>,
}

impl Endpoints {
    pub(crate) fn new(events: mpsc::UnboundedSender<Event>) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            events,
        }
    }

    /// The state of `addr`, created on first use.
    pub(crate) fn get(&self, addr: SocketAddr, metrics: &Metrics) -> Arc<EndpointHealth> {
        self.lock()
            .entry(addr)
            .or_insert_with(|| Arc::new(EndpointHealth::new(addr, metrics)))
            .clone()
    }

    /// Forgets `addrs`, which no route uses any more (their state would otherwise grow
    /// forever).
    pub(crate) fn forget(&self, addrs: &[SocketAddr], metrics: &Metrics) {
        let mut map = self.lock();
        for addr in addrs {
            if map.remove(addr).is_some() {
                metrics.forget_endpoint(*addr);
            }
        }
    }

    /// Forgets every endpoint `keep` rejects (after a failed build, which may have
    /// registered endpoints that no table uses).
    pub(crate) fn retain(&self, keep: impl Fn(&SocketAddr) -> bool, metrics: &Metrics) {
        self.lock().retain(|addr, _| {
            let kept = keep(addr);
            if !kept {
                metrics.forget_endpoint(*addr);
            }
            kept
        });
    }

    pub(crate) fn all(&self) -> Vec<Arc<EndpointHealth>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<EndpointHealth>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the control thread about a transition.
    pub(crate) fn notify(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> EndpointHealth {
        EndpointHealth::new("127.0.0.1:80".parse().expect("addr"), &Metrics::new())
    }

    const CFG: OutlierConfig = OutlierConfig {
        consecutive_errors: 3,
        base_ejection: Duration::from_secs(10),
        max_ejection_percent: 50,
    };

    #[test]
    fn consecutive_failures_eject_for_base_time_times_ejections() {
        let e = endpoint();
        assert_eq!(e.record(Outcome::Failure, &CFG, 1000, || true), None);
        assert_eq!(e.record(Outcome::Failure, &CFG, 1000, || true), None);
        assert_eq!(
            e.record(Outcome::Failure, &CFG, 1000, || true),
            Some(11_000)
        );
        assert!(!e.is_healthy(5000));
        assert!(e.reason(5000).is_some_and(|r| r.contains("outlier")));
        assert!(e.readmit_if_due(11_000));
        assert!(e.is_healthy(11_000));
        for _ in 0..2 {
            e.record(Outcome::Failure, &CFG, 20_000, || true);
        }
        // Second ejection lasts twice as long.
        assert_eq!(
            e.record(Outcome::Failure, &CFG, 20_000, || true),
            Some(40_000)
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let e = endpoint();
        e.record(Outcome::Failure, &CFG, 0, || true);
        e.record(Outcome::Failure, &CFG, 0, || true);
        e.record(Outcome::Success, &CFG, 0, || true);
        assert_eq!(e.record(Outcome::Failure, &CFG, 0, || true), None);
    }

    #[test]
    fn no_ejection_when_the_route_is_at_its_ejection_limit() {
        let e = endpoint();
        for _ in 0..5 {
            assert_eq!(e.record(Outcome::Failure, &CFG, 0, || false), None);
        }
        assert!(e.is_healthy(1));
    }

    #[test]
    fn slow_start_ramps_linearly_from_the_minimum_to_full_weight() {
        assert_eq!(slow_start_permille(0, 10_000, 10), 100);
        assert_eq!(slow_start_permille(500, 10_000, 10), 100);
        assert_eq!(slow_start_permille(5_000, 10_000, 10), 500);
        assert_eq!(slow_start_permille(9_999, 10_000, 10), 999);
        assert_eq!(slow_start_permille(10_000, 10_000, 10), 1000);
        assert_eq!(slow_start_permille(60_000, 10_000, 10), 1000);
        assert_eq!(slow_start_permille(0, 10_000, 1), 10);
        assert_eq!(slow_start_permille(0, 10_000, 100), 1000);
        // No window: no ramp.
        assert_eq!(slow_start_permille(0, 0, 10), 1000);
    }

    #[test]
    fn an_endpoint_warms_from_when_it_starts_serving_but_not_from_the_first_table() {
        let e = endpoint();
        e.note_serving(true, 1_000, true);
        assert_eq!(e.warming_until(1_001, 30_000), None);
        assert_eq!(e.slow_start_permille(1_001, 30_000, 10), 1000);
        // Out (ejected, failing checks, not ready) and back: it ramps again.
        e.note_serving(false, 2_000, false);
        e.note_serving(true, 3_000, false);
        // Still serving at a later build: the ramp keeps its start.
        e.note_serving(true, 4_000, false);
        assert_eq!(e.warming_until(18_000, 30_000), Some(33_000));
        assert_eq!(e.slow_start_permille(18_000, 30_000, 10), 500);
        assert_eq!(e.warming_until(33_000, 30_000), None);
        assert_eq!(e.slow_start_permille(33_000, 30_000, 10), 1000);
        // A route without slow start never sees it warming.
        assert_eq!(e.warming_until(4_000, 0), None);
    }

    #[test]
    fn active_verdict_changes_are_reported_once() {
        let e = endpoint();
        assert!(e.set_active(false, "HTTP 500"));
        assert!(!e.set_active(false, "HTTP 500"));
        assert!(!e.is_healthy(0));
        assert!(e.set_active(true, ""));
        assert!(e.is_healthy(0));
    }
}
