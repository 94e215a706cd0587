//! Consistent hashing: a ketama-style ring (`RING_HASH`) and a Maglev table (`MAGLEV`), both
//! keyed on stable endpoint ids, optionally with bounded loads ([`LoadBound`]), and XXH64 for
//! keys and ids.

use super::load::EndpointLoad;
use super::mix64;
use std::sync::Arc;

/// Ring points per target of mean weight. Constant so that a target's points do not depend
/// on how many other targets there are: removing one target then moves only its own keys.
/// 1,024 points keep a target's key share within a few percent of its weight share (2:1
/// weights land within ±10 %), at 8 bytes a point (8 KiB per target).
pub(crate) const RING_POINTS_PER_TARGET: usize = 1024;

/// Most points in one ring (1 MiB). Above 128 targets each gets fewer points, so there the
/// minimal-disruption guarantee becomes approximate (a removal also re-cuts the others by
/// about 1/n of their points).
pub(crate) const RING_MAX_POINTS: usize = 1 << 17;

/// Maglev table sizes (primes, as Maglev requires). A rule uses the smallest one giving every
/// target at least [`MAGLEV_ENTRIES_PER_TARGET`] entries: 4,099 entries (16 KiB) up to 64
/// targets, against 256 KiB for Maglev's usual 65,537 — the agent must fit a thousand routes
/// in 20 MB. The price is disruption: removing one of n ≤ 20 targets moves at most 1.45/n of
/// the keys at 4,099 slots (1.22/n at 16,411, 1.15/n at 65,537, 1/n being ideal). Crossing a
/// size boundary (64, 256, 1,024, 4,096 targets) rebuilds the table at the other size and
/// remaps most keys once.
pub(crate) const MAGLEV_SIZES: [u32; 5] = [4_099, 16_411, 65_537, 262_147, 1_048_583];

/// Entries each target gets at least, before the largest size: keeps the per-target share
/// within 1/64 of its weight and the extra keys moved on a change small.
pub(crate) const MAGLEV_ENTRIES_PER_TARGET: u64 = 64;

/// Extra Maglev probes a key tries, past its own slot, before a bounded-load pick falls back
/// to scanning the targets in order: with a factor above 1 at least one target always has
/// room, so a few probes nearly always find one and the scan only guards the pathological
/// case (every probe landing on the few full targets).
pub(crate) const MAGLEV_BOUNDED_PROBES: u64 = 16;

/// Bounded-load consistent hashing (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing
/// with Bounded Loads", 2018; HAProxy's `hash-balance-factor`): a target takes a new request
/// only while its requests in flight stay below `factor/100 × (all in flight + 1) × its
/// weight share`. A full target passes the request on along the key's own sequence (the next
/// ring points, further Maglev probes), so a key moves only while its target is overloaded,
/// and with no load anywhere every pick is exactly the plain consistent-hashing one. The
/// bound is weighted so a 3:1 split between Services stays 3:1 under load.
#[derive(Debug)]
pub(crate) struct LoadBound {
    /// Percent, > 100.
    factor: u64,
    weights: Box<[u32]>,
    total_weight: u64,
}

impl LoadBound {
    pub(super) fn new(factor: u32, weights: &[u32]) -> Self {
        Self {
            factor: u64::from(factor),
            weights: weights.into(),
            total_weight: weights.iter().map(|&w| u64::from(w)).sum::<u64>().max(1),
        }
    }

    /// The requests in flight over all targets, read once per pick: O(targets), paid only by
    /// rules that set a factor.
    #[inline]
    pub(super) fn total(loads: &[Arc<EndpointLoad>]) -> u64 {
        loads.iter().map(|l| u64::from(l.in_flight())).sum()
    }

    /// Whether target `i`, with `in_flight` requests, may take one more when `total` are in
    /// flight overall: `in_flight < ceil(c × (total + 1) × w_i / W)`, which for an integer
    /// count is `in_flight × W × 100 < factor × (total + 1) × w_i` (exact, in u128).
    #[inline]
    pub(super) fn has_room(&self, i: usize, in_flight: u32, total: u64) -> bool {
        let w = self.weights.get(i).copied().unwrap_or(0);
        u128::from(in_flight) * u128::from(self.total_weight) * 100
            < u128::from(self.factor) * u128::from(total + 1) * u128::from(w)
    }

    #[inline]
    fn target_has_room(&self, i: usize, loads: &[Arc<EndpointLoad>], total: u64) -> bool {
        let in_flight = loads.get(i).map_or(0, |l| l.in_flight());
        self.has_room(i, in_flight, total)
    }
}

/// Ketama-style consistent hashing ring: each target owns points in proportion to its weight;
/// a key belongs to the first point at or after it (wrapping).
///
/// Points are 32-bit (the top half of the key hash is plenty to place keys and halves the
/// memory). A target's k-th point depends only on its id and k, and its point count only on
/// its weight relative to the mean, so with equal weights removing a target leaves every other
/// point, hence every other key, exactly where it was.
#[derive(Debug)]
pub(crate) struct Ring {
    /// Sorted.
    pub(super) points: Box<[u32]>,
    /// Target index owning `points[i]`.
    pub(super) owners: Box<[u32]>,
    /// Set by `hashBalanceFactor`.
    pub(super) bound: Option<LoadBound>,
}

