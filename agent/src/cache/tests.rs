//! Behaviour of the cache as the proxy drives it: one test per rule of the issue.

use super::*;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, request, response};
use http_body_util::BodyExt;
use std::time::{Duration, SystemTime};

const HOST: &str = "shop";

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn at(secs: u64) -> SystemTime {
    t0() + Duration::from_secs(secs)
}

fn date(secs_from_t0: i64) -> String {
    let t = if secs_from_t0 >= 0 {
        t0() + Duration::from_secs(secs_from_t0 as u64)
    } else {
        t0() - Duration::from_secs((-secs_from_t0) as u64)
    };
    httpdate::fmt_http_date(t)
}

fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn get(path: &str) -> request::Parts {
    req(Method::GET, path, &[])
}

fn resp(status: u16, headers: &[(&str, &str)]) -> response::Parts {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn cache() -> Cache {
    Cache::new(CacheConfig::with_max_size(1 << 20))
}

fn cache_with(swr: u64, sie: u64) -> Cache {
    let mut c = CacheConfig::with_max_size(1 << 20);
    c.stale_while_revalidate = Duration::from_secs(swr);
    c.stale_if_error = Duration::from_secs(sie);
    Cache::new(c)
}

/// Drives a miss for `r` to completion with the given upstream answer; returns what the
/// fill decided ("stored", "forward" or "respond").
fn fill(
    cache: &Cache,
    r: &request::Parts,
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
    now: SystemTime,
) -> &'static str {
    let Lookup::Miss(mut f) = cache.lookup(HOST, r, now) else {
        panic!("expected a miss for {}", r.uri);
    };
    let mut upstream = r.headers.clone();
    f.add_validators(&mut upstream);
    let mut p = resp(status, headers);
    match f.on_response(&mut p, now) {
        FillAction::Store(mut c) => {
            assert!(c.push(body.as_bytes()));
            c.finish();
            "stored"
        }
        FillAction::Forward => "forward",
        FillAction::Respond(_) => "respond",
    }
}

fn hit(cache: &Cache, r: &request::Parts, now: SystemTime) -> Response<Bytes> {
    match cache.lookup(HOST, r, now) {
        Lookup::Hit(resp) => resp,
        other => panic!("expected a hit for {}, got {other:?}", r.uri),
    }
}

fn is_miss(cache: &Cache, r: &request::Parts, now: SystemTime) -> bool {
    matches!(cache.lookup(HOST, r, now), Lookup::Miss(_))
}

fn header<'a>(r: &'a Response<Bytes>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// Freshness and storability.

#[test]
fn fresh_response_is_served_with_age_and_hit_marker_sharing_the_stored_body() {
    let c = cache();
    let r = get("/a");
    let body = "x".repeat(100);
    assert_eq!(
        fill(&c, &r, 200, &[("cache-control", "max-age=60")], &body, t0()),
        "stored"
    );
    let a = hit(&c, &r, at(10));
    let b = hit(&c, &r, at(11));
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(header(&a, "age"), Some("10"));
    assert_eq!(header(&a, "x-cache"), Some("HIT"));
    assert_eq!(header(&a, "content-length"), Some("100"));
    assert_eq!(a.body(), body.as_bytes());
    // A hit clones the handle, never the data.
    assert_eq!(a.body().as_ptr(), b.body().as_ptr());
}

#[test]
fn response_is_stale_after_its_max_age_and_is_revalidated() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
        "a",
        t0(),
    );
    hit(&c, &r, at(59));
    let Lookup::Miss(mut f) = c.lookup(HOST, &r, at(61)) else {
        panic!("expected a revalidating miss");
    };
    assert!(f.is_revalidation());
    let mut h = HeaderMap::new();
    f.add_validators(&mut h);
    assert_eq!(h.get("if-none-match").unwrap(), "\"v1\"");
}

#[test]
fn private_and_no_store_responses_are_not_stored() {
    let c = cache();
    for (i, cc) in ["private, max-age=60", "no-store", "max-age=60, no-store"]
        .iter()
        .enumerate()
    {
        let r = get(&format!("/p{i}"));
        assert_eq!(
            fill(&c, &r, 200, &[("cache-control", cc)], "a", t0()),
            "forward",
            "{cc}"
        );
        assert!(is_miss(&c, &r, at(1)), "{cc}");
    }
    assert_eq!(c.stats().stores, 0);
}

#[test]
fn request_no_store_is_forwarded_without_storing() {
    let c = cache();
    let r = req(Method::GET, "/a", &[("cache-control", "no-store")]);
    assert!(matches!(c.lookup(HOST, &r, t0()), Lookup::Bypass));
}

#[test]
fn authorized_response_is_stored_only_when_public_s_maxage_or_must_revalidate() {
    let c = cache();
    let auth = [("authorization", "Bearer x")];
    let r = req(Method::GET, "/plain", &auth);
    assert_eq!(
        fill(&c, &r, 200, &[("cache-control", "max-age=60")], "a", t0()),
        "forward"
    );
    for (i, cc) in [
        "public, max-age=60",
        "s-maxage=60",
        "max-age=60, must-revalidate",
    ]
    .iter()
    .enumerate()
    {
        let r = req(Method::GET, &format!("/shared{i}"), &auth);
        assert_eq!(
            fill(&c, &r, 200, &[("cache-control", cc)], "a", t0()),
            "stored",
            "{cc}"
        );
    }
}

