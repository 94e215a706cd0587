//! Kubernetes mode end to end **against a fake API server**: the real `weir-controller`
//! binary (no `--config-dir`, `KUBECONFIG` pointing at [`FakeApiServer`] on 127.0.0.1) with
//! the real kube-rs client, and a real `weir-agent` following it over gRPC. The fake speaks
//! the HTTP API (list/watch with resourceVersions, bookmarks, `410 Gone`, status patches), not
//! Kubernetes semantics: these tests show that weir drives the API correctly, not that a real
//! cluster behaves like the fake. Every wait polls the agent's `/config` or the fake's
//! recorded state; nothing sleeps. Later tests cover the mTLS agent stream that
//! Kubernetes mode requires (with a tonic client standing in for the agent), NodeAgents
//! written by two replicas and cleaned up when their Node goes, NACKs in NodeAgent status,
//! Events on failover and rejection, and certificate rotation without restart. The fake
//! stores Nodes, NodeAgents and Events like any object; it does not run Kubernetes'
//! controllers (nothing else deletes or garbage-collects them).

use weir_proto::v1::routing_discovery_client::RoutingDiscoveryClient;
use weir_proto::v1::{AgentMessage, Hello, RoutingUpdate, agent_message, controller_message};
use weir_tests::fake_apiserver::FakeApiServer;
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::pki::{CertFiles, TestCa};
use weir_tests::{Agent, Controller, endpoint_weight, wait_for};

const PORT: u16 = 8080;

/// A fake API server holding Service `web` with two ready endpoints and a policy for it,
/// and a kubeconfig pointing at it.
async fn cluster() -> (FakeApiServer, tempfile::TempDir) {
    let fake = FakeApiServer::start().await.expect("fake API server");
    fake.apply(&docs(&[
        service("web", 80),
        slice("web", PORT, &[("127.0.3.11", true), ("127.0.3.12", true)]),
        policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    ]))
    .expect("apply");
    let dir = tempfile::tempdir().expect("tempdir");
    fake.write_kubeconfig(&dir.path().join("kubeconfig"), "controller-a")
        .expect("kubeconfig");
    (fake, dir)
}

/// [`cluster`] with one controller replica and one agent connected to it.
async fn cluster_with_agent() -> (FakeApiServer, tempfile::TempDir, Controller, Agent) {
    let (fake, dir) = cluster().await;
    let controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    (fake, dir, controller, agent)
}

fn ep(ip: &str) -> String {
    format!("{ip}:{PORT}")
}

