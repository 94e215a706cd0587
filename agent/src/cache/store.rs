//! Byte-bounded storage and the eviction policies behind it.
//!
//! Two layers, as in pingora-cache (`storage.rs` over `eviction/`):
//! - [`Evictor`]: one single-threaded, byte-weighted map with an eviction order. Four
//!   implementations: [`Lru`], [`Lfu`], [`Fifo`] and [`TinyLfu`] (W-TinyLFU, the default,
//!   chosen by the hit-ratio simulation in `benches/cache_hit_ratio.rs`). They are pure data
//!   structures: no clock, no I/O, no locks, so the simulator replays millions of requests
//!   through exactly the code the agent runs.
//! - [`Storage`]: what the response cache needs from a store, thread-safe.
//!   [`MemoryStorage`] shards an [`AnyEvictor`] behind a few short-held mutexes.
//!
//! No crate offers all four policies with byte weights: moka is W-TinyLFU only and costs
//! about 230 bytes per entry; quick_cache is S3-FIFO only (it is kept as a point of
//! comparison in the simulator). All four here share one slab of nodes linked by `u32`
//! indices and a `hashbrown::HashTable<u32>` index, so an entry costs about 50 bytes of
//! bookkeeping besides its key and value.

use hashbrown::{DefaultHashBuilder, Equivalent, HashTable};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};

/// "No node": the end of a list.
const NIL: u32 = u32::MAX;

/// Which eviction policy a cache uses (`spec.cache.eviction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EvictionPolicy {
    /// Least recently used.
    Lru,
    /// Least frequently used (ties broken by recency).
    Lfu,
    /// First in, first out: hits do not reorder.
    Fifo,
    /// W-TinyLFU: a 1 % LRU window in front of a segmented-LRU main area, with admission to
    /// the main area decided by a frequency sketch. The default: it was ahead of (or level
    /// with) LRU, LFU, FIFO and S3-FIFO on every Zipf workload measured, 12 points ahead of
    /// LRU at α = 0.9 with a 1 % cache (see `tests/bench/cache/README.md`).
    #[default]
    TinyLfu,
}

impl EvictionPolicy {
    /// Parses the CRD/proto name; empty means the default.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "" | "TinyLfu" => Some(Self::TinyLfu),
            "Lru" => Some(Self::Lru),
            "Lfu" => Some(Self::Lfu),
            "Fifo" => Some(Self::Fifo),
            _ => None,
        }
    }

    /// The CRD/proto name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "Lru",
            Self::Lfu => "Lfu",
            Self::Fifo => "Fifo",
            Self::TinyLfu => "TinyLfu",
        }
    }
}

/// A single-threaded map bounded by the sum of its entries' weights (bytes).
///
/// Inserting may evict other entries, or refuse the new one (an entry heavier than the
/// capacity, or one that W-TinyLFU judges less useful than what it would displace). Removed
/// keys and values are pushed to a `garbage` vector instead of being dropped, so a caller
/// holding a lock can drop them (and free large bodies) after releasing it.
pub trait Evictor<K, V> {
    /// The byte bound.
    fn capacity(&self) -> u64;
    /// Sum of the weights of the entries held.
    fn weight(&self) -> u64;
    /// Number of entries held.
    fn len(&self) -> usize;
    /// Whether no entry is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Looks a key up and records the access (a miss counts too, for frequency policies).
    fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&V>;
    /// Looks a key up without recording an access.
    fn peek<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<&V>;
    /// Inserts or replaces an entry. `Ok(n)`: stored, `n` other entries evicted.
    /// `Err((key, value))`: refused, nothing changed except that evictions may have happened
    /// (`garbage` holds them).
    fn insert(
        &mut self,
        key: K,
        value: V,
        weight: u64,
        garbage: &mut Vec<(K, V)>,
    ) -> Result<usize, (K, V)>;
    /// Removes an entry.
    fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<(K, V)>;
    /// Removes every entry for which `keep` is false; returns how many.
    fn retain<F: FnMut(&K, &V) -> bool>(&mut self, keep: F, garbage: &mut Vec<(K, V)>) -> usize;
}

// ---------------------------------------------------------------------------------------
// The shared slab + index + intrusive lists.

struct Node<K, V> {
    key: K,
    value: V,
    weight: u32,
    prev: u32,
    next: u32,
    /// Which list the node is on (TinyLfu) or its use count (Lfu).
    tag: u32,
}

enum Slot<K, V> {
    Full(Node<K, V>),
    Free(u32),
}

/// A doubly linked list threaded through the arena, with its total weight.
#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
    weight: u64,
}

impl Default for List {
    fn default() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            weight: 0,
        }
    }
}

