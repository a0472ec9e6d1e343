//! The agent's CPU per request, without the kernel: records of an nginx-like keep-alive
//! exchange (a request read, its response written, as the socket-layer probes report them)
//! go through what the capture thread does with each (decode, connection tracking, HTTP
//! parsing, linking, the span, its JSON), and the time per request is printed.
//! `cargo bench -p tracer-user --bench pipeline`; `cargo xtask bench` puts it in the report.
//!
//! No server, load generator or scheduler is involved, but this machine's own speed still
//! moves the result: runs minutes to an hour apart gave 2.2 to 4.0 µs at best and 3.6 to 4.3
//! µs median (a calibration loop timed beside it moved as much and did not cancel it out).
//! Compare changes in interleaved runs.

use std::{hint::black_box, time::Instant};

use tracer_common::{
    CTX_SAMPLED, CTX_SERVER, CTX_VALID, ConnEvent, DIR_EGRESS, DIR_INGRESS, DataEvent, EventHeader,
    EventKind, ROLE_SERVER, TAIL_LEN, TraceCtx,
};
use tracer_user::{
    agent::is_exported,
    conn::{ConnTracker, TrackerConfig},
    events::decode,
    spans::{Clock, span_of},
};

const REQUEST: &[u8] =
    b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:18080\r\nUser-Agent: xtask-paced-load\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 03:12:48 GMT\r\nContent-Type: text/html\r\nContent-Length: 144\r\nLast-Modified: Fri, 27 Nov 2026 00:09:07 GMT\r\nConnection: keep-alive\r\nETag: \"6b08ca23-90\"\r\nAccept-Ranges: bytes\r\n\r\n<html>cats</html>\n<html>cats</html>\n<html>cats</html>\n<html>cats</html>\n<html>cats</html>\n<html>cats</html>\n<html>cats</html>\n<html>cats</html>\n";

const TGID: u32 = 4242;
const CONNS: u32 = 200;
const REQUESTS: u32 = 200_000;
/// Timed passes; `PIPELINE_PASSES` sets another number (1 under valgrind, whose instruction
/// counts do not move with the machine's speed:
/// `valgrind --tool=cachegrind --cache-sim=no target/release/deps/pipeline-*`).
const REPEATS: usize = 7;

fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: the ABI records are plain integers with no padding (asserted in tracer-common).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn header(kind: EventKind, fd: u32, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u16,
        losses: 0,
        tgid: TGID,
        tid: TGID,
        fd,
        ts_ns,
        conn_id: u64::from(fd),
    }
}

fn open_record(fd: u32) -> Vec<u8> {
    let mut ev = ConnEvent {
        hdr: header(EventKind::ConnOpen, fd, 1),
        family: 2,
        role: ROLE_SERVER,
        local_port: 18080,
        remote_port: 40000 + fd as u16,
        ..Default::default()
    };
    ev.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    ev.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    ev.comm[..5].copy_from_slice(b"nginx");
    bytes_of(&ev)
}

fn data_record(fd: u32, ts_ns: u64, ingress: bool, payload: &[u8], n: u64) -> Vec<u8> {
    let mut tail = [0u8; TAIL_LEN];
    let t = &payload[payload.len().saturating_sub(TAIL_LEN)..];
    tail[..t.len()].copy_from_slice(t);
    let ev = DataEvent {
        hdr: header(EventKind::Data, fd, ts_ns),
        len: payload.len() as u64,
        direction: if ingress { DIR_INGRESS } else { DIR_EGRESS },
        syscall: 0,
        head_len: payload.len() as u32,
        tail_len: t.len() as u32,
        tail,
        // The server span the kernel names at the request's read, as it does for nginx.
        ctx: if ingress {
            TraceCtx {
                trace_id_hi: 0x1234_5678_9abc_def0 ^ n,
                trace_id_lo: 0x0fed_cba9_8765_4321 ^ n.rotate_left(17),
                span_id: 0x5555_aaaa_5555_aaaa ^ n,
                parent_id: 0,
                flags: CTX_VALID | CTX_SAMPLED | CTX_SERVER,
                _pad: 0,
            }
        } else {
            TraceCtx::default()
        },
        // The connection's requests follow one another in its byte stream.
        seq: ((n / u64::from(CONNS)) as u32).wrapping_mul(payload.len() as u32),
        seq_valid: u32::from(ingress),
        start_ns: ts_ns,
    };
    let mut out = bytes_of(&ev);
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// The records of `REQUESTS` exchanges, spread over `CONNS` connections in turn.
fn records() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..CONNS).map(|c| open_record(10 + c)).collect();
    let mut ts = 1_000_000_000u64;
    for n in 0..u64::from(REQUESTS) {
        let fd = 10 + (n % u64::from(CONNS)) as u32;
        out.push(data_record(fd, ts, true, REQUEST, n));
        out.push(data_record(fd, ts + 40_000, false, RESPONSE, n));
        ts += 50_000;
    }
    out
}

/// One pass over the records as the capture thread handles them; returns the JSON bytes made.
fn pass(records: &[Vec<u8>], clock: &Clock) -> usize {
    let mut tracker = ConnTracker::new(TrackerConfig::default());
    let mut finished = Vec::new();
    let mut json = Vec::with_capacity(1 << 20);
    let mut made = 0;
    for record in records {
        let event = decode(record).expect("a well-formed record");
        tracker.handle(&event, &mut finished);
        for (exchange, conn, identity) in finished.drain(..) {
            if is_exported(&exchange, &identity) {
                span_of(&exchange, &conn, &identity, clock).write_json(&mut json);
            }
        }
        if json.len() > (1 << 20) - 4096 {
            made += json.len();
            json.clear();
        }
    }
    made + json.len()
}

fn main() {
    let records = records();
    let clock = Clock::with_offset_ns(0);
    let bytes = pass(&records, &clock);
    assert!(
        bytes > REQUESTS as usize * 500,
        "every exchange should make a span ({bytes} bytes of JSON)"
    );
    let mut best = f64::MAX;
    let mut all = Vec::new();
    let repeats = std::env::var("PIPELINE_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(REPEATS);
    for _ in 0..repeats {
        let t = Instant::now();
        black_box(pass(black_box(&records), &clock));
        let ns = t.elapsed().as_nanos() as f64 / f64::from(REQUESTS);
        best = best.min(ns);
        all.push(ns);
    }
    all.sort_by(f64::total_cmp);
    println!(
        "agent pipeline: {best:.0} ns per request at best, median {:.0} ({repeats} passes of {REQUESTS} requests on {CONNS} connections; {} bytes of JSON a span)",
        all[repeats / 2],
        bytes / REQUESTS as usize
    );
}
