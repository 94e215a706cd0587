//! Smooth weighted round robin (`ROUND_ROBIN`, `WEIGHTED_ROUND_ROBIN`): pure functions of (weights,
//! a request counter) with no I/O.
//!
//! `RoundRobin` and `WeightedRoundRobin` both honour the weights the controller computed,
//! because those weights carry the policy's split between Services (a 90/10 canary must stay
//! 90/10 whatever the algorithm); with equal weights both are plain round robin. The order is
//! nginx's *smooth* weighted round robin, precomputed once per table into a schedule so that
//! a pick is one atomic increment and one array read, shared by all worker threads. Any
//! window of `sum(weights)` consecutive picks then holds each endpoint exactly `weight` times,
//! and heavy endpoints are interleaved with light ones rather than picked in bursts.
//!
//! [`RoundRobin`] is the picker over a [`Schedule`]; one shared counter.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest schedule kept per rule; larger weight sums are scaled down to fit (at most 32 KiB
/// of `u32` per rule, so a thousand routes stay cheap).
pub(crate) const MAX_SCHEDULE: u64 = 8192;

/// A weighted cyclic order over `n` targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// No target has weight: every pick fails.
    Empty,
    /// All weights equal: `counter % n`.
    Uniform(u32),
    /// Target index for each position of the cycle.
    Weighted(Box<[u32]>),
}

impl Schedule {
    /// Builds the schedule for `weights` (one per target; targets of weight 0 are never
    /// picked and should have been left out by the caller, but are tolerated).
    pub(crate) fn new(weights: &[u32]) -> Self {
        let positive: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        let first = positive.iter().copied().find(|&w| w > 0);
        let Some(first) = first else {
            return Schedule::Empty;
        };
        if positive.iter().all(|&w| w == first) {
            return Schedule::Uniform(positive.len() as u32);
        }
        let g = positive.iter().copied().fold(0, gcd);
        let mut w: Vec<u64> = positive.iter().map(|&x| x / g).collect();
        let mut sum: u64 = w.iter().sum();
        if sum > MAX_SCHEDULE {
            // Keep every positive weight positive: draining is the controller's decision,
            // not a rounding artefact.
            for x in w.iter_mut().filter(|x| **x > 0) {
                *x = ((*x * MAX_SCHEDULE) / sum).max(1);
            }
            let g = w.iter().copied().fold(0, gcd);
            w.iter_mut().for_each(|x| *x /= g);
            sum = w.iter().sum();
        }
        let mut current = vec![0i64; w.len()];
        let total = sum as i64;
        let mut order = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for (i, wi) in w.iter().enumerate() {
                current[i] += *wi as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            order.push(best as u32);
        }
        Schedule::Weighted(order.into_boxed_slice())
    }

    /// The target for the `counter`-th request.
    #[inline]
    pub(crate) fn pick(&self, counter: usize) -> Option<usize> {
        match self {
            Schedule::Empty => None,
            Schedule::Uniform(n) => Some(counter % *n as usize),
            Schedule::Weighted(order) => Some(order[counter % order.len()] as usize),
        }
    }

    #[cfg(test)]
    /// Length of one full cycle.
    pub(crate) fn period(&self) -> usize {
        match self {
            Schedule::Empty => 0,
            Schedule::Uniform(n) => *n as usize,
            Schedule::Weighted(order) => order.len(),
        }
    }
}

pub(super) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Smooth weighted round robin over a precomputed schedule; one shared counter.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    pub(super) schedule: Schedule,
    /// Shared by all worker threads so proportions hold across them.
    pub(super) next: AtomicUsize,
}

impl RoundRobin {
    pub(super) fn new(weights: &[u32]) -> Self {
        Self {
            schedule: Schedule::new(weights),
            next: AtomicUsize::new(0),
        }
    }

    #[inline]
    pub(super) fn pick(&self) -> Option<usize> {
        self.schedule
            .pick(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(s: &Schedule, n: usize, start: usize, len: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for i in start..start + len {
            if let Some(t) = s.pick(i) {
                c[t] += 1;
            }
        }
        c
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let s = Schedule::new(&[5, 5, 5]);
        assert_eq!(s, Schedule::Uniform(3));
        let picks: Vec<_> = (0..6).filter_map(|i| s.pick(i)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn no_positive_weight_picks_nothing() {
        assert_eq!(Schedule::new(&[0, 0]).pick(3), None);
        assert_eq!(Schedule::new(&[]).pick(0), None);
    }

    #[test]
    fn smooth_order_interleaves_the_heavy_endpoint() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a.
        let s = Schedule::new(&[5, 1, 1]);
        let picks: Vec<_> = (0..7).filter_map(|i| s.pick(i)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn huge_weight_sums_are_scaled_without_dropping_anyone() {
        let s = Schedule::new(&[1_000_000, 1, 999_999]);
        assert!(s.period() as u64 <= MAX_SCHEDULE);
        let c = counts(&s, 3, 0, s.period());
        assert!(c.iter().all(|&x| x > 0), "{c:?}");
    }

    proptest! {
        #[test]
        fn every_window_of_one_period_holds_exact_proportions(
            weights in proptest::collection::vec(0u32..50, 1..8),
            start in 0usize..10_000,
        ) {
            let s = Schedule::new(&weights);
            let period = s.period();
            let c = counts(&s, weights.len(), start, period);
            let sum: u32 = weights.iter().sum();
            if sum == 0 {
                prop_assert_eq!(period, 0);
            } else {
                let g = weights.iter().copied().fold(0u32, |a, b| gcd(a as u64, b as u64) as u32);
                for (i, w) in weights.iter().enumerate() {
                    prop_assert_eq!(c[i] as u32, w / g, "weights {:?} counts {:?}", weights, c);
                }
            }
        }
    }
}
