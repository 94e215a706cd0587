//! The byte form of a stored URI for the lower tiers (disk files, Redis values): the key,
//! then every variant's numbers, packed head and body.
//!
//! Hand-written rather than serde + a format crate: a variant is already a packed head and
//! a body (two byte blocks) plus eight integers, so a fixed little-endian layout with
//! lengths is all it takes, and decoding hands out slices of the one buffer read (no copy
//! of bodies). Every length is checked, so a truncated or foreign file decodes to `None`.

use crate::cache::entry::{Entry, Key, KeyRef, Variant, VariantParts};
use bytes::{Buf, BufMut, Bytes};
use http::StatusCode;

/// Format tag and version: a file of another version is ignored (and replaced).
const MAGIC: &[u8; 4] = b"WRC1";

/// Fixed bytes per variant besides head and body.
const VARIANT_FIXED: usize = 8 + 4 * 5 + 2 + 1 + 4 + 4;

/// Encodes `entry` stored under `key`.
pub(crate) fn encode(key: &Key, entry: &Entry) -> Vec<u8> {
    let k = key.as_key_ref();
    let key_len = k.host().len() + k.path_and_query().len();
    let size = MAGIC.len()
        + 4
        + key_len
        + 1
        + entry
            .variants()
            .iter()
            .map(|v| VARIANT_FIXED + v.head_bytes().len() + v.body().len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.put_slice(MAGIC);
    out.put_u16_le(u16::try_from(k.host().len()).unwrap_or(u16::MAX));
    out.put_u16_le(u16::try_from(k.path_and_query().len()).unwrap_or(u16::MAX));
    out.put_slice(k.host().as_bytes());
    out.put_slice(k.path_and_query().as_bytes());
    out.put_u8(u8::try_from(entry.variants().len()).unwrap_or(u8::MAX));
    for v in entry.variants() {
        let p = v.parts();
        out.put_u64_le(p.stored_at_ms);
        out.put_u32_le(p.age_secs);
        out.put_u32_le(p.lifetime_secs);
        out.put_u32_le(p.vary_len);
        out.put_u32_le(p.swr_secs);
        out.put_u32_le(p.sie_secs);
        out.put_u16_le(p.status.as_u16());
        out.put_u8(p.flags);
        out.put_u32_le(u32::try_from(p.head.len()).unwrap_or(u32::MAX));
        out.put_slice(&p.head);
        out.put_u32_le(u32::try_from(p.body.len()).unwrap_or(u32::MAX));
        out.put_slice(&p.body);
    }
    out
}

/// The host and path lengths from the first 8 bytes of an encoded entry.
pub(crate) fn key_lengths(head: &[u8; 8]) -> Option<(usize, usize)> {
    if &head[..4] != MAGIC {
        return None;
    }
    let host = u16::from_le_bytes([head[4], head[5]]);
    let pq = u16::from_le_bytes([head[6], head[7]]);
    Some((usize::from(host), usize::from(pq)))
}

/// Decodes what [`encode`] wrote, if it was written for `key`; heads and bodies are slices
/// of `buf`.
pub(crate) fn decode(key: &KeyRef<'_>, mut buf: Bytes) -> Option<Entry> {
    let whole = buf.clone();
    if buf.len() < MAGIC.len() + 4 || &buf[..MAGIC.len()] != MAGIC {
        return None;
    }
    buf.advance(MAGIC.len());
    let host_len = usize::from(buf.get_u16_le());
    let pq_len = usize::from(buf.get_u16_le());
    if buf.len() < host_len + pq_len + 1 {
        return None;
    }
    // Files are named by a hash of the key: a collision is told apart here.
    if &buf[..host_len] != key.host().as_bytes()
        || &buf[host_len..host_len + pq_len] != key.path_and_query().as_bytes()
    {
        return None;
    }
    buf.advance(host_len + pq_len);
    let n = buf.get_u8();
    let mut variants = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        if buf.len() < VARIANT_FIXED - 4 {
            return None;
        }
        let stored_at_ms = buf.get_u64_le();
        let age_secs = buf.get_u32_le();
        let lifetime_secs = buf.get_u32_le();
        let vary_len = buf.get_u32_le();
        let swr_secs = buf.get_u32_le();
        let sie_secs = buf.get_u32_le();
        let status = StatusCode::from_u16(buf.get_u16_le()).ok()?;
        let flags = buf.get_u8();
        let head = take(&whole, &mut buf)?;
        let body = take(&whole, &mut buf)?;
        if vary_len as usize > head.len() {
            return None;
        }
        variants.push(Variant::new(VariantParts {
            head,
            vary_len,
            body,
            stored_at_ms,
            age_secs,
            lifetime_secs,
            status,
            flags,
            swr_secs,
            sie_secs,
        }));
    }
    if !buf.is_empty() {
        return None;
    }
    let mut it = variants.into_iter().rev();
    let mut entry = Entry::single(it.next()?);
    for v in it {
        entry = entry.with(v);
    }
    Some(entry)
}

/// A length-prefixed block, as a slice of `whole` (no copy).
fn take(whole: &Bytes, buf: &mut Bytes) -> Option<Bytes> {
    if buf.len() < 4 {
        return None;
    }
    let len = buf.get_u32_le() as usize;
    if buf.len() < len {
        return None;
    }
    let start = whole.len() - buf.len();
    buf.advance(len);
    Some(whole.slice(start..start + len))
}
