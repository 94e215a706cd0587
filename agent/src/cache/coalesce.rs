//! Request coalescing: one upstream request per URI at a time.
//!
//! The first miss for a URI registers a slot and leads the fill ([`Fill`]); later misses
//! for it subscribe to the slot ([`Waiter`]) and get the leader's stored response, or are
//! told to go upstream themselves when that response is not stored (uncacheable, too
//! large, broken mid-body, or the leader gave up). The slot is a `tokio::sync::watch`
//! channel, so dropping a `Fill` on any path releases its waiters.

use super::entry::{Key, KeyRef, Variant, VariantParts, XCache};
use super::policy::{self, NotStored, RequestHead, StoreMeta};
use super::{Inner, MAX_OBJECT_SIZE_CAP};
use bytes::Bytes;
use hashbrown::HashMap;
use http::header::HeaderMap;
use http::{Method, Request, Response, StatusCode, request, response};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;
use tokio::sync::watch;

/// What a fill ended with, as seen by its waiters.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// Answer with this variant.
    Serve(Variant, XCache),
    /// Nothing to share: go upstream.
    GoUpstream,
}

type Rx = watch::Receiver<Option<Outcome>>;

/// A registered fill: its id (so that a late drop never removes a newer fill's slot) and
/// its sender.
pub(crate) struct Slot {
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

pub(crate) enum Joined {
    Lead(Slot),
    Wait(Rx),
}

/// The fills in progress, by URI.
#[derive(Default)]
pub(crate) struct InFlight {
    map: Mutex<HashMap<Key, (u64, Rx)>>,
    next_id: AtomicU64,
}

impl InFlight {
    /// Subscribes to the fill of `key`, or registers a new one led by the caller.
    pub(crate) fn join_or_lead(&self, key: &KeyRef<'_>) -> Joined {
        let mut map = self.map.lock();
        if let Some((_, rx)) = map.get(key) {
            return Joined::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Relaxed);
        map.insert(key.to_key(), (id, rx));
        Joined::Lead(Slot { id, tx })
    }

    fn unregister(&self, key: &KeyRef<'_>, id: u64) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|(i, _)| *i == id) {
            map.remove(key);
        }
    }

    /// Number of fills in progress.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}

/// What the proxy does with the upstream answer to a fill.
pub enum FillAction {
    /// Send this instead of the upstream answer: the stored response after a 304
    /// revalidated it, or a stale one standing in for an upstream 5xx (stale-if-error).
    Respond(Response<Bytes>),
    /// Send the upstream answer with its body wrapped in
    /// [`TeeBody::new(body, collector)`](super::TeeBody::new): it is stored as it streams.
    Store(Collector),
    /// Send the upstream answer as it is; nothing is stored.
    Forward,
}

impl std::fmt::Debug for FillAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillAction::Respond(r) => write!(f, "Respond({})", r.status()),
            FillAction::Store(_) => f.write_str("Store"),
            FillAction::Forward => f.write_str("Forward"),
        }
    }
}

/// The right (and duty) to fetch a URI from upstream and fill the cache with it: held by
/// the leader of a miss, or by a background stale-while-revalidate refresh. Dropping it
/// without an answer releases the waiters to go upstream themselves.
pub struct Fill {
    inner: Arc<Inner>,
    key: Key,
    slot: Option<Slot>,
    req: RequestHead,
    /// The stored variant being revalidated, if any: source of validators, of the body a
    /// 304 confirms, and of stale-if-error answers.
    stale: Option<Variant>,
    /// Whether the upstream request carries our validators (not the client's own).
    validators_added: bool,
}

