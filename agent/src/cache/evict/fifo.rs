//! First in, first out: LRU without the move-to-front on a hit.

use super::lru::Lru;
use super::*;

/// First in, first out.
pub struct Fifo<K, V, S = DefaultHashBuilder>(Lru<K, V, S>);

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
