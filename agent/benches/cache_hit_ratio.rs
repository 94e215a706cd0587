//! Cache benchmarks: (1) hit ratio of each eviction policy on Zipf workloads, (2) the
//! memory the cache spends per entry beyond its body, (3) the cost of a hit.
//!
//! Run: `cargo bench -p weir-agent --bench cache_hit_ratio` (about a minute on 2 cores).
//! `-- --quick` runs 1/10 of the requests. Results and their reading are in
//! `tests/bench/cache/README.md`.
//!
//! Workload: 1,000,000 distinct keys; popularity Zipf(α) over them (α = 0.7, 0.9, 1.1), by
//! inverse-CDF sampling from a seeded SplitMix64, so every run replays the same streams.
//! Each key has a fixed size drawn from a log-normal distribution (median 2 KiB, σ = 1.5,
//! mean ≈ 6.3 KiB, clamped to 64 B .. 1 MiB) independently of its popularity. Cache sizes
//! are 0.1 %, 1 % and 10 % of the working set (the sum of all sizes). Each cell replays
//! 1M warm-up requests, then counts hits over 5M. As in the agent, an object larger than
//! the per-object limit (1/8 of the cache, at most 8 MiB) is never admitted.

use quick_cache::Weighter;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime};
use weir_agent::cache::evict::{AnyEvictor, EvictionPolicy, Evictor};
use weir_agent::cache::{Cache, CacheConfig, FillAction, Lookup};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEYS: usize = 1_000_000;
const WARMUP: usize = 1_000_000;
const MEASURED: usize = 5_000_000;
const ALPHAS: [f64; 3] = [0.7, 0.9, 1.1];
const FRACTIONS: [(f64, &str); 3] = [(0.001, "0.1 %"), (0.01, "1 %"), (0.1, "10 %")];

struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A fixed, fast hasher for u64 keys, so that every run is identical.
#[derive(Clone, Default)]
struct MixState;

struct Mix(u64);

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

impl BuildHasher for MixState {
    type Hasher = Mix;
    fn build_hasher(&self) -> Mix {
        Mix(0x243f_6a88_85a3_08d3)
    }
}

/// Object sizes: log-normal, median 2 KiB, σ = 1.5, clamped to 64 B .. 1 MiB.
fn sizes() -> Vec<u32> {
    let mut rng = SplitMix(7);
    (0..KEYS)
        .map(|_| {
            // Box–Muller.
            let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
            let u2 = rng.next_f64();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (2048.0 * (1.5 * z).exp()).clamp(64.0, (1 << 20) as f64) as u32
        })
        .collect()
}

/// A Zipf(α) stream of key ranks (0 = most popular), by inverse CDF.
fn stream(alpha: f64, len: usize, seed: u64) -> Vec<u32> {
    let mut cdf = Vec::with_capacity(KEYS);
    let mut sum = 0.0;
    for k in 1..=KEYS {
        sum += 1.0 / (k as f64).powf(alpha);
        cdf.push(sum);
    }
    let mut rng = SplitMix(seed);
    (0..len)
        .map(|_| {
            let u = rng.next_f64() * sum;
            cdf.partition_point(|&c| c < u).min(KEYS - 1) as u32
        })
        .collect()
}

/// Ranks are scattered over the key space so that popularity and hash order are unrelated.
fn key_of(rank: u32) -> u64 {
    u64::from(rank).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555
}

#[derive(Clone, Copy)]
enum Candidate {
    Ours(EvictionPolicy),
    /// quick_cache 0.7 (S3-FIFO), the best-kept crate with byte weights, for comparison.
    S3Fifo,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::Ours(p) => p.name(),
            Candidate::S3Fifo => "S3-FIFO (quick_cache)",
        }
    }
}

#[derive(Clone)]
struct SizeWeighter;

impl Weighter<u64, u32> for SizeWeighter {
    fn weight(&self, _key: &u64, val: &u32) -> u64 {
        u64::from(*val)
    }
}

