//! Which fds are TCP sockets, and their addresses: accept, connect and close, and the lazy
//! resolution that also covers sockets opened before the tracer started.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    ConnEvent, EventHeader, EventKind, ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN, SavedArgs, stat,
};

use crate::{ACTIVE, CONNS, EVENTS, SK_OWNERS, count, is_traced};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: i16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const EINPROGRESS: i64 = 115;
pub(crate) const ABSENT: u32 = u32::MAX;

/// A traced socket, as the kernel side remembers it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnState {
    pub conn_id: u64,
    /// The `struct sock *`, for reading sequence numbers (never dereferenced directly).
    pub sk: u64,
    /// `CONN_*` bits; from `TURN_SHIFT` up, the connection's turn state for per-turn
    /// sampling where the syscall probes capture (`turns`; the socket-layer programs keep it
    /// on the socket).
    pub flags: u64,
}

/// Where a `ConnState`'s turn state starts in its flags.
pub const TURN_SHIFT: u32 = 32;

/// The socket carries TLS whose plaintext the OpenSSL probes report: its syscalls move
/// ciphertext, which is not copied.
pub const CONN_TLS: u64 = 1;

/// The fd is not a TCP socket (a file, a pipe, a UNIX socket): remembered so that its reads
/// and writes are dismissed without walking the fd table each time. Dropped at close like a
/// socket's entry; a socket that replaces it by accept or connect overwrites it.
pub const CONN_NOT_TCP: u64 = 2;

/// Marks `(tgid, fd)` as a TLS socket.
#[inline(always)]
pub fn mark_tls(tgid: u32, fd: u32) {
    if let Some(state) = CONNS.get_ptr_mut(&conn_key(tgid, fd)) {
        // SAFETY: a map value pointer, valid for this program's run.
        unsafe { (*state).flags |= CONN_TLS };
    }
}

#[inline(always)]
pub fn conn_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

#[inline(always)]
pub(crate) unsafe fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

/// Follows `current->files->fdt->fd[fd]` and returns the `struct sock *` when the fd is a TCP
/// socket (IPv4 or IPv6), or null.
#[inline(always)]
unsafe fn tcp_sock_of_fd(fd: u32) -> Result<*const u8, i32> {
    if offset!(valid) == 0 {
        return Ok(core::ptr::null());
    }
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files: *const u8 = read_at(task, offset!(task_files))?;
        let fdt: *const u8 = read_at(files, offset!(files_fdt))?;
        let max_fds: u32 = read_at(fdt, offset!(fdt_max_fds))?;
        if fd >= max_fds {
            return Ok(core::ptr::null());
        }
        let fd_array: *const u8 = read_at(fdt, offset!(fdt_fd))?;
        let file: *const u8 =
            bpf_probe_read_kernel(fd_array.add(fd as usize * 8) as *const *const u8)?;
        if file.is_null() {
            return Ok(core::ptr::null());
        }
        let inode: *const u8 = read_at(file, offset!(file_inode))?;
        let mode: u16 = read_at(inode, offset!(inode_mode))?;
        if mode & S_IFMT != S_IFSOCK {
            return Ok(core::ptr::null());
        }
        let socket: *const u8 = read_at(file, offset!(file_private_data))?;
        let sock_type: i16 = read_at(socket, offset!(socket_type))?;
        if sock_type != SOCK_STREAM {
            return Ok(core::ptr::null());
        }
        let sk: *const u8 = read_at(socket, offset!(socket_sk))?;
        if sk.is_null() || !is_tcp(sk) {
            return Ok(core::ptr::null());
        }
        Ok(sk)
    }
}

/// Reads the socket's addresses into `ev`.
#[inline(always)]
unsafe fn read_addresses(sk: *const u8, ev: &mut ConnEvent) -> Result<(), i32> {
    unsafe {
        let family: u16 = read_at(sk, offset!(sk_family))?;
        ev.family = family;
        let dport: u16 = read_at(sk, offset!(sk_dport))?;
        ev.remote_port = u16::from_be(dport);
        ev.local_port = read_at(sk, offset!(sk_num))?;
        if family == AF_INET {
            let daddr: [u8; 4] = read_at(sk, offset!(sk_daddr))?;
            let saddr: [u8; 4] = read_at(sk, offset!(sk_rcv_saddr))?;
            ev.remote_addr[..4].copy_from_slice(&daddr);
            ev.local_addr[..4].copy_from_slice(&saddr);
        } else {
            ev.remote_addr = read_at(sk, offset!(sk_v6_daddr))?;
            ev.local_addr = read_at(sk, offset!(sk_v6_rcv_saddr))?;
        }
    }
    Ok(())
}

