//! Per-turn sampling: what a shed process's socket I/O still shows.
//!
//! While the agent sheds a process (a CPU-bound thread whose capture costs more than the
//! overhead budget, see tracer-user's governor), its calls are captured one request/response
//! turn in so many, the share the agent sets (`SHED_PIDS`), each turn picked at random as it
//! begins. A turn is picked whole, every call of it from the first hook that sees it (sk_msg,
//! `tcp_sendmsg_locked` and the socket-layer tracepoints; the syscall probes; the OpenSSL
//! probes), so that captured requests are whole, spread evenly over the load, and what they
//! cost the thread is spread with them (capturing all of a few milliseconds at a time made the
//! requests of those milliseconds queue).
//!
//! A turn begins where a connection's calls turn to the direction that opened it, which is
//! the direction of the first call seen on it: a server reads first, a client writes first.
//! (A connection seen first in the middle of a turn, or a protocol whose server speaks first,
//! gets its turns shifted by half a turn: the agent then sees answers without their questions,
//! as after any gap, and drops them.) The state is a few bits per connection
//! (`tracer_common::turn`, where it is tested), kept on the socket, in its `CONNS` entry, or
//! by SSL object.
//!
//! Client turns follow the server turn their thread serves: a request sent on behalf of a
//! skipped request is skipped, one sent for a picked request is captured (its span keeps its
//! parent); a thread serving nothing picks at random. Each server turn leaves a mark in its
//! CPU's slot (`TURN_MARKS`: the thread, its pick and when), a write to a line no other CPU
//! writes, where a per-thread hash entry cost about 0.2 µs a request. A thread that finds
//! another's mark on its CPU has moved since its server turn began (or another thread began
//! one there since): it goes by its live trace context (`THREAD_CTX`, a picked HTTP
//! request's); a thread that serves HTTP but has none looks for its newest mark in the other
//! CPUs' slots (the first 16); else it picks at random. (A thread that moved away and back
//! between its server turn and its call finds an older mark of its own: rare, and then the
//! call may follow the wrong turn.)
//!
//! The first call captured after skipped ones is preceded by a gap event for its connection:
//! the agent drops what that connection's parser was waiting for and resyncs there. Capture
//! resuming in full (the process no longer shed) goes the same way, so the agent never has to
//! guess which connections lost bytes.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::Array,
};
pub use tracer_common::turn::Pick;
use tracer_common::{CTX_VALID, DIR_INGRESS, turn};

use crate::inject::THREAD_CTX;

/// The last server turn begun on a CPU, in that CPU's slot: a line of its own, so that the
/// CPUs' writes do not contend.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TurnMark {
    tid: u32,
    /// `MARK_SKIPPED` or `MARK_PICKED` (0: none yet).
    pick: u32,
    at_ns: u64,
    _pad: [u64; 6],
}
const _: () = assert!(core::mem::size_of::<TurnMark>() == 64);

/// Slots, one per CPU; a thread on a CPU beyond them goes by its trace context or at random.
const MARK_CPUS: u32 = 256;
/// The most slots a moved thread looks through for its mark (cold lines, about 0.1 µs each).
const MARK_SCAN: u32 = 16;

#[map]
static TURN_MARKS: Array<TurnMark> = Array::with_max_entries(MARK_CPUS, 0);
const MARK_SKIPPED: u32 = 1;
const MARK_PICKED: u32 = 2;

/// Decides a call in `direction` on a connection whose turn state is `turn`, of thread `tid`
/// (`tracer_common::turn::step`). `keep`: the share of turns to capture (of `u32::MAX`), or
/// `None` while the process is captured in full.
#[inline(always)]
pub fn pick(turn: &mut u32, direction: u32, keep: Option<u32>, tid: u32) -> Pick {
    let (state, pick) = turn::step(*turn, direction == DIR_INGRESS, keep.is_some(), |server| {
        new_turn(server, keep.unwrap_or(u32::MAX), tid)
    });
    *turn = state;
    pick
}

/// Whether a turn that begins now is captured: a server's turn (opened by a receive) or a
/// client's.
#[inline(always)]
fn new_turn(server: bool, keep: u32, tid: u32) -> bool {
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let slot = TURN_MARKS.get_ptr_mut(cpu);
    if server {
        // A server turn: at random, and its CPU remembers the pick for the thread's calls.
        // SAFETY: no preconditions.
        let picked = unsafe { bpf_get_prandom_u32() } < keep;
        if let Some(slot) = slot {
            // SAFETY: this CPU's slot; programs do not migrate CPUs while running.
            let slot = unsafe { &mut *slot };
            slot.tid = tid;
            slot.pick = if picked { MARK_PICKED } else { MARK_SKIPPED };
            // SAFETY: no preconditions.
            slot.at_ns = unsafe { bpf_ktime_get_ns() };
        }
        return picked;
    }
    // A client turn: as the server turn the thread serves.
    // SAFETY: a map value pointer, read at once.
    if let Some(mark) = slot.map(|slot| unsafe { *slot })
        && mark.tid == tid
        && mark.pick != 0
    {
        return mark.pick == MARK_PICKED;
    }
    // SAFETY: copied out at once.
    match unsafe { THREAD_CTX.get(&tid) }.map(|t| t.ctx.flags) {
        // Serving a picked HTTP request.
        Some(flags) if flags & CTX_VALID != 0 => return true,
        // A thread that serves HTTP requests, and no picked one now: it moved, or another
        // thread's server turn replaced its mark here. Only such threads look through the
        // other CPUs' slots; one that serves nothing would do it at each of its calls.
        Some(_) => {
            if let Some(pick) = moved_mark(tid) {
                return pick == MARK_PICKED;
            }
        }
        None => {}
    }
    // SAFETY: no preconditions.
    unsafe { bpf_get_prandom_u32() < keep }
}

/// The pick of thread `tid`'s newest mark on any CPU: where it began its server turn before
/// it moved.
#[inline(always)]
fn moved_mark(tid: u32) -> Option<u32> {
    let cpus = config!(nr_cpus).min(MARK_SCAN);
    // Plain scalars, not an `Option` of a mark: LLVM spills an undefined register for its
    // unset half, which the verifier rejects.
    let (mut newest_ns, mut pick) = (0u64, 0u32);
    for cpu in 0..MARK_SCAN {
        if cpu >= cpus {
            break;
        }
        // Read field by field: another CPU may be writing the slot, and a torn read is a mark
        // of another thread or time, as good as a missing one.
        let Some(mark) = TURN_MARKS.get(cpu) else {
            break;
        };
        if mark.tid == tid && mark.pick != 0 && mark.at_ns >= newest_ns {
            newest_ns = mark.at_ns;
            pick = mark.pick;
        }
    }
    (pick != 0).then_some(pick)
}
