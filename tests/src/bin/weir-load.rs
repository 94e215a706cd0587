//! `weir-load`: an open-loop HTTP/1.1 load generator for latency at a fixed rate.
//!
//! Requests are *scheduled* at fixed intervals (`1 / --rate`) by a periodic timerfd (with a
//! lowered timer slack) on the runtime's own thread, and handed round robin to
//! `--connections` keep-alive
//! connections (one request in flight per connection, like wrk). Latency is measured from a
//! request's **scheduled** time, not from when it could be sent, so a stall that makes later
//! requests wait on a busy connection shows up in the percentiles (coordinated omission is
//! accounted for, as in wrk2). Results go to an HDR histogram (1 µs … 60 s, 3 digits).
//!
//!     weir-load --url http://127.0.0.1:15001/ --host bench --rate 10000 \
//!         --connections 64 --duration 10s
//!
//! Prints one JSON object on stdout:
//! `{"sent":..,"ok":..,"errors":..,"p50_us":..,"p90_us":..,"p99_us":..,"p999_us":..,
//!   "achieved_rps":..}` plus `max_us`, `mean_us` and the scheduler's own lateness
//! (`sched_lag_p50_us`, `sched_lag_p99_us`: how late the generator dispatched requests
//! relative to their schedule; that lateness is included in the latencies, so check that it
//! is small before trusting a low percentile). `achieved_rps` counts 2xx answers completed
//! within the measured period: well below `--rate` means the target could not keep up (its
//! percentiles then mostly measure the queue). Requests still unanswered `--drain` after
//! the schedule ends are cancelled and counted in `unfinished` and in `errors`. Requests
//! during `--warmup` are sent at the same rate but not recorded. A non-2xx answer or a transport error counts as an error and
//! is not recorded in the histogram; a broken connection is re-established.

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(name = "weir-load", about = "Open-loop HTTP/1.1 load at a fixed rate")]
struct Args {
    /// Target URL (http only), e.g. http://127.0.0.1:15001/
    #[arg(long)]
    url: String,
    /// Host header to send (default: the URL's authority).
    #[arg(long)]
    host: Option<String>,
    /// Requests per second, spread evenly in time.
    #[arg(long)]
    rate: f64,
    /// Keep-alive connections; request i goes to connection i mod C.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured duration: e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded lead-in at the same rate.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Behave like a pooled client across a server's graceful close (restart benchmarks): a
    /// connection found closed before a request is written is replaced and the request sent
    /// on the new one, and a request that fails on a reused connection before any answer
    /// (the server closed it as the request went out) is sent once more on a new connection
    /// (RFC 9110 §9.2.2, as browsers and curl do). Counted in `retried`; the latency still
    /// counts from the scheduled time. Off: either case is an error.
    #[arg(long)]
    reconnect_closed: bool,
    /// How long to wait for requests still in flight after the schedule ends.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

struct Target {
    addr: String,
    path: String,
    host: String,
    reconnect_closed: bool,
}

/// Requests sent again under `--reconnect-closed`.
static RETRIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One scheduled request: when it should have started, and whether it is measured.
struct Slot {
    at: Instant,
    measured: bool,
}

/// What one connection has measured so far. Shared with `main` so that what was measured
/// survives a connection task cancelled at the end of the drain (an overloaded target).
struct ConnStats {
    ok: u64,
    /// 2xx answers completed before the end of the measured period.
    ok_in_window: u64,
    errors: u64,
    hist: Histogram<u64>,
}

type SharedStats = Arc<Mutex<ConnStats>>;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn connect(t: &Target) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(&t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn run_conn(
    target: Arc<Target>,
    mut sender: Option<SendRequest<Empty<Bytes>>>,
    mut rx: mpsc::UnboundedReceiver<Slot>,
    stats: SharedStats,
    end: Instant,
) {
    while let Some(slot) = rx.recv().await {
        let ok = one_request(&target, &mut sender).await;
        if !slot.measured {
            continue;
        }
        // Uncontended (one runtime thread): a few nanoseconds.
        let mut st = stats.lock().expect("stats lock");
        if ok {
            let now = Instant::now();
            st.ok += 1;
            st.ok_in_window += u64::from(now <= end);
            let us = now.duration_since(slot.at).as_micros().max(1) as u64;
            st.hist.saturating_record(us);
        } else {
            st.errors += 1;
        }
    }
}

/// Sends one request on the connection (re-connecting if needed); true for a complete 2xx.
async fn one_request(target: &Target, sender: &mut Option<SendRequest<Empty<Bytes>>>) -> bool {
    if !target.reconnect_closed {
        return try_request(target, sender).await.unwrap_or(false);
    }
    let mut reused = sender.is_some();
    if let Some(s) = sender.as_mut()
        && s.ready().await.is_err()
    {
        // Closed while idle: the request was never sent.
        *sender = None;
        reused = false;
        RETRIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    match try_request(target, sender).await {
        Some(ok) => ok,
        None if reused => {
            RETRIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            try_request(target, sender).await.unwrap_or(false)
        }
        None => false,
    }
}

/// One try: `Some(complete 2xx)` once an answer head came, `None` when the connection
/// failed before any answer (it is dropped then).
async fn try_request(
    target: &Target,
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
) -> Option<bool> {
    if sender.is_none() {
        match connect(target).await {
            Ok(s) => *sender = Some(s),
            Err(_) => return Some(false),
        }
    }
    let s = sender.as_mut().expect("connected above");
    if s.ready().await.is_err() {
        *sender = None;
        return None;
    }
    let req = Request::get(target.path.as_str())
        .header(header::HOST, target.host.as_str())
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    match s.send_request(req).await {
        Ok(resp) => {
            let status = resp.status();
            match resp.into_body().collect().await {
                Ok(_) => Some(status.is_success()),
                Err(_) => {
                    *sender = None;
                    Some(false)
                }
            }
        }
        Err(_) => {
            *sender = None;
            None
        }
    }
}

/// Dispatches the schedule: request k is due at `start + k / rate` and goes to connection
/// k mod C. A periodic `timerfd` (nanosecond resolution, unlike tokio's 1 ms timer wheel)
/// wakes this runtime thread itself, so there is no cross-thread hand-off per request; a
/// read returns how many periods have elapsed, so a busy moment is caught up in one batch
/// with every request keeping its own scheduled time. Returns the measured requests sent
/// and the histogram of dispatch lateness.
/// When the schedule starts, in both clocks, and where the measured period lies.
struct Plan {
    /// CLOCK_MONOTONIC nanoseconds of the first request (for the timerfd).
    first_ns: u128,
    /// The same moment as an `Instant` (also CLOCK_MONOTONIC on Linux).
    start: Instant,
    measure_from: Instant,
    end: Instant,
    period_ns: u64,
}

impl Plan {
    fn new(rate: f64, warmup: Duration, duration: Duration) -> Self {
        // Both clocks read together; the first request is due 20 ms later.
        let lead = Duration::from_millis(20);
        let now_ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let start = Instant::now() + lead;
        let first_ns =
            now_ts.tv_sec as u128 * 1_000_000_000 + now_ts.tv_nsec as u128 + lead.as_nanos();
        let measure_from = start + warmup;
        Plan {
            first_ns,
            start,
            measure_from,
            end: measure_from + duration,
            period_ns: ((1e9 / rate).round() as u64).max(1),
        }
    }
}

async fn schedule(
    plan: &Plan,
    senders: Vec<mpsc::UnboundedSender<Slot>>,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let (first_ns, period_ns) = (plan.first_ns, plan.period_ns);
    let fd = weir_tests::load::periodic_timer(first_ns, period_ns)?;

    let (start, measure_from, end) = (plan.start, plan.measure_from, plan.end);
    let mut lag = new_hist();
    let mut sent: u64 = 0;
    let mut k: u64 = 0;
    let conns = senders.len() as u64;
    'outer: loop {
        let expirations = weir_tests::load::expirations(&fd).await?;
        // Expiration j (1-based) of the timer is request k = j - 1.
        for _ in 0..expirations {
            let at = start + Duration::from_nanos(period_ns.saturating_mul(k));
            if at >= end {
                break 'outer;
            }
            let measured = at >= measure_from;
            if measured {
                sent += 1;
                lag.saturating_record(at.elapsed().as_micros() as u64 + 1);
            }
            if senders[(k % conns) as usize]
                .send(Slot { at, measured })
                .is_err()
            {
                break 'outer;
            }
            k += 1;
        }
    }
    Ok((sent, lag))
}

/// Lowers the main thread's timer slack (default 50 µs) so that timers fire close to their
/// deadline; threads created afterwards inherit it. Best effort: needs Linux ≥ 4.6 and the
/// right to write `/proc/self/timerslack_ns` (root, or CAP_SYS_NICE since Linux 4.12).
fn lower_timer_slack() {
    if std::fs::write("/proc/self/timerslack_ns", "1000").is_err() {
        eprintln!("weir-load: could not lower timer slack; schedule may lag by ~50-100 µs");
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lower_timer_slack();
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be positive");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let uri: Uri = args.url.parse().context("--url")?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be http://");
    }
    let authority = uri.authority().context("--url needs a host")?.clone();
    let addr = if authority.port().is_some() {
        authority.as_str().to_string()
    } else {
        format!("{}:80", authority.host())
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let target = Arc::new(Target {
        addr,
        path,
        host: args.host.clone().unwrap_or_else(|| authority.to_string()),
        reconnect_closed: args.reconnect_closed,
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // All connections are opened before the clock starts.
        let mut conns = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            conns.push(connect(&target).await?);
        }
        let (rate, duration) = (args.rate, args.duration);
        let plan = Plan::new(rate, args.warmup, duration);
        let mut senders = Vec::with_capacity(args.connections);
        let mut tasks = Vec::with_capacity(args.connections);
        let mut all_stats = Vec::with_capacity(args.connections);
        for conn in conns {
            let (tx, rx) = mpsc::unbounded_channel();
            let stats = Arc::new(Mutex::new(ConnStats {
                ok: 0,
                ok_in_window: 0,
                errors: 0,
                hist: new_hist(),
            }));
            senders.push(tx);
            all_stats.push(stats.clone());
            tasks.push(tokio::spawn(run_conn(
                target.clone(),
                Some(conn),
                rx,
                stats,
                plan.end,
            )));
        }

        let (sent, lag) = schedule(&plan, senders).await?;

        // The schedule is over (its senders are dropped): let in-flight requests finish,
        // then cancel what an overloaded target still owes.
        let deadline = tokio::time::Instant::now() + args.drain;
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        let mut hist = new_hist();
        let (mut ok, mut ok_in_window, mut errors) = (0u64, 0u64, 0u64);
        for st in &all_stats {
            let st = st.lock().expect("stats lock");
            ok += st.ok;
            ok_in_window += st.ok_in_window;
            errors += st.errors;
            hist.add(&st.hist).ok();
        }
        // Requests still unanswered after the drain count as errors too.
        let unfinished = sent.saturating_sub(ok + errors);
        errors += unfinished;
        let q = |p: f64| {
            if hist.is_empty() {
                0
            } else {
                hist.value_at_quantile(p)
            }
        };
        let out = serde_json::json!({
            "sent": sent,
            "ok": ok,
            "errors": errors,
            "p50_us": q(0.50),
            "p90_us": q(0.90),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": hist.max(),
            "mean_us": (hist.mean() * 10.0).round() / 10.0,
            "unfinished": unfinished,
            "retried": RETRIED.load(std::sync::atomic::Ordering::Relaxed),
            "achieved_rps": (ok_in_window as f64 / duration.as_secs_f64()).round(),
            "target_rps": rate,
            "connections": args.connections,
            "duration_s": duration.as_secs_f64(),
            "sched_lag_p50_us": lag.value_at_quantile(0.50).saturating_sub(1),
            "sched_lag_p99_us": lag.value_at_quantile(0.99).saturating_sub(1),
        });
        println!("{out}");
        anyhow::Ok(())
    })
}
