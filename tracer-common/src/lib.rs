//! The ABI shared by tracer's eBPF programs (`tracer-ebpf`) and its agent (`tracer-user`).
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width fields with explicit padding, and
//! has its size pinned by a `const` assertion so that a layout change fails the build on both sides.
//! Event kinds are numbered and a number is never reused.
#![no_std]

pub mod turn;

/// Largest payload prefix a probe can copy per syscall (a power of two: probes mask with it).
pub const MAX_CAPTURE: usize = 4096;
/// Default payload prefix copied per syscall: enough for request lines and ordinary headers.
pub const DEFAULT_CAPTURE: u32 = 1024;
/// Bytes copied from the end of each syscall's buffer, so that message ends (a chunked body's
/// last-chunk) are visible even when the body is far larger than the prefix.
pub const TAIL_LEN: usize = 16;

/// Ring-buffer record kinds. The first field of every record is its [`EventHeader`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// [`DataEvent`] followed by `head_len` payload bytes.
    Data = 1,
    /// [`ConnEvent`]: a TCP socket seen for the first time (accept, connect, or first I/O).
    ConnOpen = 2,
    /// [`EventHeader`] only: the traced process closed the socket's fd.
    ConnClose = 3,
    /// [`EventHeader`] only: a send or receive failed with ECONNRESET or EPIPE.
    ConnReset = 4,
    /// [`EventHeader`] only (fd and conn_id zero): the process (thread group) exited.
    ProcessExit = 5,
    /// [`EventHeader`] only (fd and conn_id zero): the process ran execve; it is another
    /// program now (name, libraries), with the same pid.
    ProcessExec = 6,
    /// [`EventHeader`] only: calls on the connection went uncaptured (per-turn sampling of a
    /// shed process) up to the data event that follows; what its parser waited for is lost.
    ConnGap = 7,
    /// [`EventHeader`] only (fd and conn_id zero), written with a forced wakeup: a client
    /// socket in the injector's socket map was found in blocking mode; the agent takes it out
    /// now rather than at its next timed drain.
    InjectRelease = 8,
}

impl EventKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::ConnOpen,
            3 => Self::ConnClose,
            4 => Self::ConnReset,
            5 => Self::ProcessExit,
            6 => Self::ProcessExec,
            7 => Self::ConnGap,
            8 => Self::InjectRelease,
            _ => return None,
        })
    }
}

/// The common head of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u16,
    /// Events lost to a full ring buffer before this one was written, on all CPUs (a wrapping
    /// count): where it changed between two records, what went between them may be among the
    /// lost, which for a connection that closes is its last response.
    pub losses: u16,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    pub fd: u32,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// Identifies one socket's life in one fd slot: the (tgid, fd) pair is reused, this is not.
    pub conn_id: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 32);

/// Direction of a data event, seen from the traced process.
pub const DIR_EGRESS: u32 = 0;
pub const DIR_INGRESS: u32 = 1;

/// Which syscall family produced a data event (for diagnostics and stats).
pub const SYSCALL_READ: u32 = 0;
pub const SYSCALL_WRITE: u32 = 1;
pub const SYSCALL_READV: u32 = 2;
pub const SYSCALL_WRITEV: u32 = 3;
pub const SYSCALL_RECVFROM: u32 = 4;
pub const SYSCALL_SENDTO: u32 = 5;
pub const SYSCALL_RECVMSG: u32 = 6;
pub const SYSCALL_SENDMSG: u32 = 7;
pub const SYSCALL_SENDFILE: u32 = 8;
/// Plaintext read by OpenSSL's SSL_read/SSL_read_ex (an uprobe, not a syscall): the syscalls
/// underneath carried ciphertext and are not reported for that socket.
pub const SYSCALL_SSL_READ: u32 = 0x1_0000;
/// Plaintext passed to SSL_write/SSL_write_ex.
pub const SYSCALL_SSL_WRITE: u32 = 0x1_0001;

