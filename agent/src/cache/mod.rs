//! The agent's response cache: a shared HTTP cache (RFC 9111) per route, with request
//! coalescing and the stale-while-revalidate / stale-if-error windows of `spec.cache`.
//!
//! Layout, after pingora-cache: [`policy`] holds the RFC decisions as plain functions;
//! [`storage`] the thread-safe store behind the [`Storage`] trait, over [`evict`], the
//! byte-bounded eviction policies; [`entry`] the compact stored form; [`coalesce`] the in-flight fills that
//! concurrent misses share; [`body`] the body wrapper that fills the cache while the
//! response streams to the client. [`Cache`] ties them together for the proxy.
//!
//! # How the proxy uses it
//!
//! 1. Per route, keep a [`Cache`] built from the route's [`CacheConfig`]; on a table update
//!    keep the old `Cache` when [`Cache::config`] equals the new config (entries survive).
//! 2. For each request call [`Cache::lookup`] with the normalized host, the request head
//!    and `SystemTime::now()`:
//!    - [`Lookup::Hit`]: answer with it.
//!    - [`Lookup::Stale`]: answer with `response`; if `refresh` is `Some`, spawn a task
//!      that sends [`Fill::refresh_request`] upstream and hands the answer to
//!      [`Fill::on_response`] (draining a [`TeeBody`] to the end on `Store`).
//!    - [`Lookup::Miss`]: call [`Fill::add_validators`] on the upstream request's fields,
//!      forward, then [`Fill::on_response`] with the upstream head: `Respond(r)` → answer
//!      `r` instead; `Store(c)` → answer with the upstream head and
//!      `TeeBody::new(body, c)`; `Forward` → answer as usual. If the upstream failed
//!      (after retries), [`Fill::fail`] gives a stale answer within stale-if-error, if any.
//!      Dropping the `Fill` releases the waiters.
//!    - [`Lookup::Wait`]: `waiter.wait(&headers, now).await`: `Some(r)` → answer `r`;
//!      `None` → forward as for [`Lookup::Bypass`].
//!    - [`Lookup::Bypass`]: forward, mark the answer `x-cache: BYPASS`; for an unsafe
//!      method call [`Cache::invalidate_after_unsafe`] with the answer's head, and on an
//!      upstream failure try [`Cache::stale_for_error`].
//!
//! Bodies are `bytes::Bytes`: stored once, and every hit clones the handle, not the data.

pub(crate) mod body;
pub(crate) mod coalesce;
pub(crate) mod entry;
pub mod evict;
pub(crate) mod policy;
pub(crate) mod range;
pub(crate) mod storage;
pub mod tier;

pub use body::TeeBody;
pub use coalesce::{Collector, Fill, FillAction, Waiter};
pub use entry::{Entry, Key, KeyRef, Variant, X_CACHE, XCache};
pub use evict::EvictionPolicy;
pub use storage::{MemoryStorage, Storage};

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Method, Response, StatusCode, request};
use policy::{RequestDirectives, RequestKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

/// Upper bound of the default per-object limit: larger responses stream through uncached.
/// It also bounds the memory one in-flight fill can hold.
pub const MAX_OBJECT_SIZE_CAP: u64 = 8 << 20;

/// Why a cache policy from the controller cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `eviction` names no known policy.
    #[error(
        "unknown cache eviction policy {0} (a newer controller?): this agent knows Lru, Lfu, Fifo and TinyLfu"
    )]
    UnknownEviction(i32),
}

/// A route's cache settings, built once from `spec.cache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bound on the bytes held (bodies, heads, keys and a fixed per-entry overhead).
    pub max_size: u64,
    /// Responses larger than this are never stored (they stream through).
    pub max_object_size: u64,
    /// Eviction policy.
    pub eviction: EvictionPolicy,
    /// How long past freshness a response is served while refreshed in the background.
    pub stale_while_revalidate: Duration,
    /// How long past freshness a response may stand in for an origin failure.
    pub stale_if_error: Duration,
    /// Bytes of the disk tier (0: none; used only with `--cache-dir`).
    pub disk_max_size: u64,
    /// Whether the shared (Redis) tier is used (only with `--cache-redis`).
    pub shared: bool,
    /// Whether a miss asks the owning peer agent first (only with `--cache-peer-addr`).
    pub peers: bool,
}

