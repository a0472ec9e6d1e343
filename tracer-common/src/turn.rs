//! Per-turn sampling's state machine, run by the eBPF programs (tracer-ebpf's `turns` has the
//! design) and kept here, pure, so that it is tested on the host.
//!
//! A connection's state is a `u32`: the direction that opens its turns (that of the first call
//! seen), the direction of the last call, whether the current turn is picked, and whether a
//! call was skipped since the last captured one.

/// The direction that opens a turn: 0 unknown yet, else `dir_bits` of it.
const OPENER: u32 = 0b11;
/// The direction of the last call seen (`dir_bits`), 0 none yet.
const LAST_SHIFT: u32 = 2;
const LAST: u32 = 0b11 << LAST_SHIFT;
/// The current turn is captured.
const PICKED: u32 = 1 << 4;
/// A call was skipped since the last captured one.
const SKIPPED: u32 = 1 << 5;

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
}