#[test]
fn s_maxage_overrides_max_age_in_the_shared_cache() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=10, s-maxage=100")],
        "a",
        t0(),
    );
    hit(&c, &r, at(50));
    assert!(is_miss(&c, &r, at(101)));
}

#[test]
fn expires_gives_freshness_when_there_is_no_max_age() {
    let c = cache();
    let r = get("/a");
    let (d, e) = (date(0), date(100));
    fill(&c, &r, 200, &[("date", &d), ("expires", &e)], "a", t0());
    hit(&c, &r, at(50));
    let Lookup::Miss(_) = c.lookup(HOST, &r, at(101)) else {
        panic!("stale after Expires");
    };
}

#[test]
fn heuristic_freshness_applies_only_to_heuristically_cacheable_statuses() {
    let c = cache();
    // Last modified 10 days before Date: 10 % heuristic = 1 day of freshness.
    let (d, lm) = (date(0), date(-10 * 86400));
    let r = get("/ok");
    assert_eq!(
        fill(
            &c,
            &r,
            200,
            &[("date", &d), ("last-modified", &lm)],
            "a",
            t0()
        ),
        "stored"
    );
    hit(&c, &r, at(3600));
    // 302 is not cacheable by default (RFC 9110 §15.4.3): no heuristics.
    let r = get("/found");
    assert_eq!(
        fill(
            &c,
            &r,
            302,
            &[("date", &d), ("last-modified", &lm), ("location", "/x")],
            "",
            t0()
        ),
        "forward"
    );
    // But with explicit freshness it is.
    let r = get("/found2");
    assert_eq!(
        fill(
            &c,
            &r,
            302,
            &[("cache-control", "max-age=60"), ("location", "/x")],
            "",
            t0()
        ),
        "stored"
    );
}

#[test]
fn malformed_cache_fields_make_a_response_uncacheable() {
    let c = cache();
    let cases: [&[(&str, &str)]; 8] = [
        &[("cache-control", "max-age=abc")],
        &[("cache-control", "max-age=10, max-age=20")],
        &[("cache-control", "max-age")],
        &[("cache-control", "max-age=\"10")],
        &[("expires", "tomorrow")],
        &[("cache-control", "max-age=60"), ("age", "soon")],
        &[("cache-control", "max-age=60"), ("date", "yesterday")],
        &[
            ("cache-control", "max-age=60"),
            ("vary", "accept, bad header"),
        ],
    ];
    for (i, h) in cases.iter().enumerate() {
        let r = get(&format!("/m{i}"));
        assert_eq!(fill(&c, &r, 200, h, "a", t0()), "forward", "{h:?}");
    }
    assert_eq!(c.stats().stores, 0);
}

#[test]
fn set_cookie_and_vary_star_responses_are_not_stored() {
    let c = cache();
    let r = get("/cookie");
    assert_eq!(
        fill(
            &c,
            &r,
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
            "a",
            t0()
        ),
        "forward"
    );
    let r = get("/star");
    assert_eq!(
        fill(
            &c,
            &r,
            200,
            &[("cache-control", "max-age=60"), ("vary", "*")],
            "a",
            t0()
        ),
        "forward"
    );
}

#[test]
fn age_from_upstream_counts_towards_staleness_and_is_sent_increased() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=35"), ("age", "30")],
        "a",
        t0(),
    );
    let a = hit(&c, &r, at(4));
    assert_eq!(header(&a, "age"), Some("34"));
    assert!(is_miss(&c, &r, at(6)));
}

#[test]
fn no_cache_response_is_revalidated_before_each_use() {
    let c = cache();
    let r = get("/a");
    assert_eq!(
        fill(
            &c,
            &r,
            200,
            &[("cache-control", "no-cache, max-age=60"), ("etag", "\"1\"")],
            "a",
            t0()
        ),
        "stored"
    );
    assert!(is_miss(&c, &r, at(1)));
}

#[test]
fn request_no_cache_and_max_age_force_revalidation() {
    let c = cache();
    let r = get("/a");
    fill(&c, &r, 200, &[("cache-control", "max-age=60")], "a", t0());
    let nc = req(Method::GET, "/a", &[("cache-control", "no-cache")]);
    assert!(is_miss(&c, &nc, at(1)));
    let pragma = req(Method::GET, "/a", &[("pragma", "no-cache")]);
    assert!(is_miss(&c, &pragma, at(1)));
    let young = req(Method::GET, "/a", &[("cache-control", "max-age=5")]);
    hit(&c, &young, at(5));
    assert!(is_miss(&c, &young, at(6)));
}

