//! Trace context in the kernel: naming spans at the moment requests move, and writing the
//! context into outgoing HTTP/1.x requests.
//!
//! Injection must happen inside the `sendmsg` that carries the request, so the ids cannot wait
//! for the agent: when a traced thread reads a request (`server_request`), the kernel names its
//! server span, taking the trace from an incoming `traceparent` when there is one, and keeps
//! that context for the thread until it writes the response. When the thread then sends a
//! request on a connection in the socket map, the sk_msg program names the client span as the
//! child of that context and inserts `traceparent` (or `b3`) after the request line. Both
//! identities travel to the agent on the data events, and the agent adopts them.
//!
//! Only connections made by traced processes get into the socket map (`tracer_sockops`), so
//! untraced processes never go through the sk_msg path. Headers are only added when the whole
//! request head is in the first bytes of one send and does not carry the header already; a
//! request the program is unsure about is sent untouched.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action::SK_PASS,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_socket_cookie,
        generated::{bpf_loop, bpf_msg_pull_data, bpf_probe_read_kernel as probe_read_kernel_raw},
    },
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkMsgContext, SockOpsContext},
};
use tracer_common::{
    CTX_AMBIGUOUS, CTX_FROM_HEADER, CTX_INJECTED, CTX_SAMPLED, CTX_SERVER, CTX_VALID, DIR_EGRESS,
    EventHeader, EventKind, INJECT_B3, INJECT_OFF, MAX_CAPTURE, SavedArgs, SockKey, TraceCtx, stat,
};

use crate::{ACTIVE, SCRATCH, count, is_traced, syscalls::verifier_bound};

/// Bytes of a request looked at for the header block (its end must be inside).
const WINDOW: usize = 1024;
/// Requests up to this size (header included) are sent as one piece after the header is added:
/// loopback's MSS (64 KiB), so that no request split in two leaves as two segments short of an
/// MSS each (see `write_header`).
const WHOLE_PULL_MAX: usize = 65536;
/// `traceparent: 00-{32}-{16}-01\r\n`
const TRACEPARENT_LEN: usize = 13 + 3 + 32 + 1 + 16 + 3 + 2;
/// `b3: {32}-{16}-1\r\n`
const B3_LEN: usize = 4 + 32 + 1 + 16 + 2 + 2;
const AF_INET: u32 = 2;

/// What a thread is serving: set when it reads a request, cleared when it writes a response
/// on that connection.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadCtx {
    pub ctx: TraceCtx,
    pub conn_id: u64,
    /// When the request was read (per-turn sampling tells an older mark of the thread's from
    /// the request it serves now, see `turns`).
    pub read_ns: u64,
}

/// By tid: a slot per thread that served a request, removed when the thread exits
/// (`tracer_sched_exit`). Between requests the slot stays with `ctx.flags` 0 (nothing served):
/// writing through a looked-up value is several times cheaper than inserting and deleting an
/// entry per request. A plain hash, cheaper than LRU.
#[map]
pub static THREAD_CTX: HashMap<u32, ThreadCtx> = HashMap::with_max_entries(65536, 0);

/// Connections of traced processes whose sends the sk_msg program sees.
#[map]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// Sockets in `SOCKETS` found in blocking mode at a send, for the agent to take out of the
/// map (a program cannot: only the agent and sock_ops may delete from a socket map).
#[map]
static BLOCKING: LruHashMap<SockKey, u8> = LruHashMap::with_max_entries(4096, 0);

/// `O_NONBLOCK` in `file.f_flags`.
const O_NONBLOCK: u32 = 0o4000;

/// Whether the socket at address `sk` is in blocking mode (its file lacks `O_NONBLOCK`), or
/// cannot be told. Such a socket is kept out of the socket map: the kernel gives a socket in
/// a socket map its own receive path (`tcp_bpf_recvmsg`), which waits for data once and
/// returns EAGAIN when woken without any, so a blocking read interrupted by a signal (a
/// profiler's timer, SIGCHLD) or woken as send space frees up fails with EAGAIN where it
/// would have gone on waiting. To a program that read without O_NONBLOCK that is an error; a
/// non-blocking socket's reads return EAGAIN by design, and its owner polls again.
#[inline(always)]
fn blocking(sk: u64) -> bool {
    use crate::sockets::read_at;
    if offset!(valid) == 0 {
        return true;
    }
    // SAFETY: probe reads, which fail cleanly on a bad address.
    unsafe {
        let Ok(socket) = read_at::<u64>(sk as *const u8, offset!(sk_socket)) else {
            return true;
        };
        let Ok(file) = read_at::<u64>(socket as *const u8, offset!(socket_file)) else {
            return true;
        };
        match read_at::<u32>(file as *const u8, offset!(file_flags)) {
            Ok(flags) => socket == 0 || file == 0 || flags & O_NONBLOCK == 0,
            Err(_) => true,
        }
    }
}

