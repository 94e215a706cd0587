//! The lower cache tiers behind a route's memory cache: a disk tier of the policy's own
//! ([`disk`], `spec.cache.disk`, agents started with `--cache-dir`) and the agent's shared
//! Redis/Valkey tier ([`shared`], `spec.cache.shared`, agents started with
//! `--cache-redis`).
//!
//! Reads: a memory miss that leads a fill (so concurrent misses still cost one look-up)
//! asks the disk, then Redis, before the origin; a hit is promoted into memory (and a
//! Redis hit onto disk). Writes: every object stored in memory is written behind to the
//! lower tiers on a spawned task, off the request path, and dropped when too many writes
//! are already pending (a slow disk or Redis must not pile up memory). Disk keeps
//! everything it can (its size bound evicts, LRU), stale objects included, since they can
//! be revalidated; Redis keeps an object for as long as it stays usable (fresh, then its
//! stale windows), as `PX`. Purges reach both: disk at once, Redis on a background scan.

pub(crate) mod codec;
pub(crate) mod disk;
pub mod shared;

use super::CacheConfig;
use super::entry::{Entry, Key, KeyRef};
use disk::DiskTier;
use shared::SharedTier;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

/// Agent-wide tier settings, from the command line.
#[derive(Debug, Default)]
pub struct TierEnv {
    /// `--cache-dir`: where policies with `spec.cache.disk` keep their disk tier.
    pub cache_dir: Option<PathBuf>,
    /// `--cache-redis`: the shared tier.
    pub shared: Option<Arc<SharedTier>>,
}

static ENV: OnceLock<TierEnv> = OnceLock::new();

/// Sets the agent-wide tier settings, once, before the first routing table is applied
/// (`false` if they were set already).
pub fn configure(env: TierEnv) -> bool {
    ENV.set(env).is_ok()
}

/// The agent-wide tier settings (empty unless [`configure`]d).
pub fn env() -> &'static TierEnv {
    static NONE: TierEnv = TierEnv {
        cache_dir: None,
        shared: None,
    };
    ENV.get().unwrap_or(&NONE)
}

/// Where an object came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tier {
    /// Fetched from the origin into memory.
    Memory,
    /// Read from the disk tier.
    Disk,
    /// Read from the shared tier.
    Shared,
}

/// Most writes pending at once, per route; past it new ones are dropped (and counted).
const MAX_PENDING_WRITES: usize = 64;

/// Counters of one route's lower tiers.
#[derive(Debug, Default)]
pub(crate) struct TierStats {
    pub(crate) disk_hits: AtomicU64,
    pub(crate) disk_misses: AtomicU64,
    pub(crate) shared_hits: AtomicU64,
    pub(crate) shared_misses: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) writes_dropped: AtomicU64,
}

/// A copy of the tier counters, for `/config` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierSnapshot {
    /// Whether the route has a disk tier, and its folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_dir: Option<String>,
    /// Whether the route uses the shared tier, and its URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_url: Option<String>,
    /// Memory misses answered from disk.
    pub disk_hits: u64,
    /// Memory misses that disk did not hold (or could not use).
    pub disk_misses: u64,
    /// Bytes and files on disk now.
    pub disk_bytes: u64,
    /// Files on disk now.
    pub disk_entries: u64,
    /// Memory (and disk) misses answered from Redis.
    pub shared_hits: u64,
    /// Look-ups Redis did not answer (absent, failing or slow).
    pub shared_misses: u64,
    /// Redis reads and writes that failed or timed out (agent-wide).
    pub shared_errors: u64,
    /// Objects written behind to the lower tiers.
    pub writes: u64,
    /// Writes dropped because too many were pending.
    pub writes_dropped: u64,
}

/// One route's lower tiers.
pub(crate) struct Tiers {
    disk: Option<Arc<DiskTier>>,
    shared: Option<Arc<SharedTier>>,
    pub(crate) stats: Arc<TierStats>,
    pending: Arc<AtomicUsize>,
    /// The policy's stale windows (while-revalidate, if-error), in ms, for the Redis
    /// lifetime of objects that state none.
    default_stale_ms: (u64, u64),
}

impl Tiers {
    /// The tiers `config` asks for that `env` provides; `None` when there are none. A disk
    /// folder that cannot be opened is logged and left out (the memory tier still works).
    pub(crate) fn build(config: &CacheConfig, route: &str, env: &TierEnv) -> Option<Self> {
        let disk = match (&env.cache_dir, config.disk_max_size) {
            (Some(dir), size) if size > 0 => {
                let dir = dir.join(folder_name(route));
                match DiskTier::open(dir.clone(), size) {
                    Ok(d) => Some(Arc::new(d)),
                    Err(e) => {
                        tracing::warn!(route, dir = %dir.display(), error = %e, "cannot open the disk cache tier; this route caches in memory only");
                        None
                    }
                }
            }
            _ => None,
        };
        let shared = env.shared.clone().filter(|_| config.shared);
        if disk.is_none() && shared.is_none() {
            return None;
        }
        Some(Self::new(disk, shared, config))
    }

