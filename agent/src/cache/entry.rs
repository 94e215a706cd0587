//! What the cache stores: keys, and responses in a compact form.
//!
//! A stored response is a [`Variant`]: the body as one `Bytes` (shared by reference count
//! with every hit, never copied again) and the head packed into one more `Bytes`. The head
//! is packed rather than kept as an `http::HeaderMap` for two reasons: a `HeaderMap` of ten
//! fields costs about 1 KiB, and the header values hyper hands us are slices of its read
//! buffer, so keeping them would pin that whole buffer for the life of the entry. A hit
//! unpacks the head into a fresh `HeaderMap` whose values are slices of the packed block
//! (no copy). All variants of one URI (one per `Vary` outcome) live in one [`Entry`], so
//! eviction, invalidation and purge act on the URI as a whole.

use bytes::{BufMut, Bytes};
use hashbrown::Equivalent;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use std::hash::{Hash, Hasher};

/// Fixed cost, in bytes, charged to each stored variant on top of its head and body, so
/// that `maxSize` bounds real memory: the store's node (key pointer, variant record,
/// links), its index slot, the `Bytes` control block and the eviction sketch's share, as
/// measured by `benches/cache_hit_ratio.rs`.
pub const VARIANT_OVERHEAD: u64 = 160;

/// Most variants kept for one URI; a new one replaces the oldest. Real `Vary` fan-out
/// (encodings, a language or two) stays well under this.
pub const MAX_VARIANTS: usize = 4;

/// The `x-cache` response header.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// How an answer relates to the cache, sent as `x-cache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XCache {
    /// Served from the cache without contacting the origin.
    Hit,
    /// Fetched from the origin (and possibly stored).
    Miss,
    /// Served from the cache although stale (stale-while-revalidate or stale-if-error).
    Stale,
    /// The request was not eligible for caching.
    Bypass,
    /// A miss here, answered from the cache of the agent that owns the object (peer fill),
    /// without the origin.
    Peer,
}

impl XCache {
    /// The header value.
    pub fn value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            XCache::Hit => "HIT",
            XCache::Miss => "MISS",
            XCache::Stale => "STALE",
            XCache::Bypass => "BYPASS",
            XCache::Peer => "PEER",
        })
    }

    /// Sets `x-cache` on a response head.
    pub fn mark(self, headers: &mut HeaderMap) {
        headers.insert(X_CACHE, self.value());
    }
}

// ---------------------------------------------------------------------------------------
// Keys.

/// The primary cache key of a stored URI: the normalized host followed by the path and
/// query, e.g. `shop/items?page=2`. The path always starts with `/` and a host never holds
/// one, so the split is unambiguous and purge-by-host needs no second field.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Box<str>);

impl Key {
    /// The host part.
    pub fn host(&self) -> &str {
        self.0.split_once('/').map_or(&*self.0, |(h, _)| h)
    }

    /// The path and query part (starts with `/`).
    pub fn path_and_query(&self) -> &str {
        self.0.find('/').map_or("", |i| &self.0[i..])
    }

    /// The borrowed form.
    pub fn as_key_ref(&self) -> KeyRef<'_> {
        KeyRef {
            host: self.host(),
            pq: self.path_and_query(),
        }
    }

    /// Bytes the key occupies on the heap.
    pub fn heap_len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn hash_key<H: Hasher>(host: &str, pq: &str, state: &mut H) {
    state.write(host.as_bytes());
    state.write_u8(0xff);
    state.write(pq.as_bytes());
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_key(self.host(), self.path_and_query(), state);
    }
}

/// A borrowed key, built on the request path without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRef<'a> {
    host: &'a str,
    pq: &'a str,
}

impl<'a> KeyRef<'a> {
    /// `host` must already be normalized (lower case, no port: what
    /// `proxy::normalize_host` produces); `pq` is the request's path and query. `None` for
    /// a target that has no path (`*`, or a malformed host).
    pub fn new(host: &'a str, pq: &'a str) -> Option<Self> {
        if host.is_empty() || host.contains('/') || !pq.starts_with('/') {
            return None;
        }
        Some(Self { host, pq })
    }

    /// The host part.
    pub fn host(&self) -> &'a str {
        self.host
    }

    /// The path and query part.
    pub fn path_and_query(&self) -> &'a str {
        self.pq
    }

    /// An owned key.
    pub fn to_key(&self) -> Key {
        let mut s = String::with_capacity(self.host.len() + self.pq.len());
        s.push_str(self.host);
        s.push_str(self.pq);
        Key(s.into_boxed_str())
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_key(self.host, self.pq, state);
    }
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        key.0.len() == self.host.len() + self.pq.len()
            && key.0.starts_with(self.host)
            && key.0.ends_with(self.pq)
    }
}

