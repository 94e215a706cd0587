//! The agent's response cache end to end: a real origin that counts its requests behind a
//! real agent, each RFC 9111 behaviour checked by what the origin saw and what the client got.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use weir_tests::manifests::{docs, service, slice};
use weir_tests::{Agent, Controller, Got, http_client, request, write_manifest};

/// Requests the origin saw, by "METHOD path", and the last If-None-Match it got.
#[derive(Default)]
struct Seen {
    counts: HashMap<String, usize>,
    if_none_match: Option<String>,
    /// Requests that reached the origin with peer fill's loop guard still on.
    peer_guard: usize,
}

struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
    /// Connection tasks, aborted with the origin so that it is down for real.
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Origin {
    /// Takes the origin down for real: the listener is closed and every connection task has
    /// ended (aborting alone only asks; awaiting makes sure), so nothing can answer any more.
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let conns: Vec<_> = std::mem::take(&mut *self.conns.lock().expect("lock"));
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }

    fn count(&self, key: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .counts
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
}

/// What the origin answers for each path.
fn answer(path: &str, n: usize, inm: Option<&str>) -> Response<Full<Bytes>> {
    let mut b = Response::builder();
    let body = format!("{path} #{n}");
    b = match path {
        "/fresh" | "/coalesce" | "/head" | "/purge" => b.header("cache-control", "max-age=60"),
        "/private" => b.header("cache-control", "private, max-age=60"),
        "/nostore" => b.header("cache-control", "no-store"),
        "/vary" => b
            .header("cache-control", "max-age=60")
            .header("vary", "x-lang"),
        // Stale at once, with a validator: revalidated on every use.
        "/etag" => {
            if inm == Some("\"v1\"") {
                return Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .header("etag", "\"v1\"")
                    .header("cache-control", "max-age=0")
                    .body(Full::new(Bytes::new()))
                    .expect("304");
            }
            b.header("cache-control", "max-age=0")
                .header("etag", "\"v1\"")
        }
        "/stale" => b
            .header("cache-control", "max-age=0")
            .header("etag", "\"s1\""),
        // Stale at once, but its own stale-while-revalidate lets it be served meanwhile
        // (the policy of `setup` has none).
        "/swr-own" => b
            .header("cache-control", "max-age=0, stale-while-revalidate=600")
            .header("etag", "\"w1\""),
        // RFC 9213: no cache may store it, except CDN-like ones (CDN-Cache-Control).
        "/cdn" => b
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "max-age=60"),
        // For weir's cache only, and never shown to clients.
        "/weir" => b
            .header("cache-control", "no-store")
            .header("weir-cache-control", "max-age=60"),
        "/range" | "/oic" => b.header("cache-control", "max-age=60"),
        p if p.starts_with("/peer/") => b.header("cache-control", "max-age=60"),
        _ => b,
    };
    b.body(Full::new(Bytes::from(body))).expect("response")
}

async fn origin(ip: &str) -> Origin {
    let listener = tokio::net::TcpListener::bind((ip, 0))
        .await
        .expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let conns = Arc::new(Mutex::new(Vec::new()));
    let c = conns.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            let conn = tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let path = req.uri().path().to_string();
                    let inm = req
                        .headers()
                        .get("if-none-match")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    let guarded = req.headers().contains_key("x-weir-peer");
                    let n = {
                        let mut seen = s.lock().expect("lock");
                        seen.peer_guard += usize::from(guarded);
                        if inm.is_some() {
                            seen.if_none_match = inm.clone();
                        }
                        let c = seen
                            .counts
                            .entry(format!("{} {path}", req.method()))
                            .or_default();
                        *c += 1;
                        *c
                    };
                    async move {
                        if path == "/coalesce" {
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        }
                        Ok::<_, Infallible>(answer(&path, n, inm.as_deref()))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            c.lock().expect("lock").push(conn);
        }
    });
    Origin {
        addr,
        seen,
        task,
        conns,
    }
}

async fn setup(ip: &str) -> (tempfile::TempDir, Origin, Controller, Agent) {
    let (d, o, c) = setup_with(ip, "{enabled: true, maxSize: 4Mi, staleIfError: 5m}").await;
    let agent = Agent::start(&c.url(), None).await.expect("agent");
    agent.wait_ready().await;
    (d, o, c, agent)
}

