//! Endpoint pickers for every load-balancing algorithm, and the live per-endpoint load they
//! read. Pure code: no I/O, no clock, no RNG of its own — the caller passes time
//! (`now_nanos`, any fixed monotonic origin) and one random word per request, so every
//! behaviour here is unit- and property-tested with fixed seeds.
//!
//! A [`Picker`] is built once per rule and routing-table rebuild ([`Picker::build`]: alias
//! table, ring, Maglev table…) and shared by all worker threads; [`Picker::pick`] never
//! allocates or locks and costs O(1) (round robin, random, P2C with equal weights, Maglev) or
//! O(log n) (P2C with unequal weights, ring hash). [`EndpointLoad`] is the only mutable state:
//! a few atomics per endpoint that outlive tables, so load and latency history survive
//! rebuilds.
//!
//! Decisions worth knowing (each is argued where it is implemented):
//! - Weights carry the policy's split between Services (a 90/10 canary), so every algorithm
//!   honours them, load-aware ones included: P2C draws its two candidates by weight and
//!   normalises load by weight, which keeps a 3:1 split at 3:1 both when requests are
//!   sequential and under concurrency.
//! - Peak EWMA follows Finagle/Linkerd (τ = 10 s, cost ∝ latency × outstanding), with two
//!   refinements: an endpoint without samples borrows its rival's estimate instead of a fixed
//!   default, so new endpoints are probed at a fair rate but never flooded; and an estimate
//!   decays toward zero while no samples arrive, so an endpoint avoided for being slow is
//!   probed again (after ~40 s for 50 ms vs 1 ms) instead of starving forever.
//! - Consistent hashing is keyed on stable endpoint ids ([`endpoint_id`]: a hash of the
//!   address), never on indices, so removing one endpoint does not disturb the others. Keys
//!   are hashed with XXH64 ([`hash_key`]), a published, versioned algorithm: the same key maps
//!   to the same endpoint on every agent and across upgrades.
//! - Zone-aware routing ([`zone_aware_weights`]) keeps a rule's traffic in the agent's zone only
//!   while that zone holds enough healthy capacity for its share of the callers, and decides
//!   per Service so locality never changes the split between Services.

use crate::balance::Schedule;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use weir_proto::v1::Algorithm;

/// Time constant τ of the Peak-EWMA latency estimate, in nanoseconds (Finagle's and Linkerd's
/// default): a sample's weight is `1 - exp(-Δt/τ)`, so the estimate follows a lasting drop in
/// latency within tens of seconds, whatever the request rate.
pub const EWMA_DECAY_NANOS: f64 = 10e9;

/// Latency assumed for an endpoint that has answered nothing yet, when nothing better is
/// known (see [`EndpointLoad::cost`]); a typical in-cluster round trip.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// Floor of a decayed estimate: keeps `cost` proportional to the requests in flight even for
/// an endpoint idle so long that its estimate decayed to nothing.
const MIN_RTT_NANOS: f64 = 1_000.0;

/// Ring points per target of mean weight. Constant so that a target's points do not depend
/// on how many other targets there are: removing one target then moves only its own keys.
/// 1,024 points keep a target's key share within a few percent of its weight share (2:1
/// weights land within ±10 %), at 8 bytes a point (8 KiB per target).
pub const RING_POINTS_PER_TARGET: usize = 1024;

/// Most points in one ring (1 MiB). Above 128 targets each gets fewer points, so there the
/// minimal-disruption guarantee becomes approximate (a removal also re-cuts the others by
/// about 1/n of their points).
pub const RING_MAX_POINTS: usize = 1 << 17;

/// Maglev table sizes (primes, as Maglev requires). A rule uses the smallest one giving every
/// target at least [`MAGLEV_ENTRIES_PER_TARGET`] entries: 4,099 entries (16 KiB) up to 64
/// targets, against 256 KiB for Maglev's usual 65,537 — the agent must fit a thousand routes
/// in 20 MB. The price is disruption: removing one of n ≤ 20 targets moves at most 1.45/n of
/// the keys at 4,099 slots (1.22/n at 16,411, 1.15/n at 65,537, 1/n being ideal). Crossing a
/// size boundary (64, 256, 1,024, 4,096 targets) rebuilds the table at the other size and
/// remaps most keys once.
pub const MAGLEV_SIZES: [u32; 5] = [4_099, 16_411, 65_537, 262_147, 1_048_583];

/// Entries each target gets at least, before the largest size: keeps the per-target share
/// within 1/64 of its weight and the extra keys moved on a change small.
pub const MAGLEV_ENTRIES_PER_TARGET: u64 = 64;

/// Default for `min_local_percent` in [`zone_aware_weights`]: the same 70 % as the policies'
/// `minHealthyPercent` default. The local zone keeps its callers while it holds at least 70 %
/// of an even share of the capacity, i.e. while its endpoints take at most ~1.4× their even
/// load.
pub const DEFAULT_MIN_LOCAL_PERCENT: u32 = 70;

// ---------------------------------------------------------------------------------------------
// Live load of one endpoint.

/// `rtt` bits meaning "no sample yet" (a NaN pattern that arithmetic never produces).
const NO_SAMPLE: u64 = u64::MAX;

/// Live load of one endpoint, shared by all worker threads and kept across routing-table
/// rebuilds (the table looks it up by address when it is rebuilt). All atomics, on a cache
/// line of its own so that busy endpoints do not slow each other down through false sharing.
#[derive(Debug)]
#[repr(align(64))]
pub struct EndpointLoad {
    in_flight: AtomicU32,
    /// `f64` bits of the latency estimate in nanoseconds, or [`NO_SAMPLE`].
    rtt: AtomicU64,
    /// `now_nanos` of the latest latency sample.
    stamp: AtomicU64,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointLoad {
    /// An endpoint with nothing in flight and no latency sample.
    pub fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            rtt: AtomicU64::new(NO_SAMPLE),
            stamp: AtomicU64::new(0),
        }
    }

    /// Requests started and not yet ended.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A request to this endpoint starts. Prefer [`InFlight`], which cannot leak a count.
    #[inline]
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request to this endpoint ends after `latency` (for [`Picker::PeakEwma`], the time to
    /// the response head is the useful measure), observed at `now_nanos`.
    pub fn end(&self, latency: Duration, now_nanos: u64) {
        self.release();
        self.observe(latency, now_nanos);
    }

    /// A request ends without a latency sample (cancelled, or not worth measuring).
    #[inline]
    fn release(&self) {
        // Saturating: an unpaired `end` must not wrap the count to 4 billion and make the
        // endpoint look saturated forever.
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Folds one latency sample into the peak-sensitive EWMA.
    fn observe(&self, latency: Duration, now_nanos: u64) {
        let sample = latency.as_nanos() as f64;
        // `fetch_max` hands each concurrent sample its own slice of elapsed time, so the total
        // decay equals the wall-clock decay however the samples interleave.
        let previous = self.stamp.fetch_max(now_nanos, Ordering::Relaxed);
        let elapsed = now_nanos.saturating_sub(previous) as f64;
        let w = (-elapsed / EWMA_DECAY_NANOS).exp();
        // A CAS loop rather than load+store: two requests ending together must not lose a
        // peak. Contention is per endpoint and brief.
        let _ = self
            .rtt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let next = if bits == NO_SAMPLE {
                    sample
                } else {
                    let current = f64::from_bits(bits);
                    if sample > current {
                        // Peak: trust bad news at once, so a slowing endpoint sheds load
                        // within one response.
                        sample
                    } else {
                        current * w + sample * (1.0 - w)
                    }
                };
                Some(next.to_bits())
            });
    }

    /// The latency estimate in nanoseconds at `now_nanos`, or `None` before the first sample.
    /// It decays toward zero while no sample arrives (Finagle's rule), so that an endpoint
    /// avoided for being slow is eventually probed again instead of starving.
    #[inline]
    fn estimate(&self, now_nanos: u64) -> Option<f64> {
        let bits = self.rtt.load(Ordering::Relaxed);
        if bits == NO_SAMPLE {
            return None;
        }
        let age = now_nanos.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        let decayed = f64::from_bits(bits) * (-age / EWMA_DECAY_NANOS).exp();
        Some(decayed.max(MIN_RTT_NANOS))
    }

    /// The latency estimate at `now_nanos` (for load reports), or `None` before the first
    /// sample.
    pub fn latency_ewma(&self, now_nanos: u64) -> Option<Duration> {
        self.estimate(now_nanos)
            .map(|nanos| Duration::from_nanos(nanos.min(u64::MAX as f64) as u64))
    }

    /// Peak-EWMA cost at `now_nanos`: the latency estimate (in nanoseconds; [`DEFAULT_RTT`]
    /// before the first sample) × (requests in flight + 1), i.e. roughly how long a new request
    /// would wait. Weights are applied by the picker, which also replaces the default by the
    /// rival's estimate (see [`Picker::PeakEwma`]).
    pub fn cost(&self, now_nanos: u64) -> f64 {
        let rtt = self
            .estimate(now_nanos)
            .unwrap_or(DEFAULT_RTT.as_nanos() as f64);
        rtt * (f64::from(self.in_flight()) + 1.0)
    }
}

