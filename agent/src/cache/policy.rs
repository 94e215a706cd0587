//! The RFC 9111 decisions of a shared cache, as plain functions (no clock, no I/O).
//!
//! Freshness lifetime, storability and the merge of a 304 come from the
//! `http-cache-semantics` crate (shared-cache mode); this module adds what the crate leaves
//! to the cache: which requests may be looked up at all, refusing malformed cache fields
//! (the crate would quietly read a bad `max-age` as 0), request directives on lookup,
//! the stale windows, validators, and invalidation after unsafe requests (§4.4).
//! Time is passed in as `SystemTime` or milliseconds since the Unix epoch.

use super::entry::{Packer, Variant, flags};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_cache_semantics::{AfterResponse, CacheOptions, CachePolicy, RequestLike, ResponseLike};
use std::time::{Duration, SystemTime};

/// Milliseconds since the Unix epoch (0 before it).
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------
// Requests.

/// How the cache treats a request, from its method and fields alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// A GET that may be answered from, and stored in, the cache.
    Get,
    /// A HEAD: answered from a stored GET when there is one, otherwise forwarded.
    Head,
    /// A safe request the cache does not handle (OPTIONS, TRACE, a ranged or upgrading GET,
    /// a GET with a body): forwarded untouched.
    Bypass,
    /// An unsafe method (RFC 9110 §9.2.1): forwarded, then the URI is invalidated if it
    /// succeeded ([`invalidation_targets`]).
    Unsafe,
}

/// Classifies a request. A ranged GET is a GET: it is cut from a stored full response
/// ([`range`](super::range)), and forwarded as it is on a miss. Upgrades (WebSocket) and
/// requests with a body are never cached.
pub fn classify(method: &Method, headers: &HeaderMap) -> RequestKind {
    let kind = match *method {
        Method::GET => RequestKind::Get,
        Method::HEAD => RequestKind::Head,
        Method::OPTIONS | Method::TRACE | Method::CONNECT => return RequestKind::Bypass,
        _ => return RequestKind::Unsafe,
    };
    // One pass over the (few) request fields beats a hash probe per name.
    for (name, value) in headers {
        let bypass = *name == header::UPGRADE
            || *name == header::TRANSFER_ENCODING
            || (*name == header::CONTENT_LENGTH && value.as_bytes() != b"0");
        if bypass {
            return RequestKind::Bypass;
        }
    }
    kind
}

/// The request's `Cache-Control` directives that a shared cache acts on (RFC 9111 §5.2.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `no-cache` (or `Pragma: no-cache` without `Cache-Control`): revalidate first.
    pub no_cache: bool,
    /// `no-store`: do not store the response.
    pub no_store: bool,
    /// `max-age`: the client accepts no older response, in seconds.
    pub max_age: Option<u64>,
    /// `min-fresh`: the response must stay fresh this much longer, in seconds.
    pub min_fresh: Option<u64>,
    /// `max-stale[=N]`: the client accepts a response stale by at most N seconds (any
    /// staleness without a value: `u64::MAX`).
    pub max_stale: Option<u64>,
    /// `only-if-cached`: answer from the cache or with 504, never from the origin.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// Reads the directives; a malformed `Cache-Control` counts as `no-cache`, the safe
    /// reading. A request without the field costs one map probe.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = Self::default();
        if !headers.contains_key(header::CACHE_CONTROL) {
            d.no_cache = headers
                .get_all(header::PRAGMA)
                .iter()
                .any(|v| contains_token(v.as_bytes(), b"no-cache"));
            return d;
        }
        let parsed = parse_cache_control(headers.get_all(header::CACHE_CONTROL).iter());
        let Ok(list) = parsed else {
            d.no_cache = true;
            return d;
        };
        for (name, value) in list {
            match name {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "max-age" => match value.and_then(parse_delta) {
                    Some(v) => d.max_age = Some(v),
                    None => d.no_cache = true,
                },
                "min-fresh" => d.min_fresh = value.and_then(parse_delta),
                // A bad value is read as no max-stale: the client gets no staler answer
                // than it would without the directive.
                "max-stale" => {
                    d.max_stale = match value {
                        None => Some(u64::MAX),
                        Some(v) => parse_delta(v),
                    }
                }
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        }
        d
    }

    /// Whether any directive constrains reuse (then no stale answer is given).
    fn constrains(&self) -> bool {
        self.no_cache || self.max_age.is_some() || self.min_fresh.is_some()
    }
}