impl CacheConfig {
    /// The default per-object limit for a cache of `max_size` bytes: 1/8 of it (one object
    /// must not flush most of the cache), at most [`MAX_OBJECT_SIZE_CAP`].
    pub fn default_max_object_size(max_size: u64) -> u64 {
        (max_size / 8).min(MAX_OBJECT_SIZE_CAP)
    }

    /// A config with the defaults for everything but the size.
    pub fn with_max_size(max_size: u64) -> Self {
        Self {
            max_size,
            max_object_size: Self::default_max_object_size(max_size),
            eviction: EvictionPolicy::default(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            disk_max_size: 0,
            shared: false,
            peers: false,
        }
    }

    /// Converts the controller's policy; `Ok(None)` when caching is off (disabled or a
    /// zero size).
    pub fn from_proto(p: &weir_proto::v1::CachePolicy) -> Result<Option<Self>, ConfigError> {
        let eviction = EvictionPolicy::from_proto(p.eviction)
            .ok_or(ConfigError::UnknownEviction(p.eviction))?;
        if !p.enabled || p.max_size_bytes == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            max_size: p.max_size_bytes,
            max_object_size: Self::default_max_object_size(p.max_size_bytes),
            eviction,
            stale_while_revalidate: Duration::from_millis(p.stale_while_revalidate_ms),
            stale_if_error: Duration::from_millis(p.stale_if_error_ms),
            disk_max_size: p.disk_max_size_bytes,
            shared: p.shared,
            peers: p.peers,
        }))
    }
}

/// Counters of one cache. Relaxed atomics: they are statistics, not synchronization.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    coalesced: AtomicU64,
    bypass: AtomicU64,
    stores: AtomicU64,
    evictions: AtomicU64,
    peer_hits: AtomicU64,
    peer_fills: AtomicU64,
    peer_errors: AtomicU64,
}

/// How a peer fill went (see `route::peer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerResult {
    /// The owner answered from its cache.
    Hit,
    /// The owner fetched the object from the origin (and keeps it).
    Fill,
    /// The owner could not be asked or could not answer: the origin was asked instead.
    Error,
}

/// A copy of a cache's counters and usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Answered fresh from the cache (including 304s to clients' own conditionals).
    pub hits: u64,
    /// Fills started (the leader of each coalesced group).
    pub misses: u64,
    /// Answered stale (stale-while-revalidate, stale-if-error).
    pub stale: u64,
    /// Requests that waited for another request's fill.
    pub coalesced: u64,
    /// Requests not eligible (method, range, upgrade, HEAD miss, `no-store`).
    pub bypass: u64,
    /// Responses stored.
    pub stores: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Misses the owning peer answered from its cache (peer fill).
    pub peer_hits: u64,
    /// Misses the owning peer fetched from the origin for us (peer fill).
    pub peer_fills: u64,
    /// Peer fills that failed and went to the origin instead.
    pub peer_errors: u64,
    /// Bytes held.
    pub bytes: u64,
    /// URIs held.
    pub entries: u64,
}

/// The result of [`Cache::lookup`].
pub enum Lookup {
    /// A fresh stored response (`Age` and `x-cache: HIT` set); or a 304 when the client's
    /// own validators match it.
    Hit(Response<Bytes>),
    /// A stale response within stale-while-revalidate (`x-cache: STALE`), to send now.
    /// `refresh` is `Some` for exactly one request while no refresh is running: the proxy
    /// runs it in the background.
    Stale {
        /// The answer.
        response: Response<Bytes>,
        /// The background refresh to run, if this request won it.
        refresh: Option<Fill>,
    },
    /// Nothing usable: this request leads the fill; the proxy forwards it.
    Miss(Fill),
    /// Another request is filling this URI: wait for its answer.
    Wait(Waiter),
    /// The request said `only-if-cached` and nothing stored may answer it: send this
    /// `504` (RFC 9111 §5.2.1.7) without contacting the origin.
    NotCached(Response<Bytes>),
    /// Not cacheable: forward untouched (mark `x-cache: BYPASS`).
    Bypass,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lookup::Hit(r) => write!(f, "Hit({})", r.status()),
            Lookup::Stale { response, refresh } => {
                write!(
                    f,
                    "Stale({}, refresh: {})",
                    response.status(),
                    refresh.is_some()
                )
            }
            Lookup::Miss(_) => f.write_str("Miss"),
            Lookup::Wait(_) => f.write_str("Wait"),
            Lookup::NotCached(_) => f.write_str("NotCached"),
            Lookup::Bypass => f.write_str("Bypass"),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) config: CacheConfig,
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) inflight: coalesce::InFlight,
    pub(crate) stats: CacheStats,
    pub(crate) tiers: Option<tier::Tiers>,
    /// Unix milliseconds before which misses do not ask peers (set by purges).
    peer_fence_until_ms: std::sync::atomic::AtomicU64,
}

