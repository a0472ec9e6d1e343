//! TLS plaintext from OpenSSL: uprobes on SSL_read, SSL_write and their `_ex` forms.
//!
//! The entry probe saves the call's buffer; the return probe copies what the call moved, as a
//! data event of the socket underneath. Which socket that is, OpenSSL does not say in a
//! version-independent way (the fd sits in a BIO whose layout changes between releases), so it
//! is learnt from the syscalls: a read or write a thread makes while inside an SSL call is on
//! that call's socket. That syscall's own bytes are ciphertext and are not reported, and the
//! socket is marked TLS so its later syscalls (handshakes, close_notify) are skipped too. An
//! SSL call that needs no syscall (the record was already buffered) uses the socket learnt
//! earlier for the same SSL object.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    DIR_EGRESS, DIR_INGRESS, EventKind, SYSCALL_SSL_READ, SYSCALL_SSL_WRITE, SavedArgs, stat,
};

use crate::{
    capture_mode, count,
    sockets::{ConnState, header_only, lookup_or_track, mark_tls},
    syscalls::emit_data,
    turns::{self, Pick},
};

/// An SSL call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslCall {
    ssl: u64,
    buf: u64,
    /// `size_t *` where the `_ex` forms store the byte count; 0 for SSL_read/SSL_write.
    count_ptr: u64,
    enter_ns: u64,
    /// When the last socket syscall under the call moved its bytes (its entry on the syscall
    /// path; at the socket layer, for a send, when the socket transmitted them): for a
    /// write, when its last bytes went out. The peer may read them before SSL_write returns
    /// (and on a busy machine the writer may wait milliseconds to run again), so a write's
    /// end is dated by this rather than by the return.
    io_ns: u64,
    conn_id: u64,
    /// The socket the call used, once a syscall under it showed it; `u32::MAX` until then.
    fd: u32,
    direction: u32,
    /// Calls on the SSL object were skipped before this one (see `turns`).
    after_gap: u32,
    /// The TCP sequence number of the first ciphertext byte the call's first socket syscall
    /// moved (`seq_valid` 0: no syscall yet). Where a call writes a request from its first
    /// byte, that is the first byte of the request's first record, and the peer's call that
    /// reads from that record on finds the same number: the link key of the request on both
    /// ends, as for plaintext. A call that reads a record already buffered has none.
    seq_valid: u32,
    seq: u32,
    _pad: u32,
}

/// SSL calls in progress, by pid_tgid.
#[map]
static SSL_CALLS: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(16384, 0);

/// Non-zero once a traced thread has entered an SSL call. Until then a socket syscall is in
/// no SSL call and need not look in `SSL_CALLS`: a hash miss on every traced read and write
/// of every program linked with libssl, whether or not it speaks TLS (nginx serving plain
/// HTTP). A flag set once, not a count of calls open: the BPF target has no atomic add in
/// Rust, and a count that raced could fall to zero while a call was open.
#[map]
static SSL_SEEN: Array<u64> = Array::with_max_entries(1, 0);

/// The socket of each SSL object seen, by (tgid, `SSL *`), and the object's turn state for
/// per-turn sampling (`turns`).
#[map]
static SSL_SOCKETS: LruHashMap<[u64; 2], [u32; 2]> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn enter(ssl: u64, buf: u64, count_ptr: u64, direction: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(keep) = capture_mode(tgid) else {
        return;
    };
    // An SSL object not seen yet is captured: its first call teaches its socket.
    let mut after_gap = 0;
    if let Some(known) = SSL_SOCKETS.get_ptr_mut(&[tgid as u64, ssl]) {
        // SAFETY: a map value pointer, valid for this program's run.
        let turn = unsafe { &mut (*known)[1] };
        match turns::pick(turn, direction, keep, pid_tgid as u32) {
            Pick::Skip => {
                count(stat::SHED_IO);
                return;
            }
            Pick::AfterGap => after_gap = 1,
            Pick::Capture => {}
        }
    } else if turns::sampled(keep) && direction == DIR_INGRESS {
        // A server's first read on a new TLS connection, captured: its turn is picked, and
        // the thread's client calls are to follow it, not the mark the handshake's socket
        // calls left (their turns are the socket's own, before it is known as TLS).
        turns::mark_server_turn(pid_tgid as u32, true);
    }
    let call = SslCall {
        ssl,
        buf,
        count_ptr,
        // SAFETY: no preconditions.
        enter_ns: unsafe { bpf_ktime_get_ns() },
        io_ns: 0,
        conn_id: 0,
        fd: u32::MAX,
        direction,
        after_gap,
        seq_valid: 0,
        seq: 0,
        _pad: 0,
    };
    if let Some(seen) = SSL_SEEN.get_ptr_mut(0) {
        // SAFETY: an aligned u64 map value; every writer stores the same value.
        unsafe { core::ptr::write_volatile(seen, 1) };
    }
    let _ = SSL_CALLS.insert(&pid_tgid, &call, 0);
}

/// int SSL_read(SSL *ssl, void *buf, int num)
#[uprobe]
pub fn tracer_ssl_read(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), arg(&ctx, 1), 0, DIR_INGRESS);
    0
}