impl Fill {
    pub(crate) fn new(
        inner: Arc<Inner>,
        key: KeyRef<'_>,
        slot: Slot,
        req: &request::Parts,
        stale: Option<Variant>,
    ) -> Self {
        let mut headers = req.headers.clone();
        // A fill fetches the whole object: a background refresh started by a ranged
        // request must not store a part as the whole.
        headers.remove(http::header::RANGE);
        headers.remove(http::header::IF_RANGE);
        Self {
            inner,
            key: key.to_key(),
            slot: Some(slot),
            req: RequestHead {
                method: Method::GET,
                uri: req.uri.clone(),
                headers,
            },
            stale,
            validators_added: false,
        }
    }

    /// Whether this fill revalidates a stored response (it then has validators to add).
    pub fn is_revalidation(&self) -> bool {
        self.stale.is_some()
    }

    /// Before going to the origin: asks the lower tiers (disk, then Redis) for the object.
    /// `Ok`: a fresh copy was found and promoted into memory; answer with it (the waiters
    /// get it too). `Err`: go on to the origin with this fill; a stale copy found below
    /// (when memory had none) is revalidated rather than fetched whole.
    pub async fn from_tiers(
        mut self,
        req: &HeaderMap,
        now: SystemTime,
    ) -> Result<Response<Bytes>, Fill> {
        let Some(tiers) = self.inner.tiers.as_ref() else {
            return Err(self);
        };
        let Some((entry, from)) = tiers.read(&self.key.as_key_ref()).await else {
            return Err(self);
        };
        let now_ms = policy::epoch_ms(now);
        let v = entry.select(req).cloned();
        let fresh = v
            .as_ref()
            .is_some_and(|v| policy::is_fresh(v, now_ms, &policy::RequestDirectives::parse(req)));
        // A stale copy below does not replace the stale copy memory already has.
        if fresh || self.stale.is_none() {
            self.inner
                .promote(&self.key.as_key_ref(), entry, from, now_ms);
        }
        let Some(v) = v else {
            return Err(self);
        };
        if fresh {
            let answer = v.to_response(now_ms, false, XCache::Hit);
            self.complete(Outcome::Serve(v, XCache::Hit));
            return Ok(answer);
        }
        if self.stale.is_none() {
            self.stale = Some(v);
        }
        Err(self)
    }

    /// Adds `If-None-Match` / `If-Modified-Since` for the stored response being
    /// revalidated to the upstream request's fields (nothing for a plain miss, or when the
    /// client sent validators of its own).
    pub fn add_validators(&mut self, headers: &mut HeaderMap) {
        if let Some(v) = &self.stale {
            self.validators_added = policy::add_validators(v, headers);
        }
    }

    /// The request a background refresh sends: the triggering request's head as a GET,
    /// with validators. The proxy rewrites it for upstream as it does any request.
    pub fn refresh_request(&mut self) -> request::Parts {
        let mut r = Request::new(());
        *r.uri_mut() = self.req.uri.clone();
        *r.headers_mut() = self.req.headers.clone();
        let (mut parts, ()) = r.into_parts();
        self.add_validators(&mut parts.headers);
        parts
    }

