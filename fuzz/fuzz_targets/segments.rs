//! Splits fuzzer input into syscall segments for the stream parsers: each segment is a control
//! byte (direction, capture limit, uncaptured length), a length byte, then the bytes.
use tracer_user::protocols::{Direction, Segment};

pub fn for_each_segment(data: &[u8], mut f: impl FnMut(&Segment<'_>)) -> u64 {
    let mut rest = data;
    let mut ts = 1u64;
    while rest.len() >= 2 {
        let (control, len) = (rest[0], rest[1] as usize + 1);
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (bytes, tail) = rest.split_at(take);
        rest = tail;
        let cap = if control & 0x80 != 0 {
            bytes.len()
        } else {
            (control as usize & 0x3f).min(bytes.len())
        };
        // The counted length may exceed what was captured (the kernel copied a prefix only).
        let extra = if control & 0x40 != 0 { u64::from(control & 0x3f) * 1000 } else { 0 };
        let seg = Segment {
            dir: if control & 1 == 0 { Direction::Ingress } else { Direction::Egress },
            ts_ns: ts,
            start_ns: ts,
            len: bytes.len() as u64 + extra,
            head: &bytes[..cap],
            tail: &bytes[bytes.len().saturating_sub(16)..],
        };
        f(&seg);
        ts += 1;
    }
    ts
}