/// An origin and a controller whose policy has `spec.cache: CACHE`; no agent yet.
async fn setup_with(ip: &str, cache: &str) -> (tempfile::TempDir, Origin, Controller) {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = origin(ip).await;
    write_manifest(
        dir.path(),
        "origin.yaml",
        &docs(&[
            service("origin", 80),
            slice("origin", o.addr.port(), &[(ip, true)]),
        ]),
    );
    write_manifest(
        dir.path(),
        "policy.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: site, namespace: default}}\nspec:\n  hosts: [\"site.test\"]\n  rules:\n    - backendRefs: [{{name: origin, port: 80}}]\n  cache: {cache}\n"
        ),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    (dir, o, controller)
}

/// An agent with extra flags, ready.
async fn agent_with(c: &Controller, extra: &[&str]) -> Agent {
    let a = Agent::start_with(
        &c.url(),
        weir_tests::free_local_addr(),
        weir_tests::free_local_addr(),
        None,
        extra,
    )
    .await
    .expect("agent");
    a.wait_ready().await;
    a
}

/// The route's lower-tier counters from `/config`.
async fn tiers(agent: &Agent) -> serde_json::Value {
    let cfg = agent.config().await.expect("config");
    cfg["routes"][0]["cache"]["tiers"].clone()
}

/// Waits until the agent has written `n` objects behind to its lower tiers.
async fn written(agent: &Agent, n: u64) {
    weir_tests::wait_for("tier writes", || async {
        (tiers(agent).await["writes"].as_u64()? >= n).then_some(())
    })
    .await;
}

