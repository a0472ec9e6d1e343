//! Socket I/O watched at the socket layer: the `sock:sock_send_length` and
//! `sock:sock_recv_length` tracepoints (Linux 6.3+), BTF-typed, x86_64.
//!
//! Any syscall tracepoint, raw or per-syscall, puts every thread of every process on the
//! kernel's slow syscall path, and a raw one runs its program for every syscall on the host:
//! an untraced process paid for each of its syscalls. These tracepoints fire only where a
//! socket sends or receives, after the bytes moved, inside the syscall that moved them; one
//! program sees the socket, the byte count, and (from the task's saved registers) the
//! syscall's buffers. Nothing is saved between entry and exit, and no fd table is walked:
//! the tracepoint names the socket.
//!
//! A send is reported when it returns, and the reader of a loopback send may have run before
//! that: it is dated by when the socket transmitted its bytes (`transmitted`), which no
//! reader can precede, or where the sk_msg program watches the socket (clients whose
//! requests may get a trace context header), by when that program saw its first bytes. A
//! tracepoint at the send's start (`tcp:tcp_sendmsg_locked`) dated every send exactly, at
//! the price of a second program run on every send of every process on the host, traced or
//! not. `sock:inet_sock_set_state` ends a connection when its socket reaches TCP_CLOSE (there
//! are no close syscalls to watch).

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_task_btf, bpf_sk_storage_get, bpf_task_pt_regs},
    },
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use tracer_common::{DIR_EGRESS, DIR_INGRESS, EventKind, ROLE_UNKNOWN, SavedArgs, TraceCtx, stat};

use crate::{
    CONNS, SK_OWNERS, capture_mode, count,
    raw::{
        DI, DX, NR_READ, NR_READV, NR_RECVFROM, NR_RECVMSG, NR_SENDFILE, NR_SENDMSG, NR_SENDTO,
        NR_WRITE, NR_WRITEV, ORIG_AX, SI, btf_reg,
    },
    sockets::{
        ABSENT, CONN_NOT_TCP, CONN_TLS, ConnState, SockOwner, conn_key, header_only, is_tcp,
        next_seq, read_at, track_socket,
    },
    syscalls::emit_data,
    tls,
    turns::{self, Pick},
};

/// What is known of a send under way on a socket before the send returns: noted by the sk_msg
/// program (which may add a header) when it sees the send's first bytes, taken by
/// `sock_send_length` when the send returns.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SendNote {
    /// The sending thread: a note another thread left is not this send's.
    pub pid_tgid: u64,
    /// When the sk_msg program saw the send's first bytes (0: not yet).
    pub enter_ns: u64,
    pub seq: u32,
    pub seq_valid: u32,
    /// Non-zero: the sk_msg program's pick began a turn after skipped calls (`Pick::AfterGap`);
    /// the send is reported after a gap event.
    pub gap: u32,
    _pad: u32,
    /// The client context the sk_msg program wrote into this send (`flags` 0: none).
    pub injected: TraceCtx,
}

/// What the socket-layer programs keep on a socket: the note of a send under way, and which
/// traced connection the socket is, a copy of its `CONNS` entry. The `CONNS` lookup by
/// `(tgid, fd)` was a cold hash entry on every request once a server had a few dozen
/// connections; the socket's own storage is reached from the socket the tracepoint names,
/// and a send has already touched it for its note.
#[repr(C)]
pub struct SockState {
    pub note: SendNote,
    /// `conn_key(tgid, fd)` the copy below is of; 0: none.
    conn_key: u64,
    conn_id: u64,
    conn_flags: u64,
    /// The traced set's generation when copied. The copy is good while it is current: the
    /// agent bumps it after dropping `CONNS` entries (exits, execs) and once a second, so no
    /// copy outlives its entry by more than that, and the programs that remove an entry
    /// themselves (a socket's close, an fd reused) clear or bypass the copy.
    conn_generation: u64,
    /// Per-turn sampling's state of the connection (see `turns`).
    turn: u32,
    /// Non-zero: the socket reached TCP_CLOSE while a process had it open; the connection
    /// ends when a read sees the end, or at the socket's close (`tracer_sock_state`).
    close_pending: u32,
}

/// Socket storage, freed with the socket.
#[btf_map]
static SOCK_STATES: SkStorage<SockState> = SkStorage::new();