#[test]
fn ranged_upgrading_and_non_get_requests_bypass_the_cache() {
    let c = cache();
    let cases = [
        req(Method::GET, "/a", &[("range", "bytes=0-1")]),
        req(Method::GET, "/a", &[("upgrade", "websocket")]),
        req(Method::OPTIONS, "/a", &[]),
        req(Method::POST, "/a", &[]),
        req(Method::GET, "/a", &[("content-length", "3")]),
    ];
    for r in &cases {
        assert!(matches!(c.lookup(HOST, r, t0()), Lookup::Bypass), "{r:?}");
    }
    assert_eq!(c.stats().bypass, cases.len() as u64);
}

// ---------------------------------------------------------------------------------------
// Vary and HEAD.

#[test]
fn vary_selects_the_variant_stored_for_matching_request_fields() {
    let c = cache();
    let vary = [("cache-control", "max-age=60"), ("vary", "Accept-Encoding")];
    let gz = req(Method::GET, "/a", &[("accept-encoding", "gzip")]);
    let br = req(Method::GET, "/a", &[("accept-encoding", "br")]);
    let none = get("/a");
    fill(&c, &gz, 200, &vary, "gzipped", t0());
    assert_eq!(hit(&c, &gz, at(1)).body(), "gzipped");
    assert!(is_miss(&c, &br, at(1)));
    fill(&c, &br, 200, &vary, "brotli", at(1));
    assert_eq!(hit(&c, &br, at(2)).body(), "brotli");
    assert_eq!(hit(&c, &gz, at(2)).body(), "gzipped");
    assert!(is_miss(&c, &none, at(2)));
    // Two variants, one URI.
    assert_eq!(c.stats().entries, 1);
}

#[test]
fn head_is_answered_from_a_get_entry_without_a_body() {
    let c = cache();
    fill(
        &c,
        &get("/a"),
        200,
        &[("cache-control", "max-age=60")],
        "hello",
        t0(),
    );
    let h = hit(&c, &req(Method::HEAD, "/a", &[]), at(1));
    assert!(h.body().is_empty());
    assert_eq!(header(&h, "content-length"), Some("5"));
}

#[test]
fn head_miss_is_forwarded() {
    let c = cache();
    assert!(matches!(
        c.lookup(HOST, &req(Method::HEAD, "/a", &[]), t0()),
        Lookup::Bypass
    ));
}

// ---------------------------------------------------------------------------------------
// Revalidation.

#[test]
fn not_modified_is_merged_into_the_stored_response() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("content-type", "text/plain"),
        ],
        "body",
        t0(),
    );
    let Lookup::Miss(mut f) = c.lookup(HOST, &r, at(20)) else {
        panic!("expected revalidation");
    };
    let mut up = r.headers.clone();
    f.add_validators(&mut up);
    let mut p = resp(
        304,
        &[
            ("cache-control", "max-age=100"),
            ("etag", "\"v1\""),
            ("x-new", "1"),
        ],
    );
    let FillAction::Respond(answer) = f.on_response(&mut p, at(20)) else {
        panic!("a 304 to our validators is answered from the cache");
    };
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.body(), "body");
    assert_eq!(header(&answer, "x-new"), Some("1"));
    assert_eq!(header(&answer, "content-type"), Some("text/plain"));
    let later = hit(&c, &r, at(50));
    assert_eq!(header(&later, "age"), Some("30"));
    assert_eq!(header(&later, "cache-control"), Some("max-age=100"));
}

#[test]
fn not_modified_for_other_validators_does_not_refresh_the_entry() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=10"), ("etag", "\"v1\"")],
        "body",
        t0(),
    );
    let Lookup::Miss(mut f) = c.lookup(HOST, &r, at(20)) else {
        panic!("expected revalidation");
    };
    f.add_validators(&mut HeaderMap::new());
    let mut p = resp(304, &[("etag", "\"v2\"")]);
    assert!(matches!(
        f.on_response(&mut p, at(20)),
        FillAction::Respond(_)
    ));
    assert_eq!(c.stats().entries, 0);
}

#[test]
fn revalidation_answered_with_a_new_body_replaces_the_entry() {
    let c = cache();
    let r = get("/a");
    let h = [("cache-control", "max-age=10"), ("etag", "\"v1\"")];
    fill(&c, &r, 200, &h, "old", t0());
    let h2 = [("cache-control", "max-age=10"), ("etag", "\"v2\"")];
    assert_eq!(fill(&c, &r, 200, &h2, "new", at(20)), "stored");
    assert_eq!(hit(&c, &r, at(21)).body(), "new");
}