/// RAII guard for one request: [`EndpointLoad::start`] on creation, [`EndpointLoad::end`] on
/// [`InFlight::finish`]; if dropped without `finish` (request cancelled, error before the
/// response) it still decrements in-flight, without a latency sample.
#[derive(Debug)]
#[must_use = "dropping the guard ends the request at once"]
pub struct InFlight {
    /// `None` once finished, so `Drop` does not count the end twice.
    load: Option<Arc<EndpointLoad>>,
}

impl InFlight {
    /// Counts a request to the endpoint whose load is `load`.
    pub fn new(load: Arc<EndpointLoad>) -> Self {
        load.start();
        Self { load: Some(load) }
    }

    /// The request got its response head after `latency`, at `now_nanos`.
    pub fn finish(mut self, latency: Duration, now_nanos: u64) {
        if let Some(load) = self.load.take() {
            load.end(latency, now_nanos);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(load) = self.load.take() {
            load.release();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pickers.

/// A rule's endpoint picker: everything an algorithm needs, precomputed from the targets'
/// weights (and ids, for consistent hashing) when the routing table is built.
#[derive(Debug)]
pub enum Picker {
    /// No target has a positive weight: every pick fails.
    Empty,
    /// `ROUND_ROBIN` and `WEIGHTED_ROUND_ROBIN`: nginx's smooth weighted round robin
    /// ([`crate::balance`]); plain round robin when weights are equal.
    RoundRobin(RoundRobin),
    /// `RANDOM`: weighted random, O(1) through an alias table.
    Random(AliasTable),
    /// `LEAST_REQUEST`: power of two choices on requests in flight per unit of weight.
    LeastRequest(TwoChoices),
    /// `PEAK_EWMA`: power of two choices on latency estimate × load per unit of weight.
    PeakEwma(TwoChoices),
    /// `RING_HASH`: ketama-style consistent hashing ring.
    RingHash(Ring),
    /// `MAGLEV`: Google's Maglev consistent hashing table.
    Maglev(MaglevTable),
}

impl Picker {
    /// Pre-computes what `algorithm` needs for targets of `weights`. `weights[i] > 0` is
    /// expected for every target (the caller drops weight-0 endpoints); a zero weight is
    /// tolerated and never picked. `ids[i]` is target i's stable identity
    /// ([`endpoint_id`] of its address), used by the hashing algorithms so that a target keeps
    /// its keys whatever its index; a missing id is derived from the index.
    pub fn build(algorithm: Algorithm, weights: &[u32], ids: &[u64]) -> Picker {
        if weights.iter().all(|&w| w == 0) {
            return Picker::Empty;
        }
        match algorithm {
            Algorithm::RoundRobin | Algorithm::WeightedRoundRobin => {
                Picker::RoundRobin(RoundRobin::new(weights))
            }
            Algorithm::Random => Picker::Random(AliasTable::new(weights)),
            Algorithm::LeastRequest => Picker::LeastRequest(TwoChoices::new(weights)),
            Algorithm::PeakEwma => Picker::PeakEwma(TwoChoices::new(weights)),
            Algorithm::RingHash => Picker::RingHash(Ring::new(weights, ids)),
            Algorithm::Maglev => Picker::Maglev(MaglevTable::new(weights, ids)),
        }
    }

    /// The index of the target for one request, or `None` if there is none.
    ///
    /// - `hash`: the request's key hashed with [`hash_key`], for `RingHash` and `Maglev`;
    ///   without one they pick at random in proportion to the weights.
    /// - `loads[i]`: target i's [`EndpointLoad`], read by `LeastRequest` and `PeakEwma`.
    /// - `rand`: a fresh uniformly random word; the two P2C candidates and the alias coin are
    ///   all derived from it.
    /// - `now_nanos`: the clock the loads' samples were stamped with.
    #[inline]
    pub fn pick(
        &self,
        hash: Option<u64>,
        loads: &[Arc<EndpointLoad>],
        rand: u64,
        now_nanos: u64,
    ) -> Option<usize> {
        match self {
            Picker::Empty => None,
            Picker::RoundRobin(rr) => rr.pick(),
            Picker::Random(table) => Some(table.pick(rand)),
            Picker::LeastRequest(p2c) => Some(p2c.least_request(loads, rand)),
            Picker::PeakEwma(p2c) => Some(p2c.peak_ewma(loads, rand, now_nanos)),
            // A random word is a uniformly random key: it lands on each target in proportion
            // to its share of the ring / table, i.e. its weight.
            Picker::RingHash(ring) => Some(ring.pick(hash.unwrap_or(rand))),
            Picker::Maglev(table) => Some(table.pick(hash.unwrap_or(rand))),
        }
    }
}

/// Smooth weighted round robin over a precomputed schedule; one shared counter.
#[derive(Debug)]
pub struct RoundRobin {
    schedule: Schedule,
    /// Shared by all worker threads so proportions hold across them.
    next: AtomicUsize,
}

impl RoundRobin {
    fn new(weights: &[u32]) -> Self {
        Self {
            schedule: Schedule::new(weights),
            next: AtomicUsize::new(0),
        }
    }

    #[inline]
    fn pick(&self) -> Option<usize> {
        self.schedule
            .pick(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// Vose's alias table: one uniform column draw and one biased coin per pick, whatever the
/// weights. Columns are empty when all weights are equal (then a pick is a single multiply).
#[derive(Debug)]
pub struct AliasTable {
    n: u64,
    /// Column i keeps i when the coin (32 random bits) is below `accept[i]`…
    accept: Box<[u32]>,
    /// …and otherwise gives `alias[i]`.
    alias: Box<[u32]>,
}

impl AliasTable {
    fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        if all_equal_positive(weights) {
            return Self {
                n: n as u64,
                accept: Box::new([]),
                alias: Box::new([]),
            };
        }
        // Exact integer Vose: scale weights by n so that a full column holds `total`; each
        // short column is topped up from one tall column. No floating-point residue, so a
        // weight-0 target gets probability exactly 0.
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        let mut scaled: Vec<u128> = weights.iter().map(|&w| u128::from(w) * n as u128).collect();
        let mut accept = vec![u32::MAX; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < total);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            // scaled[s] < total, so the threshold fits in 32 bits.
            accept[s] = ((scaled[s] << 32) / total) as u32;
            alias[s] = l as u32;
            scaled[l] -= total - scaled[s];
            if scaled[l] < total {
                large.pop();
                small.push(l);
            }
        }
        // Whatever is left is full (exactly `total`): it keeps itself (accept = MAX, and the
        // one coin value above it falls back to its own alias, itself).
        Self {
            n: n as u64,
            accept: accept.into_boxed_slice(),
            alias: alias.into_boxed_slice(),
        }
    }

    #[inline]
    fn pick(&self, rand: u64) -> usize {
        let column = below(rand, self.n) as usize;
        if self.accept.is_empty() {
            return column;
        }
        // The coin comes from a remix, not from `rand`'s low bits, which `below` barely uses
        // but which are not independent of the column for every n.
        let coin = (mix64(rand) >> 32) as u32;
        if coin < self.accept[column] {
            column
        } else {
            self.alias[column] as usize
        }
    }
}

/// Power of two random choices: two distinct candidates drawn in proportion to weight, the
/// less loaded one wins. Distinct, because with few targets independent draws would often
/// compare a target with itself (10 of 16 draws for weights 3:1), wasting the load signal.
#[derive(Debug)]
pub struct TwoChoices {
    n: u64,
    /// Cumulative weights, or empty when all weights are equal (then draws are O(1)).
    cumulative: Box<[u64]>,
    /// Mean positive weight: load is scaled by `mean / weight`, so equal weights give the
    /// textbook cost.
    mean: f64,
}

impl TwoChoices {
    fn new(weights: &[u32]) -> Self {
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
    fn weight(&self, i: usize) -> u64 {
        if self.cumulative.is_empty() {
            return 1;
        }
        let below = if i == 0 { 0 } else { self.cumulative[i - 1] };
        self.cumulative[i] - below
    }

    /// Two candidates: the first in proportion to weight, the second in proportion to weight
    /// among the others. Equal when only one target has weight.
    #[inline]
    fn pair(&self, rand: u64) -> (usize, usize) {
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
    fn least_request(&self, loads: &[Arc<EndpointLoad>], rand: u64) -> usize {
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
    fn peak_ewma(&self, loads: &[Arc<EndpointLoad>], rand: u64, now_nanos: u64) -> usize {
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
const CLEARLY_CHEAPER: f64 = 0.1;

#[inline]
fn in_flight(loads: &[Arc<EndpointLoad>], i: usize) -> u64 {
    loads.get(i).map_or(0, |l| u64::from(l.in_flight()))
}

/// Ketama-style consistent hashing ring: each target owns points in proportion to its weight;
/// a key belongs to the first point at or after it (wrapping).
///
/// Points are 32-bit (the top half of the key hash is plenty to place keys and halves the
/// memory). A target's k-th point depends only on its id and k, and its point count only on
/// its weight relative to the mean, so with equal weights removing a target leaves every other
/// point, hence every other key, exactly where it was.
#[derive(Debug)]
pub struct Ring {
    /// Sorted.
    points: Box<[u32]>,
    /// Target index owning `points[i]`.
    owners: Box<[u32]>,
}

impl Ring {
    fn new(weights: &[u32], ids: &[u64]) -> Self {
        let positive = weights.iter().filter(|&&w| w > 0).count().max(1);
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum::<u128>().max(1);
        let per_target = (RING_MAX_POINTS / positive).clamp(1, RING_POINTS_PER_TARGET) as u128;
        // points_i = per_target × weight_i / mean weight, rounded, at least 1.
        let counts: Vec<u64> = weights
            .iter()
            .map(|&w| {
                if w == 0 {
                    return 0;
                }
                let scaled = per_target * positive as u128 * u128::from(w);
                ((2 * scaled + total) / (2 * total)).max(1) as u64
            })
            .collect();
        let mut entries: Vec<(u32, u64, u32)> =
            Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        for (i, &count) in counts.iter().enumerate() {
            let id = target_id(ids, i);
            for k in 0..count {
                let point = (mix64(id ^ mix64(k)) >> 32) as u32;
                entries.push((point, id, i as u32));
            }
        }
        // Ties (rare 32-bit collisions) are ordered by id, not index, so they too resolve the
        // same way whichever other targets exist.
        entries.sort_unstable();
        let (points, owners): (Vec<u32>, Vec<u32>) =
            entries.into_iter().map(|(p, _, i)| (p, i)).unzip();
        Self {
            points: points.into_boxed_slice(),
            owners: owners.into_boxed_slice(),
        }
    }

    #[inline]
    fn pick(&self, hash: u64) -> usize {
        let key = (hash >> 32) as u32;
        let i = self.points.partition_point(|&p| p < key);
        let i = if i == self.points.len() { 0 } else { i };
        self.owners.get(i).map_or(0, |&o| o as usize)
    }

    /// Number of points (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring has no point (never, once built from a positive weight).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// Maglev lookup table (Eisenbud et al., NSDI 2016): each target walks its own permutation of
/// the table's slots (offset and skip from its id) and claims the next free slot when it is
/// its turn; a target takes turns in proportion to its weight (Envoy's weighted variant).
/// Lookup is one modulo and one read. Targets take turns in id order, so the table does not
/// depend on the order the targets were listed in.
#[derive(Debug)]
pub struct MaglevTable {
    /// Target index for each slot; the length is one of [`MAGLEV_SIZES`].
    table: Box<[u32]>,
}

impl MaglevTable {
    fn new(weights: &[u32], ids: &[u64]) -> Self {
        const FREE: u32 = u32::MAX;
        struct Walker {
            index: u32,
            weight: u64,
            /// Turns taken so far × the largest weight: the walker takes a turn in round r
            /// when r × weight has caught up with it.
            owed: u64,
            slot: u64,
            skip: u64,
        }
        let positive = weights.iter().filter(|&&w| w > 0).count() as u64;
        let size = maglev_size(positive);
        let m = u64::from(size);
        let mut walkers: Vec<(u64, Walker)> = weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0)
            .map(|(i, &w)| {
                let id = target_id(ids, i);
                let walker = Walker {
                    index: i as u32,
                    weight: u64::from(w),
                    owed: 0,
                    slot: mix64(id ^ 0x6d61_676c_6576_3031) % m,
                    // In [1, m-1]: coprime with the prime m, so the walk visits every slot.
                    skip: mix64(id ^ 0x6d61_676c_6576_3032) % (m - 1) + 1,
                };
                (id, walker)
            })
            .collect();
        walkers.sort_by_key(|(id, w)| (*id, w.index));
        let max_weight = walkers.iter().map(|(_, w)| w.weight).max().unwrap_or(1);
        let mut table = vec![FREE; size as usize];
        let mut filled = 0u64;
        // Every round the heaviest walkers take a turn, so this fills the table in at most m
        // rounds; each walk ends because a free slot remains and the walk visits all slots.
        let mut round = 0u64;
        'fill: while !walkers.is_empty() {
            for (_, w) in walkers.iter_mut() {
                if round * w.weight < w.owed {
                    continue;
                }
                w.owed += max_weight;
                loop {
                    let slot = w.slot as usize;
                    w.slot = (w.slot + w.skip) % m;
                    if table[slot] == FREE {
                        table[slot] = w.index;
                        break;
                    }
                }
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
            round += 1;
        }
        Self {
            table: table.into_boxed_slice(),
        }
    }

    #[inline]
    fn pick(&self, hash: u64) -> usize {
        let len = self.table.len() as u64;
        self.table
            .get((hash % len.max(1)) as usize)
            .map_or(0, |&t| t as usize)
    }

    /// Number of slots (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table has no slot (never: sizes are fixed primes).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The table size for `targets` positive-weight targets.
fn maglev_size(targets: u64) -> u32 {
    let wanted = targets.saturating_mul(MAGLEV_ENTRIES_PER_TARGET);
    MAGLEV_SIZES
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= wanted)
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1])
}

fn target_id(ids: &[u64], i: usize) -> u64 {
    ids.get(i)
        .copied()
        .unwrap_or_else(|| mix64(i as u64 ^ 0x7461_7267_6574_0000))
}

fn all_equal_positive(weights: &[u32]) -> bool {
    weights.first().is_some_and(|&w| w > 0) && weights.iter().all(|&w| w == weights[0])
}

/// A uniform integer in `[0, n)` from a uniform word (Lemire's multiply-shift: no division,
/// bias below n / 2⁶⁴).
#[inline]
fn below(rand: u64, n: u64) -> u64 {
    ((u128::from(rand) * u128::from(n)) >> 64) as u64
}

/// SplitMix64's finaliser: a fixed bijection with full avalanche, to derive independent-looking
/// words from one random word and to spread ids over ring points and Maglev permutations.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Stable hashing.

/// Hash of a consistent-hashing key (header value, cookie value or path bytes): XXH64 with
/// seed 0, byte-exact with the reference implementation (the same function Envoy's hash
/// policies use). It must be identical on every agent and across versions, which rules out
/// std's randomly seeded `RandomState`; no xxhash crate is in the agent's dependency tree, so
/// it is written here (a page of code) and pinned by the published test vectors.
pub fn hash_key(bytes: &[u8]) -> u64 {
    const P1: u64 = 0x9e37_79b1_85eb_ca87;
    const P2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    const P3: u64 = 0x1656_67b1_9e37_79f9;
    const P4: u64 = 0x85eb_ca77_c2b2_ae63;
    const P5: u64 = 0x27d4_eb2f_1656_67c5;
    #[inline]
    fn round(acc: u64, lane: u64) -> u64 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    #[inline]
    fn merge(acc: u64, lane: u64) -> u64 {
        (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
    }
    #[inline]
    fn le64(b: &[u8]) -> u64 {
        b.first_chunk::<8>().map_or(0, |a| u64::from_le_bytes(*a))
    }
    #[inline]
    fn le32(b: &[u8]) -> u64 {
        b.first_chunk::<4>()
            .map_or(0, |a| u64::from(u32::from_le_bytes(*a)))
    }

    let mut h;
    let mut stripes = bytes.chunks_exact(32);
    if bytes.len() >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        for stripe in &mut stripes {
            for (lane, word) in v.iter_mut().zip(stripe.chunks_exact(8)) {
                *lane = round(*lane, le64(word));
            }
        }
        h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
    } else {
        h = P5;
    }
    h = h.wrapping_add(bytes.len() as u64);
    let tail = stripes.remainder();
    let mut words = tail.chunks_exact(8);
    for word in &mut words {
        h ^= round(0, le64(word));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    let mut halves = words.remainder().chunks_exact(4);
    for half in &mut halves {
        h ^= le32(half).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
    }
    for &byte in halves.remainder() {
        h ^= u64::from(byte).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// Stable identity of an endpoint for consistent hashing: [`hash_key`] of its address as
/// the controller sends it (`ip:port`, IPv6 in brackets), so every agent agrees.
pub fn endpoint_id(addr: &str) -> u64 {
    hash_key(addr.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Locality.

/// Where one target is, for [`zone_aware_weights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The weight the picker would use: already 0 for unhealthy, ejected or drained targets,
    /// which hold no capacity.
    pub weight: u32,
    /// The target's `topology.kubernetes.io/zone`; empty when unknown (never local, and not
    /// counted as a zone).
    pub zone: &'a str,
    /// The target's Service (e.g. the backend's index in the rule): locality is decided and
    /// applied per group, and each group keeps its total share, so a 90/10 split between
    /// Services holds in every zone.
    pub group: u32,
}

/// Zone-aware weights (Envoy's zone-aware routing, simplified to all-or-nothing).
///
/// Callers are assumed spread over zones like the capacity is: each zone's agents send about
/// 1/Z of the traffic, Z being the number of zones holding the group's capacity. So within
/// each group, if the local targets (zone == `my_zone`) hold at least `min_local_percent` % of
/// that even share — `local / total ≥ min_local_percent/100 × 1/Z` — the whole group's weight
/// moves to its local targets (in their own proportions) and its other targets get 0;
/// otherwise the group keeps its weights and spreads over all zones. Unhealthy targets
/// carrying weight 0, a zone losing endpoints loses the preference once it falls below the
/// threshold. An empty `my_zone` disables locality.
///
/// Returns one weight per target, in the same order. Weights are rescaled (and reduced by
/// their gcd) so that each group's share of the total is unchanged.
pub fn zone_aware_weights(
    targets: &[Placement<'_>],
    my_zone: &str,
    min_local_percent: u32,
) -> Vec<u32> {
    let unchanged = || targets.iter().map(|t| t.weight).collect::<Vec<u32>>();
    if my_zone.is_empty() {
        return unchanged();
    }
    let mut groups: Vec<u32> = targets
        .iter()
        .filter(|t| t.weight > 0)
        .map(|t| t.group)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    // Per group: (total, local, stays local?).
    let decisions: Vec<(u128, u128, bool)> = groups
        .iter()
        .map(|&g| {
            let members = || targets.iter().filter(move |t| t.group == g && t.weight > 0);
            let total: u128 = members().map(|t| u128::from(t.weight)).sum();
            let local: u128 = members()
                .filter(|t| t.zone == my_zone)
                .map(|t| u128::from(t.weight))
                .sum();
            let mut zones: Vec<&str> = members()
                .map(|t| t.zone)
                .filter(|z| !z.is_empty())
                .collect();
            zones.sort_unstable();
            zones.dedup();
            let z = zones.len() as u128;
            let keep_local = local > 0
                && local < total
                && local * z * 100 >= total * u128::from(min_local_percent);
            (total, local, keep_local)
        })
        .collect();
    if !decisions.iter().any(|d| d.2) {
        return unchanged();
    }
    // Fixed point: a localized group's local weights grow by total/local; 2^16 keeps the
    // rounding error below 0.002 % before the gcd reduction makes the numbers small again.
    const SCALE: u128 = 1 << 16;
    let scaled: Vec<u128> = targets
        .iter()
        .map(|t| {
            let w = u128::from(t.weight);
            let Ok(g) = groups.binary_search(&t.group) else {
                return 0;
            };
            match decisions.get(g) {
                _ if w == 0 => 0,
                Some(&(total, local, true)) if t.zone == my_zone => {
                    ((w * total * SCALE + local / 2) / local).max(1)
                }
                Some(&(_, _, true)) => 0,
                _ => w * SCALE,
            }
        })
        .collect();
    let divisor = scaled.iter().copied().fold(0u128, gcd128).max(1);
    let max = scaled.iter().copied().max().unwrap_or(0) / divisor;
    scaled
        .iter()
        .map(|&w| {
            let w = w / divisor;
            if w == 0 {
                0
            } else if max > u128::from(u32::MAX) {
                // Still positive after scaling down: locality decides who is drained, rounding
                // must not.
                ((w * u128::from(u32::MAX)) / max).max(1) as u32
            } else {
                w as u32
            }
        })
        .collect()
}

/// [`zone_aware_weights`] for callers that only know whether each target is local: all
/// non-local targets are taken as one other zone and as one group. With more than two zones
/// this is conservative (traffic stays local only while the local zone holds
/// `min_local_percent`/2 % of all the weight), and it cannot keep a Service split intact when
/// a Service has no local endpoint; prefer [`zone_aware_weights`].
pub fn locality_weights(weights: &[u32], local: &[bool], min_local_percent: u32) -> Vec<u32> {
    let targets: Vec<Placement<'_>> = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Placement {
            weight,
            zone: if local.get(i).copied().unwrap_or(false) {
                "local"
            } else {
                "other"
            },
            group: 0,
        })
        .collect();
    zone_aware_weights(&targets, "local", min_local_percent)
}

fn gcd128(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd128(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const MS: u64 = 1_000_000;
    /// Simulated clocks start here, well after the loads' zero stamp.
    const T0: u64 = 1_000 * MS;

    fn loads(n: usize) -> Vec<Arc<EndpointLoad>> {
        (0..n).map(|_| Arc::new(EndpointLoad::new())).collect()
    }

    fn ids(n: usize) -> Vec<u64> {
        (0..n).map(|i| endpoint_id(&addr(i))).collect()
    }

    fn addr(i: usize) -> String {
        format!("10.1.{}.{}:8080", i / 250, i % 250)
    }

    /// Share of `picks` that went to each of `n` targets.
    fn shares(picks: &[usize], n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        for &p in picks {
            c[p] += 1;
        }
        c.iter().map(|&x| x as f64 / picks.len() as f64).collect()
    }

    /// `count` picks with no load and no key, one random word each.
    fn draw(picker: &Picker, n: usize, count: usize, seed: u64) -> Vec<usize> {
        let loads = loads(n);
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..count)
            .map(|i| {
                picker
                    .pick(None, &loads, rng.random(), T0 + i as u64)
                    .expect("a target")
            })
            .collect()
    }

    /// Requests arriving every `gap` ns, target t answering after `latency(t, now)` ns; the
    /// loads see starts, ends and latencies as the proxy would report them.
    fn simulate(
        picker: &Picker,
        loads: &[Arc<EndpointLoad>],
        requests: usize,
        gap: u64,
        latency: impl Fn(usize, u64) -> u64,
        seed: u64,
    ) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut pending: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
        let mut chosen = Vec::with_capacity(requests);
        for i in 0..requests {
            let now = T0 + i as u64 * gap;
            while let Some(&Reverse((end, t, took))) = pending.peek() {
                if end > now {
                    break;
                }
                pending.pop();
                loads[t].end(Duration::from_nanos(took), end);
            }
            let t = picker
                .pick(None, loads, rng.random(), now)
                .expect("a target");
            loads[t].start();
            let took = latency(t, now);
            pending.push(Reverse((now + took, t, took)));
            chosen.push(t);
        }
        chosen
    }

    const ALL: [Algorithm; 7] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastRequest,
        Algorithm::PeakEwma,
        Algorithm::RingHash,
        Algorithm::Maglev,
        Algorithm::Random,
    ];

    // --- hashing -------------------------------------------------------------------------

    #[test]
    fn hash_key_matches_the_published_xxh64_vectors() {
        assert_eq!(hash_key(b""), 0xef46_db37_51d8_e999);
        assert_eq!(hash_key(b"a"), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(hash_key(b"abc"), 0x44bc_2cf5_ad77_0999);
        assert_eq!(hash_key(b"abcd"), 0xde03_27b0_d25d_92cc);
        assert_eq!(hash_key(b"Hello, World!"), 0xc49a_acf8_080f_e47f);
        // Long inputs exercise the 32-byte stripes and every tail length.
        assert_eq!(hash_key(&b"abc".repeat(999)), 0x933e_b856_1397_6467);
        assert_eq!(hash_key(&b"abcd".repeat(1000)), 0x2052_19d3_8e88_98bc);
    }

    #[test]
    fn endpoint_id_is_the_key_hash_of_the_address() {
        assert_eq!(endpoint_id("10.0.0.1:80"), hash_key(b"10.0.0.1:80"));
        assert_ne!(endpoint_id("10.0.0.1:80"), endpoint_id("10.0.0.2:80"));
    }

    // --- load and latency ----------------------------------------------------------------

    #[test]
    fn in_flight_guard_decrements_when_dropped_without_finishing() {
        let load = Arc::new(EndpointLoad::new());
        let guard = InFlight::new(load.clone());
        let other = InFlight::new(load.clone());
        assert_eq!(load.in_flight(), 2);
        drop(guard);
        assert_eq!(load.in_flight(), 1);
        assert_eq!(
            load.latency_ewma(T0),
            None,
            "a cancelled request is no sample"
        );
        other.finish(Duration::from_millis(3), T0);
        assert_eq!(load.in_flight(), 0);
        assert_eq!(load.latency_ewma(T0), Some(Duration::from_millis(3)));
    }

    #[test]
    fn ending_more_requests_than_started_never_underflows() {
        let load = EndpointLoad::new();
        load.end(Duration::from_millis(1), T0);
        load.end(Duration::from_millis(1), T0);
        assert_eq!(load.in_flight(), 0);
        load.start();
        assert_eq!(load.in_flight(), 1);
    }

    #[test]
    fn latency_estimate_jumps_to_a_higher_sample_at_once() {
        let load = EndpointLoad::new();
        load.end(Duration::from_millis(1), T0);
        load.end(Duration::from_millis(50), T0 + 1);
        assert_eq!(load.latency_ewma(T0 + 1), Some(Duration::from_millis(50)));
    }

    #[test]
    fn latency_estimate_follows_lower_samples_with_a_ten_second_time_constant() {
        let load = EndpointLoad::new();
        load.end(Duration::from_millis(50), T0);
        // One τ later a 1 ms sample weighs 1 - 1/e.
        let t = T0 + 10_000 * MS;
        load.end(Duration::from_millis(1), t);
        let expected = 50.0 / std::f64::consts::E + 1.0 * (1.0 - 1.0 / std::f64::consts::E);
        let got = load.latency_ewma(t).expect("sampled").as_secs_f64() * 1e3;
        assert!(
            (got - expected).abs() < 1e-6,
            "{got} ms, expected {expected} ms"
        );
    }

    #[test]
    fn frequent_low_samples_move_the_estimate_by_elapsed_time_not_by_count() {
        // 10,000 samples of 1 ms in 1 s move a 50 ms estimate as one sample 1 s later would.
        let many = EndpointLoad::new();
        let one = EndpointLoad::new();
        many.end(Duration::from_millis(50), T0);
        one.end(Duration::from_millis(50), T0);
        for i in 1..=10_000 {
            many.end(Duration::from_millis(1), T0 + i * 100_000);
        }
        one.end(Duration::from_millis(1), T0 + 1_000 * MS);
        let (a, b) = (
            many.latency_ewma(T0 + 1_000 * MS).expect("sampled"),
            one.latency_ewma(T0 + 1_000 * MS).expect("sampled"),
        );
        let diff = (a.as_secs_f64() - b.as_secs_f64()).abs();
        assert!(diff < 1e-6, "{a:?} vs {b:?}");
    }

    #[test]
    fn an_idle_estimate_decays_so_a_slow_endpoint_is_tried_again_later() {
        let load = EndpointLoad::new();
        load.end(Duration::from_millis(50), T0);
        let fresh = load.cost(T0);
        let later = load.cost(T0 + 40_000 * MS);
        assert!(later < fresh / 50.0, "{fresh} then {later}");
    }

    #[test]
    fn cost_is_the_estimate_times_requests_in_flight_plus_one() {
        let load = EndpointLoad::new();
        assert_eq!(load.cost(T0), DEFAULT_RTT.as_nanos() as f64);
        load.end(Duration::from_millis(4), T0);
        load.start();
        load.start();
        assert_eq!(load.cost(T0), 3.0 * 4e6);
    }

    // --- every algorithm -------------------------------------------------------------------

    #[test]
    fn every_algorithm_picks_nothing_without_a_positive_weight() {
        for algorithm in ALL {
            for weights in [&[][..], &[0, 0][..]] {
                let p = Picker::build(algorithm, weights, &ids(weights.len()));
                assert!(matches!(p, Picker::Empty), "{algorithm:?}");
                assert_eq!(p.pick(Some(7), &loads(2), 42, T0), None);
            }
        }
    }

    #[test]
    fn every_algorithm_picks_the_only_target() {
        for algorithm in ALL {
            let p = Picker::build(algorithm, &[3], &ids(1));
            let picks = draw(&p, 1, 100, 1);
            assert!(picks.iter().all(|&i| i == 0), "{algorithm:?}");
            assert_eq!(p.pick(Some(99), &loads(1), 5, T0), Some(0));
        }
    }

    #[test]
    fn every_algorithm_skips_zero_weight_targets() {
        for algorithm in ALL {
            let p = Picker::build(algorithm, &[0, 2, 0, 1], &ids(4));
            for (i, hash) in [None, Some(1), Some(u64::MAX)].into_iter().enumerate() {
                let loads = loads(4);
                let mut rng = SmallRng::seed_from_u64(i as u64);
                for _ in 0..2_000 {
                    let t = p
                        .pick(hash.or(Some(rng.random())), &loads, rng.random(), T0)
                        .expect("a target");
                    assert!(t == 1 || t == 3, "{algorithm:?} picked {t}");
                }
            }
        }
    }

    #[test]
    fn round_robin_keeps_the_smooth_weighted_order() {
        let p = Picker::build(Algorithm::RoundRobin, &[5, 1, 1], &ids(3));
        let picks: Vec<_> = (0..7).filter_map(|_| p.pick(None, &[], 0, T0)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn random_picks_follow_the_weights() {
        let p = Picker::build(Algorithm::Random, &[5, 3, 1, 1], &ids(4));
        let s = shares(&draw(&p, 4, 20_000, 7), 4);
        for (got, want) in s.iter().zip([0.5, 0.3, 0.1, 0.1]) {
            assert!((got - want).abs() < 0.015, "{s:?}");
        }
        let uniform = Picker::build(Algorithm::Random, &[4, 4, 4], &ids(3));
        let s = shares(&draw(&uniform, 3, 20_000, 8), 3);
        assert!(s.iter().all(|x| (x - 1.0 / 3.0).abs() < 0.015), "{s:?}");
    }

    // --- least request ---------------------------------------------------------------------

    #[test]
    fn least_request_prefers_the_endpoint_with_fewer_requests_in_flight() {
        let p = Picker::build(Algorithm::LeastRequest, &[1, 1], &ids(2));
        let loads = loads(2);
        for _ in 0..5 {
            loads[0].start();
        }
        let mut rng = SmallRng::seed_from_u64(3);
        for _ in 0..1_000 {
            assert_eq!(p.pick(None, &loads, rng.random(), T0), Some(1));
        }
    }

    #[test]
    fn least_request_never_picks_the_busiest_of_several_endpoints() {
        let p = Picker::build(Algorithm::LeastRequest, &[1, 1, 1, 1], &ids(4));
        let loads = loads(4);
        for (t, busy) in [(0, 3), (1, 9), (2, 0), (3, 3)] {
            for _ in 0..busy {
                loads[t].start();
            }
        }
        let mut rng = SmallRng::seed_from_u64(4);
        let picks: Vec<usize> = (0..5_000)
            .filter_map(|_| p.pick(None, &loads, rng.random(), T0))
            .collect();
        let s = shares(&picks, 4);
        assert_eq!(s[1], 0.0, "{s:?}");
        // The idle one wins every pair it is in: 3 of the 6 pairs.
        assert!((s[2] - 0.5).abs() < 0.03, "{s:?}");
    }

    #[test]
    fn least_request_splits_sequential_traffic_by_weight() {
        let p = Picker::build(Algorithm::LeastRequest, &[3, 1], &ids(2));
        let s = shares(&draw(&p, 2, 10_000, 5), 2);
        assert!((s[0] - 0.75).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn least_request_splits_concurrent_equal_latency_traffic_by_weight() {
        let p = Picker::build(Algorithm::LeastRequest, &[3, 1], &ids(2));
        let loads = loads(2);
        // 10k requests/s of 10 ms each: ~100 in flight.
        let picks = simulate(&p, &loads, 10_000, MS / 10, |_, _| 10 * MS, 6);
        let s = shares(&picks, 2);
        assert!((s[0] - 0.75).abs() < 0.03, "{s:?}");
    }

    #[test]
    fn two_candidates_are_distinct_and_drawn_by_weight() {
        let p = TwoChoices::new(&[6, 3, 1]);
        let mut first = [0usize; 3];
        let mut rng = SmallRng::seed_from_u64(9);
        for _ in 0..30_000 {
            let (a, b) = p.pair(rng.random());
            assert_ne!(a, b);
            first[a] += 1;
        }
        let s: Vec<f64> = first.iter().map(|&c| c as f64 / 30_000.0).collect();
        for (got, want) in s.iter().zip([0.6, 0.3, 0.1]) {
            assert!((got - want).abs() < 0.015, "{s:?}");
        }
    }

    // --- peak EWMA -------------------------------------------------------------------------

    #[test]
    fn peak_ewma_sends_little_to_a_slow_endpoint() {
        let p = Picker::build(Algorithm::PeakEwma, &[1, 1], &ids(2));
        let loads = loads(2);
        let latency = |t: usize, _| if t == 0 { 50 * MS } else { MS };
        let picks = simulate(&p, &loads, 10_000, MS / 10, latency, 10);
        let slow = shares(&picks, 2)[0];
        assert!(slow < 0.02, "slow endpoint got {slow}");
    }

    #[test]
    fn peak_ewma_sends_little_to_a_slow_endpoint_among_several() {
        let p = Picker::build(Algorithm::PeakEwma, &[1; 5], &ids(5));
        let loads = loads(5);
        let latency = |t: usize, _| if t == 2 { 50 * MS } else { MS };
        let picks = simulate(&p, &loads, 20_000, MS / 10, latency, 11);
        let s = shares(&picks, 5);
        assert!(s[2] < 0.02, "{s:?}");
    }

    #[test]
    fn peak_ewma_probes_a_recovered_endpoint_again() {
        let p = Picker::build(Algorithm::PeakEwma, &[1, 1], &ids(2));
        let loads = loads(2);
        // Target 0 answers in 50 ms for the first 10 s, then in 1 ms like target 1.
        let latency = |t: usize, now: u64| {
            if t == 0 && now < T0 + 10_000 * MS {
                50 * MS
            } else {
                MS
            }
        };
        let picks = simulate(&p, &loads, 120_000, MS, latency, 12);
        let early = shares(&picks[1_000..10_000], 2)[0];
        let late = shares(&picks[90_000..], 2)[0];
        assert!(early < 0.02, "while slow: {early}");
        assert!(late > 0.3, "after recovering: {late}");
    }

    #[test]
    fn peak_ewma_splits_equal_latency_traffic_by_weight() {
        let p = Picker::build(Algorithm::PeakEwma, &[3, 1], &ids(2));
        // Sequential: nothing in flight at each pick.
        let picks = simulate(&p, &loads(2), 10_000, 2 * MS, |_, _| MS, 13);
        let s = shares(&picks, 2);
        assert!((s[0] - 0.75).abs() < 0.02, "sequential {s:?}");
        // Concurrent: ~100 in flight.
        let picks = simulate(&p, &loads(2), 10_000, MS / 10, |_, _| 10 * MS, 14);
        let s = shares(&picks, 2);
        assert!((s[0] - 0.75).abs() < 0.03, "concurrent {s:?}");
    }

    #[test]
    fn a_new_endpoint_competes_on_load_until_its_first_answer() {
        let p = Picker::build(Algorithm::PeakEwma, &[1, 1], &ids(2));
        let loads = loads(2);
        loads[0].end(Duration::from_millis(20), T0);
        for _ in 0..3 {
            loads[0].start();
        }
        let mut rng = SmallRng::seed_from_u64(15);
        // Not flooded: it takes requests only until it has as many in flight as its rival.
        let mut taken = 0;
        for _ in 0..100 {
            let t = p.pick(None, &loads, rng.random(), T0).expect("a target");
            loads[t].start();
            if t == 1 {
                taken += 1;
            }
        }
        assert!(
            (45..=55).contains(&taken),
            "new endpoint took {taken} of 100"
        );
    }

    // --- consistent hashing ----------------------------------------------------------------

    const HASHING: [Algorithm; 2] = [Algorithm::RingHash, Algorithm::Maglev];

    fn keys(count: usize) -> Vec<u64> {
        (0..count)
            .map(|k| hash_key(format!("user-{k}").as_bytes()))
            .collect()
    }

    /// The address each key maps to, for targets `addrs` of equal weight.
    fn owners(
        algorithm: Algorithm,
        addrs: &[String],
        weights: &[u32],
        keys: &[u64],
    ) -> Vec<String> {
        let ids: Vec<u64> = addrs.iter().map(|a| endpoint_id(a)).collect();
        let p = Picker::build(algorithm, weights, &ids);
        keys.iter()
            .map(|&k| {
                let i = p.pick(Some(k), &[], 0, T0).expect("a target");
                addrs[i].clone()
            })
            .collect()
    }

    #[test]
    fn a_key_maps_to_the_same_endpoint_whatever_the_order_of_targets() {
        let keys = keys(10_000);
        for algorithm in HASHING {
            let addrs: Vec<String> = (0..8).map(addr).collect();
            let mut reversed = addrs.clone();
            reversed.reverse();
            let weights = [1; 8];
            let a = owners(algorithm, &addrs, &weights, &keys);
            assert_eq!(
                a,
                owners(algorithm, &addrs, &weights, &keys),
                "{algorithm:?}"
            );
            assert_eq!(
                a,
                owners(algorithm, &reversed, &weights, &keys),
                "{algorithm:?}"
            );
        }
    }

    /// Fraction of keys that moved, and fraction of the keys of the other (unchanged) targets
    /// that stayed where they were.
    fn disruption(before: &[String], after: &[String], changed: &str) -> (f64, f64) {
        let moved = before.iter().zip(after).filter(|(b, a)| b != a).count();
        let others: Vec<_> = before
            .iter()
            .zip(after)
            .filter(|(b, _)| *b != changed)
            .collect();
        let stayed = others.iter().filter(|(b, a)| b == a).count();
        (
            moved as f64 / before.len() as f64,
            stayed as f64 / others.len().max(1) as f64,
        )
    }

    #[test]
    fn removing_one_of_n_endpoints_moves_only_about_one_nth_of_keys() {
        let keys = keys(10_000);
        for algorithm in HASHING {
            for n in 5..=20 {
                let addrs: Vec<String> = (0..n).map(addr).collect();
                let before = owners(algorithm, &addrs, &vec![1; n], &keys);
                for removed in [0, n / 2, n - 1] {
                    let mut rest = addrs.clone();
                    let gone = rest.remove(removed);
                    let after = owners(algorithm, &rest, &vec![1; n - 1], &keys);
                    let (moved, stayed) = disruption(&before, &after, &gone);
                    // Measured over every removal for n = 5..=20: at most 1.09/n for the ring
                    // (its arcs are uneven, not its moves), 1.45/n for Maglev at 4,099 slots
                    // (1.22/n at 16,411, 1.15/n at 65,537) with ≥ 97.5 % of other keys kept.
                    let bound = if algorithm == Algorithm::RingHash {
                        1.25
                    } else {
                        1.6
                    };
                    assert!(
                        moved <= bound / n as f64,
                        "{algorithm:?} n={n}: {moved} of keys moved"
                    );
                    let floor = if algorithm == Algorithm::RingHash {
                        1.0
                    } else {
                        0.97
                    };
                    assert!(
                        stayed >= floor,
                        "{algorithm:?} n={n}: only {stayed} of surviving keys stayed"
                    );
                }
            }
        }
    }

    #[test]
    fn adding_an_endpoint_takes_only_its_share_of_keys() {
        let keys = keys(10_000);
        for algorithm in HASHING {
            for n in [4, 9, 15] {
                let addrs: Vec<String> = (0..=n).map(addr).collect();
                let before = owners(algorithm, &addrs[..n], &vec![1; n], &keys);
                let after = owners(algorithm, &addrs, &vec![1; n + 1], &keys);
                let (moved, _) = disruption(&before, &after, &addrs[n]);
                let bound = if algorithm == Algorithm::RingHash {
                    1.25
                } else {
                    1.6
                };
                assert!(
                    moved <= bound / (n + 1) as f64,
                    "{algorithm:?} n={n}: {moved}"
                );
                if algorithm == Algorithm::RingHash {
                    let to_new = before
                        .iter()
                        .zip(&after)
                        .filter(|(b, a)| b != a)
                        .all(|(_, a)| *a == addrs[n]);
                    assert!(to_new, "keys moved between old endpoints");
                }
            }
        }
    }

    #[test]
    fn consistent_hashing_gives_keys_in_proportion_to_weight() {
        let keys = keys(10_000);
        for algorithm in HASHING {
            let addrs: Vec<String> = (0..2).map(addr).collect();
            let got = owners(algorithm, &addrs, &[2, 1], &keys);
            let heavy = got.iter().filter(|a| **a == addrs[0]).count() as f64 / 10_000.0;
            assert!(
                (heavy / (2.0 / 3.0) - 1.0).abs() < 0.1 && ((1.0 - heavy) * 3.0 - 1.0).abs() < 0.1,
                "{algorithm:?}: heavy target has {heavy} of keys"
            );
            let addrs: Vec<String> = (0..6).map(addr).collect();
            let got = owners(algorithm, &addrs, &[2, 1, 2, 1, 2, 1], &keys);
            for (i, a) in addrs.iter().enumerate() {
                let share = got.iter().filter(|x| *x == a).count() as f64 / 10_000.0;
                let want = if i % 2 == 0 { 2.0 / 9.0 } else { 1.0 / 9.0 };
                assert!(
                    (share / want - 1.0).abs() < 0.15,
                    "{algorithm:?}: target {i} has {share}, wants {want}"
                );
            }
        }
    }

    #[test]
    fn without_a_key_hashing_algorithms_pick_at_random_by_weight() {
        for algorithm in HASHING {
            let p = Picker::build(algorithm, &[3, 1], &ids(2));
            let s = shares(&draw(&p, 2, 20_000, 16), 2);
            assert!((s[0] - 0.75).abs() < 0.03, "{algorithm:?}: {s:?}");
        }
    }

    #[test]
    fn maglev_table_sizes_are_primes_growing_with_the_target_count() {
        for m in MAGLEV_SIZES {
            assert!((2..).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        }
        assert_eq!(maglev_size(1), 4_099);
        assert_eq!(maglev_size(64), 4_099);
        assert_eq!(maglev_size(65), 16_411);
        assert_eq!(maglev_size(u64::MAX), 1_048_583);
        let Picker::Maglev(t) = Picker::build(Algorithm::Maglev, &[1; 100], &ids(100)) else {
            panic!("not maglev");
        };
        assert_eq!(t.len(), 16_411);
    }

    #[test]
    fn ring_size_is_bounded_for_many_targets() {
        let Picker::RingHash(r) = Picker::build(Algorithm::RingHash, &[1; 3], &ids(3)) else {
            panic!("not a ring");
        };
        assert_eq!(r.len(), 3 * RING_POINTS_PER_TARGET);
        let Picker::RingHash(r) = Picker::build(Algorithm::RingHash, &[1; 1000], &ids(1000)) else {
            panic!("not a ring");
        };
        assert!(r.len() <= RING_MAX_POINTS, "{}", r.len());
    }

    #[test]
    fn huge_and_unequal_weights_build_without_overflow() {
        let weights = [u32::MAX, 1, u32::MAX - 1, 7];
        for algorithm in ALL {
            let p = Picker::build(algorithm, &weights, &ids(4));
            let picks = draw(&p, 4, 2_000, 17);
            assert!(picks.iter().all(|&i| i < 4), "{algorithm:?}");
        }
    }

    // --- locality --------------------------------------------------------------------------

    fn place<'a>(targets: &[(u32, &'a str, u32)]) -> Vec<Placement<'a>> {
        targets
            .iter()
            .map(|&(weight, zone, group)| Placement {
                weight,
                zone,
                group,
            })
            .collect()
    }

    #[test]
    fn evenly_spread_zones_keep_traffic_local() {
        let t = place(&[
            (1, "a", 0),
            (1, "a", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "c", 0),
            (1, "c", 0),
        ]);
        assert_eq!(zone_aware_weights(&t, "a", 70), [1, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn a_thin_local_zone_spreads_its_traffic() {
        // One endpoint of nine: its zone's callers would give it three times its share.
        let t = place(&[
            (1, "a", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "c", 0),
            (1, "c", 0),
            (1, "c", 0),
            (1, "c", 0),
        ]);
        assert_eq!(zone_aware_weights(&t, "a", 70), vec![1; 9]);
        // The well-provisioned zones stay local.
        assert_eq!(zone_aware_weights(&t, "b", 70), [0, 1, 1, 1, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn a_zone_losing_healthy_endpoints_stops_keeping_traffic_local() {
        // Three zones of 3; two local endpoints unhealthy (weight 0): 1/7 × 3 = 43 % < 70 %.
        let t = place(&[
            (0, "a", 0),
            (0, "a", 0),
            (1, "a", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "c", 0),
            (1, "c", 0),
            (1, "c", 0),
        ]);
        assert_eq!(zone_aware_weights(&t, "a", 70), [0, 0, 1, 1, 1, 1, 1, 1, 1]);
        // One unhealthy: 2/8 × 3 = 75 % ≥ 70 %: still local.
        let t = place(&[
            (0, "a", 0),
            (1, "a", 0),
            (1, "a", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "c", 0),
            (1, "c", 0),
            (1, "c", 0),
        ]);
        assert_eq!(zone_aware_weights(&t, "a", 70), [0, 1, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn the_threshold_is_a_percentage_of_the_even_share() {
        // Local holds 2 of 5 over 2 zones: 2/5 × 2 = 80 %.
        let t = place(&[
            (1, "a", 0),
            (1, "a", 0),
            (1, "b", 0),
            (1, "b", 0),
            (1, "b", 0),
        ]);
        assert_eq!(zone_aware_weights(&t, "a", 80), [1, 1, 0, 0, 0]);
        assert_eq!(zone_aware_weights(&t, "a", 81), [1, 1, 1, 1, 1]);
    }

    #[test]
    fn locality_keeps_the_split_between_services() {
        // v1 (group 0) has endpoints in every zone, weight 9 each; v2 (group 1, the 10 %
        // canary) only in zone b.
        let t = place(&[(3, "a", 0), (3, "b", 0), (3, "c", 0), (1, "b", 1)]);
        let w = zone_aware_weights(&t, "a", 70);
        // v1 goes local, v2 keeps its share though it has no endpoint here.
        assert_eq!(w, [9, 0, 0, 1]);
        let w = zone_aware_weights(&t, "b", 70);
        assert_eq!(w, [0, 9, 0, 1]);
    }

    #[test]
    fn locality_is_off_without_a_zone_or_local_endpoints() {
        let t = place(&[(1, "a", 0), (2, "b", 0)]);
        assert_eq!(zone_aware_weights(&t, "", 70), [1, 2]);
        assert_eq!(zone_aware_weights(&t, "z", 70), [1, 2]);
        let unknown = place(&[(1, "", 0), (1, "", 0)]);
        assert_eq!(zone_aware_weights(&unknown, "a", 70), [1, 1]);
    }

    #[test]
    fn local_flags_alone_assume_a_single_other_zone() {
        assert_eq!(
            locality_weights(&[1, 1, 1, 1], &[true, true, false, false], 70),
            [1, 1, 0, 0]
        );
        // 1 of 3: below 35 % of the weight, so spread.
        assert_eq!(
            locality_weights(&[1, 1, 1], &[true, false, false], 70),
            [1, 1, 1]
        );
        // Missing flags count as not local.
        assert_eq!(locality_weights(&[5, 5], &[true], 70), [1, 0]);
    }

    // --- properties ------------------------------------------------------------------------

    fn any_weight() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0u32), 1u32..10, any::<u32>()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn pick_always_returns_a_positive_weight_target(
            algorithm in proptest::sample::select(ALL.to_vec()),
            weights in proptest::collection::vec(any_weight(), 0..12),
            busy in proptest::collection::vec(0u32..50, 0..14),
            hash in proptest::option::of(any::<u64>()),
            rands in proptest::collection::vec(any::<u64>(), 1..20),
            now in any::<u64>(),
        ) {
            let ids = ids(weights.len());
            let p = Picker::build(algorithm, &weights, &ids);
            // Loads may be shorter or longer than the targets: never a panic.
            let loads = loads(busy.len());
            for (l, &b) in loads.iter().zip(&busy) {
                for _ in 0..b { l.start(); }
                l.end(Duration::from_nanos(u64::from(b) * 1_000), now / 2);
            }
            for r in rands {
                match p.pick(hash, &loads, r, now) {
                    Some(i) => prop_assert!(i < weights.len() && weights[i] > 0,
                        "{:?} picked {} of {:?}", algorithm, i, weights),
                    None => prop_assert!(weights.iter().all(|&w| w == 0)),
                }
            }
        }

        #[test]
        fn alias_table_encodes_the_weights_exactly(
            weights in proptest::collection::vec(0u32..1_000, 1..20)
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let t = AliasTable::new(&weights);
            let n = weights.len() as f64;
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let mut mass = vec![0.0; weights.len()];
            if t.accept.is_empty() {
                mass.iter_mut().for_each(|m| *m = 1.0 / n);
            } else {
                for i in 0..weights.len() {
                    let keep = f64::from(t.accept[i]) / 4_294_967_296.0;
                    mass[i] += keep / n;
                    mass[t.alias[i] as usize] += (1.0 - keep) / n;
                }
            }
            for (i, &w) in weights.iter().enumerate() {
                prop_assert!((mass[i] - f64::from(w) / total).abs() < 1e-6,
                    "{:?}: mass {:?}", weights, mass);
            }
        }

        #[test]
        fn two_candidates_are_distinct_positive_targets(
            weights in proptest::collection::vec(any_weight(), 1..12),
            rand in any::<u64>(),
        ) {
            let positive = weights.iter().filter(|&&w| w > 0).count();
            prop_assume!(positive > 0);
            let (a, b) = TwoChoices::new(&weights).pair(rand);
            prop_assert!(weights[a] > 0 && weights[b] > 0);
            prop_assert_eq!(a == b, positive == 1);
        }

        #[test]
        fn locality_preserves_group_shares_and_drains_no_extra_group(
            targets in proptest::collection::vec(
                (any_weight(), proptest::sample::select(vec!["", "a", "b", "c"]), 0u32..3),
                0..12),
            my_zone in proptest::sample::select(vec!["", "a", "b"]),
            percent in 0u32..150,
        ) {
            let t = place(&targets);
            let out = zone_aware_weights(&t, my_zone, percent);
            prop_assert_eq!(out.len(), t.len());
            let share = |ws: &[u32], g: u32| {
                let total: f64 = ws.iter().map(|&w| f64::from(w)).sum();
                let part: f64 = ws.iter().zip(&t).filter(|(_, p)| p.group == g)
                    .map(|(&w, _)| f64::from(w)).sum();
                if total == 0.0 { 0.0 } else { part / total }
            };
            let before: Vec<u32> = t.iter().map(|p| p.weight).collect();
            for g in 0..3 {
                prop_assert!((share(&before, g) - share(&out, g)).abs() < 1e-3,
                    "group {} share changed: {:?} -> {:?}", g, before, out);
            }
            for (w, p) in out.iter().zip(&t) {
                prop_assert!(p.weight > 0 || *w == 0, "a zero weight came back");
            }
        }
    }
}
