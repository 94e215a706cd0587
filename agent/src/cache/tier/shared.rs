//! The shared tier: a Redis or Valkey server that every agent reads and fills, so an
//! object fetched from the origin by one agent is a hit for the others.
//!
//! One `redis` connection manager for the agent (multiplexed, reconnecting on its own),
//! created lazily so that a Redis that is down at start-up delays nothing. Every read is
//! bounded by [`READ_TIMEOUT`]: a Redis that is down or slow costs a request at most that,
//! and is counted and logged (at most once per [`LOG_EVERY`]). Values are the
//! [`codec`](super::codec) form under `weir:cache:<host><path>`, written with `PX` set to
//! the time the object stays usable, so Redis drops it when this cache would.
//!
//! Purges ([`SharedTier::purge`]) find their keys with `SCAN MATCH` and delete them with
//! `UNLINK`, in batches, on the Redis thread's runtime and a connection of their own: an
//! admin request does not wait for them, a request's read never queues behind them, and
//! one purge runs for at most [`PURGE_BOUND`]. The server is shared, so a purge on one
//! agent clears the objects of every agent (and of every policy that stores the same
//! host: keys carry no policy).

use super::codec;
use crate::cache::entry::{Entry, Key, KeyRef};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;

/// How long a request may wait for Redis before it goes on to the origin. Redis answers
/// a GET on a LAN in well under a millisecond; 50 ms only trips when it is in trouble.
pub const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Bound on a background write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one warning per this much time, however many requests fail.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Key prefix: the server may be shared with other users.
const PREFIX: &str = "weir:cache:";
/// Longest a purge scans and deletes; what it has not reached by then expires by its TTL.
/// SCAN walks the whole keyspace, so a server with many keys (of other users too) can
/// take that long.
pub const PURGE_BOUND: Duration = Duration::from_secs(10);
/// Keys per SCAN step (a hint to the server), so also at most per UNLINK: large enough
/// for few round trips, small enough that no single command holds the server for long.
const SCAN_COUNT: usize = 500;

/// The agent's connection to the shared tier.
pub struct SharedTier {
    conn: ConnectionManager,
    /// For the purges' own connections.
    client: redis::Client,
    url: String,
    last_log_ms: AtomicU64,
    /// Reads and writes that failed or timed out, since start.
    pub(crate) errors: AtomicU64,
    /// The runtime of the Redis thread, where purges run.
    rt: tokio::runtime::Handle,
    /// Purges queued or running, by scope (watched: tests wait for it to empty).
    purges: tokio::sync::watch::Sender<HashMap<PurgeScope, PurgeRun>>,
    /// Purge scans started, since start (tests check that purges share scans).
    pub(crate) purge_scans: AtomicU64,
}

/// What a purge deletes: the keys of `host` (every host when `None`) whose path and query
/// start with `prefix` (`""`: all of them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PurgeScope {
    host: Option<String>,
    prefix: String,
}

impl PurgeScope {
    /// `None` when no key can match: a key's host is never empty and its path always
    /// starts with `/`.
    pub(crate) fn new(host: Option<&str>, prefix: &str) -> Option<Self> {
        if host == Some("") || !(prefix.is_empty() || prefix.starts_with('/')) {
            return None;
        }
        Some(Self {
            host: host.map(str::to_owned),
            prefix: prefix.to_owned(),
        })
    }

    /// The SCAN pattern: it may match more than the scope (`*` crosses `/`, so a path
    /// prefix under any host also matches deeper in a path); [`PurgeScope::covers`]
    /// decides.
    pub(crate) fn pattern(&self) -> String {
        let mut p = String::from(PREFIX);
        match &self.host {
            Some(host) => {
                glob_escape_into(&mut p, host);
                glob_escape_into(
                    &mut p,
                    if self.prefix.is_empty() {
                        "/"
                    } else {
                        &self.prefix
                    },
                );
            }
            None if self.prefix.is_empty() => {}
            None => {
                p.push('*');
                glob_escape_into(&mut p, &self.prefix);
            }
        }
        p.push('*');
        p
    }