fn contains_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(token))
}

/// `delta-seconds` (RFC 9111 §1.2.2): digits only; values past `u32` saturate, as the
/// RFC asks, to about 136 years.
fn parse_delta(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .unwrap_or(u64::MAX)
            .min(u64::from(u32::MAX)),
    )
}

// ---------------------------------------------------------------------------------------
// Field syntax.

/// Why a response is not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    /// A cache field (`Cache-Control`, `Expires`, `Date`, `Age`, `Last-Modified`, `Vary`)
    /// does not parse, or a directive is repeated with different values.
    Malformed(&'static str),
    /// RFC 9111 §3 forbids it (method, status, `no-store`, `private`, `Authorization`, no
    /// freshness information and a status that is not heuristically cacheable).
    NotStorable,
    /// `Vary: *`: no later request can match.
    VaryStar,
    /// `Set-Cookie`: one client's cookie must not be handed to others.
    SetCookie,
    /// The request said `no-store`.
    RequestNoStore,
    /// `Content-Length` beyond the per-object limit.
    TooLarge,
    /// Neither fresh nor revalidatable: storing it would gain nothing.
    Useless,
    /// A field too long to pack (over 64 KiB).
    FieldTooLong,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses `Cache-Control` values into lower-case-insensitive `(name, value)` pairs.
/// Errors on bad syntax and on a directive repeated with a different value (RFC 9111
/// §4.2.1: such freshness information is invalid).
pub fn parse_cache_control<'a>(
    values: impl Iterator<Item = &'a HeaderValue>,
) -> Result<Vec<(&'a str, Option<&'a str>)>, NotStored> {
    const BAD: NotStored = NotStored::Malformed("Cache-Control");
    let mut out: Vec<(&'a str, Option<&'a str>)> = Vec::new();
    for v in values {
        let s = v.to_str().map_err(|_| BAD)?;
        let mut rest = s;
        while !rest.is_empty() {
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            let name_end = rest
                .find(|c: char| !is_tchar(c as u8))
                .unwrap_or(rest.len());
            if name_end == 0 {
                return Err(BAD);
            }
            let (name, tail) = rest.split_at(name_end);
            let mut tail = tail.trim_start_matches([' ', '\t']);
            let mut value = None;
            if let Some(t) = tail.strip_prefix('=') {
                let t = t.trim_start_matches([' ', '\t']);
                if let Some(q) = t.strip_prefix('"') {
                    // quoted-string; escapes are kept verbatim (no directive we read uses one).
                    let mut end = None;
                    let mut escaped = false;
                    for (i, c) in q.char_indices() {
                        match (escaped, c) {
                            (true, _) => escaped = false,
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                end = Some(i);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let end = end.ok_or(BAD)?;
                    value = Some(&q[..end]);
                    tail = &q[end + 1..];
                } else {
                    let end = t.find(|c: char| !is_tchar(c as u8)).unwrap_or(t.len());
                    if end == 0 {
                        return Err(BAD);
                    }
                    value = Some(&t[..end]);
                    tail = &t[end..];
                }
            }
            tail = tail.trim_start_matches([' ', '\t']);
            if !(tail.is_empty() || tail.starts_with(',')) {
                return Err(BAD);
            }
            rest = tail;
            match out.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                Some((_, v)) if *v != value => return Err(BAD),
                Some(_) => {}
                None => out.push((name, value)),
            }
        }
    }
    for (name, value) in &mut out {
        // Names are case-insensitive; hand back canonical lower case for the ones we read.
        for known in KNOWN_DIRECTIVES {
            if name.eq_ignore_ascii_case(known) {
                *name = known;
            }
        }
        let needs_delta = matches!(
            *name,
            "max-age" | "s-maxage" | "min-fresh" | "stale-while-revalidate" | "stale-if-error"
        );
        if needs_delta && value.and_then(parse_delta).is_none() {
            return Err(BAD);
        }
    }
    Ok(out)
}

const KNOWN_DIRECTIVES: [&str; 14] = [
    "only-if-cached",
    "max-age",
    "s-maxage",
    "min-fresh",
    "max-stale",
    "no-cache",
    "no-store",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "stale-while-revalidate",
    "stale-if-error",
    "immutable",
];

fn valid_date(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(name).iter().count() <= 1
        && headers.get(name).is_none_or(|v| {
            v.to_str()
                .is_ok_and(|s| httpdate::parse_http_date(s).is_ok())
        })
}

/// The targeted cache-control fields (RFC 9213) this cache obeys, highest precedence
/// first: `Weir-Cache-Control` speaks to weir alone (it is never sent on to clients, as
/// Cloudflare does with its own field), `CDN-Cache-Control` to every CDN-like cache and is
/// forwarded, which RFC 9213 §3 calls the typical behaviour.
pub const TARGETED_FIELDS: [HeaderName; 2] = [
    WEIR_CACHE_CONTROL,
    HeaderName::from_static("cdn-cache-control"),
];

/// `Weir-Cache-Control`: cache directives for weir's cache only.
pub const WEIR_CACHE_CONTROL: HeaderName = HeaderName::from_static("weir-cache-control");

/// The response fields the cache decides on: `headers` itself, or, when a targeted field
/// has a valid non-empty value (RFC 9213 §2.2), a copy where that value stands in for
/// `Cache-Control` and `Expires` is gone (the RFC says to ignore both). The values are
/// read with the `Cache-Control` parser, which accepts every dictionary a Structured Field
/// parser would for the directives caches use (only the error cases differ).
/// Copies only when a targeted field is present: the store path, never a hit.
pub fn effective_fields(headers: &HeaderMap) -> std::borrow::Cow<'_, HeaderMap> {
    for name in &TARGETED_FIELDS {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        let valid =
            parse_cache_control(headers.get_all(name).iter()).is_ok_and(|list| !list.is_empty());
        if !valid {
            continue;
        }
        let mut h = headers.clone();
        h.remove(header::CACHE_CONTROL);
        h.remove(header::EXPIRES);
        for v in headers.get_all(name) {
            h.append(header::CACHE_CONTROL, v.clone());
        }
        return std::borrow::Cow::Owned(h);
    }
    std::borrow::Cow::Borrowed(headers)
}