#[test]
fn client_conditional_request_gets_a_304_from_a_fresh_entry() {
    let c = cache();
    fill(
        &c,
        &get("/a"),
        200,
        &[
            ("cache-control", "max-age=60"),
            ("etag", "W/\"v1\""),
            ("last-modified", &date(-100)),
        ],
        "body",
        t0(),
    );
    let inm = req(Method::GET, "/a", &[("if-none-match", "\"x\", \"v1\"")]);
    let r = hit(&c, &inm, at(1));
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert!(r.body().is_empty());
    let other = req(Method::GET, "/a", &[("if-none-match", "\"v2\"")]);
    assert_eq!(hit(&c, &other, at(1)).status(), StatusCode::OK);
    let ims = req(Method::GET, "/a", &[("if-modified-since", &date(-50))]);
    assert_eq!(hit(&c, &ims, at(1)).status(), StatusCode::NOT_MODIFIED);
    let old = req(Method::GET, "/a", &[("if-modified-since", &date(-200))]);
    assert_eq!(hit(&c, &old, at(1)).status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Invalidation and purge.

fn store_fresh(c: &Cache, host: &str, path: &str) {
    let r = get(path);
    let Lookup::Miss(f) = c.lookup(host, &r, t0()) else {
        panic!("expected a miss");
    };
    let mut p = resp(200, &[("cache-control", "max-age=600")]);
    let FillAction::Store(col) = f.on_response(&mut p, t0()) else {
        panic!("expected store");
    };
    col.finish();
}

fn cached(c: &Cache, host: &str, path: &str) -> bool {
    matches!(c.lookup(host, &get(path), at(1)), Lookup::Hit(_))
}

#[test]
fn successful_unsafe_request_invalidates_its_uri_location_and_content_location() {
    let c = cache();
    for p in ["/a", "/b", "/c", "/d", "/dir/e"] {
        store_fresh(&c, HOST, p);
    }
    store_fresh(&c, "other", "/b");
    let h: HeaderMap = [
        (
            HeaderName::from_static("location"),
            HeaderValue::from_static("/b"),
        ),
        (
            HeaderName::from_static("content-location"),
            HeaderValue::from_static("http://shop/c"),
        ),
    ]
    .into_iter()
    .collect();
    let n = c.invalidate_after_unsafe(HOST, &Method::POST, "/a", StatusCode::CREATED, &h);
    assert_eq!(n, 3);
    assert!(!cached(&c, HOST, "/a") && !cached(&c, HOST, "/b") && !cached(&c, HOST, "/c"));
    assert!(cached(&c, HOST, "/d"));
    assert!(cached(&c, "other", "/b"));
    // Relative references resolve against the request path.
    let rel: HeaderMap = [(
        HeaderName::from_static("location"),
        HeaderValue::from_static("e"),
    )]
    .into_iter()
    .collect();
    c.invalidate_after_unsafe(HOST, &Method::PUT, "/dir/x", StatusCode::OK, &rel);
    assert!(!cached(&c, HOST, "/dir/e"));
}

#[test]
fn failed_or_safe_requests_invalidate_nothing() {
    let c = cache();
    store_fresh(&c, HOST, "/a");
    let none = HeaderMap::new();
    let far: HeaderMap = [(
        HeaderName::from_static("location"),
        HeaderValue::from_static("http://elsewhere/a"),
    )]
    .into_iter()
    .collect();
    assert_eq!(
        c.invalidate_after_unsafe(HOST, &Method::POST, "/a", StatusCode::BAD_GATEWAY, &none),
        0
    );
    assert_eq!(
        c.invalidate_after_unsafe(HOST, &Method::GET, "/a", StatusCode::OK, &none),
        0
    );
    assert_eq!(
        c.invalidate_after_unsafe(HOST, &Method::DELETE, "/z", StatusCode::OK, &far),
        0
    );
    assert!(cached(&c, HOST, "/a"));
}

#[test]
fn purge_removes_all_one_host_or_one_path_prefix() {
    let c = cache();
    for (h, p) in [
        ("shop", "/img/1"),
        ("shop", "/img/2"),
        ("shop", "/api/x"),
        ("blog", "/img/1"),
        ("blog", "/post"),
    ] {
        store_fresh(&c, h, p);
    }
    assert_eq!(c.purge_prefix(Some("SHOP:80"), "/img/"), 2);
    assert!(cached(&c, "blog", "/img/1") && cached(&c, "shop", "/api/x"));
    assert_eq!(c.purge_prefix(None, "/img"), 1);
    assert_eq!(c.purge_host("blog"), 1);
    assert!(cached(&c, "shop", "/api/x"));
    assert_eq!(c.purge_all(), 1);
    assert_eq!(c.stats().entries, 0);
    assert_eq!(c.stats().bytes, 0);
}

// ---------------------------------------------------------------------------------------
// Bodies: streaming fill, errors, size limit.

type Frames = std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>;

/// A body that yields the given chunks, `Err(())` standing for a connection reset.
fn stream_body(
    chunks: Vec<Result<&'static str, ()>>,
) -> http_body_util::StreamBody<futures::stream::Iter<Frames>> {
    let frames: Vec<_> = chunks
        .into_iter()
        .map(|c| match c {
            Ok(s) => Ok(http_body::Frame::data(Bytes::from_static(s.as_bytes()))),
            Err(()) => Err(std::io::Error::other("reset")),
        })
        .collect();
    http_body_util::StreamBody::new(futures::stream::iter(frames))
}

fn collector(c: &Cache, path: &str, headers: &[(&str, &str)]) -> Collector {
    let Lookup::Miss(f) = c.lookup(HOST, &get(path), t0()) else {
        panic!("expected a miss");
    };
    let mut p = resp(200, headers);
    match f.on_response(&mut p, t0()) {
        FillAction::Store(col) => col,
        other => panic!("expected store, got {other:?}"),
    }
}

#[tokio::test]
async fn streamed_body_is_stored_when_it_ends_cleanly() {
    let c = cache();
    let col = collector(&c, "/a", &[("cache-control", "max-age=60")]);
    let body = TeeBody::new(stream_body(vec![Ok("hel"), Ok("lo")]), col);
    let got = body.collect().await.unwrap().to_bytes();
    assert_eq!(got, "hello");
    assert_eq!(hit(&c, &get("/a"), at(1)).body(), "hello");
}

#[tokio::test]
async fn body_that_reports_its_end_with_the_last_frame_is_stored() {
    // hyper stops polling a body once is_end_stream() is true, as Full does after its frame.
    let c = cache();
    let col = collector(&c, "/a", &[("cache-control", "max-age=60")]);
    let mut body = TeeBody::new(http_body_util::Full::new(Bytes::from_static(b"x")), col);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "x");
    assert!(http_body::Body::is_end_stream(&body));
    assert_eq!(hit(&c, &get("/a"), at(1)).body(), "x");
}

#[tokio::test]
async fn empty_body_is_stored_without_being_polled() {
    let c = cache();
    let col = collector(&c, "/a", &[("cache-control", "max-age=60")]);
    let _body = TeeBody::new(http_body_util::Empty::<Bytes>::new(), col);
    assert!(hit(&c, &get("/a"), at(1)).body().is_empty());
}

#[tokio::test]
async fn response_broken_mid_body_is_not_stored_and_releases_waiters() {
    let c = cache();
    let col = collector(&c, "/a", &[("cache-control", "max-age=60")]);
    let Lookup::Wait(w) = c.lookup(HOST, &get("/a"), t0()) else {
        panic!("expected to wait on the fill");
    };
    let body = TeeBody::new(stream_body(vec![Ok("hel"), Err(())]), col);
    assert!(body.collect().await.is_err());
    assert!(w.wait(&HeaderMap::new(), t0()).await.is_none());
    assert!(is_miss(&c, &get("/a"), at(1)));
}

#[tokio::test]
async fn oversized_response_streams_through_uncached() {
    let mut config = CacheConfig::with_max_size(1 << 20);
    config.max_object_size = 4;
    let c = Cache::new(config);
    // Announced too large: not even collected.
    let Lookup::Miss(f) = c.lookup(HOST, &get("/big"), t0()) else {
        panic!("expected a miss");
    };
    let mut p = resp(
        200,
        &[("cache-control", "max-age=60"), ("content-length", "5")],
    );
    assert!(matches!(f.on_response(&mut p, t0()), FillAction::Forward));
    // Found too large while streaming: the client still gets every byte.
    let col = collector(&c, "/chunked", &[("cache-control", "max-age=60")]);
    let body = TeeBody::new(stream_body(vec![Ok("abc"), Ok("def")]), col);
    assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdef");
    assert!(is_miss(&c, &get("/chunked"), at(1)));
    assert_eq!(c.stats().stores, 0);
}

// ---------------------------------------------------------------------------------------
// Coalescing.

#[tokio::test]
async fn concurrent_misses_send_one_request_and_all_waiters_get_its_answer() {
    let c = cache();
    let r = get("/hot");
    let mut leaders = Vec::new();
    let mut waiters = Vec::new();
    for _ in 0..100 {
        match c.lookup(HOST, &r, t0()) {
            Lookup::Miss(f) => leaders.push(f),
            Lookup::Wait(w) => waiters.push(w),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(leaders.len(), 1);
    assert_eq!(waiters.len(), 99);
    let tasks: Vec<_> = waiters
        .into_iter()
        .map(|w| tokio::spawn(async move { w.wait(&HeaderMap::new(), t0()).await }))
        .collect();
    let f = leaders.pop().unwrap();
    let mut p = resp(200, &[("cache-control", "max-age=60")]);
    let FillAction::Store(mut col) = f.on_response(&mut p, t0()) else {
        panic!("expected store");
    };
    assert!(col.push(b"shared"));
    col.finish();
    let mut bodies = Vec::new();
    for t in tasks {
        let resp = t.await.unwrap().expect("a waiter gets the leader's answer");
        assert_eq!(header(&resp, "x-cache"), Some("HIT"));
        bodies.push(resp.into_body());
    }
    assert!(
        bodies
            .iter()
            .all(|b| b == "shared" && b.as_ptr() == bodies[0].as_ptr())
    );
    let s = c.stats();
    assert_eq!((s.misses, s.coalesced, s.stores), (1, 99, 1));
    assert_eq!(c.inner.inflight.len(), 0);
}

#[tokio::test]
async fn waiters_go_upstream_when_the_answer_is_uncacheable() {
    let c = cache();
    let r = get("/a");
    let Lookup::Miss(f) = c.lookup(HOST, &r, t0()) else {
        panic!("expected a miss");
    };
    let Lookup::Wait(w) = c.lookup(HOST, &r, t0()) else {
        panic!("expected a wait");
    };
    let mut p = resp(200, &[("cache-control", "private")]);
    assert!(matches!(f.on_response(&mut p, t0()), FillAction::Forward));
    assert!(w.wait(&HeaderMap::new(), t0()).await.is_none());
    // The next request leads a new fill: no slot is left behind.
    assert!(is_miss(&c, &r, t0()));
}

#[tokio::test]
async fn dropping_the_leader_releases_its_waiters() {
    let c = cache();
    let r = get("/a");
    let miss = c.lookup(HOST, &r, t0());
    let Lookup::Wait(w) = c.lookup(HOST, &r, t0()) else {
        panic!("expected a wait");
    };
    drop(miss);
    assert!(w.wait(&HeaderMap::new(), t0()).await.is_none());
}

#[tokio::test]
async fn waiter_whose_vary_fields_differ_goes_upstream() {
    let c = cache();
    let gz = req(Method::GET, "/a", &[("accept-encoding", "gzip")]);
    let br = req(Method::GET, "/a", &[("accept-encoding", "br")]);
    let Lookup::Miss(f) = c.lookup(HOST, &gz, t0()) else {
        panic!("expected a miss");
    };
    let Lookup::Wait(w) = c.lookup(HOST, &br, t0()) else {
        panic!("expected a wait");
    };
    let mut p = resp(
        200,
        &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
    );
    let FillAction::Store(col) = f.on_response(&mut p, t0()) else {
        panic!("expected store");
    };
    col.finish();
    assert!(w.wait(&br.headers, t0()).await.is_none());
}

// ---------------------------------------------------------------------------------------
// Stale windows.

#[test]
fn stale_while_revalidate_answers_stale_at_once_and_refreshes_once() {
    let c = cache_with(10, 0);
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=10"), ("etag", "\"v1\"")],
        "old",
        t0(),
    );
    let Lookup::Stale {
        response,
        refresh: Some(mut refresh),
    } = c.lookup(HOST, &r, at(15))
    else {
        panic!("expected a stale answer with the refresh");
    };
    assert_eq!(header(&response, "x-cache"), Some("STALE"));
    assert_eq!(response.body(), "old");
    // While the refresh runs, others get the stale answer and no second refresh.
    let Lookup::Stale { refresh: None, .. } = c.lookup(HOST, &r, at(16)) else {
        panic!("expected a stale answer without refresh");
    };
    let up = refresh.refresh_request();
    assert_eq!(up.method, Method::GET);
    assert_eq!(up.headers.get("if-none-match").unwrap(), "\"v1\"");
    let mut p = resp(200, &[("cache-control", "max-age=10"), ("etag", "\"v2\"")]);
    let FillAction::Store(mut col) = refresh.on_response(&mut p, at(16)) else {
        panic!("expected store");
    };
    col.push(b"new");
    col.finish();
    assert_eq!(hit(&c, &r, at(17)).body(), "new");
    // Past the window, the request waits for a revalidation instead.
    assert!(is_miss(&c, &r, at(40)));
    assert_eq!(c.stats().stale, 2);
}

