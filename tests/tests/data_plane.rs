//! The agent as a data plane under faults: real controller and agent processes, backends that
//! die (real processes killed), hang, fail or slow down; balancing algorithms end to end;
//! hostile clients. Waits are on `/config`, never on sleeps; no timing assertions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use weir_tests::backend::{Backend, Mode, start_group};
use weir_tests::manifests::{docs, service, slice};
use weir_tests::{
    Agent, Controller, get, http_client, listening_processes, wait_for, write_manifest,
};

/// One Service `web` with the given endpoints (all on `port`) and a policy for `host`.
fn setup(dir: &Path, host: &str, ips: &[String], port: u16, spec: &str) {
    let eps: Vec<(&str, bool)> = ips.iter().map(|i| (i.as_str(), true)).collect();
    write_manifest(
        dir,
        "web.yaml",
        &docs(&[service("web", 80), slice("web", port, &eps)]),
    );
    write_manifest(
        dir,
        "policy.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [\"{host}\"]\n  rules:\n    - backendRefs: [{{name: web, port: 80}}]\n{spec}"
        ),
    );
}

async fn start(dir: &Path) -> (Controller, Agent) {
    let controller = Controller::start(dir).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;
    (controller, agent)
}

/// Route `web.test` over the in-process backends of `group` (policy lines `spec`), then a
/// controller and an agent on it.
async fn web_agent(dir: &Path, group: &[Backend], spec: &str) -> (Controller, Agent) {
    setup(dir, "web.test", &addrs(group), group[0].addr.port(), spec);
    start(dir).await
}

