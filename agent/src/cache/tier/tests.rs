//! The lower tiers: the byte form, the disk tier over a temporary folder (restart,
//! eviction, damaged files), a memory miss answered from disk, and purges reaching the
//! shared tier, against a `redis-server` of the test's own (Debian's package; `.ci/run`
//! installs it) on a Unix socket.

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

// --- purges reach the shared tier (Redis) -----------------------------------------------

use super::shared::{PurgeEnd, PurgeScope, SharedTier};

/// A `redis-server` of its own on a Unix socket in a temporary folder (no port to race
/// for), killed when dropped.
struct Redis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts one and returns once it logs that it accepts connections.
    fn start() -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("redis.sock");
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-server (Debian package redis-server; .ci/run installs it)");
        let mut log = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = log.read_line(&mut line).expect("redis-server log");
            assert!(n > 0, "redis-server exited before it was ready");
            if line
                .to_ascii_lowercase()
                .contains("ready to accept connections")
            {
                break;
            }
        }
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        Self {
            child,
            url: format!("unix://{}", socket.display()),
            _dir: dir,
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn set(conn: &mut redis::aio::MultiplexedConnection, keys: &[String]) {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("SET").arg(k).arg("x").ignore();
    }
    pipe.query_async::<()>(conn).await.expect("SET");
}

/// Holds Redis's `mode` commands (`ALL` or `WRITE`) for `ms` (CLIENT PAUSE); 0 lifts it.
async fn pause(conn: &mut redis::aio::MultiplexedConnection, ms: u64, mode: &str) {
    let mut cmd = redis::cmd("CLIENT");
    if ms == 0 {
        cmd.arg("UNPAUSE");
    } else {
        cmd.arg("PAUSE").arg(ms).arg(mode);
    }
    cmd.query_async::<()>(conn).await.expect("CLIENT PAUSE");
}

async fn dbsize(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE")
        .query_async(conn)
        .await
        .expect("DBSIZE")
}

/// Which of `keys` Redis still holds.
async fn held(conn: &mut redis::aio::MultiplexedConnection, keys: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for k in keys {
        let n: u64 = redis::cmd("EXISTS")
            .arg(*k)
            .query_async(conn)
            .await
            .expect("EXISTS");
        if n == 1 {
            out.push((*k).to_owned());
        }
    }
    out
}

/// A cache whose only lower tier is `shared`.
fn cache_over_redis(shared: &Arc<SharedTier>) -> Cache {
    let config = CacheConfig::with_max_size(1 << 20);
    let tiers = Tiers::new(None, Some(shared.clone()), &config);
    let storage = crate::cache::MemoryStorage::new(config.eviction, config.max_size);
    Cache::build(config, Box::new(storage), Some(tiers))
}

#[test]
fn purge_patterns_escape_globs_and_keys_are_matched_exactly() {
    let scope = |h: Option<&str>, p: &str| PurgeScope::new(h, p).expect("scope");
    assert_eq!(scope(None, "").pattern(), "weir:cache:*");
    assert_eq!(scope(Some("shop"), "").pattern(), "weir:cache:shop/*");
    assert_eq!(scope(None, "/img/").pattern(), "weir:cache:*/img/*");
    assert_eq!(
        scope(Some("[::1]"), r"/a*b?c[d]\e").pattern(),
        r"weir:cache:\[\:\:1\]/a\*b\?c\[d\]\\e*".replace(r"\:", ":")
    );
    // The pattern may match more than the scope; the key test does not.
    let img = scope(None, "/img/");
    assert!(img.covers(b"weir:cache:blog/img/a"));
    assert!(!img.covers(b"weir:cache:blog/x/img/a"));
    assert!(!img.covers(b"other:weir:cache:blog/img/a"));
    let shop = scope(Some("shop"), "/a");
    assert!(shop.covers(b"weir:cache:shop/ab"));
    assert!(!shop.covers(b"weir:cache:shop.example/ab"));
    assert!(!shop.covers(b"weir:cache:blog/a"));
    // Scopes no key can be in: nothing to scan.
    assert!(PurgeScope::new(Some(""), "/").is_none());
    assert!(PurgeScope::new(None, "img/").is_none());
}

