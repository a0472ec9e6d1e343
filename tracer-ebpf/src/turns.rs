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
//! parent); a thread serving nothing picks at random. Each server turn leaves a mark on its
//! CPU (`TURN_MARKS`: the thread and its pick), a per-CPU write where a per-thread hash entry
//! cost about 0.2 µs a request. A thread that moved to another CPU since its server turn
//! began finds no mark of its own and goes by its live trace context (`THREAD_CTX`, a picked
//! HTTP request's) or picks at random: then a call made for a skipped request, by an event
//! loop that read another, picked, request just before, may be captured as that one's child.
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
    let marks = TURN_MARKS.get_ptr_mut(0);
    if server {
        // A server turn: at random, and its CPU remembers the pick for the thread's calls.
        // SAFETY: no preconditions.
        let picked = unsafe { bpf_get_prandom_u32() } < keep;
        if let Some(marks) = marks {
            let mark = if picked { MARK_PICKED } else { MARK_SKIPPED };
            // SAFETY: per-CPU slot; programs do not migrate CPUs while running.
            unsafe { *marks = [tid, mark] };
        }
        return picked;
    }
    // A client turn: as the server turn the thread serves.
    if let Some(marks) = marks {
        // SAFETY: as above.
        let [marked, mark] = unsafe { *marks };
        if marked == tid && mark != 0 {
            return mark == MARK_PICKED;
        }
    }
    // SAFETY: copied out at once.
    if unsafe { THREAD_CTX.get(&tid) }.is_some_and(|t| t.ctx.flags & CTX_VALID != 0) {
        return true;
    }
    // SAFETY: no preconditions.
    unsafe { bpf_get_prandom_u32() < keep }
}
