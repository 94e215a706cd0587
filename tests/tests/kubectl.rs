//! `kubectl weir` end to end: the real `kubectl-weir` binary against a real controller and
//! agent in local mode (with real HTTP origins), and against the fake API server
//! ([`FakeApiServer`]) for the cluster path, where a real controller in Kubernetes mode and a
//! real agent write the NodeAgent and TrafficPolicy status that `check` reads, and the
//! fake's Service and Pod proxy forward to their real admin endpoints (`check`, `explain`
//! and `agent` on a chosen node, `top` over the controller pods). The fake stands in for
//! the API server's HTTP interface only: CRD establishment, Deployment readiness and Pod
//! conditions are written by the test, not by Kubernetes' controllers.
//!
//! Every wait polls the agent's `/config`, the controller's `/state` or the fake's objects.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use weir_tests::backend::{Backend, start_group};
use weir_tests::fake_apiserver::FakeApiServer;
use weir_tests::manifests::{docs, service, slice};
use weir_tests::{Agent, Controller, profile_dir, wait_for, write_manifest};

/// The plugin binary, built by `cargo test --workspace` (or `cargo build -p kubectl-weir`).
fn plugin() -> PathBuf {
    let bin = profile_dir().join("kubectl-weir");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace` or `cargo build -p kubectl-weir` first",
        bin.display()
    );
    bin
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the plugin with `args` (and `KUBECONFIG` when given) and collects its output.
async fn run(args: &[&str], kubeconfig: Option<&Path>) -> Run {
    let mut cmd = tokio::process::Command::new(plugin());
    cmd.args(args).env_remove("KUBECONFIG");
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let out = cmd.output().await.expect("run kubectl-weir");
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ kubectl weir {}\n{}{}(exit {})",
        args.join(" "),
        r.stdout,
        r.stderr,
        r.code
    );
    r
}

const POLICY: &str = r#"apiVersion: weir.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop, namespace: default}
spec:
  hosts: ["shop.test", "shop"]
  loadBalancer: {algorithm: WeightedRoundRobin}
  rules:
    - matches: [{method: GET}, {method: HEAD}]
      backendRefs:
        - {name: shop-v1, port: 80, weight: 90}
        - {name: shop-v2, port: 80, weight: 10}
        - {name: shop-standby, port: 80, priority: 1}
    - matches: [{headers: [{name: x-canary, value: "on"}]}]
      backendRefs: [{name: shop-v2, port: 80}]
    - backendRefs: [{name: shop-primary, port: 80}]
  failover: {minHealthyPercent: 70}
---
apiVersion: weir.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: catalog, namespace: default}
spec:
  hosts: ["catalog.test"]
  rules:
    - backendRefs: [{name: shop-primary, port: 80}]
"#;

/// Real origins for every Service of [`POLICY`], and the Services and EndpointSlices that
/// name them; `v1_ready` is the readiness of shop-v1's two endpoints.
struct Origins {
    groups: Vec<(&'static str, Vec<Backend>)>,
}

impl Origins {
    async fn start() -> Self {
        let mut groups = Vec::new();
        for (name, ips) in [
            ("shop-v1", &["127.0.12.11", "127.0.12.12"][..]),
            ("shop-v2", &["127.0.12.21"][..]),
            ("shop-standby", &["127.0.12.31"][..]),
            ("shop-primary", &["127.0.12.41"][..]),
        ] {
            groups.push((name, start_group(ips, name).await.expect("origins")));
        }
        Self { groups }
    }

    fn manifests(&self, v1_ready: [bool; 2]) -> String {
        let mut parts = Vec::new();
        for (name, group) in &self.groups {
            let eps: Vec<(String, bool)> = group
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let ready = if *name == "shop-v1" {
                        v1_ready[i]
                    } else {
                        true
                    };
                    (b.addr.ip().to_string(), ready)
                })
                .collect();
            let eps: Vec<(&str, bool)> = eps.iter().map(|(ip, r)| (ip.as_str(), *r)).collect();
            parts.push(service(name, 80));
            parts.push(slice(name, group[0].addr.port(), &eps));
        }
        docs(&parts)
    }

    fn addr(&self, service: &str, i: usize) -> SocketAddr {
        self.groups
            .iter()
            .find(|(n, _)| *n == service)
            .map(|(_, g)| g[i].addr)
            .expect("origin")
    }
}

/// Local mode: a controller on a manifest directory, an agent in sync with it.
async fn local() -> (Origins, tempfile::TempDir, Controller, Agent) {
    let origins = Origins::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifest(
        dir.path(),
        "services.yaml",
        &origins.manifests([true, true]),
    );
    write_manifest(dir.path(), "policy.yaml", POLICY);
    let controller = Controller::start(dir.path()).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    wait_synced(&controller, &agent).await;
    (origins, dir, controller, agent)
}

/// Waits until the agent runs the controller's latest table.
async fn wait_synced(controller: &Controller, agent: &Agent) -> u64 {
    wait_for("agent at the controller's version", || async {
        let latest = controller.state().await.ok()?["version"].as_u64()?;
        (latest > 0 && agent.version().await == latest).then_some(latest)
    })
    .await
}

fn local_args<'a>(controller: &'a str, agent: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--local",
        "--controller-admin",
        controller,
        "--agent-admin",
        agent,
    ];
    v.extend_from_slice(rest);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_and_then_names_the_stopped_agent() {
    let (_origins, _dir, controller, mut agent) = local().await;
    let (c, a) = (
        format!("http://{}", controller.admin),
        format!("http://{}", agent.admin),
    );

    let ok = run(&local_args(&c, &a, &["check"]), None).await;
    assert_eq!(ok.code, 0, "{}", ok.stdout);
    assert!(
        ok.stdout.contains("✓ controller ready: ready"),
        "{}",
        ok.stdout
    );
    assert!(ok.stdout.contains("✓ agent ready: ready"), "{}", ok.stdout);
    assert!(ok.stdout.contains("✓ agent synced"), "{}", ok.stdout);
    assert!(ok.stdout.contains("all 3 checks passed"), "{}", ok.stdout);

    agent.proc.kill();
    let failed = run(&local_args(&c, &a, &["check"]), None).await;
    assert_eq!(failed.code, 1, "{}", failed.stdout);
    let line = failed
        .stdout
        .lines()
        .find(|l| l.starts_with("✗ agent ready"))
        .unwrap_or_else(|| panic!("no failed agent line in\n{}", failed.stdout));
    assert!(
        line.contains(&format!("cannot reach the agent at {a}/readyz")),
        "{line}"
    );
    assert!(
        failed.stdout.contains("hint: is weir-agent running?"),
        "{}",
        failed.stdout
    );
    assert!(
        failed.stdout.contains("✓ controller ready"),
        "{}",
        failed.stdout
    );

    // -o json says the same to scripts.
    let json = run(&local_args(&c, &a, &["check", "-o", "json"]), None).await;
    let v: Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["checks"][1]["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_rule_tier_and_endpoint_weights() {
    let (origins, dir, controller, agent) = local().await;
    let (c, a) = (
        format!("http://{}", controller.admin),
        format!("http://{}", agent.admin),
    );
    let v1a = origins.addr("shop-v1", 0).to_string();
    let v1b = origins.addr("shop-v1", 1).to_string();
    let v2 = origins.addr("shop-v2", 0).to_string();

    let e = run(
        &local_args(&c, &a, &["explain", "Shop.Test:8080", "/items", "get"]),
        None,
    )
    .await;
    assert_eq!(e.code, 0, "{}{}", e.stdout, e.stderr);
    assert!(e.stdout.contains("route    default/shop"), "{}", e.stdout);
    assert!(
        e.stdout.contains("rule 1   matches: method GET"),
        "{}",
        e.stdout
    );
    assert!(
        e.stdout.contains("all traffic stays in tier 0"),
        "{}",
        e.stdout
    );
    let row = |addr: &str| -> String {
        e.stdout
            .lines()
            .find(|l| l.contains(addr))
            .unwrap_or_else(|| panic!("{addr} missing in\n{}", e.stdout))
            .to_string()
    };
    assert!(
        row(&v1a).contains("45.0%") && row(&v1a).contains("healthy"),
        "{}",
        row(&v1a)
    );
    assert!(row(&v1b).contains("45.0%"), "{}", row(&v1b));
    assert!(row(&v2).contains("10.0%"), "{}", row(&v2));
    assert!(
        e.stdout.contains("policy   default/shop: Accepted"),
        "{}",
        e.stdout
    );

    // A header picks the canary rule for a write; the read rule says why it was skipped.
    let canary = run(
        &local_args(
            &c,
            &a,
            &[
                "explain",
                "shop.test",
                "/cart",
                "POST",
                "-H",
                "x-canary: on",
                "-o",
                "json",
            ],
        ),
        None,
    )
    .await;
    let j: Value = serde_json::from_str(&canary.stdout).expect("json");
    assert_eq!(j["rule"], 2, "{j}");
    assert!(
        j["rulesTried"][0]["why"]
            .as_str()
            .is_some_and(|w| w.contains("method is not GET")),
        "{j}"
    );
    assert_eq!(j["endpoints"][0]["address"], v2.as_str());
    assert_eq!(j["endpoints"][0]["sharePercent"], 100.0);

    // A typo gets the nearest host, and a failure exit.
    let typo = run(&local_args(&c, &a, &["explain", "shp.test"]), None).await;
    assert_eq!(typo.code, 1);
    assert!(
        typo.stderr.contains("did you mean \"shop.test\""),
        "{}",
        typo.stderr
    );

    // Half of shop-v1 goes unready: tier 0 is (90·½ + 10)/100 = 55 % healthy, below 70 %,
    // so part of the traffic fails over to the standby, and the unready endpoint says why.
    let before = agent.version().await;
    write_manifest(
        dir.path(),
        "services.yaml",
        &origins.manifests([true, false]),
    );
    agent
        .wait_config(before, |cfg| {
            weir_tests::endpoint_weight(cfg, "default/shop", &v1b) == Some(0)
        })
        .await;
    let f = run(
        &local_args(&c, &a, &["explain", "shop.test", "/", "GET", "-o", "json"]),
        None,
    )
    .await;
    let j: Value = serde_json::from_str(&f.stdout).expect("json");
    assert_eq!(j["tier"]["activeTier"], 1, "{j}");
    let why = j["tier"]["why"].as_str().unwrap_or_default();
    assert!(why.starts_with("failover: tier 0 is 55% healthy"), "{why}");
    let unready = j["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["address"] == v1b.as_str()))
        .expect("unready endpoint");
    assert_eq!(unready["healthy"], false);
    assert_eq!(unready["why"], "not ready in its EndpointSlice");
    assert!(
        j["tier"]["tiers"][1]["trafficPercent"]
            .as_f64()
            .is_some_and(|p| p > 0.0),
        "{j}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_empties_the_agent_cache_by_prefix_and_by_host() {
    let (_origins, dir, controller, agent) = local().await;
    write_manifest(
        dir.path(),
        "pages.yaml",
        "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: pages, namespace: default}\n\
         spec:\n  hosts: [\"pages.test\"]\n  rules: [{backendRefs: [{name: shop-primary, port: 80}]}]\n  \
         cache: {enabled: true, maxSize: 4Mi}\n",
    );
    wait_for("the pages route on the agent", || async {
        let cfg = agent.config().await.ok()?;
        cfg["routes"]
            .as_array()?
            .iter()
            .any(|r| r["name"] == "default/pages")
            .then_some(())
    })
    .await;
    let client = weir_tests::http_client();
    let x_cache = |path: &str| {
        let (client, addr, path) = (client.clone(), agent.listen, path.to_string());
        async move {
            let got = weir_tests::get(&client, addr, "pages.test", &path)
                .await
                .expect("request");
            assert_eq!(got.status, 200, "{path}: {got:?}");
            got.headers
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        }
    };
    // Stored as the answer streams: a copy is there once a request gets HIT.
    let stored = |path: &'static str| {
        let x_cache = &x_cache;
        async move {
            wait_for("stored", || async {
                (x_cache(path).await == "HIT").then_some(())
            })
            .await
        }
    };
    let (page, img) = ("/page?max-age=600", "/img/a%20b?max-age=600");
    for p in [page, img] {
        assert_eq!(x_cache(p).await, "MISS");
        stored(p).await;
    }
    let (c, a) = (
        format!("http://{}", controller.admin),
        format!("http://{}", agent.admin),
    );

    // A prefix that needs escaping (a space, encoded in the path as %20).
    let by_prefix = run(
        &local_args(&c, &a, &["purge", "--prefix", "/img/a%20"]),
        None,
    )
    .await;
    assert_eq!(by_prefix.code, 0, "{}", by_prefix.stderr);
    assert!(
        by_prefix
            .stdout
            .contains("1 objects purged from memory on 1 of 1 agents"),
        "{}",
        by_prefix.stdout
    );
    assert_eq!(x_cache(img).await, "MISS", "purged");
    assert_eq!(x_cache(page).await, "HIT", "outside the prefix");
    stored(img).await;

    let by_host = run(
        &local_args(&c, &a, &["purge", "--host", "pages.test", "-o", "json"]),
        None,
    )
    .await;
    assert_eq!(by_host.code, 0, "{}", by_host.stderr);
    let j: Value = serde_json::from_str(&by_host.stdout).expect("json");
    assert_eq!(j[0]["purged"], 2, "{j}");
    assert_eq!(x_cache(page).await, "MISS");

    // An agent that cannot be reached: the purge fails, and says where it tried.
    let closed = format!("http://{}", weir_tests::free_local_addr());
    let failed = run(&local_args(&c, &closed, &["purge"]), None).await;
    assert_eq!(failed.code, 1);
    assert!(
        failed.stdout.contains("failed: cannot reach the agent"),
        "{}",
        failed.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_and_agent_list_the_routes() {
    let (origins, _dir, controller, agent) = local().await;
    let (c, a) = (
        format!("http://{}", controller.admin),
        format!("http://{}", agent.admin),
    );
    let top = run(&local_args(&c, &a, &["top"]), None).await;
    assert_eq!(top.code, 0, "{}", top.stderr);
    let header = top.stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ROUTE") && header.contains("RPS") && header.contains("P99"),
        "{header}"
    );
    for route in ["default/shop", "default/catalog"] {
        assert!(
            top.stdout.lines().any(|l| l.starts_with(route)),
            "{route} in\n{}",
            top.stdout
        );
    }
    let json = run(&local_args(&c, &a, &["top", "-o", "json"]), None).await;
    let rows: Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");

    // --watch refreshes: with -o json, one document a line, each read as it comes.
    let mut watch = tokio::process::Command::new(plugin())
        .args(local_args(&c, &a, &["top", "--watch", "-o", "json"]))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("top --watch");
    let stdout = watch.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    for refresh in 0..2 {
        let line = tokio::time::timeout(weir_tests::WAIT, lines.next_line())
            .await
            .expect("a refresh in time")
            .expect("read")
            .unwrap_or_else(|| panic!("top --watch ended before refresh {refresh}"));
        let rows: Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
    }
    let _ = watch.kill().await;

    let version = agent.version().await;
    let view = run(&local_args(&c, &a, &["agent"]), None).await;
    assert_eq!(view.code, 0, "{}", view.stderr);
    assert!(
        view.stdout
            .contains(&format!("table       version {version}, ready")),
        "{}",
        view.stdout
    );
    assert!(
        view.stdout.contains("controller  connected to"),
        "{}",
        view.stdout
    );
    let v2 = origins.addr("shop-v2", 0).to_string();
    assert!(
        view.stdout
            .lines()
            .any(|l| l.contains(&v2) && l.contains("healthy")),
        "{}",
        view.stdout
    );

    // Local mode has one agent: another node is an error that says so.
    let other = run(&local_args(&c, &a, &["agent", "elsewhere"]), None).await;
    assert_eq!(other.code, 1);
    assert!(
        other.stderr.contains("local mode has one agent"),
        "{}",
        other.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_controller_is_a_clear_error() {
    let port = weir_tests::free_port("127.0.0.1");
    let url = format!("http://127.0.0.1:{port}");
    let r = run(&local_args(&url, &url, &["top"]), None).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains(&format!("cannot reach the controller at {url}/state")),
        "{}",
        r.stderr
    );
}

// ---- cluster mode, against the fake API server ----

const NS: &str = "weir-system";

fn labels(component: &str) -> String {
    format!(
        "{{app.kubernetes.io/name: weir, app.kubernetes.io/instance: weir, app.kubernetes.io/part-of: weir, app.kubernetes.io/component: {component}}}"
    )
}

/// What the chart installs, as the API server would hold it once running: the CRDs
/// (Established), the controller Deployment (ready) and Service, and one agent pod per node.
fn installed(nodes: &[&str]) -> String {
    let crds = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weir/crds/crds.yaml"),
    )
    .expect("chart CRDs");
    let mut parts = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&crds) {
        let mut v: Value = serde::Deserialize::deserialize(doc).expect("CRD yaml");
        if v.is_null() {
            continue;
        }
        v["status"] = serde_json::json!({"conditions": [
            {"type": "NamesAccepted", "status": "True"},
            {"type": "Established", "status": "True"},
        ]});
        parts.push(format!("{v}\n"));
    }
    let l = labels("controller");
    parts.push(format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: weir-controller, namespace: {NS}, labels: {l}}}\n\
         spec:\n  replicas: 1\n  selector: {{matchLabels: {l}}}\n  template:\n    metadata: {{labels: {l}}}\n    \
         spec: {{containers: [{{name: controller, image: weir-controller}}]}}\n\
         status: {{replicas: 1, readyReplicas: 1}}\n"
    ));
    parts.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: weir-controller, namespace: {NS}, labels: {l}}}\n\
         spec:\n  ports: [{{name: grpc, port: 18000}}, {{name: admin, port: 18080}}]\n"
    ));
    parts.push(format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: weir-controller-0, namespace: {NS}, labels: {l}}}\n\
         spec:\n  containers: [{{name: controller, ports: [{{name: grpc, containerPort: 18000}}, {{name: admin, containerPort: 18080}}]}}]\n\
         status: {{conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    ));
    let a = labels("agent");
    for node in nodes {
        parts.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
        ));
        parts.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: weir-agent-{node}, namespace: {NS}, labels: {a}}}\n\
             spec:\n  nodeName: {node}\n  containers: [{{name: agent, ports: [{{name: proxy, containerPort: 15001}}, {{name: admin, containerPort: 15000}}]}}]\n\
             status: {{conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        ));
    }
    docs(&parts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_a_cluster_passes_and_then_names_the_node_without_an_agent() {
    let origins = Origins::start().await;
    let fake = FakeApiServer::start().await.expect("fake API server");
    fake.apply(&origins.manifests([true, true]))
        .expect("services");
    fake.apply(POLICY).expect("policies");
    fake.apply(&installed(&["n1"])).expect("install");
    let dir = tempfile::tempdir().expect("tempdir");
    let controller_kc = dir.path().join("controller.kubeconfig");
    let user_kc = dir.path().join("user.kubeconfig");
    fake.write_kubeconfig(&controller_kc, "controller")
        .expect("kubeconfig");
    fake.write_kubeconfig(&user_kc, "user").expect("kubeconfig");
    let controller = Controller::start_kube(&controller_kc, &[])
        .await
        .expect("controller");
    let listen = weir_tests::free_local_addr();
    let admin = weir_tests::free_local_addr();
    let agent = Agent::start_with(
        &controller.url(),
        listen,
        admin,
        None,
        &["--node-name", "n1"],
    )
    .await
    .expect("agent");
    fake.proxy("services", NS, "weir-controller:18080", controller.admin);
    fake.proxy("pods", NS, "weir-agent-n1:15000", agent.admin);
    fake.proxy("pods", NS, "weir-controller-0:18080", controller.admin);

    // The controller has written both policies' status and the agent's NodeAgent, with the
    // generations it runs.
    wait_for(
        "NodeAgent n1 connected and running both policies",
        || async {
            let na = fake.object("weir.dev/v1alpha1", "NodeAgent", "", "n1")?;
            let gens = &na["status"]["appliedGenerations"];
            (na["status"]["connected"] == true
                && gens["default/shop"] == 1
                && gens["default/catalog"] == 1)
                .then_some(())
        },
    )
    .await;
    wait_for("policies Programmed", || async {
        let ok = ["shop", "catalog"].iter().all(|n| {
            fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", n)
                .is_some_and(|p| p["status"]["observedGeneration"] == 1)
        });
        ok.then_some(())
    })
    .await;

    let ok = run(&["check"], Some(&user_kc)).await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    for line in [
        "✓ CRDs: trafficpolicies.weir.dev, nodeagents.weir.dev present and Established",
        "✓ controller pods: weir-controller 1/1 ready",
        "✓ controller /readyz: ready",
        "✓ agents connected: 1/1 nodes have a connected agent",
        "✓ agents synced: 1 connected agents run the current generation of 2 policies",
        "✓ no NACKs",
    ] {
        assert!(
            ok.stdout.contains(line),
            "{line:?} missing in\n{}",
            ok.stdout
        );
    }

    // The pod proxy reaches the agent on its node.
    let e = run(
        &["explain", "shop.test", "--node", "n1", "-o", "json"],
        Some(&user_kc),
    )
    .await;
    let j: Value = serde_json::from_str(&e.stdout).expect("json");
    assert_eq!(
        (j["node"].as_str(), j["rule"].as_u64()),
        (Some("n1"), Some(1)),
        "{j}"
    );
    assert_eq!(j["policy"]["accepted"], true, "{j}");

    // agent shows the node's table through the Pod proxy, and its NodeAgent.
    let view = run(&["agent", "n1"], Some(&user_kc)).await;
    assert_eq!(view.code, 0, "{}", view.stderr);
    assert!(view.stdout.contains("node        n1"), "{}", view.stdout);
    assert!(
        view.stdout.contains("NodeAgent   connected=true"),
        "{}",
        view.stdout
    );
    let missing = run(&["agent", "n9"], Some(&user_kc)).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains(
            "no weir agent pod on node \"n9\" in namespace weir-system; agents run on: n1"
        ),
        "{}",
        missing.stderr
    );

    // top reads every controller replica through the Pod proxy.
    let top = run(&["top", "-o", "json"], Some(&user_kc)).await;
    let rows: Value = serde_json::from_str(&top.stdout).expect("json");
    let routes: Vec<&str> = rows
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["route"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(routes, ["default/catalog", "default/shop"], "{rows}");
    let state_of_pod = format!("/api/v1/namespaces/{NS}/pods/weir-controller-0:18080/proxy/state");
    assert!(
        fake.proxied().contains(&state_of_pod),
        "{:?}",
        fake.proxied()
    );

    // purge reaches every agent pod with a POST through the Pod proxy.
    let purged = run(
        &["purge", "--host", "shop.test", "-o", "json"],
        Some(&user_kc),
    )
    .await;
    assert_eq!(purged.code, 0, "{}{}", purged.stdout, purged.stderr);
    let j: Value = serde_json::from_str(&purged.stdout).expect("json");
    assert_eq!(j, serde_json::json!([{"node": "n1", "purged": 0}]));
    let purge_path = format!("/api/v1/namespaces/{NS}/pods/weir-agent-n1:15000/proxy/cache/purge");
    assert!(fake.proxied().contains(&purge_path), "{:?}", fake.proxied());

    // A second node joins without an agent: check fails and names it.
    fake.apply("apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n")
        .expect("node");
    let failed = run(&["check"], Some(&user_kc)).await;
    assert_eq!(failed.code, 1, "{}", failed.stdout);
    assert!(
        failed
            .stdout
            .contains("✗ agents connected: 1/2 nodes: no NodeAgent for n2"),
        "{}",
        failed.stdout
    );

    // An agent pod that cannot be reached fails the purge, and is named.
    fake.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: weir-agent-n2, namespace: {NS}, labels: {}}}\n\
         spec:\n  nodeName: n2\n  containers: [{{name: agent}}]\n",
        labels("agent")
    ))
    .expect("pod");
    let partial = run(&["purge"], Some(&user_kc)).await;
    assert_eq!(partial.code, 1, "{}", partial.stdout);
    assert!(
        partial
            .stdout
            .contains("0 objects purged from memory on 1 of 2 agents"),
        "{}",
        partial.stdout
    );
    assert!(
        partial
            .stdout
            .lines()
            .any(|l| l.starts_with("n2") && l.contains("failed:")),
        "{}",
        partial.stdout
    );

    // Another namespace has no weir: every lookup there says so.
    let elsewhere = run(&["check", "-n", "nowhere"], Some(&user_kc)).await;
    assert_eq!(elsewhere.code, 1);
    assert!(
        elsewhere
            .stdout
            .contains("no weir controller Deployment in namespace nowhere"),
        "{}",
        elsewhere.stdout
    );
}
