//! The header rules of protocol upgrades through the proxy: which HTTP/1.1 requests ask for
//! one (`Connection: upgrade` + `Upgrade`), what the forwarded request and the client's `101`
//! keep, and the translation between an RFC 8441 extended CONNECT (`:protocol websocket` on
//! an h2 stream) and an HTTP/1.1 WebSocket handshake (RFC 6455 §4). Pure functions, no I/O.
//!
//! The translation follows what Envoy does for h2 → h1 WebSocket (method `GET`, `Upgrade:
//! websocket`, `Connection: upgrade`, a `101` answered as `:status 200`), with one addition:
//! an h2 client sends no `Sec-WebSocket-Key` (RFC 8441 §5), but every HTTP/1.1 WebSocket
//! server insists on one, so the agent makes a fresh key for the origin and checks the
//! origin's `Sec-WebSocket-Accept` against it before it tells the client `200`.

use super::headers::strip_hop_by_hop;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use sha1::{Digest, Sha1};

pub(crate) const SEC_WEBSOCKET_KEY: HeaderName = header::SEC_WEBSOCKET_KEY;
pub(crate) const SEC_WEBSOCKET_ACCEPT: HeaderName = header::SEC_WEBSOCKET_ACCEPT;
pub(crate) const SEC_WEBSOCKET_VERSION: HeaderName = header::SEC_WEBSOCKET_VERSION;
const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");
const WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");
/// RFC 6455 §4.1: the only version a server must accept.
const WEBSOCKET_VERSION: HeaderValue = HeaderValue::from_static("13");
/// RFC 6455 §1.3: appended to the key before hashing.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Upgrade` value of an HTTP/1.1 request that asks to switch protocols: `Upgrade` is
/// present and `Connection` names `upgrade` (RFC 9110 §7.8). An `Upgrade` that offers only
/// `h2c` is not one the proxy forwards: HTTP/2 clients reach the agent with prior knowledge,
/// and the h2c upgrade's `HTTP2-Settings` is hop-by-hop (RFC 9113 deprecates it), so such a
/// request goes on as a plain request with `Upgrade` dropped.
///
/// Called for every HTTP/1.1 request: the usual answer is one missed lookup of `Upgrade`.
#[inline]
pub(crate) fn requested(headers: &HeaderMap) -> Option<&HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"upgrade"));
    let only_h2c = upgrade
        .as_bytes()
        .split(|&b| b == b',')
        .all(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"));
    (asked && !only_h2c).then_some(upgrade)
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The head of an HTTP/1.1 upgrade request as it goes to the origin: hop-by-hop fields (and
/// those `Connection` names) removed as for any request, then `Connection: upgrade` and the
/// client's `Upgrade` put back, since the upgrade is what the client asked the origin for.
pub(crate) fn forward_h1(headers: &mut HeaderMap, upgrade: HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(header::CONNECTION, UPGRADE_TOKEN);
    headers.insert(header::UPGRADE, upgrade);
}

/// The head of an extended CONNECT (`:protocol websocket`) turned into an HTTP/1.1 WebSocket
/// handshake for the origin (the caller makes the method `GET`): hop-by-hop fields removed,
/// `Upgrade: websocket`, `Connection: upgrade`, the fresh `key`, and the client's
/// `Sec-WebSocket-Version` (13 if it sent none). `Sec-WebSocket-Protocol`, `-Extensions` and
/// `Origin` pass as they are.
pub(crate) fn h2_to_h1(headers: &mut HeaderMap, key: HeaderValue) {
    strip_hop_by_hop(headers);
    // Not for a client to choose: the key belongs to the hop the agent opens.
    headers.remove(SEC_WEBSOCKET_KEY);
    headers.remove(SEC_WEBSOCKET_ACCEPT);
    headers.insert(header::CONNECTION, UPGRADE_TOKEN);
    headers.insert(header::UPGRADE, WEBSOCKET);
    headers.insert(SEC_WEBSOCKET_KEY, key);
    if !headers.contains_key(SEC_WEBSOCKET_VERSION) {
        headers.insert(SEC_WEBSOCKET_VERSION, WEBSOCKET_VERSION);
    }
}

/// Why an origin's `101` cannot be passed on to an h2 client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadSwitch {
    NotWebsocket,
    WrongAccept,
}

impl BadSwitch {
    /// Why, for the client's `502` and the log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BadSwitch::NotWebsocket => "the origin switched to a protocol other than websocket",
            BadSwitch::WrongAccept => {
                "the origin's Sec-WebSocket-Accept does not match the key sent"
            }
        }
    }
}

/// The head of an origin's `101` to a translated handshake turned into the h2 client's
/// `200` (RFC 8441 §5): the origin must have switched to `websocket` and proved it read
/// `key`; the HTTP/1.1 handshake fields go, `Sec-WebSocket-Protocol` / `-Extensions` and the
/// origin's other fields stay.
pub(crate) fn h1_101_to_h2(headers: &mut HeaderMap, key: &HeaderValue) -> Result<(), BadSwitch> {
    let websocket = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    if !websocket {
        return Err(BadSwitch::NotWebsocket);
    }
    let accepted = headers
        .get(SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes().trim_ascii() == websocket_accept(key.as_bytes()).as_bytes());
    if !accepted {
        return Err(BadSwitch::WrongAccept);
    }
    strip_hop_by_hop(headers);
    headers.remove(SEC_WEBSOCKET_ACCEPT);
    Ok(())
}

