//! Traffic shaping end to end, on real processes (a real controller in local mode, a real
//! agent, real origins): local rate limiting (429 with `Retry-After`, nothing reaches the
//! origin), 429/`Retry-After`-aware balancing (an endpoint that asks for less traffic gets
//! none while another can take it, and still gets it when none can), and traffic mirroring
//! (copies reach the shadow Service, bodies included, and a shadow that never answers
//! neither slows nor fails the real requests). Bad values are refused by validation with
//! their message in the controller's `/state`. No timing is asserted: where a rate matters,
//! the bound is derived from the time the test measured.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::Instant;
use weir_tests::backend::{Backend, Mode, start_group};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{Agent, Controller, get, http_client, request, wait_for, write_manifest};

fn hits(group: &[Backend]) -> Vec<u64> {
    group.iter().map(Backend::hits).collect()
}

/// The value of the agent's metric line that starts with `prefix` (name and labels).
async fn metric(agent: &Agent, prefix: &str) -> Option<f64> {
    let text = request(
        &http_client(),
        "GET",
        &format!("http://{}/metrics", agent.admin),
        None,
    )
    .await
    .ok()?
    .body;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The route named `name` in the agent's `/config`.
fn route<'c>(config: &'c serde_json::Value, name: &str) -> Option<&'c serde_json::Value> {
    config["routes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_route_answers_429_with_retry_after_and_spares_the_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.61.1"], "web").await.expect("backend");
    let port = web[0].addr.port();
    write_manifest(
        dir.path(),
        "web.yaml",
        &docs(&[
            service("web", 80),
            slice("web", port, &[("127.0.61.1", true)]),
            policy(
                "limited",
                &["limited.test"],
                &[("web", 80, 1, 0)],
                "  rateLimit: {requestsPerSecond: 1, burst: 5}\n",
            ),
            policy(
                "bad-limit",
                &["bad.test"],
                &[("web", 80, 1, 0)],
                "  rateLimit: {requestsPerSecond: 0}\n",
            ),
        ]),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;

    let state = wait_for("the bad policy reported", || async {
        let state = controller.state().await.ok()?;
        let errors = state["policies"]["default/bad-limit"]["errors"].to_string();
        errors.contains("rateLimit").then_some(errors)
    })
    .await;
    assert!(
        state.contains("spec.rateLimit.requestsPerSecond: must be >= 1, got 0"),
        "{state}"
    );
    let config = agent.config().await.expect("config");
    let limited = route(&config, "default/limited").expect("route");
    assert_eq!(limited["rateLimit"]["requestsPerSecond"], 1, "{limited}");
    assert_eq!(limited["rateLimit"]["burst"], 5, "{limited}");

    let started = Instant::now();
    let (mut ok, mut limited_answers) = (0u64, 0u64);
    for _ in 0..30 {
        let got = get(&http_client(), agent.listen, "limited.test", "/")
            .await
            .expect("request through agent");
        match got.status {
            200 => ok += 1,
            429 => {
                limited_answers += 1;
                assert_eq!(got.headers["x-weir-error"], "rate-limited");
                let wait: u64 = got.headers["retry-after"]
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .expect("Retry-After in whole seconds");
                assert!(wait >= 1, "Retry-After {wait}");
            }
            other => panic!("unexpected status {other}: {}", got.body),
        }
    }
    // The burst, plus one token per second of the time the test took (rounded up).
    let refills = started.elapsed().as_secs() + 1;
    assert!(ok >= 5, "the burst is admitted: {ok}");
    assert!(ok <= 5 + refills, "{ok} admitted in {refills} s");
    assert!(limited_answers > 0, "the limit was reached");
    assert_eq!(hits(&web), [ok], "only admitted requests reach the origin");
    let counted = metric(
        &agent,
        "weir_agent_local_replies_total{route=\"default/limited\",reason=\"rate-limited\"}",
    )
    .await;
    assert_eq!(counted, Some(limited_answers as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_answers_429_gets_no_traffic_for_the_time_it_asks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.62.1", "127.0.62.2"], "web")
        .await
        .expect("backends");
    let port = web[0].addr.port();
    write_manifest(
        dir.path(),
        "web.yaml",
        &docs(&[
            service("web", 80),
            slice("web", port, &[("127.0.62.1", true), ("127.0.62.2", true)]),
            policy(
                "web",
                &["web.test"],
                &[("web", 80, 1, 0)],
                "  retry: {attempts: 1, on: [\"429\"]}\n",
            ),
        ]),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;

    // The first endpoint asks for a minute's rest; the retry on 429 takes its requests to
    // the other one, so every client gets a 200.
    web[0].set_mode(Mode::Throttle(60));
    for _ in 0..40 {
        let got = get(&http_client(), agent.listen, "web.test", "/")
            .await
            .expect("request through agent");
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let got = hits(&web);
    assert!(
        got[0] <= 2,
        "the throttled endpoint is passed over after its first 429: {got:?}"
    );
    assert_eq!(
        got[1], 40,
        "every request was answered by the other: {got:?}"
    );
    let config = agent.config().await.expect("config");
    let endpoints =
        &route(&config, "default/web").expect("route")["rules"][0]["backends"][0]["endpoints"];
    let throttled: Vec<bool> = endpoints
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["throttledUntilUnixMs"].is_u64())
        .collect();
    let first = web[0].addr.to_string();
    let first_idx = endpoints
        .as_array()
        .and_then(|eps| eps.iter().position(|e| e["address"] == first.as_str()))
        .expect("first endpoint in /config");
    assert!(
        throttled[first_idx],
        "/config shows the throttle: {endpoints}"
    );
    assert_eq!(throttled.iter().filter(|t| **t).count(), 1, "{endpoints}");
    assert_eq!(
        metric(
            &agent,
            &format!("weir_agent_endpoint_throttles_total{{endpoint=\"{first}\"}}")
        )
        .await
        .map(|v| v >= 1.0),
        Some(true)
    );

    // When every endpoint asks for rest, requests still reach them: their answer beats none.
    web[1].set_mode(Mode::Throttle(60));
    let before = hits(&web).iter().sum::<u64>();
    for _ in 0..6 {
        let got = get(&http_client(), agent.listen, "web.test", "/")
            .await
            .expect("request through agent");
        assert_eq!(got.status, 429, "the origins' own answer: {}", got.body);
        assert!(got.headers.get("x-weir-error").is_none());
    }
    assert!(hits(&web).iter().sum::<u64>() >= before + 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_copies_reach_the_shadow_and_a_dead_shadow_never_hurts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.63.1"], "web").await.expect("backend");
    let shadow = start_group(&["127.0.63.2"], "shadow")
        .await
        .expect("shadow");
    let (port, shadow_port) = (web[0].addr.port(), shadow[0].addr.port());
    let mirror = |percent: u32| {
        format!("      mirror: {{backendRef: {{name: shadow, port: 80}}, percent: {percent}}}\n")
    };
    let manifests = |percent: u32| {
        docs(&[
            service("web", 80),
            slice("web", port, &[("127.0.63.1", true)]),
            service("shadow", 80),
            slice("shadow", shadow_port, &[("127.0.63.2", true)]),
            policy("web", &["web.test"], &[("web", 80, 1, 0)], "") + &mirror(percent),
            policy("bad", &["bad.test"], &[("web", 80, 1, 0)], "") + &mirror(0),
        ])
    };
    write_manifest(dir.path(), "web.yaml", &manifests(100));
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let version = agent.wait_ready().await;
    let errors = wait_for("the bad mirror reported", || async {
        let state = controller.state().await.ok()?;
        let errors = state["policies"]["default/bad"]["errors"].to_string();
        errors.contains("mirror").then_some(errors)
    })
    .await;
    assert!(
        errors.contains("spec.rules[0].mirror.percent: must be >= 1, got 0"),
        "{errors}"
    );
    let config = agent.config().await.expect("config");
    let m = &route(&config, "default/web").expect("route")["rules"][0]["mirror"];
    assert_eq!(m["service"], "shadow", "{m}");
    assert_eq!(m["percent"], 100, "{m}");

    // GETs and POSTs with bodies: every one is answered by the real origin, and copied.
    let client = http_client();
    for i in 0..10 {
        let got = get(&client, agent.listen, "web.test", "/")
            .await
            .expect("GET");
        assert_eq!(got.status, 200);
        let body = Bytes::from(vec![b'x'; 1000 + i * 3000]);
        let req = http::Request::post(format!("http://{}/upload", agent.listen))
            .header("host", "web.test")
            .body(Full::new(body.clone()))
            .expect("request");
        let resp = client.request(req).await.expect("POST");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["x-echo-body-length"],
            body.len().to_string().as_str()
        );
        resp.into_body().collect().await.expect("body");
    }
    assert_eq!(hits(&web), [20]);
    let sent = "weir_agent_mirror_requests_total{route=\"default/web\",outcome=\"sent\"}";
    wait_for("every copy answered by the shadow", || async {
        (metric(&agent, sent).await == Some(20.0)).then_some(())
    })
    .await;
    // A copy that was cut (its body incomplete) would have failed, not been answered.
    assert_eq!(hits(&shadow), [20]);

    // A share: half the requests are copied.
    write_manifest(dir.path(), "web.yaml", &manifests(50));
    agent
        .wait_config(version, |c| {
            route(c, "default/web").is_some_and(|r| r["rules"][0]["mirror"]["percent"] == 50)
        })
        .await;
    for _ in 0..20 {
        let got = get(&client, agent.listen, "web.test", "/")
            .await
            .expect("GET");
        assert_eq!(got.status, 200);
    }
    wait_for("half the requests copied", || async {
        (metric(&agent, sent).await == Some(30.0)).then_some(())
    })
    .await;
    assert_eq!(hits(&shadow), [30]);

    // A shadow that never answers: the real requests are untouched, and copies beyond the
    // in-flight cap are dropped rather than piling up.
    write_manifest(dir.path(), "web.yaml", &manifests(100));
    shadow[0].set_mode(Mode::Hang);
    agent
        .wait_config(0, |c| {
            route(c, "default/web").is_some_and(|r| r["rules"][0]["mirror"]["percent"] == 100)
        })
        .await;
    for _ in 0..80 {
        let got = get(&client, agent.listen, "web.test", "/")
            .await
            .expect("GET");
        assert_eq!(got.status, 200, "the real request is answered");
    }
    assert_eq!(hits(&web), [20 + 20 + 80]);
    let dropped = "weir_agent_mirror_requests_total{route=\"default/web\",outcome=\"dropped\"}";
    let dropped = metric(&agent, dropped).await.unwrap_or(0.0);
    assert!(
        dropped >= 16.0,
        "copies beyond 64 in flight dropped: {dropped}"
    );
}
