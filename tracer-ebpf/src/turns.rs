//! Per-turn sampling: what a shed process's socket I/O still shows.
//!
//! While the agent sheds a process (a CPU-bound thread whose capture costs more than the
//! overhead budget, see tracer-user's governor), its calls are captured one request/response
//! turn in so many, the share the agent sets (`SHED_PIDS`), each turn picked at random as it
//! begins. A turn is picked whole, every call of it from the first hook that sees it (sk_msg
//! and the socket-layer tracepoints; the syscall probes; the OpenSSL probes), so that captured
//! requests are whole, spread evenly over the load, and what they cost the thread is spread
//! with them (capturing all of a few milliseconds at a time made the requests of those
//! milliseconds queue).
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
//! CPU (`TURN_MARKS`: the thread, its pick and when), a per-CPU write where a per-thread hash
//! entry cost about 0.2 µs a request. A thread that serves HTTP also has a trace context slot
//! (`THREAD_CTX`), live while it serves a picked request and dated by its read, never set by a
//! skipped one. A client turn follows the thread's mark on its CPU where that is newer than
//! the live context (an event loop that read a skipped request after a picked one), the live
//! context otherwise (the mark is an older turn's: the thread changed CPUs within the
//! request), skips when the thread serves HTTP and has none, and else picks at random.
//!
//! The first call captured after skipped ones is preceded by a gap event for its connection:
//! the agent drops what that connection's parser was waiting for and resyncs there. Capture
//! resuming in full (the process no longer shed) goes the same way, so the agent never has to
//! guess which connections lost bytes.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::PerCpuArray,
};
pub use tracer_common::turn::Pick;
use tracer_common::{CTX_VALID, DIR_INGRESS, turn};

use crate::inject::THREAD_CTX;

/// Per CPU: the last server turn begun on it, and the state of its draws.
#[map]
static TURN_MARKS: PerCpuArray<CpuTurns> = PerCpuArray::with_max_entries(1, 0);
const MARK_SKIPPED: u64 = 1;
const MARK_PICKED: u64 = 2;

#[repr(C)]
struct CpuTurns {
    /// The last server turn begun on this CPU: `tid << 32 | 1 skipped or 2 picked` (0: none).
    mark: u64,
    /// When it began.
    at_ns: u64,
    /// xorshift64* state of the CPU's turn draws (0: not seeded yet).
    rng: u64,
}

impl CpuTurns {
    /// A uniform random u32 for a turn's pick (`turn::draw`), seeded from the kernel's
    /// generator once per CPU. The helper call cost a shed process measurably: on the
    /// benchmark's twins (two nginx on one CPU, one traced and shed, three pairs of runs each)
    /// the traced twin served 0.9737 of its untraced twin's requests with
    /// `bpf_get_prandom_u32` here and 0.9778 with this draw (in another session 0.9776 with
    /// the helper, 0.9826 with a constant in its place).
    #[inline(always)]
    fn draw(&mut self) -> u32 {
        if self.rng == 0 {
            // SAFETY: no preconditions.
            self.rng =
                unsafe { ((bpf_get_prandom_u32() as u64) << 32) | bpf_get_prandom_u32() as u64 }
                    | 1;
        }
        turn::draw(&mut self.rng)
    }

    /// Marks a server turn of thread `tid` that begins now, `picked` or skipped, for the
    /// thread's client calls to follow.
    #[inline(always)]
    fn mark(&mut self, tid: u32, picked: bool) {
        let pick = if picked { MARK_PICKED } else { MARK_SKIPPED };
        self.mark = ((tid as u64) << 32) | pick;
        // SAFETY: no preconditions.
        self.at_ns = unsafe { bpf_ktime_get_ns() };
    }
}

/// This CPU's turn state. Programs do not migrate CPUs while running.
#[inline(always)]
fn cpu_turns() -> Option<&'static mut CpuTurns> {
    // SAFETY: a per-CPU map value, valid for the program's run.
    TURN_MARKS.get_ptr_mut(0).map(|cpu| unsafe { &mut *cpu })
}

/// `keep` of a process captured in full (not sampled by turns).
pub const KEEP_ALL: u32 = u32::MAX;

/// Whether a process whose `keep` this is is sampled by turns (shed).
#[inline(always)]
pub fn sampled(keep: u32) -> bool {
    keep != KEEP_ALL
}

/// Decides a call in `direction` on a connection whose turn state is `turn`, of thread `tid`
/// (`tracer_common::turn::step`). `keep`: the share of turns to capture (of `u32::MAX`), or
/// `KEEP_ALL` while the process is captured in full.
#[inline(always)]
pub fn pick(turn: &mut u32, direction: u32, keep: u32, tid: u32) -> Pick {
    let (state, pick) = turn::step(*turn, direction == DIR_INGRESS, sampled(keep), |server| {
        new_turn(server, keep, tid)
    });
    *turn = state;
    pick
}

/// Whether a turn that begins now is captured: a server's turn (opened by a receive) or a
/// client's.
#[inline(always)]
fn new_turn(server: bool, keep: u32, tid: u32) -> bool {
    let Some(cpu) = cpu_turns() else {
        return false;
    };
    if server {
        // A server turn: at random, and its CPU remembers the pick for the thread's calls.
        let picked = cpu.draw() < keep;
        cpu.mark(tid, picked);
        return picked;
    }
    // A client turn: as the server turn the thread serves. The thread's mark on this CPU,
    // if it is there: (picked, when).
    let mark = ((cpu.mark >> 32) as u32 == tid && cpu.mark as u32 != 0)
        .then_some((cpu.mark as u32 as u64 == MARK_PICKED, cpu.at_ns));
    // SAFETY: copied out at once.
    match unsafe { THREAD_CTX.get(&tid) }.map(|t| (t.ctx.flags & CTX_VALID != 0, t.read_ns)) {
        Some((true, read_ns)) => match mark {
            Some((picked, at_ns)) if at_ns > read_ns => picked,
            _ => true,
        },
        // No picked request live: skipped, whatever a newer mark says. Marks also come from
        // the socket-layer picks of a new TLS socket's handshake (before it is known as TLS),
        // random ones: following them when newer orphaned 35-49 of ~150 calls of a shed
        // HTTPS service on a connection per request.
        Some((false, _)) => false,
        None => match mark {
            Some((picked, _)) => picked,
            None => cpu.draw() < keep,
        },
    }
}

/// Leaves the mark of a server turn of thread `tid` that begins now on this CPU, `picked` or
/// skipped, for the thread's client calls to follow.
#[inline(always)]
pub fn mark_server_turn(tid: u32, picked: bool) {
    if let Some(cpu) = cpu_turns() {
        cpu.mark(tid, picked);
    }
}
