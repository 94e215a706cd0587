//! The lower tiers without a network: the byte form, the disk tier over a temporary
//! folder (restart, eviction, damaged files), and a memory miss answered from disk.

use super::disk::DiskTier;
use super::*;
use crate::cache::{Cache, CacheConfig, FillAction, Lookup};
use http::{Request, Response};
use std::time::{Duration, SystemTime};

fn key(pq: &str) -> Key {
    KeyRef::new("shop", pq).map(|k| k.to_key()).expect("key")
}

fn get(pq: &str) -> http::request::Parts {
    Request::get(pq).body(()).expect("request").into_parts().0
}

/// A cache over `disk`, with one object stored through a real fill at `now`.
fn cache_over(disk: Option<Arc<DiskTier>>) -> Cache {
    let mut config = CacheConfig::with_max_size(1 << 20);
    config.disk_max_size = 1 << 20;
    let tiers = Tiers::new(disk, None, &config);
    let storage = crate::cache::MemoryStorage::new(config.eviction, config.max_size);
    Cache::build(config, Box::new(storage), Some(tiers))
}

fn store(c: &Cache, pq: &str, cc: &str, body: &[u8], now: SystemTime) {
    let Lookup::Miss(f) = c.lookup("shop", &get(pq), now) else {
        panic!("expected a miss");
    };
    let mut p = Response::builder()
        .header("cache-control", cc)
        .header("etag", "\"e\"")
        .body(())
        .expect("response")
        .into_parts()
        .0;
    let FillAction::Store(mut col) = f.on_response(&mut p, now) else {
        panic!("expected store");
    };
    col.push(body);
    col.finish();
}

async fn settled(c: &Cache, writes: u64) {
    for _ in 0..500 {
        if c.tier_stats().is_some_and(|t| t.writes >= writes) {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("writes did not settle: {:?}", c.tier_stats());
}

#[tokio::test]
async fn the_byte_form_round_trips_and_refuses_another_key_or_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(DiskTier::open(dir.path().join("r"), 1 << 20).expect("open"));
    let c = cache_over(Some(disk.clone()));
    store(&c, "/a", "max-age=60", b"hello", SystemTime::now());
    settled(&c, 1).await;
    let entry = disk.read(&key("/a").as_key_ref()).expect("on disk");
    let bytes = codec::encode(&key("/a"), &entry);
    let back =
        codec::decode(&key("/a").as_key_ref(), bytes::Bytes::from(bytes.clone())).expect("decodes");
    assert_eq!(back.variants()[0].body().as_ref(), b"hello");
    assert_eq!(back.variants()[0].headers(), entry.variants()[0].headers());
    assert!(codec::decode(&key("/b").as_key_ref(), bytes::Bytes::from(bytes.clone())).is_none());
    for cut in [0, 3, 10, bytes.len() - 1] {
        assert!(
            codec::decode(
                &key("/a").as_key_ref(),
                bytes::Bytes::copy_from_slice(&bytes[..cut])
            )
            .is_none(),
            "{cut}"
        );
    }
}

#[tokio::test]
async fn a_memory_miss_is_answered_from_disk_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    {
        let disk = Arc::new(DiskTier::open(dir.path().join("r"), 1 << 20).expect("open"));
        let c = cache_over(Some(disk));
        store(&c, "/a", "max-age=600", b"kept", now);
        settled(&c, 1).await;
    }
    // A new agent: empty memory, the index rebuilt from the folder.
    let disk = Arc::new(DiskTier::open(dir.path().join("r"), 1 << 20).expect("reopen"));
    assert_eq!(disk.usage().1, 1);
    let c = cache_over(Some(disk));
    let Lookup::Miss(f) = c.lookup("shop", &get("/a"), now) else {
        panic!("memory is empty");
    };
    let Ok(r) = f.from_tiers(&http::HeaderMap::new(), now).await else {
        panic!("expected the disk copy");
    };
    assert_eq!(r.body().as_ref(), b"kept");
    let t = c.tier_stats().expect("tiers");
    assert_eq!((t.disk_hits, t.disk_misses), (1, 0));
    // Promoted: the next request is a memory hit.
    assert!(matches!(c.lookup("shop", &get("/a"), now), Lookup::Hit(_)));
    // A key the index does not know is a miss without touching the disk.
    let Lookup::Miss(f) = c.lookup("shop", &get("/none"), now) else {
        panic!("miss");
    };
    assert!(f.from_tiers(&http::HeaderMap::new(), now).await.is_err());
    assert_eq!(c.tier_stats().expect("tiers").disk_misses, 1);
}

