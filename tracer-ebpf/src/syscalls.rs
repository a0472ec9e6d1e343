//! Data syscalls on traced sockets: the enter programs save the buffer pointers, the one exit
//! program copies a bounded prefix (and the last bytes) of what actually moved.
//!
//! Tracepoint record layout on 64-bit: `sys_enter_*` has its arguments as 8-byte slots from
//! offset 16 (arg N at 16 + 8 N) and `__syscall_nr` at 8; `sys_exit_*` has `long ret` at 16.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    DIR_EGRESS, DIR_INGRESS, DataEvent, EventHeader, EventKind, MAX_CAPTURE, SavedArgs, TAIL_LEN,
    stat,
};

use crate::{
    EVENTS, SCRATCH, capture_limit, capture_mode, count, inject,
    sockets::{
        CONN_TLS, TURN_SHIFT, clear_saved, header_only, lookup_or_track, lookup_or_track_entry,
        next_seq, saved_slot, take_saved,
    },
    tls,
    turns::{self, Pick},
};

const ECONNRESET: i64 = 104;
const EPIPE: i64 = 32;
/// iovecs looked at per readv/writev/sendmsg/recvmsg (bounded for the verifier).
const MAX_IOV: usize = 8;

/// A data record as built before it is copied to the ring buffer: the event, then room for the
/// payload. Three times `MAX_CAPTURE` so that "offset masked below MAX_CAPTURE, length masked
/// below 2 * MAX_CAPTURE" alone keeps every copy inside: the verifier cannot see that the
/// offset and length of an iovec's copy add up to at most MAX_CAPTURE.
#[repr(C)]
pub struct DataScratch {
    pub event: DataEvent,
    pub payload: [u8; 3 * MAX_CAPTURE],
    /// The iovec array of the call, read at once (`copy_iov`); after the payload, which must
    /// follow the event directly.
    pub iov: [[u64; 2]; MAX_IOV],
}

/// `msg_iov` and `msg_iovlen` of a `struct user_msghdr` (at 16 and 24), in one read; a fault
/// gives an empty iovec.
#[inline(always)]
pub(crate) fn msg_iov(msg: u64) -> [u64; 2] {
    // SAFETY: a probe read of the caller's msghdr.
    unsafe { bpf_probe_read_user((msg + 16) as *const [u64; 2]) }.unwrap_or([0, 0])
}

/// Bounds `v` with a mask the verifier sees. The volatile reload stops LLVM from proving the
/// mask redundant (from earlier clamps) and deleting it, which loses the bound.
#[inline(always)]
pub(crate) fn verifier_bound(v: usize, mask: usize) -> usize {
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&v) & mask }
}

#[inline(always)]
fn enter(ctx: &TracePointContext, kind: u32, direction: u32) {
    // SAFETY: offsets are those of the sys_enter_* record (see the module doc).
    let (fd, arg1, arg2, nr) = unsafe {
        (
            ctx.read_at::<u64>(16).unwrap_or(u64::MAX),
            ctx.read_at::<u64>(24).unwrap_or(0),
            ctx.read_at::<u64>(32).unwrap_or(0),
            ctx.read_at::<i32>(8).unwrap_or(-1),
        )
    };
    enter_args(fd, arg1, arg2, nr, kind, direction);
}

/// A data syscall's entry: `fd`, its buffer or iovec/msghdr pointer, the iovec count.
#[inline(always)]
pub fn enter_args(fd: u64, arg1: u64, arg2: u64, syscall: i32, kind: u32, direction: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(keep) = capture_mode((pid_tgid >> 32) as u32) {
        enter_traced_args(pid_tgid, fd, arg1, arg2, syscall, kind, direction, keep);
    }
}