/// int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
#[uprobe]
pub fn tracer_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 3), DIR_INGRESS);
    0
}

/// int SSL_write(SSL *ssl, const void *buf, int num)
#[uprobe]
pub fn tracer_ssl_write(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), arg(&ctx, 1), 0, DIR_EGRESS);
    0
}

/// int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)
#[uprobe]
pub fn tracer_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 3), DIR_EGRESS);
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// The return of any of the four: reports the plaintext the call moved.
#[uretprobe]
pub fn tracer_ssl_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once.
    let Some(call) = (unsafe { SSL_CALLS.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SSL_CALLS.remove(&pid_tgid);
    let ret: i32 = ctx.ret::<i32>();
    let len: u64 = if call.count_ptr != 0 {
        if ret != 1 {
            return 0;
        }
        // SAFETY: a user pointer the caller passed; a fault gives 0.
        unsafe { bpf_probe_read_user(call.count_ptr as *const u64) }.unwrap_or(0)
    } else if ret > 0 {
        ret as u64
    } else {
        0
    };
    if len == 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let fd = if call.fd != u32::MAX {
        call.fd
    } else {
        // SAFETY: copied out at once.
        match unsafe { SSL_SOCKETS.get(&[tgid as u64, call.ssl]) } {
            Some([fd, _]) => *fd,
            None => {
                count(stat::TLS_NO_SOCKET);
                return 0;
            }
        }
    };
    let conn_id = if call.conn_id != 0 {
        call.conn_id
    } else {
        match lookup_or_track(tgid, fd) {
            Some(conn) => conn.conn_id,
            None => {
                count(stat::TLS_NO_SOCKET);
                return 0;
            }
        }
    };
    let saved = SavedArgs {
        kind: SavedArgs::BUF,
        fd,
        buf: call.buf,
        count: 0,
        conn_id,
        syscall: if call.direction == DIR_INGRESS {
            SYSCALL_SSL_READ
        } else {
            SYSCALL_SSL_WRITE
        },
        direction: call.direction,
        seq: call.seq,
        seq_valid: call.seq_valid,
        enter_ns: call.enter_ns,
        injected: Default::default(),
    };
    count(stat::TLS_CALLS);
    if call.after_gap != 0 {
        header_only(EventKind::ConnGap, tgid, pid_tgid as u32, fd, conn_id);
    }
    let end_ns = if call.direction == DIR_EGRESS {
        call.io_ns
    } else {
        0
    };
    emit_data(&saved, len, pid_tgid, end_ns);
    0
}

/// Whether thread `pid_tgid` is inside an SSL call the probes capture.
#[inline(always)]
pub fn in_any_ssl_call(pid_tgid: u64) -> bool {
    ssl_seen()
        // SAFETY: a presence check.
        && unsafe { SSL_CALLS.get(&pid_tgid) }.is_some()
}

/// Whether any traced thread has entered an SSL call yet (see `SSL_SEEN`).
#[inline(always)]
fn ssl_seen() -> bool {
    SSL_SEEN
        .get_ptr(0)
        // SAFETY: an aligned u64 map value.
        .is_some_and(|seen| unsafe { core::ptr::read_volatile(seen) } != 0)
}

/// Called for each socket syscall of a traced thread: when the thread is inside an SSL call,
/// records the call's socket (and the SSL object's, for later calls), marks the socket TLS and
/// returns true: the syscall's bytes are ciphertext. `io_ns` is when the syscall moved its
/// bytes (see `SslCall::io_ns`); `seq` gives the sequence number of the first of them,
/// asked for the call's first syscall only (see `SslCall::seq`).
#[inline(always)]
pub fn in_ssl_call(
    pid_tgid: u64,
    tgid: u32,
    fd: u32,
    conn: &ConnState,
    io_ns: u64,
    seq: impl FnOnce() -> Option<u32>,
) -> bool {
    // A flag this thread set is visible here: set by its own earlier uprobe, on this CPU or
    // before the thread moved.
    if !ssl_seen() {
        return false;
    }
    let Some(call) = SSL_CALLS.get_ptr_mut(&pid_tgid) else {
        return false;
    };
    // SAFETY: a map value pointer, valid for this program's run.
    let call = unsafe { &mut *call };
    call.io_ns = io_ns;
    if call.fd == fd {
        return true;
    }
    call.fd = fd;
    call.conn_id = conn.conn_id;
    if let Some(seq) = seq() {
        call.seq = seq;
        call.seq_valid = 1;
    }
    let key = [tgid as u64, call.ssl];
    // SAFETY: a map value pointer, valid for this program's run.
    if SSL_SOCKETS
        .get_ptr(&key)
        .is_none_or(|known| unsafe { (*known)[0] } != fd)
    {
        // The object's turns start with this call (a server's first read, a client's first
        // write).
        let mut turn = 0;
        let _ = turns::pick(&mut turn, call.direction, turns::KEEP_ALL, pid_tgid as u32);
        let _ = SSL_SOCKETS.insert(&key, &[fd, turn], 0);
    }
    mark_tls(tgid, fd);
    true
}
