//! Kubernetes mode end to end **against a fake API server**: the real `weir-controller`
//! binary (no `--config-dir`, `KUBECONFIG` pointing at [`FakeApiServer`] on 127.0.0.1) with
//! the real kube-rs client, and a real `weir-agent` following it over gRPC. The fake speaks
//! the HTTP API (list/watch with resourceVersions, bookmarks, `410 Gone`, status patches), not
//! Kubernetes semantics: these tests show that weir drives the API correctly, not that a real
//! cluster behaves like the fake. Every wait polls the agent's `/config` or the fake's
//! recorded state; nothing sleeps. The last tests cover the mTLS agent stream that
//! Kubernetes mode requires (with a tonic client standing in for the agent).

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

fn ep(ip: &str) -> String {
    format!("{ip}:{PORT}")
}

fn routed(config: &serde_json::Value, ip: &str) -> bool {
    endpoint_weight(config, "default/web", &ep(ip)).is_some_and(|w| w > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gets_routes_listed_from_the_api_server() {
    let (fake, dir) = cluster().await;
    let controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    let config = agent
        .wait_config(0, |c| routed(c, "127.0.3.11") && routed(c, "127.0.3.12"))
        .await;
    assert_eq!(config["routes"].as_array().map(Vec::len), Some(1));
    assert!(fake.lists() >= 3, "every reflector listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_turning_unready_in_an_endpointslice_reaches_the_agent() {
    let (fake, dir) = cluster().await;
    let controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
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
    let (fake, dir) = cluster().await;
    let controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
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
    let (fake, dir) = cluster().await;
    let controller = Controller::start_kube(&dir.path().join("kubeconfig"), &[])
        .await
        .expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_status_and_another_replica_takes_over_when_it_dies() {
    let (fake, dir) = cluster().await;
    let kc_a = dir.path().join("kubeconfig");
    let kc_b = dir.path().join("kubeconfig-b");
    fake.write_kubeconfig(&kc_b, "controller-b")
        .expect("kubeconfig");
    // A short lease keeps the takeover quick; nothing below depends on its timing.
    let mut a = Controller::start_kube(&kc_a, &["--identity", "a", "--lease-duration", "4s"])
        .await
        .expect("controller a");
    wait_for("a leads and writes status", || async {
        (lease_holder(&fake).as_deref() == Some("a")
            && condition(&fake, "web", "Accepted").is_some())
        .then_some(())
    })
    .await;
    let _b = Controller::start_kube(&kc_b, &["--identity", "b", "--lease-duration", "4s"])
        .await
        .expect("controller b");

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