#[tokio::test]
async fn stale_if_error_answers_within_its_window_only() {
    let c = cache_with(0, 60);
    let r = get("/a");
    fill(&c, &r, 200, &[("cache-control", "max-age=10")], "old", t0());
    // The proxy's own upstream failure, outside any fill.
    let s = c
        .stale_for_error(HOST, &r, at(30))
        .expect("within the window");
    assert_eq!(header(&s, "x-cache"), Some("STALE"));
    assert_eq!(s.body(), "old");
    assert!(c.stale_for_error(HOST, &r, at(71)).is_none());
    // The leader's upstream fails: it and its waiters get the stale answer.
    let Lookup::Miss(f) = c.lookup(HOST, &r, at(30)) else {
        panic!("expected a miss");
    };
    let Lookup::Wait(w) = c.lookup(HOST, &r, at(30)) else {
        panic!("expected a wait");
    };
    assert_eq!(f.fail(at(30)).unwrap().body(), "old");
    let waited = w.wait(&HeaderMap::new(), at(30)).await.unwrap();
    assert_eq!(header(&waited, "x-cache"), Some("STALE"));
    // An upstream 5xx counts as an error too.
    let Lookup::Miss(f) = c.lookup(HOST, &r, at(40)) else {
        panic!("expected a miss");
    };
    let mut p = resp(503, &[]);
    let FillAction::Respond(a) = f.on_response(&mut p, at(40)) else {
        panic!("expected the stale answer");
    };
    assert_eq!(a.body(), "old");
    // Past the window the error goes through.
    let Lookup::Miss(f) = c.lookup(HOST, &r, at(80)) else {
        panic!("expected a miss");
    };
    assert!(f.fail(at(80)).is_none());
}

