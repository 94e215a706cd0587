//! Least frequently used: one list per use count; the least recent entry of the lowest count
//! goes first.

use super::arena::*;
use super::*;

/// Least frequently used, ties broken by recency. Counts are never aged: this is the
/// textbook policy, kept for comparison and for workloads whose popularity never moves.
pub struct Lfu<K, V, S = DefaultHashBuilder> {
    pub(super) arena: Arena<K, V, S>,
    /// Non-empty lists by use count; the first is the eviction end.
    pub(super) by_count: BTreeMap<u32, List>,
    pub(super) weight: u64,
    pub(super) capacity: u64,
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

    pub(super) fn link(&mut self, i: u32, count: u32) {
        if let Some(n) = self.arena.node_mut(i) {
            n.tag = count;
        }
        let mut list = self.by_count.get(&count).copied().unwrap_or_default();
        self.arena.push_front(&mut list, i);
        self.by_count.insert(count, list);
    }

    pub(super) fn unlink(&mut self, i: u32) -> u32 {
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

    pub(super) fn evict_until_fits(&mut self, incoming: u64, garbage: &mut Vec<(K, V)>) -> usize {
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
