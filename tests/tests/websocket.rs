//! WebSocket and HTTP Upgrade through the agent, end to end: real WebSocket echo origins
//! (tokio-tungstenite) behind a real controller (local mode) and agent. HTTP/1.1 upgrades and
//! h2 extended CONNECT (RFC 8441) are routed and balanced like any request, refused for
//! unknown hosts, passed through when the origin refuses, closed when idle, and cut when the
//! agent drains. Every wait polls a signal (origin counters, `/config`, `/metrics`, the
//! stream itself), never a sleep.

use bytes::{Buf, Bytes};
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{
    Agent, Controller, free_local_addr, http_client, request, wait_for, write_manifest,
};

/// Bound on a read that must end (a close the agent makes): the test fails instead of
/// hanging if it never comes. Not a timing assertion: the expected close comes far sooner.
const MUST_END: Duration = Duration::from_secs(30);

/// A WebSocket echo origin: answers the handshake with `x-origin: NAME` (or refuses it with
/// the status in `refuse`), then echoes every text and binary message.
struct WsOrigin {
    addr: SocketAddr,
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
    /// 0: accept; otherwise refuse the handshake with this status.
    refuse: Arc<AtomicU16>,
    /// The head of the last handshake request.
    last_request: Arc<Mutex<Option<HeaderMap>>>,
}

