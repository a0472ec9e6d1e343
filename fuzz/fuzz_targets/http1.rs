//! The HTTP/1.x matcher on arbitrary streams: any split into syscalls, any capture limit, in
//! both directions, then a close. It must never panic, and its buffers must stay bounded.
#![no_main]

mod segments;

use libfuzzer_sys::fuzz_target;
use tracer_user::protocols::http1::Http1Conn;

fuzz_target!(|data: &[u8]| {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    let end = segments::for_each_segment(data, |seg| {
        conn.feed(seg, &mut out);
        assert!(conn.buffered_bytes() <= 64 * 1024, "parser buffers must stay bounded");
    });
    conn.close(end, data.first().is_some_and(|b| b & 2 != 0), &mut out);
    for e in &out {
        assert!(e.req_start_ns <= e.end_ns.max(e.req_start_ns));
        assert!(e.request_headers().count() <= 64);
    }
});
