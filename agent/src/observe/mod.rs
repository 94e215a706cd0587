//! Per-request observability an operator switches on: access logs ([`access`]) and traces
//! exported over OTLP ([`trace`]). Both are off by default, and then a request pays one
//! branch; when on, each is sampled, and an unsampled request pays a random draw.
//!
//! An [`Exchange`] is what the request path keeps of a request it observes (taken before the
//! request is routed, finished when the response head is ready): the log line and the span
//! are both written from it, so they describe the same thing — the time to the response head,
//! the answer's status, the route, the endpoint that answered and the cache's verdict.

pub mod access;
pub mod trace;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, Version};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub use access::{AccessLog, Format};
pub use trace::{Exporter, Tracer};

/// The endpoint that answered a request, put in the response's extensions by the try loop
/// (only while observing, so that other requests pay no extension map).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Upstream(pub(crate) SocketAddr);

/// What is switched on.
#[derive(Debug, Default)]
pub struct Observe {
    access: Option<AccessLog>,
    tracer: Option<Tracer>,
}

impl Observe {
    pub fn new(access: Option<AccessLog>, tracer: Option<Tracer>) -> Self {
        Self { access, tracer }
    }

    /// Whether anything is switched on (the request path's only question when nothing is).
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.access.is_some() || self.tracer.is_some()
    }

    /// Starts observing a request, if it is sampled by either. A recorded span also sets
    /// the request's `traceparent` to the span, so the upstream's spans hang under it.
    pub(crate) fn begin(
        &self,
        method: &Method,
        version: Version,
        uri: &http::Uri,
        headers: &mut HeaderMap,
        client: &HeaderValue,
    ) -> Option<Exchange> {
        let log = self.access.as_ref().is_some_and(AccessLog::sample);
        let span = self.tracer.as_ref().and_then(|t| t.begin(headers));
        if !log && span.is_none() {
            return None;
        }
        if let Some(span) = &span
            && let Ok(v) = HeaderValue::from_str(&span.traceparent())
        {
            headers.insert(&trace::TRACEPARENT, v);
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        Some(Exchange {
            started: Instant::now(),
            wall: SystemTime::now(),
            method: method.clone(),
            version,
            host,
            target: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
            client: String::from_utf8_lossy(client.as_bytes()).into_owned(),
            log,
            span,
        })
    }
}

/// A request being observed.
#[derive(Debug)]
pub(crate) struct Exchange {
    started: Instant,
    wall: SystemTime,
    method: Method,
    version: Version,
    host: String,
    /// Path and query as received.
    target: String,
    client: String,
    log: bool,
    span: Option<trace::SpanCtx>,
}

/// What the answer was, for the log line and the span.
pub(crate) struct Outcome<'a> {
    pub(crate) status: u16,
    pub(crate) route: Option<&'a Arc<str>>,
    pub(crate) upstream: Option<SocketAddr>,
    /// `x-cache`, if the cache had a say.
    pub(crate) cache: Option<&'a str>,
    /// `x-weir-error`, if the agent answered itself.
    pub(crate) error: Option<&'a str>,
}

impl<'a> Outcome<'a> {
    pub(crate) fn of<B>(resp: &'a Response<B>, route: Option<&'a Arc<str>>) -> Self {
        let text = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        Self {
            status: resp.status().as_u16(),
            route,
            upstream: resp.extensions().get::<Upstream>().map(|u| u.0),
            cache: text("x-cache"),
            error: text("x-weir-error"),
        }
    }
}

impl Exchange {
    /// Writes the log line and ends the span.
    pub(crate) fn finish(self, observe: &Observe, outcome: &Outcome<'_>) {
        let elapsed = self.started.elapsed();
        if self.log
            && let Some(log) = &observe.access
        {
            log.write(&self, outcome, elapsed);
        }
        if let (Some(span), Some(tracer)) = (&self.span, &observe.tracer) {
            tracer.end(span, &self, outcome, elapsed);
        }
    }
}

/// The protocol as logs and spans name it.
fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}