/// Wakes the agent at once to take a socket out of `SOCKETS`: until then its blocking reads
/// take the socket map's receive path. Not an event of any connection: if the ring is full it
/// is not counted lost (the agent's next timed drain takes the socket out).
#[inline(always)]
fn wake_agent() {
    let hdr = EventHeader {
        kind: EventKind::InjectRelease as u16,
        // SAFETY: no preconditions.
        ts_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
        ..Default::default()
    };
    let _ = crate::EVENTS.output::<EventHeader>(&hdr, crate::BPF_RB_FORCE_WAKEUP);
}

/// Sockets whose connect() a traced thread made, by socket cookie, until established.
#[map]
static CONNECTING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// Destination ports that get headers (when `Config::inject_filter_ports`).
#[map]
static INJECT_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(256, 0);

/// Destination networks that get headers (when `Config::inject_filter_nets`); IPv4 as mapped.
#[map]
static INJECT_NETS: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(256, 1 /* BPF_F_NO_PREALLOC */);

/// Per-CPU copy of the head of the message being sent.
#[repr(C)]
pub struct MsgScratch {
    pub buf: [u8; 2 * WINDOW],
    /// The header line being written (too large for the 512-byte stack with the rest).
    pub line: [u8; 128],
    /// See `address_of`.
    address: u64,
}

/// The address of the socket an sk_msg program is given, as a number: the verifier allows no
/// arithmetic on that pointer, and the probe reads of the socket's fields need its address
/// plus their offsets. A word written to memory and read back is a number to it.
#[inline(always)]
fn address_of(sk: *mut core::ffi::c_void) -> Option<u64> {
    let scratch = MSG_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot owned for the program's run; volatile, so that the compiler keeps
    // the round trip.
    unsafe {
        let slot = &raw mut (*scratch).address;
        core::ptr::write_volatile(slot, sk as u64);
        Some(core::ptr::read_volatile(slot))
    }
}

#[map]
static MSG_SCRATCH: PerCpuArray<MsgScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU state of the id generator (`random_u64`); 0 until first used on that CPU.
#[map]
static ID_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A 64-bit id for thread `tid`: SplitMix64 over a per-CPU counter seeded from the kernel's
/// generator on first use. A server request needs three of these; as helper calls (two 32-bit
/// draws each) they cost more than the rest of naming it. Ids need to be distinct, not
/// unpredictable: each CPU's counter never repeats within 2^64 draws, random seeds keep CPUs
/// and agent runs apart, and the thread id (through a bijection) keeps apart two threads that
/// read the same counter value when one preempted the other between read and write.
#[inline(always)]
fn random_u64(tid: u32) -> u64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    // SAFETY: no preconditions.
    let draw = || unsafe { ((bpf_get_prandom_u32() as u64) << 32) | bpf_get_prandom_u32() as u64 };
    let Some(state) = ID_STATE.get_ptr_mut(0) else {
        return draw();
    };
    // SAFETY: per-CPU slot; see above for a preempting program on the same CPU.
    let state = unsafe { &mut *state };
    if *state == 0 {
        *state = draw();
    }
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) ^ (tid as u64).wrapping_mul(GOLDEN)
}

#[inline(always)]
fn nonzero_random(tid: u32) -> u64 {
    let v = random_u64(tid);
    if v == 0 { 1 } else { v }
}

#[inline(always)]
fn starts_with_method(b: &[u8]) -> bool {
    if b.len() < 8 {
        return false;
    }
    matches!(
        (b[0], b[1], b[2], b[3], b[4]),
        (b'G', b'E', b'T', b' ', _)
            | (b'P', b'O', b'S', b'T', b' ')
            | (b'P', b'U', b'T', b' ', _)
            | (b'H', b'E', b'A', b'D', b' ')
            | (b'D', b'E', b'L', b'E', b'T')
            | (b'P', b'A', b'T', b'C', b'H')
            | (b'O', b'P', b'T', b'I', b'O')
    )
}