/// Checks the cache-related response fields. `Expires` only matters without `max-age` /
/// `s-maxage` (RFC 9111 §5.3), so a junk `Expires` beside them is tolerated.
pub fn check_fields(headers: &HeaderMap) -> Result<Vec<(&str, Option<&str>)>, NotStored> {
    let cc = parse_cache_control(headers.get_all(header::CACHE_CONTROL).iter())?;
    let explicit = cc.iter().any(|(n, _)| *n == "max-age" || *n == "s-maxage");
    if !explicit && !valid_date(headers, &header::EXPIRES) {
        return Err(NotStored::Malformed("Expires"));
    }
    if !valid_date(headers, &header::DATE) {
        return Err(NotStored::Malformed("Date"));
    }
    if !valid_date(headers, &header::LAST_MODIFIED) {
        return Err(NotStored::Malformed("Last-Modified"));
    }
    let mut ages = headers.get_all(header::AGE).iter();
    if let Some(age) = ages.next()
        && (ages.next().is_some() || age.to_str().ok().and_then(parse_delta).is_none())
    {
        return Err(NotStored::Malformed("Age"));
    }
    for v in headers.get_all(header::VARY) {
        let s = v.to_str().map_err(|_| NotStored::Malformed("Vary"))?;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStored::VaryStar);
            }
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(NotStored::Malformed("Vary"));
            }
        }
    }
    Ok(cc)
}

// ---------------------------------------------------------------------------------------
// Storing.

/// The parts of the request a stored response depends on, captured when a fill starts.
#[derive(Clone, Debug)]
pub struct RequestHead {
    /// Method (GET for every fill; kept for the freshness crate).
    pub method: Method,
    /// Request target as received.
    pub uri: Uri,
    /// Request fields (for `Authorization`, `Cache-Control` and `Vary`).
    pub headers: HeaderMap,
}

impl RequestLike for RequestHead {
    fn uri(&self) -> Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        &self.uri == other
    }
    fn method(&self) -> &Method {
        &self.method
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

struct ResponseView<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
}

impl ResponseLike for ResponseView<'_> {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

fn crate_options() -> CacheOptions {
    CacheOptions {
        shared: true,
        // RFC 9111 §4.2.2 suggests 10 % of the time since Last-Modified.
        cache_heuristic: 0.1,
        immutable_min_time_to_live: Duration::from_secs(24 * 3600),
        ignore_cargo_cult: false,
    }
}

