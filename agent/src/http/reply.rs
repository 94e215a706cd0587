//! Answers the agent makes itself (no route, no healthy endpoint, upstream failures…): why
//! ([`LocalReply`]) and what the client gets. A leaf: counting the reply is the caller's.

use super::grpc::{GRPC_MESSAGE, GRPC_STATUS, percent_encode_grpc};
use super::headers::X_WEIR_ERROR;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// Why the agent answered a request itself instead of an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalReply {
    NoRoute,
    NoHealthyEndpoint,
    UpstreamConnect,
    UpstreamTimeout,
    UpstreamError,
    BadRequest,
    /// Ambiguous or unsupported request framing (RFC 9112 §6.1); the connection is closed.
    BadFraming,
    CircuitOpen,
    /// The route's local rate limit is exhausted (`429` with `Retry-After`).
    RateLimited,
}

impl LocalReply {
    pub(crate) const ALL: [LocalReply; 9] = [
        LocalReply::NoRoute,
        LocalReply::NoHealthyEndpoint,
        LocalReply::UpstreamConnect,
        LocalReply::UpstreamTimeout,
        LocalReply::UpstreamError,
        LocalReply::BadRequest,
        LocalReply::BadFraming,
        LocalReply::CircuitOpen,
        LocalReply::RateLimited,
    ];

    /// The value of the `x-weir-error` header and the metric label.
    pub(crate) fn code(self) -> &'static str {
        match self {
            LocalReply::NoRoute => "no-route",
            LocalReply::NoHealthyEndpoint => "no-healthy-endpoint",
            LocalReply::UpstreamConnect => "upstream-connect-failed",
            LocalReply::UpstreamTimeout => "upstream-timeout",
            LocalReply::UpstreamError => "upstream-error",
            LocalReply::BadRequest => "bad-request",
            LocalReply::BadFraming => "bad-framing",
            LocalReply::CircuitOpen => "circuit-open",
            LocalReply::RateLimited => "rate-limited",
        }
    }

    /// The gRPC status a gRPC client gets for this reply.
    pub(crate) fn grpc_status(self) -> u32 {
        match self {
            LocalReply::NoRoute => 12,                             // UNIMPLEMENTED
            LocalReply::UpstreamTimeout => 4,                      // DEADLINE_EXCEEDED
            LocalReply::BadRequest | LocalReply::BadFraming => 13, // INTERNAL
            LocalReply::UpstreamError => 14,                       // UNAVAILABLE
            LocalReply::NoHealthyEndpoint
            | LocalReply::UpstreamConnect
            | LocalReply::CircuitOpen => 14,
            LocalReply::RateLimited => 8, // RESOURCE_EXHAUSTED
        }
    }

    pub(crate) fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            LocalReply::NoRoute => S::NOT_FOUND,
            LocalReply::NoHealthyEndpoint | LocalReply::CircuitOpen => S::SERVICE_UNAVAILABLE,
            LocalReply::UpstreamConnect | LocalReply::UpstreamError => S::BAD_GATEWAY,
            LocalReply::UpstreamTimeout => S::GATEWAY_TIMEOUT,
            LocalReply::BadRequest | LocalReply::BadFraming => S::BAD_REQUEST,
            LocalReply::RateLimited => S::TOO_MANY_REQUESTS,
        }
    }
}

/// An answer from the agent itself. HTTP clients get a short plain-text body with
/// `x-weir-error` naming the reason; gRPC clients cannot read that, so they get a gRPC
/// "Trailers-Only" answer: HTTP 200 with `grpc-status` and a `grpc-message` saying why.
pub(crate) fn local_reply(grpc: bool, reply: LocalReply, msg: &str) -> Response<Full<Bytes>> {
    let body = if grpc {
        Bytes::new()
    } else {
        Bytes::from(format!("weir: {msg}\n"))
    };
    let mut resp = Response::new(Full::new(body));
    if !grpc {
        *resp.status_mut() = reply.status();
    }
    let h = resp.headers_mut();
    h.insert(X_WEIR_ERROR, HeaderValue::from_static(reply.code()));
    if grpc {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(GRPC_STATUS, HeaderValue::from(reply.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc(&format!("weir: {msg}"))) {
            h.insert(GRPC_MESSAGE, v);
        }
        return resp;
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if reply.status() == StatusCode::BAD_REQUEST {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