/// The current process's name: its main thread's comm, as /proc/PID/comm shows it (a worker
/// thread may have named itself otherwise), read now, before an exec can change it. Falls back
/// to the thread's own comm.
#[inline(always)]
pub fn process_comm() -> [u8; 16] {
    // SAFETY: probe reads of kernel memory at BTF-derived offsets; failures fall back.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        if let Ok(leader) = read_at::<*const u8>(task, offset!(task_group_leader))
            && !leader.is_null()
            && let Ok(comm) = read_at::<[u8; 16]>(leader, offset!(task_comm))
        {
            return comm;
        }
    }
    bpf_get_current_comm().unwrap_or([0; 16])
}

/// Starts tracking `fd` of the current thread group if it is a TCP socket, and tells userspace.
/// Returns the new connection id, or None when the fd is not a TCP socket.
#[inline(always)]
pub fn track(fd: u32, role: u16) -> Option<ConnState> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: reads of kernel memory through bpf_probe_read_kernel, which fault safely.
    let sk = match unsafe { tcp_sock_of_fd(fd) } {
        Ok(sk) if !sk.is_null() => sk,
        Ok(_) => {
            let not_tcp = ConnState {
                conn_id: 0,
                sk: 0,
                flags: CONN_NOT_TCP,
            };
            let _ = CONNS.insert(&conn_key(tgid, fd), &not_tcp, 0);
            return None;
        }
        Err(_) => {
            count(stat::READ_ERRORS);
            return None;
        }
    };
    track_socket(pid_tgid, fd, sk, role)
}

/// Starts tracking `fd`, known to be the TCP socket `sk`, and tells userspace.
#[inline(always)]
pub fn track_socket(pid_tgid: u64, fd: u32, sk: *const u8, role: u16) -> Option<ConnState> {
    let tgid = (pid_tgid >> 32) as u32;
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // The timestamp is unique enough per (tgid, fd): the same slot cannot be opened twice in
    // one nanosecond.
    let conn_id = ts_ns;
    let mut ev = ConnEvent {
        hdr: EventHeader {
            kind: EventKind::ConnOpen as u16,
            losses: crate::losses(),
            tgid,
            tid: pid_tgid as u32,
            fd,
            ts_ns,
            conn_id,
        },
        family: 0,
        role,
        local_port: 0,
        remote_port: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
        comm: process_comm(),
    };
    if unsafe { read_addresses(sk, &mut ev) }.is_err() {
        count(stat::READ_ERRORS);
        return None;
    }
    let key = conn_key(tgid, fd);
    if CONNS
        .insert(
            &key,
            &ConnState {
                conn_id,
                sk: sk as u64,
                flags: 0,
            },
            0,
        )
        .is_err()
    {
        return None;
    }
    // Without close syscalls, the socket's move to TCP_CLOSE ends the connection: remember
    // whose it is.
    if config!(sock_hooks) != 0 {
        let _ = SK_OWNERS.insert(&(sk as u64), &SockOwner { key, conn_id }, 0);
    }
    count(stat::CONNS_OPENED);
    if EVENTS
        .output::<ConnEvent>(&ev, crate::wakeup_flags())
        .is_err()
    {
        crate::event_lost();
    }
    Some(ConnState {
        conn_id,
        sk: sk as u64,
        flags: 0,
    })
}

/// Which traced connection a socket is (socket-layer hooks only): the `CONNS` key and the
/// connection id, for ending it when the socket closes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockOwner {
    pub key: u64,
    pub conn_id: u64,
}

