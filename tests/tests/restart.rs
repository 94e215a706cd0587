//! Zero-downtime agent restart end to end: a new agent takes the running one's listening
//! sockets over the hand-off socket while keep-alive HTTP/1.1 and h2c load runs, and not one
//! request fails; a new agent that dies before it is ready leaves the old one serving (and
//! a later one can still take over); and an h2c connection with a slow request in flight
//! when SIGTERM comes gets its answer, then GOAWAY. Real controller, agents, origin and
//! sockets; every wait polls a signal (a log line, the admin API, the process status).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use weir_tests::backend::Mode;
use weir_tests::{Agent, free_local_addr, origin_and_controller, wait_for};

/// What the load generators saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests sent again on a new connection because the old one was closed before it
    /// took them (see [`h1_client`], [`h2_client`]); each also counts once in `ok` or
    /// `failed` when its final attempt ends.
    retried: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 20 {
            errors.push(why);
        }
    }
}

type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect_h1(addr: SocketAddr) -> anyhow::Result<H1Sender> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A keep-alive HTTP/1.1 client sending GETs back to back until `stop`.
///
/// What it does when the agent closes its connection, as browsers, curl and hyper-util's
/// pooled client do (RFC 9112 §9.3.1, RFC 9110 §9.2.2): a connection found closed before a
/// request is written is replaced by a new one (the request was never sent); a GET that
/// fails on a *reused* connection before any byte of the answer came (the server closed the
/// idle connection while the request was on its way) is sent once more on a new connection.
/// Anything else — a refused connect, a failure on a fresh connection, a second failure, a
/// status other than 200, a broken body — is a failed request.
async fn h1_client(addr: SocketAddr, host: &'static str, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let mut pooled: Option<H1Sender> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut retried = false;
        loop {
            let mut alive = None;
            if let Some(mut s) = pooled.take()
                && s.ready().await.is_ok()
            {
                alive = Some(s);
            }
            let (mut sender, reused) = match alive {
                Some(s) => (s, true),
                None => match connect_h1(addr).await {
                    Ok(s) => (s, false),
                    Err(e) => {
                        t.fail(format!("h1 connect: {e}"));
                        break;
                    }
                },
            };
            let req = http::Request::get("/")
                .header(http::header::HOST, host)
                .body(Empty::new())
                .expect("request");
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.into_body().collect().await {
                        Ok(_) if status == 200 => {
                            t.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => t.fail(format!("h1 status {status}")),
                        Err(e) => t.fail(format!("h1 body: {e}")),
                    }
                    pooled = Some(sender);
                    break;
                }
                Err(e) if reused && !retried && closed_under_it(&e) => {
                    t.retried.fetch_add(1, Ordering::Relaxed);
                    retried = true;
                }
                Err(e) => {
                    t.fail(format!("h1 request (reused: {reused}): {e:?}"));
                    break;
                }
            }
        }
    }
}

/// The connection closed before any answer came: the server closed it as the request went
/// out (an EOF, a reset, or a write into a closed socket).
fn closed_under_it(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    e.is_incomplete_message()
        || e.is_canceled()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), ConnectionReset | BrokenPipe))
}

async fn connect_h2(addr: SocketAddr) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A request the server did not process, by its own word (RFC 9113 §8.7): refused, or above
/// the last stream its GOAWAY names. Safe to send again on a new connection.
fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
}

/// An h2c client sending GETs back to back on one connection until `stop`. When the agent
/// says GOAWAY, requests it did not process are sent again on a new connection, as RFC 9113
/// §8.7 allows (and gRPC and browsers do); any other error is a failed request.
async fn h2_client(addr: SocketAddr, host: &'static str, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let mut pooled: Option<h2::client::SendRequest<Bytes>> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let sender = match pooled.take() {
                Some(s) => s,
                None => match connect_h2(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        t.fail(format!("h2 connect: {e}"));
                        break;
                    }
                },
            };
            // Closed or going away: nothing was sent yet, a new connection takes it.
            let Ok(mut sender) = sender.ready().await else {
                continue;
            };
            let req = http::Request::get(format!("http://{host}/"))
                .body(())
                .expect("request");
            let answer = match sender.send_request(req, true) {
                Ok((resp, _)) => resp.await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(resp) => {
                    let status = resp.status();
                    let mut body = resp.into_body();
                    let mut broken = None;
                    while let Some(chunk) = body.data().await {
                        match chunk {
                            Ok(c) => {
                                let _ = body.flow_control().release_capacity(c.len());
                            }
                            Err(e) => broken = Some(e),
                        }
                    }
                    match broken {
                        None if status == 200 => {
                            t.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        None => t.fail(format!("h2 status {status}")),
                        Some(e) => t.fail(format!("h2 body: {e}")),
                    }
                    pooled = Some(sender);
                    break;
                }
                Err(e) if unprocessed(&e) && attempts < 3 => {
                    t.retried.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    t.fail(format!("h2 request: {e:?}"));
                    break;
                }
            }
        }
    }
}

