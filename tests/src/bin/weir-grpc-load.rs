//! `weir-grpc-load`: a gRPC load generator (unary `weir.test.v1.Echo/Unary` calls with tonic)
//! for the gRPC benchmark (`tests/bench/grpc_bench.py`).
//!
//! Calls go over `--connections` HTTP/2 connections (each a tonic `Channel` on one TCP
//! connection; call i uses connection i mod K), all on one current-thread runtime (pin it
//! with `taskset`, like `wrk -t1`).
//!
//! * **closed loop** (no `--rate`): `--concurrency` C tasks each issue one call after the
//!   other for `--duration`; reports calls/s (saturation) and the per-call latency.
//! * **open loop** (`--rate R`): calls are *scheduled* every 1/R s by a periodic timerfd (as
//!   in `weir-load`) and each is started at once as its own task, however many are still in
//!   flight; latency is measured from the **scheduled** time (coordinated omission accounted
//!   for). Calls still unanswered `--drain` after the schedule are counted as errors.
//!
//! ```text
//! weir-grpc-load --url http://127.0.0.1:15001 --host echo --connections 1 \
//!     --concurrency 64 --duration 10s              # saturation
//! weir-grpc-load --url http://127.0.0.1:15001 --host echo --connections 8 \
//!     --rate 5000 --duration 10s                   # latency at a fixed rate
//! ```
//!
//! Prints one JSON object on stdout, with the same keys as `weir-load` where they apply:
//! `{"mode":..,"sent":..,"ok":..,"errors":..,"calls_per_s":..,"p50_us":..,"p90_us":..,
//!   "p99_us":..,"p999_us":..,"max_us":..,"mean_us":..,"achieved_rps":..,"target_rps":..,
//!   "unfinished":..,"connections":..,"concurrency":..,"duration_s":..,
//!   "sched_lag_p50_us":..,"sched_lag_p99_us":..}`. A call that ends with a non-OK status or
//! a transport error is an error and is not recorded in the histogram (1 µs … 60 s, 3 digits).

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use weir_tests::grpc::pb::EchoRequest;
use weir_tests::grpc::pb::echo_client::EchoClient;

#[derive(Parser, Debug)]
#[command(
    name = "weir-grpc-load",
    about = "gRPC unary load: closed-loop saturation or open-loop fixed rate"
)]
struct Args {
    /// Target, e.g. http://127.0.0.1:15001
    #[arg(long)]
    url: String,
    /// `:authority` to send (default: the URL's authority).
    #[arg(long)]
    host: Option<String>,
    /// HTTP/2 connections; call i goes to connection i mod K.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Closed loop: calls in flight at any time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: calls per second, spread evenly in time (omit for closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Request payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Measured duration: e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded lead-in (same load).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop: how long to wait for calls still in flight after the schedule ends.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Default)]
struct Stats {
    ok: u64,
    ok_in_window: u64,
    errors: u64,
    finished: u64,
}

struct Shared {
    stats: RefCell<Stats>,
    hist: RefCell<Histogram<u64>>,
}

async fn connect(url: &str, host: &str) -> anyhow::Result<EchoClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .origin(format!("http://{host}").parse()?)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect {url}"))?;
    Ok(EchoClient::new(channel))
}

async fn one_call(client: &mut EchoClient<Channel>, payload: &bytes::Bytes) -> bool {
    let req = EchoRequest {
        payload: payload.to_vec(),
        delay_ms: 0,
        fail: false,
    };
    client.unary(req).await.is_ok()
}

/// Records one finished call that started (or was due) at `at`.
fn record(sh: &Shared, at: Instant, ok: bool, measure_from: Instant, end: Instant) {
    let now = Instant::now();
    let mut st = sh.stats.borrow_mut();
    st.finished += 1;
    if at < measure_from {
        return;
    }
    if ok {
        st.ok += 1;
        st.ok_in_window += u64::from(now <= end);
        let us = now.duration_since(at).as_micros().max(1) as u64;
        sh.hist.borrow_mut().saturating_record(us);
    } else {
        st.errors += 1;
    }
}

