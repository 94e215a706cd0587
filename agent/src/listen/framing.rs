//! Strict request framing for HTTP/1.1 (RFC 9112 §6.1): what hyper's parser lets through and
//! weir refuses — `Transfer-Encoding` other than exactly `chunked`, and a head carrying both
//! `Content-Length` and `Transfer-Encoding` (the CL.TE / TE.CL smuggling shapes).
//!
//! hyper rejects an invalid or conflicting `Content-Length` and a final coding other than
//! `chunked` itself (400), but when both framings are present it decodes the body as chunked
//! and drops `Content-Length` from the head it hands over, so the service cannot see the
//! ambiguity. [`FramingScan`] therefore watches the raw bytes as they are read: it looks only
//! at the first bytes of lines that start like one of the two fields (skipping to the next
//! `\n` otherwise) and raises a
//! per-connection flag when a head had both fields. It cannot tell head lines from body lines,
//! so a body that itself holds both a `content-length:` and a `transfer-encoding:` line
//! makes the connection's next chunked request a 400 — a false alarm on the safe side.

use http::HeaderMap;
use http::header::TRANSFER_ENCODING;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";
/// The longest prefix that matters ("transfer-encoding:").
const PREFIX: usize = 18;

/// Per-connection scanner of request lines (see the module doc).
#[derive(Debug)]
pub(crate) struct FramingScan {
    prefix: [u8; PREFIX],
    len: u8,
    /// Past the prefix of the current line: skipping to its end.
    skipping: bool,
    cl: bool,
    te: bool,
    ambiguous: Arc<AtomicBool>,
}

impl FramingScan {
    pub(crate) fn new(ambiguous: Arc<AtomicBool>) -> Self {
        Self {
            prefix: [0; PREFIX],
            len: 0,
            skipping: false,
            cl: false,
            te: false,
            ambiguous,
        }
    }

    /// Feeds bytes read from the client, in order.
    pub(crate) fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skipping {
                match memchr::memchr(b'\n', bytes) {
                    Some(i) => {
                        self.end_line();
                        bytes = &bytes[i + 1..];
                    }
                    None => return,
                }
                continue;
            }
            let b = bytes[0];
            // A line's first byte decides whether it can matter: only `content-length`,
            // `transfer-encoding` and the blank line ending a head do. Every other line
            // (the request line, `Host`, most headers, body lines) is skipped with one
            // `memchr`, which keeps the scan to a few dozen instructions per request.
            if self.len == 0 && !matches!(b, b'c' | b'C' | b't' | b'T' | b'\r' | b'\n') {
                self.skipping = true;
                continue;
            }
            bytes = &bytes[1..];
            if b == b'\n' {
                self.end_line();
            } else if (self.len as usize) < PREFIX {
                self.prefix[self.len as usize] = b.to_ascii_lowercase();
                self.len += 1;
            } else {
                self.skipping = true;
            }
        }
    }

    fn end_line(&mut self) {
        let line = &self.prefix[..self.len as usize];
        if line.is_empty() || line == b"\r" {
            // End of a head (or a blank line in a body: harmless, it only resets).
            if self.cl && self.te {
                self.ambiguous.store(true, Ordering::Relaxed);
            }
            self.cl = false;
            self.te = false;
        } else if line.starts_with(CL) {
            self.cl = true;
        } else if line.starts_with(TE) {
            self.te = true;
        }
        self.len = 0;
        self.skipping = false;
    }
}

/// Why a request's framing is refused, if it is. Only requests with `Transfer-Encoding` pay
/// more than one header lookup.
pub(crate) fn bad_framing(headers: &HeaderMap, ambiguous: &AtomicBool) -> Option<&'static str> {
    let mut te = headers.get_all(TRANSFER_ENCODING).iter();
    let first = te.next()?;
    if te.next().is_some()
        || !first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
    {
        return Some("Transfer-Encoding must be exactly \"chunked\"");
    }
    if ambiguous.load(Ordering::Relaxed) {
        return Some("both Content-Length and Transfer-Encoding");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ambiguous_after(chunks: &[&[u8]]) -> bool {
        let flag = Arc::new(AtomicBool::new(false));
        let mut s = FramingScan::new(flag.clone());
        for c in chunks {
            s.scan(c);
        }
        flag.load(Ordering::Relaxed)
    }

    #[test]
    fn both_framings_in_one_head_are_ambiguous_in_any_order_and_split() {
        let cl_te = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n";
        let te_cl = b"POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\ncontent-length: 3\r\n\r\n";
        assert!(ambiguous_after(&[cl_te]));
        assert!(ambiguous_after(&[te_cl]));
        // Split at every byte: the scanner keeps its state across reads.
        for i in 0..te_cl.len() {
            assert!(ambiguous_after(&[&te_cl[..i], &te_cl[i..]]), "split at {i}");
        }
    }

    #[test]
    fn one_framing_per_head_is_fine_across_requests() {
        let a = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        let b = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(!ambiguous_after(&[a, b]));
        let long = [b'x'; 300];
        assert!(!ambiguous_after(&[
            &long,
            b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
    }

    #[test]
    fn only_exactly_chunked_passes() {
        let no = AtomicBool::new(false);
        let mut h = HeaderMap::new();
        assert_eq!(bad_framing(&h, &no), None);
        h.insert(TRANSFER_ENCODING, "Chunked".parse().expect("value"));
        assert_eq!(bad_framing(&h, &no), None);
        assert!(bad_framing(&h, &AtomicBool::new(true)).is_some());
        for v in ["gzip, chunked", "chunked, gzip", "identity"] {
            h.insert(TRANSFER_ENCODING, v.parse().expect("value"));
            assert!(bad_framing(&h, &no).is_some(), "{v}");
        }
        h.insert(TRANSFER_ENCODING, "chunked".parse().expect("value"));
        h.append(TRANSFER_ENCODING, "chunked".parse().expect("value"));
        assert!(bad_framing(&h, &no).is_some());
    }
}
