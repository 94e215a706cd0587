//! Retrying: the route's retry policy ([`RetryRt`], parsed once per table) and the
//! classification of one try's result into "did the endpoint fail" and "may it be tried
//! again" ([`classify`]). Transport details stay in `upstream`: its errors carry a
//! [`RetryKind`], and only that kind is looked at here.

use crate::http::grpc::head_grpc_status;
use crate::upstream::{self, Lease, RespBody, RetryKind};
use http::Response;
use std::time::Duration;
use weir_proto::v1 as pb;

/// Retry settings, parsed once.
#[derive(Debug, Clone, Default)]
pub(crate) struct RetryRt {
    /// Extra tries after the first.
    pub(crate) attempts: u32,
    pub(crate) on_connect_failure: bool,
    pub(crate) on_reset: bool,
    pub(crate) on_timeout: bool,
    pub(crate) on_5xx: bool,
    pub(crate) on_gateway_error: bool,
    /// Specific statuses, e.g. 503.
    pub(crate) on_status: Box<[u16]>,
    /// gRPC status codes (numbers) that may be retried.
    pub(crate) on_grpc: Box<[u32]>,
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) budget_percent: u32,
}

impl RetryRt {
    /// With no policy: one more try when the connection could not even be opened, which is
    /// safe for any request because nothing reached the upstream.
    pub(super) fn default_policy() -> Self {
        Self {
            attempts: 1,
            on_connect_failure: true,
            budget_percent: 20,
            ..Self::default()
        }
    }

    pub(super) fn from_proto(r: &pb::RetryPolicy) -> Self {
        let mut out = Self {
            attempts: r.attempts,
            per_try_timeout: (r.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(r.per_try_timeout_ms)),
            budget_percent: if r.budget_percent == 0 {
                20
            } else {
                r.budget_percent
            },
            ..Self::default()
        };
        let mut status = Vec::new();
        let mut grpc = Vec::new();
        for on in &r.on {
            match on.as_str() {
                "connect-failure" => out.on_connect_failure = true,
                "reset" | "refused-stream" => out.on_reset = true,
                "timeout" => out.on_timeout = true,
                "5xx" => out.on_5xx = true,
                "gateway-error" => out.on_gateway_error = true,
                "cancelled" => grpc.push(1),
                "deadline-exceeded" => grpc.push(4),
                "resource-exhausted" => grpc.push(8),
                "internal" => grpc.push(13),
                "unavailable" => grpc.push(14),
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        status.push(code);
                    }
                }
            }
        }
        out.on_status = status.into_boxed_slice();
        out.on_grpc = grpc.into_boxed_slice();
        out
    }

    /// Whether an upstream answer with `status` may be retried.
    pub(crate) fn retry_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || self.on_status.contains(&status)
    }

    /// Whether a retry may be wanted after the request was handed to a connection (so its
    /// head must be kept). Connect failures are not among these: the pool gives such a
    /// request back untouched.
    pub(crate) fn resends_after_send(&self, idempotent: bool, grpc: bool) -> bool {
        (self.on_reset && (idempotent || grpc))
            || (idempotent
                && (self.on_timeout
                    || self.on_5xx
                    || self.on_gateway_error
                    || !self.on_status.is_empty()))
            || (grpc && !self.on_grpc.is_empty())
    }
}

/// What one try's result means: whether it counts against the endpoint's health, and
/// whether the policy allows another try (the caller still checks the body, the budget and
/// the deadline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) failure: bool,
    pub(crate) retryable: bool,
}

/// Classifies one try's result (`None`: the try timed out).
#[inline]
pub(crate) fn classify(
    result: Option<&Result<(Response<RespBody>, Lease), upstream::Error>>,
    policy: &RetryRt,
    idempotent: bool,
    grpc: bool,
) -> Verdict {
    let (failure, retryable) = match result {
        Some(Ok((resp, _))) => {
            let status = resp.status().as_u16();
            if grpc {
                // A failed call before any message: a Trailers-Only answer.
                let code = head_grpc_status(resp.headers());
                let failed = status >= 500 || matches!(code, Some(4 | 8 | 13 | 14 | 15));
                (failed, code.is_some_and(|c| policy.on_grpc.contains(&c)))
            } else {
                (status >= 500, policy.retry_status(status) && idempotent)
            }
        }
        Some(Err(e)) => match e.retry_kind() {
            RetryKind::Connect => (true, policy.on_connect_failure),
            // As safe to send again as a connect failure, and no fault of the endpoint.
            RetryKind::Refused => (false, true),
            RetryKind::Reset => (true, policy.on_reset && (idempotent || grpc)),
            RetryKind::ClientBody => (false, false),
        },
        None => (true, policy.on_timeout && idempotent),
    };
    Verdict { failure, retryable }
}
