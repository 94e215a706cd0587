//! Balancing features end to end, on real processes: a real controller (local mode), a real
//! agent and real origins. Bounded-load consistent hashing: one hot key under concurrency
//! stays on its endpoint without `hashBalanceFactor` and spills to the others with it; a bad
//! factor is refused by validation with its message in the controller's `/state`. Slow
//! start: an endpoint added to a serving Service gets a small share of the traffic while
//! `/config` shows it warming. Nothing here asserts a duration: the origins are slow only so
//! that requests overlap, and the slow-start window is far longer than the test.

use std::net::SocketAddr;
use weir_tests::backend::{Backend, Mode, start_group};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{Agent, Controller, endpoint_weight, get, http_client, wait_for, write_manifest};

/// Concurrent requests for one key; with a factor of 125 % over 3 endpoints, the key's own
/// endpoint may hold at most ceil(1.25 × 30 / 3) = 13 of them.
const HOT_REQUESTS: usize = 30;

fn hits(group: &[Backend]) -> Vec<u64> {
    group.iter().map(Backend::hits).collect()
}

/// Sends `HOT_REQUESTS` concurrent requests for the same path (the hash key) and returns the
/// hits each origin got for them.
async fn hot_key(listen: SocketAddr, host: &'static str, group: &[Backend]) -> Vec<u64> {
    let before = hits(group);
    let mut tasks = Vec::with_capacity(HOT_REQUESTS);
    for _ in 0..HOT_REQUESTS {
        tasks.push(tokio::spawn(async move {
            let got = get(&http_client(), listen, host, "/hot-key").await;
            assert!(got.is_ok_and(|g| g.status == 200), "request through agent");
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    hits(group)
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_load_hashing_spills_a_hot_key_and_plain_hashing_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.31.11", "127.0.31.12", "127.0.31.13"], "web")
        .await
        .expect("backends");
    // Slow origins keep the requests in flight together, which is what the bound counts.
    for b in &web {
        b.set_mode(Mode::Delay(300));
    }
    let eps: Vec<String> = web.iter().map(|b| b.addr.ip().to_string()).collect();
    let eps: Vec<(&str, bool)> = eps.iter().map(|a| (a.as_str(), true)).collect();
    write_manifest(
        dir.path(),
        "web.yaml",
        &docs(&[service("web", 80), slice("web", web[0].addr.port(), &eps)]),
    );
    write_manifest(
        dir.path(),
        "plain.yaml",
        &policy(
            "plain",
            &["plain.test"],
            &[("web", 80, 1, 0)],
            "  loadBalancer: {algorithm: RingHash, hashOn: {path: true}}\n",
        ),
    );
    write_manifest(
        dir.path(),
        "ring.yaml",
        &policy(
            "ring",
            &["ring.test"],
            &[("web", 80, 1, 0)],
            "  loadBalancer: {algorithm: RingHash, hashOn: {path: true}, hashBalanceFactor: 125}\n",
        ),
    );
    write_manifest(
        dir.path(),
        "maglev.yaml",
        &policy(
            "maglev",
            &["maglev.test"],
            &[("web", 80, 1, 0)],
            "  loadBalancer: {algorithm: Maglev, hashOn: {path: true}, hashBalanceFactor: 125}\n",
        ),
    );
    // Refused: out of range, and with an algorithm that does not hash.
    write_manifest(
        dir.path(),
        "bad.yaml",
        &docs(&[
            policy(
                "too-low",
                &["low.test"],
                &[("web", 80, 1, 0)],
                "  loadBalancer: {algorithm: Maglev, hashOn: {path: true}, hashBalanceFactor: 100}\n",
            ),
            policy(
                "not-hashing",
                &["nothash.test"],
                &[("web", 80, 1, 0)],
                "  loadBalancer: {algorithm: LeastRequest, hashBalanceFactor: 150}\n",
            ),
        ]),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;

    let config = agent.config().await.expect("config");
    let factor = |name: &str| {
        config["routes"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == name))
            .map(|r| r["hashBalanceFactor"].clone())
    };
    assert_eq!(factor("default/ring"), Some(125.into()), "{config}");
    assert_eq!(factor("default/maglev"), Some(125.into()), "{config}");
    assert_eq!(factor("default/plain"), Some(0.into()), "{config}");
    assert_eq!(factor("default/too-low"), None, "refused: {config}");
    assert_eq!(factor("default/not-hashing"), None, "refused: {config}");

    let state = wait_for("both bad policies reported", || async {
        let state = controller.state().await.ok()?;
        let errs = |name: &str| state["policies"][format!("default/{name}")]["errors"].to_string();
        (errs("too-low").contains("hashBalanceFactor")
            && errs("not-hashing").contains("hashBalanceFactor"))
        .then_some(state)
    })
    .await;
    let errs = |name: &str| state["policies"][format!("default/{name}")]["errors"].to_string();
    assert!(
        errs("too-low")
            .contains("100 is out of range: a percent of the mean load from 101 to 1000"),
        "{state}"
    );
    assert!(
        errs("not-hashing").contains("only applies to RingHash and Maglev"),
        "{state}"
    );

    // Plain consistent hashing: every request for the key lands on one origin.
    let plain = hot_key(agent.listen, "plain.test", &web).await;
    assert_eq!(plain.iter().sum::<u64>(), HOT_REQUESTS as u64, "{plain:?}");
    assert!(
        plain.contains(&(HOT_REQUESTS as u64)),
        "plain hashing keeps the key on one endpoint: {plain:?}"
    );

    // Bounded loads: the key's origin takes its bounded share and the rest spills over.
    for host in ["ring.test", "maglev.test"] {
        let bounded = hot_key(agent.listen, host, &web).await;
        assert_eq!(
            bounded.iter().sum::<u64>(),
            HOT_REQUESTS as u64,
            "{bounded:?}"
        );
        let busiest = bounded.iter().copied().max().unwrap_or(0);
        assert!(
            busiest < HOT_REQUESTS as u64,
            "{host}: the hot key spilled over: {bounded:?}"
        );
        assert!(
            bounded.iter().filter(|&&h| h > 0).count() >= 2,
            "{host}: more than one origin served the key: {bounded:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_warms_up_with_a_small_share_of_the_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.31.21", "127.0.31.22", "127.0.31.23"], "web")
        .await
        .expect("backends");
    let port = web[0].addr.port();
    let ips: Vec<String> = web.iter().map(|b| b.addr.ip().to_string()).collect();
    let slice_of = |n: usize| {
        let eps: Vec<(&str, bool)> = ips[..n].iter().map(|a| (a.as_str(), true)).collect();
        docs(&[service("web", 80), slice("web", port, &eps)])
    };
    write_manifest(dir.path(), "web.yaml", &slice_of(2));
    write_manifest(
        dir.path(),
        "slow.yaml",
        &docs(&[
            policy(
                "slow",
                &["slow.test"],
                &[("web", 80, 1, 0)],
                "  loadBalancer: {algorithm: WeightedRoundRobin, slowStart: {window: 60s, minWeightPercent: 10}}\n",
            ),
            policy(
                "no-minimum",
                &["nomin.test"],
                &[("web", 80, 1, 0)],
                "  loadBalancer: {slowStart: {window: 60s, minWeightPercent: 0}}\n",
            ),
        ]),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let version = agent.wait_ready().await;

    let state = wait_for("the bad policy reported", || async {
        let state = controller.state().await.ok()?;
        state["policies"]["default/no-minimum"]["errors"]
            .to_string()
            .contains("minWeightPercent")
            .then_some(state)
    })
    .await;
    assert!(
        state["policies"]["default/no-minimum"]["errors"]
            .to_string()
            .contains(
                "0 is out of range: the percent of its weight a warming endpoint starts with"
            ),
        "{state}"
    );

    // A third endpoint joins the Service.
    write_manifest(dir.path(), "web.yaml", &slice_of(3));
    let addrs: Vec<String> = web.iter().map(|b| b.addr.to_string()).collect();
    let config = agent
        .wait_config(version, |c| {
            endpoint_weight(c, "default/slow", &addrs[2]).is_some_and(|w| w > 0)
        })
        .await;
    let route = config["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == "default/slow"))
        .expect("route in /config");
    assert_eq!(route["slowStartWindowMs"], 60_000, "{route}");
    let endpoints = route["rules"][0]["backends"][0]["endpoints"]
        .as_array()
        .expect("endpoints");
    let warming = |addr: &str| {
        endpoints
            .iter()
            .find(|e| e["address"] == addr)
            .is_some_and(|e| e["warmingUntilUnixMs"].is_u64())
    };
    assert!(warming(&addrs[2]), "the new endpoint warms: {route}");
    assert!(
        !warming(&addrs[0]) && !warming(&addrs[1]),
        "the endpoints already serving do not: {route}"
    );
    assert!(
        config["routes"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| r["name"] != "default/no-minimum"))
    );

    let before = hits(&web);
    for _ in 0..300 {
        let got = get(&http_client(), agent.listen, "slow.test", "/").await;
        assert!(got.is_ok_and(|g| g.status == 200), "request through agent");
    }
    let got: Vec<u64> = hits(&web)
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect();
    assert_eq!(got.iter().sum::<u64>(), 300, "{got:?}");
    assert!(
        got[2] > 0 && got[2] < 60,
        "the warming endpoint gets clearly less than its even third: {got:?}"
    );
}