/// `enter_args` for a thread known to be traced; `keep` as in `turns::pick`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn enter_traced_args(
    pid_tgid: u64,
    fd: u64,
    arg1: u64,
    arg2: u64,
    syscall: i32,
    kind: u32,
    direction: u32,
    keep: u32,
) {
    let tgid = (pid_tgid >> 32) as u32;
    if fd > i32::MAX as u64 {
        return;
    }
    let fd = fd as u32;
    let Some(entry) = lookup_or_track_entry(tgid, fd) else {
        // Not a socket. Drop any entry the agent seeded for a read this thread was blocked in
        // at attach time, so this exit cannot be mistaken for it.
        clear_saved(pid_tgid);
        return;
    };
    let conn = *entry;
    // Inside an OpenSSL call the bytes are ciphertext: the call's own probes report the
    // plaintext, and learn here which socket it uses.
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // At entry nothing has moved yet: the socket's next sequence number is the first byte's.
    if tls::in_ssl_call(pid_tgid, tgid, fd, &conn, now, || {
        next_seq(conn.sk, direction == DIR_EGRESS)
    }) || conn.flags & CONN_TLS != 0
    {
        clear_saved(pid_tgid);
        return;
    }
    // The turn state is kept in the entry's flags, above the `CONN_*` bits.
    let mut turn = (entry.flags >> TURN_SHIFT) as u32;
    let pick = turns::pick(&mut turn, direction, keep, pid_tgid as u32);
    entry.flags = (entry.flags & ((1 << TURN_SHIFT) - 1)) | ((turn as u64) << TURN_SHIFT);
    match pick {
        Pick::Skip => {
            count(stat::SHED_IO);
            clear_saved(pid_tgid);
            return;
        }
        Pick::AfterGap => {
            header_only(EventKind::ConnGap, tgid, pid_tgid as u32, fd, conn.conn_id);
        }
        Pick::Capture => {}
    }
    let (kind, buf, count) = match kind {
        SavedArgs::BUF => (kind, arg1, 0),
        SavedArgs::IOV => (kind, arg1, arg2),
        // sendmsg/recvmsg: `struct user_msghdr *` with msg_iov at 16 and msg_iovlen at 24.
        MSG => {
            let [iov, iovlen] = msg_iov(arg1);
            (SavedArgs::IOV, iov, iovlen)
        }
        _ => (SavedArgs::NO_PAYLOAD, 0, 0),
    };
    let seq = next_seq(conn.sk, direction == DIR_EGRESS);
    let Some(slot) = saved_slot(pid_tgid) else {
        return;
    };
    slot.fd = fd;
    slot.buf = buf;
    slot.count = count;
    slot.conn_id = conn.conn_id;
    slot.syscall = syscall as u32;
    slot.direction = direction;
    slot.seq = seq.unwrap_or(0);
    slot.seq_valid = u32::from(seq.is_some());
    slot.enter_ns = now;
    slot.injected.flags = 0;
    slot.kind = kind;
}

/// Internal kind for sendmsg/recvmsg enters: saved as `IOV` after reading the msghdr.
pub const MSG: u32 = 100;

/// sys_enter_read, sys_enter_recvfrom: (fd, buf, count, ...).
#[tracepoint]
pub fn tracer_enter_read(ctx: TracePointContext) -> u32 {
    enter(&ctx, SavedArgs::BUF, DIR_INGRESS);
    0
}

/// sys_enter_write, sys_enter_sendto: (fd, buf, count, ...).
#[tracepoint]
pub fn tracer_enter_write(ctx: TracePointContext) -> u32 {
    enter(&ctx, SavedArgs::BUF, DIR_EGRESS);
    0
}

/// sys_enter_readv: (fd, const struct iovec *vec, unsigned long vlen).
#[tracepoint]
pub fn tracer_enter_readv(ctx: TracePointContext) -> u32 {
    enter(&ctx, SavedArgs::IOV, DIR_INGRESS);
    0
}

/// sys_enter_writev: (fd, const struct iovec *vec, unsigned long vlen).
#[tracepoint]
pub fn tracer_enter_writev(ctx: TracePointContext) -> u32 {
    enter(&ctx, SavedArgs::IOV, DIR_EGRESS);
    0
}

/// sys_enter_recvmsg: (fd, struct user_msghdr *msg, unsigned flags).
#[tracepoint]
pub fn tracer_enter_recvmsg(ctx: TracePointContext) -> u32 {
    enter(&ctx, MSG, DIR_INGRESS);
    0
}