#[inline(always)]
fn starts_with_status(b: &[u8]) -> bool {
    b.len() >= 8 && b[0] == b'H' && b[1] == b'T' && b[2] == b'T' && b[3] == b'P' && b[4] == b'/'
}

/// Lowercase hex digit values, 0xff for anything else. A table, not a `match`: two ranges
/// per digit make two verifier paths per digit, 2^48 for a traceparent.
static HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

#[inline(always)]
fn hex_value(c: u8) -> Option<u64> {
    let v = HEX_VALUE[c as usize];
    if v == 0xff { None } else { Some(v as u64) }
}

/// Parses `n` (≤ 16) lowercase hex digits at `buf[at..]`.
#[inline(always)]
fn parse_hex(buf: &[u8], at: usize, n: usize) -> Option<u64> {
    let mut v: u64 = 0;
    for k in 0..16 {
        if k >= n {
            break;
        }
        let i = at + k;
        if i >= buf.len() {
            return None;
        }
        v = (v << 4) | hex_value(buf[i])?;
    }
    Some(v)
}

/// What the header scan found in a request head.
struct HeadScan {
    /// Offset just past the request line's `\n`.
    line_end: usize,
    /// The head ends (`\r\n\r\n`) inside the scanned bytes.
    complete: bool,
    /// A `traceparent`, `b3` or `x-b3-traceid` header is there already.
    has_context: bool,
    /// Parsed `traceparent`: trace hi, lo, parent span, sampled.
    traceparent: Option<(u64, u64, u64, bool)>,
}

#[inline(always)]
fn lower(c: u8) -> u8 {
    if c.is_ascii_uppercase() { c + 32 } else { c }
}

