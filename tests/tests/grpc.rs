//! HTTP/2 and gRPC end to end: real tonic servers behind a real agent (h2c upstreams chosen by
//! the Service port's `appProtocol`), real tonic clients on one HTTP/2 connection each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use tokio_stream::StreamExt;
use weir_tests::grpc::{self, FAILURE_DETAILS, Options, pb};
use weir_tests::manifests::{docs, service_h2c, slice};
use weir_tests::{Agent, Controller, listening_processes, wait_for, write_manifest};

const HOST: &str = "echo.test";

/// Service `echo` (h2c) over `endpoints` (same port) and a policy with `spec` lines.
fn setup(dir: &Path, ips: &[String], port: u16, spec: &str) {
    let eps: Vec<(&str, bool)> = ips.iter().map(|i| (i.as_str(), true)).collect();
    write_manifest(
        dir,
        "echo.yaml",
        &docs(&[service_h2c("echo", 80), slice("echo", port, &eps)]),
    );
    write_manifest(
        dir,
        "policy.yaml",
        &format!(
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: echo, namespace: default}}\nspec:\n  hosts: [\"{HOST}\"]\n  rules:\n    - backendRefs: [{{name: echo, port: 80}}]\n{spec}"
        ),
    );
}

/// Echo servers on `ips`, all on one port.
async fn servers(ips: &[&str], opts: Options) -> Vec<grpc::EchoHandle> {
    'port: for _ in 0..20 {
        let port = weir_tests::free_port(ips[0]);
        let mut out = Vec::new();
        for ip in ips {
            let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
            match grpc::start(addr, ip, opts.clone()).await {
                Ok(s) => out.push(s),
                Err(_) => continue 'port,
            }
        }
        return out;
    }
    panic!("no common free port");
}

fn ips_of(servers: &[grpc::EchoHandle]) -> Vec<String> {
    servers.iter().map(|s| s.addr.ip().to_string()).collect()
}

async fn start(dir: &Path) -> (Controller, Agent) {
    let controller = Controller::start(dir).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;
    (controller, agent)
}

/// Echo servers on `ips`, a local-mode controller routing host `echo` to them with the
/// default policy, and an agent, ready.
async fn echo_agent(
    ips: &[&str],
    opts: Options,
) -> (tempfile::TempDir, Vec<grpc::EchoHandle>, Controller, Agent) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = servers(ips, opts).await;
    setup(dir.path(), &ips_of(&s), s[0].addr.port(), "");
    let (controller, agent) = start(dir.path()).await;
    (dir, s, controller, agent)
}

