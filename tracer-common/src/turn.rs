//! Per-turn sampling's state machine, run by the eBPF programs (tracer-ebpf's `turns` has the
//! design) and kept here, pure, so that it is tested on the host.
//!
//! A connection's state is a `u32`: the direction that opens its turns (that of the first call
//! seen), the direction of the last call, whether the current turn is picked, whether a call
//! was skipped since the last captured one, and the tracking session it was last brought up
//! to date in (`refresh`).
//!
//! A shed process's calls are looked at only in tracking sessions (`window`): a capture
//! window of each period, and as long after it as the turns it picked go on. Outside them a
//! call leaves at once, touching no state, so a state stamped with an earlier session may
//! have missed calls: it no longer knows the last direction nor the pick, and the next
//! capture on it comes after a gap.

/// The direction that opens a turn: 0 unknown yet, else `dir_bits` of it.
const OPENER: u32 = 0b11;
/// The direction of the last call seen (`dir_bits`), 0 none yet.
const LAST_SHIFT: u32 = 2;
const LAST: u32 = 0b11 << LAST_SHIFT;
/// The current turn is captured.
const PICKED: u32 = 1 << 4;
/// A call was skipped since the last captured one.
const SKIPPED: u32 = 1 << 5;

/// The tracking session a state was last brought up to date in (0: none yet).
const SESSION_SHIFT: u32 = 8;
const SESSION_MASK: u32 = (1 << (32 - SESSION_SHIFT)) - 1;

/// The stamp of states kept while their process is captured in full: it sees every call.
pub const FULL_SESSION: u32 = SESSION_MASK;

/// A new tracking session of a shed process, at `now_ns`, after session `last`: from the
/// clock, so that a session begun afresh (the process shed again, or its slot taken by
/// another meanwhile) does not take the number of an earlier one. Never 0, the stamp of a
/// state no session has seen, nor `FULL_SESSION`, nor `last`.
#[inline(always)]
pub fn new_session(last: u32, now_ns: u64) -> u32 {
    let mut session = (now_ns >> 16) as u32 & SESSION_MASK;
    if session == last {
        session = (session + 1) & SESSION_MASK;
    }
    if session == 0 || session == FULL_SESSION {
        session = if last == 1 { 2 } else { 1 };
    }
    session
}

/// `state` brought up to date for a call in tracking session `session`: a state last seen in
/// another session forgets the direction and the pick of the turn under way and counts as
/// after skipped calls. A new state (0) has missed nothing.
#[inline(always)]
pub fn refresh(state: u32, session: u32) -> u32 {
    let stamp = session << SESSION_SHIFT;
    if state >> SESSION_SHIFT == session {
        return state;
    }
    if state == 0 {
        return stamp;
    }
    (state & OPENER) | SKIPPED | stamp
}

/// The state of a connection whose first call (`ingress`: a receive) is skipped unseen, outside
/// any tracking session: it still says which direction opens the connection's turns.
#[inline(always)]
pub fn first_call_unseen(ingress: bool) -> u32 {
    dir_bits(ingress) | SKIPPED
}

/// Periods of a shed process's capture windows: 2^28 ns, about 268 ms.
pub const PERIOD_SHIFT: u32 = 28;
const PERIOD_NS: u64 = 1 << PERIOD_SHIFT;
/// A capture window is this many times as long as the share of turns to capture would make
/// it, and picks this share of the turns that begin in it: the picks' cost is spread within
/// the window, not concentrated in a burst of every request for a moment.
const WINDOW_SPREAD: u64 = 8;