#[inline(always)]
fn name_is(buf: &[u8], at: usize, name: &[u8]) -> bool {
    if at + name.len() > buf.len() {
        return false;
    }
    let mut k = 0;
    while k < name.len() {
        if lower(buf[at + k]) != name[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// What one head scan looks at, passed to the `bpf_loop` callback; read-only there.
#[repr(C)]
struct ScanState {
    /// Which per-CPU buffer holds the head: `SRC_EVENT` (the data event's payload) or
    /// `SRC_MSG` (the sk_msg copy).
    source: u64,
    len: u64,
}

/// Where `scan_head`'s search is and what it found. In a map, not on the stack: the verifier
/// tracks stack values exactly, and values it knows step by step made it verify the loop body
/// once per position and what followed the loop once per result (360k instructions and 1.5 s
/// for the sk_msg program); a map value is just a bounded unknown.
#[repr(C)]
struct ScanRun {
    pos: u64,
    line_end: u64,
    complete: u64,
    has_context: u64,
    tp_found: u64,
    tp_hi: u64,
    tp_lo: u64,
    tp_span: u64,
    tp_sampled: u64,
}

#[map]
static SCAN_RUN: PerCpuArray<ScanRun> = PerCpuArray::with_max_entries(1, 0);

const SRC_EVENT: u64 = 0;
const SRC_MSG: u64 = 1;

/// Walks the head in the chosen buffer (`len` ≤ WINDOW) line by line under `bpf_loop`, so the
/// verifier checks one step instead of every path through all of them.
#[inline(always)]
fn scan_head(source: u64, len: usize) -> HeadScan {
    let none = HeadScan {
        line_end: 0,
        complete: false,
        has_context: false,
        traceparent: None,
    };
    let Some(run) = SCAN_RUN.get_ptr_mut(0) else {
        return none;
    };
    // Zeroed a word at a time: a struct of zeros built by value became a call to a
    // byte-at-a-time `memset` (64 iterations, about a fifth of the receive program's own
    // samples in a profile), and so did moving one out of `MaybeUninit`.
    let words = run.cast::<u64>();
    for i in 0..core::mem::size_of::<ScanRun>() / 8 {
        // SAFETY: `ScanRun` is `repr(C)`, all u64 fields: word `i` is inside this per-CPU
        // slot, ours for the program's run.
        unsafe { words.add(i).write_volatile(0) };
    }
    let mut st = ScanState {
        source,
        len: len as u64,
    };
    // SAFETY: the callback only reads `st` and per-CPU maps, and returns within the loop.
    unsafe {
        bpf_loop(
            MAX_STEPS,
            scan_step as *mut core::ffi::c_void,
            (&mut st as *mut ScanState).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let run = unsafe { &*run };
    HeadScan {
        line_end: run.line_end as usize,
        complete: run.complete != 0,
        has_context: run.has_context != 0,
        traceparent: (run.tp_found != 0).then_some((
            run.tp_hi,
            run.tp_lo,
            run.tp_span,
            run.tp_sampled != 0,
        )),
    }
}

#[inline(always)]
fn scan_buffer(source: u64) -> Option<&'static [u8]> {
    if source == SRC_EVENT {
        let p = SCRATCH.get_ptr(0)?;
        // SAFETY: per-CPU slot, read-only here.
        Some(unsafe { &(&(*p).payload)[..] })
    } else {
        let p = MSG_SCRATCH.get_ptr(0)?;
        // SAFETY: as above.
        Some(unsafe { &(&(*p).buf)[..] })
    }
}

/// Steps of `scan_head`: at most one per 8-byte word without a line break, one per line.
const MAX_STEPS: u32 = (WINDOW / 8 + WINDOW / 2) as u32;

/// Words `scan_step` searches before it returns without having found a line break.
const WORDS_PER_STEP: usize = 4;

const NEWLINES: u64 = 0x0a0a_0a0a_0a0a_0a0a;
const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Where the search for a line break from `from` got within one 8-byte word: a byte-per-step
/// walk cost more than the rest of the request's probes.
enum WordSearch {
    /// A `\n` at this offset, with a byte after it inside the head.
    Found(usize),
    /// None in this word: go on from the next.
    Next(usize),
    End,
}

/// Looks for `\n` in the word holding `from`. `buf` starts 8-aligned, so the word is an
/// aligned load.
#[inline(always)]
fn search_word(buf: &[u8], from: usize, len: usize) -> WordSearch {
    if from + 1 >= len {
        return WordSearch::End;
    }
    let at = verifier_bound(from, WINDOW - 1) & !7;
    // SAFETY: at + 8 ≤ WINDOW, inside both scan buffers; 8-aligned (see above).
    let word = unsafe { core::ptr::read(buf.as_ptr().add(at) as *const u64) };
    // Zero bytes of `x` are line breaks; those before `from` are made 0xff.
    let mut x = word ^ NEWLINES;
    let skip = from - at;
    if skip != 0 {
        x |= (1u64 << (skip * 8)) - 1;
    }
    // The high bit of each zero byte of `x`, and maybe of bytes above the first: only the
    // lowest is used.
    let zeros = x.wrapping_sub(LOW_BITS) & !x & HIGH_BITS;
    if zeros == 0 {
        return WordSearch::Next(at + 8);
    }
    // Its byte index, without a branch per byte (each would be a verifier path): the lowest
    // bit, 1 << (8k + 7), times 0x0001020304050607 has k in its top byte.
    let lowest = zeros & zeros.wrapping_neg();
    let k = ((lowest >> 7).wrapping_mul(0x0001_0203_0405_0607) >> 56) as usize;
    let i = at + (k & 7);
    if i + 1 < len {
        WordSearch::Found(i)
    } else {
        WordSearch::End
    }
}

/// One step of `scan_head`: a word without a line break, or the next line. 0 to go on, 1 to
/// stop.
extern "C" fn scan_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `ScanState` passed to bpf_loop.
    let st = unsafe { &*(ctx as *const ScanState) };
    let Some(buf) = scan_buffer(st.source) else {
        return 1;
    };
    let Some(run) = SCAN_RUN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, ours for this program's run.
    let run = unsafe { &mut *run };
    let pos = &mut run.pos;
    let len = (st.len as usize).min(WINDOW);
    // Up to four words a step: a header line is three or four words long, and a step (a
    // call, and the map lookups above) costs more than searching a word.
    let mut from = *pos as usize;
    let mut found = None;
    for _ in 0..WORDS_PER_STEP {
        match search_word(buf, from, len) {
            WordSearch::Found(i) => {
                found = Some(i);
                break;
            }
            WordSearch::Next(next) => from = next,
            WordSearch::End => return 1,
        }
    }
    let Some(i) = found else {
        *pos = from as u64;
        return 0;
    };
    let at = verifier_bound(i + 1, WINDOW - 1);
    *pos = at as u64;
    if run.line_end == 0 {
        run.line_end = at as u64;
    }
    if at + 1 < len && buf[at] == b'\r' && buf[at + 1] == b'\n' {
        run.complete = 1;
        return 1;
    }
    if name_is(buf, at, b"traceparent:") {
        run.has_context = 1;
        let mut v = at + 12;
        if v < len && buf[v] == b' ' {
            v += 1;
        }
        // 00-{trace:32}-{span:16}-{flags:2}
        if v + 55 <= len && buf[v] == b'0' && buf[v + 1] == b'0' && buf[v + 2] == b'-' {
            let hi = parse_hex(buf, v + 3, 16);
            let lo = parse_hex(buf, v + 19, 16);
            let span = parse_hex(buf, v + 36, 16);
            let flags = parse_hex(buf, v + 53, 2);
            if let (Some(hi), Some(lo), Some(span), Some(flags)) = (hi, lo, span, flags)
                && buf[v + 35] == b'-'
                && buf[v + 52] == b'-'
                && (hi | lo) != 0
                && span != 0
            {
                run.tp_found = 1;
                run.tp_hi = hi;
                run.tp_lo = lo;
                run.tp_span = span;
                run.tp_sampled = flags & 1;
            }
        }
    } else if name_is(buf, at, b"b3:") || name_is(buf, at, b"x-b3-traceid:") {
        run.has_context = 1;
    }
    0
}

/// A traced thread read a segment starting with `head` on `conn_id`: when it is a request,
/// name its server span and remember it as what the thread serves. Returns the context to put
/// on the data event.
#[inline(always)]
pub fn server_request(
    head: &[u8],
    head_len: usize,
    conn_id: u64,
    tid: u32,
    read_ns: u64,
) -> TraceCtx {
    let none = TraceCtx::default();
    if config!(kernel_ctx) == 0 || !starts_with_method(head) {
        return none;
    }
    let scan = scan_head(SRC_EVENT, head_len.min(WINDOW));
    let mut ctx = TraceCtx {
        span_id: nonzero_random(tid),
        flags: CTX_VALID | CTX_SERVER | CTX_SAMPLED,
        ..none
    };
    match scan.traceparent {
        Some((hi, lo, parent, sampled)) => {
            ctx.trace_id_hi = hi;
            ctx.trace_id_lo = lo;
            ctx.parent_id = parent;
            ctx.flags |= CTX_FROM_HEADER;
            if !sampled {
                ctx.flags &= !CTX_SAMPLED;
            }
        }
        None => {
            ctx.trace_id_hi = random_u64(tid);
            ctx.trace_id_lo = nonzero_random(tid);
        }
    }
    match THREAD_CTX.get_ptr_mut(&tid) {
        Some(slot) => {
            // SAFETY: a map value; only this thread's programs use its slot.
            let slot = unsafe { &mut *slot };
            // A thread that reads a second request before answering the first (an event
            // loop, or pipelining) cannot say which one its calls belong to.
            if slot.ctx.flags != 0 && slot.conn_id != conn_id {
                ctx.flags |= CTX_AMBIGUOUS;
            }
            *slot = ThreadCtx {
                ctx,
                conn_id,
                read_ns,
            };
        }
        None => {
            let _ = THREAD_CTX.insert(
                &tid,
                &ThreadCtx {
                    ctx,
                    conn_id,
                    read_ns,
                },
                0,
            );
        }
    }
    ctx
}

/// A traced thread wrote a segment starting with `head` on `conn_id`: a response ends what it
/// serves there.
#[inline(always)]
pub fn response_written(head: &[u8], conn_id: u64, tid: u32) {
    if config!(kernel_ctx) == 0 || !starts_with_status(head) {
        return;
    }
    if let Some(slot) = THREAD_CTX.get_ptr_mut(&tid) {
        // SAFETY: a map value, as in `server_request`.
        let slot = unsafe { &mut *slot };
        if slot.conn_id == conn_id {
            slot.ctx.flags = 0;
        }
    }
}

/// Puts connections that traced threads open into the socket map. The connect callback runs
/// in the connecting thread, so it can tell traced processes apart; the established callback,
/// where the socket map may be updated, usually runs in softirq, so the decision is carried
/// from one to the other by the socket's cookie.
#[sock_ops]
pub fn tracer_sockops(ctx: SockOpsContext) -> u32 {
    if config!(inject) == INJECT_OFF {
        return 1;
    }
    // SAFETY: the ctx pointer is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if is_traced(tgid) {
                let _ = CONNECTING.insert(&cookie, &tgid, 0);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: read and removed at once.
            if unsafe { CONNECTING.get(&cookie) }.is_none() {
                return 1;
            }
            let _ = CONNECTING.remove(&cookie);
            let ops = ctx.ops;
            // SAFETY: reads of the program's context.
            let key = sock_key(&unsafe { SockFields::read(ops) });
            if !destination_wanted(&key.remote_addr, key.remote_port as u16) {
                return 1;
            }
            // SAFETY: a read of the program's context: the socket being established.
            let sk = unsafe { (*ops).__bindgen_anon_2.sk };
            if sk.is_null() {
                return 1;
            }
            let Some(sk) = address_of(sk.cast()) else {
                return 1;
            };
            if blocking(sk) {
                count(stat::INJECT_BLOCKING);
                return 1;
            }
            // SAFETY: the context is a valid bpf_sock_ops for the helper.
            if SOCKETS.update(key, unsafe { &mut *ops }, 0).is_ok() {
                count(stat::INJECT_SOCKETS);
            }
        }
        _ => {}
    }
    1
}

/// The address fields of a sock_ops or sk_msg context. `remote_port` is the big-endian port
/// shifted into the upper half of the word (the kernel's context rewrite does `dport << 16`),
/// so `u32::from_be` of it is the port; `local_port` is in host order already. The verifier only allows context loads
/// at constant offsets from the context pointer; reading every field unconditionally, with
/// volatile loads, keeps LLVM from merging per-family branches into a load through a
/// computed pointer.
struct SockFields {
    family: u32,
    remote_ip4: u32,
    local_ip4: u32,
    remote_ip6: [u32; 4],
    local_ip6: [u32; 4],
    remote_port: u32,
    local_port: u32,
}

macro_rules! ctx_fields {
    ($p:expr) => {{
        let p = $p;
        SockFields {
            family: read_volatile(&raw const (*p).family),
            remote_ip4: read_volatile(&raw const (*p).remote_ip4),
            local_ip4: read_volatile(&raw const (*p).local_ip4),
            remote_ip6: [
                read_volatile(&raw const (*p).remote_ip6[0]),
                read_volatile(&raw const (*p).remote_ip6[1]),
                read_volatile(&raw const (*p).remote_ip6[2]),
                read_volatile(&raw const (*p).remote_ip6[3]),
            ],
            local_ip6: [
                read_volatile(&raw const (*p).local_ip6[0]),
                read_volatile(&raw const (*p).local_ip6[1]),
                read_volatile(&raw const (*p).local_ip6[2]),
                read_volatile(&raw const (*p).local_ip6[3]),
            ],
            remote_port: read_volatile(&raw const (*p).remote_port),
            local_port: read_volatile(&raw const (*p).local_port),
        }
    }};
}

impl SockFields {
    /// SAFETY: `ops` is the program's context.
    #[inline(always)]
    unsafe fn read(ops: *const aya_ebpf::bindings::bpf_sock_ops) -> Self {
        unsafe { ctx_fields!(ops) }
    }

    /// SAFETY: `msg` is the program's context.
    #[inline(always)]
    unsafe fn read_msg(msg: *const aya_ebpf::bindings::sk_msg_md) -> Self {
        unsafe { ctx_fields!(msg) }
    }
}

/// The socket map's key for a connection: its addresses as IPv6 (IPv4 mapped), ports in host
/// order.
#[inline(always)]
fn sock_key(f: &SockFields) -> SockKey {
    let mut key = SockKey::default();
    (key.local_addr, key.remote_addr) = if f.family == AF_INET {
        (mapped(f.local_ip4), mapped(f.remote_ip4))
    } else {
        (v6_bytes(f.local_ip6), v6_bytes(f.remote_ip6))
    };
    key.local_port = f.local_port;
    key.remote_port = u32::from_be(f.remote_port);
    key
}

#[inline(always)]
fn mapped(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
fn v6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
    }
    out
}