/// Replays a stream; returns (request hit ratio, byte hit ratio).
fn replay(c: Candidate, capacity: u64, sizes: &[u32], reqs: &[u32]) -> (f64, f64) {
    let limit = (capacity / 8).min(8 << 20);
    let (mut hits, mut n, mut hit_bytes, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut count = |i: usize, hit: bool, size: u32| {
        if i >= WARMUP.min(reqs.len() / 6) {
            n += 1;
            bytes += u64::from(size);
            if hit {
                hits += 1;
                hit_bytes += u64::from(size);
            }
        }
    };
    match c {
        Candidate::Ours(p) => {
            let mut ev: AnyEvictor<u64, u32, MixState> =
                AnyEvictor::with_hasher(p, capacity, MixState);
            let mut garbage = Vec::new();
            for (i, &r) in reqs.iter().enumerate() {
                let key = key_of(r);
                let size = sizes[r as usize];
                let hit = ev.get(&key).is_some();
                if !hit && u64::from(size) <= limit {
                    let _ = ev.insert(key, size, u64::from(size), &mut garbage);
                    garbage.clear();
                }
                count(i, hit, size);
            }
        }
        Candidate::S3Fifo => {
            let est = (capacity / 6000).max(64) as usize;
            let mut qc: quick_cache::unsync::Cache<u64, u32, SizeWeighter, MixState> =
                quick_cache::unsync::Cache::with(
                    est,
                    capacity,
                    SizeWeighter,
                    MixState,
                    Default::default(),
                );
            for (i, &r) in reqs.iter().enumerate() {
                let key = key_of(r);
                let size = sizes[r as usize];
                let hit = qc.get(&key).is_some();
                if !hit && u64::from(size) <= limit {
                    qc.insert(key, size);
                }
                count(i, hit, size);
            }
        }
    }
    (
        hits as f64 / n.max(1) as f64,
        hit_bytes as f64 / bytes.max(1) as f64,
    )
}

fn hit_ratio_table(quick: bool) {
    let scale = if quick { 10 } else { 1 };
    let total = (WARMUP + MEASURED) / scale;
    let sizes = sizes();
    let working_set: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    println!(
        "working set: {} keys, {:.2} GB, mean object {:.0} B; {} requests per cell ({} warm-up)",
        KEYS,
        working_set as f64 / 1e9,
        working_set as f64 / KEYS as f64,
        total,
        WARMUP / scale
    );
    let candidates = [
        Candidate::Ours(EvictionPolicy::Lru),
        Candidate::Ours(EvictionPolicy::Lfu),
        Candidate::Ours(EvictionPolicy::Fifo),
        Candidate::S3Fifo,
        Candidate::Ours(EvictionPolicy::TinyLfu),
    ];
    println!();
    println!(
        "| α | cache | {} |",
        candidates
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(candidates.len()));
    let started = Instant::now();
    for (ai, &alpha) in ALPHAS.iter().enumerate() {
        let reqs = stream(alpha, total, 1000 + ai as u64);
        for &(fraction, label) in &FRACTIONS {
            let capacity = (working_set as f64 * fraction) as u64;
            // Two cores: replay the candidates on two threads.
            let results: Vec<(f64, f64)> = std::thread::scope(|s| {
                let handles: Vec<_> = candidates
                    .chunks(candidates.len().div_ceil(2))
                    .map(|chunk| {
                        let (sizes, reqs) = (&sizes, &reqs);
                        s.spawn(move || {
                            chunk
                                .iter()
                                .map(|&c| replay(c, capacity, sizes, reqs))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect()
            });
            println!(
                "| {alpha} | {label} | {} |",
                results
                    .iter()
                    .map(|(r, b)| format!("{:.1} ({:.1})", r * 100.0, b * 100.0))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
    println!();
    println!(
        "cells: request hit ratio % (byte hit ratio %); {:.0?} in all",
        started.elapsed()
    );
}

/// Fills a real `Cache` through its public fill path and counts the bytes allocated.
fn overhead() {
    const N: usize = 100_000;
    const BODY: usize = 1024;
    // Sized so that the entries nearly fill it, as in steady state.
    let mut config = CacheConfig::with_max_size(160 << 20);
    config.eviction = EvictionPolicy::TinyLfu;
    let cache = Cache::new(config);
    let now = SystemTime::now();
    let body = vec![b'x'; BODY];
    let date = httpdate_now(now);
    let mut key_bytes = 0;
    let mut head_bytes = 0;
    let region = Region::new(GLOBAL);
    for i in 0..N {
        let path = format!("/catalog/items/{i:08}?page=1");
        key_bytes += "shop.example".len() + path.len();
        let req = http::Request::get(path).body(()).map(|r| r.into_parts().0);
        let Ok(req) = req else { continue };
        let Lookup::Miss(fill) = cache.lookup("shop.example", &req, now) else {
            continue;
        };
        let resp = http::Response::builder()
            .header("content-type", "application/json")
            .header("cache-control", "public, max-age=300")
            .header("etag", format!("\"v1-{i:08}\""))
            .header("date", date.as_str())
            .header("content-length", BODY)
            .body(())
            .map(|r| r.into_parts().0);
        let Ok(mut resp) = resp else { continue };
        for (name, value) in &resp.headers {
            if name != "content-length" {
                head_bytes += name.as_str().len() + value.len() + 4;
            }
        }
        if let FillAction::Store(mut c) = fill.on_response(&mut resp, now) {
            c.push(&body);
            c.finish();
        }
    }
    let s = region.change();
    let net = s.bytes_allocated as i64 - s.bytes_deallocated as i64;
    let stats = cache.stats();
    let per = |x: i64| x as f64 / stats.entries.max(1) as f64;
    let beyond_body = net - (N * BODY) as i64;
    println!();
    println!(
        "memory: {} entries of a {BODY} B body and 4 stored response fields (~{} B packed)",
        stats.entries,
        head_bytes / N
    );
    println!(
        "  allocated beyond the body: {:.0} B per entry (packed head {:.0} B, key {:.0} B, bookkeeping {:.0} B)",
        per(beyond_body),
        per(head_bytes as i64),
        per(key_bytes as i64),
        per(beyond_body - head_bytes as i64 - key_bytes as i64),
    );
    println!(
        "  charged to maxSize per entry: {:.0} B",
        stats.bytes as f64 / stats.entries.max(1) as f64
    );
    drop(body);

    // The evictor alone (u64 keys and values), i.e. the eviction policy's own cost.
    for p in [
        EvictionPolicy::Lru,
        EvictionPolicy::Lfu,
        EvictionPolicy::Fifo,
        EvictionPolicy::TinyLfu,
    ] {
        let region = Region::new(GLOBAL);
        let mut ev: AnyEvictor<u64, u64> = AnyEvictor::new(p, N as u64 * 1100);
        let mut garbage = Vec::new();
        for i in 0..N as u64 {
            let _ = ev.insert(i, i, 1024, &mut garbage);
            let _ = ev.get(&(i / 2));
        }
        let s = region.change();
        let net = s.bytes_allocated as i64 - s.bytes_deallocated as i64;
        println!(
            "  evictor {:>7} alone (u64 key + u64 value): {:.0} B per entry",
            p.name(),
            net as f64 / ev.len() as f64
        );
        drop(ev);
    }

    // Cost of a hit through `Cache::lookup` (one thread, warm).
    let reqs: Vec<_> = (0..1000)
        .filter_map(|i| {
            http::Request::get(format!("/catalog/items/{i:08}?page=1"))
                .header("accept", "*/*")
                .body(())
                .ok()
                .map(|r| r.into_parts().0)
        })
        .collect();
    let rounds = 1000;
    let started = Instant::now();
    let mut hits = 0;
    for _ in 0..rounds {
        let now = SystemTime::now();
        for r in &reqs {
            if let Lookup::Hit(resp) = cache.lookup("shop.example", r, now) {
                hits += usize::from(!resp.body().is_empty());
            }
        }
    }
    let took = started.elapsed();
    println!(
        "hit: {:.0} ns per lookup (head unpacked into a HeaderMap, body shared), {hits} hits",
        took.as_nanos() as f64 / (rounds * reqs.len()) as f64
    );
    let _ = Duration::ZERO;
}

fn httpdate_now(now: SystemTime) -> String {
    httpdate::fmt_http_date(now)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    if !args.iter().any(|a| a == "--memory-only") {
        hit_ratio_table(quick);
    }
    overhead();
}