/// How a response may be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreMeta {
    /// Its `Age` on arrival, in seconds.
    pub age_secs: u32,
    /// Its freshness lifetime, in seconds (0: stale at once, usable after revalidation).
    pub lifetime_secs: u32,
    /// [`flags`] bits.
    pub flags: u8,
    /// The response's own `stale-while-revalidate`, in seconds ([`NOT_GIVEN`]: none).
    pub swr_secs: u32,
    /// The response's own `stale-if-error`, in seconds ([`NOT_GIVEN`]: none).
    pub sie_secs: u32,
}

/// A stale window the response did not state (the policy's value applies).
pub const NOT_GIVEN: u32 = u32::MAX;

/// Decides whether a response to `req` may be stored by a shared cache, and for how long it
/// is fresh. `response_time` is when its head arrived.
pub fn decide_store(
    req: &RequestHead,
    status: StatusCode,
    headers: &HeaderMap,
    response_time: SystemTime,
    max_object_size: u64,
) -> Result<StoreMeta, NotStored> {
    if RequestDirectives::parse(&req.headers).no_store {
        return Err(NotStored::RequestNoStore);
    }
    let targeted = headers.contains_key(WEIR_CACHE_CONTROL);
    let fields = effective_fields(headers);
    let headers = &*fields;
    let cc = check_fields(headers)?;
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > max_object_size
    {
        return Err(NotStored::TooLarge);
    }
    let policy = CachePolicy::new_options(
        req,
        &ResponseView { status, headers },
        response_time,
        crate_options(),
    );
    if !policy.is_storable() {
        return Err(NotStored::NotStorable);
    }
    let has = |d: &str| cc.iter().any(|(n, _)| *n == d);
    let mut f = 0;
    if has("no-cache") {
        f |= flags::NO_CACHE | flags::NO_STALE;
    }
    // s-maxage implies proxy-revalidate for a shared cache (RFC 9111 §5.2.2.10).
    if has("must-revalidate") || has("proxy-revalidate") || has("s-maxage") {
        f |= flags::NO_STALE;
    }
    let age = policy.age(response_time).as_secs();
    let ttl = policy.time_to_live(response_time).as_secs();
    let lifetime = if ttl == 0 { 0 } else { age.saturating_add(ttl) };
    let revalidatable =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    if lifetime == 0 && !revalidatable {
        return Err(NotStored::Useless);
    }
    if targeted {
        f |= flags::PRIVATE_TARGET;
    }
    // RFC 5861 windows of the response itself; `check_fields` made sure they parse.
    let window = |d: &str| {
        cc.iter()
            .find(|(n, _)| *n == d)
            .and_then(|(_, v)| parse_delta(v.as_deref()?))
            .map_or(NOT_GIVEN, |s| {
                u32::try_from(s).unwrap_or(NOT_GIVEN - 1).min(NOT_GIVEN - 1)
            })
    };
    Ok(StoreMeta {
        age_secs: u32::try_from(age).unwrap_or(u32::MAX),
        lifetime_secs: u32::try_from(lifetime).unwrap_or(u32::MAX),
        flags: f,
        swr_secs: window("stale-while-revalidate"),
        sie_secs: window("stale-if-error"),
    })
}

/// Response fields that are never stored: hop-by-hop ones (the proxy strips them already;
/// this is a second line), `Age` (recomputed on every answer) and our own `x-cache`.
fn skip_field(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::AGE
            | header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::TE
            | header::TRAILER
            | header::UPGRADE
            | header::PROXY_AUTHENTICATE
            | header::CONTENT_LENGTH
    ) || name.as_str() == "keep-alive"
        || name.as_str() == "x-cache"
}

/// Packs the `Vary`-nominated request fields, then the storable response fields
/// (`Content-Length` is recomputed from the stored body on each answer). Returns the
/// packer and where the response fields start.
pub(crate) fn pack_head(req: &HeaderMap, resp: &HeaderMap) -> Result<(Packer, u32), NotStored> {
    let mut p = Packer::with_capacity(256);
    for v in resp.get_all(header::VARY) {
        let Ok(s) = v.to_str() else { continue };
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                return Err(NotStored::Malformed("Vary"));
            };
            let mut values = req.get_all(&name).iter();
            let packed = match (values.next(), values.next()) {
                (None, _) => p.push(name.as_str().as_bytes(), None),
                (Some(one), None) => p.push(name.as_str().as_bytes(), Some(one.as_bytes())),
                (Some(first), Some(second)) => {
                    let mut joined = first.as_bytes().to_vec();
                    for v in std::iter::once(second).chain(values) {
                        joined.extend_from_slice(b", ");
                        joined.extend_from_slice(v.as_bytes());
                    }
                    p.push(name.as_str().as_bytes(), Some(&joined))
                }
            };
            packed.ok_or(NotStored::FieldTooLong)?;
        }
    }
    let vary_len = u32::try_from(p.len()).map_err(|_| NotStored::FieldTooLong)?;
    for (name, value) in resp {
        if skip_field(name) {
            continue;
        }
        p.push(name.as_str().as_bytes(), Some(value.as_bytes()))
            .ok_or(NotStored::FieldTooLong)?;
    }
    Ok((p, vary_len))
}

