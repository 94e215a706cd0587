//! The lexical checks of single values: host names, header names and values, paths, retry
//! conditions, durations and sizes. Each returns the user-facing message (without the field
//! path, which the caller prefixes); the message *is* the product here, so it stays a
//! `String` rather than a type only ever displayed.

use crate::model::RETRY_CONDITIONS;

/// A host as the agent matches it: lower-case, no port, RFC 1123 labels.
pub(super) fn normalize_host(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("host must not be empty".to_owned());
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(format!("host {raw:?} must not contain spaces"));
    }
    if raw.contains('*') {
        return Err(format!(
            "host {raw:?}: wildcards are not supported; list each host name"
        ));
    }
    if raw.contains('/') {
        return Err(format!(
            "host {raw:?} must be a host name, not a URL or path"
        ));
    }
    if raw.starts_with('[') || raw.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!(
            "host {raw:?}: IPv6 addresses are not supported as hosts"
        ));
    }
    if raw.contains(':') {
        return Err(format!(
            "host {raw:?} must not include a port (the port is ignored when matching)"
        ));
    }
    let host = raw.to_ascii_lowercase();
    if host.len() > 253 || !host.split('.').all(is_dns_label) {
        return Err(format!(
            "host {raw:?} is not a DNS name (dot-separated labels of letters, digits and '-', \
             each 1-63 characters, not starting or ending with '-')"
        ));
    }
    Ok(host)
}

/// An RFC 1123 label, the shape of Service names and of each part of a host name.
pub(super) fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// An RFC 9110 token: the grammar of methods, header names and cookie names.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub(super) fn header_name(name: &str) -> Result<String, String> {
    if is_token(name) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!("{name:?} is not a valid HTTP header name"))
    }
}

/// Visible ASCII, spaces, tabs and obs-text; CR, LF and NUL would split or truncate headers.
pub(super) fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

pub(super) fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        Err(format!("path {path:?} must start with '/'"))
    } else if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        Err(format!(
            "path {path:?} must not contain spaces or control characters"
        ))
    } else {
        Ok(())
    }
}

pub(super) fn is_retry_condition(on: &str) -> bool {
    RETRY_CONDITIONS.contains(&on)
        || on == "429"
        || (on.len() == 3 && on.starts_with('5') && on.bytes().all(|b| b.is_ascii_digit()))
}

/// A positive duration such as `1s`, `250ms` or `1m 30s`, in whole milliseconds; a
/// sub-millisecond remainder rounds up so that a positive duration never becomes 0.
pub(crate) fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 2s, 250ms, 1m 30s)"))?;
    if d.is_zero() {
        return Err(format!("duration {text:?} must be greater than 0"));
    }
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    u64::try_from(ms).map_err(|_| format!("duration {text:?} is too long"))
}

/// A Kubernetes quantity used as a size in bytes: `1000`, `500M`, `64Mi`, `1.5Gi`, `1e9`.
///
/// A fractional byte count rounds up, as Kubernetes' `Quantity::Value` does. Zero is refused:
/// a size of nothing is never what a user meant.
pub(crate) fn parse_quantity(text: &str) -> Result<u64, String> {
    let err = |why: &str| format!("invalid size {text:?}: {why} (examples: 64Mi, 1Gi, 500M, 1000)");
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_len);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err("expected a number"));
    }
    if frac_part.contains('.') {
        return Err(err("more than one '.'"));
    }
    // 38 digits fit in a u128; anything longer is far beyond any byte count anyway.
    if int_part.len() + frac_part.len() > 30 {
        return Err(err("too many digits"));
    }
    let mut mantissa: u128 = 0;
    for b in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa * 10 + u128::from(b - b'0');
    }
    let divisor = 10u128.pow(u32::try_from(frac_part.len()).unwrap_or(0));
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..]
                .parse()
                .map_err(|_| err("the exponent must be a small whole number"))?;
            if exp > 19 {
                return Err(err("too large"));
            }
            10u128.pow(exp)
        }
        "m" | "u" | "n" => return Err(err("a size cannot be a fraction of a byte")),
        _ => {
            return Err(err(
                "unknown suffix; use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E",
            ));
        }
    };
    let scaled = mantissa
        .checked_mul(multiplier)
        .ok_or_else(|| err("too large"))?;
    let bytes = scaled.div_ceil(divisor);
    if bytes == 0 {
        return Err(err("must be greater than 0"));
    }
    u64::try_from(bytes).map_err(|_| err("too large"))
}