#[tokio::test]
async fn a_stale_disk_copy_is_revalidated_instead_of_fetched_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(DiskTier::open(dir.path().join("r"), 1 << 20).expect("open"));
    let t0 = SystemTime::now();
    let c = cache_over(Some(disk.clone()));
    store(&c, "/a", "max-age=1", b"old", t0);
    settled(&c, 1).await;
    let c2 = cache_over(Some(disk));
    let later = t0 + Duration::from_secs(10);
    let Lookup::Miss(f) = c2.lookup("shop", &get("/a"), later) else {
        panic!("memory is empty");
    };
    let Err(mut f) = f.from_tiers(&http::HeaderMap::new(), later).await else {
        panic!("a stale copy must not be served");
    };
    let mut up = http::HeaderMap::new();
    f.add_validators(&mut up);
    assert_eq!(up["if-none-match"], "\"e\"");
}

#[tokio::test]
async fn the_disk_tier_stays_within_its_size_and_purges_reach_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(DiskTier::open(dir.path().join("r"), 16 << 10).expect("open"));
    let c = cache_over(Some(disk.clone()));
    let body = vec![b'x'; 1000];
    for i in 0..40 {
        store(&c, &format!("/{i}"), "max-age=60", &body, SystemTime::now());
        settled(&c, i + 1).await;
    }
    let (bytes, files) = disk.usage();
    assert!(bytes <= 16 << 10, "{bytes}");
    assert!(files < 40 && files > 5, "{files}");
    let on_disk = std::fs::read_dir(disk.dir()).expect("dir").count() as u64;
    assert_eq!(on_disk, files, "evicted files are deleted");
    c.purge_all();
    assert_eq!(disk.usage(), (0, 0));
    assert_eq!(std::fs::read_dir(disk.dir()).expect("dir").count(), 0);
}

#[test]
fn damaged_and_foreign_files_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("r");
    std::fs::create_dir_all(&folder).expect("mkdir");
    std::fs::write(folder.join("not-hex"), b"x").expect("write");
    std::fs::write(folder.join("00000000000000aa"), b"junk").expect("write");
    let id = disk::key_id(&key("/a").as_key_ref());
    std::fs::write(
        folder.join(format!("{id:016x}")),
        b"WRC1\x04\x00\x02\x00shop/a\x09",
    )
    .expect("write");
    let disk = DiskTier::open(folder.clone(), 1 << 20).expect("open");
    assert_eq!(disk.usage().1, 1, "only the file with a key is indexed");
    assert!(
        disk.read(&key("/a").as_key_ref()).is_none(),
        "it does not decode"
    );
    assert_eq!(disk.usage().1, 0);
    assert_eq!(std::fs::read_dir(&folder).expect("dir").count(), 0);
}

#[test]
fn remaining_use_covers_freshness_and_the_stale_windows() {
    let mut config = CacheConfig::with_max_size(1 << 20);
    config.stale_if_error = Duration::from_secs(100);
    let c = Cache::new(config);
    let now = SystemTime::now();
    store(&c, "/a", "max-age=10", b"x", now);
    store(&c, "/b", "max-age=10, stale-if-error=5", b"x", now);
    store(&c, "/c", "max-age=10, must-revalidate", b"x", now);
    let ms = crate::cache::policy::epoch_ms(now);
    let left = |pq: &str| {
        let e = c.inner.storage.peek(&key(pq).as_key_ref()).expect("stored");
        e.variants()[0].remaining_use_ms(ms, (0, 100_000))
    };
    assert_eq!(left("/a"), 110_000);
    assert_eq!(left("/b"), 15_000);
    assert_eq!(left("/c"), 10_000);
}
