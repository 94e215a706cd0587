//! gRPC over HTTP/2 as a proxy sees it: telling a call from a plain request, its deadline
//! (`grpc-timeout`), a status in a response head (Trailers-Only), and `grpc-message`
//! encoding. A leaf.

use http::header::{self, HeaderMap, HeaderName};
use std::time::Duration;

pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Whether the request is a gRPC call (`content-type: application/grpc[+proto|…]`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The call's `grpc-timeout` (e.g. `300m`, `2S`), if it has a valid one.
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` of a response whose head already carries it (a Trailers-Only answer,
/// which is how servers fail a call before sending any message).
pub(crate) fn head_grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec): everything outside printable
/// ASCII, and `%` itself.
pub(crate) fn percent_encode_grpc(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
