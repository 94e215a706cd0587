//! W-TinyLFU (the default): a window LRU in front of a segmented main area, admission decided
//! by a count-min sketch of recent popularity.

use super::arena::*;
use super::*;

/// A count-min sketch of 4-bit counters (after Caffeine's `FrequencySketch`): four counters
/// per key, the estimate is their minimum, and all counters are halved after `10 × width`
/// increments so that old popularity fades.
pub(super) struct Sketch {
    pub(super) table: Vec<u64>,
    pub(super) mask: u64,
    pub(super) additions: u64,
    pub(super) sample: u64,
}

impl Sketch {
    const SEEDS: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x27d4_eb2f_1656_67c5,
    ];

    /// A sketch for about `entries` distinct keys (one 64-bit word, i.e. 16 counters, each).
    pub(super) fn new(entries: usize) -> Self {
        let words = entries.clamp(16, 1 << 26).next_power_of_two();
        Self {
            table: vec![0; words],
            mask: words as u64 - 1,
            additions: 0,
            sample: 10 * words as u64,
        }
    }

    pub(super) fn width(&self) -> usize {
        self.table.len()
    }

    pub(super) fn slot(&self, hash: u64, i: usize) -> (usize, u32) {
        let h = (hash ^ (hash >> 29)).wrapping_mul(Self::SEEDS[i]);
        let word = ((h >> 32) & self.mask) as usize;
        let nibble = ((h >> 8) & 15) as u32 * 4;
        (word, nibble)
    }

    pub(super) fn estimate(&self, hash: u64) -> u8 {
        (0..4)
            .map(|i| {
                let (w, s) = self.slot(hash, i);
                self.table.get(w).map_or(0, |v| ((v >> s) & 15) as u8)
            })
            .min()
            .unwrap_or(0)
    }

    pub(super) fn increment(&mut self, hash: u64) {
        let mut added = false;
        for i in 0..4 {
            let (w, s) = self.slot(hash, i);
            if let Some(v) = self.table.get_mut(w)
                && (*v >> s) & 15 < 15
            {
                *v += 1 << s;
                added = true;
            }
        }
        if added {
            self.additions += 1;
            if self.additions >= self.sample {
                for v in &mut self.table {
                    *v = (*v >> 1) & 0x7777_7777_7777_7777;
                }
                self.additions /= 2;
            }
        }
    }
}

pub(super) const WINDOW: u32 = 0;
pub(super) const PROBATION: u32 = 1;
pub(super) const PROTECTED: u32 = 2;

/// W-TinyLFU (Einziger, Friedman, Manes; the policy of Caffeine and moka), byte-weighted.
///
/// New entries enter a small LRU window (1 % of the bytes). An entry leaving the window is
/// a candidate for the main area, a segmented LRU (probation, then protected: 80 % of main
/// once hit again). If main has no room, the candidate must be used more often, according
/// to the sketch, than each entry it would displace, taken from the probation tail;
/// otherwise the candidate is dropped. A large candidate therefore has to beat many
/// victims, which keeps one big, rarely used object from flushing many small hot ones.
pub struct TinyLfu<K, V, S = DefaultHashBuilder> {
    pub(super) arena: Arena<K, V, S>,
    pub(super) lists: [List; 3],
    pub(super) sketch: Sketch,
    pub(super) capacity: u64,
    pub(super) window_cap: u64,
    pub(super) main_cap: u64,
    pub(super) protected_cap: u64,
}