    /// Decides what to do with the upstream answer's head (after the proxy stripped
    /// hop-by-hop fields). Marks it `x-cache: MISS`. `now` is when the head arrived.
    pub fn on_response(mut self, resp: &mut response::Parts, now: SystemTime) -> FillAction {
        let now_ms = policy::epoch_ms(now);
        XCache::Miss.mark(&mut resp.headers);
        let stale_if_error = self.inner.config.stale_if_error;
        let max_object_size = self.inner.config.max_object_size;
        if resp.status == StatusCode::NOT_MODIFIED {
            return self.on_not_modified(&resp.headers, now);
        }
        if policy::is_error_status(resp.status)
            && let Some(old) = self.stale.take()
        {
            if policy::may_serve_stale_on_error(&old, now_ms, stale_if_error) {
                self.inner.stats.stale.fetch_add(1, Relaxed);
                let answer = old.to_response(now_ms, false, XCache::Stale);
                self.complete(Outcome::Serve(old, XCache::Stale));
                return FillAction::Respond(answer);
            }
            // An error does not replace what we have: keep it for a later revalidation.
            self.complete(Outcome::GoUpstream);
            return FillAction::Forward;
        }
        let decided =
            policy::decide_store(&self.req, resp.status, &resp.headers, now, max_object_size)
                .and_then(|meta| {
                    policy::pack_head(&self.req.headers, &resp.headers)
                        .map(|(p, vary)| (meta, p, vary))
                });
        match decided {
            Ok((meta, packer, vary_len)) => {
                let limit =
                    usize::try_from(max_object_size.min(MAX_OBJECT_SIZE_CAP)).unwrap_or(usize::MAX);
                let expected = resp
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                    .unwrap_or(0)
                    .min(limit);
                let buf = packer.into_buffer(expected);
                let head_len = buf.len();
                FillAction::Store(Collector(Box::new(Collecting {
                    fill: self,
                    head_len,
                    vary_len,
                    meta,
                    status: resp.status,
                    stored_at_ms: now_ms,
                    buf,
                    limit,
                    overflowed: false,
                })))
            }
            Err(reason) => {
                tracing::trace!(key = ?self.key, ?reason, "response not stored");
                // A new answer that may not be stored makes the old one obsolete.
                if self.stale.is_some() {
                    self.inner.storage.remove(&self.key.as_key_ref());
                }
                self.complete(Outcome::GoUpstream);
                FillAction::Forward
            }
        }
    }

    fn on_not_modified(mut self, headers: &HeaderMap, now: SystemTime) -> FillAction {
        let now_ms = policy::epoch_ms(now);
        let Some(old) = self.stale.take() else {
            // The client's own conditional request, on a miss: its answer.
            self.complete(Outcome::GoUpstream);
            return FillAction::Forward;
        };
        let refreshed = policy::merge_not_modified(&old, &self.req, headers, now)
            .ok_or(NotStored::NotStorable)
            .and_then(|merged| {
                let meta = policy::decide_store(
                    &self.req,
                    old.status(),
                    &merged,
                    now,
                    self.inner.config.max_object_size,
                )?;
                let (packer, vary_len) = policy::pack_head(&self.req.headers, &merged)?;
                Ok(variant(
                    packer.finish(),
                    vary_len,
                    old.body().clone(),
                    meta,
                    old.status(),
                    now_ms,
                ))
            });
        match refreshed {
            Ok(v) => {
                self.inner.store(&self.key.as_key_ref(), &v);
                let answer = v.to_response(now_ms, false, XCache::Hit);
                self.complete(Outcome::Serve(v, XCache::Hit));
                if self.validators_added {
                    FillAction::Respond(answer)
                } else {
                    FillAction::Forward
                }
            }
            Err(reason) => {
                tracing::trace!(key = ?self.key, ?reason, "304 does not refresh the entry");
                self.inner.storage.remove(&self.key.as_key_ref());
                self.complete(Outcome::GoUpstream);
                if self.validators_added {
                    // The origin confirmed our copy for this request even if it may no
                    // longer be stored: answer with it once.
                    FillAction::Respond(old.to_response(now_ms, false, XCache::Miss))
                } else {
                    FillAction::Forward
                }
            }
        }
    }

    /// The upstream failed (connect error, timeout, reset, after retries): a stale answer
    /// within stale-if-error if there is one (also given to the waiters), else `None` and
    /// the waiters go upstream themselves.
    pub fn fail(mut self, now: SystemTime) -> Option<Response<Bytes>> {
        let now_ms = policy::epoch_ms(now);
        let window = self.inner.config.stale_if_error;
        let old = self
            .stale
            .take()
            .filter(|v| policy::may_serve_stale_on_error(v, now_ms, window))?;
        self.inner.stats.stale.fetch_add(1, Relaxed);
        let answer = old.to_response(now_ms, false, XCache::Stale);
        self.complete(Outcome::Serve(old, XCache::Stale));
        Some(answer)
    }

