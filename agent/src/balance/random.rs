//! Weighted random: Vose's alias table, O(1) per pick.

use super::{all_equal_positive, below, mix64};

/// Vose's alias table: one uniform column draw and one biased coin per pick, whatever the
/// weights. Columns are empty when all weights are equal (then a pick is a single multiply).
#[derive(Debug)]
pub(crate) struct AliasTable {
    pub(super) n: u64,
    /// Column i keeps i when the coin (32 random bits) is below `accept[i]`…
    pub(super) accept: Box<[u32]>,
    /// …and otherwise gives `alias[i]`.
    pub(super) alias: Box<[u32]>,
}

impl AliasTable {
    pub(super) fn new(weights: &[u32]) -> Self {
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
    pub(super) fn pick(&self, rand: u64) -> usize {
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