fn routed(config: &serde_json::Value, ip: &str) -> bool {
    endpoint_weight(config, "default/web", &ep(ip)).is_some_and(|w| w > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gets_routes_listed_from_the_api_server() {
    let (fake, _dir, _controller, agent) = cluster_with_agent().await;
    let config = agent
        .wait_config(0, |c| routed(c, "127.0.3.11") && routed(c, "127.0.3.12"))
        .await;
    assert_eq!(config["routes"].as_array().map(Vec::len), Some(1));
    assert!(fake.lists() >= 3, "every reflector listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_service_and_deleted_policy_reach_status_and_the_agent() {
    let (fake, _dir, _controller, agent) = cluster_with_agent().await;
    let v = agent.wait_config(0, |c| routed(c, "127.0.3.11")).await["version"]
        .as_u64()
        .unwrap_or(0);

    // The Service goes: the policy says which reference is missing and keeps its (last good)
    // route, which resolves to no endpoints today (routing.rs: last good *spec*, today's
    // endpoints), so its host answers 503 rather than 404.
    fake.delete("v1", "Service", "default", "web")
        .expect("delete service");
    wait_for("ResolvedRefs=False naming the Service", || async {
        let c = condition(&fake, "web", "ResolvedRefs")?;
        (c["status"] == "False" && c["message"].as_str()?.contains("web")).then_some(())
    })
    .await;
    let config = agent.wait_config(v, |c| !routed(c, "127.0.3.11")).await;
    assert_eq!(config["routes"].as_array().map(Vec::len), Some(1));

    // It comes back: so do its endpoints.
    let v = agent.version().await;
    fake.apply(&service("web", 80)).expect("apply service");
    agent.wait_config(v, |c| routed(c, "127.0.3.11")).await;

    // The policy goes: its route leaves the agent.
    let v = agent.version().await;
    fake.delete("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")
        .expect("delete policy");
    agent
        .wait_config(v, |c| c["routes"].as_array().is_some_and(Vec::is_empty))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_turning_unready_in_an_endpointslice_reaches_the_agent() {
    let (fake, _dir, _controller, agent) = cluster_with_agent().await;
    let v = agent
        .wait_config(0, |c| routed(c, "127.0.3.11") && routed(c, "127.0.3.12"))
        .await["version"]
        .as_u64()
        .unwrap_or(0);

    fake.apply(&slice(
        "web",
        PORT,
        &[("127.0.3.11", true), ("127.0.3.12", false)],
    ))
    .expect("apply");
    agent
        .wait_config(v, |c| routed(c, "127.0.3.11") && !routed(c, "127.0.3.12"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_expired_with_410_gone_makes_the_controller_relist_and_converge() {
    let (fake, _dir, _controller, agent) = cluster_with_agent().await;
    let v = agent.wait_config(0, |c| routed(c, "127.0.3.11")).await["version"]
        .as_u64()
        .unwrap_or(0);
    let lists_before = fake.lists();

    // History is compacted and every watch closed; the change made meanwhile is only
    // visible to a client that relists.
    fake.expire_history();
    fake.apply(&slice("web", PORT, &[("127.0.3.13", true)]))
        .expect("apply");

    agent
        .wait_config(v, |c| {
            routed(c, "127.0.3.13") && !routed(c, "127.0.3.11") && !routed(c, "127.0.3.12")
        })
        .await;
    wait_for("410 Gone sent and every reflector relisted", || async {
        (fake.gone_sent() >= 1 && fake.lists() >= lists_before + 3).then_some(())
    })
    .await;
}

/// The condition `type_` of the policy `name`'s status as the fake API server holds it.
fn condition(fake: &FakeApiServer, name: &str, type_: &str) -> Option<serde_json::Value> {
    let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", name)?;
    tp["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Tokens (one per controller's kubeconfig) of the clients that wrote a status.
fn status_writers(fake: &FakeApiServer) -> Vec<String> {
    let mut who: Vec<String> = fake
        .writes()
        .into_iter()
        .filter(|w| w.method == "PATCH" && w.path.ends_with("/status"))
        .filter_map(|w| w.token)
        .collect();
    who.sort();
    who.dedup();
    who
}

fn lease_holder(fake: &FakeApiServer) -> Option<String> {
    let lease = fake.object(
        "coordination.k8s.io/v1",
        "Lease",
        "weir-system",
        "weir-controller",
    )?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_patched_with_accepted_programmed_and_rejection_reasons() {
    let (fake, _dir, _controller, agent) = cluster_with_agent().await;
    agent.wait_ready().await;

    wait_for(
        "web Accepted=True and Programmed=True on 1/1 agents",
        || async {
            let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")?;
            let accepted = condition(&fake, "web", "Accepted")?;
            let programmed = condition(&fake, "web", "Programmed")?;
            (accepted["status"] == "True"
                && programmed["status"] == "True"
                && tp["status"]["agents"] == serde_json::json!({"synced": 1, "total": 1})
                && tp["status"]["observedGeneration"] == 1
                && tp["status"]["endpoints"] == "2/2")
                .then_some(())
        },
    )
    .await;

    fake.apply(&policy(
        "bad",
        &["bad.test"],
        &[("web", 80, 1, 0)],
        "  loadBalancer: {algorithm: Bogus}\n",
    ))
    .expect("apply");
    let accepted = wait_for("bad Accepted=False", || async {
        condition(&fake, "bad", "Accepted").filter(|c| c["status"] == "False")
    })
    .await;
    assert_eq!(accepted["reason"], "Invalid");
    let message = accepted["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("default/bad") && message.contains("Bogus"),
        "{message}"
    );
    assert_eq!(
        condition(&fake, "bad", "Programmed").map(|c| c["status"].clone()),
        Some("False".into())
    );
}

/// Two replicas on the fake: `a` (kubeconfig token `controller-a`) started first and
/// waited for until it holds the Lease, then `b` (`controller-b`); both with `flags`.
async fn leader_then_follower(
    fake: &FakeApiServer,
    dir: &tempfile::TempDir,
    flags: &[&str],
) -> (Controller, Controller) {
    let kc_b = dir.path().join("kubeconfig-b");
    fake.write_kubeconfig(&kc_b, "controller-b")
        .expect("kubeconfig");
    let start = |kc: std::path::PathBuf, id: &'static str| {
        let args: Vec<&str> = ["--identity", id].iter().chain(flags).copied().collect();
        async move { Controller::start_kube(&kc, &args).await }
    };
    let a = start(dir.path().join("kubeconfig"), "a")
        .await
        .expect("controller a");
    wait_for("a leads", || async {
        (lease_holder(fake).as_deref() == Some("a")).then_some(())
    })
    .await;
    let b = start(kc_b, "b").await.expect("controller b");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_status_and_another_replica_takes_over_when_it_dies() {
    let (fake, dir) = cluster().await;
    // A short lease keeps the takeover quick; nothing below depends on its timing.
    let (mut a, _b) = leader_then_follower(&fake, &dir, &["--lease-duration", "4s"]).await;
    wait_for("a writes status", || async {
        condition(&fake, "web", "Accepted").map(|_| ())
    })
    .await;

    // A change after b is up: its status is written, and by a alone.
    fake.apply(&slice("web", PORT, &[("127.0.3.11", true)]))
        .expect("apply");
    wait_for("status shows one endpoint", || async {
        let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")?;
        (tp["status"]["endpoints"] == "1/1").then_some(())
    })
    .await;
    assert_eq!(status_writers(&fake), ["controller-a"]);
    assert_eq!(lease_holder(&fake).as_deref(), Some("a"));

    a.proc.kill();
    fake.apply(&slice(
        "web",
        PORT,
        &[
            ("127.0.3.11", true),
            ("127.0.3.12", true),
            ("127.0.3.13", true),
        ],
    ))
    .expect("apply");
    wait_for("b takes the lease and writes status", || async {
        let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")?;
        (lease_holder(&fake).as_deref() == Some("b")
            && status_writers(&fake) == ["controller-a", "controller-b"]
            && tp["status"]["endpoints"] == "3/3")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_releases_the_lease_and_exits_with_agents_connected() {
    let (fake, dir) = cluster().await;
    // A lease far longer than the test's patience: b can only take over this quickly if a
    // gives the Lease up.
    let (mut a, b) = leader_then_follower(&fake, &dir, &["--lease-duration", "300s"]).await;
    // An agent streaming from a (b is its second choice): its stream must not keep a from
    // exiting, and a's shutdown sends it to b.
    let agent = agent_of(&format!("{},{}", a.url(), b.url()), "node-a").await;
    agent.wait_ready().await;
    wait_nodeagent(&fake, "node-a", true, "a").await;

    a.proc.terminate(); // returns once a has exited
    wait_for("b takes the released lease", || async {
        (lease_holder(&fake).as_deref() == Some("b")).then_some(())
    })
    .await;
    wait_nodeagent(&fake, "node-a", true, "b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_refuses_to_start_without_tls_or_plaintext() {
    let (_fake, dir) = cluster().await;
    let out = std::process::Command::new(weir_tests::bin_dir().join("weir-controller"))
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .expect("run weir-controller");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("--plaintext"),
        "{stderr}"
    );
}

/// Opens a routing stream over TLS as an agent would and returns the first update.
async fn first_update_over_tls(
    controller: &Controller,
    ca: &std::path::Path,
    client: Option<&CertFiles>,
) -> anyhow::Result<RoutingUpdate> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&c.cert)?,
            std::fs::read(&c.key)?,
        ));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", controller.grpc.port()))?
        .tls_config(tls)?
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: "tls-node".into(),
            ..Hello::default()
        })),
    })
    .await?;
    let mut stream = RoutingDiscoveryClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match stream.message().await?.map(|m| m.kind) {
        Some(Some(controller_message::Kind::Update(u))) => Ok(u),
        other => anyhow::bail!("expected a routing update, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stream_is_mtls_and_refuses_clients_without_a_certificate_from_the_ca() {
    let (_fake, dir) = cluster().await;
    let ca = TestCa::new(dir.path(), "weir").expect("CA");
    let server = ca.issue("controller", &["localhost"]).expect("server cert");
    let agent = ca.issue("agent", &["test-node"]).expect("client cert");
    let other_ca = TestCa::new(dir.path(), "other").expect("other CA");
    let stranger = other_ca.issue("stranger", &["test-node"]).expect("cert");
    let (cert, key, ca_file) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
        ca.ca.display().to_string(),
    );
    let controller = Controller::start_kube(
        &dir.path().join("kubeconfig"),
        &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_file],
    )
    .await
    .expect("controller");

    let update = first_update_over_tls(&controller, &ca.ca, Some(&agent))
        .await
        .expect("routing stream with a client certificate");
    assert!(update.full);
    assert!(update.upserted.iter().any(|r| r.name == "default/web"));

    assert!(
        first_update_over_tls(&controller, &ca.ca, None)
            .await
            .is_err(),
        "a client without certificate was served"
    );
    assert!(
        first_update_over_tls(&controller, &ca.ca, Some(&stranger))
            .await
            .is_err(),
        "a client with a certificate from another CA was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_wiped_by_someone_else_is_written_again() {
    let (fake, dir) = cluster().await;
    let _controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    wait_for("web Accepted=True", || async {
        condition(&fake, "web", "Accepted").filter(|c| c["status"] == "True")
    })
    .await;
    let patches = fake.writes().len();

    let mut wiped = policy("web", &["web.test"], &[("web", 80, 1, 0)], "");
    wiped.push_str("status: {conditions: []}\n");
    fake.apply(&wiped).expect("apply");
    wait_for("web Accepted=True again", || async {
        (fake.writes().len() > patches)
            .then(|| condition(&fake, "web", "Accepted"))
            .flatten()
            .filter(|c| c["status"] == "True")
    })
    .await;
}

// ---- NodeAgents, Events and certificate rotation (still against the fake API server) ----

fn node(name: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n")
}

fn nodeagent(fake: &FakeApiServer, name: &str) -> Option<serde_json::Value> {
    fake.object("weir.dev/v1alpha1", "NodeAgent", "", name)
}

/// Waits until NodeAgent `name` has `connected` and names `controller`.
async fn wait_nodeagent(fake: &FakeApiServer, name: &str, connected: bool, controller: &str) {
    wait_for(
        &format!("NodeAgent {name} connected={connected} controller={controller}"),
        || async {
            let na = nodeagent(fake, name)?;
            (na["status"]["connected"] == connected && na["status"]["controller"] == controller)
                .then_some(())
        },
    )
    .await;
}

async fn agent_on(controller: &Controller, node_name: &str) -> Agent {
    agent_of(&controller.url(), node_name).await
}

/// An agent following `controllers` (comma-separated, tried in order) as `node_name`.
async fn agent_of(controllers: &str, node_name: &str) -> Agent {
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
    Agent::start_with(
        controllers,
        listen,
        admin,
        None,
        &["--node-name", node_name],
    )
    .await
    .expect("agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeagents_of_two_replicas_are_written_counted_and_cleaned_up() {
    let (fake, dir) = cluster().await;
    fake.apply(&docs(&[node("n1"), node("n2")])).expect("apply");
    let (a, b) = leader_then_follower(&fake, &dir, &["--node-gone-grace", "1s"]).await;
    let _agent1 = agent_on(&a, "n1").await;
    let mut agent2 = agent_on(&b, "n2").await;

    // Each replica writes the NodeAgent of its own agent.
    wait_nodeagent(&fake, "n1", true, "a").await;
    wait_nodeagent(&fake, "n2", true, "b").await;
    // The leader (a) counts b's agent too.
    wait_for("web status agents 2/2", || async {
        let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")?;
        let programmed = condition(&fake, "web", "Programmed")?;
        (tp["status"]["agents"] == serde_json::json!({"synced": 2, "total": 2})
            && programmed["status"] == "True")
            .then_some(())
    })
    .await;
    let na = nodeagent(&fake, "n2").expect("n2");
    assert_eq!(na["status"]["appliedGenerations"]["default/web"], 1);
    assert!(na["status"]["appliedVersion"].as_u64().is_some(), "{na}");
    assert!(na["status"]["lastAckTime"].is_string(), "{na}");
    let b_writes = fake
        .writes()
        .iter()
        .filter(|w| w.path.contains("/nodeagents/n2") && w.token.as_deref() == Some("controller-b"))
        .count();
    assert!(b_writes > 0, "b wrote n2");
    assert!(
        fake.writes()
            .iter()
            .filter(|w| w.path.contains("/nodeagents/n2") && w.method != "DELETE")
            .all(|w| w.token.as_deref() == Some("controller-b")),
        "only the replica serving n2 writes it"
    );

    agent2.proc.kill();
    wait_nodeagent(&fake, "n2", false, "b").await;
    wait_for("web status agents 1/1", || async {
        let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")?;
        (tp["status"]["agents"] == serde_json::json!({"synced": 1, "total": 1})).then_some(())
    })
    .await;

    // The Node goes: the leader deletes its NodeAgent, and only that one.
    fake.delete("v1", "Node", "", "n2").expect("delete");
    wait_for("NodeAgent n2 deleted", || async {
        nodeagent(&fake, "n2").is_none().then_some(())
    })
    .await;
    assert!(nodeagent(&fake, "n1").is_some(), "n1's Node exists");
    let deleters: Vec<_> = fake
        .writes()
        .into_iter()
        .filter(|w| w.method == "DELETE")
        .filter_map(|w| w.token)
        .collect();
    assert_eq!(deleters, ["controller-a"], "the leader deletes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_shows_in_the_nodeagent() {
    let (fake, dir) = cluster().await;
    let controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    // A hand-made agent (a tonic client) that refuses the table it is sent: a real agent
    // only NACKs tables it cannot apply, which a valid controller does not produce.
    let channel = tonic::transport::Channel::from_shared(controller.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: "nacker".into(),
            zone: "z9".into(),
            ..Hello::default()
        })),
    })
    .await
    .expect("hello");
    let mut stream = RoutingDiscoveryClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let version = match stream.message().await.expect("message").map(|m| m.kind) {
        Some(Some(controller_message::Kind::Update(u))) => u.version,
        other => panic!("expected a routing update, got {other:?}"),
    };
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Nack(weir_proto::v1::Nack {
            version,
            applied_version: 0,
            error: "route default/web: test refusal".into(),
        })),
    })
    .await
    .expect("nack");
    let na = wait_for("NodeAgent nacker has lastNack", || async {
        nodeagent(&fake, "nacker").filter(|na| na["status"]["lastNack"].is_object())
    })
    .await;
    assert_eq!(na["status"]["lastNack"]["version"], version);
    assert_eq!(
        na["status"]["lastNack"]["error"],
        "route default/web: test refusal"
    );
    assert_eq!(na["status"]["zone"], "z9");
    assert_eq!(na["status"]["connected"], true);
    assert!(
        na["status"].get("appliedGenerations").is_none(),
        "nothing applied: {na}"
    );
}

