//! Header rules of a proxy that every layer applies: hop-by-hop fields (RFC 9110 §7.6.1),
//! `Via` and `X-Forwarded-For`, idempotent methods, and Host normalization. A leaf: it
//! imports nothing from the crate.

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `proxy-connection` and
/// `keep-alive`), never forwarded in either direction. hyper re-frames bodies on each side,
/// so `transfer-encoding` goes too.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `Via` added to messages that arrived over HTTP/1.1, and to every response.
pub(crate) const VIA_11: HeaderValue = HeaderValue::from_static("1.1 weir");
/// `Via` added to requests that arrived over HTTP/2.
pub(crate) const VIA_2: HeaderValue = HeaderValue::from_static("2 weir");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Names the reason of a reply the agent made itself.
pub(crate) const X_WEIR_ERROR: HeaderName = HeaderName::from_static("x-weir-error");

/// Methods RFC 9110 §9.2.2 calls idempotent: safe to send twice.
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Lower-cases the host part of a Host / authority value (port and userinfo dropped) into
/// `buf`, without allocating. `None` for anything that is not a plausible host.
pub(crate) fn normalize_host<'b>(raw: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b str> {
    // userinfo is not allowed in Host, but may appear in an absolute-form authority.
    let raw = match raw.iter().rposition(|&b| b == b'@') {
        Some(i) => &raw[i + 1..],
        None => raw,
    };
    let host = if raw.first() == Some(&b'[') {
        let end = raw.iter().position(|&b| b == b']')?;
        &raw[..=end]
    } else {
        match raw.iter().position(|&b| b == b':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    // A trailing dot names the same host (FQDN form).
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > buf.len() {
        return None;
    }
    for (d, s) in buf.iter_mut().zip(host) {
        if !(s.is_ascii_alphanumeric() || matches!(s, b'-' | b'.' | b'_' | b'[' | b']' | b':')) {
            return None;
        }
        *d = s.to_ascii_lowercase();
    }
    std::str::from_utf8(&buf[..host.len()]).ok()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which hop-by-hop headers are present, so only those are
    // removed: most messages carry none or only `Connection`, and nine hashed removals per
    // message showed in the instruction profile (tests/bench/insn_bench.py).
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0
        && let Some(conn) = headers.get(header::CONNECTION).cloned()
    {
        remove_connection_named(headers, &conn);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// Removes the headers a `Connection` value names (tokens other than the usual `close` and
/// `keep-alive`): they are hop-by-hop too (RFC 9110 §7.6.1).
pub(crate) fn remove_connection_named(headers: &mut HeaderMap, conn: &HeaderValue) {
    for t in conn.to_str().unwrap_or("").split(',').map(str::trim) {
        if !t.eq_ignore_ascii_case("close")
            && !t.eq_ignore_ascii_case("keep-alive")
            && let Ok(n) = HeaderName::from_bytes(t.as_bytes())
        {
            headers.remove(n);
        }
    }
}

/// The index of `name` in [`HOP_BY_HOP`]: a `match` on the string compiles to a length
/// switch and at most one comparison, cheaper than comparing with each name in turn.
pub(crate) fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

pub(crate) fn append_forwarded_for(headers: &mut HeaderMap, peer: HeaderValue) {
    match headers.get(&X_FORWARDED_FOR) {
        None => {
            headers.insert(X_FORWARDED_FOR, peer);
        }
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
    }
}

/// Renders a client's IP once per connection.
pub(crate) fn peer_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// The wait a `Retry-After` value asks for (RFC 9110 §10.2.3): delta-seconds, or an
/// HTTP-date taken relative to `now` (a date in the past is no wait). `None` when malformed.
pub(crate) fn retry_after(
    value: &HeaderValue,
    now: std::time::SystemTime,
) -> Option<std::time::Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Saturates rather than failing on absurd values; callers cap the wait anyway.
        return Some(std::time::Duration::from_secs(
            text.parse().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_lower_cased_and_port_dropped() {
        let mut b = [0; 256];
        assert_eq!(
            normalize_host(b"Shop.Example:8080", &mut b),
            Some("shop.example")
        );
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"[::1]:80", &mut b), Some("[::1]"));
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"shop.", &mut b), Some("shop"));
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"bad host", &mut b), None);
        let mut b = [0; 256];
        assert_eq!(normalize_host(b"", &mut b), None);
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn hop_by_hop_index_matches_the_table() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i), "{n}");
        }
        assert_eq!(hop_by_hop_index(&header::HOST), None);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, HeaderValue::from_static("10.0.0.1"));
        append_forwarded_for(&mut h, HeaderValue::from_static("10.0.0.2"));
        assert_eq!(h.get(&X_FORWARDED_FOR).expect("xff"), "10.0.0.1, 10.0.0.2");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(retry_after(&v("7"), now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&v(" 0 "), now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let later = HeaderValue::from_str(&later).expect("date");
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(30)));
        let past =
            HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::UNIX_EPOCH)).expect("date");
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after(&v("soon"), now), None);
        assert_eq!(retry_after(&v("-5"), now), None);
        assert_eq!(retry_after(&v(""), now), None);
    }
}