impl<K: Hash + Eq, V> TinyLfu<K, V> {
    /// An empty W-TinyLFU bounded to `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self::with_hasher(capacity, DefaultHashBuilder::default())
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> TinyLfu<K, V, S> {
    /// Window share of the capacity, in per mille (Caffeine's initial 1 %).
    const WINDOW_PER_MILLE: u64 = 10;
    /// Bytes per entry assumed to size the sketch at first; it grows with the entry count.
    const SKETCH_SIZING_BYTES: u64 = 4096;

    /// An empty W-TinyLFU with a given hasher.
    pub fn with_hasher(capacity: u64, hasher: S) -> Self {
        let window_cap = (capacity * Self::WINDOW_PER_MILLE / 1000).max(1);
        let main_cap = capacity.saturating_sub(window_cap);
        let entries = usize::try_from(capacity / Self::SKETCH_SIZING_BYTES).unwrap_or(1 << 20);
        Self {
            arena: Arena::new(hasher),
            lists: [List::default(); 3],
            sketch: Sketch::new(entries.min(1 << 20)),
            capacity,
            window_cap,
            main_cap,
            protected_cap: main_cap / 5 * 4,
        }
    }

    pub(super) fn move_to(&mut self, i: u32, to: u32) {
        self.unlink(i);
        if let Some(n) = self.arena.node_mut(i) {
            n.tag = to;
        }
        if let Some(l) = self.lists.get_mut(to as usize) {
            self.arena.push_front(l, i);
        }
    }

    pub(super) fn unlink(&mut self, i: u32) {
        let from = self.arena.tag(i) as usize;
        if let Some(l) = self.lists.get_mut(from) {
            self.arena.unlink(l, i);
        }
    }

    pub(super) fn evict(&mut self, i: u32, garbage: &mut Vec<(K, V)>) -> usize {
        self.unlink(i);
        match self.arena.release(i) {
            Some(kv) => {
                garbage.push(kv);
                1
            }
            None => 0,
        }
    }

    pub(super) fn main_weight(&self) -> u64 {
        self.lists[PROBATION as usize].weight + self.lists[PROTECTED as usize].weight
    }

    /// Keeps protected within its share by demoting its LRU end to probation.
    pub(super) fn balance_protected(&mut self) {
        while self.lists[PROTECTED as usize].weight > self.protected_cap {
            let t = self.lists[PROTECTED as usize].tail;
            if t == NIL {
                break;
            }
            self.move_to(t, PROBATION);
        }
    }

    /// Moves window overflow into main through the admission filter.
    pub(super) fn drain_window(&mut self, garbage: &mut Vec<(K, V)>) -> usize {
        let mut evicted = 0;
        while self.lists[WINDOW as usize].weight > self.window_cap {
            let cand = self.lists[WINDOW as usize].tail;
            if cand == NIL {
                break;
            }
            evicted += self.admit(cand, garbage);
        }
        evicted
    }

    /// Decides whether the window's LRU entry `cand` enters main or leaves the cache.
    pub(super) fn admit(&mut self, cand: u32, garbage: &mut Vec<(K, V)>) -> usize {
        let need = self.arena.weight_of(cand);
        if need > self.main_cap {
            return self.evict(cand, garbage);
        }
        let free = self.main_cap - self.main_weight();
        if need <= free {
            self.move_to(cand, PROBATION);
            return 0;
        }
        let Some(cand_freq) = self
            .arena
            .node(cand)
            .map(|n| self.sketch.estimate(self.arena.hash(&n.key)))
        else {
            return 0;
        };
        // Walk the victims the candidate would displace, weakest end first; it must beat
        // every one of them.
        let mut victims = Vec::new();
        let mut freed = free;
        let mut list = PROBATION;
        let mut cur = self.lists[PROBATION as usize].tail;
        while freed < need {
            if cur == NIL {
                if list == PROBATION {
                    list = PROTECTED;
                    cur = self.lists[PROTECTED as usize].tail;
                    continue;
                }
                break;
            }
            let Some(n) = self.arena.node(cur) else { break };
            if self.sketch.estimate(self.arena.hash(&n.key)) >= cand_freq {
                return self.evict(cand, garbage);
            }
            victims.push(cur);
            freed += u64::from(n.weight);
            cur = n.prev;
        }
        let mut evicted = 0;
        for v in victims {
            evicted += self.evict(v, garbage);
        }
        self.move_to(cand, PROBATION);
        evicted
    }

    /// Evicts from main until it fits its share (after an in-place update grew an entry).
    pub(super) fn shrink_main(&mut self, garbage: &mut Vec<(K, V)>) -> usize {
        let mut evicted = 0;
        while self.main_weight() > self.main_cap {
            let t = match self.lists[PROBATION as usize].tail {
                NIL => self.lists[PROTECTED as usize].tail,
                t => t,
            };
            if t == NIL {
                break;
            }
            evicted += self.evict(t, garbage);
        }
        evicted
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Evictor<K, V> for TinyLfu<K, V, S> {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn weight(&self) -> u64 {
        self.lists.iter().map(|l| l.weight).sum()
    }
    fn len(&self) -> usize {
        self.arena.len
    }

    fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&V> {
        let hash = self.arena.hash(key);
        self.sketch.increment(hash);
        let i = self.arena.find(hash, key)?;
        match self.arena.tag(i) {
            PROBATION => {
                self.move_to(i, PROTECTED);
                self.balance_protected();
            }
            tag => self.move_to(i, tag),
        }
        self.arena.node(i).map(|n| &n.value)
    }

    fn peek<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<&V> {
        let i = self.arena.find(self.arena.hash(key), key)?;
        self.arena.node(i).map(|n| &n.value)
    }

    fn insert(
        &mut self,
        key: K,
        value: V,
        weight: u64,
        garbage: &mut Vec<(K, V)>,
    ) -> Result<usize, (K, V)> {
        let Some(w) = weight32(weight, self.main_cap) else {
            return Err((key, value));
        };
        let hash = self.arena.hash(&key);
        if let Some(i) = self.arena.find(hash, &key) {
            let tag = self.arena.tag(i) as usize;
            let mut l = self.lists[tag];
            if let Some(old) = self.arena.replace(&mut l, i, value, w) {
                garbage.push((key, old));
            }
            self.lists[tag] = l;
            let evicted = if tag == WINDOW as usize {
                self.drain_window(garbage)
            } else {
                self.balance_protected();
                self.shrink_main(garbage)
            };
            return Ok(evicted);
        }
        // The sketch grows with the population so that its counters stay meaningful.
        if self.arena.len >= self.sketch.width() {
            self.sketch = Sketch::new(self.sketch.width() * 2);
        }
        let i = self.arena.alloc(hash, key, value, w, WINDOW);
        let mut l = self.lists[WINDOW as usize];
        self.arena.push_front(&mut l, i);
        self.lists[WINDOW as usize] = l;
        Ok(self.drain_window(garbage))
    }

    fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<(K, V)> {
        let i = self.arena.find(self.arena.hash(key), key)?;
        self.unlink(i);
        self.arena.release(i)
    }

    fn retain<F: FnMut(&K, &V) -> bool>(
        &mut self,
        mut keep: F,
        garbage: &mut Vec<(K, V)>,
    ) -> usize {
        let mut n = 0;
        for i in self.arena.live() {
            let Some(node) = self.arena.node(i) else {
                continue;
            };
            if !keep(&node.key, &node.value) {
                n += self.evict(i, garbage);
            }
        }
        n
    }
}
