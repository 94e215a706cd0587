//! Byte ranges (RFC 9110 §14) cut from a stored full response, so that a ranged GET on a
//! cached object is answered without the origin. Parsing and validation are the
//! `http-range-header` crate's (strict RFC 9110 grammar, overlap and count limits); this
//! module decides what to answer. Cutting is a `Bytes::slice`: nothing is copied.
//!
//! Choices (all allowed by RFC 9110 §14.2, which lets a server ignore `Range`):
//! - one satisfiable range → `206` with `Content-Range`;
//! - several ranges → the full `200` (no `multipart/byteranges`: clients that ask for
//!   several ranges handle a full answer, and building multipart bodies would copy);
//! - no satisfiable range → `416` with `Content-Range: bytes */LENGTH`;
//! - a malformed `Range`, a stored status other than 200, or an `If-Range` that does not
//!   match the stored validator → the full `200`.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

/// Applies the request's `Range` (if any) to a full stored `resp` being sent for a GET.
pub fn apply(mut resp: Response<Bytes>, req: &HeaderMap) -> Response<Bytes> {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let Some(spec) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return resp;
    };
    if !if_range_matches(req, resp.headers()) {
        return resp;
    }
    let len = resp.body().len() as u64;
    let parsed = http_range_header::parse_range_header(spec).map(|p| p.validate(len));
    match parsed {
        Ok(Ok(ranges)) => {
            let [one] = ranges.as_slice() else {
                return resp;
            };
            let (start, end) = (*one.start(), *one.end());
            let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
                return resp;
            };
            let body = resp.body().slice(s..=e);
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            *resp.body_mut() = body;
            resp
        }
        Ok(Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable)) => {
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            h.remove(header::CONTENT_TYPE);
            h.remove(header::CONTENT_ENCODING);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            *resp.body_mut() = Bytes::new();
            resp
        }
        // Malformed, or rejected as abusive (overlaps, too many): ignored, as allowed.
        _ => resp,
    }
}

/// RFC 9110 §13.1.5: a range is served only if `If-Range` (when present) names the
/// stored response: a strong entity tag equal to its strong `ETag`, or a date equal to
/// its `Last-Modified`.
fn if_range_matches(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(cond) = req.get(header::IF_RANGE) else {
        return true;
    };
    let cond = cond.as_bytes().trim_ascii();
    if cond.starts_with(b"\"") || cond.starts_with(b"W/") {
        let etag = stored.get(header::ETAG).map(|e| e.as_bytes().trim_ascii());
        return !cond.starts_with(b"W/")
            && etag.is_some_and(|e| !e.starts_with(b"W/") && e == cond);
    }
    let date = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok())
    };
    match (
        date(cond),
        stored
            .get(header::LAST_MODIFIED)
            .and_then(|v| date(v.as_bytes())),
    ) {
        (Some(c), Some(lm)) => c == lm,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Response<Bytes> {
        let mut r = Response::new(Bytes::from_static(b"0123456789"));
        r.headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(10));
        r
    }

    fn ask(pairs: &[(&'static str, &'static str)]) -> Response<Bytes> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        apply(stored(), &h)
    }

    fn content_range(r: &Response<Bytes>) -> &str {
        r.headers()[header::CONTENT_RANGE].to_str().unwrap_or("")
    }

    #[test]
    fn one_range_is_cut_from_the_stored_body() {
        let r = ask(&[("range", "bytes=2-4")]);
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(&r.body()[..], b"234");
        assert_eq!(content_range(&r), "bytes 2-4/10");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "3");
        let suffix = ask(&[("range", "bytes=-3")]);
        assert_eq!(&suffix.body()[..], b"789");
        let open = ask(&[("range", "bytes=8-")]);
        assert_eq!(content_range(&open), "bytes 8-9/10");
        let past_end = ask(&[("range", "bytes=5-100")]);
        assert_eq!(&past_end.body()[..], b"56789");
    }

    #[test]
    fn unsatisfiable_range_gets_416_with_the_length() {
        let r = ask(&[("range", "bytes=10-20")]);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(content_range(&r), "bytes */10");
        assert!(r.body().is_empty());
    }

    #[test]
    fn several_malformed_or_foreign_unit_ranges_get_the_full_response() {
        for spec in ["bytes=0-1,4-5", "bytes=x-y", "items=0-1", "bytes=5-2"] {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_static(spec));
            let r = apply(stored(), &h);
            assert_eq!(r.status(), StatusCode::OK, "{spec}");
            assert_eq!(r.body().len(), 10, "{spec}");
        }
    }

    #[test]
    fn if_range_serves_the_range_only_for_the_same_strong_validator() {
        let same = ask(&[("range", "bytes=0-0"), ("if-range", "\"v1\"")]);
        assert_eq!(same.status(), StatusCode::PARTIAL_CONTENT);
        let other = ask(&[("range", "bytes=0-0"), ("if-range", "\"v2\"")]);
        assert_eq!(other.status(), StatusCode::OK);
        let weak = ask(&[("range", "bytes=0-0"), ("if-range", "W/\"v1\"")]);
        assert_eq!(weak.status(), StatusCode::OK);
        let date = ask(&[
            ("range", "bytes=0-0"),
            ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert_eq!(date.status(), StatusCode::OK, "no Last-Modified to match");
    }

    #[test]
    fn non_200_responses_are_not_cut() {
        let mut r = stored();
        *r.status_mut() = StatusCode::NOT_FOUND;
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        assert_eq!(apply(r, &h).status(), StatusCode::NOT_FOUND);
    }
}
