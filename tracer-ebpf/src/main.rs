//! tracer's eBPF programs. They watch socket I/O from tracepoints only (kprobes and fentry are
//! not available on every kernel tracer runs on), filter in the kernel (traced process set,
//! TCP sockets only), and send what a request parser needs to userspace through one ring
//! buffer.
//!
//! Files: `sockio.rs` (socket I/O at the socket layer, the default where the kernel has those
//! tracepoints), `raw.rs` and `syscalls.rs` (the same from syscall tracepoints, the fallback),
//! `sockets.rs` (fd -> socket resolution, accept, connect, close), `process.rs` (fork and
//! exit, for the traced set), `inject.rs` (span ids named in the kernel, and trace context
//! written into requests), `tls.rs` (OpenSSL uprobes: plaintext of TLS sockets), `turns.rs`
//! (per-turn sampling of the processes the agent sheds).
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target's core has no atomic read-modify-write types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

/// One field of the load-time `CONFIG`. `Global::load` copies the whole value with a volatile
/// read that LLVM may not shrink to the fields used: each call site's copy took stack slots of
/// its own, and together they pushed the sys_enter program past the 512-byte stack limit.
macro_rules! config {
    ($field:ident) => {{
        // Used inside unsafe blocks as well as out of them.
        #[allow(unused_unsafe)]
        // SAFETY: `Global<T>` is `repr(transparent)` over an initialized `T`.
        let value = unsafe { core::ptr::read_volatile(&raw const (*crate::config_ptr()).$field) };
        value
    }};
}

/// One field of the load-time `OFFSETS` (see `config!`).
macro_rules! offset {
    ($field:ident) => {{
        // Used inside unsafe blocks as well as out of them.
        #[allow(unused_unsafe)]
        // SAFETY: `Global<T>` is `repr(transparent)` over an initialized `T`.
        let value = unsafe { core::ptr::read_volatile(&raw const (*crate::offsets_ptr()).$field) };
        value
    }};
}

mod inject;
mod process;
// x86_64 register offsets and syscall numbers: the agent attaches these only there.
mod raw;
mod sockets;
// x86_64 register offsets and syscall numbers, as in `raw`.
mod sockio;
mod syscalls;
mod tls;
mod turns;

use aya_ebpf::{
    Global,
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{Config, KernelOffsets, MAX_CAPTURE, stat};

/// Written by the agent before load.
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config {
    self_tgid: 0,
    filter_pids: 1,
    capture_bytes: 0,
    follow_forks: 0,
    filter_comms: 0,
    fork_child_pid_offset: 0,
    inject: 0,
    inject_filter_ports: 0,
    inject_filter_nets: 0,
    kernel_ctx: 0,
    netns_inum: 0,
    exit_group_dead_offset: 0,
    sock_hooks: 0,
});

#[inline(always)]
fn config_ptr() -> *const Config {
    (&raw const CONFIG).cast()
}

#[inline(always)]
fn offsets_ptr() -> *const KernelOffsets {
    (&raw const OFFSETS).cast()
}

/// Written by the agent before load, from the running kernel's BTF.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_inode: 0,
    file_private_data: 0,
    inode_mode: 0,
    socket_type: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_protocol: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    task_nsproxy: 0,
    nsproxy_net_ns: 0,
    net_ns_inum: 0,
    tcp_write_seq: 0,
    tcp_copied_seq: 0,
    task_group_leader: 0,
    task_comm: 0,
    tcp_snd_nxt: 0,
    tcp_wstamp_ns: 0,
    sk_socket: 0,
    socket_file: 0,
    file_flags: 0,
    _pad: [0; 2],
    valid: 0,
});

/// All records for userspace. Sized by the agent at load time.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Thread groups to trace when `Config::filter_pids` is set. Value unused.
#[map]
static TRACED_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Sockets being traced, by `(tgid << 32) | fd`. LRU so that fds whose close we never saw
/// (the process died, or closed them with close_range) age out instead of filling the map.
#[map]
static CONNS: LruHashMap<u64, sockets::ConnState> = LruHashMap::with_max_entries(65536, 0);

/// The traced connection each socket is, by `struct sock *`, when the socket-layer hooks are
/// on: there are no close syscalls to watch then, and the socket's move to TCP_CLOSE
/// (`sock:inet_sock_set_state`) names only the socket. LRU like `CONNS`.
#[map]
static SK_OWNERS: LruHashMap<u64, sockets::SockOwner> = LruHashMap::with_max_entries(65536, 0);