/// Whether a data event's bytes are TLS plaintext from the OpenSSL uprobes.
pub const fn is_tls_plaintext(syscall: u32) -> bool {
    syscall == SYSCALL_SSL_READ || syscall == SYSCALL_SSL_WRITE
}

/// Bytes one syscall moved on a traced socket. `head_len` payload bytes follow the struct in the
/// ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataEvent {
    pub hdr: EventHeader,
    /// Bytes the syscall moved (its return value).
    pub len: u64,
    pub direction: u32,
    pub syscall: u32,
    /// Bytes of payload that follow (a prefix of what moved; may be 0, e.g. for sendfile).
    pub head_len: u32,
    /// Valid bytes in `tail`: the last bytes moved (0 when `head_len == len`, as they are in the head).
    pub tail_len: u32,
    pub tail: [u8; TAIL_LEN],
    /// The trace identity the kernel gave the request this segment starts, when it did (see
    /// [`TraceCtx`]); all zero otherwise.
    pub ctx: TraceCtx,
    /// TCP sequence number of the segment's first byte, when known (`seq_valid`). Both ends
    /// of a connection see the same number for the same byte: it is what lets two agents that
    /// each saw one end agree on which request is which without any header.
    pub seq: u32,
    pub seq_valid: u32,
    /// When the bytes began to move, as early as a peer could have seen them: for sends the
    /// syscall's entry (syscall path, or where the sk_msg program noted it), else when the
    /// socket transmitted them (socket layer); `hdr.ts_ns` for receives. A send's `hdr.ts_ns`
    /// is when its last bytes were transmitted at the socket layer (its return if some were
    /// still queued), its return on the syscall path.
    pub start_ns: u64,
}
const _: () = assert!(core::mem::size_of::<DataEvent>() == 128);

/// A span identity decided in the kernel. Trace context injection needs the ids at the moment
/// a request is sent, long before the agent sees the event, so when injection is on the kernel
/// names both the server span of a request a thread reads and the client span of a request it
/// writes, and the agent adopts those names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCtx {
    pub trace_id_hi: u64,
    pub trace_id_lo: u64,
    pub span_id: u64,
    /// 0: none.
    pub parent_id: u64,
    /// `CTX_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TraceCtx>() == 40);

/// The context is set (the other bits mean nothing without it).
pub const CTX_VALID: u32 = 1;
/// The trace is sampled.
pub const CTX_SAMPLED: u32 = 1 << 1;
/// A server span: the kernel saw a request read (ids from an incoming `traceparent`, if any).
pub const CTX_SERVER: u32 = 1 << 2;
/// A client span whose context was written into the request (`traceparent` or `b3`).
pub const CTX_INJECTED: u32 = 1 << 3;
/// The parent came from an incoming `traceparent` header.
pub const CTX_FROM_HEADER: u32 = 1 << 4;
/// The thread was serving several requests at once: the parent was left out on purpose.
pub const CTX_AMBIGUOUS: u32 = 1 << 5;

/// `Config::inject` values.
pub const INJECT_OFF: u32 = 0;
pub const INJECT_TRACEPARENT: u32 = 1;
pub const INJECT_B3: u32 = 2;

/// Which end of the connection the traced process is, when the kernel knows it.
pub const ROLE_UNKNOWN: u16 = 0;
/// The socket came from accept(): the process is the server.
pub const ROLE_SERVER: u16 = 1;
/// The socket was connect()ed: the process is the client.
pub const ROLE_CLIENT: u16 = 2;

/// A TCP socket, first seen. Addresses are in network byte order; IPv4 uses the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub hdr: EventHeader,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub role: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// The opening thread's command name (NUL-padded): names short-lived processes (curl)
    /// that are gone before the agent could read /proc.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 88);

