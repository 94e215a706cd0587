//! Load-aware weights end to end: a real agent sends real traffic to real backends, one of
//! them slow; its load reports reach a real controller (local mode), which moves weight away
//! from the slow endpoint and pushes the new weights back. The intervals are shortened by
//! flags (`--load-round`, `--load-report-interval`) so the test does not wait for the
//! defaults; nothing here asserts a duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use weir_tests::backend::{Mode, start_group};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{
    Agent, Controller, WAIT, endpoint_weight, free_local_addr, get, http_client, wait_for,
    write_manifest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_moves_away_from_an_endpoint_that_every_agent_sees_slow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.9.11", "127.0.9.12", "127.0.9.13"], "web")
        .await
        .expect("backends");
    web[2].set_mode(Mode::Delay(40));
    let port = web[0].addr.port();
    let eps: Vec<(String, bool)> = web
        .iter()
        .map(|b| (b.addr.ip().to_string(), true))
        .collect();
    let eps: Vec<(&str, bool)> = eps.iter().map(|(a, r)| (a.as_str(), *r)).collect();
    write_manifest(
        dir.path(),
        "web.yaml",
        &docs(&[service("web", 80), slice("web", port, &eps)]),
    );
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy(
            "web",
            &["web.test"],
            &[("web", 80, 1, 0)],
            "  loadBalancer: {algorithm: WeightedRoundRobin, loadAware: true}\n",
        ),
    );
    let controller = Controller::start_with(
        dir.path(),
        free_local_addr(),
        free_local_addr(),
        &["--load-round", "500ms"],
    )
    .await
    .expect("controller");
    let agent = Agent::start_with(
        &controller.url(),
        free_local_addr(),
        free_local_addr(),
        None,
        &["--load-report-interval", "200ms"],
    )
    .await
    .expect("agent");
    agent.wait_ready().await;
    let slow = web[2].addr.to_string();
    let fast = web[0].addr.to_string();
    let config = agent.config().await.expect("config");
    assert_eq!(
        endpoint_weight(&config, "default/web", &slow),
        endpoint_weight(&config, "default/web", &fast),
        "even weights before any load report: {config}"
    );

    // Traffic from a few concurrent clients for as long as the test waits (bounded by WAIT).
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let listen = agent.listen;
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let start = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < WAIT {
                let got = get(&client, listen, "web.test", "/").await;
                assert!(got.is_ok_and(|g| g.status == 200), "request through agent");
            }
        }));
    }

    let config = wait_for("the slow endpoint's weight to go down", || async {
        let config = agent.config().await.ok()?;
        let slow_w = endpoint_weight(&config, "default/web", &slow)?;
        let fast_w = endpoint_weight(&config, "default/web", &fast)?;
        (slow_w < fast_w).then_some(config)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }

    let endpoints = config["routes"][0]["rules"][0]["backends"][0]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let permille = |addr: &str| {
        endpoints
            .iter()
            .find(|e| e["address"] == addr)
            .and_then(|e| e["loadPermille"].as_u64())
    };
    assert!(
        permille(&slow).is_some_and(|p| p < 1000),
        "the agent shows the controller's factor: {config}"
    );
    assert_eq!(config["routes"][0]["loadAware"], true);
    let state = controller.state().await.expect("state");
    assert!(
        state["loadFactors"][&slow]
            .as_u64()
            .is_some_and(|p| p < 1000),
        "the controller shows its factors: {state}"
    );
}