// ---------------------------------------------------------------------------------------
// Packed field lists.

/// Marks a `Vary` record whose request field was absent (distinct from present but empty).
const ABSENT: u16 = u16::MAX;

/// Appends `name: value` records: `[u16 name len][u16 value len][name][value]`.
#[derive(Default)]
pub(crate) struct Packer {
    buf: Vec<u8>,
}

impl Packer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    /// `None` when the field is too long to pack (such a response is not stored).
    pub(crate) fn push(&mut self, name: &[u8], value: Option<&[u8]>) -> Option<()> {
        let n = u16::try_from(name.len()).ok()?;
        let v = match value {
            Some(v) => u16::try_from(v.len()).ok().filter(|&l| l != ABSENT)?,
            None => ABSENT,
        };
        self.buf.put_u16_le(n);
        self.buf.put_u16_le(v);
        self.buf.put_slice(name);
        if let Some(value) = value {
            self.buf.put_slice(value);
        }
        Some(())
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The block alone, in an allocation of its exact size.
    pub(crate) fn finish(self) -> Bytes {
        Bytes::copy_from_slice(&self.buf)
    }

    /// The block as the start of a buffer with room for `body` more bytes, which the body
    /// is then appended to, so that head and body share one allocation of exact size.
    pub(crate) fn into_buffer(self, body: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.buf.len() + body);
        buf.extend_from_slice(&self.buf);
        buf
    }
}

/// Iterates packed records as `(name, value range in the block)`; `None` range = absent.
pub(crate) struct Unpack<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Unpack<'a> {
    pub(crate) fn new(buf: &'a [u8], start: usize, end: usize) -> Self {
        Self {
            buf,
            pos: start,
            end: end.min(buf.len()),
        }
    }
}

impl<'a> Iterator for Unpack<'a> {
    type Item = (&'a [u8], Option<std::ops::Range<usize>>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.buf.get(self.pos..self.end)?;
        let (n, v) = match b {
            [n0, n1, v0, v1, ..] => (
                usize::from(u16::from_le_bytes([*n0, *n1])),
                u16::from_le_bytes([*v0, *v1]),
            ),
            _ => return None,
        };
        let name_start = self.pos + 4;
        let name = self.buf.get(name_start..name_start + n)?;
        let value_start = name_start + n;
        if v == ABSENT {
            self.pos = value_start;
            return Some((name, None));
        }
        let value_end = value_start + usize::from(v);
        if value_end > self.end {
            return None;
        }
        self.pos = value_end;
        Some((name, Some(value_start..value_end)))
    }
}

// ---------------------------------------------------------------------------------------
// Variants and entries.

/// Flags of a stored variant.
pub(crate) mod flags {
    /// Must not be served stale at all (must-revalidate, proxy-revalidate, s-maxage,
    /// no-cache): no stale-while-revalidate, no stale-if-error.
    pub const NO_STALE: u8 = 1;
    /// Must be revalidated before every use (`no-cache` response directive).
    pub const NO_CACHE: u8 = 2;
    /// Carries `Weir-Cache-Control`, kept for later decisions but never sent to clients.
    pub const PRIVATE_TARGET: u8 = 4;
}

/// One stored response.
#[derive(Clone)]
pub struct Variant {
    /// Packed `Vary` request fields, then packed response fields.
    head: Bytes,
    body: Bytes,
    /// When the response was received, in milliseconds since the Unix epoch.
    stored_at_ms: u64,
    /// Its `Age` when received (RFC 9111 §4.2.3), in seconds.
    age_secs: u32,
    /// Its freshness lifetime (RFC 9111 §4.2.1), in seconds.
    lifetime_secs: u32,
    /// Where the response fields start in `head`.
    vary_len: u32,
    /// The response's own stale-while-revalidate / stale-if-error, in seconds
    /// (`policy::NOT_GIVEN`: not stated).
    swr_secs: u32,
    sie_secs: u32,
    status: u16,
    flags: u8,
}

/// What it takes to build a [`Variant`].
pub(crate) struct VariantParts {
    pub head: Bytes,
    pub vary_len: u32,
    pub body: Bytes,
    pub stored_at_ms: u64,
    pub age_secs: u32,
    pub lifetime_secs: u32,
    pub status: StatusCode,
    pub flags: u8,
    pub swr_secs: u32,
    pub sie_secs: u32,
}