    pub(crate) fn new(
        disk: Option<Arc<DiskTier>>,
        shared: Option<Arc<SharedTier>>,
        config: &CacheConfig,
    ) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            disk,
            shared,
            stats: Arc::default(),
            pending: Arc::default(),
            default_stale_ms: (ms(config.stale_while_revalidate), ms(config.stale_if_error)),
        }
    }

    /// Looks `key` up on disk, then in Redis.
    pub(crate) async fn read(&self, key: &KeyRef<'_>) -> Option<(Entry, Tier)> {
        let st = &self.stats;
        if let Some(disk) = &self.disk {
            // The index answers a miss without touching the disk.
            let found = if disk.contains(key) {
                let (d, k) = (disk.clone(), key.to_key());
                tokio::task::spawn_blocking(move || d.read(&k.as_key_ref()))
                    .await
                    .ok()
                    .flatten()
            } else {
                None
            };
            match found {
                Some(e) => {
                    st.disk_hits.fetch_add(1, Relaxed);
                    return Some((e, Tier::Disk));
                }
                None => st.disk_misses.fetch_add(1, Relaxed),
            };
        }
        if let Some(shared) = &self.shared {
            match shared.read(key).await {
                Some(e) => {
                    st.shared_hits.fetch_add(1, Relaxed);
                    return Some((e, Tier::Shared));
                }
                None => st.shared_misses.fetch_add(1, Relaxed),
            };
        }
        None
    }

    /// Writes `entry` (just stored in memory, having come from `from`) behind to the
    /// tiers below `from`, on a spawned task. Needs a Tokio runtime (every proxy worker
    /// has one); without one, or with too many writes pending, the write is dropped.
    pub(crate) fn write_behind(&self, key: &KeyRef<'_>, entry: Entry, from: Tier, now_ms: u64) {
        let disk = self.disk.clone().filter(|_| from != Tier::Disk);
        let ttl_ms = entry
            .variants()
            .iter()
            .map(|v| v.remaining_use_ms(now_ms, self.default_stale_ms))
            .max()
            .unwrap_or(0);
        let shared = self
            .shared
            .clone()
            .filter(|_| from == Tier::Memory && ttl_ms > 0);
        if disk.is_none() && shared.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.stats.writes_dropped.fetch_add(1, Relaxed);
            return;
        };
        if self.pending.fetch_add(1, Relaxed) >= MAX_PENDING_WRITES {
            self.pending.fetch_sub(1, Relaxed);
            self.stats.writes_dropped.fetch_add(1, Relaxed);
            return;
        }
        let (pending, stats, key) = (self.pending.clone(), self.stats.clone(), key.to_key());
        rt.spawn(async move {
            let entry = Arc::new(entry);
            if let Some(disk) = disk {
                let (k, e) = (key.clone(), entry.clone());
                let written = tokio::task::spawn_blocking(move || disk.write(&k, &e)).await;
                if let Ok(Err(e)) = written {
                    tracing::debug!(key = ?key, error = %e, "disk cache tier write failed");
                }
            }
            if let Some(shared) = shared {
                shared.write(&key, &entry, ttl_ms).await;
            }
            stats.writes.fetch_add(1, Relaxed);
            pending.fetch_sub(1, Relaxed);
        });
    }

    /// Forgets `key` everywhere below memory (after an unsafe request invalidated it).
    pub(crate) fn remove(&self, key: &KeyRef<'_>) {
        if let Some(disk) = &self.disk {
            disk.remove(key);
        }
        if let (Some(shared), Ok(rt)) = (&self.shared, tokio::runtime::Handle::try_current()) {
            let (shared, key) = (shared.clone(), key.to_key());
            rt.spawn(async move { shared.remove(&key.as_key_ref()).await });
        }
    }

    /// Removes from disk every key that fails `keep` (purges). Redis is purged by
    /// [`Tiers::purge_shared`]: a closure cannot be a SCAN pattern.
    pub(crate) fn retain(&self, keep: &mut dyn FnMut(&Key) -> bool) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.retain(keep))
    }

    /// Deletes from Redis the objects of `host` (every host when `None`) whose path and
    /// query start with `prefix` (`""`: all), in the background (see
    /// [`SharedTier::purge`]). Redis is shared by every agent that uses it: a purge on one
    /// agent clears those objects for all of them, and for every policy that stores the
    /// same host. Returns at once; the deletions are logged when they end.
    pub(crate) fn purge_shared(&self, host: Option<&str>, prefix: &str) {
        if let Some(shared) = &self.shared {
            shared.purge(host, prefix);
        }
    }

    pub(crate) fn snapshot(&self) -> TierSnapshot {
        let s = &self.stats;
        let (disk_bytes, disk_entries) = self.disk.as_ref().map_or((0, 0), |d| d.usage());
        TierSnapshot {
            disk_dir: self.disk.as_ref().map(|d| d.dir().display().to_string()),
            shared_url: self.shared.as_ref().map(|r| r.url().to_owned()),
            disk_hits: s.disk_hits.load(Relaxed),
            disk_misses: s.disk_misses.load(Relaxed),
            disk_bytes,
            disk_entries,
            shared_hits: s.shared_hits.load(Relaxed),
            shared_misses: s.shared_misses.load(Relaxed),
            shared_errors: self.shared.as_ref().map_or(0, |r| r.errors.load(Relaxed)),
            writes: s.writes.load(Relaxed),
            writes_dropped: s.writes_dropped.load(Relaxed),
        }
    }
}

/// A folder name for a route: readable, and unique through a hash of the full name.
fn folder_name(route: &str) -> String {
    let readable: String = route
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let id = disk::fnv1a(route.bytes());
    format!("{readable}-{id:016x}")
}

#[cfg(test)]
mod tests;