/// Whether a shed process `tgid` capturing `keep` of its turns (of `u32::MAX`) is in a capture
/// window at `now_ns`, and if so, the share of turns beginning now to pick (0: not in one; a
/// plain number rather than an `Option`, whose undefined payload LLVM may spill where the
/// eBPF verifier rejects its read). Each period has one window, at a place drawn from the
/// period and the process (so a load with a period of its own is not always caught in the
/// same phase).
#[inline(always)]
pub fn window(tgid: u32, keep: u32, now_ns: u64) -> u32 {
    let length = (keep as u64 * WINDOW_SPREAD * PERIOD_NS) >> 32;
    let (length, keep_in) = if length >= PERIOD_NS {
        (PERIOD_NS, keep)
    } else {
        (length, (u32::MAX as u64 / WINDOW_SPREAD) as u32)
    };
    let period = now_ns >> PERIOD_SHIFT;
    let hash = (period ^ ((tgid as u64) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    let start = (hash * (PERIOD_NS - length)) >> 32;
    let offset = now_ns & (PERIOD_NS - 1);
    if offset >= start && offset - start < length {
        keep_in.max(1)
    } else {
        0
    }
}

/// What becomes of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Skip,
    Capture,
    /// Capture it, after a gap event for its connection: calls before it were skipped.
    AfterGap,
}

#[inline(always)]
fn dir_bits(ingress: bool) -> u32 {
    if ingress { 1 } else { 2 }
}

/// The state after a call (`ingress`: a receive) on a connection in `state`, and what becomes
/// of the call. `sampled`: the process is sampled by turns (else every call is captured, and
/// the state only learns it). A turn that begins with this call is picked by `decide`, given
/// whether it is a server's turn (one that opens with a receive). Only a change of direction
/// decides anything, so one call seen by several hooks gets one answer.
#[inline(always)]
pub fn step(
    state: u32,
    ingress: bool,
    sampled: bool,
    decide: impl FnOnce(bool) -> bool,
) -> (u32, Pick) {
    let dir = dir_bits(ingress);
    let mut state = state;
    if state & OPENER == 0 {
        state |= dir;
    }
    let last = (state & LAST) >> LAST_SHIFT;
    let opener = state & OPENER;
    state = (state & !LAST) | (dir << LAST_SHIFT);
    let picked = if !sampled {
        true
    } else if last == dir || dir != opener {
        // The rest of the turn under way, or its other half: the answer goes with its
        // question.
        state & PICKED != 0
    } else {
        decide(opener == dir_bits(true))
    };
    if !picked {
        return ((state | SKIPPED) & !PICKED, Pick::Skip);
    }
    let pick = if state & SKIPPED != 0 {
        Pick::AfterGap
    } else {
        Pick::Capture
    };
    ((state | PICKED) & !SKIPPED, pick)
}

/// The next uniform `u32` of a turn-draw sequence whose state is `state` (xorshift64*; a state
/// of 0 must be seeded first, see tracer-ebpf's `turns`). Drawn in the programs rather than
/// by the kernel's `bpf_get_prandom_u32`: a shed process's calls run the skip path, where a
/// helper call per server turn cost a shed nginx measurably (see `turns`).
#[inline(always)]
pub fn draw(state: &mut u64) -> u32 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_pick_the_share_asked_for() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for share in [0.005, 0.05, 0.5] {
            let keep = (share * u32::MAX as f64) as u32;
            let n = 400_000;
            let picked = (0..n).filter(|_| draw(&mut state) < keep).count() as f64;
            let expected = share * n as f64;
            // Within 5 standard deviations of a binomial draw.
            let sd = (expected * (1.0 - share)).sqrt();
            assert!(
                (picked - expected).abs() < 5.0 * sd,
                "share {share}: {picked} of {n}, expected {expected}"
            );
        }
    }

    #[test]
    fn successive_draws_do_not_repeat_a_pick_pattern() {
        // Turns of one connection are drawn one after another: a pick must not make the next
        // more or less likely.
        let mut state = 1;
        let keep = u32::MAX / 10;
        let (mut after_pick, mut picks_after_pick, mut prev) = (0, 0, false);
        for _ in 0..400_000 {
            let picked = draw(&mut state) < keep;
            if prev {
                after_pick += 1;
                picks_after_pick += u32::from(picked);
            }
            prev = picked;
        }
        let share = f64::from(picks_after_pick) / f64::from(after_pick);
        assert!((share - 0.1).abs() < 0.01, "{share}");
    }

    /// Runs `calls` (true: a receive) through a sampled connection whose new turns are picked
    /// in the order of `picks`; returns each call's fate.
    fn run(calls: &[bool], picks: &[bool]) -> ([Pick; 16], usize) {
        let mut state = 0;
        let mut picks = picks.iter();
        let mut out = [Pick::Skip; 16];
        for (i, ingress) in calls.iter().enumerate() {
            let (next, pick) = step(state, *ingress, true, |_| *picks.next().unwrap());
            state = next;
            out[i] = pick;
        }
        (out, calls.len())
    }

    const R: bool = true;
    const W: bool = false;

    #[test]
    fn a_server_turn_is_picked_whole() {
        // Request in two reads, response in two writes, three times: skipped, picked, picked.
        let (out, n) = run(&[R, R, W, W, R, R, W, W, R, W], &[false, true, true]);
        use Pick::*;
        assert_eq!(
            &out[..n],
            [
                Skip, Skip, Skip, Skip, AfterGap, Capture, Capture, Capture, Capture, Capture
            ]
        );
    }

    #[test]
    fn a_client_turn_opens_with_a_send() {
        let mut state = 0;
        let mut server_turns = 0;
        let mut decide = |server: bool| {
            server_turns += u32::from(server);
            false
        };
        for ingress in [W, R, R, W, R] {
            state = step(state, ingress, true, &mut decide).0;
        }
        assert_eq!(server_turns, 0);
    }

    #[test]
    fn the_decision_is_asked_once_a_turn_and_told_its_side() {
        let mut state = 0;
        let mut asked = 0;
        for ingress in [R, R, W, R, W, W] {
            state = step(state, ingress, true, |server| {
                assert!(server);
                asked += 1;
                true
            })
            .0;
        }
        assert_eq!(asked, 2);
    }

    #[test]
    fn one_call_seen_by_several_hooks_gets_one_answer() {
        // sk_msg and sock_send_length see the same send.
        let (state, _) = step(0, R, true, |_| false);
        let (state, first) = step(state, W, true, |_| unreachable!());
        let (_, again) = step(state, W, true, |_| unreachable!());
        assert_eq!((first, again), (Pick::Skip, Pick::Skip));
    }

    #[test]
    fn full_capture_after_skipped_calls_starts_with_a_gap() {
        let (state, _) = step(0, R, true, |_| false);
        let (state, pick) = step(state, W, false, |_| unreachable!());
        assert_eq!(pick, Pick::AfterGap);
        let (_, pick) = step(state, R, false, |_| unreachable!());
        assert_eq!(pick, Pick::Capture);
    }

    #[test]
    fn sampling_that_begins_mid_turn_keeps_the_turn() {
        // Captured in full up to the request; sampled from its response on.
        let (state, _) = step(0, R, false, |_| unreachable!());
        let (state, pick) = step(state, W, true, |_| unreachable!());
        assert_eq!(pick, Pick::Capture);
        let (_, pick) = step(state, R, true, |_| false);
        assert_eq!(pick, Pick::Skip);
    }

    #[test]
    fn a_state_from_another_session_forgets_the_turn_and_counts_a_gap() {
        // Picked in session 5: the request read, the response begun.
        let state = refresh(0, 5);
        let (state, _) = step(state, R, true, |_| true);
        let (state, pick) = step(refresh(state, 5), W, true, |_| unreachable!());
        assert_eq!(pick, Pick::Capture);
        // Calls went unseen; in session 6 the next write is not taken for the turn's.
        let (state, pick) = step(refresh(state, 6), W, true, |_| unreachable!());
        assert_eq!(pick, Pick::Skip);
        // The next request begins a turn, after a gap.
        let (_, pick) = step(refresh(state, 6), R, true, |_| true);
        assert_eq!(pick, Pick::AfterGap);
    }

    #[test]
    fn a_state_seen_in_its_session_is_kept() {
        let (state, _) = step(refresh(0, 9), R, true, |_| true);
        assert_eq!(refresh(state, 9), state);
        let (_, pick) = step(refresh(state, 9), W, true, |_| unreachable!());
        assert_eq!(pick, Pick::Capture);
    }

    #[test]
    fn a_new_state_has_missed_nothing() {
        let (_, pick) = step(refresh(0, 3), R, true, |_| true);
        assert_eq!(pick, Pick::Capture);
        let (_, pick) = step(refresh(0, 3), W, false, |_| unreachable!());
        assert_eq!(pick, Pick::Capture);
    }

    #[test]
    fn a_connection_first_seen_unseen_keeps_its_opening_direction() {
        // A server connection whose request was read outside any session: its response,
        // seen first, does not open a turn; the next request does, after a gap.
        let state = first_call_unseen(R);
        let mut asked = 0;
        let (state, pick) = step(refresh(state, 4), W, true, |_| {
            asked += 1;
            true
        });
        assert_eq!((pick, asked), (Pick::Skip, 0));
        let (_, pick) = step(refresh(state, 4), R, true, |server| {
            assert!(server);
            true
        });
        assert_eq!(pick, Pick::AfterGap);
    }

    #[test]
    fn a_new_session_is_none_of_the_reserved_nor_the_last() {
        for (last, now_ns) in [
            (0, 0),
            (1, 0),
            (5, 5 << 16),
            (FULL_SESSION, (FULL_SESSION as u64) << 16),
            (2, (FULL_SESSION as u64) << 16),
            (1, (FULL_SESSION as u64) << 16),
            (7, 123_456_789_000),
        ] {
            let session = new_session(last, now_ns);
            assert!(
                session != 0 && session != FULL_SESSION && session != last,
                "{last} {now_ns}: {session}"
            );
        }
        // Sessions begun seconds apart do not repeat.
        assert_ne!(
            new_session(0, 10_000_000_000),
            new_session(0, 12_000_000_000)
        );
    }

    /// The share of turns picked at times spread evenly over many periods: each instant's
    /// chance (0 outside a window) over `u32::MAX`.
    fn picked_share(tgid: u32, keep: u32) -> (f64, f64) {
        let (mut chance, mut open, n) = (0.0, 0u64, 400_000u64);
        let step_ns = 4000 * PERIOD_NS / n + 7;
        for i in 0..n {
            let keep_now = window(tgid, keep, i * step_ns);
            if keep_now != 0 {
                open += 1;
                chance += f64::from(keep_now) / f64::from(u32::MAX);
            }
        }
        (chance / n as f64, open as f64 / n as f64)
    }

    #[test]
    fn windows_pick_the_share_asked_for() {
        for share in [0.005, 0.02, 0.1, 0.125, 0.3, 0.9] {
            let keep = (share * f64::from(u32::MAX)) as u32;
            let (picked, open) = picked_share(77, keep);
            assert!(
                (picked - share).abs() < share * 0.05,
                "share {share}: {picked}"
            );
            // Open eight times as long as the share, picking an eighth of the turns in it;
            // from a share of an eighth, open all the time.
            let expected_open = (share * 8.0).min(1.0);
            assert!(
                (open - expected_open).abs() < expected_open * 0.05,
                "share {share}: open {open}"
            );
        }
        assert_eq!(picked_share(77, 0), (0.0, 0.0));
    }

    #[test]
    fn windows_move_from_period_to_period_and_between_processes() {
        let keep = u32::MAX / 100;
        let start = |tgid: u32, period: u64| {
            (0..PERIOD_NS / 1000)
                .map(|i| period * PERIOD_NS + i * 1000)
                .find(|&t| window(tgid, keep, t) != 0)
                .map(|t| t % PERIOD_NS)
        };
        let mut starts = [0; 8];
        for (period, start_ns) in starts.iter_mut().enumerate() {
            *start_ns = start(5, period as u64).unwrap();
        }
        starts.sort_unstable();
        assert!(starts.windows(2).all(|w| w[0] != w[1]), "{starts:?}");
        assert_ne!(start(5, 3), start(6, 3));
    }
}