fn req(payload: &[u8]) -> pb::EchoRequest {
    pb::EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_one_connection_spread_over_every_endpoint() {
    let (_dir, _s, _c, agent) = echo_agent(
        &["127.0.20.11", "127.0.20.12", "127.0.20.13"],
        Options::default(),
    )
    .await;
    let mut client = grpc::client(agent.listen, HOST).await.expect("client");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        let reply = client.unary(req(b"hi")).await.expect("call").into_inner();
        *counts.entry(reply.server).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (server, n) in &counts {
        assert!(
            (80..=120).contains(n),
            "{server} got {n} of 300: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_streams_ping_pong_details_and_deadlines_pass_through() {
    let (_dir, _s, _c, agent) = echo_agent(&["127.0.21.11"], Options::default()).await;
    let mut client = grpc::client(agent.listen, HOST).await.expect("client");

    // 3 MiB both ways.
    let big = vec![7u8; 3 * 1024 * 1024];
    let reply = client
        .unary(req(&big))
        .await
        .expect("big call")
        .into_inner();
    assert_eq!(reply.payload.len(), big.len());
    assert!(reply.payload == big);

    // Server streaming of 2,000 messages, in order.
    let mut stream = client
        .server_stream(pb::StreamRequest { count: 2000 })
        .await
        .expect("stream")
        .into_inner();
    let mut n = 0u32;
    while let Some(m) = stream.next().await {
        let m = m.expect("message");
        assert_eq!(m.payload, n.to_be_bytes().to_vec());
        n += 1;
    }
    assert_eq!(n, 2000);

    // Full duplex: each message is sent only after the echo of the previous one arrived.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::EchoRequest>(1);
    tx.send(req(&0u32.to_be_bytes())).await.expect("first");
    let mut echoes = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..100u32 {
        let echo = echoes.next().await.expect("echo").expect("ok");
        assert_eq!(echo.payload, i.to_be_bytes().to_vec());
        if i < 99 {
            tx.send(req(&(i + 1).to_be_bytes())).await.expect("next");
        }
    }
    drop(tx);
    assert!(echoes.next().await.is_none());

    // A status with details reaches the client unchanged (trailers pass through).
    let err = client
        .unary(pb::EchoRequest {
            fail: true,
            ..Default::default()
        })
        .await
        .expect_err("failure");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "asked to fail");
    assert_eq!(err.details(), FAILURE_DETAILS);

    // Calls are counted by their final gRPC status.
    let metrics = weir_tests::request(
        &weir_tests::http_client(),
        "GET",
        &format!("http://{}/metrics", agent.admin),
        None,
    )
    .await
    .expect("metrics")
    .body;
    for status in ["0", "9"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("weir_agent_grpc_calls_total")
                    && l.contains(&format!("grpc_status=\"{status}\""))),
            "no grpc_status {status} in metrics"
        );
    }

    // A 300 ms deadline on a 2 s call: the agent enforces `grpc-timeout` itself and answers
    // DEADLINE_EXCEEDED. Sent with a plain HTTP/2 client, because tonic's client would also
    // start a timer of its own for the header and race the agent.
    let (status, grpc_status) = raw_call_with_deadline(agent.listen, "300m", 2000).await;
    assert_eq!(status, 200);
    assert_eq!(grpc_status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
}

/// POSTs one Unary call over h2c with `grpc-timeout`; returns the HTTP status and the
/// `grpc-status` of the (Trailers-Only) answer.
async fn raw_call_with_deadline(
    agent: SocketAddr,
    timeout: &str,
    delay_ms: u32,
) -> (u16, Option<String>) {
    use prost::Message;
    let msg = pb::EchoRequest {
        delay_ms,
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let tcp = tokio::net::TcpStream::connect(agent)
        .await
        .expect("connect");
    let (h2, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.expect("ready");
    let req = http::Request::post(format!("http://{HOST}/weir.test.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .expect("request");
    let (resp, mut send) = h2.send_request(req, false).expect("send");
    send.send_data(bytes::Bytes::from(framed), true)
        .expect("data");
    let resp = resp.await.expect("response");
    let status = resp.status().as_u16();
    let head = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_string());
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.expect("chunk");
    }
    let trailer = body.trailers().await.ok().flatten().and_then(|t| {
        t.get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_string())
    });
    (status, head.or(trailer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_the_agent_answers_itself_are_grpc_shaped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = servers(&["127.0.22.11"], Options::default()).await;
    setup(dir.path(), &ips_of(&s), s[0].addr.port(), "");
    write_manifest(
        dir.path(),
        "empty.yaml",
        &docs(&[
            service_h2c("empty", 80),
            slice("empty", 80, &[]),
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: empty, namespace: default}\nspec:\n  hosts: [\"empty.test\"]\n  rules:\n    - backendRefs: [{name: empty, port: 80}]\n".to_string(),
        ]),
    );
    let (_c, agent) = start(dir.path()).await;

    let mut nowhere = grpc::client(agent.listen, "nowhere.test")
        .await
        .expect("client");
    let err = nowhere.unary(req(b"x")).await.expect_err("no route");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("no route"), "{err:?}");

    let mut empty = grpc::client(agent.listen, "empty.test")
        .await
        .expect("client");
    let err = empty.unary(req(b"x")).await.expect_err("no endpoint");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no healthy endpoint"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_between_calls_fails_no_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ips = ["127.0.23.11", "127.0.23.12", "127.0.23.13"];
    let (mut procs, port) = listening_processes("weir-echo-grpc", &ips);
    setup(
        dir.path(),
        &ips.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        port,
        "  retry: {attempts: 2, on: [connect-failure, reset, unavailable]}\n  outlierDetection: {consecutiveErrors: 1, baseEjectionTime: 30s}\n",
    );
    let (_c, agent) = start(dir.path()).await;
    let mut client = grpc::client(agent.listen, HOST).await.expect("client");
    for i in 0..300 {
        if i == 100 {
            procs[1].kill();
        }
        client
            .unary(req(b"x"))
            .await
            .unwrap_or_else(|e| panic!("call {i} failed: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_shutting_down_gracefully_fails_no_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = servers(&["127.0.24.11", "127.0.24.12"], Options::default()).await;
    setup(
        dir.path(),
        &ips_of(&s),
        s[0].addr.port(),
        "  retry: {attempts: 2, on: [connect-failure, reset, unavailable]}\n",
    );
    let (_c, agent) = start(dir.path()).await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let listen = agent.listen;
        calls.push(tokio::spawn(async move {
            let mut client = grpc::client(listen, HOST).await.expect("client");
            let mut failures = Vec::new();
            for i in 0..150 {
                if let Err(e) = client
                    .unary(pb::EchoRequest {
                        delay_ms: if i % 10 == 0 { 20 } else { 0 },
                        ..Default::default()
                    })
                    .await
                {
                    failures.push(format!("{e:?}"));
                }
            }
            failures
        }));
    }
    wait_for("calls under way", || async {
        (s[1].calls() > 50).then_some(())
    })
    .await;
    let mut leaving = s.remove(1);
    leaving.shutdown();
    let mut failures = Vec::new();
    for c in calls {
        failures.extend(c.await.expect("caller"));
    }
    leaving.stopped().await;
    assert!(
        failures.is_empty(),
        "{} failed calls: {:?}",
        failures.len(),
        failures.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_an_endpoints_stream_limit_go_to_another_connection() {
    let (_dir, s, _c, agent) = echo_agent(
        &["127.0.25.11"],
        Options {
            max_concurrent_streams: Some(10),
        },
    )
    .await;
    let client = grpc::client(agent.listen, HOST).await.expect("client");
    // One call first, so the agent's connection has the endpoint's SETTINGS (limit 10)
    // before the burst; a cold burst is covered by the assertion on all 100 succeeding.
    client
        .clone()
        .unary(req(b"warm"))
        .await
        .expect("first call");
    let mut calls = Vec::new();
    for _ in 0..100 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .unary(pb::EchoRequest {
                    delay_ms: 300,
                    ..Default::default()
                })
                .await
        }));
    }
    for c in calls {
        c.await.expect("task").expect("call");
    }
    assert_eq!(s[0].calls(), 101);
    // With one connection the endpoint could never see more than 10 calls at once.
    assert!(
        s[0].connections() >= 2,
        "the agent opened {} connection(s) to an endpoint allowing 10 streams",
        s[0].connections()
    );
    assert!(
        s[0].peak_in_flight() > 10,
        "the endpoint saw at most {} calls at once",
        s[0].peak_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_is_cut_off_without_hurting_other_clients() {
    let (_dir, s, _c, agent) = echo_agent(&["127.0.26.11"], Options::default()).await;

    // The attacker: raw HTTP/2, 5,000 streams each opened and reset at once.
    let flood = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(agent.listen)
            .await
            .expect("connect");
        let Ok((mut h2, conn)) = h2::client::handshake(tcp).await else {
            return 0;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut opened = 0;
        for _ in 0..5000 {
            let req = http::Request::post(format!("http://{HOST}/weir.test.v1.Echo/Unary"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
            let Ok(ready) = h2.ready().await else { break };
            h2 = ready;
            let Ok((_resp, mut stream)) = h2.send_request(req, false) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        opened
    });

    // Meanwhile another client is served as usual.
    let mut client = grpc::client(agent.listen, HOST).await.expect("client");
    for _ in 0..50 {
        client.unary(req(b"x")).await.expect("honest call");
    }
    let opened = flood.await.expect("flood");
    assert!(opened > 0);
    let reached = s[0].calls() - 50;
    assert!(
        reached < 500,
        "{reached} of {opened} cancelled streams reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_take_a_not_serving_endpoint_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = servers(&["127.0.27.11", "127.0.27.12"], Options::default()).await;
    setup(
        dir.path(),
        &ips_of(&s),
        s[0].addr.port(),
        "  healthCheck: {grpc: {service: \"\"}, interval: 100ms, timeout: 1s, healthyThreshold: 1, unhealthyThreshold: 1}\n",
    );
    let (_c, agent) = start(dir.path()).await;
    s[1].health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let sick = s[1].addr.to_string();
    wait_for("gRPC health verdict", || async {
        let cfg = agent.config().await.ok()?;
        let ep = cfg["routes"][0]["rules"][0]["backends"][0]["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["address"] == sick.as_str())?
            .clone();
        (ep["healthy"] == false && ep["why"].as_str()?.contains("NOT_SERVING")).then_some(())
    })
    .await;
    let mut client = grpc::client(agent.listen, HOST).await.expect("client");
    let before = s[1].calls();
    for _ in 0..30 {
        client.unary(req(b"x")).await.expect("call");
    }
    assert_eq!(s[1].calls(), before, "a NOT_SERVING endpoint gets no calls");
}

/// One raw HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends the client preface and an empty SETTINGS frame on a raw connection to the agent.
async fn raw_h2(agent: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(agent)
        .await
        .expect("connect");
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    tcp.write_all(&frame(0x4, 0, 0, &[]))
        .await
        .expect("settings");
    tcp
}

/// Writes `frames` until the agent closes the connection; reads (and drops) what the agent
/// sends meanwhile. Returns whether the agent ended the connection (GOAWAY or close) and
/// how many frames had been written by then.
async fn flood(tcp: tokio::net::TcpStream, frames: impl Iterator<Item = Vec<u8>>) -> (bool, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tcp.into_split();
    let reader = tokio::spawn(async move {
        // Frame-by-frame: ends at a GOAWAY (type 7) or when the agent closes.
        let mut head = [0u8; 9];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                return true;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return true;
            }
            if head[3] == 0x7 {
                return true;
            }
        }
    });
    let mut written = 0;
    for f in frames {
        if reader.is_finished() || wr.write_all(&f).await.is_err() {
            break;
        }
        written += 1;
    }
    // Whatever happened to the writes, the verdict is whether the agent ended it; a flood
    // that went through entirely leaves the connection open and the reader waiting.
    let _ = wr.shutdown().await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
        .await
        .map(|r| r.unwrap_or(false))
        .unwrap_or(false);
    (ended, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_settings_and_ping_floods_do_not_hurt_other_clients() {
    let (_dir, s, _c, agent) = echo_agent(&["127.0.28.11"], Options::default()).await;
    let mut honest = grpc::client(agent.listen, HOST).await.expect("client");
    honest.unary(req(b"before")).await.expect("honest call");

    // CONTINUATION flood (CVE-2024-27316 class): a header block that never ends. The agent
    // must give up on it (its header lists are capped at 64 KiB) and end the connection,
    // not buffer it forever.
    let tcp = raw_h2(agent.listen).await;
    // HPACK: `:method: POST` (indexed 3), then literal `x-pad: <1000 × a>` fields.
    let mut pad = vec![0x00, 5];
    pad.extend_from_slice(b"x-pad");
    pad.extend_from_slice(&[0x7f, 0xe9, 0x06]); // length 1000: 127 + 105 + 6 × 128
    pad.extend(std::iter::repeat_n(b'a', 1000));
    let headers = std::iter::once(frame(0x1, 0, 1, &[0x83]));
    let continuations = std::iter::repeat_with(|| frame(0x9, 0, 1, &pad)).take(20_000);
    let (ended, written) = flood(tcp, headers.chain(continuations)).await;
    assert!(
        ended && written < 20_000,
        "an endless header block was accepted ({written} frames written, ended: {ended})"
    );
    honest
        .unary(req(b"after continuation"))
        .await
        .expect("honest call");

    // SETTINGS flood (CVE-2019-9515) and PING flood (CVE-2019-9512) from a client that
    // never reads the ACKs: each frame asks the agent to queue an answer. 1M frames (17 MB)
    // are more than the loopback socket buffers hold, so if every one is accepted the agent
    // queued the answers without bound; a bounded agent stops reading (backpressure) or
    // closes the connection. The 5 s only decides when a stalled writer stops waiting.
    for (name, f) in [
        ("SETTINGS", frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])),
        ("PING", frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8])),
    ] {
        use tokio::io::AsyncWriteExt;
        let mut tcp = raw_h2(agent.listen).await;
        const FRAMES: usize = 1_000_000;
        let batch: Vec<u8> = std::iter::repeat_n(f, 1000).flatten().collect();
        let mut written = 0;
        while written < FRAMES {
            match tokio::time::timeout(std::time::Duration::from_secs(5), tcp.write_all(&batch))
                .await
            {
                Ok(Ok(())) => written += 1000,
                _ => break,
            }
        }
        assert!(
            written < FRAMES,
            "the agent accepted all {FRAMES} {name} frames from a client that reads nothing"
        );
        drop(tcp);
        honest
            .unary(req(name.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("honest call after a {name} flood: {e}"));
    }
    // The agent is still well: the admin endpoint answers and the origin saw only the
    // honest calls.
    assert_eq!(s[0].calls(), 4);
    let got = weir_tests::request(
        &weir_tests::http_client(),
        "GET",
        &format!("http://{}/healthz", agent.admin),
        None,
    )
    .await
    .expect("healthz");
    assert_eq!(got.status, 200);
}
