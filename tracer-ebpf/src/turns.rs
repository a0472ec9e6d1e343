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
//! parent); a thread serving nothing picks at random. A thread that serves HTTP has a trace
//! context slot (`THREAD_CTX`): live while it serves a picked request (whose capture wrote
//! it), cleared when it answers, never set by a skipped one, so the slot answers for it
//! wherever the thread runs. Other threads go by the mark their server turn left on their CPU
//! (`TURN_MARKS`: the thread and its pick, per CPU, where a per-thread hash entry cost about
//! 0.2 µs a request): a thread that moved since, or whose CPU served another thread's turn
//! since, picks at random, and one that moved away and back may follow an older turn of its
//! own.
//!
//! The first call captured after skipped ones is preceded by a gap event for its connection:
//! the agent drops what that connection's parser was waiting for and resyncs there. Capture
//! resuming in full (the process no longer shed) goes the same way, so the agent never has to
//! guess which connections lost bytes.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::PerCpuArray};
pub use tracer_common::turn::Pick;
use tracer_common::{CTX_VALID, DIR_INGRESS, turn};

use crate::inject::THREAD_CTX;

/// Per CPU, the last server turn begun on it: `[tid, 1 skipped | 2 picked]`.
#[map]
static TURN_MARKS: PerCpuArray<[u32; 2]> = PerCpuArray::with_max_entries(1, 0);
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
    if server {
        // A server turn: at random, and its CPU remembers the pick for the thread's calls.
        // SAFETY: no preconditions.
        let picked = unsafe { bpf_get_prandom_u32() } < keep;
        mark_server_turn(tid, picked);
        return picked;
    }
    // A client turn: as the server turn the thread serves. An HTTP server thread's trace
    // context says (a shed HTTPS service spending 20 ms a request, long enough to change
    // CPUs, had 26-31% of its captured calls orphaned by the marks alone).
    // SAFETY: copied out at once.
    if let Some(flags) = unsafe { THREAD_CTX.get(&tid) }.map(|t| t.ctx.flags) {
        return flags & CTX_VALID != 0;
    }
    if let Some(marks) = TURN_MARKS.get_ptr(0) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
        let [marked, mark] = unsafe { *marks };
        if marked == tid && mark != 0 {
            return mark == MARK_PICKED;
        }
    }
    // SAFETY: no preconditions.
    unsafe { bpf_get_prandom_u32() < keep }
}

/// Leaves the mark of a server turn of thread `tid` that begins now on this CPU, `picked` or
/// skipped, for the thread's client calls to follow.
#[inline(always)]
pub fn mark_server_turn(tid: u32, picked: bool) {
    if let Some(marks) = TURN_MARKS.get_ptr_mut(0) {
        let mark = if picked { MARK_PICKED } else { MARK_SKIPPED };
        // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *marks = [tid, mark] };
    }
}
