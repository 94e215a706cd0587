//! The shared tier: a Redis or Valkey server that every agent reads and fills, so an
//! object fetched from the origin by one agent is a hit for the others.
//!
//! One `redis` connection manager for the agent (multiplexed, reconnecting on its own),
//! created lazily so that a Redis that is down at start-up delays nothing. Every read is
//! bounded by [`READ_TIMEOUT`]: a Redis that is down or slow costs a request at most that,
//! and is counted and logged (at most once per [`LOG_EVERY`]). Values are the
//! [`codec`](super::codec) form under `weir:cache:<host><path>`, written with `PX` set to
//! the time the object stays usable, so Redis drops it when this cache would.

use super::codec;
use crate::cache::entry::{Entry, Key, KeyRef};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How long a request may wait for Redis before it goes on to the origin. Redis answers
/// a GET on a LAN in well under a millisecond; 50 ms only trips when it is in trouble.
pub const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Bound on a background write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one warning per this much time, however many requests fail.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Key prefix: the server may be shared with other users.
const PREFIX: &str = "weir:cache:";

/// The agent's connection to the shared tier.
pub struct SharedTier {
    conn: ConnectionManager,
    url: String,
    last_log_ms: AtomicU64,
    /// Reads and writes that failed or timed out, since start.
    pub(crate) errors: AtomicU64,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Why `--cache-redis` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--cache-redis {url}: {source}")]
pub struct SharedTierError {
    url: String,
    source: redis::RedisError,
}

impl SharedTier {
    /// Parses `url` (`redis://host:port[/db]`); connects on first use.
    pub fn new(url: &str) -> Result<Self, SharedTierError> {
        let err = |source| SharedTierError {
            url: url.to_owned(),
            source,
        };
        let client = redis::Client::open(url).map_err(err)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(WRITE_TIMEOUT))
            // One quick retry; after that the next request tries again.
            .set_number_of_retries(1);
        // The manager spawns a watcher task where it is made: it gets a small runtime of
        // its own, on a thread that lives as long as the agent (this runs before any
        // other runtime exists, and must not tie Redis to one proxy worker).
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("weir-cache-redis".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(redis::RedisError::from(e)));
                        return;
                    }
                };
                let made =
                    rt.block_on(async { ConnectionManager::new_lazy_with_config(client, config) });
                if tx.send(made).is_ok() {
                    rt.block_on(std::future::pending::<()>());
                }
            });
        if let Err(e) = spawned {
            return Err(err(redis::RedisError::from(e)));
        }
        let conn = rx
            .recv()
            .map_err(|_| {
                err(redis::RedisError::from(std::io::Error::other(
                    "the Redis thread stopped",
                )))
            })?
            .map_err(err)?;
        Ok(Self {
            conn,
            url: url.to_owned(),
            last_log_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// The server's URL, for `/config`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn redis_key(key: &KeyRef<'_>) -> String {
        let mut k =
            String::with_capacity(PREFIX.len() + key.host().len() + key.path_and_query().len());
        k.push_str(PREFIX);
        k.push_str(key.host());
        k.push_str(key.path_and_query());
        k
    }

    /// `key`'s entry, or `None` (absent, undecodable, Redis failing or slower than
    /// [`READ_TIMEOUT`]).
    pub(crate) async fn read(&self, key: &KeyRef<'_>) -> Option<Entry> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("GET").arg(Self::redis_key(key)).clone();
        let got =
            tokio::time::timeout(READ_TIMEOUT, cmd.query_async::<Option<Vec<u8>>>(&mut conn)).await;
        match got {
            Ok(Ok(v)) => codec::decode(key, Bytes::from(v?)),
            Ok(Err(e)) => {
                self.failed("read", &e);
                None
            }
            Err(_) => {
                self.failed("read", &"timed out");
                None
            }
        }
    }

    /// Stores `entry` for `ttl_ms` milliseconds.
    pub(crate) async fn write(&self, key: &Key, entry: &Entry, ttl_ms: u64) {
        let value = codec::encode(key, entry);
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("SET")
            .arg(Self::redis_key(&key.as_key_ref()))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .clone();
        match tokio::time::timeout(WRITE_TIMEOUT, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed("write", &e),
            Err(_) => self.failed("write", &"timed out"),
        }
    }

    /// Deletes `key` (after an unsafe request invalidated it).
    pub(crate) async fn remove(&self, key: &KeyRef<'_>) {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("DEL").arg(Self::redis_key(key)).clone();
        match tokio::time::timeout(WRITE_TIMEOUT, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed("delete", &e),
            Err(_) => self.failed("delete", &"timed out"),
        }
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        let n = self.errors.fetch_add(1, Relaxed) + 1;
        let now = crate::cache::policy::epoch_ms(std::time::SystemTime::now());
        let last = self.last_log_ms.load(Relaxed);
        let every = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) >= every
            && self
                .last_log_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(url = %self.url, error = %e, errors = n, "shared cache tier (Redis) {what} failed; requests go on to the origin");
        }
    }
}
