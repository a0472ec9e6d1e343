//! The postgres matcher on arbitrary streams: any split into syscalls, any capture limit, both
//! directions, then a close. It must never panic, and what it reports must be well formed.
#![no_main]

mod segments;

use libfuzzer_sys::fuzz_target;
use tracer_user::protocols::postgres::PgConn;

fuzz_target!(|data: &[u8]| {
    let mut conn = PgConn::new();
    let mut out = Vec::new();
    let end = segments::for_each_segment(data, |seg| conn.feed(seg, &mut out));
    conn.close(end, data.first().is_some_and(|b| b & 2 != 0), &mut out);
    for e in &out {
        assert!(e.req_start_ns <= e.end_ns, "{e:?}");
        assert!(e.statement.len() <= 8192, "statements are bounded");
        assert!(e.operation.chars().count() <= 64, "operations are bounded: {:?}", e.operation);
    }
});
