//! The controller's dashboard and the agent-side figures behind it, end to end: a real
//! controller (local mode), a real agent reporting load every 200 ms, two real origins of
//! which one fails its active health check, and traffic through the agent. `/state` must show
//! the sick endpoint unhealthy on 1/1 agents with the agent's reason and the route's rps;
//! `/dashboard` must render them, escape user input, and — in a real headless Chromium, when
//! one is installed — show the policy, the unhealthy endpoint and the agent after its script
//! ran, and write a screenshot.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use weir_tests::backend::{Mode, start_group};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{
    Agent, Controller, WAIT, free_local_addr, get, http_client, request, wait_for, write_manifest,
};

const HOST: &str = "web.test";
const NODE: &str = "dash-node";
/// A host no policy may hold: its validation error carries markup into the page.
const EVIL: &str = "<img src=x onerror=alert(1)>";

/// The endpoint `addr` of `default/web` in `/state`.
fn endpoint<'a>(state: &'a Value, addr: &str) -> Option<&'a Value> {
    state["policies"]["default/web"]["backends"]
        .as_array()?
        .iter()
        .flat_map(|b| b["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_agent_side_health_and_live_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = start_group(&["127.0.41.11", "127.0.41.12"], "web")
        .await
        .expect("backends");
    let ips: Vec<String> = group.iter().map(|b| b.addr.ip().to_string()).collect();
    write_manifest(
        dir.path(),
        "web.yaml",
        &docs(&[
            service("web", 80),
            slice(
                "web",
                group[0].addr.port(),
                &[(ips[0].as_str(), true), (ips[1].as_str(), true)],
            ),
            policy(
                "web",
                &[HOST],
                &[("web", 80, 1, 0)],
                "  healthCheck: {path: /healthz, interval: 100ms, timeout: 500ms, healthyThreshold: 1, unhealthyThreshold: 2}\n",
            ),
        ]),
    );
    write_manifest(
        dir.path(),
        "evil.yaml",
        &policy("evil", &[EVIL], &[("web", 80, 1, 0)], ""),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start_with(
        &controller.url(),
        free_local_addr(),
        free_local_addr(),
        None,
        &[
            "--node-name",
            NODE,
            "--zone",
            "zone-a",
            "--load-report-interval",
            "200ms",
        ],
    )
    .await
    .expect("agent");
    agent.wait_ready().await;

    let sick = group[1].addr.to_string();
    group[1].set_mode(Mode::Status(500));
    // The agent's own verdict first, so no request reaches the sick origin (which would
    // also get it ejected by outlier detection).
    wait_for("the agent's active check verdict", || async {
        let cfg = agent.config().await.ok()?;
        let ep = cfg["routes"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == "default/web")?["rules"][0]["backends"][0]["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["address"] == sick.as_str())?
            .clone();
        (ep["healthy"] == false).then_some(())
    })
    .await;

    // Traffic from two clients for as long as the test looks (bounded by WAIT): the
    // figures are per report interval, so they stay non-zero only while traffic flows.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        let listen = agent.listen;
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let start = std::time::Instant::now();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < WAIT {
                statuses.push(
                    get(&client, listen, HOST, "/")
                        .await
                        .map_or(0, |g| g.status),
                );
            }
            statuses
        }));
    }

    let state = wait_for("agent-side health and traffic in /state", || async {
        let state = controller.state().await.ok()?;
        let health = &endpoint(&state, &sick)?["agentHealth"];
        let traffic = &state["policies"]["default/web"]["traffic"];
        (health["unhealthyOn"] == 1 && traffic["rps"].as_f64()? > 0.0).then_some(state)
    })
    .await;
    let health = &endpoint(&state, &sick).expect("sick endpoint")["agentHealth"];
    assert_eq!(health["of"], 1, "{health}");
    assert_eq!(
        health["reasons"].as_array().map(Vec::len),
        Some(1),
        "{health}"
    );
    let reason = &health["reasons"][0];
    assert_eq!(reason["node"], NODE, "{health}");
    assert_eq!(reason["problem"], "activeCheckFailing", "{health}");
    assert!(
        reason["detail"]
            .as_str()
            .is_some_and(|d| d.contains("HTTP 500")),
        "{health}"
    );
    let well = &endpoint(&state, &group[0].addr.to_string()).expect("healthy endpoint");
    assert_eq!(well["agentHealth"]["unhealthyOn"], 0, "{well}");
    assert_eq!(well["ready"], true, "{well}");
    let traffic = &state["policies"]["default/web"]["traffic"];
    assert_eq!(traffic["agents"], 1, "{traffic}");
    assert!(traffic["requests"].as_u64().unwrap_or(0) > 0, "{traffic}");
    assert!(traffic["p99Ms"].as_f64().is_some(), "{traffic}");
    // The sick origin gets no traffic, so nothing fails.
    assert_eq!(traffic["errorRatio"].as_f64(), Some(0.0), "{traffic}");
    assert_eq!(state["policies"]["default/web"]["hosts"][0], HOST);
    assert_eq!(state["agentsReporting"], 1);
    assert!(state["agents"][0]["lastReportUnixMs"].as_u64().is_some());

    let admin = http_client();
    let base = format!("http://{}", controller.admin);
    let redirect = request(&admin, "GET", &format!("{base}/"), None)
        .await
        .expect("GET /");
    assert_eq!(redirect.status, 303, "{redirect:?}");
    let page = request(&admin, "GET", &format!("{base}/dashboard"), None)
        .await
        .expect("GET /dashboard");
    assert_eq!(page.status, 200);
    let html = page.body;
    for want in [
        "default/web",
        HOST,
        sick.as_str(),
        "failing active check on 1/1 agents: active health check failing: HTTP 500",
        NODE,
        "zone-a",
        "(current)",
        "default/evil",
        "not accepted",
    ] {
        assert!(html.contains(want), "no {want:?} in the dashboard:\n{html}");
    }
    assert!(
        !html.contains("<img"),
        "user input rendered as markup:\n{html}"
    );
    assert!(
        html.contains("&lt;img src=x"),
        "the evil host is shown, escaped"
    );
    let rps = html
        .split("data-policy=\"default/web\"")
        .nth(1)
        .expect("the web policy's section")
        .split("class=rps>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .and_then(|s| s.parse::<f64>().ok())
        .expect("an rps figure");
    assert!(rps > 0.0, "rps {rps} in the dashboard");

    browser_check(&base, &sick).await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let statuses = c.await.expect("client");
        assert!(!statuses.is_empty());
        assert!(
            statuses.iter().all(|s| *s == 200),
            "the sick endpoint took requests: {statuses:?}"
        );
    }
}