#[inline(always)]
fn destination_wanted(addr: &[u8; 16], port: u16) -> bool {
    // SAFETY: presence checks only.
    if config!(inject_filter_ports) != 0 && unsafe { INJECT_PORTS.get(&port) }.is_none() {
        return false;
    }
    if config!(inject_filter_nets) != 0 && INJECT_NETS.get(Key::new(128, *addr)).is_none() {
        return false;
    }
    true
}

/// Adds the trace context header to HTTP/1.x requests that traced threads send.
#[sk_msg]
pub fn tracer_inject(ctx: SkMsgContext) -> u32 {
    let _ = try_inject(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_inject(ctx: &SkMsgContext) -> Option<()> {
    if config!(inject) == INJECT_OFF {
        return None;
    }
    // SAFETY: a read of the program's context: the socket being sent on.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return None;
    }
    // A socket can be switched to blocking mode after it connected (Java's sockets are, once
    // connected without a read timeout): no header, and the agent takes it out of the map.
    if blocking(address_of(sk.cast())?) {
        // SAFETY: the context is the program's own.
        let f = unsafe { SockFields::read_msg(ctx.msg) };
        let key = sock_key(&f);
        // SAFETY: a presence check; counted once per socket.
        if unsafe { BLOCKING.get(&key) }.is_none() {
            count(stat::INJECT_BLOCKING);
            let _ = BLOCKING.insert(&key, &1, 0);
            wake_agent();
        }
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let injected = if config!(sock_hooks) != 0 {
        // Sends of traced threads; the socket's send note carries the injected context to
        // the socket-layer hook that reports the send (and empties it). No header in a turn
        // that per-turn sampling skips: the client span would not be reported.
        let keep = crate::capture_mode((pid_tgid >> 32) as u32)?;
        let note = crate::sockio::send_sampled(sk.cast(), pid_tgid, keep)?;
        // The send begins here, before its bytes are queued.
        crate::sockio::note_send_start(note, address_of(sk.cast())?);
        &mut note.injected
    } else {
        // Only the sends the syscall probes saw a traced thread start: its saved arguments
        // say so, and carry the injected context to the syscall's exit.
        let saved = ACTIVE.get_ptr_mut(&pid_tgid)?;
        // SAFETY: a map value pointer, valid for this program's run.
        let saved = unsafe { &mut *saved };
        if saved.direction != DIR_EGRESS
            || (saved.kind != SavedArgs::BUF && saved.kind != SavedArgs::IOV)
        {
            return None;
        }
        &mut saved.injected
    };
    // One header per syscall: a large send reaches this program in several pieces.
    if injected.flags != 0 {
        return None;
    }
    let size = ctx.size() as usize;
    if size < 16 {
        return None;
    }
    let want = if size < WINDOW { size } else { WINDOW };
    // SAFETY: the context is the program's own.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want as u32, 0) } != 0 {
        count(stat::INJECT_ERRORS);
        return None;
    }
    let scratch = MSG_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot owned for the program's run.
    let scratch = unsafe { &mut *scratch };
    let (data, end) = (ctx.data(), ctx.data_end());
    if end <= data {
        return None;
    }
    let mut n = end - data;
    if n > want {
        n = want;
    }
    let n = verifier_bound(n, WINDOW * 2 - 1);
    if n < 16 {
        return None;
    }
    // SAFETY: n ≤ 2 * WINDOW - 1 fits the scratch buffer; the source is the message's linear
    // data, checked against data_end above.
    if unsafe { probe_read_kernel_raw(scratch.buf.as_mut_ptr().cast(), n as u32, data as *const _) }
        != 0
    {
        count(stat::INJECT_ERRORS);
        return None;
    }
    let head = &scratch.buf[..];
    if !starts_with_method(head) {
        return None;
    }
    let scan = scan_head(SRC_MSG, n.min(WINDOW));
    if scan.has_context
        || !scan.complete
        || scan.line_end < 10
        || head.get(scan.line_end - 2) != Some(&b'\r')
    {
        count(stat::INJECT_SKIPPED);
        return None;
    }
    // SAFETY: reads of the program's context.
    let f = unsafe { SockFields::read_msg(ctx.msg) };
    let remote = if f.family == AF_INET {
        mapped(f.remote_ip4)
    } else {
        v6_bytes(f.remote_ip6)
    };
    let remote_port = (u32::from_be(f.remote_port)) as u16;
    if !destination_wanted(&remote, remote_port) {
        return None;
    }

    let tid = pid_tgid as u32;
    let mut client = TraceCtx {
        span_id: nonzero_random(tid),
        flags: CTX_VALID | CTX_INJECTED | CTX_SAMPLED,
        ..Default::default()
    };
    // SAFETY: copied out at once.
    match unsafe { THREAD_CTX.get(&tid) }.filter(|t| t.ctx.flags != 0) {
        Some(t) if t.ctx.flags & CTX_AMBIGUOUS == 0 => {
            client.trace_id_hi = t.ctx.trace_id_hi;
            client.trace_id_lo = t.ctx.trace_id_lo;
            client.parent_id = t.ctx.span_id;
            client.flags = (client.flags & !CTX_SAMPLED) | (t.ctx.flags & CTX_SAMPLED);
        }
        Some(_) => {
            client.flags |= CTX_AMBIGUOUS;
            client.trace_id_hi = random_u64(tid);
            client.trace_id_lo = nonzero_random(tid);
        }
        None => {
            client.trace_id_hi = random_u64(tid);
            client.trace_id_lo = nonzero_random(tid);
        }
    }
    let offset = scan.line_end;
    let line = &mut scratch.line;
    let ok = if config!(inject) == INJECT_B3 {
        write_header::<B3_LEN>(ctx, line, offset, &client, true)
    } else {
        write_header::<TRACEPARENT_LEN>(ctx, line, offset, &client, false)
    };
    if ok {
        count(stat::INJECTED);
        *injected = client;
    } else {
        count(stat::INJECT_ERRORS);
    }
    Some(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[inline(always)]
fn put_hex(out: &mut [u8], at: usize, v: u64) {
    for k in 0..16 {
        out[at + k] = HEX[((v >> (60 - 4 * k)) & 0xf) as usize];
    }
}

/// Grows the message by `LEN` bytes at `offset` (just after the request line) and writes the
/// header there.
#[inline(always)]
fn write_header<const LEN: usize>(
    ctx: &SkMsgContext,
    line: &mut [u8; 128],
    offset: usize,
    c: &TraceCtx,
    b3: bool,
) -> bool {
    let sampled = c.flags & CTX_SAMPLED != 0;
    if b3 {
        line[..4].copy_from_slice(b"b3: ");
        put_hex(line, 4, c.trace_id_hi);
        put_hex(line, 20, c.trace_id_lo);
        line[36] = b'-';
        put_hex(line, 37, c.span_id);
        line[53] = b'-';
        line[54] = if sampled { b'1' } else { b'0' };
        line[55] = b'\r';
        line[56] = b'\n';
    } else {
        line[..16].copy_from_slice(b"traceparent: 00-");
        put_hex(line, 16, c.trace_id_hi);
        put_hex(line, 32, c.trace_id_lo);
        line[48] = b'-';
        put_hex(line, 49, c.span_id);
        line[65] = b'-';
        line[66] = b'0';
        line[67] = if sampled { b'1' } else { b'0' };
        line[68] = b'\r';
        line[69] = b'\n';
    }
    let offset = verifier_bound(offset, WINDOW - 1);
    if ctx.push_data(offset as u32, LEN as u32, 0).is_err() {
        return false;
    }
    // Starting the pull at 0 keeps `data` at the message's first byte. The push split the
    // message into pieces, and the kernel sends each piece with its own tcp_sendmsg: a request
    // would leave in two segments, and on a socket with Nagle's algorithm on (no TCP_NODELAY)
    // the second waits until the first is acknowledged, which the server delays (40 ms) since
    // half a request gets no answer. A message up to 64 KiB is made one piece again (the pull
    // copies it into one page); a larger one is pulled up to the header: its second piece
    // carries a full segment at least, which the server acknowledges at once.
    let size = ctx.size();
    // SAFETY (both pulls): the context is the program's own.
    let whole =
        size as usize <= WHOLE_PULL_MAX && unsafe { bpf_msg_pull_data(ctx.msg, 0, size, 0) } == 0;
    if !whole && unsafe { bpf_msg_pull_data(ctx.msg, 0, (offset + LEN) as u32, 0) } != 0 {
        let _ = ctx.pop_data(offset as u32, LEN as u32, 0);
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let at = data + offset;
    if at + LEN > end {
        // Never leave the grown message with unwritten bytes in it.
        let _ = ctx.pop_data(offset as u32, LEN as u32, 0);
        return false;
    }
    let dst = at as *mut u8;
    for k in 0..LEN {
        // SAFETY: [at, at + LEN) is inside the linear data checked against data_end.
        unsafe { *dst.add(k) = line[k] };
    }
    true
}

const _: () = assert!(TRACEPARENT_LEN == 70 && B3_LEN == 57 && WINDOW <= MAX_CAPTURE);
