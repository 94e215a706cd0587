//! A real HTTP/1.1 + h2c demo backend: answers every request with its own name, and counts
//! what it served so tests can check where traffic went.
//!
//! For the cache demo, a `max-age=N` query parameter makes it answer with
//! `Cache-Control: public, max-age=N` and say in the body which of its requests this was, so
//! a cached copy is easy to tell from a fresh one.
//!
//! Used in-process by the e2e tests and by the quickstart, and as the `weir-demo-backend`
//! binary where a test must kill a backend process.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How a backend answers; switchable while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `200 hello from …`.
    Normal,
    /// Accepts and reads the request, never answers.
    Hang,
    /// Answers with this status.
    Status(u16),
    /// Answers normally after this many milliseconds.
    Delay(u64),
    /// Answers `429 Too Many Requests` with `Retry-After` of this many seconds.
    Throttle(u64),
}

/// [`Mode::Throttle`]'s encoding starts here (above every [`Mode::Delay`] in use).
const THROTTLE_BASE: u64 = 1 << 40;

impl Mode {
    fn encode(self) -> u64 {
        match self {
            Mode::Normal => 0,
            Mode::Hang => 1,
            Mode::Status(s) => u64::from(s),
            Mode::Delay(ms) => 1_000_000 + ms,
            Mode::Throttle(secs) => THROTTLE_BASE + secs,
        }
    }

    fn decode(v: u64) -> Self {
        match v {
            0 => Mode::Normal,
            1 => Mode::Hang,
            v if v >= THROTTLE_BASE => Mode::Throttle(v - THROTTLE_BASE),
            v if v >= 1_000_000 => Mode::Delay(v - 1_000_000),
            v => Mode::Status(v as u16),
        }
    }

    /// Parses `normal`, `hang`, `status:503`, `delay:50` or `throttle:60`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.split_once(':') {
            None if s == "normal" => Some(Mode::Normal),
            None if s == "hang" => Some(Mode::Hang),
            Some(("status", n)) => n.parse().ok().map(Mode::Status),
            Some(("delay", n)) => n.parse().ok().map(Mode::Delay),
            Some(("throttle", n)) => n.parse().ok().map(Mode::Throttle),
            _ => None,
        }
    }
}

/// A running backend; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    hits: Arc<AtomicU64>,
    mode: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Binds `addr` (port 0 picks one) and serves until dropped.
    pub async fn start(addr: SocketAddr, name: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let mode = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(
            listener,
            name.to_string(),
            hits.clone(),
            mode.clone(),
        ));
        Ok(Self {
            addr,
            name: name.to_string(),
            hits,
            mode,
            task,
        })
    }

    /// Changes how the backend answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves on `listener` forever: `200 hello from NAME (ADDR)`, or as `mode` says.
pub async fn serve(
    listener: TcpListener,
    name: String,
    hits: Arc<AtomicU64>,
    mode: Arc<AtomicU64>,
) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let body = Bytes::from(format!("hello from {name} ({local})\n"));
    let name = http::HeaderValue::from_str(&name).unwrap_or(http::HeaderValue::from_static("?"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let body = body.clone();
        let name = name.clone();
        let hits = hits.clone();
        let mode = mode.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let n = hits.fetch_add(1, Ordering::Relaxed) + 1;
                let mode = Mode::decode(mode.load(Ordering::Relaxed));
                let max_age = cacheable_for(req.uri());
                let mut resp = Response::new(Full::new(match max_age {
                    None => body.clone(),
                    Some(_) => {
                        let text = String::from_utf8_lossy(&body);
                        Bytes::from(format!("{}, request #{n}\n", text.trim_end()))
                    }
                }));
                if let Some(secs) = max_age
                    && let Ok(v) = http::HeaderValue::from_str(&format!("public, max-age={secs}"))
                {
                    resp.headers_mut().insert(http::header::CACHE_CONTROL, v);
                }
                if let Mode::Status(code) = mode {
                    *resp.status_mut() = http::StatusCode::from_u16(code)
                        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                }
                if let Mode::Throttle(secs) = mode {
                    *resp.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                    resp.headers_mut()
                        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
                }
                resp.headers_mut().insert("x-backend", name.clone());
                // Echo what the proxy forwarded, for header tests.
                for h in ["x-forwarded-for", "via", "host", "traceparent"] {
                    if let Some(v) = req.headers().get(h) {
                        let echo = format!("x-echo-{h}");
                        if let (Ok(n), v) =
                            (http::HeaderName::from_bytes(echo.as_bytes()), v.clone())
                        {
                            resp.headers_mut().insert(n, v);
                        }
                    }
                }
                async move {
                    // Read the whole body before answering (as a real application does), so
                    // the proxy never sees its request cut off by an early answer; its size
                    // is echoed for body-forwarding tests.
                    if let Ok(body) = http_body_util::BodyExt::collect(req.into_body()).await {
                        let len = body.to_bytes().len();
                        resp.headers_mut()
                            .insert("x-echo-body-length", http::HeaderValue::from(len));
                    }
                    match mode {
                        Mode::Hang => std::future::pending::<()>().await,
                        Mode::Delay(ms) => {
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await
                        }
                        _ => {}
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The `max-age=N` query parameter of a request, if any.
fn cacheable_for(uri: &http::Uri) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("max-age="))
        .and_then(|v| v.parse().ok())
}

/// Starts one backend on each of `ips`, all on the same port (an EndpointSlice gives one
/// port for all its endpoints). Retries with another port if one is taken on some address.
pub async fn start_group(ips: &[&str], name: &str) -> std::io::Result<Vec<Backend>> {
    let mut last_err = None;
    for _ in 0..20 {
        let first: SocketAddr = format!("{}:0", ips[0])
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let b0 = Backend::start(first, name).await?;
        let port = b0.addr.port();
        let mut group = vec![b0];
        let mut ok = true;
        for ip in &ips[1..] {
            let addr: SocketAddr = format!("{ip}:{port}")
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            match Backend::start(addr, name).await {
                Ok(b) => group.push(b),
                Err(e) => {
                    last_err = Some(e);
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok(group);
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no common free port")))
}
