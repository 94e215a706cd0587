//! Local mode end to end: a real controller process reading a folder of manifests, a real
//! agent process following it over gRPC, real HTTP backends, traffic through the agent.
//! Every wait is on an admin endpoint (the agent's `/config` version, the controller's
//! `/state`), never on a sleep.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use weir_tests::backend::{Backend, start_group};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{
    Agent, Controller, endpoint_weight, get, http_client, request, wait_for, write_manifest,
};

fn ips(group: &[Backend]) -> Vec<String> {
    group.iter().map(|b| b.addr.ip().to_string()).collect()
}

fn svc_files(dir: &Path, name: &str, group: &[Backend], ready: &[bool]) {
    let ips = ips(group);
    let eps: Vec<(&str, bool)> = ips
        .iter()
        .map(|s| s.as_str())
        .zip(ready.iter().copied())
        .collect();
    write_manifest(
        dir,
        &format!("{name}.yaml"),
        &docs(&[service(name, 80), slice(name, group[0].addr.port(), &eps)]),
    );
}

/// Sends `n` GETs for `host` through the agent and counts answers by backend address.
async fn spread(agent: SocketAddr, host: &str, n: usize) -> BTreeMap<String, usize> {
    let client = http_client();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let got = get(&client, agent, host, "/")
            .await
            .expect("request through agent");
        assert_eq!(got.status, 200, "unexpected answer: {got:?}");
        let who = got
            .body
            .rsplit_once('(')
            .map(|(_, a)| a.trim_end_matches(")\n").to_string())
            .unwrap_or_default();
        *counts.entry(who).or_default() += 1;
    }
    counts
}