impl WsOrigin {
    async fn start(addr: SocketAddr, name: &'static str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let refuse = Arc::new(AtomicU16::new(0));
        let last_request = Arc::new(Mutex::new(None));
        let (c, r, l) = (connections.clone(), refuse.clone(), last_request.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, l) = (r.clone(), l.clone());
                tokio::spawn(async move {
                    let status = r.load(Ordering::SeqCst);
                    if status != 0 {
                        refuse_handshake(stream, status, name).await;
                        return;
                    }
                    // tungstenite's callback type fixes the error variant's size.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &WsRequest, mut resp: WsResponse| {
                        *l.lock().expect("lock") = Some(req.headers().clone());
                        resp.headers_mut()
                            .insert("x-origin", http::HeaderValue::from_static(name));
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() {
                            return;
                        }
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            connections,
            refuse,
            last_request,
        })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Answers a handshake with `status` and a short body (framed by `Content-Length`), then
/// closes: an origin that will not switch protocols.
async fn refuse_handshake(mut stream: TcpStream, status: u16, name: &str) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let body = format!("refused by {name}");
    let answer = format!(
        "HTTP/1.1 {status} Refused\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
}

/// Echo origins on `ips`, all on one port (an EndpointSlice has one port for all).
async fn start_origins(ips: &[&str]) -> Vec<WsOrigin> {
    let names: [&'static str; 4] = ["ws-a", "ws-b", "ws-c", "ws-d"];
    'again: for _ in 0..20 {
        let first = WsOrigin::start(format!("{}:0", ips[0]).parse().expect("addr"), names[0])
            .await
            .expect("origin");
        let port = first.addr.port();
        let mut group = vec![first];
        for (i, ip) in ips.iter().enumerate().skip(1) {
            match WsOrigin::start(format!("{ip}:{port}").parse().expect("addr"), names[i]).await {
                Ok(o) => group.push(o),
                Err(_) => continue 'again,
            }
        }
        return group;
    }
    panic!("no common free port for the origins");
}

/// Origins on `ips` behind `host`, a controller and an agent started with `agent_flags`.
async fn setup(
    dir: &Path,
    ips: &[&str],
    host: &str,
    agent_flags: &[&str],
) -> (Vec<WsOrigin>, Controller, Agent) {
    let origins = start_origins(ips).await;
    let endpoints: Vec<(&str, bool)> = ips.iter().map(|ip| (*ip, true)).collect();
    write_manifest(
        dir,
        "origins.yaml",
        &docs(&[
            service("echo", 80),
            slice("echo", origins[0].addr.port(), &endpoints),
        ]),
    );
    write_manifest(
        dir,
        "policy.yaml",
        &policy("echo", &[host], &[("echo", 80, 1, 0)], ""),
    );
    let controller = Controller::start(dir).await.expect("controller");
    let agent = Agent::start_with(
        &controller.url(),
        free_local_addr(),
        free_local_addr(),
        None,
        agent_flags,
    )
    .await
    .expect("agent");
    agent.wait_ready().await;
    (origins, controller, agent)
}

type Ws = WebSocketStream<TcpStream>;

/// A WebSocket client connection to `host` through the agent (HTTP/1.1 Upgrade).
async fn ws_connect(
    agent: &Agent,
    host: &str,
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), WsError> {
    let tcp = TcpStream::connect(agent.listen)
        .await
        .expect("connect to agent");
    tokio_tungstenite::client_async(format!("ws://{host}/chat"), tcp).await
}

/// Sends `text` and expects it back.
async fn echo<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.expect("send");
    let got = tokio::time::timeout(MUST_END, ws.next())
        .await
        .expect("echo in time")
        .expect("stream open")
        .expect("message");
    assert_eq!(got, Message::text(text));
}

/// Waits until the stream ends (close frame, EOF or error); panics if it stays open.
async fn expect_closed<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ended = tokio::time::timeout(MUST_END, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the agent left the tunnel open");
}

/// The value of an unlabelled or labelled sample in Prometheus text, e.g.
/// `weir_agent_upgrades_total{result="accepted"}`.
async fn metric(agent: &Agent, sample: &str) -> Option<f64> {
    let got = request(
        &http_client(),
        "GET",
        &format!("http://{}/metrics", agent.admin),
        None,
    )
    .await
    .ok()?;
    got.body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

/// Requests in flight on every endpoint of the agent's `/config`, by address.
async fn in_flight(agent: &Agent) -> Vec<(String, u64)> {
    let config = agent.config().await.expect("config");
    let mut out = Vec::new();
    for route in config["routes"].as_array().into_iter().flatten() {
        for rule in route["rules"].as_array().into_iter().flatten() {
            for b in rule["backends"].as_array().into_iter().flatten() {
                for e in b["endpoints"].as_array().into_iter().flatten() {
                    out.push((
                        e["address"].as_str().unwrap_or("?").to_string(),
                        e["inFlight"].as_u64().unwrap_or(0),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_client_exchanges_messages_with_the_origin_through_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origins, _c, agent) = setup(dir.path(), &["127.0.12.1"], "ws.test", &[]).await;
    let (mut ws, resp) = ws_connect(&agent, "ws.test").await.expect("handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["x-origin"], "ws-a");
    for i in 0..5 {
        echo(&mut ws, &format!("message {i}")).await;
    }
    // Binary frames and one larger than a TCP segment pass as they are.
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    let got = ws.next().await.expect("open").expect("message");
    assert_eq!(got.into_data().as_ref(), &big[..]);

    // The origin saw an upgrade, with the proxy's fields added.
    let seen = origins[0]
        .last_request
        .lock()
        .expect("lock")
        .clone()
        .expect("request");
    assert_eq!(seen["upgrade"], "websocket");
    assert!(
        seen["connection"]
            .to_str()
            .expect("ascii")
            .eq_ignore_ascii_case("upgrade")
    );
    assert_eq!(seen["via"], "1.1 weir");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");

    // Counted while open, and no longer once closed.
    assert_eq!(metric(&agent, "weir_agent_tunnels_open").await, Some(1.0));
    assert_eq!(
        metric(&agent, "weir_agent_upgrades_total{result=\"accepted\"}").await,
        Some(1.0)
    );
    ws.close(None).await.expect("close");
    expect_closed(&mut ws).await;
    // The origin closed its side; the tunnel ends when the client's side closes too.
    drop(ws);
    wait_for("tunnel gauge back to 0", || async {
        (metric(&agent, "weir_agent_tunnels_open").await == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_balanced_over_the_origins_and_count_in_flight_while_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ips = ["127.0.12.11", "127.0.12.12"];
    let (origins, _c, agent) = setup(dir.path(), &ips, "spread.test", &[]).await;
    let mut open = Vec::new();
    let mut served = [0usize; 2];
    for i in 0..20 {
        let (mut ws, resp) = ws_connect(&agent, "spread.test").await.expect("handshake");
        match resp.headers()["x-origin"].to_str().expect("ascii") {
            "ws-a" => served[0] += 1,
            "ws-b" => served[1] += 1,
            other => panic!("unknown origin {other}"),
        }
        echo(&mut ws, &format!("hello {i}")).await;
        open.push(ws);
    }
    assert!(
        served[0] >= 5 && served[1] >= 5,
        "20 WebSockets over two origins: {served:?}"
    );
    assert_eq!(origins[0].connections() + origins[1].connections(), 20);
    // Each open tunnel is a request in flight on its endpoint.
    let flights = in_flight(&agent).await;
    assert_eq!(
        flights.iter().map(|(_, n)| n).sum::<u64>(),
        20,
        "{flights:?}"
    );
    for (addr, n) in &flights {
        let ip = addr.split(':').next().unwrap_or("");
        let i = ips.iter().position(|x| *x == ip).expect("known endpoint");
        assert_eq!(*n as usize, served[i], "in flight on {addr}");
    }
    assert_eq!(metric(&agent, "weir_agent_tunnels_open").await, Some(20.0));
    for mut ws in open {
        ws.close(None).await.expect("close");
        expect_closed(&mut ws).await;
    }
    wait_for("in flight back to 0", || async {
        let f = in_flight(&agent).await;
        f.iter().all(|(_, n)| *n == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_an_unknown_host_is_404_and_connect_stays_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origins, _c, agent) = setup(dir.path(), &["127.0.12.21"], "known.test", &[]).await;
    match ws_connect(&agent, "unknown.test").await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::NOT_FOUND);
            assert_eq!(resp.headers()["x-weir-error"], "no-route");
        }
        other => panic!("expected 404, got {:?}", other.map(|(_, r)| r.status())),
    }
    // An absolute-form upgrade naming an unknown authority: never an open proxy.
    let mut s = TcpStream::connect(agent.listen).await.expect("connect");
    s.write_all(
        b"GET http://elsewhere.test/ HTTP/1.1\r\nHost: known.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let line = read_status_line(&mut s).await;
    assert!(
        line.starts_with("HTTP/1.1 404"),
        "absolute-form upgrade: {line}"
    );
    // Plain CONNECT is still refused, with or without an Upgrade.
    for raw in [
        &b"CONNECT known.test:80 HTTP/1.1\r\nHost: known.test:80\r\n\r\n"[..],
        &b"CONNECT known.test:80 HTTP/1.1\r\nHost: known.test:80\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
    ] {
        let mut s = TcpStream::connect(agent.listen).await.expect("connect");
        s.write_all(raw).await.expect("write");
        let line = read_status_line(&mut s).await;
        assert!(line.starts_with("HTTP/1.1 400"), "CONNECT: {line}");
    }
    assert_eq!(
        origins[0].connections(),
        0,
        "a refused request reached the origin"
    );
}

/// Reads an HTTP/1.1 answer's status line.
async fn read_status_line(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(MUST_END, async {
        while !buf.ends_with(b"\r\n") {
            if s.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            buf.push(byte[0]);
        }
    })
    .await
    .expect("an answer");
    String::from_utf8_lossy(&buf).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_refuses_the_upgrade_is_passed_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origins, _c, agent) = setup(dir.path(), &["127.0.12.31"], "picky.test", &[]).await;
    for status in [403u16, 200] {
        origins[0].refuse.store(status, Ordering::SeqCst);
        match ws_connect(&agent, "picky.test").await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), status);
                let body = resp.body().clone().unwrap_or_default();
                assert_eq!(String::from_utf8_lossy(&body), "refused by ws-a");
            }
            other => panic!(
                "expected {status}, got {:?}",
                other.map(|(_, r)| r.status())
            ),
        }
    }
    assert_eq!(
        metric(&agent, "weir_agent_upgrades_total{result=\"refused\"}").await,
        Some(2.0)
    );
    assert_eq!(metric(&agent, "weir_agent_tunnels_open").await, Some(0.0));
    // The same route still upgrades once the origin accepts.
    origins[0].refuse.store(0, Ordering::SeqCst);
    let (mut ws, _) = ws_connect(&agent, "picky.test").await.expect("handshake");
    echo(&mut ws, "accepted now").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_by_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--upgrade-idle-timeout", "1s"];
    let (_origins, _c, agent) = setup(dir.path(), &["127.0.12.41"], "idle.test", &flags).await;
    let (mut ws, _) = ws_connect(&agent, "idle.test").await.expect("handshake");
    echo(&mut ws, "still here").await;
    // Nothing more is sent: the agent closes the tunnel (the origin would keep it forever).
    expect_closed(&mut ws).await;
    wait_for("tunnel gauge back to 0", || async {
        (metric(&agent, "weir_agent_tunnels_open").await == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_upgrade_idle_timeout_is_refused_with_a_clear_message() {
    for (value, says) in [("0s", "at least 1s"), ("soon", "expected e.g.")] {
        let out = std::process::Command::new(weir_tests::bin_dir().join("weir-agent"))
            .args(["--upgrade-idle-timeout", value])
            .output()
            .expect("run weir-agent");
        assert!(!out.status.success(), "{value} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--upgrade-idle-timeout") && err.contains(says),
            "{value}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_cuts_open_tunnels_after_the_drain_timeout_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--drain-timeout", "1s"];
    let (_origins, _c, mut agent) = setup(dir.path(), &["127.0.12.51"], "drain.test", &flags).await;
    let (mut ws, _) = ws_connect(&agent, "drain.test").await.expect("handshake");
    echo(&mut ws, "before").await;
    agent.proc.signal_term();
    expect_closed(&mut ws).await;
    let status = wait_for("agent exit", || {
        let s = agent.proc.exited();
        async move { s }
    })
    .await;
    assert!(status.success(), "agent exit status {status:?}");
}

/// An h2 stream as a byte stream for tungstenite (the test's own adapter: DATA frames in
/// and out, windows released as data is read).
struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buf: Bytes,
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(std::io::Error::other)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(std::io::Error::other(e))),
            None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(
            self.send
                .send_data(Bytes::new(), true)
                .map_err(std::io::Error::other),
        )
    }
}

/// An h2c client connection to the agent, once the agent's SETTINGS have arrived.
async fn h2_client(agent: &Agent) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(agent.listen).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let send = send.ready().await.expect("h2 ready");
    // The agent's SETTINGS (with SETTINGS_ENABLE_CONNECT_PROTOCOL) arrive after the handshake.
    wait_for("the agent's SETTINGS", || {
        let ok = send.is_extended_connect_protocol_enabled();
        async move { ok.then_some(()) }
    })
    .await;
    send
}

/// An extended CONNECT for a WebSocket on `host`.
fn websocket_connect(host: &str) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{host}/chat"))
        .header("sec-websocket-version", "13")
        .body(())
        .expect("request");
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_extended_connect_carries_a_websocket_to_an_http1_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origins, _c, agent) = setup(dir.path(), &["127.0.12.61"], "h2ws.test", &[]).await;
    // (h2_client waits for SETTINGS_ENABLE_CONNECT_PROTOCOL, and fails if it never comes.)
    let mut client = h2_client(&agent).await;

    let (resp, send) = client
        .send_request(websocket_connect("h2ws.test"), false)
        .expect("send CONNECT");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-origin"], "ws-a");
    assert!(!resp.headers().contains_key("sec-websocket-accept"));
    let io = H2Stream {
        send,
        recv: resp.into_body(),
        buf: Bytes::new(),
    };
    // Real WebSocket frames (masked, as a client sends them) over the h2 stream.
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    for i in 0..5 {
        echo(&mut ws, &format!("over h2 {i}")).await;
    }
    // The origin got an HTTP/1.1 handshake made by the agent.
    let seen = origins[0]
        .last_request
        .lock()
        .expect("lock")
        .clone()
        .expect("request");
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["sec-websocket-version"], "13");
    assert!(seen.contains_key("sec-websocket-key"));
    assert_eq!(seen["via"], "2 weir");
    assert_eq!(metric(&agent, "weir_agent_tunnels_open").await, Some(1.0));
    ws.close(None).await.expect("close");
    expect_closed(&mut ws).await;

    // Plain CONNECT (no :protocol) is still refused: weir is never a tunnel.
    let mut client = h2_client(&agent).await;
    let plain = Request::builder()
        .method(Method::CONNECT)
        .uri("h2ws.test:80")
        .body(())
        .expect("request");
    let (resp, _send) = client.send_request(plain, true).expect("send");
    assert_eq!(
        resp.await.expect("response").status(),
        StatusCode::BAD_REQUEST
    );

    // An unknown authority is 404, another :protocol 400; neither reaches the origin.
    let before = origins[0].connections();
    let mut client = h2_client(&agent).await;
    let (resp, _send) = client
        .send_request(websocket_connect("nobody.test"), false)
        .expect("send");
    assert_eq!(
        resp.await.expect("response").status(),
        StatusCode::NOT_FOUND
    );
    let mut other = websocket_connect("h2ws.test");
    other
        .extensions_mut()
        .insert(h2::ext::Protocol::from_static("connect-udp"));
    let (resp, _send) = client.send_request(other, false).expect("send");
    assert_eq!(
        resp.await.expect("response").status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(origins[0].connections(), before);

    // An origin that refuses: its answer on the stream.
    origins[0].refuse.store(403, Ordering::SeqCst);
    let (resp, _send) = client
        .send_request(websocket_connect("h2ws.test"), false)
        .expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(String::from_utf8_lossy(&text), "refused by ws-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_websocket_stream_is_reset_by_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--upgrade-idle-timeout", "1s"];
    let (_origins, _c, agent) = setup(dir.path(), &["127.0.12.71"], "h2idle.test", &flags).await;
    let mut client = h2_client(&agent).await;
    let (resp, send) = client
        .send_request(websocket_connect("h2idle.test"), false)
        .expect("send CONNECT");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let io = H2Stream {
        send,
        recv: resp.into_body(),
        buf: Bytes::new(),
    };
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    echo(&mut ws, "once").await;
    expect_closed(&mut ws).await;
    wait_for("tunnel gauge back to 0", || async {
        (metric(&agent, "weir_agent_tunnels_open").await == Some(0.0)).then_some(())
    })
    .await;
}