/// How long after a purge this agent's misses go to the origin rather than to peers: the
/// owner of an object may not have been purged yet (a purge reaches the agents one by one,
/// e.g. `kubectl weir purge`) and would hand the purged copy back.
pub const PURGE_PEER_FENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl Inner {
    /// Stores `v` under `key` beside the other variants of the URI, and writes the URI
    /// behind to the lower tiers.
    pub(crate) fn store(&self, key: &KeyRef<'_>, v: &Variant) {
        let mut made = None;
        let put = self.storage.update(key, &mut |old| {
            let e = match old {
                Some(e) => e.with(v.clone()),
                None => Entry::single(v.clone()),
            };
            if self.tiers.is_some() {
                made = Some(e.clone());
            }
            Some(e)
        });
        self.count_put(put);
        if let (Some(t), Some(e)) = (&self.tiers, made) {
            t.write_behind(key, e, tier::Tier::Memory, v.stored_at_ms());
        }
    }

    /// Promotes an entry read from a lower tier into memory (and onto disk when it came
    /// from Redis).
    pub(crate) fn promote(&self, key: &KeyRef<'_>, entry: Entry, from: tier::Tier, now_ms: u64) {
        let e = entry.clone();
        let put = self.storage.update(key, &mut |_| Some(e.clone()));
        self.count_put(put);
        if let Some(t) = &self.tiers {
            t.write_behind(key, entry, from, now_ms);
        }
    }

    fn count_put(&self, put: storage::Put) {
        if put.stored {
            self.stats.stores.fetch_add(1, Relaxed);
        }
        self.stats.evictions.fetch_add(put.evicted, Relaxed);
    }
}

