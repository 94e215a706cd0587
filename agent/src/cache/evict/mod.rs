//! Eviction policies: byte-bounded, single-threaded maps with an eviction order.
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
//!
//! One file per policy ([`lru`], [`fifo`], [`lfu`], [`tinylfu`]) over the shared [`arena`];
//! [`AnyEvictor`] picks one at run time. Pure data structures: no clock, no I/O, no locks.

pub(crate) mod arena;
pub(crate) mod fifo;
pub(crate) mod lfu;
pub(crate) mod lru;
pub(crate) mod tinylfu;

pub use fifo::Fifo;
pub use lfu::Lfu;
pub use lru::Lru;
pub use tinylfu::TinyLfu;

use hashbrown::{DefaultHashBuilder, Equivalent, HashTable};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};

/// "No node": the end of a list.
pub(super) const NIL: u32 = u32::MAX;

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
    /// The proto's policy; `None` for a value this agent does not know.
    pub fn from_proto(value: i32) -> Option<Self> {
        use weir_proto::v1::Eviction;
        match Eviction::try_from(value).ok()? {
            Eviction::TinyLfu => Some(Self::TinyLfu),
            Eviction::Lru => Some(Self::Lru),
            Eviction::Lfu => Some(Self::Lfu),
            Eviction::Fifo => Some(Self::Fifo),
        }
    }

    /// Parses the CRD name; empty means the default.
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

#[cfg(test)]
mod tests;
