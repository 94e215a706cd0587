//! Power of two choices: `LEAST_REQUEST` (requests in flight per unit of weight) and
//! `PEAK_EWMA` (latency estimate × load per unit of weight).

use super::load::EndpointLoad;
use super::{all_equal_positive, below, mix64};
use std::sync::Arc;

/// Power of two random choices: two distinct candidates drawn in proportion to weight, the
/// less loaded one wins. Distinct, because with few targets independent draws would often
/// compare a target with itself (10 of 16 draws for weights 3:1), wasting the load signal.
#[derive(Debug)]
pub(crate) struct TwoChoices {
    pub(super) n: u64,
    /// Cumulative weights, or empty when all weights are equal (then draws are O(1)).
    pub(super) cumulative: Box<[u64]>,
    /// Mean positive weight: load is scaled by `mean / weight`, so equal weights give the
    /// textbook cost.
    pub(super) mean: f64,
}

impl TwoChoices {
    pub(super) fn new(weights: &[u32]) -> Self {
        let n = weights.len() as u64;
        if all_equal_positive(weights) {
            return Self {
                n,
                cumulative: Box::new([]),
                mean: 1.0,
            };
        }
        let mut sum = 0u64;
        let cumulative: Box<[u64]> = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        let positive = weights.iter().filter(|&&w| w > 0).count().max(1);
        Self {
            n,
            cumulative,
            mean: sum as f64 / positive as f64,
        }
    }

    /// Weight of target `i` (1 when all are equal).
    #[inline]
    pub(super) fn weight(&self, i: usize) -> u64 {
        if self.cumulative.is_empty() {
            return 1;
        }
        let below = if i == 0 { 0 } else { self.cumulative[i - 1] };
        self.cumulative[i] - below
    }

    /// Two candidates: the first in proportion to weight, the second in proportion to weight
    /// among the others. Equal when only one target has weight.
    #[inline]
    pub(super) fn pair(&self, rand: u64) -> (usize, usize) {
        let rand2 = mix64(rand ^ 0x9e37_79b9_7f4a_7c15);
        if self.cumulative.is_empty() {
            if self.n < 2 {
                return (0, 0);
            }
            let a = below(rand, self.n);
            let mut b = below(rand2, self.n - 1);
            if b >= a {
                b += 1;
            }
            return (a as usize, b as usize);
        }
        let total = self.cumulative.last().copied().unwrap_or(0);
        let u = below(rand, total);
        let a = self.cumulative.partition_point(|&c| c <= u);
        let wa = self.weight(a);
        let rest = total - wa;
        if rest == 0 {
            return (a, a);
        }
        // Draw over the total minus a's interval, then skip over that interval.
        let mut v = below(rand2, rest);
        if v >= self.cumulative[a] - wa {
            v += wa;
        }
        (a, self.cumulative.partition_point(|&c| c <= v))
    }

    /// Fewer requests in flight per unit of weight wins; a tie keeps the first candidate,
    /// which was drawn by weight, so sequential traffic (nothing in flight) splits exactly by
    /// weight and concurrent traffic holds in-flight counts, hence throughput, ∝ weight.
    #[inline]
    pub(super) fn least_request(&self, loads: &[Arc<EndpointLoad>], rand: u64) -> usize {
        let (a, b) = self.pair(rand);
        if a == b {
            return a;
        }
        let (ka, kb) = (in_flight(loads, a), in_flight(loads, b));
        // ka / wa vs kb / wb without division (u32 × u32 fits in u64).
        if kb * self.weight(a) < ka * self.weight(b) {
            b
        } else {
            a
        }
    }

    /// Lower `rtt × (1 + in_flight × mean / weight)` wins.
    ///
    /// This is the classic `rtt × (in_flight + 1)` when weights are equal. Finagle's
    /// `rtt × (in_flight + 1) / weight` would hand a 90/10 canary 99/1 of sequential traffic
    /// (the heavy target always wins at zero load); scaling only the load term keeps latency
    /// decisive at low load and makes equal-latency targets balance in-flight ∝ weight.
    ///
    /// The second candidate wins only when clearly cheaper (by more than
    /// [`CLEARLY_CHEAPER`]); otherwise the first, drawn by weight, keeps the request. Estimates
    /// of equally fast endpoints always differ a little (noise, and the idle one has decayed
    /// more), and a strict comparison would turn those crumbs into a 50/50 split whatever the
    /// weights, and keep a recovered endpoint just behind its rival forever.
    ///
    /// A target without samples borrows its rival's estimate (both without: equal), so a new
    /// endpoint competes on load alone until its first response instead of being flooded for
    /// looking free or starved for looking slow.
    #[inline]
    pub(super) fn peak_ewma(
        &self,
        loads: &[Arc<EndpointLoad>],
        rand: u64,
        now_nanos: u64,
    ) -> usize {
        let (a, b) = self.pair(rand);
        if a == b {
            return a;
        }
        let estimate = |i: usize| loads.get(i).and_then(|l| l.estimate(now_nanos));
        let (ra, rb) = match (estimate(a), estimate(b)) {
            (Some(ra), Some(rb)) => (ra, rb),
            (Some(r), None) | (None, Some(r)) => (r, r),
            (None, None) => (1.0, 1.0),
        };
        let cost = |rtt: f64, i: usize| {
            rtt * (1.0 + in_flight(loads, i) as f64 * self.mean / self.weight(i) as f64)
        };
        if cost(rb, b) * (1.0 + CLEARLY_CHEAPER) < cost(ra, a) {
            b
        } else {
            a
        }
    }
}

/// Relative cost difference below which Peak EWMA treats two candidates as equal (see
/// [`TwoChoices::peak_ewma`]). A slow endpoint is 50× off, one more request in flight at least
/// 2× at low load: both far outside it.
pub(super) const CLEARLY_CHEAPER: f64 = 0.1;

#[inline]
pub(super) fn in_flight(loads: &[Arc<EndpointLoad>], i: usize) -> u64 {
    loads.get(i).map_or(0, |l| u64::from(l.in_flight()))
}
