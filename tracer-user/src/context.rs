//! Trace context carried in request headers: W3C `traceparent` (+ `tracestate`), B3 single
//! (`b3`) and B3 multi (`X-B3-TraceId`, `X-B3-SpanId`, `X-B3-ParentSpanId`, `X-B3-Sampled`,
//! `X-B3-Flags`). A request that an instrumented caller already traced joins that trace.
//!
//! Pure functions over header lists (names lowercased, as the HTTP parser gives them).

/// Context read from a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingContext {
    pub trace_id: u128,
    /// The caller's span: the parent of the span this request gets.
    pub parent_span_id: u64,
    /// `Some(false)` when the caller decided not to sample; `None` when it deferred.
    pub sampled: Option<bool>,
    /// W3C `tracestate`, passed on untouched (bounded).
    pub tracestate: Option<String>,
}

const MAX_TRACESTATE: usize = 512;

/// The headers [`extract`] reads, named as it looks them up: what the parser keeps of a request
/// for it, and what the linker watches for in a head.
pub const HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Reads the first valid context, W3C first (it is the standard), then B3 single, then B3 multi.
pub fn extract<N: AsRef<str>, V: AsRef<str>>(headers: &[(N, V)]) -> Option<IncomingContext> {
    extract_from(|name| {
        headers
            .iter()
            .find(|(n, _)| n.as_ref() == name)
            .map(|(_, v)| v.as_ref())
    })
}

/// [`extract`] from headers that `header` looks up by (lowercase) name: the first value of each.
pub fn extract_from<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<IncomingContext> {
    let get = |name: &str| header(name).map(str::trim);
    if let Some(ctx) = get("traceparent").and_then(parse_traceparent) {
        let tracestate = get("tracestate")
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .map(str::to_string);
        return Some(IncomingContext { tracestate, ..ctx });
    }
    if let Some(ctx) = get("b3").and_then(parse_b3_single) {
        return Some(ctx);
    }
    let trace_id = parse_trace_id(get("x-b3-traceid")?)?;
    let parent_span_id = parse_span_id(get("x-b3-spanid")?)?;
    let sampled = match (get("x-b3-flags"), get("x-b3-sampled")) {
        (Some("1"), _) => Some(true),
        (_, Some("1" | "true")) => Some(true),
        (_, Some("0" | "false")) => Some(false),
        _ => None,
    };
    Some(IncomingContext {
        trace_id,
        parent_span_id,
        sampled,
        tracestate: None,
    })
}

/// `version-traceid-parentid-flags`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
pub fn parse_traceparent(value: &str) -> Option<IncomingContext> {
    let mut parts = value.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 || !is_lower_hex(flags) {
        return None;
    }
    let trace_id = parse_trace_id(trace)?;
    let parent_span_id = parse_span_id(span)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(IncomingContext {
        trace_id,
        parent_span_id,
        sampled: Some(flags & 1 == 1),
        tracestate: None,
    })
}

/// `{TraceId}-{SpanId}-{SamplingState}-{ParentSpanId}` (the last two optional), or a lone `0`
/// (deny sampling: no ids, so nothing to join).
pub fn parse_b3_single(value: &str) -> Option<IncomingContext> {
    let mut parts = value.split('-');
    let trace_id = parse_trace_id(parts.next()?)?;
    let parent_span_id = parse_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    Some(IncomingContext {
        trace_id,
        parent_span_id,
        sampled,
        tracestate: None,
    })
}

/// 16 or 32 lowercase hex digits, not all zero.
fn parse_trace_id(s: &str) -> Option<u128> {
    if !(s.len() == 16 || s.len() == 32) || !is_lower_hex(s) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

/// 16 lowercase hex digits, not all zero.
fn parse_span_id(s: &str) -> Option<u64> {
    if s.len() != 16 || !is_lower_hex(s) {
        return None;
    }
    u64::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn w3c_traceparent() {
        let ctx = extract(&h(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]))
        .unwrap();
        assert_eq!(ctx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ctx.parent_span_id, 0x00f067aa0ba902b7);
        assert_eq!(ctx.sampled, Some(true));
        assert_eq!(ctx.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let unsampled =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert_eq!(unsampled.sampled, Some(false));
    }

    #[test]
    fn w3c_invalid_values_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // forbidden version
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  // short
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // extra field in v00
            "garbage",
            "",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A future version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    #[test]
    fn b3_single_and_multi() {
        let single = extract(&h(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .unwrap();
        assert_eq!(single.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(single.parent_span_id, 0xe457b5a2e4d86bd1);
        assert_eq!(single.sampled, Some(true));
        let short = parse_b3_single("a3ce929d0e0e4736-00f067aa0ba902b7-0").unwrap();
        assert_eq!(
            (short.trace_id, short.sampled),
            (0xa3ce929d0e0e4736, Some(false))
        );
        assert_eq!(parse_b3_single("0"), None);
        let multi = extract(&h(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        assert_eq!(multi.trace_id, 0x463ac35c9f6413ad48485a3953bb6124);
        assert_eq!(multi.parent_span_id, 0xa2fb4a1d1a96d312);
        assert_eq!(multi.sampled, Some(true));
        let debug = extract(&h(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]))
        .unwrap();
        assert_eq!(debug.sampled, Some(true));
    }

    #[test]
    fn w3c_wins_and_garbage_falls_through() {
        let both = extract(&h(&[
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]))
        .unwrap();
        assert_eq!(both.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        let fallback = extract(&h(&[
            ("traceparent", "junk"),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1"),
        ]))
        .unwrap();
        assert_eq!(fallback.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(extract(&h(&[("host", "x")])), None);
        assert_eq!(extract(&h(&[("x-b3-traceid", "463ac35c9f6413ad")])), None);
    }
}