#[test]
fn must_revalidate_forbids_every_stale_answer() {
    let c = cache_with(60, 60);
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=10, must-revalidate")],
        "old",
        t0(),
    );
    assert!(c.stale_for_error(HOST, &r, at(20)).is_none());
    assert!(is_miss(&c, &r, at(20)));
}

#[tokio::test]
async fn the_responses_own_stale_windows_replace_the_policy_defaults() {
    // Policy: no stale-while-revalidate, 60 s of stale-if-error.
    let c = cache_with(0, 60);
    let own = get("/own");
    fill(
        &c,
        &own,
        200,
        &[(
            "cache-control",
            "max-age=10, stale-while-revalidate=30, stale-if-error=5",
        )],
        "old",
        t0(),
    );
    // Its own stale-while-revalidate of 30 s applies although the policy has none.
    let Lookup::Stale { refresh, .. } = c.lookup(HOST, &own, at(35)) else {
        panic!("expected a stale answer within the response's own window");
    };
    drop(refresh);
    assert!(is_miss(&c, &own, at(41)), "past its own window");
    // Its own stale-if-error of 5 s is shorter than the policy's 60 s, and wins.
    assert!(c.stale_for_error(HOST, &own, at(14)).is_some());
    assert!(c.stale_for_error(HOST, &own, at(16)).is_none());
    // A response that states nothing gets the policy's windows.
    let plain = get("/plain");
    fill(
        &c,
        &plain,
        200,
        &[("cache-control", "max-age=10")],
        "p",
        t0(),
    );
    assert!(is_miss(&c, &plain, at(11)));
    assert!(c.stale_for_error(HOST, &plain, at(69)).is_some());
}