/// Arguments saved at a syscall's enter for its exit, by pid_tgid: a slot per traced thread,
/// made at its first syscall of interest and removed when the thread exits
/// (`tracer_sched_exit`). Between syscalls the slot stays, marked `SavedArgs::EMPTY`: writing
/// through a looked-up value costs a lookup, where inserting and deleting an entry per syscall
/// cost several times that (bucket locks, the free list). A plain hash, cheaper than LRU.
#[map]
static ACTIVE: HashMap<u64, tracer_common::SavedArgs> = HashMap::with_max_entries(32768, 0);

/// `is_traced` verdicts, direct-mapped by tgid:
/// `(tgid << 32) | (generation << 2) | (shed << 1) | traced`.
/// Every syscall of every process asks whether its process is traced; the full answer (pid
/// set, command name, network namespace) costs several lookups and probe reads, this one
/// array read. A verdict is good while its generation is current: anything that may change
/// the traced set bumps the generation (see `GENERATION`), and a pid's slot is cleared when a
/// new process gets it (fork) or changes its name (exec).
#[map]
static VERDICTS: Array<u64> = Array::with_max_entries(VERDICT_SLOTS, 0);
const VERDICT_SLOTS: u32 = 16384;

/// Generation of the traced set: `[0]` bumped by the programs (forks and exits of traced
/// processes), `[1]` by the agent (its own changes, and a periodic refresh that bounds how long
/// a renamed or moved process keeps its verdict). A verdict carries their sum.
#[map]
static GENERATION: Array<u64> = Array::with_max_entries(2, 0);

/// Traced processes whose socket I/O is captured only in part for now, by tgid: the agent
/// sheds load this way while a traced thread is CPU-bound and tracing it would cost more than
/// its overhead budget. The value is the share of request/response turns to capture, of
/// `u32::MAX` (see `turns`). Their connections, forks and exits are still followed in full.
#[map]
static SHED_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// The `SHED_PIDS` value of the process whose verdict is cached in the same slot of
/// `VERDICTS`, copied with the verdict: read by every call of a shed process.
#[map]
static SAMPLE_KEEP: Array<u32> = Array::with_max_entries(VERDICT_SLOTS, 0);

/// Kept by the agent: `[0]` how many processes `SHED_PIDS` holds (while 0, a tracer with no
/// process filter answers "captured" without consulting the verdict cache at all).
#[map]
static SHED_STATE: Array<u64> = Array::with_max_entries(1, 0);

/// Command names (`comm`, NUL-padded to 16 bytes) to trace when `Config::filter_comms` is set:
/// checked in the kernel so that a matching process is traced from its first syscall.
#[map]
static TRACED_COMMS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(256, 0);