/// Settings the agent writes into the programs' read-only data before loading them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The agent's own pid: its exporter traffic is never traced.
    pub self_tgid: u32,
    /// Non-zero: trace only the thread groups present in the `TRACED_PIDS` map.
    pub filter_pids: u32,
    /// Payload prefix to copy per syscall (clamped to [`MAX_CAPTURE`]).
    pub capture_bytes: u32,
    /// Non-zero: a traced process's forked children are traced too.
    pub follow_forks: u32,
    /// Non-zero: also trace threads whose command name is in the `TRACED_COMMS` map.
    pub filter_comms: u32,
    /// Offset of `child_pid` in the `sched:sched_process_fork` record, read from tracefs: its
    /// layout changed across kernels (6.x made the comm fields `__data_loc`).
    pub fork_child_pid_offset: u32,
    /// `INJECT_*`: which header the sk_msg program adds to outgoing HTTP/1.x requests.
    pub inject: u32,
    /// Non-zero: only destinations in the `INJECT_PORTS` map get headers.
    pub inject_filter_ports: u32,
    /// Non-zero: only destinations in the `INJECT_NETS` trie get headers.
    pub inject_filter_nets: u32,
    /// Non-zero: the kernel names server spans (`TraceCtx`); on whenever injection is.
    pub kernel_ctx: u32,
    /// Non-zero: trace only tasks in the network namespace with this inode number (one
    /// tracer per container or per test host).
    pub netns_inum: u32,
    /// Offset of `bool group_dead` in the sched_process_exit record (kernels since 6.16 have
    /// it); 0: not there, a thread group is taken as dead when its main thread exits.
    pub exit_group_dead_offset: u32,
    /// Non-zero: socket I/O is watched at the socket layer (`sock:sock_send_length`,
    /// `sock:sock_recv_length`), not at syscall entry and exit. The agent sets it when the
    /// kernel's BTF has those tracepoints; the programs that serve both ways read it.
    pub sock_hooks: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 52);

/// Byte offsets of the kernel struct fields the probes read, taken from the running kernel's BTF
/// by the agent at start: a hand-made CO-RE, since the probes walk `task->files->fdt->fd[fd]`
/// to tell sockets from other fds and read their addresses. An offset of `u32::MAX` means the
/// field is absent (the probe then skips the check that needs it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_inode: u32,
    pub file_private_data: u32,
    pub inode_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sk_family: u32,
    pub sk_protocol: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    /// `task_struct.nsproxy`, `nsproxy.net_ns`, and `net.ns.inum`: the network namespace of
    /// the current task, for `Config::netns_inum`.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    pub net_ns_inum: u32,
    /// `tcp_sock.write_seq` and `tcp_sock.copied_seq`: TCP sequence numbers of the next byte
    /// written and read, the same numbers on both ends of a connection.
    pub tcp_write_seq: u32,
    pub tcp_copied_seq: u32,
    /// `task_struct.group_leader` and `task_struct.comm`: the process's own name (its main
    /// thread's), which a worker thread's name (Puma's "puma srv tp 001") is not.
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `tcp_sock.snd_nxt` and `tcp_sock.tcp_wstamp_ns`: how far the socket has transmitted,
    /// and when it last did (see tracer-ebpf's `sockio::transmitted`).
    pub tcp_snd_nxt: u32,
    pub tcp_wstamp_ns: u32,
    /// `sock.sk_socket`, `socket.file` and `file.f_flags`: whether a socket is in blocking
    /// mode (no `O_NONBLOCK`), which the injector leaves alone.
    pub sk_socket: u32,
    pub socket_file: u32,
    pub file_flags: u32,
    pub _pad: [u32; 2],
    /// Non-zero once the agent has filled the struct in (the probes trace nothing before).
    pub valid: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 128);