#[tokio::test]
async fn purges_reach_redis_by_host_and_prefix_with_glob_characters_taken_literally() {
    let redis = Redis::start();
    let mut conn = redis.conn().await;
    let shared = Arc::new(SharedTier::new(&redis.url).expect("shared tier"));
    let c = cache_over_redis(&shared);
    let keys = [
        "shop/img/a",
        "shop/img/b",
        "shop/imgx",
        "shop/x/img/a",
        "shop.example/img/a",
        "blog/img/a",
        "blog/x/img/a",
        "[::1]/a",
        "[::1]/img/a",
        "1/a",
        "shop/a*b",
        "shop/abc",
        "shop/q?x",
        "shop/qzx",
        "shop/b[1]c",
        "shop/b1c",
        r"shop/c\d",
        "shop/cd",
    ];
    let full: Vec<String> = keys.iter().map(|k| format!("weir:cache:{k}")).collect();
    set(&mut conn, &full).await;
    set(&mut conn, &["other:key".to_owned()]).await;
    let all: Vec<&str> = full.iter().map(String::as_str).collect();
    let gone = |conn: &mut redis::aio::MultiplexedConnection, before: Vec<String>| {
        let all = all.clone();
        let mut conn = conn.clone();
        async move {
            let now = held(&mut conn, &all).await;
            before
                .into_iter()
                .filter(|k| !now.contains(k))
                .map(|k| k.trim_start_matches("weir:cache:").to_owned())
                .collect::<Vec<_>>()
        }
    };
    let mut before = held(&mut conn, &all).await;
    assert_eq!(before.len(), keys.len());
    let step = |purge: &dyn Fn(&Cache)| {
        purge(&c);
        let shared = shared.clone();
        async move { shared.purges_settled().await }
    };

    step(&|c| {
        c.purge_prefix(Some("SHOP:80"), "/img/");
    })
    .await;
    let went = gone(&mut conn, before).await;
    assert_eq!(went, ["shop/img/a", "shop/img/b"]);
    before = held(&mut conn, &all).await;

    step(&|c| {
        c.purge_prefix(None, "/img/");
    })
    .await;
    let went = gone(&mut conn, before).await;
    assert_eq!(went, ["shop.example/img/a", "blog/img/a", "[::1]/img/a"]);
    before = held(&mut conn, &all).await;

    // Glob characters in a prefix match only themselves.
    for prefix in ["/a*", "/q?", "/b[1]", r"/c\"] {
        step(&|c| {
            c.purge_prefix(Some("shop"), prefix);
        })
        .await;
    }
    let went = gone(&mut conn, before).await;
    assert_eq!(went, ["shop/a*b", "shop/q?x", "shop/b[1]c", r"shop/c\d"]);
    before = held(&mut conn, &all).await;

    // An IPv6 host's brackets are not a character class.
    step(&|c| {
        c.purge_host("[::1]");
    })
    .await;
    assert_eq!(gone(&mut conn, before).await, ["[::1]/a"]);
    before = held(&mut conn, &all).await;

    step(&|c| {
        c.purge_host("Shop");
    })
    .await;
    let went = gone(&mut conn, before).await;
    assert_eq!(
        went,
        [
            "shop/imgx",
            "shop/x/img/a",
            "shop/abc",
            "shop/qzx",
            "shop/b1c",
            "shop/cd"
        ]
    );

    step(&|c| {
        c.purge_all();
    })
    .await;
    assert!(held(&mut conn, &all).await.is_empty());
    let other: u64 = redis::cmd("EXISTS")
        .arg("other:key")
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(
        other, 1,
        "keys outside weir:cache: are not weir's to delete"
    );
    let t = c.tier_stats().expect("tiers");
    assert_eq!(t.shared_errors, 0, "{t:?}");
}