/// Per-CPU scratch space to build a data record in (too large for the 512-byte stack).
#[map]
static SCRATCH: PerCpuArray<syscalls::DataScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `tracer_common::stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Below this much unread data the agent is not woken for each record: it drains the ring on
/// a short timer instead. A wakeup per record (an IPI and a context switch) costs more than
/// the probe itself at tens of thousands of requests per second.
const WAKEUP_BYTES: u64 = 256 * 1024;
const BPF_RB_NO_WAKEUP: u64 = 1;
pub(crate) const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Per CPU: records written since this CPU last measured the unread data, and whether it has
/// woken the agent since it last measured less than `WAKEUP_BYTES`.
#[map]
static WAKE_STATE: PerCpuArray<[u32; 2]> = PerCpuArray::with_max_entries(1, 0);

/// A CPU measures the unread data once per this many of its records: the query is a helper
/// call per record otherwise (about 40 ns, a quarter of what the rest of a record costs to
/// write), and the wakeup comes at most this many records (at most 32 KiB) later.
const WAKE_CHECK_EVERY: u32 = 8;

/// Flags for the next ring-buffer record: wake the agent once the unread data is past
/// `WAKEUP_BYTES`, once per CPU until it falls below again, not for every record above it.
/// Waking for each one raised an interrupt per record (the wakeup's irq_work) for as long as
/// the agent took to drain: 7% of a traced write's cost under load. The agent's timer drains
/// the rest.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let Some(state) = WAKE_STATE.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP;
    };
    // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
    let [since, woke] = unsafe { &mut *state };
    *since += 1;
    if *since < WAKE_CHECK_EVERY {
        return BPF_RB_NO_WAKEUP;
    }
    *since = 0;
    if EVENTS.query(BPF_RB_AVAIL_DATA) < WAKEUP_BYTES {
        *woke = 0;
        return BPF_RB_NO_WAKEUP;
    }
    if *woke != 0 {
        return BPF_RB_NO_WAKEUP;
    }
    *woke = 1;
    BPF_RB_FORCE_WAKEUP
}

/// Events lost to a full ring buffer, on all CPUs: the count every record carries
/// (`EventHeader::losses`).
#[map]
static LOSSES: Array<u64> = Array::with_max_entries(1, 0);

/// Counts an event the ring buffer had no room for.
#[inline(always)]
fn event_lost() {
    count(stat::RINGBUF_LOST);
    if let Some(ptr) = LOSSES.get_ptr_mut(0) {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        // SAFETY: a map value of this program's, aligned for a u64; other CPUs add to it too
        // (a BPF atomic add).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, 1) };
    }
}

/// The events lost so far, for the header of a record about to be written.
#[inline(always)]
fn losses() -> u16 {
    // SAFETY: a plain load of the map value (a racing add is either in or not).
    LOSSES.get(0).map_or(0, |n| *n as u16)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(ptr) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *ptr += 1 };
    }
}

/// Verdict bits: the thread group is traced; its socket I/O is shed (see `SHED_PIDS`).
const VERDICT_TRACED: u32 = 1;
const VERDICT_SHED: u32 = 2;
const VERDICT_SHED_TRACED: u32 = VERDICT_TRACED | VERDICT_SHED;

/// Whether the current thread group's syscalls are traced (shed or not): what follows its
/// processes and connections asks this.
#[inline(always)]
fn is_traced(tgid: u32) -> bool {
    verdict(tgid) & VERDICT_TRACED != 0
}

/// `VERDICT_*` bits of thread group `tgid`, from the verdict cache when current.
#[inline(always)]
fn verdict(tgid: u32) -> u32 {
    if tgid == config!(self_tgid) {
        return 0;
    }
    if config!(filter_pids) == 0 && config!(netns_inum) == 0 && shed_count() == 0 {
        return VERDICT_TRACED;
    }
    // Read before the sets are consulted: a change made meanwhile bumps it past this verdict.
    let generation = generation();
    let Some(slot) = VERDICTS.get_ptr_mut(tgid & (VERDICT_SLOTS - 1)) else {
        return verdict_uncached(tgid);
    };
    // SAFETY: an 8-byte aligned map value; other CPUs write whole words too.
    let cached = unsafe { core::ptr::read_volatile(slot) };
    if (cached >> 32) as u32 == tgid && ((cached >> 2) as u32 & GENERATION_MASK) == generation {
        return cached as u32 & (VERDICT_TRACED | VERDICT_SHED);
    }
    let verdict = verdict_uncached(tgid);
    let cached = ((tgid as u64) << 32) | ((generation as u64) << 2) | verdict as u64;
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(slot, cached) };
    verdict
}

/// How many processes the agent sheds now.
#[inline(always)]
fn shed_count() -> u64 {
    match SHED_STATE.get_ptr(0) {
        // SAFETY: an aligned map value.
        Some(value) => unsafe { core::ptr::read_volatile(value) },
        None => 0,
    }
}

const GENERATION_MASK: u32 = 0x3fff_ffff;

#[inline(always)]
pub(crate) fn generation() -> u32 {
    let mut sum: u64 = 0;
    for i in 0..2 {
        if let Some(g) = GENERATION.get_ptr(i) {
            // SAFETY: a map value; torn reads are impossible for an aligned u64.
            sum = sum.wrapping_add(unsafe { core::ptr::read_volatile(g) });
        }
    }
    sum as u32 & GENERATION_MASK
}

/// Invalidates every cached verdict: the traced set changed. Not atomic (the BPF target has no
/// fetch-add here): two CPUs bumping at once may add one between them, which still moves the
/// generation past every verdict taken before either change.
#[inline(always)]
fn bump_generation() {
    if let Some(g) = GENERATION.get_ptr_mut(0) {
        // SAFETY: an aligned map value.
        unsafe { core::ptr::write_volatile(g, core::ptr::read_volatile(g).wrapping_add(1)) };
    }
}

/// Forgets the cached verdict of `tgid`: the pid now names another process, or a new program.
#[inline(always)]
fn forget_verdict(tgid: u32) {
    if let Some(slot) = VERDICTS.get_ptr_mut(tgid & (VERDICT_SLOTS - 1)) {
        // SAFETY: an aligned map value. A zero slot matches no process (tgid 0 never traces).
        unsafe { core::ptr::write_volatile(slot, 0) };
    }
}

/// The full answer of `verdict`, from the traced and shed sets. Not inlined: as a BPF
/// subprogram its stack (the name read) is gone when it returns, so the verifier's states after
/// a cache hit and after a miss are alike and the rest of each program is verified once, not
/// once per way through here.
#[inline(never)]
fn verdict_uncached(tgid: u32) -> u32 {
    if !traced_uncached(tgid) {
        return 0;
    }
    if shed_count() != 0
        // SAFETY: copied out at once.
        && let Some(keep) = unsafe { SHED_PIDS.get(&tgid) }.copied()
    {
        if let Some(slot) = SAMPLE_KEEP.get_ptr_mut(tgid & (VERDICT_SLOTS - 1)) {
            // SAFETY: an aligned map value. Another process of the same slot may overwrite
            // it meanwhile: one call then goes by the other's share.
            unsafe { core::ptr::write_volatile(slot, keep) };
        }
        return VERDICT_SHED_TRACED;
    }
    VERDICT_TRACED
}

/// The share of turns to capture of shed process `tgid`, whose verdict was just read.
#[inline(always)]
fn sample_keep(tgid: u32) -> u32 {
    match SAMPLE_KEEP.get_ptr(tgid & (VERDICT_SLOTS - 1)) {
        // SAFETY: an aligned map value.
        Some(keep) => unsafe { core::ptr::read_volatile(keep) },
        None => 0,
    }
}

/// What a traced process's calls are subject to: `None` not traced, else the share of its
/// turns to capture (`turns::KEEP_ALL`: captured in full, not sampled). A plain number rather
/// than an `Option`: LLVM spilled the undefined payload of a `None` across a branch, and the
/// verifier rejected the read of a register never written.
#[inline(always)]
fn capture_mode(tgid: u32) -> Option<u32> {
    match verdict(tgid) {
        VERDICT_TRACED => Some(turns::KEEP_ALL),
        VERDICT_SHED_TRACED => Some(sample_keep(tgid).min(turns::KEEP_ALL - 1)),
        _ => None,
    }
}

/// Whether `tgid` is in the traced sets.
#[inline(always)]
fn traced_uncached(tgid: u32) -> bool {
    if config!(netns_inum) != 0 && current_netns() != config!(netns_inum) {
        return false;
    }
    if config!(filter_pids) == 0 {
        return true;
    }
    // SAFETY: the values are not used past the lookups.
    if unsafe { TRACED_PIDS.get(&tgid).is_some() } {
        return true;
    }
    config!(filter_comms) != 0
        // The process's name, as /proc/PID/comm shows it: one answer for all its threads.
        // SAFETY: a presence check.
        && unsafe { TRACED_COMMS.get(&sockets::process_comm()).is_some() }
}

/// The inode number of the current task's network namespace (0 when unreadable).
#[inline(always)]
fn current_netns() -> u32 {
    // SAFETY: probe reads of kernel memory at BTF-derived offsets; failures give 0.
    unsafe {
        let task = aya_ebpf::helpers::bpf_get_current_task() as *const u8;
        let Ok(nsproxy) =
            bpf_probe_read_kernel(task.add(offset!(task_nsproxy) as usize) as *const *const u8)
        else {
            return 0;
        };
        if nsproxy.is_null() {
            return 0;
        }
        let Ok(net) = bpf_probe_read_kernel(
            nsproxy.add(offset!(nsproxy_net_ns) as usize) as *const *const u8
        ) else {
            return 0;
        };
        bpf_probe_read_kernel(net.add(offset!(net_ns_inum) as usize) as *const u32).unwrap_or(0)
    }
}

#[inline(always)]
fn capture_limit() -> usize {
    let configured = config!(capture_bytes) as usize;
    if configured > MAX_CAPTURE {
        MAX_CAPTURE
    } else {
        configured
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