/// The head of an origin's `101` as the HTTP/1.1 client gets it: the origin's fields (the
/// parser already dropped the hop-by-hop ones but `Upgrade`) and `Connection: upgrade`.
/// `None` if the origin named no protocol to switch to (a broken `101`).
pub(crate) fn h1_101_to_h1(headers: &mut HeaderMap) -> Option<()> {
    headers.get(header::UPGRADE)?;
    headers.insert(header::CONNECTION, UPGRADE_TOKEN);
    Some(())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
pub(crate) fn websocket_key() -> HeaderValue {
    let nonce: [u8; 16] = rand::random();
    let mut out = [0u8; 24];
    let n = STANDARD
        .encode_slice(nonce, &mut out)
        .expect("16 bytes encode to 24");
    HeaderValue::from_bytes(&out[..n]).expect("base64 is a valid header value")
}

/// The `Sec-WebSocket-Accept` a server answers to `key` (RFC 6455 §4.2.2).
pub(crate) fn websocket_accept(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID);
    STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn upgrade_needs_both_upgrade_and_the_connection_token() {
        let h = map(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
        ]);
        assert_eq!(requested(&h).expect("upgrade"), "websocket");
        assert!(requested(&map(&[("upgrade", "websocket")])).is_none());
        assert!(requested(&map(&[("connection", "upgrade")])).is_none());
        let h = map(&[("upgrade", "websocket"), ("connection", "close")]);
        assert!(requested(&h).is_none());
        // Connection may come as several lines.
        let h = map(&[
            ("upgrade", "foo/2"),
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
        ]);
        assert_eq!(requested(&h).expect("upgrade"), "foo/2");
    }

    #[test]
    fn an_h2c_only_upgrade_is_not_forwarded_as_one() {
        let h = map(&[
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
        ]);
        assert!(requested(&h).is_none());
        let h = map(&[("upgrade", "h2c, websocket"), ("connection", "upgrade")]);
        assert!(requested(&h).is_some());
    }

    #[test]
    fn forwarded_upgrade_keeps_upgrade_and_drops_other_hop_by_hop_fields() {
        let mut h = map(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("x-kept", "1"),
        ]);
        forward_h1(&mut h, HeaderValue::from_static("websocket"));
        assert_eq!(h.get("connection").expect("connection"), "upgrade");
        assert_eq!(h.get("upgrade").expect("upgrade"), "websocket");
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(
            h.get("sec-websocket-key").expect("key"),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn accept_matches_the_rfc_6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn generated_keys_are_16_random_bytes_in_base64() {
        let a = websocket_key();
        let b = websocket_key();
        assert_ne!(a, b);
        let raw = STANDARD.decode(a.as_bytes()).expect("base64");
        assert_eq!(raw.len(), 16);
    }

    #[test]
    fn extended_connect_becomes_a_websocket_handshake() {
        let mut h = map(&[
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-key", "chosen-by-client"),
            ("origin", "http://a.test"),
            ("te", "trailers"),
        ]);
        let key = websocket_key();
        h2_to_h1(&mut h, key.clone());
        assert_eq!(h.get("upgrade").expect("upgrade"), "websocket");
        assert_eq!(h.get("connection").expect("connection"), "upgrade");
        assert_eq!(h.get("sec-websocket-key").expect("key"), &key);
        assert_eq!(h.get("sec-websocket-version").expect("version"), "13");
        assert_eq!(h.get("sec-websocket-protocol").expect("protocol"), "chat");
        assert_eq!(
            h.get("sec-websocket-extensions").expect("ext"),
            "permessage-deflate"
        );
        assert_eq!(h.get("origin").expect("origin"), "http://a.test");
        assert!(!h.contains_key("te"));
        // A client that sends no version gets 13, the only one servers must speak.
        let mut h = HeaderMap::new();
        h2_to_h1(&mut h, websocket_key());
        assert_eq!(h.get("sec-websocket-version").expect("version"), "13");
    }

    #[test]
    fn an_origins_101_becomes_200_fields_only_if_it_proves_the_key() {
        let key = websocket_key();
        let accept = websocket_accept(key.as_bytes());
        let mut h = map(&[
            ("upgrade", "WebSocket"),
            ("sec-websocket-accept", &accept),
            ("sec-websocket-protocol", "chat"),
            ("x-origin", "1"),
        ]);
        assert_eq!(h1_101_to_h2(&mut h, &key), Ok(()));
        assert!(!h.contains_key("upgrade"));
        assert!(!h.contains_key("sec-websocket-accept"));
        assert_eq!(h.get("sec-websocket-protocol").expect("protocol"), "chat");
        assert!(h.contains_key("x-origin"));

        let mut wrong = map(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ]);
        assert_eq!(h1_101_to_h2(&mut wrong, &key), Err(BadSwitch::WrongAccept));
        let mut other = map(&[("upgrade", "irc"), ("sec-websocket-accept", &accept)]);
        assert_eq!(h1_101_to_h2(&mut other, &key), Err(BadSwitch::NotWebsocket));
        let mut none = map(&[("upgrade", "websocket")]);
        assert_eq!(h1_101_to_h2(&mut none, &key), Err(BadSwitch::WrongAccept));
    }

    #[test]
    fn an_h1_101_gets_connection_upgrade_and_needs_an_upgrade_field() {
        let mut h = map(&[("upgrade", "websocket"), ("x-origin", "1")]);
        assert_eq!(h1_101_to_h1(&mut h), Some(()));
        assert_eq!(h.get("connection").expect("connection"), "upgrade");
        assert!(h1_101_to_h1(&mut HeaderMap::new()).is_none());
    }
}