fn count_for(counts: &BTreeMap<String, usize>, group: &[Backend]) -> usize {
    group
        .iter()
        .map(|b| counts.get(&b.addr.to_string()).copied().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_honoured_between_services_and_even_within_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = start_group(&["127.0.1.11", "127.0.1.12"], "shop-v1")
        .await
        .expect("v1");
    let v2 = start_group(&["127.0.1.21", "127.0.1.22"], "shop-v2")
        .await
        .expect("v2");
    svc_files(dir.path(), "shop-v1", &v1, &[true, true]);
    svc_files(dir.path(), "shop-v2", &v2, &[true, true]);
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy(
            "shop",
            &["shop.test"],
            &[("shop-v1", 80, 3, 0), ("shop-v2", 80, 1, 0)],
            "  loadBalancer: {algorithm: WeightedRoundRobin}\n",
        ),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;

    let n = 2000;
    let counts = spread(agent.listen, "shop.test", n).await;
    let v1_total = count_for(&counts, &v1) as f64 / n as f64;
    assert!(
        (v1_total - 0.75).abs() <= 0.02,
        "v1 share {v1_total}, counts {counts:?}"
    );
    for b in v1.iter().chain(v2.iter()) {
        let share = counts.get(&b.addr.to_string()).copied().unwrap_or(0) as f64 / n as f64;
        let want = if b.name == "shop-v1" { 0.375 } else { 0.125 };
        assert!(
            (share - want).abs() <= 0.02,
            "{} got {share}, counts {counts:?}",
            b.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_marked_not_ready_receives_no_new_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.2.11", "127.0.2.12", "127.0.2.13"], "web")
        .await
        .expect("web");
    svc_files(dir.path(), "web", &web, &[true, true, true]);
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let v = agent.wait_ready().await;
    let before = spread(agent.listen, "web.test", 30).await;
    assert_eq!(before.len(), 3, "all three serve at first: {before:?}");

    svc_files(dir.path(), "web", &web, &[true, false, true]);
    let drained = web[1].addr.to_string();
    agent
        .wait_config(v, |c| {
            endpoint_weight(c, "default/web", &drained) == Some(0)
        })
        .await;
    let hits_before = web[1].hits();
    let after = spread(agent.listen, "web.test", 200).await;
    assert_eq!(
        web[1].hits(),
        hits_before,
        "drained endpoint got traffic: {after:?}"
    );
    assert_eq!(after.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_fails_over_to_the_next_tier_and_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = start_group(&["127.0.3.11", "127.0.3.12"], "main")
        .await
        .expect("main");
    let standby = start_group(&["127.0.3.21"], "standby")
        .await
        .expect("standby");
    svc_files(dir.path(), "main", &main, &[true, true]);
    svc_files(dir.path(), "standby", &standby, &[true]);
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy(
            "app",
            &["app.test"],
            &[("main", 80, 1, 0), ("standby", 80, 1, 1)],
            "  failover: {minHealthyPercent: 70}\n",
        ),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let v = agent.wait_ready().await;
    let counts = spread(agent.listen, "app.test", 50).await;
    assert_eq!(
        count_for(&counts, &main),
        50,
        "tier 0 takes everything while healthy: {counts:?}"
    );

    svc_files(dir.path(), "main", &main, &[false, false]);
    let sb = standby[0].addr.to_string();
    let cfg = agent
        .wait_config(v, |c| {
            endpoint_weight(c, "default/app", &sb).is_some_and(|w| w > 0)
        })
        .await;
    let counts = spread(agent.listen, "app.test", 50).await;
    assert_eq!(
        count_for(&counts, &standby),
        50,
        "tier 1 takes everything: {counts:?}"
    );

    let v = cfg["version"].as_u64().unwrap_or(0);
    svc_files(dir.path(), "main", &main, &[true, true]);
    agent
        .wait_config(v, |c| endpoint_weight(c, "default/app", &sb) == Some(0))
        .await;
    let counts = spread(agent.listen, "app.test", 50).await;
    assert_eq!(count_for(&counts, &main), 50, "back on tier 0: {counts:?}");
}

/// The policy state for `default/name` in the controller's `/state`.
fn policy_state<'a>(state: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    &state["policies"][format!("default/{name}")]
}

fn errors_of(state: &serde_json::Value, name: &str) -> String {
    policy_state(state, name)["errors"].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_reported_in_state_and_the_last_good_routing_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.4.11"], "web").await.expect("web");
    svc_files(dir.path(), "web", &web, &[true]);
    write_manifest(
        dir.path(),
        "a.yaml",
        &policy("a", &["a.test"], &[("web", 80, 1, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "b.yaml",
        &policy("b", &["b.test"], &[("web", 80, 1, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "c.yaml",
        &policy("c", &["c.test"], &[("web", 80, 1, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "d.yaml",
        &policy("d", &["d.test"], &[("web", 80, 1, 0)], ""),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let v0 = agent.wait_ready().await;

    // Four kinds of bad policy and one file that is not YAML at all.
    write_manifest(
        dir.path(),
        "a.yaml",
        &policy(
            "a",
            &["a.test"],
            &[("web", 80, 1, 0)],
            "  loadBalancer: {algorithm: Fastest}\n",
        ),
    );
    write_manifest(
        dir.path(),
        "b.yaml",
        &policy("b", &["b.test"], &[("web", 80, -3, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "c.yaml",
        &policy("c", &["c.test"], &[("nowhere", 80, 1, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "d.yaml",
        &policy("d", &["a.test"], &[("web", 80, 1, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n  oops: [\n",
    );
    let state = wait_for("errors in /state", || async {
        let s = controller.state().await.ok()?;
        let files = s["files"].to_string();
        let all = ["a", "b", "c", "d"]
            .iter()
            .all(|p| errors_of(&s, p) != "[]");
        (all && files.contains("web.yaml")).then_some(s)
    })
    .await;

    let a = errors_of(&state, "a");
    assert!(a.contains("Fastest") && a.contains("algorithm"), "{a}");
    assert!(
        errors_of(&state, "b").contains("weight"),
        "{}",
        errors_of(&state, "b")
    );
    let c = format!(
        "{} {}",
        errors_of(&state, "c"),
        policy_state(&state, "c")["unresolvedRefs"]
    );
    assert!(c.contains("nowhere"), "{c}");
    let d = errors_of(&state, "d");
    assert!(d.contains("a.test") && d.contains("default/a"), "{d}");
    for p in ["a", "b", "c", "d"] {
        let src = policy_state(&state, p)["source"].to_string();
        assert!(src.contains(&format!("{p}.yaml")), "source of {p}: {src}");
        assert_eq!(policy_state(&state, p)["servingLastGood"], true, "{p}");
    }
    let files = state["files"].to_string();
    assert!(
        files.contains("web.yaml") && files.contains("invalid YAML"),
        "{files}"
    );

    // Nothing changed for traffic: every host still answers from the old routing.
    let client = http_client();
    for host in ["a.test", "b.test", "c.test", "d.test"] {
        let got = get(&client, agent.listen, host, "/")
            .await
            .expect("request");
        assert_eq!(got.status, 200, "{host}: {got:?}");
    }
    assert_eq!(agent.version().await, v0, "no new table for broken input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_serving_without_controller_and_resyncs_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.5.11", "127.0.5.12"], "web")
        .await
        .expect("web");
    svc_files(dir.path(), "web", &web, &[true, true]);
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    );
    let mut controller = Controller::start(dir.path()).await.expect("controller");
    let (grpc, admin) = (controller.grpc, controller.admin);
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let v = agent.wait_ready().await;

    controller.proc.kill();
    wait_for("agent to notice", || async {
        let c = agent.config().await.ok()?;
        c["control"]["connectedTo"].is_null().then_some(())
    })
    .await;
    let counts = spread(agent.listen, "web.test", 20).await;
    assert_eq!(counts.values().sum::<usize>(), 20);

    // While it is down the config changes; after the restart the agent must catch up.
    svc_files(dir.path(), "web", &web, &[true, false]);
    let controller = Controller::start_at(dir.path(), grpc, admin)
        .await
        .expect("controller again");
    let drained = web[1].addr.to_string();
    agent
        .wait_config(v, |c| {
            endpoint_weight(c, "default/web", &drained) == Some(0)
        })
        .await;
    let state = wait_for("agent ACK in /state", || async {
        let s = controller.state().await.ok()?;
        let version = s["version"].as_u64()?;
        let acked = s["agents"]
            .as_array()?
            .iter()
            .any(|a| a["appliedVersion"].as_u64() == Some(version));
        acked.then_some(s)
    })
    .await;
    assert_eq!(state["agents"][0]["nodeName"], "test-node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_serves_from_its_state_dir_while_the_controller_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = tempfile::tempdir().expect("state dir");
    let web = start_group(&["127.0.6.11"], "web").await.expect("web");
    svc_files(dir.path(), "web", &web, &[true]);
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    );
    let mut controller = Controller::start(dir.path()).await.expect("controller");
    let url = controller.url();
    let mut agent = Agent::start(&url, Some(state_dir.path()))
        .await
        .expect("agent");
    let v = agent.wait_ready().await;
    // The agent persists a table before it ACKs it: wait for the ACK, not just the table.
    wait_for("ACK", || async {
        let s = controller.state().await.ok()?;
        (s["agents"][0]["appliedVersion"].as_u64() == Some(v)).then_some(())
    })
    .await;
    controller.proc.kill();
    agent.proc.kill();

    let agent = Agent::start(&url, Some(state_dir.path()))
        .await
        .expect("agent again");
    let v2 = agent.wait_ready().await;
    assert_eq!(v2, v, "the persisted table is served");
    let cfg = agent.config().await.expect("config");
    assert_eq!(cfg["control"]["tableSource"], "state-dir");
    let counts = spread(agent.listen, "web.test", 10).await;
    assert_eq!(counts.get(&web[0].addr.to_string()), Some(&10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_itself_with_clear_errors_and_is_never_an_open_proxy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.7.11"], "web").await.expect("web");
    svc_files(dir.path(), "web", &web, &[true]);
    write_manifest(
        dir.path(),
        "empty.yaml",
        &docs(&[service("empty", 80), slice("empty", 80, &[])]),
    );
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    );
    write_manifest(
        dir.path(),
        "empty-policy.yaml",
        &policy("empty", &["empty.test"], &[("empty", 80, 1, 0)], ""),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;
    let client = http_client();
    let base = format!("http://{}", agent.listen);

    let got = get(&client, agent.listen, "unknown.test", "/")
        .await
        .expect("request");
    assert_eq!(got.status, 404);
    assert_eq!(got.headers["x-weir-error"], "no-route");
    assert!(got.body.contains("unknown.test"), "{}", got.body);

    let got = get(&client, agent.listen, "empty.test", "/")
        .await
        .expect("request");
    assert_eq!(got.status, 503);
    assert_eq!(got.headers["x-weir-error"], "no-healthy-endpoint");

    // Host matching ignores case and port; headers forwarded as a proxy should.
    let got = get(&client, agent.listen, "WEB.test:8080", "/x?y=1")
        .await
        .expect("request");
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.headers["x-echo-x-forwarded-for"], "127.0.0.1");
    assert_eq!(got.headers["x-echo-via"], "1.1 weir");
    assert_eq!(got.headers["x-echo-host"], "WEB.test:8080");

    // Absolute-form: the target's authority wins over Host, and unknown authorities are
    // refused rather than proxied anywhere.
    let (_, absolute) = raw(
        agent.listen,
        "GET http://web.test/ HTTP/1.1\r\nHost: unknown.test\r\n\r\n",
    )
    .await;
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    let (_, open) = raw(
        agent.listen,
        "GET http://127.0.7.11:80/ HTTP/1.1\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert!(
        open.starts_with("HTTP/1.1 404") && open.contains("no-route"),
        "{open}"
    );
    let (_, connect) = raw(
        agent.listen,
        "CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 4"), "{connect}");

    let got = request(&client, "GET", &format!("{base}/"), Some(""))
        .await
        .expect("request");
    assert_eq!(got.status, 400, "{got:?}");
}

/// Sends raw bytes and reads the answer's head.
async fn raw(addr: SocketAddr, req: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(weir_tests::WAIT, s.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    (s, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_stream_can_run_over_mutual_tls() {
    use weir_tests::pki::TestCa;
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = tempfile::tempdir().expect("certs");
    let web = start_group(&["127.0.8.11"], "web").await.expect("web");
    svc_files(dir.path(), "web", &web, &[true]);
    write_manifest(
        dir.path(),
        "policy.yaml",
        &policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    );
    let ca = TestCa::new(certs.path(), "weir").expect("CA");
    let server = ca.issue("controller", &["localhost"]).expect("server cert");
    let client = ca.issue("agent", &["test-node"]).expect("client cert");
    let p = |p: &Path| p.display().to_string();
    let (cert, key, ca_file) = (p(&server.cert), p(&server.key), p(&ca.ca));
    let grpc = SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
    let admin = SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
    let controller = Controller::start_with(
        dir.path(),
        grpc,
        admin,
        &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_file],
    )
    .await
    .expect("controller");
    let (ccert, ckey) = (p(&client.cert), p(&client.key));
    let listen = SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
    let agent_admin = SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
    let agent = Agent::start_with(
        &format!("https://localhost:{}", controller.grpc.port()),
        listen,
        agent_admin,
        None,
        &[
            "--tls-ca",
            &ca_file,
            "--tls-cert",
            &ccert,
            "--tls-key",
            &ckey,
        ],
    )
    .await
    .expect("agent");
    agent.wait_ready().await;
    let counts = spread(agent.listen, "web.test", 5).await;
    assert_eq!(counts.values().sum::<usize>(), 5);
}
