//! Agent lifecycle end to end: a SIGTERM drains (requests in flight finish, new connections
//! are refused, `/readyz` turns not-ready, exit 0), and malformed request framing is answered
//! 4xx with the connection closed, never reaching an origin. Every wait polls a signal (the
//! backend's hit counter, the admin API, the process status), never a sleep.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::backend::{Backend, Mode};
use weir_tests::{Agent, Controller, get, http_client, origin_and_controller, request, wait_for};

/// One backend behind `host`, through a controller and an agent.
async fn setup(dir: &Path, ip: &str, host: &str) -> (Vec<Backend>, Controller, Agent) {
    let (group, controller) = origin_and_controller(dir, ip, host).await;
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;
    (group, controller, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (group, _controller, mut agent) = setup(dir.path(), "127.0.9.11", "slow.test").await;
    let backend = &group[0];
    backend.set_mode(Mode::Delay(2000));

    let client = http_client();
    let listen = agent.listen;
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { get(&client, listen, "slow.test", "/").await })
        })
        .collect();
    // All 16 have reached the origin (and are waiting on it) before the signal.
    wait_for("16 requests at the origin", || async {
        (backend.hits() >= 16).then_some(())
    })
    .await;
    agent.proc.signal_term();

    // Draining: not ready, and no new connection is accepted.
    let readyz = format!("http://{}/readyz", agent.admin);
    let admin = http_client();
    wait_for("/readyz not ready while draining", || async {
        let got = request(&admin, "GET", &readyz, None).await.ok()?;
        (got.status == 503 && got.body.contains("draining")).then_some(())
    })
    .await;
    wait_for("listener closed", || async {
        TcpStream::connect(listen).await.is_err().then_some(())
    })
    .await;

    let mut statuses = Vec::new();
    for r in requests {
        let got = r.await.expect("request task");
        statuses.push(got.map(|g| g.status).unwrap_or(0));
    }
    assert_eq!(statuses, vec![200; 16], "every request in flight completes");
    let status = wait_for("agent exit", || {
        let s = agent.proc.exited();
        async move { s }
    })
    .await;
    assert!(status.success(), "agent exit status {status:?}");
    assert_eq!(backend.hits(), 16);
}

/// Sends `raw` on a fresh connection and reads until the agent closes it. Returns the
/// status line, or fails if the connection stays open.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    // The agent must close the connection: read to EOF (an open connection would hang here,
    // bounded so the test fails rather than hangs).
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    match read {
        Ok(Ok(_)) => {}
        // A reset after the answer is a close too.
        Ok(Err(e)) if !out.is_empty() => {
            let _ = e;
        }
        Ok(Err(e)) => panic!("read failed before any answer: {e}"),
        Err(_) => panic!("connection left open; got so far: {text:?}"),
    }
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framing_is_refused_and_never_forwarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (group, _controller, agent) = setup(dir.path(), "127.0.9.21", "frame.test").await;
    let backend = &group[0];
    // The route works: one well-framed request with a chunked body reaches the origin.
    let ok = raw_exchange(
        agent.listen,
        b"POST / HTTP/1.1\r\nHost: frame.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "valid request: {ok}");
    assert_eq!(backend.hits(), 1);

    let cases: &[(&str, &[u8])] = &[
        (
            "CL.TE",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        ),
        (
            "TE.CL",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        ),
        (
            "duplicate Content-Length",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "invalid Content-Length",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nContent-Length: 5x\r\n\r\nhello",
        ),
        (
            "gzip, chunked",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunked, gzip",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "two Transfer-Encoding lines",
            b"POST / HTTP/1.1\r\nHost: frame.test\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    let mut wrong = Vec::new();
    for (name, raw) in cases {
        let line = raw_exchange(agent.listen, raw).await;
        if !line.starts_with("HTTP/1.1 4") {
            wrong.push(format!("{name}: {line:?}"));
        }
    }
    assert!(wrong.is_empty(), "not refused with 4xx: {wrong:?}");
    assert_eq!(backend.hits(), 1, "a malformed request reached the origin");

    // A malformed chunk is only found once the head is on its way (the agent streams bodies):
    // the client's fault, answered 400 and its connection closed, not a 502 blamed on the
    // origin.
    let line = raw_exchange(
        agent.listen,
        b"POST / HTTP/1.1\r\nHost: frame.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(line.starts_with("HTTP/1.1 400"), "bad chunk size: {line:?}");
}