/// The state of socket `sk` (a BTF `struct sock *`); with `create`, made when the socket has
/// none.
#[inline(always)]
fn sock_state(sk: *mut core::ffi::c_void, create: bool) -> Option<&'static mut SockState> {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: `sk` is a socket pointer the verifier knows as such (a BTF-typed tracepoint
    // argument, or sk_msg's `sk`); the map is socket storage of `SockState`.
    let state = unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(SOCK_STATES).cast_mut().cast(),
            sk,
            core::ptr::null_mut(),
            flags,
        )
    } as *mut SockState;
    // SAFETY: storage of this socket, valid for the program's run.
    (!state.is_null()).then(|| unsafe { &mut *state })
}

// A note is begun by the sk_msg program and ended by the return of the same send, whatever
// becomes of it (see `sock_io`): a note left behind would be taken by the thread's next send on
// the socket (its start time, and a context that send does not carry, whose header went out in
// this one). No note is ended by a change of the process's capture mode: the send under way
// across it is the note's (ending it lost the context written into it, and the backend's span
// had a parent no captured call had).
impl SendNote {
    /// Whether thread `pid_tgid` has a send under way that the sk_msg program saw: one captured
    /// from its first bytes, which may carry a context the program wrote.
    #[inline(always)]
    fn begun(&self, pid_tgid: u64) -> bool {
        self.pid_tgid == pid_tgid && self.enter_ns != 0
    }

    /// Ends thread `pid_tgid`'s note, if it is the thread's.
    #[inline(always)]
    fn end(&mut self, pid_tgid: u64) {
        if self.pid_tgid == pid_tgid {
            self.enter_ns = 0;
            self.gap = 0;
            self.injected.flags = 0;
        }
    }
}

impl SockState {
    /// The send note for thread `pid_tgid` to begin: emptied first when another thread left it.
    #[inline(always)]
    fn note_for(&mut self, pid_tgid: u64) -> &mut SendNote {
        let note = &mut self.note;
        if note.pid_tgid != pid_tgid {
            note.pid_tgid = pid_tgid;
            note.enter_ns = 0;
            note.seq_valid = 0;
            note.gap = 0;
            note.injected.flags = 0;
        }
        note
    }
}

/// The send note of socket `sk` for thread `pid_tgid` (made when the socket has none), when
/// the send under way is captured: `keep` as in `turns::pick`. The first hook of a send to
/// get here picks its turn; the others find the pick made. A TLS socket's turns are the SSL
/// probes' to pick (see `sock_io`): its sends are noted.
#[inline(always)]
pub fn send_sampled(
    sk: *mut core::ffi::c_void,
    pid_tgid: u64,
    keep: u32,
) -> Option<&'static mut SendNote> {
    let state = sock_state(sk, true)?;
    let mut gap = false;
    if turns::sampled(keep) && state.conn_flags & CONN_TLS == 0 {
        match turns::pick(&mut state.turn, DIR_EGRESS, keep, pid_tgid as u32) {
            Pick::Skip => return None,
            Pick::AfterGap => gap = true,
            Pick::Capture => {}
        }
    }
    let note = state.note_for(pid_tgid);
    if gap {
        // The socket-layer hook, which reports the send, finds the turn picked already.
        note.gap = 1;
    }
    Some(note)
}

const TCP_CLOSE: i32 = 7;
const MSG_PEEK: i32 = 2;
const ECONNRESET: i64 = 104;
const EPIPE: i64 = 32;

/// sock_send_length(struct sock *sk, int ret, int flags)
#[btf_tracepoint(function = "sock_send_length")]
pub fn tracer_sock_send(ctx: BtfTracePointContext) -> i32 {
    sock_io(&ctx, DIR_EGRESS);
    0
}

/// sock_recv_length(struct sock *sk, int ret, int flags)
#[btf_tracepoint(function = "sock_recv_length")]
pub fn tracer_sock_recv(ctx: BtfTracePointContext) -> i32 {
    sock_io(&ctx, DIR_INGRESS);
    0
}

/// Notes in `note` that its send begins now, with the sequence number of its first byte, unless
/// an earlier piece of the same send did: for the sk_msg program, which runs before the bytes
/// are queued, and before any header it adds (the sequence number is still that of the
/// sender's first byte).
#[inline(always)]
pub fn note_send_start(note: &mut SendNote, sk: u64) {
    if note.enter_ns != 0 {
        return;
    }
    // SAFETY: no preconditions.
    note.enter_ns = unsafe { bpf_ktime_get_ns() };
    match next_seq(sk, true) {
        Some(seq) => {
            note.seq = seq;
            note.seq_valid = 1;
        }
        None => note.seq_valid = 0,
    }
}