/// Runs `h1` HTTP/1.1 and `h2` h2c clients against `addr` until `stop` is set.
fn start_load(
    addr: SocketAddr,
    host: &'static str,
    h1: usize,
    h2: usize,
) -> (
    Arc<AtomicBool>,
    Arc<Tally>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for _ in 0..h1 {
        tasks.push(tokio::spawn(h1_client(
            addr,
            host,
            stop.clone(),
            tally.clone(),
        )));
    }
    for _ in 0..h2 {
        tasks.push(tokio::spawn(h2_client(
            addr,
            host,
            stop.clone(),
            tally.clone(),
        )));
    }
    (stop, tally, tasks)
}

/// Waits until `tally` has counted `more` successful requests beyond what it has now.
async fn served_more(tally: &Tally, more: u64) {
    let target = tally.ok.load(Ordering::Relaxed) + more;
    wait_for("more requests served", || async {
        (tally.ok.load(Ordering::Relaxed) >= target).then_some(())
    })
    .await;
}

async fn wait_exit(agent: &mut Agent) -> std::process::ExitStatus {
    wait_for("agent exit", || {
        let s = agent.proc.exited();
        async move { s }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_takes_over_the_sockets_under_load_and_no_request_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("state dir");
    let (_origin, controller) =
        origin_and_controller(dir.path(), "127.0.46.11", "restart.test").await;
    let listen = free_local_addr();
    let admin = free_local_addr();
    // No --handoff-socket: the default, <state-dir>/handoff.sock.
    let (mut a, a_log) = Agent::start_logged(
        "A",
        &controller.url(),
        listen,
        admin,
        Some(state.path()),
        &[],
    )
    .await
    .expect("agent A");
    a.wait_ready().await;
    wait_for("A listens on the hand-off socket", || async {
        state.path().join("handoff.sock").exists().then_some(())
    })
    .await;

    let (stop, tally, tasks) = start_load(listen, "restart.test", 6, 2);
    served_more(&tally, 300).await;
    let by_a = a.requests_served().await.expect("A's metrics");
    assert!(by_a > 0, "A served before the restart");

    // B: same addresses, same state dir (so the same hand-off socket).
    let (mut b, b_log) = Agent::start_logged(
        "B",
        &controller.url(),
        listen,
        admin,
        Some(state.path()),
        &[],
    )
    .await
    .expect("agent B");
    b_log
        .wait_for_line("took over the listening sockets of the running agent")
        .await;
    let a_status = wait_exit(&mut a).await;
    assert!(a_status.success(), "A's exit status: {a_status:?}");
    a_log
        .wait_for_line("handed over to the new agent; draining")
        .await;
    b_log
        .wait_for_line("ready: the old agent stops accepting")
        .await;

    // Only B is left: the load goes on against it.
    let before_b_alone = b.requests_served().await.expect("B's metrics");
    served_more(&tally, 300).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let by_b = b.requests_served().await.expect("B's metrics");
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let retried = tally.retried.load(Ordering::Relaxed);
    eprintln!(
        "restart under load: {ok} ok, {failed} failed, {retried} sent again on a new connection; A served {by_a}+ before B came, B {by_b}"
    );
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        tally.errors.lock().unwrap_or_else(|e| e.into_inner())
    );
    assert!(
        by_b >= before_b_alone + 300,
        "B served the load after A left: {by_b}"
    );
    assert!(ok >= 600);

    // B now offers its sockets in turn.
    assert!(b.proc.exited().is_none());
    b.proc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_dying_before_it_is_ready_leaves_the_old_one_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("state dir");
    let (_origin, controller) = origin_and_controller(dir.path(), "127.0.46.21", "stay.test").await;
    let listen = free_local_addr();
    let admin = free_local_addr();
    let socket = state.path().join("handoff.sock");
    let socket_arg = socket.display().to_string();
    let handoff = ["--handoff-socket", socket_arg.as_str()];
    // As in a Kubernetes pod, A stays (idle) after its drain until SIGTERM.
    let a_flags = [handoff[0], handoff[1], "--exit-after-handoff=false"];
    let (mut a, a_log) = Agent::start_logged("A", &controller.url(), listen, admin, None, &a_flags)
        .await
        .expect("agent A");
    a.wait_ready().await;
    wait_for("A listens on the hand-off socket", || async {
        socket.exists().then_some(())
    })
    .await;

    let (stop, tally, tasks) = start_load(listen, "stay.test", 2, 1);
    served_more(&tally, 50).await;

    // B takes the sockets but can never become ready: its controller does not answer and it
    // has no state dir. It accepts nothing meanwhile; A serves.
    let silent = format!("http://{}", free_local_addr());
    let (mut b, b_log) = Agent::start_logged("B", &silent, listen, admin, None, &handoff)
        .await
        .expect("agent B");
    b_log
        .wait_for_line("took over the listening sockets of the running agent")
        .await;
    served_more(&tally, 50).await;
    b.proc.kill();
    a_log
        .wait_for_line("the new agent went away before it was ready; still serving")
        .await;
    served_more(&tally, 50).await;
    assert!(a.proc.exited().is_none(), "A still runs");

    // C, with a controller that answers, can still take over from A.
    let (mut c, c_log) = Agent::start_logged("C", &controller.url(), listen, admin, None, &handoff)
        .await
        .expect("agent C");
    c_log
        .wait_for_line("took over the listening sockets of the running agent")
        .await;
    a_log
        .wait_for_line("drained; idle until SIGTERM (--exit-after-handoff=false)")
        .await;
    assert!(a.proc.exited().is_none(), "A waits for SIGTERM");
    a.proc.signal_term();
    let a_status = wait_exit(&mut a).await;
    assert!(a_status.success(), "A's exit status: {a_status:?}");
    served_more(&tally, 50).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "failed requests: {:?}",
        tally.errors.lock().unwrap_or_else(|e| e.into_inner())
    );
    assert!(c.requests_served().await.expect("C's metrics") >= 50);
    c.proc.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_h2c_request_in_flight_finish_then_says_goaway_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (group, controller) =
        origin_and_controller(dir.path(), "127.0.46.31", "h2drain.test").await;
    let backend = &group[0];
    let mut agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;
    backend.set_mode(Mode::Delay(1500));

    let tcp = TcpStream::connect(agent.listen).await.expect("connect");
    let (sender, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut sender = sender.ready().await.expect("ready");
    let req = http::Request::get("http://h2drain.test/slow")
        .body(())
        .expect("request");
    let (slow, _) = sender.send_request(req, true).expect("send");
    wait_for("the slow request at the origin", || async {
        (backend.hits() >= 1).then_some(())
    })
    .await;
    agent.proc.signal_term();

    let resp = slow.await.expect("the request in flight is answered");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8_lossy(&text).contains("hello from"),
        "{text:?}"
    );

    // The connection was told GOAWAY: a new stream is refused by the client library itself,
    // with the agent's (graceful) reason.
    let refused = match sender.ready().await {
        Err(e) => e,
        Ok(mut s) => {
            let req = http::Request::get("http://h2drain.test/after")
                .body(())
                .expect("request");
            match s.send_request(req, true) {
                Err(e) => e,
                Ok((resp, _)) => resp.await.expect_err("a stream after GOAWAY"),
            }
        }
    };
    assert!(
        refused.is_go_away() && refused.is_remote(),
        "not a GOAWAY from the agent: {refused:?}"
    );
    assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR));
    // And the agent closed the connection cleanly once the stream was done.
    let closed = conn.await.expect("connection task");
    assert!(closed.is_ok(), "connection ended with {closed:?}");

    let status = wait_exit(&mut agent).await;
    assert!(status.success(), "agent exit status {status:?}");
    assert_eq!(
        backend.hits(),
        1,
        "the request after GOAWAY never reached the origin"
    );
}