/// What a syscall's enter saved for its exit, in the `ACTIVE` map keyed by pid_tgid. The agent
/// also writes entries for threads it finds blocked in a socket read when it attaches, so that
/// the bytes that read returns are not lost (`conn_id` 0: resolve the socket at exit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SavedArgs {
    pub kind: u32,
    pub fd: u32,
    /// A user buffer (`BUF`) or an iovec array (`IOV`).
    pub buf: u64,
    /// The iovec count (`IOV`).
    pub count: u64,
    pub conn_id: u64,
    pub syscall: u32,
    pub direction: u32,
    /// TCP sequence number of the first byte this syscall moves (`seq_valid`).
    pub seq: u32,
    pub seq_valid: u32,
    /// When the syscall entered: a send's bytes leave during the call, so its start is when
    /// they began to go (the peer may read them before the sender's call returns).
    pub enter_ns: u64,
    /// The client context the sk_msg program wrote into this send, for its exit to report
    /// (`flags` 0: none).
    pub injected: TraceCtx,
}
const _: () = assert!(core::mem::size_of::<SavedArgs>() == 96);

impl SavedArgs {
    /// The thread's slot holds nothing: no syscall of interest is under way.
    pub const EMPTY: u32 = 0;
    pub const ACCEPT: u32 = 1;
    pub const CONNECT: u32 = 2;
    pub const BUF: u32 = 3;
    pub const IOV: u32 = 4;
    /// Bytes move but none are visible (sendfile).
    pub const NO_PAYLOAD: u32 = 5;
}

/// A TCP connection as the socket map knows it: addresses in network byte order (IPv4 as
/// IPv4-mapped IPv6), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u32,
    pub remote_port: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 40);

/// Key of the `INJECT_NETS` LPM trie: prefix length in bits, then an IPv6 (or IPv4-mapped)
/// address in network byte order.
pub type NetKeyData = [u8; 16];

/// Indexes of the per-CPU counters in the `STATS` map.
pub mod stat {
    /// Records the ring buffer had no room for (never silent: reported by the agent).
    pub const RINGBUF_LOST: u32 = 0;
    /// Data events emitted.
    pub const DATA_EVENTS: u32 = 1;
    /// Sockets resolved and added to the connection map.
    pub const CONNS_OPENED: u32 = 2;
    /// A kernel read the probes needed failed (stale offsets would show up here).
    pub const READ_ERRORS: u32 = 3;
    /// Syscalls of traced threads not captured because the saved-arguments map (a slot per
    /// traced thread, freed at thread exit) was full.
    pub const SAVED_ARGS_FULL: u32 = 4;
    /// Syscalls whose payload copy from user memory failed.
    pub const PAYLOAD_FAULTS: u32 = 5;
    /// Requests that got a trace context header in the kernel.
    pub const INJECTED: u32 = 6;
    /// Requests that could have had one but did not: the header was already there, the head
    /// was not whole in one send, or the kernel refused to grow the message.
    pub const INJECT_SKIPPED: u32 = 7;
    /// Connections put in the socket map at establishment (sk_msg then sees their sends).
    pub const INJECT_SOCKETS: u32 = 8;
    /// bpf_msg_push_data / pull_data failures.
    pub const INJECT_ERRORS: u32 = 9;
    /// OpenSSL calls whose plaintext was reported.
    pub const TLS_CALLS: u32 = 10;
    /// OpenSSL calls that moved data but whose socket could not be told (no syscall under
    /// the call and none seen before for that SSL object): the plaintext is dropped.
    pub const TLS_NO_SOCKET: u32 = 11;
    /// Socket sends and receives of traced processes that moved bytes while the agent shed
    /// their capture (a CPU-bound traced thread over its overhead budget): not captured.
    pub const SHED_IO: u32 = 12;
    /// Client connections of traced processes left out of the socket map, or taken out of it,
    /// because their socket is in blocking mode (see tracer-ebpf's `inject::blocking`).
    pub const INJECT_BLOCKING: u32 = 13;
    pub const COUNT: u32 = 14;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and made only of integers and byte arrays with no
    // implicit padding (the size assertions above pin that).
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::DataEvent {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::SavedArgs {}
    unsafe impl aya::Pod for super::TraceCtx {}
    unsafe impl aya::Pod for super::SockKey {}
}