/// Slots in fixed-size chunks: growing never copies the existing nodes (no latency spike
/// under the lock on a large cache) and leaves at most one chunk unused (a `Vec` that
/// doubles leaves up to half).
struct Slab<K, V> {
    chunks: Vec<Vec<Slot<K, V>>>,
}

impl<K, V> Slab<K, V> {
    const SHIFT: u32 = 8;
    const CHUNK: usize = 1 << Self::SHIFT;

    fn get(&self, i: u32) -> Option<&Slot<K, V>> {
        self.chunks
            .get((i >> Self::SHIFT) as usize)?
            .get(i as usize & (Self::CHUNK - 1))
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Slot<K, V>> {
        self.chunks
            .get_mut((i >> Self::SHIFT) as usize)?
            .get_mut(i as usize & (Self::CHUNK - 1))
    }

    /// Appends a slot; returns its index.
    fn push(&mut self, slot: Slot<K, V>) -> u32 {
        let full = self.chunks.last().is_none_or(|c| c.len() == Self::CHUNK);
        if full {
            self.chunks.push(Vec::with_capacity(Self::CHUNK));
        }
        let n = self.chunks.len() - 1;
        let mut at = 0;
        if let Some(c) = self.chunks.last_mut() {
            at = c.len();
            c.push(slot);
        }
        ((n << Self::SHIFT) + at) as u32
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &Slot<K, V>)> {
        self.chunks.iter().enumerate().flat_map(|(n, c)| {
            c.iter()
                .enumerate()
                .map(move |(j, s)| (((n << Self::SHIFT) + j) as u32, s))
        })
    }
}

struct Arena<K, V, S> {
    slots: Slab<K, V>,
    free: u32,
    index: HashTable<u32>,
    hasher: S,
    len: usize,
}

impl<K: Hash, V, S: BuildHasher> Arena<K, V, S> {
    fn new(hasher: S) -> Self {
        Self {
            slots: Slab { chunks: Vec::new() },
            free: NIL,
            index: HashTable::new(),
            hasher,
            len: 0,
        }
    }

    fn hash<Q: Hash + ?Sized>(&self, q: &Q) -> u64 {
        self.hasher.hash_one(q)
    }