// ---------------------------------------------------------------------------------------
// Reuse.

/// Whether `v` may answer a request with directives `rd` without contacting the origin
/// (RFC 9111 §4.2, §5.2.1).
pub fn is_fresh(v: &Variant, now_ms: u64, rd: &RequestDirectives) -> bool {
    if v.flags() & flags::NO_CACHE != 0 || rd.no_cache || v.is_expired(now_ms) {
        return false;
    }
    let age = v.age_secs(now_ms);
    if rd.max_age.is_some_and(|m| age > m) {
        return false;
    }
    let left = u64::from(v.lifetime_secs()).saturating_sub(age);
    rd.min_fresh.is_none_or(|m| left >= m)
}

/// The window a stored response gives itself, else the policy's `default`: the
/// response's own RFC 5861 value wins in both directions (`stale-if-error=0` turns it off
/// for that response), since the origin knows how stale its content may be served; the
/// policy value is for origins that say nothing.
fn window_ms(own_secs: u32, default: Duration) -> u64 {
    if own_secs == NOT_GIVEN {
        duration_ms(default)
    } else {
        u64::from(own_secs) * 1000
    }
}

/// Whether a stale `v` may be served while it is revalidated in the background
/// (stale-while-revalidate, RFC 5861 §3: the response's own window, else the policy's).
pub fn may_serve_stale_while_revalidating(
    v: &Variant,
    now_ms: u64,
    rd: &RequestDirectives,
    window: Duration,
) -> bool {
    v.flags() & flags::NO_STALE == 0
        && !rd.constrains()
        && v.staleness_ms(now_ms) <= window_ms(v.swr_secs(), window)
}

/// Whether a stale `v` may be served because the client asked for it with
/// `max-stale[=N]` (RFC 9111 §5.2.1.2), which `must-revalidate` and friends forbid
/// (§4.2.4), as does the client's own `no-cache`, `max-age` or `min-fresh`.
pub fn may_serve_stale_to_client(v: &Variant, now_ms: u64, rd: &RequestDirectives) -> bool {
    let Some(max_stale) = rd.max_stale else {
        return false;
    };
    v.flags() & flags::NO_STALE == 0
        && !rd.constrains()
        && v.staleness_ms(now_ms) / 1000 <= max_stale
}

/// Whether a stale `v` may be served because the origin failed (stale-if-error,
/// RFC 5861 §4: the response's own window, else the policy's).
pub fn may_serve_stale_on_error(v: &Variant, now_ms: u64, window: Duration) -> bool {
    v.flags() & flags::NO_STALE == 0 && v.staleness_ms(now_ms) <= window_ms(v.sie_secs(), window)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the origin's answer counts as an error for stale-if-error (RFC 5861 §4).
pub fn is_error_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

/// Whether the request carries validators of its own.
pub fn has_client_validators(req: &HeaderMap) -> bool {
    [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ]
    .iter()
    .any(|h| req.contains_key(h))
}

/// Adds `If-None-Match` / `If-Modified-Since` from `v` to a revalidation request
/// (RFC 9111 §4.3.1). Leaves requests that carry their own validators alone, since the
/// origin's 304 then answers the client's question. Returns whether any was added.
pub fn add_validators(v: &Variant, req: &mut HeaderMap) -> bool {
    if has_client_validators(req) {
        return false;
    }
    let mut added = false;
    if let Some(etag) = v
        .field(&header::ETAG)
        .and_then(|e| HeaderValue::from_bytes(e).ok())
    {
        req.insert(header::IF_NONE_MATCH, etag);
        added = true;
    }
    if let Some(lm) = v
        .field(&header::LAST_MODIFIED)
        .and_then(|e| HeaderValue::from_bytes(e).ok())
    {
        req.insert(header::IF_MODIFIED_SINCE, lm);
        added = true;
    }
    added
}

/// Whether a client's own conditional GET/HEAD is satisfied by the fresh stored `v`, so
/// the cache answers 304 itself (RFC 9110 §13.1.2–3, §13.2.2: `If-None-Match` wins over
/// `If-Modified-Since`; weak comparison).
pub fn client_validators_match(req: &HeaderMap, v: &Variant) -> bool {
    if v.status() != StatusCode::OK {
        return false;
    }
    if req.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = v.field(&header::ETAG) else {
            return false;
        };
        let opaque = |t: &[u8]| -> Vec<u8> {
            t.trim_ascii()
                .strip_prefix(b"W/")
                .unwrap_or(t.trim_ascii())
                .to_vec()
        };
        let stored = opaque(etag);
        return req.get_all(header::IF_NONE_MATCH).iter().any(|h| {
            h.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii() == b"*" || opaque(t) == stored)
        });
    }
    let Some(ims) = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
    else {
        return false;
    };
    v.field(&header::LAST_MODIFIED)
        .and_then(|v| httpdate::parse_http_date(std::str::from_utf8(v).ok()?).ok())
        .is_some_and(|lm| lm <= ims)
}