    /// Unregisters the slot, then publishes the outcome (in that order, so that a request
    /// arriving in between finds the stored entry or leads a new fill, never a dead slot).
    fn complete(&mut self, outcome: Outcome) {
        if let Some(slot) = self.slot.take() {
            self.inner
                .inflight
                .unregister(&self.key.as_key_ref(), slot.id);
            slot.tx.send_replace(Some(outcome));
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.inner
                .inflight
                .unregister(&self.key.as_key_ref(), slot.id);
            // Dropping the sender closes the channel: waiters go upstream.
        }
    }
}

fn variant(
    head: Bytes,
    vary_len: u32,
    body: Bytes,
    meta: StoreMeta,
    status: StatusCode,
    stored_at_ms: u64,
) -> Variant {
    Variant::new(VariantParts {
        head,
        vary_len,
        body,
        stored_at_ms,
        age_secs: meta.age_secs,
        lifetime_secs: meta.lifetime_secs,
        status,
        flags: meta.flags,
        swr_secs: meta.swr_secs,
        sie_secs: meta.sie_secs,
    })
}

/// Collects a storable response's body while it streams to the client, then stores it.
/// Fed by [`TeeBody`](super::TeeBody); usable directly for a body already in memory.
/// The body is appended to the packed head in one buffer, sized from `Content-Length`.
/// (Boxed: it carries the fill and the captured request head, and moves through bodies.)
pub struct Collector(Box<Collecting>);

struct Collecting {
    fill: Fill,
    head_len: usize,
    vary_len: u32,
    meta: StoreMeta,
    status: StatusCode,
    stored_at_ms: u64,
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Collector {
    /// Appends a chunk; `false` once the body exceeds the per-object limit (the collector
    /// should then be dropped: nothing is stored and the waiters go upstream).
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        let this = &mut *self.0;
        if this.overflowed || this.buf.len() - this.head_len + chunk.len() > this.limit {
            this.overflowed = true;
            this.buf = Vec::new();
            return false;
        }
        this.buf.extend_from_slice(chunk);
        true
    }

    /// The body ended cleanly: store the response and hand it to the waiters.
    pub fn finish(self) {
        let mut this = *self.0;
        if this.overflowed {
            return;
        }
        let mut buf = std::mem::take(&mut this.buf);
        // One allocation of exactly head + body stays: growth slack (a body without
        // Content-Length) is given back; with Content-Length there is none.
        buf.shrink_to_fit();
        let block = Bytes::from(buf);
        let v = variant(
            block.slice(..this.head_len),
            this.vary_len,
            block.slice(this.head_len..),
            this.meta,
            this.status,
            this.stored_at_ms,
        );
        this.fill.inner.store(&this.fill.key.as_key_ref(), &v);
        this.fill.complete(Outcome::Serve(v, XCache::Hit));
    }

    /// The body failed or was cut short: store nothing.
    pub fn abandon(self) {}
}

/// A request waiting for another request's fill of the same URI.
pub struct Waiter {
    rx: Rx,
}

impl Waiter {
    pub(crate) fn new(rx: Rx) -> Self {
        Self { rx }
    }

    /// Waits for the fill. `Some`: the answer (`x-cache: HIT`, or `STALE` when the
    /// leader's upstream failed and stale-if-error applied); `None`: forward the request
    /// yourself (the answer was not stored, or varies on fields this request differs in).
    /// `req` are this request's fields, `now` the time the wait began.
    pub async fn wait(mut self, req: &HeaderMap, now: SystemTime) -> Option<Response<Bytes>> {
        let outcome = {
            let r = self.rx.wait_for(Option::is_some).await.ok()?;
            (*r).clone()
        };
        match outcome? {
            Outcome::Serve(v, x) if v.matches(req) => {
                Some(v.to_response(policy::epoch_ms(now), false, x))
            }
            _ => None,
        }
    }
}
