//! What the response cache needs from a store ([`Storage`], thread-safe), and
//! [`MemoryStorage`]: an [`AnyEvictor`] sharded behind a few short-held mutexes (pingora-cache's
//! `storage.rs` over `eviction/`).

use super::entry::{Entry, Key, KeyRef};
use super::evict::{AnyEvictor, EvictionPolicy, Evictor};
use hashbrown::DefaultHashBuilder;
use parking_lot::Mutex;
use std::hash::BuildHasher;

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