#[test]
fn cdn_cache_control_overrides_cache_control_for_this_cache() {
    let c = cache();
    let r = get("/a");
    // RFC 9213 §3.1: CDN caches store it for 600 s, other caches not at all.
    assert_eq!(
        fill(
            &c,
            &r,
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600"),
            ],
            "x",
            t0(),
        ),
        "stored"
    );
    let h = hit(&c, &r, at(500));
    // Forwarded, as the RFC's typical behaviour; Cache-Control for the client untouched.
    assert_eq!(header(&h, "cdn-cache-control"), Some("max-age=600"));
    assert_eq!(header(&h, "cache-control"), Some("no-store"));
    assert!(is_miss(&c, &r, at(601)));
    // And the other way round: a targeted no-store wins over a generous Cache-Control.
    let n = get("/n");
    assert_eq!(
        fill(
            &c,
            &n,
            200,
            &[
                ("cache-control", "max-age=600"),
                ("cdn-cache-control", "no-store"),
            ],
            "x",
            t0(),
        ),
        "forward"
    );
    // An invalid targeted field is ignored: Cache-Control decides.
    let bad = get("/bad");
    fill(
        &c,
        &bad,
        200,
        &[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "max-age=,,="),
        ],
        "x",
        t0(),
    );
    assert_eq!(hit(&c, &bad, at(30)).body(), "x");
}

#[test]
fn weir_cache_control_wins_over_cdn_cache_control_and_is_never_sent_to_clients() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[
            ("cache-control", "max-age=5"),
            ("cdn-cache-control", "max-age=10"),
            ("weir-cache-control", "max-age=100"),
        ],
        "x",
        t0(),
    );
    let h = hit(&c, &r, at(50));
    assert_eq!(header(&h, "weir-cache-control"), None);
    assert_eq!(header(&h, "cdn-cache-control"), Some("max-age=10"));
    assert!(is_miss(&c, &r, at(101)));
}

#[test]
fn max_stale_accepts_a_stale_entry_within_its_bound_and_refreshes_it() {
    let c = cache();
    let r = get("/a");
    fill(
        &c,
        &r,
        200,
        &[("cache-control", "max-age=10"), ("etag", "\"v1\"")],
        "old",
        t0(),
    );
    let ok = req(Method::GET, "/a", &[("cache-control", "max-stale=30")]);
    let Lookup::Stale { response, refresh } = c.lookup(HOST, &ok, at(35)) else {
        panic!("expected a stale answer within max-stale");
    };
    assert_eq!(header(&response, "x-cache"), Some("STALE"));
    assert!(
        refresh.is_some(),
        "the entry is refreshed behind the answer"
    );
    drop(refresh);
    assert!(is_miss(&c, &ok, at(45)), "stale by 35 s > max-stale=30");
    let any = req(Method::GET, "/a", &[("cache-control", "max-stale")]);
    assert!(matches!(
        c.lookup(HOST, &any, at(10_000)),
        Lookup::Stale { .. }
    ));
    // must-revalidate forbids it.
    let m = get("/m");
    fill(
        &c,
        &m,
        200,
        &[("cache-control", "max-age=10, must-revalidate")],
        "m",
        t0(),
    );
    let asks = req(Method::GET, "/m", &[("cache-control", "max-stale")]);
    assert!(is_miss(&c, &asks, at(20)));
}

#[test]
fn only_if_cached_answers_from_the_cache_or_with_504() {
    let c = cache();
    let oic = req(Method::GET, "/a", &[("cache-control", "only-if-cached")]);
    let Lookup::NotCached(r) = c.lookup(HOST, &oic, t0()) else {
        panic!("expected a 504 on an empty cache");
    };
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(c.inner.inflight.len(), 0, "no fill started");
    fill(
        &c,
        &get("/a"),
        200,
        &[("cache-control", "max-age=10")],
        "x",
        t0(),
    );
    assert_eq!(hit(&c, &oic, at(5)).body(), "x");
    assert!(matches!(c.lookup(HOST, &oic, at(20)), Lookup::NotCached(_)));
    // Combined with max-stale, a stale copy does.
    let both = req(
        Method::GET,
        "/a",
        &[("cache-control", "only-if-cached, max-stale")],
    );
    assert!(matches!(
        c.lookup(HOST, &both, at(20)),
        Lookup::Stale { .. }
    ));
}