/// Whether `sk` is an IPv4/IPv6 TCP socket.
#[inline(always)]
pub fn is_tcp(sk: *const u8) -> bool {
    // SAFETY: probe reads of the socket the kernel handed the tracepoint.
    unsafe {
        let Ok(family) = read_at::<u16>(sk, offset!(sk_family)) else {
            return false;
        };
        if family != AF_INET && family != AF_INET6 {
            return false;
        }
        offset!(sk_protocol) == ABSENT
            || read_at::<u16>(sk, offset!(sk_protocol)).is_ok_and(|p| p == IPPROTO_TCP)
    }
}

/// The connection id of `fd` if it is a traced TCP socket, resolving (and announcing) sockets
/// the tracer has not seen yet: those opened before it started, or passed in by a parent.
#[inline(always)]
pub fn lookup_or_track(tgid: u32, fd: u32) -> Option<ConnState> {
    // SAFETY: the value is copied out at once.
    if let Some(state) = unsafe { CONNS.get(&conn_key(tgid, fd)) } {
        return (state.flags & CONN_NOT_TCP == 0).then_some(*state);
    }
    track(fd, ROLE_UNKNOWN)
}

/// `lookup_or_track`, as the map entry itself: the syscall probes keep the connection's turn
/// state in it (see `TURN_SHIFT`).
#[inline(always)]
pub fn lookup_or_track_entry(tgid: u32, fd: u32) -> Option<&'static mut ConnState> {
    let key = conn_key(tgid, fd);
    let entry = match CONNS.get_ptr_mut(&key) {
        Some(entry) => entry,
        None => {
            track(fd, ROLE_UNKNOWN)?;
            CONNS.get_ptr_mut(&key)?
        }
    };
    // SAFETY: a map value pointer, valid for this program's run.
    let entry = unsafe { &mut *entry };
    (entry.flags & CONN_NOT_TCP == 0).then_some(entry)
}

/// The TCP sequence number of the next byte the socket will send (`egress`) or hand to the
/// reader, or None when unreadable.
#[inline(always)]
pub fn next_seq(sk: u64, egress: bool) -> Option<u32> {
    let field = if egress {
        offset!(tcp_write_seq)
    } else {
        offset!(tcp_copied_seq)
    };
    if sk == 0 || field == 0 || field == ABSENT {
        return None;
    }
    // SAFETY: a probe read of the socket the fd table pointed to.
    unsafe { read_at::<u32>(sk as *const u8, field) }.ok()
}

#[inline(always)]
pub fn header_only(kind: EventKind, tgid: u32, tid: u32, fd: u32, conn_id: u64) {
    let hdr = EventHeader {
        kind: kind as u16,
        losses: crate::losses(),
        tgid,
        tid,
        fd,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn_id,
    };
    if EVENTS
        .output::<EventHeader>(&hdr, crate::wakeup_flags())
        .is_err()
    {
        crate::event_lost();
    }
}

/// sys_enter_accept / sys_enter_accept4: nothing to save but the fact the call is under way.
#[tracepoint]
pub fn tracer_enter_accept(_ctx: TracePointContext) -> u32 {
    save_for_exit(SavedArgs::ACCEPT, 0);
    0
}

/// sys_exit_accept / sys_exit_accept4: `long ret` (the new fd) at offset 16.
#[tracepoint]
pub fn tracer_exit_accept(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if take_saved(pid_tgid).is_none() {
        return 0;
    }
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    exit_accept(ret);
    0
}

/// accept/accept4 returned `ret` (the new fd, or an error).
#[inline(always)]
pub fn exit_accept(ret: i64) {
    if ret >= 0 {
        track(ret as u32, ROLE_SERVER);
    }
}

/// accept/accept4 entered.
#[inline(always)]
pub fn enter_accept() {
    save_for_exit(SavedArgs::ACCEPT, 0);
}

/// sys_enter_connect: `int fd` at 16.
#[tracepoint]
pub fn tracer_enter_connect(ctx: TracePointContext) -> u32 {
    let fd: u64 = unsafe { ctx.read_at(16) }.unwrap_or(u64::MAX);
    enter_connect(fd);
    0
}

