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
//! - Bounded-load consistent hashing (`hashBalanceFactor`, [`hash::LoadBound`]) reads the live
//!   in-flight counts at pick time rather than reshaping the ring or table: the tables stay
//!   exactly those of plain hashing, so only requests that would overload a target move, and
//!   they move back as soon as it drains.
//! - Zone-aware routing ([`zone_aware_weights`]) keeps a rule's traffic in the agent's zone only
//!   while that zone holds enough healthy capacity for its share of the callers, and decides
//!   per Service so locality never changes the split between Services.
//!
//! One file per algorithm family: [`rr`] (smooth weighted round robin), [`random`] (alias
//! table), [`p2c`] (least request and Peak EWMA), [`hash`] (ring hash, Maglev, XXH64),
//! [`zone`] (locality) and [`load`] (the live per-endpoint state). Nothing here imports from
//! another module of the crate.

pub(crate) mod hash;
pub(crate) mod load;
pub(crate) mod p2c;
pub(crate) mod random;
pub(crate) mod rr;
pub(crate) mod zone;

pub(crate) use hash::{endpoint_id, hash_key};
pub(crate) use load::{EndpointLoad, InFlight};
pub(crate) use zone::{Placement, zone_aware_weights};

use hash::{LoadBound, MaglevTable, Ring};
use p2c::TwoChoices;
use random::AliasTable;
use rr::RoundRobin;
use std::sync::Arc;
use weir_proto::v1::Algorithm;

/// A rule's endpoint picker: everything an algorithm needs, precomputed from the targets'
/// weights (and ids, for consistent hashing) when the routing table is built.
#[derive(Debug)]
pub(crate) enum Picker {
    /// No target has a positive weight: every pick fails.
    Empty,
    /// `ROUND_ROBIN` and `WEIGHTED_ROUND_ROBIN`: nginx's smooth weighted round robin
    /// ([`rr`]); plain round robin when weights are equal.
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
    pub(crate) fn build(algorithm: Algorithm, weights: &[u32], ids: &[u64]) -> Picker {
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

    /// Bounded loads for consistent hashing ([`hash::LoadBound`]): `factor` percent (> 100)
    /// of the mean in-flight load per unit of weight. `weights` must be those the picker was
    /// built with. 0 turns it off; other algorithms ignore it (validation refuses the
    /// combination, and it would make no sense: they already spread load).
    pub(crate) fn with_hash_balance_factor(mut self, factor: u32, weights: &[u32]) -> Picker {
        if factor > 100 {
            match &mut self {
                Picker::RingHash(ring) => ring.bound = Some(LoadBound::new(factor, weights)),
                Picker::Maglev(table) => table.bound = Some(LoadBound::new(factor, weights)),
                _ => {}
            }
        }
        self
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
    pub(crate) fn pick(
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
            Picker::RingHash(ring) => Some(match &ring.bound {
                None => ring.pick(hash.unwrap_or(rand)),
                Some(b) => ring.pick_bounded(hash.unwrap_or(rand), b, loads),
            }),
            Picker::Maglev(table) => Some(match &table.bound {
                None => table.pick(hash.unwrap_or(rand)),
                Some(b) => table.pick_bounded(hash.unwrap_or(rand), b, loads),
            }),
        }
    }
}

pub(super) fn all_equal_positive(weights: &[u32]) -> bool {
    weights.first().is_some_and(|&w| w > 0) && weights.iter().all(|&w| w == weights[0])
}

/// A uniform integer in `[0, n)` from a uniform word (Lemire's multiply-shift: no division,
/// bias below n / 2⁶⁴).
#[inline]
pub(super) fn below(rand: u64, n: u64) -> u64 {
    ((u128::from(rand) * u128::from(n)) >> 64) as u64
}

/// SplitMix64's finaliser: a fixed bijection with full avalanche, to derive independent-looking
/// words from one random word and to spread ids over ring points and Maglev permutations.
#[inline]
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
