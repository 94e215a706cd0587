//! The slab of nodes linked by `u32` indices, with a `hashbrown::HashTable<u32>` index and
//! intrusive lists, that every eviction policy is built on (~50 bytes of bookkeeping an entry).

use super::*;

pub(super) struct Node<K, V> {
    pub(super) key: K,
    pub(super) value: V,
    pub(super) weight: u32,
    pub(super) prev: u32,
    pub(super) next: u32,
    /// Which list the node is on (TinyLfu) or its use count (Lfu).
    pub(super) tag: u32,
}

pub(super) enum Slot<K, V> {
    Full(Node<K, V>),
    Free(u32),
}

/// A doubly linked list threaded through the arena, with its total weight.
#[derive(Clone, Copy, Debug)]
pub(super) struct List {
    pub(super) head: u32,
    pub(super) tail: u32,
    pub(super) weight: u64,
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
pub(super) struct Slab<K, V> {
    pub(super) chunks: Vec<Vec<Slot<K, V>>>,
}

impl<K, V> Slab<K, V> {
    const SHIFT: u32 = 8;
    const CHUNK: usize = 1 << Self::SHIFT;

    pub(super) fn get(&self, i: u32) -> Option<&Slot<K, V>> {
        self.chunks
            .get((i >> Self::SHIFT) as usize)?
            .get(i as usize & (Self::CHUNK - 1))
    }

    pub(super) fn get_mut(&mut self, i: u32) -> Option<&mut Slot<K, V>> {
        self.chunks
            .get_mut((i >> Self::SHIFT) as usize)?
            .get_mut(i as usize & (Self::CHUNK - 1))
    }

    /// Appends a slot; returns its index.
    pub(super) fn push(&mut self, slot: Slot<K, V>) -> u32 {
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

    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Slot<K, V>)> {
        self.chunks.iter().enumerate().flat_map(|(n, c)| {
            c.iter()
                .enumerate()
                .map(move |(j, s)| (((n << Self::SHIFT) + j) as u32, s))
        })
    }
}

pub(super) struct Arena<K, V, S> {
    pub(super) slots: Slab<K, V>,
    pub(super) free: u32,
    pub(super) index: HashTable<u32>,
    pub(super) hasher: S,
    pub(super) len: usize,
}

impl<K: Hash, V, S: BuildHasher> Arena<K, V, S> {
    pub(super) fn new(hasher: S) -> Self {
        Self {
            slots: Slab { chunks: Vec::new() },
            free: NIL,
            index: HashTable::new(),
            hasher,
            len: 0,
        }
    }

    pub(super) fn hash<Q: Hash + ?Sized>(&self, q: &Q) -> u64 {
        self.hasher.hash_one(q)
    }

    pub(super) fn find<Q: Hash + Equivalent<K> + ?Sized>(&self, hash: u64, q: &Q) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| match slots.get(i) {
                Some(Slot::Full(n)) => q.equivalent(&n.key),
                _ => false,
            })
            .copied()
    }

    pub(super) fn node(&self, i: u32) -> Option<&Node<K, V>> {
        match self.slots.get(i) {
            Some(Slot::Full(n)) => Some(n),
            _ => None,
        }
    }

    pub(super) fn node_mut(&mut self, i: u32) -> Option<&mut Node<K, V>> {
        match self.slots.get_mut(i) {
            Some(Slot::Full(n)) => Some(n),
            _ => None,
        }
    }

    pub(super) fn weight_of(&self, i: u32) -> u64 {
        self.node(i).map_or(0, |n| u64::from(n.weight))
    }

    pub(super) fn tag(&self, i: u32) -> u32 {
        self.node(i).map_or(0, |n| n.tag)
    }

    /// Stores a new node (not yet on any list) and indexes it.
    pub(super) fn alloc(&mut self, hash: u64, key: K, value: V, weight: u32, tag: u32) -> u32 {
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
    pub(super) fn release(&mut self, i: u32) -> Option<(K, V)> {
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

    pub(super) fn push_front(&mut self, list: &mut List, i: u32) {
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

    pub(super) fn unlink(&mut self, list: &mut List, i: u32) {
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
    pub(super) fn replace(&mut self, list: &mut List, i: u32, value: V, weight: u32) -> Option<V> {
        let n = self.node_mut(i)?;
        let old_w = u64::from(n.weight);
        n.weight = weight;
        let old = std::mem::replace(&mut n.value, value);
        list.weight = list.weight - old_w + u64::from(weight);
        Some(old)
    }

    /// Indices of all live nodes (for `retain`).
    pub(super) fn live(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Full(_)))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Weights are stored as `u32`: objects are far smaller than 4 GiB (the per-object limit
/// is at most 8 MiB), and a heavier one is simply refused.
pub(super) fn weight32(weight: u64, capacity: u64) -> Option<u32> {
    if weight > capacity {
        return None;
    }
    u32::try_from(weight).ok()
}