/// One route's response cache. Cloning is cheap and shares the cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// An empty in-memory cache.
    pub fn new(config: CacheConfig) -> Self {
        let storage = MemoryStorage::new(config.eviction, config.max_size);
        Self::with_storage(config, Box::new(storage))
    }

    /// The cache of route `route`: in memory, over the lower tiers that its config asks
    /// for and the agent provides ([`tier::configure`]).
    pub fn for_route(config: CacheConfig, route: &str) -> Self {
        let tiers = tier::Tiers::build(&config, route, tier::env());
        let storage = MemoryStorage::new(config.eviction, config.max_size);
        Self::build(config, Box::new(storage), tiers)
    }

    /// A cache over another storage.
    pub fn with_storage(config: CacheConfig, storage: Box<dyn Storage>) -> Self {
        Self::build(config, storage, None)
    }

    pub(crate) fn build(
        config: CacheConfig,
        storage: Box<dyn Storage>,
        tiers: Option<tier::Tiers>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                storage,
                inflight: coalesce::InFlight::default(),
                stats: CacheStats::default(),
                tiers,
                peer_fence_until_ms: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// The lower tiers' counters, if the cache has any.
    pub fn tier_stats(&self) -> Option<tier::TierSnapshot> {
        self.inner.tiers.as_ref().map(tier::Tiers::snapshot)
    }

    /// Lookups answered without the origin, and those that needed it, since start: memory
    /// misses answered by a lower tier or a peer's cache count as hits (the origin did not
    /// see them). What load reports and hit ratios use.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        let st = self.stats();
        let tiers = self.tier_stats().unwrap_or_default();
        let below = tiers.disk_hits + tiers.shared_hits + st.peer_hits;
        (st.hits + st.stale + below, st.misses.saturating_sub(below))
    }

    /// Counts a peer fill's result.
    pub(crate) fn note_peer(&self, result: PeerResult) {
        let s = &self.inner.stats;
        match result {
            PeerResult::Hit => &s.peer_hits,
            PeerResult::Fill => &s.peer_fills,
            PeerResult::Error => &s.peer_errors,
        }
        .fetch_add(1, Relaxed);
    }

    /// The config it was built with (compare to decide whether a table update keeps it).
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Whether two handles share one cache.
    pub fn ptr_eq(&self, other: &Cache) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Counters and usage.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        let usage = self.inner.storage.usage();
        StatsSnapshot {
            hits: s.hits.load(Relaxed),
            misses: s.misses.load(Relaxed),
            stale: s.stale.load(Relaxed),
            coalesced: s.coalesced.load(Relaxed),
            bypass: s.bypass.load(Relaxed),
            stores: s.stores.load(Relaxed),
            evictions: s.evictions.load(Relaxed),
            peer_hits: s.peer_hits.load(Relaxed),
            peer_fills: s.peer_fills.load(Relaxed),
            peer_errors: s.peer_errors.load(Relaxed),
            bytes: usage.bytes,
            entries: usage.entries,
        }
    }

    /// Decides how to answer a request. `host` is the normalized host the route matched
    /// (lower case, no port); `req` the request head as received; `now` the wall clock.
    pub fn lookup(&self, host: &str, req: &request::Parts, now: SystemTime) -> Lookup {
        let inner = &self.inner;
        let kind = policy::classify(&req.method, &req.headers);
        let key = req
            .uri
            .path_and_query()
            .and_then(|pq| KeyRef::new(host, pq.as_str()));
        let (Some(key), RequestKind::Get | RequestKind::Head) = (key, kind) else {
            return self.bypass();
        };
        let head_only = kind == RequestKind::Head;
        // Only a GET's Range is honoured (RFC 9110 §14.2); one probe, on the cached path.
        let ranged = !head_only && req.headers.contains_key(http::header::RANGE);
        let cut = |r: Response<Bytes>| {
            if ranged {
                range::apply(r, &req.headers)
            } else {
                r
            }
        };
        let rd = RequestDirectives::parse(&req.headers);
        let now_ms = policy::epoch_ms(now);
        let entry = inner.storage.get(&key);
        let variant = entry.as_ref().and_then(|e| e.select(&req.headers));
        if let Some(v) = variant {
            if policy::is_fresh(v, now_ms, &rd) {
                inner.stats.hits.fetch_add(1, Relaxed);
                if policy::client_validators_match(&req.headers, v) {
                    return Lookup::Hit(v.to_not_modified(now_ms));
                }
                return Lookup::Hit(cut(v.to_response(now_ms, head_only, XCache::Hit)));
            }
            // Stale, but usable: within the stale-while-revalidate window, or within the
            // client's own max-stale. Either way the entry is refreshed once, behind.
            if policy::may_serve_stale_while_revalidating(
                v,
                now_ms,
                &rd,
                inner.config.stale_while_revalidate,
            ) || policy::may_serve_stale_to_client(v, now_ms, &rd)
            {
                inner.stats.stale.fetch_add(1, Relaxed);
                let refresh = match inner.inflight.join_or_lead(&key) {
                    coalesce::Joined::Lead(slot) => Some(Fill::new(
                        self.inner.clone(),
                        key,
                        slot,
                        req,
                        Some(v.clone()),
                    )),
                    coalesce::Joined::Wait(_) => None,
                };
                return Lookup::Stale {
                    response: cut(v.to_response(now_ms, head_only, XCache::Stale)),
                    refresh,
                };
            }
        }
        if rd.only_if_cached {
            inner.stats.bypass.fetch_add(1, Relaxed);
            return Lookup::NotCached(gateway_timeout());
        }
        // A HEAD miss is forwarded (its answer has no body to store), and so is a request
        // that forbids storing its answer, and a ranged one (its answer is partial).
        if head_only || rd.no_store || ranged {
            return self.bypass();
        }
        match inner.inflight.join_or_lead(&key) {
            coalesce::Joined::Lead(slot) => {
                inner.stats.misses.fetch_add(1, Relaxed);
                Lookup::Miss(Fill::new(
                    self.inner.clone(),
                    key,
                    slot,
                    req,
                    variant.cloned(),
                ))
            }
            coalesce::Joined::Wait(rx) => {
                inner.stats.coalesced.fetch_add(1, Relaxed);
                Lookup::Wait(Waiter::new(rx))
            }
        }
    }

    fn bypass(&self) -> Lookup {
        self.inner.stats.bypass.fetch_add(1, Relaxed);
        Lookup::Bypass
    }

    /// A stale stored answer for a request whose upstream failed (every endpoint failed, or
    /// no endpoint is healthy), if one is within stale-if-error. Marked `x-cache: STALE`.
    pub fn stale_for_error(
        &self,
        host: &str,
        req: &request::Parts,
        now: SystemTime,
    ) -> Option<Response<Bytes>> {
        let kind = policy::classify(&req.method, &req.headers);
        if !matches!(kind, RequestKind::Get | RequestKind::Head) {
            return None;
        }
        let key = KeyRef::new(host, req.uri.path_and_query()?.as_str())?;
        let entry = self.inner.storage.peek(&key)?;
        let v = entry.select(&req.headers)?;
        let now_ms = policy::epoch_ms(now);
        if !policy::may_serve_stale_on_error(v, now_ms, self.inner.config.stale_if_error) {
            return None;
        }
        self.inner.stats.stale.fetch_add(1, Relaxed);
        let head_only = kind == RequestKind::Head;
        let r = v.to_response(now_ms, head_only, XCache::Stale);
        Some(if head_only {
            r
        } else {
            range::apply(r, &req.headers)
        })
    }

    /// After the answer to an unsafe request (POST, PUT, DELETE, PATCH, …) on `host`:
    /// invalidates the target URI and its `Location` / `Content-Location` on the same host
    /// when the status is 2xx or 3xx (RFC 9111 §4.4). Returns how many entries went.
    pub fn invalidate_after_unsafe(
        &self,
        host: &str,
        method: &Method,
        path_and_query: &str,
        status: StatusCode,
        resp_headers: &HeaderMap,
    ) -> usize {
        let targets =
            policy::invalidation_targets(host, method, path_and_query, status, resp_headers);
        self.invalidate(host, &targets)
    }

    /// Removes the objects at `targets` (paths and queries of `host`, every variant) from
    /// memory and the lower tiers; returns how many were in memory.
    pub fn invalidate(&self, host: &str, targets: &[String]) -> usize {
        targets
            .iter()
            .filter_map(|pq| KeyRef::new(host, pq))
            .filter(|k| {
                if let Some(t) = &self.inner.tiers {
                    t.remove(k);
                }
                self.inner.storage.remove(k)
            })
            .count()
    }

    /// Whether misses may ask peers at `now` (not within [`PURGE_PEER_FENCE`] of a purge).
    pub fn peers_open(&self, now: SystemTime) -> bool {
        self.inner.peer_fence_until_ms.load(Relaxed) <= policy::epoch_ms(now)
    }

    /// Removes every entry (memory and disk) whose key fails `keep`; returns how many
    /// went from memory. Closes peer fill for [`PURGE_PEER_FENCE`].
    fn retain(&self, keep: &mut dyn FnMut(&Key) -> bool) -> u64 {
        if self.inner.config.peers {
            let until = policy::epoch_ms(SystemTime::now() + PURGE_PEER_FENCE);
            self.inner.peer_fence_until_ms.store(until, Relaxed);
        }
        if let Some(t) = &self.inner.tiers {
            t.retain(keep);
        }
        self.inner.storage.retain(keep)
    }

    /// Removes everything; returns how many entries went.
    pub fn purge_all(&self) -> u64 {
        if let Some(t) = &self.inner.tiers {
            t.purge_shared(None, "");
        }
        self.retain(&mut |_| false)
    }

    /// Removes every entry of `host` (case-insensitive, port ignored).
    pub fn purge_host(&self, host: &str) -> u64 {
        let host = normalize_purge_host(host);
        if let Some(t) = &self.inner.tiers {
            t.purge_shared(Some(&host), "");
        }
        self.retain(&mut |k| k.host() != host)
    }

    /// Removes every entry whose path (and query) starts with `prefix`, on `host` only
    /// when given.
    pub fn purge_prefix(&self, host: Option<&str>, prefix: &str) -> u64 {
        let host = host.map(normalize_purge_host);
        if let Some(t) = &self.inner.tiers {
            t.purge_shared(host.as_deref(), prefix);
        }
        self.retain(&mut |k| {
            !(host.as_deref().is_none_or(|h| k.host() == h)
                && k.path_and_query().starts_with(prefix))
        })
    }
}

/// The answer to `only-if-cached` when nothing stored may be used.
fn gateway_timeout() -> Response<Bytes> {
    let mut r = Response::new(Bytes::from_static(
        b"only-if-cached: no stored response may answer this request\n",
    ));
    *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    XCache::Miss.mark(h);
    r
}

fn normalize_purge_host(host: &str) -> String {
    let h = host.trim().trim_end_matches('.');
    let h = match h.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => h,
    };
    h.to_ascii_lowercase()
}

#[cfg(test)]
mod tests;