/// Events recorded on policy `name` with `reason`, and how many writes (creates and
/// series patches) carried them.
fn events(fake: &FakeApiServer, name: &str, reason: &str) -> (Vec<serde_json::Value>, usize) {
    let objects: Vec<_> = fake
        .objects("events.k8s.io/v1", "Event")
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect();
    let writes = fake
        .writes()
        .iter()
        .filter(|w| w.path.contains("/events") && w.body["reason"] == reason)
        .filter(|w| w.body["regarding"]["name"] == name)
        .count();
    (objects, writes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_recorded_on_failover_and_on_rejection() {
    let (fake, dir) = cluster().await;
    fake.apply(&docs(&[
        service("standby", 80),
        slice("standby", PORT, &[("127.0.3.21", true)]),
        policy(
            "web",
            &["web.test"],
            &[("web", 80, 1, 0), ("standby", 80, 1, 1)],
            "",
        ),
    ]))
    .expect("apply");
    let _controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    wait_for("web accepted on tier 0", || async {
        let tp = fake.object("weir.dev/v1alpha1", "TrafficPolicy", "default", "web")?;
        (tp["status"]["activeTier"] == 0
            && condition(&fake, "web", "Accepted")?["status"] == "True")
            .then_some(())
    })
    .await;

    // Tier 0's endpoints go not-ready: traffic fails over to tier 1.
    fake.apply(&slice(
        "web",
        PORT,
        &[("127.0.3.11", false), ("127.0.3.12", false)],
    ))
    .expect("apply");
    let (activated, _) = wait_for("FailoverActivated event", || async {
        let got = events(&fake, "web", "FailoverActivated");
        (!got.0.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(activated[0]["type"], "Warning");
    let note = activated[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("serving tier 1"), "{note}");
    assert_eq!(activated[0]["regarding"]["kind"], "TrafficPolicy");
    assert_eq!(activated[0]["metadata"]["namespace"], "default");

    fake.apply(&slice(
        "web",
        PORT,
        &[("127.0.3.11", true), ("127.0.3.12", true)],
    ))
    .expect("apply");
    wait_for("FailoverRecovered event", || async {
        (!events(&fake, "web", "FailoverRecovered").0.is_empty()).then_some(())
    })
    .await;
    // Only the transition was reported, not every status write while failed over.
    assert_eq!(events(&fake, "web", "FailoverActivated").1, 1);

    fake.apply(&policy(
        "bad",
        &["bad.test"],
        &[("web", 80, 1, 0)],
        "  loadBalancer: {algorithm: Bogus}\n",
    ))
    .expect("apply");
    let (rejected, _) = wait_for("Rejected event", || async {
        let got = events(&fake, "bad", "Rejected");
        (!got.0.is_empty()).then_some(got)
    })
    .await;
    let note = rejected[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("Bogus"), "{note}");
    assert!(events(&fake, "web", "Rejected").0.is_empty(), "web is fine");
}

/// Writes a Kubernetes-style Secret volume into `dir`: the files are symlinks through
/// `..data`, which points at a timestamped folder; a rotation writes a new folder and
/// swaps `..data` atomically (rename over the old link), as the kubelet does.
fn write_secret_volume(
    dir: &std::path::Path,
    generation: u32,
    cert: &CertFiles,
    ca: &std::path::Path,
) {
    let data = dir.join(format!("..gen{generation}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::copy(&cert.cert, data.join("tls.crt")).expect("copy");
    std::fs::copy(&cert.key, data.join("tls.key")).expect("copy");
    std::fs::copy(ca, data.join("ca.crt")).expect("copy");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..gen{generation}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).expect("symlink");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_server_certificate_is_used_without_restart_or_dropping_streams() {
    let (_fake, dir) = cluster().await;
    let old_ca = TestCa::new(dir.path(), "old").expect("CA");
    let new_ca = TestCa::new(dir.path(), "new").expect("CA");
    let old_server = old_ca.issue("server-old", &["localhost"]).expect("cert");
    let new_server = new_ca.issue("server-new", &["localhost"]).expect("cert");
    let client = old_ca.issue("agent", &["test-node"]).expect("cert");
    // The client CA stays the old one: agents keep their certificates.
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).expect("mkdir");
    write_secret_volume(&secret, 1, &old_server, &old_ca.ca);
    let path = |f: &str| secret.join(f).display().to_string();
    let (cert, key, ca) = (path("tls.crt"), path("tls.key"), path("ca.crt"));
    let controller = Controller::start_kube(
        &dir.path().join("kubeconfig"),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--tls-reload-interval",
            "200ms",
        ],
    )
    .await
    .expect("controller");
    let url = format!("https://localhost:{}", controller.grpc.port());
    let start_agent = |node: &'static str, trust: &std::path::Path| {
        let (trust, cert, key) = (
            trust.display().to_string(),
            client.cert.display().to_string(),
            client.key.display().to_string(),
        );
        let url = url.clone();
        async move {
            let listen =
                std::net::SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
            let admin =
                std::net::SocketAddr::from(([127, 0, 0, 1], weir_tests::free_port("127.0.0.1")));
            Agent::start_with(
                &url,
                listen,
                admin,
                None,
                &[
                    "--node-name",
                    node,
                    "--tls-ca",
                    &trust,
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                ],
            )
            .await
            .expect("agent")
        }
    };
    let old_agent = start_agent("old-trust", &old_ca.ca).await;
    old_agent.wait_ready().await;

    // Before the rotation an agent trusting only the new CA is refused.
    assert!(
        first_update_over_tls(&controller, &new_ca.ca, Some(&client))
            .await
            .is_err(),
        "the new CA's certificate is not served yet"
    );

    write_secret_volume(&secret, 2, &new_server, &old_ca.ca);
    let new_agent = start_agent("new-trust", &new_ca.ca).await;
    // Succeeds only once the controller presents the new certificate: without a reload
    // this agent would be refused forever.
    new_agent.wait_ready().await;

    // The stream opened with the old certificate was not dropped: the old agent could not
    // reconnect now (it trusts only the old CA), yet it is still connected.
    let state = controller.state().await.expect("state");
    let mut nodes: Vec<String> = state["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["nodeName"].as_str().map(str::to_string))
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["new-trust", "old-trust"], "{state}");
    let old_config = old_agent.config().await.expect("config");
    assert!(
        old_config["control"]["connectedTo"].is_string(),
        "{}",
        old_config["control"]
    );
}