fn lower_timer_slack() {
    if std::fs::write("/proc/self/timerslack_ns", "1000").is_err() {
        eprintln!("weir-grpc-load: could not lower timer slack; schedule may lag by ~50-100 µs");
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lower_timer_slack();
    if args.connections == 0 || args.concurrency == 0 {
        bail!("--connections and --concurrency must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate must be positive");
    }
    let uri: http::Uri = args.url.parse().context("--url")?;
    let authority = uri.authority().context("--url needs a host")?.to_string();
    let host = args.host.clone().unwrap_or(authority);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(args, host))
}

async fn run(args: Args, host: String) -> anyhow::Result<()> {
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(connect(&args.url, &host).await?);
    }
    let payload = bytes::Bytes::from(vec![b'x'; args.payload]);
    // One call on each connection before the clock starts (handshakes, SETTINGS).
    for c in clients.iter_mut() {
        if !one_call(c, &payload).await {
            bail!("first call failed");
        }
    }
    let sh = Rc::new(Shared {
        stats: RefCell::new(Stats::default()),
        hist: RefCell::new(new_hist()),
    });
    let lead = Duration::from_millis(20);
    let start = Instant::now() + lead;
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut lag = new_hist();
    let mut sent = 0u64;
    let mut unfinished = 0u64;

    match args.rate {
        None => {
            let mut tasks = Vec::new();
            for i in 0..args.concurrency {
                let mut client = clients[i % clients.len()].clone();
                let (sh, payload) = (sh.clone(), payload.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    tokio::time::sleep_until(start.into()).await;
                    loop {
                        let at = Instant::now();
                        if at >= end {
                            break;
                        }
                        let ok = one_call(&mut client, &payload).await;
                        record(&sh, at, ok, measure_from, end);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let st = sh.stats.borrow();
            sent = st.ok + st.errors;
        }
        Some(rate) => {
            let period_ns = ((1e9 / rate).round() as u64).max(1);
            let now_ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
            let start = Instant::now() + lead;
            let measure_from = start + args.warmup;
            let end = measure_from + args.duration;
            let first_ns =
                now_ts.tv_sec as u128 * 1_000_000_000 + now_ts.tv_nsec as u128 + lead.as_nanos();
            let fd = weir_tests::load::periodic_timer(first_ns, period_ns)?;
            let mut k: u64 = 0;
            let mut total = 0u64;
            'outer: loop {
                let expirations = weir_tests::load::expirations(&fd).await?;
                for _ in 0..expirations {
                    let at = start + Duration::from_nanos(period_ns.saturating_mul(k));
                    if at >= end {
                        break 'outer;
                    }
                    if at >= measure_from {
                        sent += 1;
                        lag.saturating_record(at.elapsed().as_micros() as u64 + 1);
                    }
                    let mut client = clients[(k % clients.len() as u64) as usize].clone();
                    let (sh, payload) = (sh.clone(), payload.clone());
                    tokio::task::spawn_local(async move {
                        let ok = one_call(&mut client, &payload).await;
                        record(&sh, at, ok, measure_from, end);
                    });
                    k += 1;
                    total += 1;
                }
            }
            let deadline = Instant::now() + args.drain;
            while sh.stats.borrow().finished < total && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let st = sh.stats.borrow();
            unfinished = total.saturating_sub(st.finished).min(sent);
        }
    }

    let st = sh.stats.borrow();
    let hist = sh.hist.borrow();
    let q = |p: f64| {
        if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(p)
        }
    };
    let secs = args.duration.as_secs_f64();
    let lagq = |p: f64| {
        if lag.is_empty() {
            0
        } else {
            lag.value_at_quantile(p).saturating_sub(1)
        }
    };
    let out = serde_json::json!({
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "sent": sent,
        "ok": st.ok,
        "errors": st.errors + unfinished,
        "calls_per_s": (st.ok_in_window as f64 / secs).round(),
        "achieved_rps": (st.ok_in_window as f64 / secs).round(),
        "target_rps": args.rate.unwrap_or(0.0),
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": hist.max(),
        "mean_us": (hist.mean() * 10.0).round() / 10.0,
        "unfinished": unfinished,
        "connections": args.connections,
        "concurrency": args.concurrency,
        "payload": args.payload,
        "duration_s": secs,
        "sched_lag_p50_us": lagq(0.50),
        "sched_lag_p99_us": lagq(0.99),
    });
    println!("{out}");
    // Open-loop tasks still pending are dropped with the runtime.
    std::process::exit(0);
}
