//! The HTTP/1.x matcher on arbitrary streams: any split into syscalls, any capture limit, in
//! both directions, then a close. It must never panic, and its buffers must stay bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_user::protocols::{Direction, Segment, http1::Http1Conn};

fuzz_target!(|data: &[u8]| {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    let mut rest = data;
    let mut ts = 1u64;
    // Each segment: a control byte (direction, capture limit), a length byte, then the bytes.
    while rest.len() >= 2 {
        let (control, len) = (rest[0], rest[1] as usize + 1);
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (bytes, tail) = rest.split_at(take);
        rest = tail;
        let cap = if control & 0x80 != 0 { bytes.len() } else { (control as usize & 0x3f).min(bytes.len()) };
        // Counted length may exceed what was captured (the kernel copied a prefix only).
        let extra = if control & 0x40 != 0 { u64::from(control & 0x3f) * 1000 } else { 0 };
        let seg = Segment {
            dir: if control & 1 == 0 { Direction::Ingress } else { Direction::Egress },
            ts_ns: ts,
            start_ns: ts,
            len: bytes.len() as u64 + extra,
            head: &bytes[..cap],
            tail: &bytes[bytes.len().saturating_sub(16)..],
        };
        conn.feed(&seg, &mut out);
        assert!(conn.buffered_bytes() <= 64 * 1024, "parser buffers must stay bounded");
        ts += 1;
    }
    conn.close(ts, data.first().is_some_and(|b| b & 2 != 0), &mut out);
    for e in &out {
        assert!(e.req_start_ns <= e.end_ns.max(e.req_start_ns));
        assert!(e.request_headers.len() <= 64);
    }
});
