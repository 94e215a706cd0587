//! Tracing: W3C Trace Context in, one span per observed request out over OTLP/HTTP
//! (protobuf, `POST {endpoint}/v1/traces`, the collector's port 4318).
//!
//! Sampling is parent-based, as OpenTelemetry's default sampler: a request whose
//! `traceparent` says *sampled* is recorded, one that says *not sampled* is not (and its
//! header goes upstream untouched), and a request without one starts a trace with the
//! configured probability. A recorded request's `traceparent` is replaced by the agent's own
//! span, so the upstream's spans are its children; `tracestate` passes through.
//!
//! Spans are queued (bounded; dropped and counted when full) and exported in batches by one
//! task on the agent's control runtime, so a slow or absent collector costs the request path
//! nothing. The wire types are `opentelemetry-proto`'s; the OpenTelemetry SDK's batch
//! processor is not used because its exporters need a runtime of their own next to the
//! agent's per-worker runtimes, for what is here a channel and one HTTP client.

use super::{Exchange, Outcome, protocol};
use bytes::Bytes;
use http::HeaderName;
use http::header::HeaderMap;
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::sync::mpsc;

pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Spans that may wait for the exporter before new ones are dropped.
const QUEUE: usize = 8 * 1024;
/// Spans per export request at most (the collector's default limits are far above).
const BATCH: usize = 512;
/// Time an export may take before it is abandoned (its spans are dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The trace context of a recorded request.
#[derive(Debug, Clone)]
pub(crate) struct SpanCtx {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The caller's span, when the request came with a `traceparent`.
    parent: Option<[u8; 8]>,
}

impl SpanCtx {
    /// The `traceparent` the upstream gets: this span, sampled.
    pub(crate) fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }

    pub(crate) fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub(crate) fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A `traceparent` header, parsed (W3C Trace Context level 1, version 00; a later version's
/// first four fields are read the same way, as the spec asks). `None` when malformed,
/// including the all-zero ids the spec forbids.
pub(crate) fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = unhex::<16>(trace)?;
    let span_id = unhex::<8>(parent)?;
    let flags = unhex::<1>(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags[0] & 1 == 1))
}

/// A finished span on its way to the exporter.
struct Finished(Span);

/// The request path's side: sampling and the queue.
#[derive(Debug)]
pub struct Tracer {
    ratio: f64,
    tx: mpsc::Sender<Finished>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Finished")
    }
}

/// The exporting side, to run on a runtime with [`Exporter::run`].
pub struct Exporter {
    url: http::Uri,
    rx: mpsc::Receiver<Finished>,
    resource: Resource,
    dropped: Arc<AtomicU64>,
}