impl Variant {
    pub(crate) fn new(p: VariantParts) -> Self {
        Self {
            head: p.head,
            body: p.body,
            stored_at_ms: p.stored_at_ms,
            age_secs: p.age_secs,
            lifetime_secs: p.lifetime_secs,
            vary_len: p.vary_len,
            swr_secs: p.swr_secs,
            sie_secs: p.sie_secs,
            status: p.status.as_u16(),
            flags: p.flags,
        }
    }

    /// Everything it is made of, for the lower tiers' encoding.
    pub(crate) fn parts(&self) -> VariantParts {
        VariantParts {
            head: self.head.clone(),
            vary_len: self.vary_len,
            body: self.body.clone(),
            stored_at_ms: self.stored_at_ms,
            age_secs: self.age_secs,
            lifetime_secs: self.lifetime_secs,
            status: self.status(),
            flags: self.flags,
            swr_secs: self.swr_secs,
            sie_secs: self.sie_secs,
        }
    }

    pub(crate) fn head_bytes(&self) -> &Bytes {
        &self.head
    }

    pub(crate) fn swr_secs(&self) -> u32 {
        self.swr_secs
    }

    pub(crate) fn sie_secs(&self) -> u32 {
        self.sie_secs
    }

    /// When it stops being useful at all at `now_ms`: fresh, then stale but usable within
    /// the larger of its stale windows (the policy's `(swr_ms, sie_ms)` for those it
    /// states none of), in milliseconds from now; 0 once spent. Redis keeps it this long.
    pub fn remaining_use_ms(&self, now_ms: u64, (swr_ms, sie_ms): (u64, u64)) -> u64 {
        let own = |w: u32, default: u64| {
            if w == u32::MAX {
                default
            } else {
                u64::from(w) * 1000
            }
        };
        let stale_ms = if self.flags & flags::NO_STALE != 0 {
            0
        } else {
            own(self.swr_secs, swr_ms).max(own(self.sie_secs, sie_ms))
        };
        let age_ms = u64::from(self.age_secs) * 1000 + now_ms.saturating_sub(self.stored_at_ms);
        (u64::from(self.lifetime_secs) * 1000 + stale_ms).saturating_sub(age_ms)
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK)
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub(crate) fn flags(&self) -> u8 {
        self.flags
    }

    pub(crate) fn stored_at_ms(&self) -> u64 {
        self.stored_at_ms
    }

    pub(crate) fn lifetime_secs(&self) -> u32 {
        self.lifetime_secs
    }

    /// Bytes charged against `maxSize`.
    pub fn weight(&self) -> u64 {
        (self.head.len() + self.body.len()) as u64 + VARIANT_OVERHEAD
    }

