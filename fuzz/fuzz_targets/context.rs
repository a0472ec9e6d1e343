//! Trace context headers (traceparent, b3, X-B3-*) from arbitrary header lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let headers: Vec<(String, String)> = text
        .split('\n')
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if let Some(ctx) = tracer_user::context::extract(&headers) {
        assert!(ctx.trace_id != 0, "an all-zero trace id is invalid");
    }
});