/// How far socket `sk` had transmitted a send of `len` bytes whose first is `first_seq`, when
/// the send returned at `now`: `(at, all)`, the socket's departure time of its last segment
/// and whether that carried the send's last byte, if any of the send's bytes had gone by then.
/// A loopback peer can read them from that moment, before the sender's call returns; bytes
/// still queued (Nagle, cork, a full window) reach no one before `now`. For a send of one
/// segment `at` is its transmission, a few microseconds after the call began.
#[inline(always)]
fn transmitted(sk: u64, first_seq: u32, len: u32, now: u64) -> Option<(u64, bool)> {
    let (snd_nxt, wstamp) = (offset!(tcp_snd_nxt), offset!(tcp_wstamp_ns));
    if snd_nxt == 0 || snd_nxt == ABSENT || wstamp == 0 || wstamp == ABSENT {
        return None;
    }
    // SAFETY: probe reads of the socket the kernel handed the tracepoint.
    let sent_up_to = unsafe { read_at::<u32>(sk as *const u8, snd_nxt) }.ok()?;
    let sent = sent_up_to.wrapping_sub(first_seq) as i32;
    if sent <= 0 {
        return None;
    }
    // SAFETY: as above.
    let at = unsafe { read_at::<u64>(sk as *const u8, wstamp) }.ok()?;
    // With pacing the stamp is the next departure, which may be ahead of now.
    (at != 0).then_some((if at < now { at } else { now }, sent as u32 >= len))
}

/// inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate): a
/// traced connection whose socket reaches TCP_CLOSE is over. Runs for every TCP state change
/// on the host; all but the closes of traced sockets leave at the first or second test.
///
/// A socket a process still has open may reach TCP_CLOSE before its owner has read all it
/// received (a client that shut down its sending side after the request, when the server's
/// FIN comes), or while its owner is inside a read whose report is still to come: ended here,
/// the connection's last reads would be another's (or the request "closed before response").
/// Its connection ends instead at the read that sees the end (`pending_close`), or when its
/// owner closes it (`tracer_sock_destroy`), whichever comes first: both after its reads.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tracer_sock_state(ctx: BtfTracePointContext) -> i32 {
    let newstate: i32 = ctx.arg(2);
    if newstate != TCP_CLOSE {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    // SAFETY: copied out at once.
    let Some(owner) = (unsafe { SK_OWNERS.get(&sk) }).copied() else {
        return 0;
    };
    let mut state = sock_state(ctx.arg(0), false);
    if let Some(st) = state.as_deref_mut()
        && still_open(sk)
    {
        st.close_pending = 1;
        return 0;
    }
    end_conn(sk, owner, state);
    0
}

/// tcp_destroy_sock(struct sock *sk): the socket is freed, and its memory may hold the next
/// socket made, which its address must not take for this one's connection. A close that
/// `tracer_sock_state` left to its owner ends here if the owner closed the socket without
/// reading to the end (or its reads were not captured: a shed process).
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tracer_sock_destroy(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    // SAFETY: copied out at once.
    if let Some(owner) = (unsafe { SK_OWNERS.get(&sk) }).copied() {
        end_conn(sk, owner, sock_state(ctx.arg(0), false));
    }
    0
}

/// Ends the traced connection `owner` of socket `sk` (`state`: the socket's storage).
#[inline(always)]
fn end_conn(sk: u64, owner: SockOwner, state: Option<&mut SockState>) {
    let _ = SK_OWNERS.remove(&sk);
    // SAFETY: copied out at once.
    if unsafe { CONNS.get(&owner.key) }.is_some_and(|c| c.conn_id == owner.conn_id) {
        let _ = CONNS.remove(&owner.key);
    }
    if let Some(st) = state {
        st.conn_key = 0;
        st.close_pending = 0;
    }
    // Often in softirq, on no particular thread: the tid is not the owner's.
    header_only(
        EventKind::ConnClose,
        (owner.key >> 32) as u32,
        0,
        owner.key as u32,
        owner.conn_id,
    );
}