    /// Current age in seconds at `now_ms` (RFC 9111 §4.2.3, with the response delay taken
    /// as zero: the agent sits next to the origin).
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        u64::from(self.age_secs) + now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// Whether the freshness lifetime has run out at `now_ms`: RFC 9111 §4.2 calls a response
    /// fresh only while its lifetime is *greater* than its age, so `max-age=0` is stale at once.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        let age_ms = u64::from(self.age_secs) * 1000 + now_ms.saturating_sub(self.stored_at_ms);
        age_ms >= u64::from(self.lifetime_secs) * 1000
    }

    /// Milliseconds the variant has been stale at `now_ms` (0 while fresh).
    pub fn staleness_ms(&self, now_ms: u64) -> u64 {
        let age_ms = u64::from(self.age_secs) * 1000 + now_ms.saturating_sub(self.stored_at_ms);
        age_ms.saturating_sub(u64::from(self.lifetime_secs) * 1000)
    }

    /// The packed `Vary` request fields.
    pub(crate) fn vary_fields(&self) -> Unpack<'_> {
        Unpack::new(&self.head, 0, self.vary_len as usize)
    }

    /// The packed response fields.
    pub(crate) fn fields(&self) -> Unpack<'_> {
        Unpack::new(&self.head, self.vary_len as usize, self.head.len())
    }

    /// A response field's first value.
    pub fn field(&self, name: &HeaderName) -> Option<&[u8]> {
        self.fields()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
            .and_then(|(_, r)| self.head.get(r?))
    }

    /// The stored response fields as a `HeaderMap` (values share the packed block).
    pub fn headers(&self) -> HeaderMap {
        // Room for the fields added on the way out (Age, Content-Length, x-cache).
        let mut map = HeaderMap::with_capacity(self.fields().count() + 3);
        for (name, range) in self.fields() {
            let (Ok(name), Some(range)) = (HeaderName::from_bytes(name), range) else {
                continue;
            };
            if let Ok(v) = HeaderValue::from_maybe_shared(self.head.slice(range)) {
                map.append(name, v);
            }
        }
        map
    }

    /// Whether this variant was stored for a request whose `Vary`-nominated fields equal
    /// those of `req` (RFC 9111 §4.1; values compared after joining repeated fields).
    pub fn matches(&self, req: &HeaderMap) -> bool {
        self.vary_fields().all(|(name, range)| {
            let stored = range.and_then(|r| self.head.get(r));
            let Ok(name) = HeaderName::from_bytes(name) else {
                return false;
            };
            joined_equals(req, &name, stored)
        })
    }

    /// The response to send: stored head plus `Age` and `x-cache`, and the body unless
    /// `head_only` (a HEAD answered from a GET entry keeps the GET's `Content-Length`).
    pub fn to_response(&self, now_ms: u64, head_only: bool, x: XCache) -> Response<Bytes> {
        let mut headers = self.headers();
        headers.insert(header::AGE, HeaderValue::from(self.age_secs(now_ms)));
        // The length is not stored (the head is packed before the body has ended); a
        // HEAD gets the GET's length. 204 and 304 carry none (RFC 9110 §8.6).
        let status = self.status();
        if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        }
        x.mark(&mut headers);
        if self.flags & flags::PRIVATE_TARGET != 0 {
            headers.remove(crate::cache::policy::WEIR_CACHE_CONTROL);
        }
        let body = if head_only {
            Bytes::new()
        } else {
            self.body.clone()
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// A 304 answer to a client's own conditional request that the stored variant
    /// satisfies: the stored fields minus those describing the body (RFC 9110 §15.4.5).
    pub fn to_not_modified(&self, now_ms: u64) -> Response<Bytes> {
        let mut resp = self.to_response(now_ms, true, XCache::Hit);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        let h = resp.headers_mut();
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::CONTENT_RANGE,
        ] {
            h.remove(name);
        }
        resp
    }
}

/// Whether the values of `name` in `req`, joined with `", "`, equal `stored` (`None`:
/// absent). Compares piecewise so nothing is allocated.
fn joined_equals(req: &HeaderMap, name: &HeaderName, stored: Option<&[u8]>) -> bool {
    let mut values = req.get_all(name).iter().peekable();
    let Some(mut rest) = stored else {
        return values.peek().is_none();
    };
    if values.peek().is_none() {
        return false;
    }
    let mut first = true;
    for v in values {
        if !first {
            let Some(r) = rest.strip_prefix(b", ") else {
                return false;
            };
            rest = r;
        }
        first = false;
        let Some(r) = rest.strip_prefix(v.as_bytes()) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

/// Everything stored for one URI: its variants, newest first. Almost every URI has one,
/// kept inline (no allocation of its own).
#[derive(Clone)]
pub struct Entry(Variants);

#[derive(Clone)]
enum Variants {
    One(Variant),
    Many(Box<[Variant]>),
}

impl Entry {
    /// An entry of one variant.
    pub fn single(v: Variant) -> Self {
        Self(Variants::One(v))
    }

    /// The variants, newest first.
    pub fn variants(&self) -> &[Variant] {
        match &self.0 {
            Variants::One(v) => std::slice::from_ref(v),
            Variants::Many(vs) => vs,
        }
    }

    /// The variant matching `req`'s `Vary`-nominated fields, if any.
    pub fn select(&self, req: &HeaderMap) -> Option<&Variant> {
        self.variants().iter().find(|v| v.matches(req))
    }

    /// This entry with `v` added in front, replacing a variant with the same `Vary` values
    /// and dropping the oldest beyond [`MAX_VARIANTS`].
    pub fn with(&self, v: Variant) -> Self {
        let vary = v.head.slice(..(v.vary_len as usize).min(v.head.len()));
        let mut out = Vec::with_capacity((self.variants().len() + 1).min(MAX_VARIANTS));
        out.push(v);
        out.extend(
            self.variants()
                .iter()
                .filter(|old| old.head.get(..old.vary_len as usize) != Some(&vary[..]))
                .take(MAX_VARIANTS - 1)
                .cloned(),
        );
        if out.len() == 1
            && let Some(v) = out.pop()
        {
            return Self::single(v);
        }
        Self(Variants::Many(out.into_boxed_slice()))
    }

    /// Bytes charged against `maxSize` for this entry under `key`.
    pub fn weight(&self, key: &Key) -> u64 {
        self.variants().iter().map(Variant::weight).sum::<u64>() + key.heap_len() as u64
    }
}
