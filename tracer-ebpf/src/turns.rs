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
//! parent); a thread serving nothing picks at random. Server turns leave a mark in the
//! thread's `THREAD_CTX` slot for that (`TURN_PICKED`, `TURN_SKIPPED`; a live context of a
//! picked HTTP request says "picked" as well).
//!
//! The first call captured after skipped ones is preceded by a gap event for its connection:
//! the agent drops what that connection's parser was waiting for and resyncs there. Capture
//! resuming in full (the process no longer shed) goes the same way, so the agent never has to
//! guess which connections lost bytes.

use aya_ebpf::helpers::bpf_get_prandom_u32;
pub use tracer_common::turn::Pick;
use tracer_common::{CTX_VALID, DIR_INGRESS, TraceCtx, turn};

use crate::inject::{THREAD_CTX, ThreadCtx};

/// Marks in a thread's `THREAD_CTX` flags (above every `CTX_*` bit): the server turn the
/// thread serves was picked, or skipped, by per-turn sampling.
pub const TURN_PICKED: u32 = 1 << 30;
pub const TURN_SKIPPED: u32 = 1 << 31;

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
        // A server turn: at random, and the thread remembers the pick for its client calls.
        // SAFETY: no preconditions.
        let picked = unsafe { bpf_get_prandom_u32() } < keep;
        mark_thread(tid, picked);
        return picked;
    }
    // A client turn: as the server turn the thread serves.
    // SAFETY: copied out at once.
    let flags = unsafe { THREAD_CTX.get(&tid) }.map_or(0, |t| t.ctx.flags);
    if flags & (CTX_VALID | TURN_PICKED) != 0 {
        return true;
    }
    if flags & TURN_SKIPPED != 0 {
        return false;
    }
    // SAFETY: no preconditions.
    unsafe { bpf_get_prandom_u32() < keep }
}

/// Records in thread `tid`'s slot that the server turn it begins to serve was picked or not.
/// A live context of another picked request stays when this one is picked too: the program
/// that names this request's span finds it there and flags the pair ambiguous, as without
/// sampling. A skipped request replaces it: a call the thread makes now may be for either,
/// and one skipped is better than one given the wrong parent.
#[inline(always)]
fn mark_thread(tid: u32, picked: bool) {
    let mark = if picked { TURN_PICKED } else { TURN_SKIPPED };
    match THREAD_CTX.get_ptr_mut(&tid) {
        Some(slot) => {
            // SAFETY: a map value; only this thread's programs use its slot.
            let slot = unsafe { &mut *slot };
            if picked && slot.ctx.flags & CTX_VALID != 0 {
                return;
            }
            slot.ctx.flags = mark;
            slot.conn_id = 0;
        }
        None => {
            let ctx = TraceCtx {
                flags: mark,
                ..TraceCtx::default()
            };
            let _ = THREAD_CTX.insert(&tid, &ThreadCtx { ctx, conn_id: 0 }, 0);
        }
    }
}
