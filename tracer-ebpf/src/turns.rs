//! Per-turn sampling: what a shed process's socket I/O still shows.
//!
//! While the agent sheds a process (a CPU-bound thread whose capture costs more than the
//! overhead budget, see tracer-user's governor), its calls are captured one request/response
//! turn in so many, the share the agent sets (`SHED_PIDS`), each turn picked at random as it
//! begins. A turn is picked whole, every call of it from the first hook that sees it (sk_msg
//! and the socket-layer tracepoints; the syscall probes; the OpenSSL probes), so that captured
//! requests are whole, and spread over the load with what they cost the thread (capturing
//! every request of a few milliseconds at a time made the requests of those milliseconds
//! queue). Turns are picked in a capture window of each period only, eight times as long as
//! the share would make it, an eighth of the turns in it; outside the windows, and once the
//! turns picked in them are over, the process is not tracked and its calls leave right after
//! the verdict (see `tracking`).
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
//! resuming in full (the process no longer shed) goes the same way for the sockets looked at
//! while shed; the agent resumes every connection of the process after a gap besides, since
//! a socket none of whose calls was looked at cannot tell.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::PerCpuArray,
};
pub use tracer_common::turn::Pick;
use tracer_common::{CTX_VALID, DIR_INGRESS, turn};

use crate::{VerdictSlot, inject::THREAD_CTX, verdict_slot};

/// How long a shed process stays tracked after its capture window, and after each call it
/// captured: the longest pause within a picked turn that does not cut it.
const TRACK_AFTER_NS: u64 = 20_000_000;

/// `VerdictSlot::shed_flags`: the process's calls are sampled by turns (shed).
const SHED_SAMPLED: u32 = 1;
/// A tracking session is open: every call of the process is looked at (see `tracking`).
const SESSION_OPEN: u32 = 2;

/// Most calls of a shed process a CPU skips unseen before it reads the clock again.
const GATE_CALLS_MAX: u64 = 64;
/// A CPU that found a shed process untracked skips about this long of its calls unseen before
/// it reads the clock again: the clock read (an indirect call, through a retpoline) was about
/// 30 ns of a skipped call's 200.
const GATE_NS: u64 = 1_000_000;

/// A call of a traced process, as its capture mode says to look at it: the share of turns to
/// pick if one begins now (0: none; `KEEP_ALL`: captured in full), and the tracking session
/// (0: not tracked, the call is skipped unseen).
#[derive(Clone, Copy)]
pub struct Tracking {
    pub keep_now: u32,
    pub session: u32,
}

impl Tracking {
    /// This call captured, whatever its turn, in the same session.
    #[inline(always)]
    pub fn in_full(self) -> Tracking {
        Tracking {
            keep_now: KEEP_ALL,
            session: self.session,
        }
    }
}

/// How process `pid_tgid`'s call is looked at, for `keep` (as `pick`'s).
///
/// A shed process's calls are looked at only while it is tracked: in its capture window of
/// each period (`turn::window`), where turns are picked, and for `TRACK_AFTER_NS` after the
/// window and after each call it captured, so that the turns it picked are seen to their
/// end. The rest of the time a call leaves after the verdict, without looking at its socket:
/// looking at every call, to pick one turn in two hundred, cost a shed nginx about 3% of its
/// throughput. Its socket's turn state then says nothing of the calls since: each tracking
/// session stamps the states it keeps (`turn::refresh`), and a call skipped unseen closes the
/// session, so that the next one is new. A CPU that found the process untracked does not read
/// the clock again for about a millisecond of its calls, or until another CPU opens a session.
#[inline(always)]
pub fn tracking(pid_tgid: u64, keep: u32) -> Tracking {
    const UNSEEN: Tracking = Tracking {
        keep_now: 0,
        session: 0,
    };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = verdict_slot(tgid) else {
        return UNSEEN;
    };
    if !sampled(keep) {
        // Captured in full: every call seen, one stamp. (After shedding, the agent starts
        // every connection of the process afresh.) The next shedding begins a new session.
        if slot.shed_flags != 0 && slot.shed_tgid == tgid {
            slot.shed_flags = 0;
        }
        return Tracking {
            keep_now: KEEP_ALL,
            session: turn::FULL_SESSION,
        };
    }
    if slot.shed_tgid != tgid || slot.shed_flags & SHED_SAMPLED == 0 {
        shedding_begins(slot, tgid);
    }
    let Some(cpu) = cpu_turns() else {
        return UNSEEN;
    };
    let session = slot.session;
    if cpu.gate_tgid == tgid && cpu.gate_session == session && cpu.gate_calls != 0 {
        cpu.gate_calls -= 1;
        cpu.gate_seen += 1;
        return UNSEEN;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let keep_now = turn::window(tgid, keep, now);
    if keep_now == 0 && now >= slot.live_until_ns {
        if slot.shed_flags & SESSION_OPEN != 0 {
            slot.shed_flags &= !SESSION_OPEN;
        }
        // Calls to skip before the next look: as many as came in about GATE_NS before.
        let mut calls = 0;
        if cpu.gate_tgid == tgid && now > cpu.gate_at_ns {
            calls = (cpu.gate_seen as u64 + 1) * GATE_NS / (now - cpu.gate_at_ns);
        }
        cpu.gate_calls = calls.min(GATE_CALLS_MAX) as u32;
        cpu.gate_seen = 0;
        cpu.gate_at_ns = now;
        cpu.gate_tgid = tgid;
        cpu.gate_session = session;
        return UNSEEN;
    }
    if slot.shed_flags & SESSION_OPEN == 0 {
        slot.session = turn::new_session(session, now);
        slot.shed_flags |= SESSION_OPEN;
    }
    if keep_now != 0 {
        slot.live_until_ns = now + TRACK_AFTER_NS;
    }
    Tracking {
        keep_now,
        session: slot.session,
    }
}

/// The first call of process `tgid` since it was shed (or since another process took its
/// slot): a new session, tracked for a while. The turns under way were captured in full, but
/// their states' stamps no longer say so: the rest of each is skipped, and the connection
/// resumes after a gap.
#[inline(always)]
fn shedding_begins(slot: &mut VerdictSlot, tgid: u32) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    slot.shed_tgid = tgid;
    slot.session = turn::new_session(slot.session, now);
    slot.shed_flags = SHED_SAMPLED | SESSION_OPEN;
    slot.live_until_ns = now + TRACK_AFTER_NS;
}