#[tokio::test]
async fn a_purge_deletes_in_batches_and_requests_made_meanwhile_share_a_scan() {
    let redis = Redis::start();
    let mut conn = redis.conn().await;
    let shared = Arc::new(SharedTier::new(&redis.url).expect("shared tier"));
    let c = cache_over_redis(&shared);
    // More than one SCAN step (500) and one UNLINK.
    let keys: Vec<String> = (0..2000).map(|i| format!("weir:cache:shop/{i}")).collect();
    set(&mut conn, &keys).await;
    // Redis holds every command for a while, so the purges below all arrive while the
    // first one waits for or holds its scan.
    pause(&mut conn, 300, "ALL").await;
    for _ in 0..50 {
        c.purge_all();
    }
    shared.purges_settled().await;
    let n = dbsize(&mut conn).await;
    assert_eq!(n, 0);
    let scans = shared.purge_scans.load(Relaxed);
    assert!((1..=2).contains(&scans), "{scans} scans for 50 purges");
}

#[tokio::test]
async fn a_purge_stops_at_its_deadline_and_leaves_the_rest_to_expire() {
    let redis = Redis::start();
    let mut conn = redis.conn().await;
    let shared = Arc::new(SharedTier::new(&redis.url).expect("shared tier"));
    let keys: Vec<String> = (0..2000).map(|i| format!("weir:cache:shop/{i}")).collect();
    set(&mut conn, &keys).await;
    let all = PurgeScope::new(None, "").expect("scope");
    // A deadline already passed: nothing is sent.
    let (deleted, end) = shared.purge_until(&all, tokio::time::Instant::now()).await;
    assert_eq!((deleted, end), (0, PurgeEnd::OutOfTime));
    // A server that answers SCAN but holds every deletion: the purge gives up at its
    // deadline, not at Redis's pace, and sends nothing more.
    pause(&mut conn, 60_000, "WRITE").await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    // The pause outlasts the guard by far: only a purge that stops at its own deadline
    // returns within it (the guard turns a hang into a failure; nothing is timed).
    let (deleted, end) =
        tokio::time::timeout(Duration::from_secs(20), shared.purge_until(&all, deadline))
            .await
            .expect("the purge gave up at its deadline, not at Redis's pace");
    assert_eq!((deleted, end), (0, PurgeEnd::OutOfTime));
    pause(&mut conn, 0, "").await;
    // At most the batch in flight at the deadline may still be deleted (if Redis runs it
    // before it sees the purge's connection close); the later batches were never sent.
    let n = dbsize(&mut conn).await;
    assert!(n >= 1000, "{n} keys left");
}

#[tokio::test]
async fn a_miss_does_not_bring_back_from_redis_what_a_purge_is_deleting() {
    let redis = Redis::start();
    let mut conn = redis.conn().await;
    let shared = Arc::new(SharedTier::new(&redis.url).expect("shared tier"));
    let c = cache_over_redis(&shared);
    store(&c, "/a", "max-age=600", b"old", SystemTime::now());
    settled(&c, 1).await;
    let k = key("/a");
    assert!(
        shared.read(&k.as_key_ref()).await.is_some(),
        "written behind"
    );
    // Writes wait: the purge's UNLINK cannot run yet.
    pause(&mut conn, 3000, "WRITE").await;
    c.purge_prefix(Some("shop"), "/");
    assert_eq!(held(&mut conn, &["weir:cache:shop/a"]).await.len(), 1);
    assert!(
        shared.read(&k.as_key_ref()).await.is_none(),
        "the purged copy is not read"
    );
    pause(&mut conn, 0, "").await;
    shared.purges_settled().await;
    assert!(held(&mut conn, &["weir:cache:shop/a"]).await.is_empty());
}