impl Ring {
    pub(super) fn new(weights: &[u32], ids: &[u64]) -> Self {
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
            bound: None,
        }
    }

    #[inline]
    fn first_point(&self, hash: u64) -> usize {
        let key = (hash >> 32) as u32;
        let i = self.points.partition_point(|&p| p < key);
        if i == self.points.len() { 0 } else { i }
    }

    #[inline]
    pub(super) fn pick(&self, hash: u64) -> usize {
        self.owners
            .get(self.first_point(hash))
            .map_or(0, |&o| o as usize)
    }

    /// [`Ring::pick`] with bounded loads: the first target with room clockwise from the key.
    /// If none has room (counts read while other threads change them can, briefly, say so),
    /// the plain pick.
    pub(super) fn pick_bounded(
        &self,
        hash: u64,
        bound: &LoadBound,
        loads: &[Arc<EndpointLoad>],
    ) -> usize {
        let start = self.first_point(hash);
        let total = LoadBound::total(loads);
        let n = self.owners.len();
        let mut last_full = u32::MAX;
        for step in 0..n {
            let owner = self.owners[(start + step) % n];
            // Consecutive points of one full target need not be checked again.
            if owner == last_full {
                continue;
            }
            if bound.target_has_room(owner as usize, loads, total) {
                return owner as usize;
            }
            last_full = owner;
        }
        self.pick(hash)
    }

    #[cfg(test)]
    /// Number of points (for tests and memory accounting).
    pub(crate) fn len(&self) -> usize {
        self.points.len()
    }
}

/// Maglev lookup table (Eisenbud et al., NSDI 2016): each target walks its own permutation of
/// the table's slots (offset and skip from its id) and claims the next free slot when it is
/// its turn; a target takes turns in proportion to its weight (Envoy's weighted variant).
/// Lookup is one modulo and one read. Targets take turns in id order, so the table does not
/// depend on the order the targets were listed in.
#[derive(Debug)]
pub(crate) struct MaglevTable {
    /// Target index for each slot; the length is one of [`MAGLEV_SIZES`].
    pub(super) table: Box<[u32]>,
    /// Set by `hashBalanceFactor`.
    pub(super) bound: Option<LoadBound>,
    /// Number of targets (weight-0 ones included), for the bounded-load fallback scan.
    pub(super) targets: u32,
}

impl MaglevTable {
    pub(super) fn new(weights: &[u32], ids: &[u64]) -> Self {
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
            bound: None,
            targets: weights.len() as u32,
        }
    }

    #[inline]
    pub(super) fn pick(&self, hash: u64) -> usize {
        let len = self.table.len() as u64;
        self.table
            .get((hash % len.max(1)) as usize)
            .map_or(0, |&t| t as usize)
    }

    /// [`MaglevTable::pick`] with bounded loads. Maglev keeps no per-key preference list, so a
    /// key's "next preferences" are its own fixed probe sequence (the slots of
    /// `mix64(hash + k·φ)`, k = 1, 2, …): the same key always spills the same way, and each
    /// probe lands on a target in proportion to its weight. Past
    /// [`MAGLEV_BOUNDED_PROBES`] probes, the first target with room in index order from a
    /// key-derived start; if none has room, the plain pick.
    pub(super) fn pick_bounded(
        &self,
        hash: u64,
        bound: &LoadBound,
        loads: &[Arc<EndpointLoad>],
    ) -> usize {
        let first = self.pick(hash);
        let total = LoadBound::total(loads);
        if bound.target_has_room(first, loads, total) {
            return first;
        }
        for k in 1..=MAGLEV_BOUNDED_PROBES {
            let t = self.pick(mix64(
                hash.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ));
            if bound.target_has_room(t, loads, total) {
                return t;
            }
        }
        let n = u64::from(self.targets.max(1));
        let start = super::below(mix64(hash), n);
        (0..n)
            .map(|k| ((start + k) % n) as usize)
            .find(|&t| bound.target_has_room(t, loads, total))
            .unwrap_or(first)
    }

    #[cfg(test)]
    /// Number of slots (for tests and memory accounting).
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

/// The table size for `targets` positive-weight targets.
pub(super) fn maglev_size(targets: u64) -> u32 {
    let wanted = targets.saturating_mul(MAGLEV_ENTRIES_PER_TARGET);
    MAGLEV_SIZES
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= wanted)
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1])
}

pub(super) fn target_id(ids: &[u64], i: usize) -> u64 {
    ids.get(i)
        .copied()
        .unwrap_or_else(|| mix64(i as u64 ^ 0x7461_7267_6574_0000))
}
// ---------------------------------------------------------------------------------------------
// Stable hashing.

/// Hash of a consistent-hashing key (header value, cookie value or path bytes): XXH64 with
/// seed 0, byte-exact with the reference implementation (the same function Envoy's hash
/// policies use). It must be identical on every agent and across versions, which rules out
/// std's randomly seeded `RandomState`; no xxhash crate is in the agent's dependency tree, so
/// it is written here (a page of code) and pinned by the published test vectors.
pub(crate) fn hash_key(bytes: &[u8]) -> u64 {
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
pub(crate) fn endpoint_id(addr: &str) -> u64 {
    hash_key(addr.as_bytes())
}