    fn find<Q: Hash + Equivalent<K> + ?Sized>(&self, hash: u64, q: &Q) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| match slots.get(i) {
                Some(Slot::Full(n)) => q.equivalent(&n.key),
                _ => false,
            })
            .copied()
    }

    fn node(&self, i: u32) -> Option<&Node<K, V>> {
        match self.slots.get(i) {
            Some(Slot::Full(n)) => Some(n),
            _ => None,
        }
    }

    fn node_mut(&mut self, i: u32) -> Option<&mut Node<K, V>> {
        match self.slots.get_mut(i) {
            Some(Slot::Full(n)) => Some(n),
            _ => None,
        }
    }

    fn weight_of(&self, i: u32) -> u64 {
        self.node(i).map_or(0, |n| u64::from(n.weight))
    }

    fn tag(&self, i: u32) -> u32 {
        self.node(i).map_or(0, |n| n.tag)
    }

    /// Stores a new node (not yet on any list) and indexes it.
    fn alloc(&mut self, hash: u64, key: K, value: V, weight: u32, tag: u32) -> u32 {
        let node = Node {
            key,
            value,
            weight,
            prev: NIL,
            next: NIL,
            tag,
        };
        let i = if self.free != NIL {
            let i = self.free;
            if let Some(slot) = self.slots.get_mut(i) {
                if let Slot::Free(next) = *slot {
                    self.free = next;
                }
                *slot = Slot::Full(node);
            }
            i
        } else {
            self.slots.push(Slot::Full(node))
        };
        let Self {
            index,
            slots,
            hasher,
            ..
        } = self;
        index.insert_unique(hash, i, |&j| match slots.get(j) {
            Some(Slot::Full(n)) => hasher.hash_one(&n.key),
            _ => 0,
        });
        self.len += 1;
        i
    }

    /// Unindexes and frees a node that is on no list.
    fn release(&mut self, i: u32) -> Option<(K, V)> {
        let hash = self.hash(&self.node(i)?.key);
        if let Ok(e) = self.index.find_entry(hash, |&j| j == i) {
            e.remove();
        }
        let slot = self.slots.get_mut(i)?;
        let Slot::Full(node) = std::mem::replace(slot, Slot::Free(self.free)) else {
            return None;
        };
        self.free = i;
        self.len -= 1;
        Some((node.key, node.value))
    }

    fn push_front(&mut self, list: &mut List, i: u32) {
        let head = list.head;
        let Some(n) = self.node_mut(i) else { return };
        n.prev = NIL;
        n.next = head;
        let w = u64::from(n.weight);
        if let Some(h) = self.node_mut(head) {
            h.prev = i;
        } else {
            list.tail = i;
        }
        list.head = i;
        list.weight += w;
    }

    fn unlink(&mut self, list: &mut List, i: u32) {
        let Some(n) = self.node(i) else { return };
        let (prev, next, w) = (n.prev, n.next, u64::from(n.weight));
        match self.node_mut(prev) {
            Some(p) => p.next = next,
            None => list.head = next,
        }
        match self.node_mut(next) {
            Some(nx) => nx.prev = prev,
            None => list.tail = prev,
        }
        if let Some(n) = self.node_mut(i) {
            n.prev = NIL;
            n.next = NIL;
        }
        list.weight -= w;
    }

    /// Replaces the value and weight of a node that is on `list`.
    fn replace(&mut self, list: &mut List, i: u32, value: V, weight: u32) -> Option<V> {
        let n = self.node_mut(i)?;
        let old_w = u64::from(n.weight);
        n.weight = weight;
        let old = std::mem::replace(&mut n.value, value);
        list.weight = list.weight - old_w + u64::from(weight);
        Some(old)
    }

    /// Indices of all live nodes (for `retain`).
    fn live(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Full(_)))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Weights are stored as `u32`: objects are far smaller than 4 GiB (the per-object limit
/// is at most 8 MiB), and a heavier one is simply refused.
fn weight32(weight: u64, capacity: u64) -> Option<u32> {
    if weight > capacity {
        return None;
    }
    u32::try_from(weight).ok()
}

// ---------------------------------------------------------------------------------------
// LRU and FIFO: one list; they differ only in whether a hit moves the entry to the front.

/// Least recently used.
pub struct Lru<K, V, S = DefaultHashBuilder> {
    arena: Arena<K, V, S>,
    list: List,
    capacity: u64,
    /// FIFO is LRU without the move-to-front on a hit.
    touch: bool,
}

/// First in, first out.
pub struct Fifo<K, V, S = DefaultHashBuilder>(Lru<K, V, S>);

impl<K: Hash + Eq, V> Lru<K, V> {
    /// An empty LRU bounded to `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self::with_hasher(capacity, DefaultHashBuilder::default())
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Lru<K, V, S> {
    /// An empty LRU with a given hasher (the simulator uses a fixed one to be repeatable).
    pub fn with_hasher(capacity: u64, hasher: S) -> Self {
        Self {
            arena: Arena::new(hasher),
            list: List::default(),
            capacity,
            touch: true,
        }
    }

    fn evict_until_fits(&mut self, incoming: u64, garbage: &mut Vec<(K, V)>) -> usize {
        let mut n = 0;
        while self.list.weight + incoming > self.capacity && self.list.tail != NIL {
            let t = self.list.tail;
            self.arena.unlink(&mut self.list, t);
            if let Some(kv) = self.arena.release(t) {
                garbage.push(kv);
                n += 1;
            }
        }
        n
    }
}

impl<K: Hash + Eq, V> Fifo<K, V> {
    /// An empty FIFO bounded to `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self::with_hasher(capacity, DefaultHashBuilder::default())
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Fifo<K, V, S> {
    /// An empty FIFO with a given hasher.
    pub fn with_hasher(capacity: u64, hasher: S) -> Self {
        let mut lru = Lru::with_hasher(capacity, hasher);
        lru.touch = false;
        Self(lru)
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Evictor<K, V> for Lru<K, V, S> {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn weight(&self) -> u64 {
        self.list.weight
    }
    fn len(&self) -> usize {
        self.arena.len
    }

    fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&V> {
        let i = self.arena.find(self.arena.hash(key), key)?;
        if self.touch && self.list.head != i {
            self.arena.unlink(&mut self.list, i);
            self.arena.push_front(&mut self.list, i);
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
        let Some(w) = weight32(weight, self.capacity) else {
            return Err((key, value));
        };
        let hash = self.arena.hash(&key);
        if let Some(i) = self.arena.find(hash, &key) {
            // Replace in place, then make it the most recent (for FIFO: keep its place).
            if let Some(old) = self.arena.replace(&mut self.list, i, value, w) {
                garbage.push((key, old));
            }
            if self.touch {
                self.arena.unlink(&mut self.list, i);
                self.arena.push_front(&mut self.list, i);
            }
            // The replaced entry may now be the overflow itself; evict from the tail anyway.
            return Ok(self.evict_until_fits(0, garbage));
        }
        let evicted = self.evict_until_fits(weight, garbage);
        let i = self.arena.alloc(hash, key, value, w, 0);
        self.arena.push_front(&mut self.list, i);
        Ok(evicted)
    }

    fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<(K, V)> {
        let i = self.arena.find(self.arena.hash(key), key)?;
        self.arena.unlink(&mut self.list, i);
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
                self.arena.unlink(&mut self.list, i);
                if let Some(kv) = self.arena.release(i) {
                    garbage.push(kv);
                    n += 1;
                }
            }
        }
        n
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Evictor<K, V> for Fifo<K, V, S> {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn weight(&self) -> u64 {
        self.0.weight()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&V> {
        self.0.get(key)
    }
    fn peek<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<&V> {
        self.0.peek(key)
    }
    fn insert(
        &mut self,
        key: K,
        value: V,
        weight: u64,
        garbage: &mut Vec<(K, V)>,
    ) -> Result<usize, (K, V)> {
        self.0.insert(key, value, weight, garbage)
    }
    fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<(K, V)> {
        self.0.remove(key)
    }
    fn retain<F: FnMut(&K, &V) -> bool>(&mut self, keep: F, garbage: &mut Vec<(K, V)>) -> usize {
        self.0.retain(keep, garbage)
    }
}

// ---------------------------------------------------------------------------------------
// LFU: one list per use count; evict the least recent entry of the lowest count.

/// Least frequently used, ties broken by recency. Counts are never aged: this is the
/// textbook policy, kept for comparison and for workloads whose popularity never moves.
pub struct Lfu<K, V, S = DefaultHashBuilder> {
    arena: Arena<K, V, S>,
    /// Non-empty lists by use count; the first is the eviction end.
    by_count: BTreeMap<u32, List>,
    weight: u64,
    capacity: u64,
}

impl<K: Hash + Eq, V> Lfu<K, V> {
    /// An empty LFU bounded to `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self::with_hasher(capacity, DefaultHashBuilder::default())
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Lfu<K, V, S> {
    /// An empty LFU with a given hasher.
    pub fn with_hasher(capacity: u64, hasher: S) -> Self {
        Self {
            arena: Arena::new(hasher),
            by_count: BTreeMap::new(),
            weight: 0,
            capacity,
        }
    }

    fn link(&mut self, i: u32, count: u32) {
        if let Some(n) = self.arena.node_mut(i) {
            n.tag = count;
        }
        let mut list = self.by_count.get(&count).copied().unwrap_or_default();
        self.arena.push_front(&mut list, i);
        self.by_count.insert(count, list);
    }

    fn unlink(&mut self, i: u32) -> u32 {
        let count = self.arena.tag(i);
        if let Some(mut list) = self.by_count.get(&count).copied() {
            self.arena.unlink(&mut list, i);
            if list.head == NIL {
                self.by_count.remove(&count);
            } else {
                self.by_count.insert(count, list);
            }
        }
        count
    }

    fn evict_until_fits(&mut self, incoming: u64, garbage: &mut Vec<(K, V)>) -> usize {
        let mut n = 0;
        while self.weight + incoming > self.capacity {
            let Some(list) = self.by_count.values().next().copied() else {
                break;
            };
            let t = list.tail;
            self.weight -= self.arena.weight_of(t);
            self.unlink(t);
            if let Some(kv) = self.arena.release(t) {
                garbage.push(kv);
                n += 1;
            }
        }
        n
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> Evictor<K, V> for Lfu<K, V, S> {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn weight(&self) -> u64 {
        self.weight
    }
    fn len(&self) -> usize {
        self.arena.len
    }

    fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&V> {
        let i = self.arena.find(self.arena.hash(key), key)?;
        let count = self.unlink(i);
        self.link(i, count.saturating_add(1));
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
        let Some(w) = weight32(weight, self.capacity) else {
            return Err((key, value));
        };
        let hash = self.arena.hash(&key);
        if let Some(i) = self.arena.find(hash, &key) {
            // Keep the use count: an updated (revalidated) entry is as popular as before.
            let count = self.unlink(i);
            self.weight -= self.arena.weight_of(i);
            if let Some(n) = self.arena.node_mut(i) {
                n.weight = w;
                let old = std::mem::replace(&mut n.value, value);
                garbage.push((key, old));
            }
            self.weight += weight;
            self.link(i, count);
            return Ok(self.evict_until_fits(0, garbage));
        }
        let evicted = self.evict_until_fits(weight, garbage);
        let i = self.arena.alloc(hash, key, value, w, 1);
        self.link(i, 1);
        self.weight += weight;
        Ok(evicted)
    }

    fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<(K, V)> {
        let i = self.arena.find(self.arena.hash(key), key)?;
        self.weight -= self.arena.weight_of(i);
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
                self.weight -= u64::from(node.weight);
                self.unlink(i);
                if let Some(kv) = self.arena.release(i) {
                    garbage.push(kv);
                    n += 1;
                }
            }
        }
        n
    }
}

// ---------------------------------------------------------------------------------------
// W-TinyLFU.

/// A count-min sketch of 4-bit counters (after Caffeine's `FrequencySketch`): four counters
/// per key, the estimate is their minimum, and all counters are halved after `10 × width`
/// increments so that old popularity fades.
struct Sketch {
    table: Vec<u64>,
    mask: u64,
    additions: u64,
    sample: u64,
}

impl Sketch {
    const SEEDS: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x27d4_eb2f_1656_67c5,
    ];

    /// A sketch for about `entries` distinct keys (one 64-bit word, i.e. 16 counters, each).
    fn new(entries: usize) -> Self {
        let words = entries.clamp(16, 1 << 26).next_power_of_two();
        Self {
            table: vec![0; words],
            mask: words as u64 - 1,
            additions: 0,
            sample: 10 * words as u64,
        }
    }

    fn width(&self) -> usize {
        self.table.len()
    }

    fn slot(&self, hash: u64, i: usize) -> (usize, u32) {
        let h = (hash ^ (hash >> 29)).wrapping_mul(Self::SEEDS[i]);
        let word = ((h >> 32) & self.mask) as usize;
        let nibble = ((h >> 8) & 15) as u32 * 4;
        (word, nibble)
    }

    fn estimate(&self, hash: u64) -> u8 {
        (0..4)
            .map(|i| {
                let (w, s) = self.slot(hash, i);
                self.table.get(w).map_or(0, |v| ((v >> s) & 15) as u8)
            })
            .min()
            .unwrap_or(0)
    }

    fn increment(&mut self, hash: u64) {
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

const WINDOW: u32 = 0;
const PROBATION: u32 = 1;
const PROTECTED: u32 = 2;

/// W-TinyLFU (Einziger, Friedman, Manes; the policy of Caffeine and moka), byte-weighted.
///
/// New entries enter a small LRU window (1 % of the bytes). An entry leaving the window is
/// a candidate for the main area, a segmented LRU (probation, then protected: 80 % of main
/// once hit again). If main has no room, the candidate must be used more often, according
/// to the sketch, than each entry it would displace, taken from the probation tail;
/// otherwise the candidate is dropped. A large candidate therefore has to beat many
/// victims, which keeps one big, rarely used object from flushing many small hot ones.
pub struct TinyLfu<K, V, S = DefaultHashBuilder> {
    arena: Arena<K, V, S>,
    lists: [List; 3],
    sketch: Sketch,
    capacity: u64,
    window_cap: u64,
    main_cap: u64,
    protected_cap: u64,
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

    fn move_to(&mut self, i: u32, to: u32) {
        self.unlink(i);
        if let Some(n) = self.arena.node_mut(i) {
            n.tag = to;
        }
        if let Some(l) = self.lists.get_mut(to as usize) {
            self.arena.push_front(l, i);
        }
    }

    fn unlink(&mut self, i: u32) {
        let from = self.arena.tag(i) as usize;
        if let Some(l) = self.lists.get_mut(from) {
            self.arena.unlink(l, i);
        }
    }

    fn evict(&mut self, i: u32, garbage: &mut Vec<(K, V)>) -> usize {
        self.unlink(i);
        match self.arena.release(i) {
            Some(kv) => {
                garbage.push(kv);
                1
            }
            None => 0,
        }
    }

    fn main_weight(&self) -> u64 {
        self.lists[PROBATION as usize].weight + self.lists[PROTECTED as usize].weight
    }

    /// Keeps protected within its share by demoting its LRU end to probation.
    fn balance_protected(&mut self) {
        while self.lists[PROTECTED as usize].weight > self.protected_cap {
            let t = self.lists[PROTECTED as usize].tail;
            if t == NIL {
                break;
            }
            self.move_to(t, PROBATION);
        }
    }

    /// Moves window overflow into main through the admission filter.
    fn drain_window(&mut self, garbage: &mut Vec<(K, V)>) -> usize {
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
    fn admit(&mut self, cand: u32, garbage: &mut Vec<(K, V)>) -> usize {
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
    fn shrink_main(&mut self, garbage: &mut Vec<(K, V)>) -> usize {
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

// ---------------------------------------------------------------------------------------
// Runtime choice.

/// One of the four evictors, chosen at run time by [`EvictionPolicy`].
pub enum AnyEvictor<K, V, S = DefaultHashBuilder> {
    /// [`Lru`].
    Lru(Lru<K, V, S>),
    /// [`Lfu`].
    Lfu(Lfu<K, V, S>),
    /// [`Fifo`].
    Fifo(Fifo<K, V, S>),
    /// [`TinyLfu`].
    TinyLfu(TinyLfu<K, V, S>),
}

impl<K: Hash + Eq, V> AnyEvictor<K, V> {
    /// An empty evictor of the given policy.
    pub fn new(policy: EvictionPolicy, capacity: u64) -> Self {
        Self::with_hasher(policy, capacity, DefaultHashBuilder::default())
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> AnyEvictor<K, V, S> {
    /// An empty evictor of the given policy with a given hasher.
    pub fn with_hasher(policy: EvictionPolicy, capacity: u64, hasher: S) -> Self {
        match policy {
            EvictionPolicy::Lru => Self::Lru(Lru::with_hasher(capacity, hasher)),
            EvictionPolicy::Lfu => Self::Lfu(Lfu::with_hasher(capacity, hasher)),
            EvictionPolicy::Fifo => Self::Fifo(Fifo::with_hasher(capacity, hasher)),
            EvictionPolicy::TinyLfu => Self::TinyLfu(TinyLfu::with_hasher(capacity, hasher)),
        }
    }
}

macro_rules! each {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            AnyEvictor::Lru($e) => $body,
            AnyEvictor::Lfu($e) => $body,
            AnyEvictor::Fifo($e) => $body,
            AnyEvictor::TinyLfu($e) => $body,
        }
    };
}

impl<K: Hash + Eq, V, S: BuildHasher> Evictor<K, V> for AnyEvictor<K, V, S> {
    fn capacity(&self) -> u64 {
        each!(self, e => e.capacity())
    }
    fn weight(&self) -> u64 {
        each!(self, e => e.weight())
    }
    fn len(&self) -> usize {
        each!(self, e => e.len())
    }
    fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<&V> {
        each!(self, e => e.get(key))
    }
    fn peek<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<&V> {
        each!(self, e => e.peek(key))
    }
    fn insert(
        &mut self,
        key: K,
        value: V,
        weight: u64,
        garbage: &mut Vec<(K, V)>,
    ) -> Result<usize, (K, V)> {
        each!(self, e => e.insert(key, value, weight, garbage))
    }
    fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<(K, V)> {
        each!(self, e => e.remove(key))
    }
    fn retain<F: FnMut(&K, &V) -> bool>(&mut self, keep: F, garbage: &mut Vec<(K, V)>) -> usize {
        each!(self, e => e.retain(keep, garbage))
    }
}

// ---------------------------------------------------------------------------------------
// The thread-safe storage the response cache uses.

use super::entry::{Entry, Key, KeyRef};
use parking_lot::Mutex;

/// Outcome of [`Storage::update`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Put {
    /// Whether the new entry is held.
    pub stored: bool,
    /// How many other entries were evicted to make room.
    pub evicted: u64,
}

/// Bytes and entries held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of entry weights (bodies, packed heads, keys, fixed overhead).
    pub bytes: u64,
    /// Number of URIs held.
    pub entries: u64,
}

/// What the response cache needs from a store. Every method is short and never awaits, so
/// implementations may take a lock.
pub trait Storage: Send + Sync {
    /// The entry for `key`, recording the access for the eviction policy.
    fn get(&self, key: &KeyRef<'_>) -> Option<Entry>;
    /// The entry for `key`, without recording an access.
    fn peek(&self, key: &KeyRef<'_>) -> Option<Entry>;
    /// Replaces the entry for `key` by `make(current)` atomically; `None` from `make`
    /// leaves it as it is.
    fn update(
        &self,
        key: &KeyRef<'_>,
        make: &mut dyn FnMut(Option<&Entry>) -> Option<Entry>,
    ) -> Put;
    /// Removes the entry for `key`; whether there was one.
    fn remove(&self, key: &KeyRef<'_>) -> bool;
    /// Removes every entry whose key fails `keep`; returns how many.
    fn retain(&self, keep: &mut dyn FnMut(&Key) -> bool) -> u64;
    /// Current usage.
    fn usage(&self) -> Usage;
}

/// In-memory storage: a few shards, each an [`AnyEvictor`] behind a mutex held only for
/// the map operation (never across an await, never while a body is dropped).
pub struct MemoryStorage {
    shards: Box<[Mutex<AnyEvictor<Key, Entry>>]>,
    hasher: DefaultHashBuilder,
}

impl MemoryStorage {
    /// Shards are at least this large, so that the per-object limit (at most 1/8 of the
    /// cache, at most 8 MiB) stays well under a shard's capacity.
    const MIN_SHARD_BYTES: u64 = 32 << 20;
    /// Enough shards that workers rarely meet on one lock.
    const MAX_SHARDS: u64 = 4;

    /// Storage of `capacity` bytes under `policy`.
    pub fn new(policy: EvictionPolicy, capacity: u64) -> Self {
        let n = (capacity / Self::MIN_SHARD_BYTES).clamp(1, Self::MAX_SHARDS);
        let n = if n.is_power_of_two() {
            n
        } else {
            n.next_power_of_two() / 2
        };
        let shards = (0..n)
            .map(|_| Mutex::new(AnyEvictor::new(policy, capacity / n)))
            .collect();
        Self {
            shards,
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn shard(&self, key: &KeyRef<'_>) -> Option<&Mutex<AnyEvictor<Key, Entry>>> {
        let n = self.shards.len();
        let i = if n == 1 {
            0
        } else {
            (self.hasher.hash_one(key) >> 32) as usize % n
        };
        self.shards.get(i)
    }
}

impl Storage for MemoryStorage {
    fn get(&self, key: &KeyRef<'_>) -> Option<Entry> {
        self.shard(key)?.lock().get(key).cloned()
    }

    fn peek(&self, key: &KeyRef<'_>) -> Option<Entry> {
        self.shard(key)?.lock().peek(key).cloned()
    }

    fn update(
        &self,
        key: &KeyRef<'_>,
        make: &mut dyn FnMut(Option<&Entry>) -> Option<Entry>,
    ) -> Put {
        let Some(shard) = self.shard(key) else {
            return Put::default();
        };
        let mut garbage = Vec::new();
        let put = {
            let mut ev = shard.lock();
            match make(ev.peek(key)) {
                None => Put::default(),
                Some(entry) => {
                    let owned = key.to_key();
                    let weight = entry.weight(&owned);
                    match ev.insert(owned, entry, weight, &mut garbage) {
                        Ok(evicted) => Put {
                            stored: true,
                            evicted: evicted as u64,
                        },
                        Err(refused) => {
                            garbage.push(refused);
                            Put::default()
                        }
                    }
                }
            }
        };
        // Evicted bodies are freed here, outside the lock.
        drop(garbage);
        put
    }

    fn remove(&self, key: &KeyRef<'_>) -> bool {
        let Some(shard) = self.shard(key) else {
            return false;
        };
        let removed = shard.lock().remove(key);
        removed.is_some()
    }

    fn retain(&self, keep: &mut dyn FnMut(&Key) -> bool) -> u64 {
        let mut n = 0;
        for shard in self.shards.iter() {
            let mut garbage = Vec::new();
            n += shard.lock().retain(|k, _| keep(k), &mut garbage) as u64;
            drop(garbage);
        }
        n
    }

    fn usage(&self) -> Usage {
        self.shards.iter().fold(Usage::default(), |u, s| {
            let ev = s.lock();
            Usage {
                bytes: u.bytes + ev.weight(),
                entries: u.entries + ev.len() as u64,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [EvictionPolicy; 4] = [
        EvictionPolicy::Lru,
        EvictionPolicy::Lfu,
        EvictionPolicy::Fifo,
        EvictionPolicy::TinyLfu,
    ];

    fn put<E: Evictor<u32, u32>>(e: &mut E, k: u32, w: u64) -> Vec<u32> {
        let mut g = Vec::new();
        let _ = e.insert(k, k, w, &mut g);
        g.into_iter().map(|(k, _)| k).filter(|&x| x != k).collect()
    }

    #[test]
    fn lru_evicts_the_least_recently_used_entry() {
        let mut e = Lru::new(30);
        put(&mut e, 1, 10);
        put(&mut e, 2, 10);
        put(&mut e, 3, 10);
        assert!(e.get(&1).is_some());
        assert_eq!(put(&mut e, 4, 10), vec![2]);
        // Byte weights: a 20-byte entry displaces the two oldest.
        assert_eq!(put(&mut e, 5, 20), vec![3, 1]);
        assert_eq!(e.weight(), 30);
    }

    #[test]
    fn fifo_evicts_the_oldest_entry_even_if_it_was_just_used() {
        let mut e = Fifo::new(30);
        put(&mut e, 1, 10);
        put(&mut e, 2, 10);
        put(&mut e, 3, 10);
        assert!(e.get(&1).is_some());
        assert_eq!(put(&mut e, 4, 10), vec![1]);
    }

    #[test]
    fn lfu_evicts_the_least_used_entry_then_the_least_recent_among_equals() {
        let mut e = Lfu::new(30);
        put(&mut e, 1, 10);
        put(&mut e, 2, 10);
        put(&mut e, 3, 10);
        for _ in 0..3 {
            e.get(&1);
        }
        e.get(&2);
        assert_eq!(put(&mut e, 4, 10), vec![3]);
        assert_eq!(put(&mut e, 5, 10), vec![4]);
        // Replacing keeps the use count.
        put(&mut e, 1, 10);
        assert_eq!(put(&mut e, 6, 10), vec![5]);
    }

    #[test]
    fn tinylfu_keeps_popular_entries_against_a_scan_of_one_hit_wonders() {
        let mut e = TinyLfu::new(1000);
        for k in 0..9 {
            put(&mut e, k, 100);
        }
        for _ in 0..5 {
            for k in 0..9 {
                e.get(&k);
            }
        }
        // A scan of new keys, each seen once.
        for k in 100..200 {
            e.get(&k);
            put(&mut e, k, 100);
        }
        let kept = (0..9).filter(|k| e.peek(k).is_some()).count();
        assert!(kept >= 8, "popular entries kept: {kept}");
        // A newcomer seen often enough is admitted.
        for _ in 0..10 {
            e.get(&500);
        }
        put(&mut e, 500, 100);
        put(&mut e, 501, 100);
        assert!(e.peek(&500).is_some());
    }

    #[test]
    fn entry_heavier_than_the_capacity_is_refused() {
        for p in ALL {
            let mut e: AnyEvictor<u32, u32> = AnyEvictor::new(p, 100);
            let mut g = Vec::new();
            assert!(e.insert(1, 1, 101, &mut g).is_err(), "{p:?}");
            assert!(e.is_empty());
        }
    }

    #[test]
    fn replacing_an_entry_updates_its_weight_and_returns_the_old_value() {
        for p in ALL {
            let mut e: AnyEvictor<u32, u32> = AnyEvictor::new(p, 1000);
            let mut g = Vec::new();
            e.insert(1, 10, 100, &mut g).unwrap();
            e.insert(1, 11, 300, &mut g).unwrap();
            assert_eq!(g, vec![(1, 10)], "{p:?}");
            assert_eq!((e.len(), e.weight()), (1, 300), "{p:?}");
            assert_eq!(e.peek(&1), Some(&11));
        }
    }

    #[test]
    fn retain_removes_the_rejected_entries() {
        for p in ALL {
            let mut e: AnyEvictor<u32, u32> = AnyEvictor::new(p, 1000);
            let mut g = Vec::new();
            for k in 0..10 {
                e.insert(k, k, 10, &mut g).unwrap();
            }
            assert_eq!(e.retain(|k, _| k % 2 == 0, &mut g), 5, "{p:?}");
            assert_eq!((e.len(), e.weight()), (5, 50), "{p:?}");
            assert!(e.peek(&1).is_none() && e.peek(&2).is_some());
            assert!(e.remove(&2).is_some() && e.peek(&2).is_none());
        }
    }

    #[test]
    fn policy_names_round_trip_and_empty_means_tinylfu() {
        for p in ALL {
            assert_eq!(EvictionPolicy::from_name(p.name()), Some(p));
        }
        assert_eq!(EvictionPolicy::from_name(""), Some(EvictionPolicy::TinyLfu));
        assert_eq!(EvictionPolicy::from_name("lru"), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u16),
        Get(u8),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), 1u16..400).prop_map(|(k, w)| Op::Insert(k, w)),
            any::<u8>().prop_map(Op::Get),
            any::<u8>().prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn every_policy_stays_within_its_byte_bound_and_accounts_exactly(
            ops in proptest::collection::vec(op(), 1..400),
            which in 0usize..4,
        ) {
            let p = ALL[which];
            let mut e: AnyEvictor<u8, u16> = AnyEvictor::new(p, 1000);
            let mut model = std::collections::HashMap::new();
            for o in ops {
                let mut g = Vec::new();
                match o {
                    Op::Insert(k, w) => {
                        match e.insert(k, w, u64::from(w), &mut g) {
                            Ok(_) => { model.insert(k, w); }
                            Err(_) => { model.remove(&k); }
                        }
                    }
                    Op::Get(k) => { e.get(&k); }
                    Op::Remove(k) => { e.remove(&k); model.remove(&k); }
                }
                for (k, _) in &g {
                    if e.peek(k).is_none() { model.remove(k); }
                }
                prop_assert!(e.weight() <= e.capacity());
                let sum: u64 = model.values().map(|&w| u64::from(w)).sum();
                prop_assert_eq!(e.weight(), sum);
                prop_assert_eq!(e.len(), model.len());
                for (k, w) in &model {
                    prop_assert_eq!(e.peek(k), Some(w));
                }
            }
        }
    }
}