    /// Whether Redis key `key` is in the scope. A host has no `/` and a path starts with
    /// one, so the first `/` after the prefix splits them.
    pub(crate) fn covers(&self, key: &[u8]) -> bool {
        let Some(rest) = key.strip_prefix(PREFIX.as_bytes()) else {
            return false;
        };
        let Some(slash) = rest.iter().position(|&b| b == b'/') else {
            return false;
        };
        let (host, pq) = rest.split_at(slash);
        self.covers_parts(host, pq)
    }

    fn covers_parts(&self, host: &[u8], pq: &[u8]) -> bool {
        self.host.as_ref().is_none_or(|h| host == h.as_bytes())
            && pq.starts_with(self.prefix.as_bytes())
    }
}

/// Appends `s` with Redis's glob characters escaped, so hosts such as `[::1]` and paths
/// with `*` or `?` match only themselves.
fn glob_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A purge waiting for, or holding, its scan.
#[derive(Debug, Default)]
pub(crate) struct PurgeRun {
    /// The scan has begun: keys written before it may be behind its cursor.
    started: bool,
    /// Asked for again since the scan began: scan once more when it ends.
    again: bool,
}

/// How a purge scan ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PurgeEnd {
    /// The whole keyspace was scanned.
    Done,
    /// [`PURGE_BOUND`] (or the given deadline) passed first.
    OutOfTime,
    /// Redis could not be reached or answered with an error.
    Failed(String),
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
        let purge_client = client.clone();
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
                let made = rt.block_on(async {
                    ConnectionManager::new_lazy_with_config(client, config)
                        .map(|conn| (conn, tokio::runtime::Handle::current()))
                });
                if tx.send(made).is_ok() {
                    rt.block_on(std::future::pending::<()>());
                }
            });
        if let Err(e) = spawned {
            return Err(err(redis::RedisError::from(e)));
        }
        let (conn, rt) = rx
            .recv()
            .map_err(|_| {
                err(redis::RedisError::from(std::io::Error::other(
                    "the Redis thread stopped",
                )))
            })?
            .map_err(err)?;
        Ok(Self {
            conn,
            client: purge_client,
            url: url.to_owned(),
            last_log_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rt,
            purges: tokio::sync::watch::Sender::new(HashMap::new()),
            purge_scans: AtomicU64::new(0),
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

    /// `key`'s entry, or `None` (absent, undecodable, being purged, Redis failing or
    /// slower than [`READ_TIMEOUT`]).
    pub(crate) async fn read(&self, key: &KeyRef<'_>) -> Option<Entry> {
        // Until a purge's scan has deleted the key, Redis still holds the purged copy: a
        // miss must not bring it back into memory (and onto disk).
        if self.purging(key) {
            return None;
        }
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

    /// Deletes every key of `host` (every host when `None`) whose path and query start with
    /// `prefix` (`""`: all), on a task of the Redis thread, and returns at once. The server
    /// is shared: this clears those objects for every agent that uses it, not only for
    /// this one. A purge asked for while the same one waits to start is that one; asked
    /// for while it scans, it runs once more after (SCAN may miss keys written during a
    /// scan). What a purge does not reach within [`PURGE_BOUND`] expires by its TTL.
    pub(crate) fn purge(self: &Arc<Self>, host: Option<&str>, prefix: &str) {
        let Some(scope) = PurgeScope::new(host, prefix) else {
            return;
        };
        let mut start = false;
        self.purges.send_modify(|runs| match runs.get_mut(&scope) {
            Some(run) if !run.started => {}
            Some(run) => run.again = true,
            None => {
                runs.insert(scope.clone(), PurgeRun::default());
                start = true;
            }
        });
        if start {
            let tier = self.clone();
            self.rt.spawn(async move { tier.run_purge(scope).await });
        }
    }

    /// Whether a queued or running purge covers `key`.
    fn purging(&self, key: &KeyRef<'_>) -> bool {
        let runs = self.purges.borrow();
        !runs.is_empty()
            && runs.keys().any(|scope| {
                scope.covers_parts(key.host().as_bytes(), key.path_and_query().as_bytes())
            })
    }

    /// Waits until no purge is queued or running.
    #[cfg(test)]
    pub(crate) async fn purges_settled(&self) {
        let mut rx = self.purges.subscribe();
        let _ = rx.wait_for(HashMap::is_empty).await;
    }

    async fn run_purge(&self, scope: PurgeScope) {
        loop {
            self.purges.send_modify(|runs| {
                if let Some(run) = runs.get_mut(&scope) {
                    run.started = true;
                    run.again = false;
                }
            });
            self.purge_scans.fetch_add(1, Relaxed);
            let began = Instant::now();
            let (deleted, end) = self.purge_until(&scope, began + PURGE_BOUND).await;
            let (host, prefix, ms) = (
                scope.host.as_deref().unwrap_or("*"),
                scope.prefix.as_str(),
                began.elapsed().as_millis(),
            );
            match end {
                PurgeEnd::Done => {
                    tracing::info!(url = %self.url, host, prefix, deleted, ms, "purged the shared cache tier (Redis)");
                }
                PurgeEnd::OutOfTime => {
                    tracing::warn!(url = %self.url, host, prefix, deleted, ms, "purge of the shared cache tier (Redis) stopped at its time bound; the objects it did not reach expire by their TTL");
                }
                PurgeEnd::Failed(error) => {
                    tracing::warn!(url = %self.url, host, prefix, deleted, error, "purge of the shared cache tier (Redis) failed; the objects it did not reach expire by their TTL");
                }
            }
            let mut again = false;
            self.purges.send_modify(|runs| {
                if runs.get(&scope).is_some_and(|run| run.again) {
                    again = true;
                } else {
                    runs.remove(&scope);
                }
            });
            if !again {
                return;
            }
        }
    }

    /// One scan of the keyspace for `scope`, deleting what it covers in batches, until
    /// the scan ends or `deadline` passes. Returns the keys deleted and how it ended. A
    /// command already sent when the deadline passes still runs on the server.
    pub(crate) async fn purge_until(
        &self,
        scope: &PurgeScope,
        deadline: Instant,
    ) -> (u64, PurgeEnd) {
        let pattern = scope.pattern();
        // Not the requests' multiplexed connection: a GET must not wait behind a batch.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(None);
        let connected = tokio::time::timeout_at(
            deadline,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return (0, PurgeEnd::Failed(e.to_string())),
            Err(_) => return (0, PurgeEnd::OutOfTime),
        };
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            if Instant::now() >= deadline {
                return (deleted, PurgeEnd::OutOfTime);
            }
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .clone();
            let (next, keys) = match tokio::time::timeout_at(
                deadline,
                scan.query_async::<(u64, Vec<Vec<u8>>)>(&mut conn),
            )
            .await
            {
                Ok(Ok(step)) => step,
                Ok(Err(e)) => return (deleted, PurgeEnd::Failed(e.to_string())),
                Err(_) => return (deleted, PurgeEnd::OutOfTime),
            };
            let keys: Vec<Vec<u8>> = keys.into_iter().filter(|k| scope.covers(k)).collect();
            if !keys.is_empty() {
                let unlink = redis::cmd("UNLINK").arg(&keys).clone();
                match tokio::time::timeout_at(deadline, unlink.query_async::<u64>(&mut conn)).await
                {
                    Ok(Ok(n)) => deleted += n,
                    Ok(Err(e)) => return (deleted, PurgeEnd::Failed(e.to_string())),
                    Err(_) => return (deleted, PurgeEnd::OutOfTime),
                }
            }
            if next == 0 {
                return (deleted, PurgeEnd::Done);
            }
            cursor = next;
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
