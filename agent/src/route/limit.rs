//! Local rate limiting (`spec.rateLimit`): one token bucket per route in this agent, shared
//! by every worker, checked before anything else is done for a request of the route.
//!
//! The bucket is `governor`'s GCRA limiter: one `AtomicU64` (the theoretical arrival time)
//! updated by compare-and-swap, so workers never take a lock and a request pays one atomic
//! read-modify-write. It survives table rebuilds (health transitions rebuild every route)
//! and updates that leave the route's limit unchanged, so a config push does not refill it.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use weir_proto::v1 as pb;

/// A route's limit and its bucket.
#[derive(Debug, Clone)]
pub(crate) struct RateLimitRt {
    pub(crate) requests_per_second: u32,
    pub(crate) burst: u32,
    bucket: Arc<DefaultDirectRateLimiter>,
}

impl RateLimitRt {
    /// The limit `proto` asks for, or `None` when it sets none. The bucket of `previous` is
    /// kept when the numbers are the same.
    pub(crate) fn from_proto(proto: &pb::RateLimit, previous: Option<&Self>) -> Option<Self> {
        let rps = NonZeroU32::new(proto.requests_per_second)?;
        let burst = NonZeroU32::new(proto.burst).unwrap_or(rps);
        if let Some(old) =
            previous.filter(|o| o.requests_per_second == rps.get() && o.burst == burst.get())
        {
            return Some(old.clone());
        }
        let quota = Quota::per_second(rps).allow_burst(burst);
        Some(Self {
            requests_per_second: rps.get(),
            burst: burst.get(),
            bucket: Arc::new(RateLimiter::direct(quota)),
        })
    }

    /// Takes a token, or says how long until one is due.
    #[inline]
    pub(crate) fn check(&self) -> Result<(), Duration> {
        self.bucket
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1 (RFC 9110 §10.2.3 has no
/// fractions, and 0 would invite an immediate retry into the same empty bucket).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rps: u32, burst: u32) -> RateLimitRt {
        let proto = pb::RateLimit {
            requests_per_second: rps,
            burst,
        };
        RateLimitRt::from_proto(&proto, None).expect("a limit")
    }

    #[test]
    fn a_burst_is_admitted_then_requests_wait() {
        let l = limit(1, 3);
        for i in 0..3 {
            assert!(l.check().is_ok(), "request {i} of the burst");
        }
        let wait = l.check().expect_err("the bucket is empty");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn burst_defaults_to_the_rate_and_zero_rate_is_no_limit() {
        assert_eq!(limit(7, 0).burst, 7);
        let none = pb::RateLimit {
            requests_per_second: 0,
            burst: 5,
        };
        assert!(RateLimitRt::from_proto(&none, None).is_none());
    }

    #[test]
    fn an_unchanged_limit_keeps_its_bucket() {
        let l = limit(1, 1);
        assert!(l.check().is_ok());
        let same = pb::RateLimit {
            requests_per_second: 1,
            burst: 1,
        };
        let kept = RateLimitRt::from_proto(&same, Some(&l)).expect("a limit");
        assert!(kept.check().is_err(), "the bucket was kept, still empty");
        let other = pb::RateLimit {
            requests_per_second: 2,
            burst: 1,
        };
        let fresh = RateLimitRt::from_proto(&other, Some(&l)).expect("a limit");
        assert!(fresh.check().is_ok(), "a new limit starts full");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
