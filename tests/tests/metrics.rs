//! The metrics that the chart's dashboards and alerts read, scraped from the real `/metrics`
//! of a real controller and agent: sync state, NACKs, push latency, failover tier, per-route
//! status classes and cache counters; every metric name the dashboards and the
//! PrometheusRule use is in the scrape; logs carry no ANSI colour when not on a terminal.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weir_tests::backend::{Mode, start_group};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{
    Agent, Controller, bin_dir, free_local_addr, get, http_client, request, wait_for, wait_ok,
    write_manifest,
};

/// A real HTTP/1.1 origin whose answers a shared cache may store for a minute.
async fn cacheable_origin(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let answer = "HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\ncontent-length: 6\r\n\r\ncached";
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// `/metrics` of an admin address as text.
async fn scrape(admin: SocketAddr) -> String {
    let got = request(
        &http_client(),
        "GET",
        &format!("http://{admin}/metrics"),
        None,
    )
    .await
    .expect("scrape");
    assert_eq!(got.status, 200, "{}", got.body);
    got.body
}

/// The value of the sample `series` (name with its labels, as printed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Metric names of the samples in a scrape (without labels).
fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every `weir_…` metric name in the dashboards and the PrometheusRule template.
fn names_in_chart() -> BTreeSet<String> {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weir");
    let mut files = vec![chart.join("templates/prometheusrule.yaml")];
    for entry in std::fs::read_dir(chart.join("dashboards")).expect("dashboards folder") {
        files.push(entry.expect("dashboard").path());
    }
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read chart file");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("weir_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // Template helper names (`weir.…`) have dots; metric names only `_`.
            let before = rest[..i].chars().last();
            if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')) {
                out.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_behind_dashboards_and_alerts_are_served_and_move() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = cacheable_origin("127.0.12.1").await;
    let failing = start_group(&["127.0.12.2"], "failing")
        .await
        .expect("backend");
    failing[0].set_mode(Mode::Status(503));
    let tiers = start_group(&["127.0.12.3", "127.0.12.4"], "tiers")
        .await
        .expect("backends");
    write_manifest(
        dir.path(),
        "services.yaml",
        &docs(&[
            service("origin", 80),
            slice("origin", origin.port(), &[("127.0.12.1", true)]),
            service("failing", 80),
            slice("failing", failing[0].addr.port(), &[("127.0.12.2", true)]),
        ]),
    );
    let tier_services = |primary_ready: bool| {
        docs(&[
            service("primary", 80),
            slice(
                "primary",
                tiers[0].addr.port(),
                &[("127.0.12.3", primary_ready)],
            ),
            service("standby", 80),
            slice("standby", tiers[1].addr.port(), &[("127.0.12.4", true)]),
        ])
    };
    write_manifest(dir.path(), "tiers.yaml", &tier_services(true));
    write_manifest(
        dir.path(),
        "policies.yaml",
        &docs(&[
            policy(
                "site",
                &["site.test"],
                &[("origin", 80, 1, 0)],
                "  cache: {enabled: true, maxSize: 4Mi}\n",
            ),
            policy("broken", &["broken.test"], &[("failing", 80, 1, 0)], ""),
            policy(
                "fo",
                &["fo.test"],
                &[("primary", 80, 1, 0), ("standby", 80, 1, 1)],
                "",
            ),
        ]),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let first = agent.wait_ready().await;

    // Synced, no NACK, tier 0, and nothing timed yet: the first table predates the agent.
    let text = wait_for("agent counted as synced", || async {
        let t = scrape(controller.admin).await;
        (sample(&t, "weir_controller_agents{state=\"synced\"}") == Some(1.0)).then_some(t)
    })
    .await;
    assert_eq!(
        sample(&text, "weir_controller_agents{state=\"behind\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "weir_controller_agent_nacks_total"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "weir_policy_active_tier{policy=\"default/fo\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_controller_push_latency_seconds_count"),
        Some(0.0)
    );

    // A change: tier 0 loses its endpoint, so the policy fails over, and the agent's ACK of
    // the new version times the push.
    write_manifest(dir.path(), "tiers.yaml", &tier_services(false));
    agent.wait_config(first, |_| true).await;
    let text = wait_for("push latency observed", || async {
        let t = scrape(controller.admin).await;
        (sample(&t, "weir_controller_push_latency_seconds_count")? >= 1.0).then_some(t)
    })
    .await;
    let sum = sample(&text, "weir_controller_push_latency_seconds_sum").expect("sum");
    assert!(sum > 0.0, "a push takes some time: {text}");
    assert_eq!(
        sample(&text, "weir_policy_active_tier{policy=\"default/fo\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "weir_policy_panic{policy=\"default/fo\"}"),
        Some(0.0)
    );

    // Traffic: a cache miss then a hit, and an origin that answers 503.
    let client = http_client();
    for _ in 0..2 {
        let got = get(&client, agent.listen, "site.test", "/a")
            .await
            .expect("site");
        assert_eq!(got.status, 200);
    }
    let got = get(&client, agent.listen, "broken.test", "/")
        .await
        .expect("broken");
    assert_eq!(got.status, 503);
    let agent_text = wait_for("cache hit counted", || async {
        let t = scrape(agent.admin).await;
        (sample(&t, "weir_agent_cache{route=\"default/site\",stat=\"hits\"}")? >= 1.0).then_some(t)
    })
    .await;
    assert_eq!(
        sample(
            &agent_text,
            "weir_agent_cache{route=\"default/site\",stat=\"misses\"}"
        ),
        Some(1.0),
        "{agent_text}"
    );
    assert_eq!(
        sample(
            &agent_text,
            "weir_agent_requests_total{route=\"default/broken\",code=\"5xx\"}"
        ),
        Some(1.0),
        "{agent_text}"
    );
    assert!(
        sample(
            &agent_text,
            "weir_agent_request_duration_seconds_count{route=\"default/site\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{agent_text}"
    );

    // Every metric the dashboards and alerts name is served by one of the two.
    let controller_text = scrape(controller.admin).await;
    let served: BTreeSet<String> = names(&controller_text)
        .into_iter()
        .chain(names(&agent_text))
        .collect();
    let used = names_in_chart();
    assert!(
        used.len() >= 15 && used.contains("weir_controller_push_latency_seconds_bucket"),
        "metric names found in the chart: {used:?}"
    );
    let missing: Vec<_> = used.into_iter().filter(|n| !served.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "the chart uses metrics nobody serves: {missing:?}; served: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_ansi_colour_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifest(dir.path(), "svc.yaml", &service("web", 80));
    let log_path = dir.path().join("controller.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let admin = free_local_addr();
    let mut child = Command::new(bin_dir().join("weir-controller"))
        .args([
            "--config-dir",
            &dir.path().display().to_string(),
            "--grpc-addr",
            &free_local_addr().to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .env("WEIR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start controller");
    wait_ok(&format!("http://{admin}/readyz")).await;
    let text = wait_for("a log line", || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { text.contains("INFO").then_some(text) }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a log written to a file: {text:?}"
    );
}