/// sys_enter_sendmsg: (fd, struct user_msghdr *msg, unsigned flags).
#[tracepoint]
pub fn tracer_enter_sendmsg(ctx: TracePointContext) -> u32 {
    enter(&ctx, MSG, DIR_EGRESS);
    0
}

/// sys_enter_sendfile64: (out_fd, in_fd, loff_t *offset, size_t count). The bytes come from a
/// file and are not visible, but they count: nginx sends response bodies this way.
#[tracepoint]
pub fn tracer_enter_sendfile(ctx: TracePointContext) -> u32 {
    enter(&ctx, SavedArgs::NO_PAYLOAD, DIR_EGRESS);
    0
}

/// sys_exit_* of every data syscall above: `long ret` at 16.
#[tracepoint]
pub fn tracer_exit_data(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(saved) = take_saved(pid_tgid) else {
        return 0;
    };
    // SAFETY: the sys_exit_* record's `ret`.
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    exit_data(saved, ret, pid_tgid);
    0
}

/// A data syscall's exit with what its entry saved.
#[inline(always)]
pub fn exit_data(saved: SavedArgs, ret: i64, pid_tgid: u64) {
    if saved.kind < SavedArgs::BUF {
        return;
    }
    let mut saved = saved;
    if saved.conn_id == 0 {
        // Seeded by the agent for a read that was under way when it attached.
        match lookup_or_track((pid_tgid >> 32) as u32, saved.fd) {
            Some(conn) => saved.conn_id = conn.conn_id,
            None => return,
        }
    }
    if ret <= 0 {
        if ret == -ECONNRESET || ret == -EPIPE {
            header_only(
                EventKind::ConnReset,
                (pid_tgid >> 32) as u32,
                pid_tgid as u32,
                saved.fd,
                saved.conn_id,
            );
        }
        return;
    }
    emit_data(&saved, ret as u64, pid_tgid, 0);
}

/// Reports what a call moved. `end_ns` dates the last byte when the caller knows better than
/// "now" (0: now).
#[inline(always)]
pub fn emit_data(saved: &SavedArgs, len: u64, pid_tgid: u64, end_ns: u64) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    let scratch = unsafe { &mut *scratch };
    let mut want = capture_limit() as u64;
    if want > len {
        want = len;
    }
    let ev = &mut scratch.event;
    ev.hdr = EventHeader {
        kind: EventKind::Data as u16,
        losses: crate::losses(),
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd: saved.fd,
        ts_ns: if end_ns != 0 {
            end_ns
        } else {
            // SAFETY: no preconditions.
            unsafe { bpf_ktime_get_ns() }
        },
        conn_id: saved.conn_id,
    };
    // A send's first byte left when the call began; a receive's arrived by its return.
    ev.start_ns = if saved.direction == DIR_EGRESS && saved.enter_ns != 0 {
        saved.enter_ns
    } else {
        ev.hdr.ts_ns
    };
    ev.len = len;
    ev.seq = saved.seq;
    ev.seq_valid = saved.seq_valid;
    ev.direction = saved.direction;
    ev.syscall = saved.syscall;
    ev.tail_len = 0;
    let head_len = match saved.kind {
        SavedArgs::BUF => copy_buf(scratch, saved.buf, want as usize, len),
        SavedArgs::IOV => copy_iov(scratch, saved.buf, saved.count, want as usize, len),
        _ => 0,
    };
    let head_len = verifier_bound(head_len.min(MAX_CAPTURE), 2 * MAX_CAPTURE - 1);
    scratch.event.head_len = head_len as u32;
    let tid = pid_tgid as u32;
    scratch.event.ctx = if saved.direction == DIR_INGRESS {
        inject::server_request(
            &scratch.payload[..],
            head_len,
            saved.conn_id,
            tid,
            scratch.event.hdr.ts_ns,
        )
    } else {
        inject::response_written(&scratch.payload[..], saved.conn_id, tid);
        saved.injected
    };
    let size = core::mem::size_of::<DataEvent>() + head_len;
    // SAFETY: `size` is within the scratch value (event + 2 * MAX_CAPTURE).
    let bytes =
        unsafe { core::slice::from_raw_parts(scratch as *const DataScratch as *const u8, size) };
    if EVENTS.output::<[u8]>(bytes, crate::wakeup_flags()).is_err() {
        crate::event_lost();
    } else {
        count(stat::DATA_EVENTS);
    }
}