/// Fields of a 304 that never update the stored response (RFC 9111 §3.2): the body's
/// own framing and encoding, which describe the stored body, not the 304.
fn keeps_stored_value(name: &HeaderName) -> bool {
    skip_field(name) || *name == header::CONTENT_ENCODING || *name == header::CONTENT_RANGE
}

/// The stored fields of `old` updated by a 304 (RFC 9111 §4.3.4, §3.2), or `None` when
/// the 304 does not select `old` (its validators differ), so it must not refresh it. The
/// crate decides the selection; the update adds and replaces every field of the 304
/// (the crate only replaces fields already stored).
pub fn merge_not_modified(
    old: &Variant,
    req: &RequestHead,
    not_modified: &HeaderMap,
    now: SystemTime,
) -> Option<HeaderMap> {
    let stored_at = SystemTime::UNIX_EPOCH + Duration::from_millis(old.stored_at_ms());
    let mut merged = old.headers();
    let old_policy = CachePolicy::new_options(
        req,
        &ResponseView {
            status: old.status(),
            headers: &merged,
        },
        stored_at,
        crate_options(),
    );
    let resp = ResponseView {
        status: StatusCode::NOT_MODIFIED,
        headers: not_modified,
    };
    if let AfterResponse::Modified(..) = old_policy.after_response(req, &resp, now) {
        return None;
    }
    // The stored Age described the old copy; the 304's (if any) describes the new one.
    merged.remove(header::AGE);
    for name in not_modified.keys() {
        if keeps_stored_value(name) && *name != header::AGE {
            continue;
        }
        merged.remove(name);
        for v in not_modified.get_all(name) {
            merged.append(name.clone(), v.clone());
        }
    }
    Some(merged)
}

// ---------------------------------------------------------------------------------------
// Invalidation (RFC 9111 §4.4).

