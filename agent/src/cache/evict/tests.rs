//! Tests of the eviction policies: each order, the byte bound, and exact accounting.

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