/// connect(fd, ...) entered.
#[inline(always)]
pub fn enter_connect(fd: u64) {
    if fd <= u32::MAX as u64 {
        save_for_exit(SavedArgs::CONNECT, fd as u32);
    }
}

/// sys_exit_connect: `long ret` at 16. A non-blocking connect returns -EINPROGRESS with the
/// local port already bound, so the addresses are complete either way.
#[tracepoint]
pub fn tracer_exit_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(saved) = take_saved(pid_tgid) else {
        return 0;
    };
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    exit_connect(saved, ret, pid_tgid);
    0
}

/// connect returned `ret` for the fd its entry saved.
#[inline(always)]
pub fn exit_connect(saved: SavedArgs, ret: i64, pid_tgid: u64) {
    if ret == 0 || ret == -EINPROGRESS {
        // A reconnect of the same fd would otherwise keep the stale entry.
        let _ = CONNS.remove(&conn_key((pid_tgid >> 32) as u32, saved.fd));
        track(saved.fd, ROLE_CLIENT);
    }
}

/// sys_enter_close: `int fd` at 16. Closing at enter is right: the fd is gone whatever close returns.
#[tracepoint]
pub fn tracer_enter_close(ctx: TracePointContext) -> u32 {
    let fd: u64 = unsafe { ctx.read_at(16) }.unwrap_or(u64::MAX);
    enter_close(fd);
    0
}

/// close(fd) entered.
#[inline(always)]
pub fn enter_close(fd: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_traced(tgid) {
        return;
    }
    if fd > u32::MAX as u64 {
        return;
    }
    let key = conn_key(tgid, fd as u32);
    // SAFETY: the value is copied out at once.
    let Some(state) = (unsafe { CONNS.get(&key) }).copied() else {
        return;
    };
    let _ = CONNS.remove(&key);
    if state.flags & CONN_NOT_TCP != 0 {
        return;
    }
    let conn_id = state.conn_id;
    header_only(
        EventKind::ConnClose,
        tgid,
        pid_tgid as u32,
        fd as u32,
        conn_id,
    );
}

#[inline(always)]
fn save_for_exit(kind: u32, fd: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return;
    }
    if let Some(slot) = saved_slot(pid_tgid) {
        slot.fd = fd;
        slot.conn_id = 0;
        slot.injected.flags = 0;
        slot.kind = kind;
    }
}

/// The thread's saved-arguments slot, made at its first use. The caller fills the fields the
/// exit will read, field by field: building the value on the stack and copying it in made the
/// compiler zero it with a byte-at-a-time memset call.
#[inline(always)]
pub fn saved_slot(pid_tgid: u64) -> Option<&'static mut SavedArgs> {
    if let Some(slot) = ACTIVE.get_ptr_mut(&pid_tgid) {
        // SAFETY: a map value; only this thread (and programs running in its syscalls) use
        // the slot.
        return Some(unsafe { &mut *slot });
    }
    if ACTIVE.insert(&pid_tgid, &SavedArgs::default(), 0).is_err() {
        count(stat::SAVED_ARGS_FULL);
        return None;
    }
    // SAFETY: as above.
    ACTIVE
        .get_ptr_mut(&pid_tgid)
        .map(|slot| unsafe { &mut *slot })
}

/// The arguments the thread's syscall entry saved, if any; the slot is emptied.
#[inline(always)]
pub fn take_saved(pid_tgid: u64) -> Option<SavedArgs> {
    let slot = ACTIVE.get_ptr_mut(&pid_tgid)?;
    // SAFETY: a map value, as in `saved_slot`.
    let slot = unsafe { &mut *slot };
    if slot.kind == SavedArgs::EMPTY {
        return None;
    }
    let saved = *slot;
    slot.kind = SavedArgs::EMPTY;
    Some(saved)
}

/// Empties the thread's slot: its syscall is of no interest (an entry the agent seeded for a
/// read under way at attach must not be taken for this one's).
#[inline(always)]
pub fn clear_saved(pid_tgid: u64) {
    if let Some(slot) = ACTIVE.get_ptr_mut(&pid_tgid) {
        // SAFETY: a map value, as in `saved_slot`.
        unsafe { (*slot).kind = SavedArgs::EMPTY };
    }
}