#[test]
fn min_fresh_requires_freshness_left() {
    let c = cache();
    fill(
        &c,
        &get("/a"),
        200,
        &[("cache-control", "max-age=10")],
        "x",
        t0(),
    );
    let r = req(Method::GET, "/a", &[("cache-control", "min-fresh=5")]);
    assert_eq!(hit(&c, &r, at(4)).body(), "x");
    assert!(is_miss(&c, &r, at(6)));
}

#[tokio::test]
async fn ranges_are_cut_from_a_cached_object_and_a_ranged_miss_is_forwarded() {
    let c = cache_with(10, 60);
    let ranged = req(Method::GET, "/a", &[("range", "bytes=2-4")]);
    assert!(matches!(c.lookup(HOST, &ranged, t0()), Lookup::Bypass));
    fill(
        &c,
        &get("/a"),
        200,
        &[("cache-control", "max-age=10"), ("etag", "\"v1\"")],
        "0123456789",
        t0(),
    );
    let part = hit(&c, &ranged, at(1));
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body(), "234");
    assert_eq!(header(&part, "content-range"), Some("bytes 2-4/10"));
    let past = req(Method::GET, "/a", &[("range", "bytes=20-")]);
    assert_eq!(
        hit(&c, &past, at(1)).status(),
        StatusCode::RANGE_NOT_SATISFIABLE
    );
    // HEAD ignores Range.
    let head = req(Method::HEAD, "/a", &[("range", "bytes=2-4")]);
    assert_eq!(hit(&c, &head, at(1)).status(), StatusCode::OK);
    // A stale answer is cut too, and its refresh asks for the whole object.
    let Lookup::Stale {
        response,
        refresh: Some(mut refresh),
    } = c.lookup(HOST, &ranged, at(15))
    else {
        panic!("expected a stale answer with a refresh");
    };
    assert_eq!(response.body(), "234");
    let up = refresh.refresh_request();
    assert!(!up.headers.contains_key("range"));
    drop(refresh);
    // And so is a stale-if-error answer.
    let err = c.stale_for_error(HOST, &ranged, at(30)).expect("stale");
    assert_eq!(err.status(), StatusCode::PARTIAL_CONTENT);
}

// ---------------------------------------------------------------------------------------
// Config, storage bound and counters.

#[test]
fn config_comes_from_the_proto_policy() {
    use weir_proto::v1::CachePolicy;
    let p = CachePolicy {
        enabled: true,
        max_size_bytes: 64 << 20,
        eviction: 0,
        stale_while_revalidate_ms: 10_000,
        stale_if_error_ms: 300_000,
        disk_max_size_bytes: 0,
        shared: false,
        peers: true,
    };
    let c = CacheConfig::from_proto(&p).unwrap().unwrap();
    assert!(c.peers);
    assert_eq!(c.eviction, EvictionPolicy::TinyLfu);
    assert_eq!(c.max_object_size, 8 << 20);
    assert_eq!(c.stale_if_error, Duration::from_secs(300));
    let small = CachePolicy {
        max_size_bytes: 1 << 20,
        eviction: weir_proto::v1::Eviction::Lru as i32,
        ..p
    };
    let s = CacheConfig::from_proto(&small).unwrap().unwrap();
    assert_eq!(
        (s.eviction, s.max_object_size),
        (EvictionPolicy::Lru, 128 << 10)
    );
    let off = CachePolicy {
        enabled: false,
        ..p
    };
    assert_eq!(CacheConfig::from_proto(&off), Ok(None));
    let bad = CachePolicy { eviction: 17, ..p };
    assert!(CacheConfig::from_proto(&bad).is_err());
}

#[test]
fn cache_stays_within_max_size_and_counts_evictions() {
    let mut config = CacheConfig::with_max_size(64 << 10);
    config.eviction = EvictionPolicy::Lru;
    let c = Cache::new(config);
    let body = "x".repeat(1000);
    for i in 0..200 {
        fill(
            &c,
            &get(&format!("/{i}")),
            200,
            &[("cache-control", "max-age=60")],
            &body,
            t0(),
        );
    }
    let s = c.stats();
    assert!(s.bytes <= 64 << 10, "{s:?}");
    assert!(s.evictions > 100, "{s:?}");
    assert_eq!(s.stores, 200);
    assert_eq!(s.entries + s.evictions, 200);
}

#[test]
fn shared_handles_are_one_cache() {
    let a = cache();
    let b = a.clone();
    assert!(a.ptr_eq(&b));
    assert!(!a.ptr_eq(&cache()));
    assert_eq!(a.config(), b.config());
}

#[test]
fn handles_cross_threads_as_the_proxy_needs() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Cache>();
    send::<Lookup>();
    send::<Fill>();
    send::<Collector>();
    send::<Waiter>();
    send::<TeeBody<http_body_util::Full<Bytes>>>();
}