/// The paths (on `host`) to invalidate after a response to an unsafe request: the target
/// URI, and the `Location` and `Content-Location` URIs when they are on the same host;
/// only for a non-error status (2xx, 3xx).
pub fn invalidation_targets(
    host: &str,
    method: &Method,
    path_and_query: &str,
    status: StatusCode,
    resp: &HeaderMap,
) -> Vec<String> {
    let safe = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if safe || !(status.is_success() || status.is_redirection()) {
        return Vec::new();
    }
    let mut out = vec![path_and_query.to_owned()];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(v) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(p) = resolve_same_host(host, path_and_query, v)
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

/// Resolves a `Location`-style reference against the request path; `None` for another
/// host or a reference we cannot resolve simply (it is then left alone, which is safe:
/// invalidating these is a MAY).
fn resolve_same_host(host: &str, base_pq: &str, reference: &str) -> Option<String> {
    let reference = reference.trim();
    if reference.starts_with("//") {
        return None;
    }
    if reference.starts_with('/') {
        return Some(normalize_path(reference));
    }
    if let Ok(uri) = reference.parse::<Uri>()
        && uri.scheme().is_some()
        && let Some(auth) = uri.authority()
    {
        let ref_host = auth.host().trim_end_matches('.');
        if !ref_host.eq_ignore_ascii_case(host) {
            return None;
        }
        return Some(normalize_path(
            uri.path_and_query().map_or("/", |p| p.as_str()),
        ));
    }
    if reference.contains(':') {
        return None;
    }
    let base_path = base_pq.split('?').next().unwrap_or("/");
    let dir = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
    Some(normalize_path(&format!("{dir}{reference}")))
}

/// Removes `.` and `..` segments (RFC 3986 §5.2.4) from the path part.
fn normalize_path(pq: &str) -> String {
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    };
    let mut segs: Vec<&str> = Vec::new();
    let trailing = path.ends_with("/.") || path.ends_with("/..");
    for s in path.split('/').skip(1) {
        match s {
            "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(pq.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    fn cc(s: &'static str) -> Result<Vec<(&'static str, Option<&'static str>)>, NotStored> {
        let v: &'static HeaderValue = Box::leak(Box::new(hv(s)));
        parse_cache_control(std::iter::once(v))
    }

    #[test]
    fn cache_control_parses_tokens_quoted_values_and_canonical_names() {
        assert_eq!(
            cc("Public, MAX-AGE=60 , no-cache=\"set-cookie, x\"").unwrap(),
            vec![
                ("public", None),
                ("max-age", Some("60")),
                ("no-cache", Some("set-cookie, x")),
            ]
        );
        assert_eq!(cc(" , ,").unwrap(), vec![]);
        // The same directive twice with one value is tolerated.
        assert_eq!(cc("max-age=5, max-age=5").unwrap().len(), 1);
    }

    #[test]
    fn cache_control_rejects_bad_syntax_conflicts_and_bad_numbers() {
        for bad in [
            "max-age=5, max-age=6",
            "max-age=",
            "max-age=-1",
            "max-age=1.5",
            "s-maxage",
            "no-cache=\"open",
            "=5",
            "max-age=5 junk",
        ] {
            assert!(cc(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn huge_delta_seconds_saturate_instead_of_failing() {
        assert_eq!(
            parse_delta("99999999999999999999999"),
            Some(u64::from(u32::MAX))
        );
    }

    #[test]
    fn request_directives_read_cache_control_or_else_pragma() {
        let mut h = HeaderMap::new();
        h.insert(header::PRAGMA, hv("no-cache"));
        assert!(RequestDirectives::parse(&h).no_cache);
        h.insert(header::CACHE_CONTROL, hv("max-age=3, min-fresh=2"));
        let d = RequestDirectives::parse(&h);
        assert_eq!(
            (d.no_cache, d.max_age, d.min_fresh),
            (false, Some(3), Some(2))
        );
        h.insert(header::CACHE_CONTROL, hv("max-age=x"));
        assert!(RequestDirectives::parse(&h).no_cache);
    }

    #[test]
    fn requests_with_zero_content_length_are_still_cacheable() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, hv("0"));
        assert_eq!(classify(&Method::GET, &h), RequestKind::Get);
        assert_eq!(classify(&Method::DELETE, &h), RequestKind::Unsafe);
        assert_eq!(classify(&Method::TRACE, &h), RequestKind::Bypass);
    }

    #[test]
    fn location_references_resolve_against_the_request_path() {
        assert_eq!(
            resolve_same_host("shop", "/a/b?q", "c").as_deref(),
            Some("/a/c")
        );
        assert_eq!(
            resolve_same_host("shop", "/a/b", "../c?x=1").as_deref(),
            Some("/c?x=1")
        );
        assert_eq!(
            resolve_same_host("shop", "/a/b", "/x/./y").as_deref(),
            Some("/x/y")
        );
        assert_eq!(
            resolve_same_host("shop", "/", "http://SHOP:8080/z").as_deref(),
            Some("/z")
        );
        assert_eq!(resolve_same_host("shop", "/", "http://other/z"), None);
        assert_eq!(resolve_same_host("shop", "/", "//other/z"), None);
        assert_eq!(resolve_same_host("shop", "/", "mailto:x@y"), None);
    }

    #[test]
    fn expires_is_not_checked_when_max_age_overrides_it() {
        let mut h = HeaderMap::new();
        h.insert(header::EXPIRES, hv("0"));
        assert_eq!(check_fields(&h), Err(NotStored::Malformed("Expires")));
        h.insert(header::CACHE_CONTROL, hv("max-age=10"));
        assert!(check_fields(&h).is_ok());
    }
}
