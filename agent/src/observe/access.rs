//! Access logs: one line per sampled request on standard output (the agent's own logs go to
//! standard error), as JSON or in the NCSA common log format extended with weir's fields.
//!
//! Lines are formatted on the request's worker and handed to one writer thread through a
//! bounded channel; when the channel is full (stdout blocked by a slow collector) lines are
//! dropped and counted rather than stalling requests. A channel and a thread is all
//! `tracing-appender`'s non-blocking writer would add here, so it is written out.

use super::{Exchange, Outcome, protocol};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// The format of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// `client - - [time] "METHOD target PROTO" status - "host" route upstream cache ms`.
    Common,
}

/// The access log: format, sampling and the queue to the writer thread.
#[derive(Debug)]
pub struct AccessLog {
    format: Format,
    /// Share of requests logged, 0–1.
    ratio: f64,
    tx: SyncSender<String>,
    dropped: AtomicU64,
}

impl AccessLog {
    /// An access log on standard output, logging `ratio` (0–1] of the requests.
    pub fn stdout(format: Format, ratio: f64) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || write_lines(rx, std::io::stdout()))?;
        Ok(Self {
            format,
            ratio: ratio.clamp(0.0, 1.0),
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Whether this request is logged.
    #[inline]
    pub(crate) fn sample(&self) -> bool {
        self.ratio >= 1.0 || rand::random::<f64>() < self.ratio
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(super) fn write(&self, ex: &Exchange, outcome: &Outcome<'_>, elapsed: Duration) {
        let line = match self.format {
            Format::Json => json_line(ex, outcome, elapsed),
            Format::Common => common_line(ex, outcome, elapsed),
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer thread: lines in, flushed whenever the queue runs dry.
fn write_lines(rx: Receiver<String>, out: impl Write) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        let mut ok = out.write_all(line.as_bytes()).is_ok();
        while let Ok(line) = rx.try_recv() {
            ok &= out.write_all(line.as_bytes()).is_ok();
        }
        if !(ok && out.flush().is_ok()) {
            // stdout is gone (closed pipe): nothing more can be logged.
            return;
        }
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn json_line(ex: &Exchange, o: &Outcome<'_>, elapsed: Duration) -> String {
    let mut v = serde_json::json!({
        "time": humantime::format_rfc3339_millis(ex.wall).to_string(),
        "client": ex.client,
        "method": ex.method.as_str(),
        "host": ex.host,
        "target": ex.target,
        "protocol": protocol(ex.version),
        "status": o.status,
        "durationMs": millis(elapsed),
        "route": o.route.map(|r| &**r),
        "upstream": o.upstream.map(|u| u.to_string()),
        "cache": o.cache,
        "error": o.error,
    });
    if let Some(span) = &ex.span {
        v["traceId"] = span.trace_id_hex().into();
        v["spanId"] = span.span_id_hex().into();
    }
    let mut line = v.to_string();
    line.push('\n');
    line
}

fn common_line(ex: &Exchange, o: &Outcome<'_>, elapsed: Duration) -> String {
    let dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_owned());
    format!(
        "{} - - [{}] \"{} {} {}\" {} - \"{}\" {} {} {} {}\n",
        ex.client,
        clf_time(ex.wall),
        ex.method,
        ex.target,
        protocol(ex.version),
        o.status,
        ex.host,
        dash(o.route.map(|r| r.to_string())),
        dash(o.upstream.map(|u| u.to_string())),
        o.cache.or(o.error).unwrap_or("-"),
        millis(elapsed),
    )
}

/// The common log format's time, `04/Dec/2026:18:40:00 +0000`, from the HTTP date
/// `Fri, 04 Dec 2026 18:40:00 GMT` (always UTC).
fn clf_time(t: SystemTime) -> String {
    let http = httpdate::fmt_http_date(t);
    let parts: Vec<&str> = http.split(' ').collect();
    match parts.as_slice() {
        [_, day, month, year, time, _] => format!("{day}/{month}/{year}:{time} +0000"),
        _ => http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Version};
    use std::sync::Arc;

    fn exchange() -> Exchange {
        Exchange {
            started: std::time::Instant::now(),
            wall: std::time::UNIX_EPOCH + Duration::from_secs(1_796_408_000),
            method: Method::GET,
            version: Version::HTTP_11,
            host: "shop".into(),
            target: "/cart?id=7".into(),
            client: "10.0.0.9".into(),
            log: true,
            span: None,
        }
    }

    #[test]
    fn a_json_line_has_every_field() {
        let route: Arc<str> = "default/shop".into();
        let o = Outcome {
            status: 200,
            route: Some(&route),
            upstream: Some("127.0.0.11:9081".parse().expect("addr")),
            cache: Some("MISS"),
            error: None,
        };
        let line = json_line(&exchange(), &o, Duration::from_micros(1_234));
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["time"], "2026-12-04T18:13:20.000Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["target"], "/cart?id=7");
        assert_eq!(v["status"], 200);
        assert_eq!(v["route"], "default/shop");
        assert_eq!(v["upstream"], "127.0.0.11:9081");
        assert_eq!(v["cache"], "MISS");
        assert_eq!(v["durationMs"], 1.234);
        assert!(v["error"].is_null());
    }

    #[test]
    fn a_common_line_reads_like_ncsa_plus_weir_fields() {
        let o = Outcome {
            status: 404,
            route: None,
            upstream: None,
            cache: None,
            error: Some("no-route"),
        };
        let line = common_line(&exchange(), &o, Duration::from_millis(2));
        assert_eq!(
            line,
            "10.0.0.9 - - [04/Dec/2026:18:13:20 +0000] \"GET /cart?id=7 HTTP/1.1\" 404 - \
             \"shop\" - - no-route 2\n"
        );
    }

    #[test]
    fn lines_reach_the_writer_in_order() {
        let (tx, rx) = sync_channel(4);
        tx.send("a\n".to_owned()).expect("send");
        tx.send("b\n".to_owned()).expect("send");
        drop(tx);
        let mut out = Vec::new();
        write_lines(rx, &mut out);
        assert_eq!(out, b"a\nb\n");
    }
}
