//! Least recently used: one list, a hit moves the entry to the front.

use super::arena::*;
use super::*;

/// Least recently used.
pub struct Lru<K, V, S = DefaultHashBuilder> {
    pub(super) arena: Arena<K, V, S>,
    pub(super) list: List,
    pub(super) capacity: u64,
    /// FIFO is LRU without the move-to-front on a hit.
    pub(super) touch: bool,
}

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

    pub(super) fn evict_until_fits(&mut self, incoming: u64, garbage: &mut Vec<(K, V)>) -> usize {
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