/// Whether a process still has socket `sk` open (it is not orphaned: `sock.sk_socket` set).
#[inline(always)]
fn still_open(sk: u64) -> bool {
    if offset!(valid) == 0 {
        return false;
    }
    // SAFETY: a probe read of the socket the tracepoint names.
    unsafe { read_at::<u64>(sk as *const u8, offset!(sk_socket)) }.is_ok_and(|socket| socket != 0)
}

/// A read of socket `sk` saw the end of the peer's bytes: a close that waited for its owner
/// to read what came before it (`tracer_sock_state`) happens now. (Not at the read that takes
/// the last bytes: checked there, on every read's path, the program took three times the
/// verifier's work. A response framed by the close is read to the end anyway; one that is
/// not ends its connection when its owner closes the socket.)
#[inline(always)]
fn pending_close(sk: u64, state: Option<&'static mut SockState>) {
    let Some(st) = state else {
        return;
    };
    if st.close_pending == 0 {
        return;
    }
    // SAFETY: copied out at once.
    match (unsafe { SK_OWNERS.get(&sk) }).copied() {
        Some(owner) => end_conn(sk, owner, Some(st)),
        None => st.close_pending = 0,
    }
}

/// A send or receive of `ctx`'s socket returned.
#[inline(always)]
fn sock_io(ctx: &BtfTracePointContext, direction: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(keep) = capture_mode(tgid) else {
        return;
    };
    let ret = ctx.arg::<i32>(1) as i64;
    // A shed process: the call's turn decides, before anything else is looked at.
    let mut state = None;
    let mut gap = false;
    if turns::sampled(keep) {
        if ret <= 0 {
            // Nothing moved. A send the sk_msg program saw ends here all the same.
            if direction == DIR_EGRESS
                && let Some(st) = sock_state(ctx.arg(0), false)
            {
                st.note.end(pid_tgid);
            }
            return;
        }
        state = sock_state(ctx.arg(0), true);
        let Some(st) = state.as_deref_mut() else {
            return;
        };
        // A send the sk_msg program began to capture is captured, even if the process was
        // shed since: the program picked its turn then, or, the process captured in full,
        // picked none, and may have written a context into it that a span must carry.
        let keep = if direction == DIR_EGRESS && st.note.begun(pid_tgid) {
            turns::KEEP_ALL
        } else {
            keep
        };
        // Under an OpenSSL call the bytes are ciphertext, the call's probes pick its turn by
        // SSL object, and they must learn the socket here. A pick here as well would begin
        // turns of its own, and the mark a server turn leaves on the CPU would replace theirs
        // (the thread's client calls would follow a coin toss, not their request).
        if st.conn_flags & CONN_TLS == 0 && !tls::in_any_ssl_call(pid_tgid) {
            match turns::pick(&mut st.turn, direction, keep, pid_tgid as u32) {
                Pick::Skip => {
                    count(stat::SHED_IO);
                    return;
                }
                Pick::AfterGap => gap = true,
                Pick::Capture => {}
            }
        }
    }
    let generation = crate::generation();
    // What the sk_msg program noted of a send, and the context it wrote into it; the note is
    // ended whatever becomes of this send. (A receive leaves it.)
    let mut enter_ns = 0;
    let mut seq_at_start = None;
    let mut injected = TraceCtx::default();
    // A send looks first (its note); a receive when it has bytes to report.
    if direction == DIR_EGRESS {
        if state.is_none() {
            state = sock_state(ctx.arg(0), false);
        }
        // Only this thread's note: another thread's send may be under way on the socket.
        if let Some(st) = state.as_deref_mut()
            && st.note.pid_tgid == pid_tgid
        {
            let note = &mut st.note;
            enter_ns = note.enter_ns;
            if enter_ns != 0 && note.seq_valid != 0 {
                seq_at_start = Some(note.seq);
            }
            if note.injected.flags != 0 {
                injected = note.injected;
            }
            gap |= note.gap != 0;
            note.end(pid_tgid);
        }
    }
    let sk: u64 = ctx.arg(0);
    // SAFETY: the current task, BTF-typed; its saved user registers are plain loads.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    let syscall = btf_reg(regs, ORIG_AX) as i64;
    let kind = match (direction, syscall) {
        (DIR_INGRESS, NR_READ | NR_RECVFROM) | (DIR_EGRESS, NR_WRITE | NR_SENDTO) => SavedArgs::BUF,
        (DIR_INGRESS, NR_READV) | (DIR_EGRESS, NR_WRITEV) => SavedArgs::IOV,
        (DIR_INGRESS, NR_RECVMSG) | (DIR_EGRESS, NR_SENDMSG) => crate::syscalls::MSG,
        (DIR_EGRESS, NR_SENDFILE) => SavedArgs::NO_PAYLOAD,
        // io_uring, recvmmsg, splice, in-kernel users: their buffers are not in these
        // registers.
        _ => return,
    };
    let fd = btf_reg(regs, DI);
    if fd > i32::MAX as u64 {
        return;
    }
    let fd = fd as u32;
    if ret == 0 && direction == DIR_INGRESS {
        // The end of the peer's bytes: a close waiting for it happens now.
        pending_close(sk, sock_state(ctx.arg(0), false));
        return;
    }
    if ret <= 0 {
        // Nothing moved (mostly EAGAIN on a non-blocking socket): no reason to look further,
        // or to start tracking the socket. A reset ends what the connection was doing.
        if (ret == -ECONNRESET || ret == -EPIPE)
            && let Some(conn) = known_conn(tgid, fd, sk)
            && conn.flags & CONN_TLS == 0
        {
            header_only(
                EventKind::ConnReset,
                tgid,
                pid_tgid as u32,
                fd,
                conn.conn_id,
            );
        }
        return;
    }
    if direction == DIR_INGRESS && state.is_none() {
        state = sock_state(ctx.arg(0), false);
    }
    let Some(conn) = socket_conn_cached(&mut state, ctx, pid_tgid, fd, sk, generation) else {
        return;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // The bytes moved already: the sequence number of the first is where the socket stands
    // now, less the count, unless the sk_msg program noted it before the send began (it may
    // have added bytes). A send needs it now; a receive only if it is reported (an SSL
    // call's asks for its first syscall's only).
    let read_seq = || match seq_at_start {
        Some(seq) => Some(seq),
        None => next_seq(sk, direction == DIR_EGRESS).map(|s| s.wrapping_sub(ret as u32)),
    };
    let send_seq = (direction == DIR_EGRESS).then(read_seq);
    let seq = || send_seq.unwrap_or_else(read_seq);
    // When the bytes moved, as a peer can tell: a receive's were all in by its return; a
    // send's last ones left when its socket transmitted them (see `transmitted`), or are
    // still queued; its first ones when the sk_msg program saw them, or, without its note,
    // no later than the socket's last transmission of them (one segment: the same moment).
    let sent = send_seq
        .flatten()
        .and_then(|first| transmitted(sk, first, ret as u32, now));
    let end_ns = match sent {
        Some((at, true)) => at,
        _ => now,
    };
    let start_ns = match (enter_ns, sent) {
        (0, Some((at, _))) => at,
        (0, None) => now,
        (noted, _) => noted,
    };
    // Inside an OpenSSL call the bytes are ciphertext: the call's own probes report the
    // plaintext (with the first byte's sequence number), and learn here which socket it uses.
    if tls::in_ssl_call(pid_tgid, tgid, fd, &conn, end_ns, seq) {
        // It marked the `CONNS` entry TLS; the socket's copy must say so as well.
        if let Some(st) = state.as_deref_mut()
            && st.conn_key == conn_key(tgid, fd)
        {
            st.conn_flags |= CONN_TLS;
        }
        return;
    }
    if conn.flags & CONN_TLS != 0 {
        return;
    }
    let flags: i32 = ctx.arg(2);
    if direction == DIR_INGRESS && flags & MSG_PEEK != 0 {
        // The same bytes will be read again.
        return;
    }
    // Captured in full: the turn state learns the call all the same, to say when a gap ends.
    if !turns::sampled(keep)
        && let Some(st) = state.as_deref_mut()
    {
        gap |= turns::pick(&mut st.turn, direction, turns::KEEP_ALL, pid_tgid as u32)
            == Pick::AfterGap;
    }
    if gap {
        header_only(EventKind::ConnGap, tgid, pid_tgid as u32, fd, conn.conn_id);
    }
    let (kind, buf, count) = match kind {
        SavedArgs::BUF => (kind, btf_reg(regs, SI), 0),
        SavedArgs::IOV => (kind, btf_reg(regs, SI), btf_reg(regs, DX)),
        // sendmsg/recvmsg: `struct user_msghdr *` with msg_iov at 16 and msg_iovlen at 24.
        crate::syscalls::MSG => {
            let [iov, iovlen] = crate::syscalls::msg_iov(btf_reg(regs, SI));
            (SavedArgs::IOV, iov, iovlen)
        }
        _ => (SavedArgs::NO_PAYLOAD, 0, 0),
    };
    let seq = seq();
    let saved = SavedArgs {
        kind,
        fd,
        buf,
        count,
        conn_id: conn.conn_id,
        syscall: syscall as u32,
        direction,
        seq: seq.unwrap_or(0),
        seq_valid: u32::from(seq.is_some()),
        enter_ns: start_ns,
        injected,
    };
    emit_data(&saved, ret as u64, pid_tgid, end_ns);
}

/// The traced connection `fd` is, if the socket map already has it as `sk`.
#[inline(always)]
fn known_conn(tgid: u32, fd: u32, sk: u64) -> Option<ConnState> {
    // SAFETY: copied out at once.
    let state = (unsafe { CONNS.get(&conn_key(tgid, fd)) }).copied()?;
    (state.sk == sk && state.flags & CONN_NOT_TCP == 0).then_some(state)
}

/// The traced connection `fd` is, from the socket's copy of its `CONNS` entry while that is
/// current, else from `CONNS` (tracking the socket when new), copied to the socket for the
/// next time. `state` is the socket's storage if it has any yet.
#[inline(always)]
fn socket_conn_cached(
    state: &mut Option<&'static mut SockState>,
    ctx: &BtfTracePointContext,
    pid_tgid: u64,
    fd: u32,
    sk: u64,
    generation: u32,
) -> Option<ConnState> {
    let key = conn_key((pid_tgid >> 32) as u32, fd);
    let generation = generation as u64;
    let conn = match state.as_deref() {
        Some(st) if st.conn_key == key && st.conn_generation == generation => ConnState {
            conn_id: st.conn_id,
            sk,
            flags: st.conn_flags,
        },
        _ => {
            let conn = socket_conn(pid_tgid, fd, sk)?;
            if state.is_none() {
                *state = sock_state(ctx.arg(0), true);
            }
            if let Some(st) = state.as_deref_mut() {
                st.conn_key = key;
                st.conn_id = conn.conn_id;
                st.conn_flags = conn.flags;
                st.conn_generation = generation;
            }
            conn
        }
    };
    (conn.flags & CONN_NOT_TCP == 0).then_some(conn)
}

/// The connection `fd` is in `CONNS` (perhaps a not-TCP entry), starting to track it when new.
/// An fd that names another socket than the map says was closed and reused unseen: that
/// connection ends here (its socket may still be on its way to TCP_CLOSE).
#[inline(always)]
fn socket_conn(pid_tgid: u64, fd: u32, sk: u64) -> Option<ConnState> {
    let tgid = (pid_tgid >> 32) as u32;
    let key = conn_key(tgid, fd);
    // SAFETY: copied out at once.
    if let Some(state) = (unsafe { CONNS.get(&key) }).copied() {
        if state.sk == sk {
            return Some(state);
        }
        if state.flags & CONN_NOT_TCP == 0 {
            let _ = SK_OWNERS.remove(&state.sk);
            header_only(
                EventKind::ConnClose,
                tgid,
                pid_tgid as u32,
                fd,
                state.conn_id,
            );
        }
    }
    if !is_tcp(sk as *const u8) {
        let not_tcp = ConnState {
            conn_id: 0,
            sk,
            flags: CONN_NOT_TCP,
        };
        let _ = CONNS.insert(&key, &not_tcp, 0);
        return Some(not_tcp);
    }
    // A socket already closed is no new connection: a send that raced the peer's reset
    // returns its count after `inet_sock_set_state` ended the connection, and tracking the
    // socket again would start a connection with the tail of a response (a body such as
    // "hello\n" then reads as a request).
    // SAFETY: a probe read of the socket the kernel handed the tracepoint.
    if unsafe { read_at::<u8>(sk as *const u8, offset!(sk_family) + SKC_STATE_AFTER_FAMILY) }
        .is_ok_and(|state| state as i32 == TCP_CLOSE)
    {
        return None;
    }
    track_socket(pid_tgid, fd, sk as *const u8, ROLE_UNKNOWN)
}

/// `skc_state` follows `skc_family` (an unsigned short) in `struct sock_common`, in every
/// kernel since 2.6.
const SKC_STATE_AFTER_FAMILY: u32 = 2;