/// Copies `n` bytes from user memory `src` to `payload[offset..]`. Returns the bytes copied.
#[inline(always)]
fn read_user_into(scratch: &mut DataScratch, offset: usize, src: u64, n: usize) -> usize {
    let offset = verifier_bound(offset, MAX_CAPTURE - 1);
    let n = verifier_bound(n.min(MAX_CAPTURE), 2 * MAX_CAPTURE - 1);
    if n == 0 {
        return 0;
    }
    // SAFETY: offset < MAX_CAPTURE and n < 2 * MAX_CAPTURE, inside the 3 * MAX_CAPTURE payload.
    let ret = unsafe {
        probe_read_user_raw(
            scratch.payload.as_mut_ptr().add(offset).cast(),
            n as u32,
            src as *const core::ffi::c_void,
        )
    };
    if ret != 0 {
        count(stat::PAYLOAD_FAULTS);
        return 0;
    }
    n
}

/// Copies the last bytes of `[src, src + end)` into the event's tail.
#[inline(always)]
fn read_tail(scratch: &mut DataScratch, src: u64, end: u64) {
    let n = verifier_bound(end.min(TAIL_LEN as u64) as usize, TAIL_LEN * 2 - 1) as u64;
    if n == 0 {
        return;
    }
    // SAFETY: n < 2 * TAIL_LEN bytes from the tail field stay inside the scratch value.
    let ret = unsafe {
        probe_read_user_raw(
            scratch.event.tail.as_mut_ptr().cast(),
            n as u32,
            (src + end - n) as *const core::ffi::c_void,
        )
    };
    if ret == 0 {
        scratch.event.tail_len = n as u32;
    }
}

#[inline(always)]
fn copy_buf(scratch: &mut DataScratch, buf: u64, want: usize, len: u64) -> usize {
    let copied = read_user_into(scratch, 0, buf, want);
    if (copied as u64) < len {
        read_tail(scratch, buf, len);
    }
    copied
}

#[inline(always)]
fn copy_iov(scratch: &mut DataScratch, iov: u64, iovcnt: u64, want: usize, len: u64) -> usize {
    // The whole array in one read: each probe read of user memory costs more than copying a
    // few hundred bytes (fault handling set up, hardened-usercopy checks), and writev callers
    // such as nginx pass a header and a body.
    let entries = if iovcnt < MAX_IOV as u64 {
        iovcnt as usize
    } else {
        MAX_IOV
    };
    let size = verifier_bound(entries * 16, 2 * MAX_IOV * 16 - 1);
    if size == 0 || size > MAX_IOV * 16 {
        return 0;
    }
    // SAFETY: `size` ≤ the `iov` field's size; the source is the caller's iovec array.
    if unsafe {
        probe_read_user_raw(
            scratch.iov.as_mut_ptr().cast(),
            size as u32,
            iov as *const core::ffi::c_void,
        )
    } != 0
    {
        count(stat::PAYLOAD_FAULTS);
        return 0;
    }
    let mut copied: usize = 0;
    let mut seen: u64 = 0;
    for i in 0..MAX_IOV {
        if i >= entries {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }
        let [base, iov_len] = scratch.iov[i];
        if copied < want {
            let mut n = want - copied;
            if n as u64 > iov_len {
                n = iov_len as usize;
            }
            let got = read_user_into(scratch, copied, base, n);
            if got != n {
                break;
            }
            copied += got;
        }
        if seen + iov_len >= len {
            // The syscall's last byte is in this iovec.
            if (copied as u64) < len {
                read_tail(scratch, base, len - seen);
            }
            break;
        }
        seen += iov_len;
    }
    copied
}

// The head scan (inject.rs) reads the payload a word at a time with aligned loads.
const _: () = assert!(core::mem::offset_of!(DataScratch, payload) % 8 == 0);