/// The `/config` entry of endpoint `addr` in route default/web.
fn endpoint<'a>(cfg: &'a serde_json::Value, addr: &str) -> Option<&'a serde_json::Value> {
    cfg["routes"][0]["rules"][0]["backends"]
        .as_array()?
        .iter()
        .flat_map(|b| b["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == addr)
}

fn addrs(group: &[Backend]) -> Vec<String> {
    group.iter().map(|b| b.addr.ip().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_backends_fails_no_client_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ips = ["127.0.10.11", "127.0.10.12", "127.0.10.13"];
    let (mut backends, port) = listening_processes("weir-demo-backend", &ips);
    setup(
        dir.path(),
        "web.test",
        &ips.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        port,
        "  retry: {attempts: 2, on: [connect-failure, reset, \"503\"], perTryTimeout: 2s}\n  outlierDetection: {consecutiveErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}\n",
    );
    let (_c, agent) = start(dir.path()).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let total = 3000;
    let mut loops = Vec::new();
    for _ in 0..8 {
        let sent = sent.clone();
        let listen = agent.listen;
        loops.push(tokio::spawn(async move {
            let client = http_client();
            let mut failures = Vec::new();
            while sent.fetch_add(1, Ordering::Relaxed) < total {
                match get(&client, listen, "web.test", "/").await {
                    Ok(g) if g.status == 200 => {}
                    Ok(g) => failures.push(format!(
                        "{} {:?} {}",
                        g.status,
                        g.headers.get("x-weir-error"),
                        g.body
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    // Kill one backend for real once the stream is well under way.
    wait_for("traffic under way", || async {
        (sent.load(Ordering::Relaxed) > total / 3).then_some(())
    })
    .await;
    backends[1].kill();
    let mut failures = Vec::new();
    for l in loops {
        failures.extend(l.await.expect("client loop"));
    }
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_is_ejected_and_costs_clients_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.11.11", "127.0.11.12"], "web")
        .await
        .expect("backends");
    group[1].set_mode(Mode::Hang);
    let (_c, agent) = web_agent(dir.path(), &group, "  timeout: 5s\n  retry: {attempts: 2, on: [timeout, connect-failure, reset], perTryTimeout: 200ms}\n  outlierDetection: {consecutiveErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}\n").await;
    let client = http_client();
    let hanging = group[1].addr.to_string();
    for _ in 0..40 {
        let got = get(&client, agent.listen, "web.test", "/")
            .await
            .expect("request");
        assert_eq!(got.status, 200, "{got:?}");
    }
    let cfg = agent.config().await.expect("config");
    let ep = endpoint(&cfg, &hanging).expect("endpoint listed");
    assert_eq!(ep["healthy"], false, "{ep}");
    assert!(ep["why"].as_str().unwrap_or("").contains("outlier"), "{ep}");
    // Once ejected it gets nothing more: at most the two tries that ejected it.
    assert!(
        group[1].hits() <= 3,
        "hanging backend got {} requests",
        group[1].hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_and_readmitted_after_it_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.12.11", "127.0.12.12"], "web")
        .await
        .expect("backends");
    group[1].set_mode(Mode::Status(503));
    let (_c, agent) = web_agent(dir.path(), &group, "  retry: {attempts: 1, on: [\"503\"]}\n  outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 1s, maxEjectionPercent: 50}\n").await;
    let client = http_client();
    let failing = group[1].addr.to_string();
    for _ in 0..30 {
        let got = get(&client, agent.listen, "web.test", "/")
            .await
            .expect("request");
        assert_eq!(got.status, 200, "retries hide the 503s: {got:?}");
    }
    let cfg = agent.config().await.expect("config");
    assert_eq!(
        endpoint(&cfg, &failing).expect("endpoint")["healthy"],
        false
    );

    group[1].set_mode(Mode::Normal);
    wait_for("readmission", || async {
        let cfg = agent.config().await.ok()?;
        (endpoint(&cfg, &failing)?["healthy"] == true).then_some(())
    })
    .await;
    let before = group[1].hits();
    for _ in 0..20 {
        get(&client, agent.listen, "web.test", "/")
            .await
            .expect("request");
    }
    assert!(group[1].hits() > before, "readmitted endpoint serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_sick_endpoint_out_and_bring_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.13.11", "127.0.13.12"], "web")
        .await
        .expect("backends");
    let (_c, agent) = web_agent(dir.path(), &group, "  healthCheck: {path: /healthz, interval: 100ms, timeout: 500ms, healthyThreshold: 1, unhealthyThreshold: 2}\n").await;
    let sick = group[1].addr.to_string();
    group[1].set_mode(Mode::Status(500));
    wait_for("active check verdict", || async {
        let cfg = agent.config().await.ok()?;
        let ep = endpoint(&cfg, &sick)?;
        (ep["healthy"] == false && ep["why"].as_str()?.contains("active health check"))
            .then_some(())
    })
    .await;
    let client = http_client();
    for _ in 0..20 {
        let got = get(&client, agent.listen, "web.test", "/")
            .await
            .expect("request");
        assert_eq!(got.status, 200, "{got:?}");
    }
    group[1].set_mode(Mode::Normal);
    wait_for("recovery", || async {
        let cfg = agent.config().await.ok()?;
        (endpoint(&cfg, &sick)?["healthy"] == true).then_some(())
    })
    .await;
}

/// Counts answers by backend over `n` concurrent-ish requests (`par` loops).
async fn spread(
    agent: SocketAddr,
    host: &str,
    n: usize,
    par: usize,
    header: Option<(&'static str, String)>,
) -> BTreeMap<String, usize> {
    let sent = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for _ in 0..par {
        let sent = sent.clone();
        let host = host.to_string();
        let header = header.clone();
        loops.push(tokio::spawn(async move {
            let client = http_client();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            while sent.fetch_add(1, Ordering::Relaxed) < n {
                let mut b = http::Request::get(format!("http://{agent}/")).header("host", &host);
                if let Some((k, v)) = &header {
                    b = b.header(*k, v.as_str());
                }
                let req = b
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("request");
                let resp = client.request(req).await.expect("response");
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .expect("body")
                    .to_bytes();
                let text = String::from_utf8_lossy(&body).to_string();
                let addr = text
                    .rsplit_once('(')
                    .map(|(_, a)| a.trim_end_matches(")\n").to_string())
                    .unwrap_or(text);
                *counts.entry(addr).or_default() += 1;
            }
            counts
        }));
    }
    let mut total = BTreeMap::new();
    for l in loops {
        for (k, v) in l.await.expect("loop") {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_less_to_a_slow_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.14.11", "127.0.14.12"], "web")
        .await
        .expect("backends");
    group[1].set_mode(Mode::Delay(50));
    let (_c, agent) = web_agent(
        dir.path(),
        &group,
        "  loadBalancer: {algorithm: PeakEwma}\n",
    )
    .await;
    let counts = spread(agent.listen, "web.test", 400, 4, None).await;
    let slow = counts.get(&group[1].addr.to_string()).copied().unwrap_or(0);
    assert!(
        slow * 4 < 400,
        "slow endpoint got {slow} of 400: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_a_key_on_one_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.15.11", "127.0.15.12", "127.0.15.13"], "web")
        .await
        .expect("backends");
    let (_c, agent) = web_agent(
        dir.path(),
        &group,
        "  loadBalancer: {algorithm: RingHash, hashOn: {header: x-user-id}}\n",
    )
    .await;
    let mut owners = BTreeMap::new();
    for user in 0..30 {
        let counts = spread(
            agent.listen,
            "web.test",
            10,
            1,
            Some(("x-user-id", format!("user-{user}"))),
        )
        .await;
        assert_eq!(counts.len(), 1, "user-{user} spread over {counts:?}");
        owners.insert(user, counts.into_keys().next().unwrap_or_default());
    }
    let distinct: std::collections::BTreeSet<_> = owners.values().collect();
    assert!(distinct.len() > 1, "keys spread over endpoints: {owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_when_an_endpoint_has_too_many_requests_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.16.11"], "web")
        .await
        .expect("backends");
    group[0].set_mode(Mode::Delay(300));
    let (_c, agent) = web_agent(
        dir.path(),
        &group,
        "  circuitBreaker: {maxRequestsPerEndpoint: 2}\n",
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let listen = agent.listen;
        tasks.push(tokio::spawn(async move {
            let got = get(&http_client(), listen, "web.test", "/")
                .await
                .expect("request");
            (
                got.status,
                got.headers
                    .get("x-weir-error")
                    .map(|v| v.to_str().unwrap_or("").to_string()),
            )
        }));
    }
    let mut open = 0;
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, _) => ok += 1,
            (503, Some(reason)) if reason == "circuit-open" => open += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let cfg = agent.config().await.expect("config");
    assert!(
        ok >= 2 && open >= 1,
        "ok {ok}, circuit-open {open}; {}",
        cfg["routes"][0]
    );
}

/// Writes raw bytes and reads until the peer closes or `WAIT` passes.
async fn raw_exchange(addr: SocketAddr, req: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(weir_tests::WAIT, s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_clear_answers_and_nothing_is_smuggled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.17.11"], "web")
        .await
        .expect("backends");
    let (_c, agent) = web_agent(dir.path(), &group, "").await;

    // Oversized request head: 431, never forwarded.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web.test\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let got = raw_exchange(agent.listen, big.as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");

    // Content-Length and Transfer-Encoding together: 400 and the connection closed, so
    // neither it nor the request hidden behind its body reaches the backend.
    let before = group[0].hits();
    let smuggle = b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web.test\r\n\r\n";
    let got = raw_exchange(agent.listen, smuggle).await;
    assert_eq!(
        got.matches("HTTP/1.1 ").count(),
        1,
        "one answer only: {got}"
    );
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(
        group[0].hits(),
        before,
        "neither request reached the backend"
    );

    // Slowloris: a head that never completes is cut off (the agent runs with
    // --header-read-timeout 1s in tests), leaving the agent free for others.
    let got = raw_exchange(
        agent.listen,
        b"GET / HTTP/1.1\r\nHost: web.test\r\nx-slow: 1",
    )
    .await;
    assert!(!got.contains("200 OK"), "{got}");
    let ok = get(&http_client(), agent.listen, "web.test", "/")
        .await
        .expect("request");
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_with_two_framings_is_a_502_and_nothing_behind_it_passes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = "127.0.17.21";
    let port = weir_tests::free_port(ip);
    let listener = tokio::net::TcpListener::bind((ip, port))
        .await
        .expect("bind");
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // What a response splitter sends: two framings, and behind the chunked
                // body a second response for whoever reads by Content-Length.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhidden")
                    .await;
                count.fetch_add(1, Ordering::SeqCst);
                let _ = s.read(&mut buf).await;
            });
        }
    });
    setup(dir.path(), "web.test", &[ip.to_string()], port, "");
    let (_c, agent) = start(dir.path()).await;
    let got = get(&http_client(), agent.listen, "web.test", "/")
        .await
        .expect("request");
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(got.headers["x-weir-error"], "upstream-error");
    assert!(!got.body.contains("hidden"), "{got:?}");
    assert_eq!(
        answered.load(Ordering::SeqCst),
        1,
        "the upstream was reached once"
    );
}

/// One request over an h2c connection (HTTP/2 with prior knowledge, as
/// `curl --http2-prior-knowledge` sends it); returns the answer's head and body.
async fn h2_request(
    h2: &mut h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    uri: &str,
    body: Option<bytes::Bytes>,
) -> (http::response::Parts, Vec<u8>) {
    let mut req = http::Request::builder().method(method).uri(uri);
    if let Some(b) = &body {
        req = req.header("content-length", b.len());
    }
    let req = req.body(()).expect("request");
    let h2c = h2.clone().ready().await.expect("ready");
    *h2 = h2c;
    let (resp, mut send) = h2.send_request(req, body.is_none()).expect("send");
    if let Some(b) = body {
        send.send_data(b, true).expect("data");
    }
    let (parts, mut recv) = resp.await.expect("response").into_parts();
    let mut got = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("chunk");
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (parts, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http2_clients_reach_http1_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.17.21"], "web")
        .await
        .expect("backends");
    let (_c, agent) = web_agent(dir.path(), &group, "").await;
    let tcp = tokio::net::TcpStream::connect(agent.listen)
        .await
        .expect("connect");
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);

    let (head, body) = h2_request(&mut h2, "GET", "http://web.test/", None).await;
    assert_eq!(head.status, 200);
    assert!(
        String::from_utf8_lossy(&body).starts_with("hello from web"),
        "{body:?}"
    );
    let via = head
        .headers
        .get("x-echo-via")
        .expect("via reached the backend");
    assert!(via.to_str().unwrap_or("").contains("weir"), "{via:?}");

    // A body larger than one HTTP/2 window, with its length announced: forwarded whole to
    // the HTTP/1.1 backend.
    let before = group[0].hits();
    let big = bytes::Bytes::from(vec![b'x'; 200 * 1024]);
    let (head, _) = h2_request(&mut h2, "POST", "http://web.test/upload", Some(big)).await;
    assert_eq!(head.status, 200);
    assert_eq!(group[0].hits(), before + 1);
    assert_eq!(
        head.headers
            .get("x-echo-body-length")
            .and_then(|v| v.to_str().ok()),
        Some("204800")
    );

    // The agent's own answers carry their length and the reason.
    let (head, body) = h2_request(&mut h2, "GET", "http://nowhere.test/", None).await;
    assert_eq!(head.status, 404);
    assert!(head.headers.contains_key("x-weir-error"), "{head:?}");
    assert_eq!(
        head.headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(body.len().to_string().as_str())
    );
}