/// The turn state of a connection whose first call, in `direction`, is skipped unseen.
#[inline(always)]
pub fn first_call_unseen(direction: u32) -> u32 {
    turn::first_call_unseen(direction == DIR_INGRESS)
}

/// A call of shed process `tgid` was captured: its turn goes on, tracked.
#[inline(always)]
fn captured(tgid: u32) {
    if let Some(slot) = verdict_slot(tgid) {
        // SAFETY: no preconditions.
        slot.live_until_ns = unsafe { bpf_ktime_get_ns() } + TRACK_AFTER_NS;
    }
}

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
    /// The shed process this CPU last found untracked (see `tracking`), in which session,
    /// how many more of its calls to skip unseen, how many it skipped so, and when it looked.
    gate_tgid: u32,
    gate_session: u32,
    gate_calls: u32,
    gate_seen: u32,
    gate_at_ns: u64,
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

/// Decides a call in `direction` on a connection whose turn state is `turn`, of thread
/// `pid_tgid` (`tracer_common::turn::step`). `keep`: the share of turns to capture (of
/// `u32::MAX`), or `KEEP_ALL` while the process is captured in full. A shed process's call
/// outside its tracking sessions is skipped unseen: the state learns only a new connection's
/// opening direction.
#[inline(always)]
pub fn pick(turn: &mut u32, direction: u32, keep: u32, pid_tgid: u64) -> Pick {
    let tracking = tracking(pid_tgid, keep);
    pick_tracked(turn, direction, tracking, pid_tgid)
}

/// `pick` for a call captured whatever its turn (the first of a connection the probes must
/// learn), in the process's current or last session, whether it is shed or not.
#[inline(always)]
pub fn pick_in_full(turn: &mut u32, direction: u32, pid_tgid: u64) -> Pick {
    let tgid = (pid_tgid >> 32) as u32;
    let session = match verdict_slot(tgid) {
        Some(slot) if slot.shed_tgid == tgid && slot.shed_flags != 0 => slot.session,
        _ => turn::FULL_SESSION,
    };
    let tracking = Tracking {
        keep_now: KEEP_ALL,
        session,
    };
    pick_tracked(turn, direction, tracking, pid_tgid)
}

/// `pick`, with the call's `tracking` known.
#[inline(always)]
pub fn pick_tracked(turn: &mut u32, direction: u32, tracking: Tracking, pid_tgid: u64) -> Pick {
    let ingress = direction == DIR_INGRESS;
    if tracking.session == 0 {
        if *turn == 0 {
            *turn = first_call_unseen(direction);
        }
        return Pick::Skip;
    }
    let sampled = sampled(tracking.keep_now);
    let state = turn::refresh(*turn, tracking.session);
    let (state, pick) = turn::step(state, ingress, sampled, |server| {
        new_turn(server, tracking.keep_now, pid_tgid as u32)
    });
    *turn = state;
    if sampled && pick != Pick::Skip {
        captured((pid_tgid >> 32) as u32);
    }
    pick
}

/// Whether a turn that begins now is captured: a server's turn (opened by a receive) or a
/// client's. `keep`: the share of turns beginning now to pick (0 outside the capture window).
#[inline(always)]
fn new_turn(server: bool, keep: u32, tid: u32) -> bool {
    let Some(cpu) = cpu_turns() else {
        return false;
    };
    if server {
        // A server turn: at random, and its CPU remembers the pick for the thread's calls.
        let picked = keep != 0 && cpu.draw() < keep;
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
            None => keep != 0 && cpu.draw() < keep,
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