async fn fetch(agent: &Agent, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let client = http_client();
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", agent.listen))
        .header("host", "site.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .expect("body")
        .to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Waits until the agent has stored `n` objects: the first answer reaches the client while
/// its copy is still being stored, and until then a second request would wait for it.
async fn stored(agent: &Agent, n: u64) {
    weir_tests::wait_for("object stored", || async {
        let cfg = agent.config().await.ok()?;
        (cfg["routes"][0]["cache"]["stats"]["stores"].as_u64()? >= n).then_some(())
    })
    .await;
}

fn x_cache(g: &Got) -> &str {
    g.headers
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_responses_are_served_from_the_cache_and_private_ones_are_not() {
    let (_d, origin, _c, agent) = setup("127.0.30.11").await;
    let first = fetch(&agent, "GET", "/fresh", &[]).await;
    assert_eq!(x_cache(&first), "MISS");
    let second = fetch(&agent, "GET", "/fresh", &[]).await;
    assert_eq!(x_cache(&second), "HIT");
    assert_eq!(second.body, first.body);
    assert!(second.headers.contains_key("age"));
    assert_eq!(origin.count("GET /fresh"), 1);

    // HEAD is answered from the GET entry.
    let head = fetch(&agent, "HEAD", "/fresh", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(x_cache(&head), "HIT");
    assert_eq!(origin.count("HEAD /fresh"), 0);

    for path in ["/private", "/nostore"] {
        fetch(&agent, "GET", path, &[]).await;
        fetch(&agent, "GET", path, &[]).await;
        assert_eq!(
            origin.count(&format!("GET {path}")),
            2,
            "{path} must not be stored"
        );
    }
    // A request with credentials is not answered from (or stored in) a shared cache.
    fetch(&agent, "GET", "/head", &[("authorization", "Bearer x")]).await;
    fetch(&agent, "GET", "/head", &[("authorization", "Bearer x")]).await;
    assert_eq!(origin.count("GET /head"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_cold_requests_reach_the_origin_once() {
    let (_d, origin, _c, agent) = setup("127.0.30.12").await;
    let agent = Arc::new(agent);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            fetch(&agent, "GET", "/coalesce", &[]).await
        }));
    }
    let mut bodies = std::collections::BTreeSet::new();
    for t in tasks {
        let g = t.await.expect("task");
        assert_eq!(g.status, 200);
        bodies.insert(g.body);
    }
    assert_eq!(origin.count("GET /coalesce"), 1);
    assert_eq!(bodies.len(), 1, "every waiter got the leader's response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_revalidated_and_a_304_is_merged() {
    let (_d, origin, _c, agent) = setup("127.0.30.13").await;
    let first = fetch(&agent, "GET", "/etag", &[]).await;
    stored(&agent, 1).await;
    let second = fetch(&agent, "GET", "/etag", &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        second.body, first.body,
        "the stored body, refreshed by the 304"
    );
    assert_eq!(origin.count("GET /etag"), 2);
    assert_eq!(
        origin.seen.lock().expect("lock").if_none_match.as_deref(),
        Some("\"v1\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_request_invalidates_the_uri_and_vary_is_honoured() {
    let (_d, origin, _c, agent) = setup("127.0.30.14").await;
    fetch(&agent, "GET", "/fresh", &[]).await;
    fetch(&agent, "GET", "/fresh", &[]).await;
    assert_eq!(origin.count("GET /fresh"), 1);
    let post = fetch(&agent, "POST", "/fresh", &[]).await;
    assert_eq!(post.status, 200);
    fetch(&agent, "GET", "/fresh", &[]).await;
    assert_eq!(origin.count("GET /fresh"), 2, "POST invalidated the entry");

    fetch(&agent, "GET", "/vary", &[("x-lang", "en")]).await;
    let en = fetch(&agent, "GET", "/vary", &[("x-lang", "en")]).await;
    assert_eq!(x_cache(&en), "HIT");
    let fr = fetch(&agent, "GET", "/vary", &[("x-lang", "fr")]).await;
    assert_ne!(x_cache(&fr), "HIT", "another x-lang is another variant");
    assert_eq!(origin.count("GET /vary"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_while_the_origin_is_down() {
    let (_d, origin, _c, agent) = setup("127.0.30.15").await;
    let first = fetch(&agent, "GET", "/stale", &[]).await;
    assert_eq!(first.status, 200);
    stored(&agent, 1).await;
    origin.stop().await; // the only backend is gone: connections are refused
    let got = fetch(&agent, "GET", "/stale", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, first.body);
    assert_eq!(x_cache(&got), "STALE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_empties_the_cache() {
    let (_d, origin, _c, agent) = setup("127.0.30.16").await;
    fetch(&agent, "GET", "/purge", &[]).await;
    fetch(&agent, "GET", "/purge", &[]).await;
    assert_eq!(origin.count("GET /purge"), 1);
    let purged = request(
        &http_client(),
        "POST",
        &format!(
            "http://{}/cache/purge?host=site.test&prefix=/pur",
            agent.admin
        ),
        None,
    )
    .await
    .expect("purge");
    assert_eq!(purged.status, 200);
    assert!(purged.body.contains("\"purged\":1"), "{}", purged.body);
    fetch(&agent, "GET", "/purge", &[]).await;
    assert_eq!(origin.count("GET /purge"), 2);
    let cfg = agent.config().await.expect("config");
    assert!(
        cfg["routes"][0]["cache"]["hitRatio"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
}

/// Waits until the agent holds `path`, asking it with `only-if-cached` (a 504 until then),
/// which never reaches the origin; with `max-stale` so that stale copies count.
async fn held(agent: &Agent, path: &str) {
    weir_tests::wait_for(path, || async {
        let g = fetch(
            agent,
            "GET",
            path,
            &[("cache-control", "only-if-cached, max-stale")],
        )
        .await;
        (g.status != 504).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_directives_targeted_fields_request_directives_and_ranges() {
    let (_d, origin, _c, agent) = setup("127.0.30.17").await;

    // The response's own stale-while-revalidate (the policy has none).
    let first = fetch(&agent, "GET", "/swr-own", &[]).await;
    held(&agent, "/swr-own").await;
    let second = fetch(&agent, "GET", "/swr-own", &[]).await;
    assert_eq!(x_cache(&second), "STALE", "{second:?}");
    // The copy first stored, or the one its background refresh stored since.
    assert!(second.body.starts_with("/swr-own #"), "{second:?}");
    assert_eq!(first.status, 200);

    // CDN-Cache-Control beats Cache-Control: no-store for this cache, and is forwarded.
    fetch(&agent, "GET", "/cdn", &[]).await;
    held(&agent, "/cdn").await;
    let cdn = fetch(&agent, "GET", "/cdn", &[]).await;
    assert_eq!(x_cache(&cdn), "HIT");
    assert_eq!(origin.count("GET /cdn"), 1);
    assert_eq!(cdn.headers["cache-control"], "no-store");
    assert_eq!(cdn.headers["cdn-cache-control"], "max-age=60");

    // Weir-Cache-Control: obeyed, and never sent on, neither on a miss nor on a hit.
    let miss = fetch(&agent, "GET", "/weir", &[]).await;
    assert!(!miss.headers.contains_key("weir-cache-control"));
    held(&agent, "/weir").await;
    let hit = fetch(&agent, "GET", "/weir", &[]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert!(!hit.headers.contains_key("weir-cache-control"));
    assert_eq!(origin.count("GET /weir"), 1);

    // max-stale takes a stale copy; only-if-cached never reaches the origin.
    fetch(&agent, "GET", "/stale", &[]).await;
    held(&agent, "/stale").await;
    let ms = fetch(
        &agent,
        "GET",
        "/stale",
        &[("cache-control", "max-stale=3600")],
    )
    .await;
    assert_eq!(x_cache(&ms), "STALE");
    let oic = fetch(
        &agent,
        "GET",
        "/oic",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(oic.status, 504);
    assert_eq!(origin.count("GET /oic"), 0);

    // A ranged miss goes to the origin; once the object is cached, ranges are cut from it.
    let cold = fetch(&agent, "GET", "/range", &[("range", "bytes=1-3")]).await;
    assert_eq!(x_cache(&cold), "BYPASS");
    let full = fetch(&agent, "GET", "/range", &[]).await;
    assert_eq!(full.body, "/range #2");
    held(&agent, "/range").await;
    let part = fetch(&agent, "GET", "/range", &[("range", "bytes=1-3")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, "ran");
    assert_eq!(part.headers["content-range"], "bytes 1-3/9");
    let bad = fetch(&agent, "GET", "/range", &[("range", "bytes=50-")]).await;
    assert_eq!(bad.status, 416);
    assert_eq!(origin.count("GET /range"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_tier_answers_after_an_agent_restart() {
    let (_d, origin, c) = setup_with(
        "127.0.30.18",
        "{enabled: true, maxSize: 4Mi, disk: {maxSize: 64Mi}}",
    )
    .await;
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let dir = cache_dir.path().display().to_string();
    let mut first = agent_with(&c, &["--cache-dir", &dir]).await;
    assert_eq!(x_cache(&fetch(&first, "GET", "/fresh", &[]).await), "MISS");
    written(&first, 1).await;
    let cfg = first.config().await.expect("config");
    assert_eq!(cfg["routes"][0]["cache"]["diskMaxSize"], 64 << 20);
    first.proc.terminate();

    // A new process: its memory is empty, the disk tier is rebuilt from the folder.
    let second = agent_with(&c, &["--cache-dir", &dir]).await;
    let got = fetch(&second, "GET", "/fresh", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(x_cache(&got), "HIT", "{got:?}");
    assert_eq!(got.body, "/fresh #1");
    assert_eq!(
        origin.count("GET /fresh"),
        1,
        "the origin was not asked again"
    );
    let t = tiers(&second).await;
    assert_eq!(t["diskHits"], 1, "{t}");
    assert_eq!(t["diskEntries"], 1, "{t}");
    // And it is in memory again.
    assert_eq!(x_cache(&fetch(&second, "GET", "/fresh", &[]).await), "HIT");
    assert_eq!(tiers(&second).await["diskHits"], 1);
}

/// A `redis-server` of its own on a free loopback port, killed when dropped.
struct Redis {
    proc: weir_tests::Proc,
    url: String,
}

impl Redis {
    async fn start() -> Self {
        let port = weir_tests::free_port("127.0.0.1");
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; .ci/run installs it)");
        let proc = weir_tests::Proc {
            child,
            name: "redis-server".into(),
        };
        weir_tests::wait_for("redis-server", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self {
            proc,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_share_objects_through_redis_and_go_on_without_it() {
    let (_d, origin, c) =
        setup_with("127.0.30.19", "{enabled: true, maxSize: 4Mi, shared: true}").await;
    let mut redis = Redis::start().await;
    let a = agent_with(&c, &["--cache-redis", &redis.url]).await;
    let b = agent_with(&c, &["--cache-redis", &redis.url, "--node-name", "n2"]).await;
    assert_eq!(x_cache(&fetch(&a, "GET", "/fresh", &[]).await), "MISS");
    written(&a, 1).await;

    // The other agent's memory misses; Redis has it: the origin is not asked again.
    let got = fetch(&b, "GET", "/fresh", &[]).await;
    assert_eq!(x_cache(&got), "HIT", "{got:?}");
    assert_eq!(got.body, "/fresh #1");
    assert_eq!(origin.count("GET /fresh"), 1);
    let t = tiers(&b).await;
    assert_eq!(t["sharedHits"], 1, "{t}");
    assert_eq!(t["sharedUrl"], redis.url.as_str());

    // Redis dies: requests still succeed (from the origin), and the failures are counted.
    redis.proc.kill();
    let got = fetch(&b, "GET", "/head", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(x_cache(&got), "MISS");
    assert_eq!(origin.count("GET /head"), 1);
    let t = tiers(&b).await;
    assert!(t["sharedErrors"].as_u64().unwrap_or(0) >= 1, "{t}");
    // Memory still serves what it holds.
    assert_eq!(x_cache(&fetch(&b, "GET", "/fresh", &[]).await), "HIT");
}

/// An agent that serves cache peer fills on its own listener, ready.
async fn peer_agent(c: &Controller, node: &str) -> Agent {
    let listen = weir_tests::free_local_addr();
    let addr = listen.to_string();
    let a = Agent::start_with(
        &c.url(),
        listen,
        weir_tests::free_local_addr(),
        None,
        &["--node-name", node, "--cache-peer-addr", &addr],
    )
    .await
    .expect("agent");
    a.wait_ready().await;
    a
}

/// A GET for `site.test` + `path` sent to `to` from the local address `from` (to stand for
/// a client that is not an agent); the whole answer, as text.
async fn raw_get_from(
    from: &str,
    to: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind");
    let mut stream = sock.connect(to).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: site.test\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until `agent` hashes over `n` peers.
async fn peers(agent: &Agent, n: usize) -> serde_json::Value {
    weir_tests::wait_for("the cache peer set", || async {
        let cfg = agent.config().await.ok()?;
        let peers = cfg["cachePeers"].clone();
        (peers.as_array()?.len() == n).then_some(peers)
    })
    .await
}

fn cache_stats(cfg: &serde_json::Value) -> serde_json::Value {
    cfg["routes"][0]["cache"]["stats"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_asks_the_owning_peer_so_the_origin_sees_each_object_once() {
    let (_d, origin, c) =
        setup_with("127.0.30.20", "{enabled: true, maxSize: 4Mi, peers: true}").await;
    let mut agents = Vec::new();
    for node in ["p1", "p2", "p3"] {
        agents.push(peer_agent(&c, node).await);
    }
    for a in &agents {
        let set = peers(a, 3).await;
        assert_eq!(
            set.as_array()
                .expect("list")
                .iter()
                .filter(|p| p["me"] == true)
                .count(),
            1,
            "{set}"
        );
    }
    let paths: Vec<String> = (0..24).map(|i| format!("/peer/{i}")).collect();

    // The first agent misses everything: it fills what it owns from the origin, and asks
    // the owner of the rest, which fills from the origin and keeps a copy.
    for p in &paths {
        let got = fetch(&agents[0], "GET", p, &[]).await;
        assert_eq!((got.status, x_cache(&got)), (200, "MISS"), "{p}: {got:?}");
        assert_eq!(got.body, format!("{p} #1"));
    }
    let first = cache_stats(&agents[0].config().await.expect("config"));
    let asked = first["peerFills"].as_u64().expect("peerFills");
    assert!(
        (1..24).contains(&asked),
        "about two thirds of the keys are owned by the other two: {first}"
    );
    assert_eq!(first["peerErrors"], 0, "{first}");

    // Every other agent gets every object without the origin: from its own memory where
    // it owns the object (the peer fill left it there), else from the owner's cache.
    for a in &agents[1..] {
        for p in &paths {
            let got = fetch(a, "GET", p, &[]).await;
            assert_eq!(got.status, 200, "{p}: {got:?}");
            assert!(
                ["HIT", "PEER"].contains(&x_cache(&got)),
                "{p}: {:?}",
                got.headers
            );
            assert_eq!(got.body, format!("{p} #1"), "the origin's one answer");
        }
    }
    for p in &paths {
        assert_eq!(origin.count(&format!("GET {p}")), 1, "{p}");
    }
    let peer_hits: u64 = {
        let mut n = 0;
        for a in &agents[1..] {
            let st = cache_stats(&a.config().await.expect("config"));
            n += st["peerHits"].as_u64().expect("peerHits");
        }
        n
    };
    assert!(peer_hits > 0, "some objects came from a peer's cache");
    assert_eq!(
        origin.seen.lock().expect("lock").peer_guard,
        0,
        "the loop guard never reaches the origin"
    );

    // A request that carries the loop guard is never passed on to a peer.
    let before = cache_stats(&agents[1].config().await.expect("config"));
    for i in 0..6 {
        let p = format!("/peer/guarded-{i}");
        let got = fetch(&agents[1], "GET", &p, &[("x-weir-peer", "p9")]).await;
        assert_eq!((got.status, x_cache(&got)), (200, "MISS"));
    }
    let after = cache_stats(&agents[1].config().await.expect("config"));
    assert_eq!(
        (after["peerFills"].clone(), after["peerHits"].clone()),
        (before["peerFills"].clone(), before["peerHits"].clone()),
        "guarded requests went to the origin, not to a peer"
    );

    // A write through the first agent invalidates each object at its owner too: reading it
    // back through the same agent gets the origin's new answer, never the owner's old copy.
    for p in &paths {
        let got = fetch(&agents[0], "POST", p, &[]).await;
        assert_eq!(got.status, 200, "{p}: {got:?}");
    }
    for p in &paths {
        let got = fetch(&agents[0], "GET", p, &[]).await;
        assert_eq!(got.body, format!("{p} #2"), "{p}: {:?}", got.headers);
        assert_eq!(origin.count(&format!("GET {p}")), 2, "{p}");
    }
    assert_eq!(
        cache_stats(&agents[0].config().await.expect("config"))["peerErrors"],
        0,
        "every owner confirmed its invalidations"
    );
    // The invalidation field counts only from an agent of the set: from another address
    // the request is the GET it looks like, answered from the cache.
    let spoofed = raw_get_from(
        "127.0.0.2",
        agents[0].listen,
        &paths[0],
        &[("x-weir-peer", "p2"), ("x-weir-invalidate", "1")],
    )
    .await;
    assert!(spoofed.starts_with("HTTP/1.1 200"), "{spoofed}");
    assert!(spoofed.contains(&format!("{} #2", paths[0])), "{spoofed}");
    assert_eq!(origin.count(&format!("GET {}", paths[0])), 2);

    // An owner dies: every request still succeeds (the next owner by score, or the
    // origin), and the dead peer is passed over.
    agents[2].proc.kill();
    for i in 0..24 {
        let p = format!("/peer/after-{i}");
        let got = fetch(&agents[0], "GET", &p, &[]).await;
        assert_eq!(got.status, 200, "{p}: {got:?}");
        assert_eq!(got.body, format!("{p} #1"));
    }
    let cfg = agents[0].config().await.expect("config");
    let st = cache_stats(&cfg);
    let set = cfg["cachePeers"].as_array().cloned().unwrap_or_default();
    let p3_gone = !set.iter().any(|p| p["node"] == "p3");
    let p3_down = set.iter().any(|p| p["node"] == "p3" && p["down"] == true);
    assert!(
        st["peerErrors"].as_u64().unwrap_or(0) >= 1 && p3_down || p3_gone,
        "the dead peer is marked down, or already gone from the set: {st} {set:?}"
    );
    // The controller drops it from the set (after its debounce).
    peers(&agents[0], 2).await;
    // After a purge the agent's misses go to the origin, not to owners that may not have
    // been purged yet (for PURGE_PEER_FENCE, 10 s; these requests take milliseconds).
    let fills_before = cache_stats(&agents[0].config().await.expect("config"))["peerFills"].clone();
    let purged = request(
        &http_client(),
        "POST",
        &format!("http://{}/cache/purge?host=site.test", agents[0].admin),
        None,
    )
    .await
    .expect("purge");
    assert_eq!(purged.status, 200, "{}", purged.body);
    for p in &paths {
        let got = fetch(&agents[0], "GET", p, &[]).await;
        assert_eq!(got.body, format!("{p} #3"), "{p}: {:?}", got.headers);
    }
    let st = cache_stats(&agents[0].config().await.expect("config"));
    assert_eq!(st["peerFills"], fills_before, "no peer asked: {st}");
}