/// The Chromium binary, if one is installed (`WEIR_CHROMIUM` names another).
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEIR_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser", "google-chrome"].map(|b| d.join(b)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium with `args`; its stdout.
async fn run_chromium(bin: &Path, args: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = tokio::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("chromium finished in time")
        .expect("chromium ran");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dashboard in a real browser: the DOM after the page's script refreshed it shows the
/// policy, the unhealthy endpoint and the agent; a screenshot is written (and copied to
/// `tests/bench/dashboard.png` with `WEIR_UPDATE_SCREENSHOT=1`).
async fn browser_check(base: &str, sick: &str) {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("WEIR_REQUIRE_CHROMIUM").is_none(),
            "WEIR_REQUIRE_CHROMIUM is set but no chromium is installed"
        );
        eprintln!(
            "SKIPPED the headless-browser part of this test: no chromium, chromium-browser or \
             google-chrome on PATH (install Debian's chromium, as .ci/run does, or set \
             WEIR_CHROMIUM)"
        );
        return;
    };
    let url = format!("{base}/dashboard");
    // Virtual time lets the page's 2 s refresh run without the test waiting for it.
    let dom = run_chromium(
        &bin,
        &[
            "--virtual-time-budget=7000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    )
    .await;
    assert!(
        dom.contains("data-refreshes=\""),
        "the page's script did not refresh it:\n{dom}"
    );
    for want in [
        "default/web",
        sick,
        "failing active check on 1/1 agents",
        NODE,
    ] {
        assert!(
            dom.contains(want),
            "no {want:?} in the rendered DOM:\n{dom}"
        );
    }
    assert!(!dom.contains("<img"), "user input became markup:\n{dom}");

    let shot_dir = tempfile::tempdir().expect("screenshot dir");
    let shot = shot_dir.path().join("dashboard.png");
    run_chromium(
        &bin,
        &[
            "--window-size=1280,900".into(),
            format!("--screenshot={}", shot.display()),
            url,
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "not a real PNG screenshot ({} bytes)",
        png.len()
    );
    if std::env::var_os("WEIR_UPDATE_SCREENSHOT").is_some() {
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/dashboard.png");
        std::fs::create_dir_all(keep.parent().expect("bench dir")).expect("bench dir");
        std::fs::copy(&shot, &keep).expect("copy the screenshot");
    }
}