impl Tracer {
    /// A tracer exporting to `endpoint` (`http://host:4318`, or the full `/v1/traces` URL),
    /// starting traces for `ratio` (0–1) of the requests that come without one.
    pub fn new(endpoint: &str, ratio: f64, node: &str) -> Result<(Self, Exporter), String> {
        let endpoint = endpoint.trim_end_matches('/');
        let url = if endpoint.ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{endpoint}/v1/traces")
        };
        let url: http::Uri = url
            .parse()
            .map_err(|e| format!("bad OTLP endpoint {endpoint:?}: {e}"))?;
        if url.scheme() != Some(&http::uri::Scheme::HTTP) {
            return Err(format!(
                "OTLP endpoint {endpoint:?}: only http:// is supported (OTLP/HTTP to a local \
                 collector)"
            ));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let string = |key: &str, value: &str| KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..KeyValue::default()
        };
        let resource = Resource {
            attributes: vec![
                string("service.name", "weir-agent"),
                string("service.version", env!("CARGO_PKG_VERSION")),
                string("host.name", node),
            ],
            ..Resource::default()
        };
        Ok((
            Self {
                ratio: ratio.clamp(0.0, 1.0),
                tx,
                dropped: dropped.clone(),
            },
            Exporter {
                url,
                rx,
                resource,
                dropped,
            },
        ))
    }

    /// Spans dropped (queue full or export failed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The span of a request, if it is recorded (see the module doc for the sampling).
    pub(crate) fn begin(&self, headers: &HeaderMap) -> Option<SpanCtx> {
        let incoming = headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let (trace_id, parent) = match incoming {
            Some((trace_id, parent, true)) => (trace_id, Some(parent)),
            Some((_, _, false)) => return None,
            None => {
                if !(self.ratio >= 1.0 || rand::random::<f64>() < self.ratio) {
                    return None;
                }
                (nonzero_random(), None)
            }
        };
        Some(SpanCtx {
            trace_id,
            span_id: nonzero_random(),
            parent,
        })
    }

    pub(super) fn end(&self, ctx: &SpanCtx, ex: &Exchange, o: &Outcome<'_>, elapsed: Duration) {
        let start = ex
            .wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let end = start.saturating_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        let string = |key: &str, value: String| KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value)),
            }),
            ..KeyValue::default()
        };
        let path = ex.target.split('?').next().unwrap_or("/").to_owned();
        let mut attributes = vec![
            string("http.request.method", ex.method.to_string()),
            string("url.path", path),
            string("server.address", ex.host.clone()),
            string("client.address", ex.client.clone()),
            string(
                "network.protocol.version",
                protocol(ex.version)
                    .trim_start_matches("HTTP/")
                    .trim_end_matches(".0")
                    .to_owned(),
            ),
            KeyValue {
                key: "http.response.status_code".to_owned(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(i64::from(o.status))),
                }),
                ..KeyValue::default()
            },
        ];
        if let Some(route) = o.route {
            attributes.push(string("weir.route", route.to_string()));
        }
        if let Some(up) = o.upstream {
            attributes.push(string("weir.upstream", up.to_string()));
        }
        if let Some(cache) = o.cache {
            attributes.push(string("weir.cache", cache.to_owned()));
        }
        if let Some(error) = o.error {
            attributes.push(string("weir.error", error.to_owned()));
        }
        let name = match o.route {
            Some(route) => format!("{} {route}", ex.method),
            None => ex.method.to_string(),
        };
        let span = Span {
            trace_id: ctx.trace_id.to_vec(),
            span_id: ctx.span_id.to_vec(),
            parent_span_id: ctx.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 1,
            name,
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: (o.status >= 500 || o.error.is_some()).then(|| Status {
                code: status::StatusCode::Error as i32,
                message: o.error.unwrap_or_default().to_owned(),
            }),
            ..Span::default()
        };
        if self.tx.try_send(Finished(span)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

impl Exporter {
    /// Exports until every [`Tracer`] is gone: a batch per request, one request at a time
    /// (spans queue meanwhile, so batches grow with the load).
    pub async fn run(mut self) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let mut batch = Vec::with_capacity(BATCH);
        let mut last_warning: Option<Instant> = None;
        loop {
            batch.clear();
            if self.rx.recv_many(&mut batch, BATCH).await == 0 {
                return;
            }
            let n = batch.len() as u64;
            let body = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(self.resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "weir-agent".to_owned(),
                            version: env!("CARGO_PKG_VERSION").to_owned(),
                            ..InstrumentationScope::default()
                        }),
                        spans: batch.drain(..).map(|f| f.0).collect(),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            }
            .encode_to_vec();
            let req = http::Request::post(self.url.clone())
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(Full::new(Bytes::from(body)));
            let Ok(req) = req else { continue };
            let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await;
            let failure = match sent {
                Ok(Ok(resp)) if resp.status().is_success() => None,
                Ok(Ok(resp)) => Some(format!("collector answered {}", resp.status())),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_owned()),
            };
            if let Some(why) = failure {
                self.dropped.fetch_add(n, Ordering::Relaxed);
                // One warning per minute: a collector that is down must not flood the log.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(url = %self.url, error = %why, spans = n, "OTLP export failed; spans dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn traceparent_is_parsed_as_the_spec_says() {
        let (t, p, sampled) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .expect("valid");
        assert_eq!(hex(&t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p), "00f067aa0ba902b7");
        assert!(sampled);
        let (_, _, sampled) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid");
        assert!(!sampled);
        // A later version may add fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn sampling_is_parent_based() {
        let (never, _exporter) = Tracer::new("http://127.0.0.1:4318", 0.0, "n").expect("tracer");
        let mut headers = HeaderMap::new();
        assert!(never.begin(&headers).is_none(), "no parent, ratio 0");
        headers.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ctx = never.begin(&headers).expect("a sampled parent is followed");
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        let child = ctx.traceparent();
        assert!(
            child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{child}"
        );
        assert!(
            child.ends_with("-01") && !child.contains("00f067aa0ba902b7"),
            "{child}"
        );

        let (always, _exporter) = Tracer::new("http://127.0.0.1:4318", 1.0, "n").expect("tracer");
        headers.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        assert!(
            always.begin(&headers).is_none(),
            "an unsampled parent is followed"
        );
        headers.remove(&TRACEPARENT);
        let root = always.begin(&headers).expect("ratio 1 starts a trace");
        assert!(root.parent.is_none());
    }

    #[test]
    fn only_plain_http_endpoints_are_taken() {
        assert!(Tracer::new("https://collector:4318", 1.0, "n").is_err());
        assert!(Tracer::new("not a url", 1.0, "n").is_err());
        let (_, exporter) = Tracer::new("http://c:4318/", 1.0, "n").expect("ok");
        assert_eq!(exporter.url.to_string(), "http://c:4318/v1/traces");
        let (_, exporter) = Tracer::new("http://c:4318/v1/traces", 1.0, "n").expect("ok");
        assert_eq!(exporter.url.to_string(), "http://c:4318/v1/traces");
    }
}
