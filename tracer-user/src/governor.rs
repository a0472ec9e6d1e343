//! Load shedding: what capture costs a CPU-bound traced thread stays within a budget.
//!
//! The probes run in the traced thread's own time, a few microseconds per request. While the
//! thread has idle time that costs CPU but no throughput, and every request is captured. When
//! a traced thread is CPU-bound (running most of a period), each microsecond of probes is a
//! microsecond the server does not serve requests in: then the agent captures its process's
//! socket I/O only part of the time, so that the estimated cost stays within the budget
//! (`--overhead-budget`, a share of the thread's CPU), and sheds the rest. Shedding is
//! counted, never silent: the kernel counts the socket calls it did not capture, the agent
//! the time each process spent shed.
//!
//! The kernel side is a per-process flag (`SHED_PIDS` in tracer-ebpf) that the data-path
//! programs read from their cached verdict: a shed call costs about what an untraced
//! process's does. The flag follows a duty cycle: in each period the process is captured for
//! the first `share` of it and shed for the rest, so that spans keep coming from every part
//! of the load. Each return to capture is a gap in every connection of the process, which
//! the agent tells the connection tracker before the flag flips (see `Action::Resume`).
//!
//! The cost of a captured call is an estimate made on this project's benchmark machine (see
//! `CAPTURED_NS_PER_CALL`); the thread's busy time is measured (`/proc/PID/task/TID/schedstat`).
//! Time spent ready to run but waiting for a CPU does not count: nginx at a steady 20k
//! requests/s on two CPUs shared with its clients ran 60% of the time and waited another 20%
//! or more, yet kept up with its load, and its requests must all be spans.

// Fx hashing as in the tracker: `observe` runs once per captured event.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

/// What a captured socket call cost nginx's worker, all in (kernel BPF run time about 1.5 µs
/// a call, plus the caches and wakeups it disturbs): 6.1 to 8.4 µs more CPU per request of two
/// calls across benchmark runs (README, "What it costs"). An estimate for the budget, not a
/// measurement per host.
const CAPTURED_NS_PER_CALL: f64 = 4000.0;
/// What a shed call costs: the programs' early returns, about 0.45 µs per nginx request of
/// two calls (the cost an untraced process pays).
const SHED_NS_PER_CALL: f64 = 250.0;
/// A thread busy this share of a period is CPU-bound: tracing it takes throughput. nginx's
/// worker, fully captured under wrk, ran 84-95% of each period; at a steady 20k requests/s,
/// 54-85% (mostly 65-80%).
const SATURATED: f64 = 0.85;
/// Periods in a row a thread must be CPU-bound before its process is shed: a server that
/// catches up after a stall (a burst of queued requests) is busy for a moment, not saturated.
const SATURATED_PERIODS: u32 = 2;
/// A shedding process returns to full capture once full capture would leave its hottest
/// thread below this (hysteresis: shedding itself frees the thread's time).
const UNSATURATED: f64 = 0.75;
/// The least share of each period a shedding process is captured for: spans keep coming.
const MIN_SHARE: f64 = 0.02;
/// Threads of a process whose busy time is read each period, the busiest by captured calls.
const THREADS_READ: usize = 4;
/// Threads remembered per process (their kernel trace context is cleared on each resume, a
/// map update each).
const MAX_KNOWN_TIDS: usize = 1024;
/// Processes governed at once; beyond, the least recently seen are forgotten.
const MAX_PROCESSES: usize = 4096;

/// What the agent must do to the kernel's shed set.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop capturing the process's socket I/O. The agent tells the tracker too: a connection
    /// closed while shed must not report the request it waited on as unanswered.
    Shed(u32),
    /// Capture it again. Before the flag flips, the agent tells the tracker that every
    /// connection of the process had a gap, and clears the kernel's trace context of its
    /// threads (`tids`): what they were serving when shedding began was never answered in
    /// view, and must not become the parent of their next calls.
    Resume { tgid: u32, tids: Vec<u32> },
}

/// Counters for the stats line and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GovernorStats {
    /// Time processes spent shed, summed over processes.
    pub shed_ns: u64,
    /// Processes shedding now (captured only part of the time).
    pub shedding: usize,
    /// Times a process started shedding.
    pub episodes: u64,
}

#[derive(Debug)]
struct Process {
    /// Share of each period the process is captured for; 1.0: always (not shedding).
    share: f64,
    /// The kernel flag as last set.
    shed: bool,
    /// When the flag last flipped (or the period began), for the time accounting.
    since_ns: u64,
    /// Time captured in the current period.
    captured_ns: u64,
    /// CPU time of the threads read, by tid, and when it was read: at the end of the last
    /// period, or as soon as a thread was first seen (so that a process can be judged at the
    /// end of its first period under load).
    cpu_ns: HashMap<u32, (u64, u64)>,
    known_tids: HashSet<u32>,
    /// Periods in a row without a captured call.
    quiet_periods: u32,
    /// Periods in a row its hottest thread was CPU-bound.
    saturated_periods: u32,
}

impl Process {
    fn new(now_ns: u64) -> Self {
        Process {
            share: 1.0,
            shed: false,
            since_ns: now_ns,
            captured_ns: 0,
            cpu_ns: HashMap::default(),
            known_tids: HashSet::default(),
            quiet_periods: 0,
            saturated_periods: 0,
        }
    }
}

pub struct Governor {
    /// Share of a CPU-bound thread's time capture may take; 0: never shed.
    budget: f64,
    period_ns: u64,
    period_start_ns: u64,
    /// Captured data calls this period, by (tgid, tid).
    calls: HashMap<(u32, u32), u64>,
    processes: HashMap<u32, Process>,
    stats: GovernorStats,
}

impl Governor {
    /// `budget`: share of a CPU-bound thread's time (0.03 for 3%); 0 disables shedding.
    pub fn new(budget: f64, period_ns: u64, now_ns: u64) -> Self {
        Governor {
            budget: budget.clamp(0.0, 1.0),
            period_ns: period_ns.max(1),
            period_start_ns: now_ns,
            calls: HashMap::default(),
            processes: HashMap::default(),
            stats: GovernorStats::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0.0
    }

    /// A data event of thread `tid` of `tgid` was captured.
    pub fn observe(&mut self, tgid: u32, tid: u32) {
        if self.enabled() {
            *self.calls.entry((tgid, tid)).or_insert(0) += 1;
        }
    }

    /// Whether some process is shedding: the duty cycle needs the agent's attention every few
    /// milliseconds, even when no events come.
    pub fn active(&self) -> bool {
        self.stats.shedding > 0
    }

    pub fn stats(&self) -> &GovernorStats {
        &self.stats
    }

    /// The process is gone (exit, exec): its shed flag, if set, goes.
    pub fn forget(&mut self, tgid: u32, actions: &mut Vec<Action>) {
        if let Some(p) = self.processes.remove(&tgid) {
            if p.shed {
                actions.push(Action::Resume {
                    tgid,
                    tids: Vec::new(),
                });
            }
            self.stats.shedding = self.count_shedding();
        }
    }

    /// Called after each drain of the ring (every few milliseconds while events flow or a
    /// process sheds). `cpu_ns(tgid, tid)` reads a thread's busy time (`thread_busy_ns`).
    /// Returns the changes to make to the kernel's shed set, in order.
    pub fn tick(
        &mut self,
        now_ns: u64,
        mut cpu_ns: impl FnMut(u32, u32) -> Option<u64>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.enabled() {
            return actions;
        }
        let elapsed = now_ns.saturating_sub(self.period_start_ns);
        if elapsed >= self.period_ns {
            self.end_period(now_ns, elapsed, &mut cpu_ns);
            self.period_start_ns = now_ns;
        } else {
            self.read_new_threads(now_ns, &mut cpu_ns);
        }
        let into_period = now_ns.saturating_sub(self.period_start_ns) as f64;
        let period = self.period_ns as f64;
        for (tgid, p) in &mut self.processes {
            let want_shed = p.share < 1.0 && into_period >= p.share * period;
            if want_shed == p.shed {
                continue;
            }
            let since = now_ns.saturating_sub(p.since_ns);
            if p.shed {
                self.stats.shed_ns += since;
                actions.push(Action::Resume {
                    tgid: *tgid,
                    tids: p.known_tids.iter().copied().collect(),
                });
            } else {
                p.captured_ns += since;
                actions.push(Action::Shed(*tgid));
            }
            p.shed = want_shed;
            p.since_ns = now_ns;
        }
        actions
    }

    /// Takes a first CPU reading of the threads seen for the first time this period.
    fn read_new_threads(&mut self, now_ns: u64, cpu_ns: &mut impl FnMut(u32, u32) -> Option<u64>) {
        for (tgid, tid) in self.calls.keys() {
            if !self.processes.contains_key(tgid) {
                if self.processes.len() >= MAX_PROCESSES {
                    continue;
                }
                self.processes.insert(*tgid, Process::new(now_ns));
            }
            let Some(p) = self.processes.get_mut(tgid) else {
                continue;
            };
            if p.cpu_ns.len() < THREADS_READ
                && !p.cpu_ns.contains_key(tid)
                && let Some(cpu) = cpu_ns(*tgid, *tid)
            {
                p.cpu_ns.insert(*tid, (cpu, now_ns));
            }
        }
    }

    /// Decides each process's share for the next period from the one that ended.
    fn end_period(
        &mut self,
        now_ns: u64,
        elapsed: u64,
        cpu_ns: &mut impl FnMut(u32, u32) -> Option<u64>,
    ) {
        let mut by_process: HashMap<u32, Vec<(u32, u64)>> = HashMap::default();
        for ((tgid, tid), n) in self.calls.drain() {
            by_process.entry(tgid).or_default().push((tid, n));
        }
        for tgid in by_process.keys() {
            if !self.processes.contains_key(tgid) && self.processes.len() < MAX_PROCESSES {
                self.processes.insert(*tgid, Process::new(now_ns));
            }
        }
        let (budget, period) = (self.budget, elapsed as f64);
        let period_start_ns = self.period_start_ns;
        self.processes.retain(|tgid, p| {
            // Time accounting for the period that ended.
            let since = now_ns.saturating_sub(p.since_ns);
            if p.shed {
                self.stats.shed_ns += since;
            } else {
                p.captured_ns += since;
            }
            p.since_ns = now_ns;
            let captured_share = (p.captured_ns as f64 / period).clamp(0.0, 1.0);
            p.captured_ns = 0;
            let Some(mut threads) = by_process.remove(tgid) else {
                // Nothing captured all period, not even in its captured share: the load is
                // gone, and with it any reason to shed. Forgotten once quiet for a while and
                // its flag is down.
                p.quiet_periods += 1;
                p.cpu_ns.clear();
                p.share = 1.0;
                return p.quiet_periods < 3 || p.shed;
            };
            p.quiet_periods = 0;
            if p.known_tids.len() + threads.len() > MAX_KNOWN_TIDS {
                p.known_tids.clear();
            }
            p.known_tids.extend(threads.iter().map(|(tid, _)| *tid));
            threads.sort_unstable_by_key(|t| std::cmp::Reverse(t.1));
            threads.truncate(THREADS_READ);
            let mut hottest: Option<(f64, u64)> = None;
            let mut readings = HashMap::default();
            for (tid, calls) in threads {
                let Some(now_cpu) = cpu_ns(*tgid, tid) else {
                    continue;
                };
                readings.insert(tid, (now_cpu, now_ns));
                if let Some((before, at)) = p.cpu_ns.get(&tid) {
                    // Over the part of the period since the reading, when it is long enough
                    // to tell.
                    let span = now_ns.saturating_sub(*at);
                    if span < (now_ns - period_start_ns) / 2 {
                        continue;
                    }
                    let busy = now_cpu.saturating_sub(*before) as f64 / span as f64;
                    if hottest.is_none_or(|(b, _)| busy > b) {
                        hottest = Some((busy, calls));
                    }
                }
            }
            p.cpu_ns = readings;
            if let Some((busy, calls)) = hottest {
                p.saturated_periods = if busy >= SATURATED {
                    p.saturated_periods.saturating_add(1)
                } else {
                    0
                };
                let sustained = p.saturated_periods >= SATURATED_PERIODS;
                let share =
                    next_share(budget, p.share, busy, sustained, calls, period, captured_share);
                log::debug!(
                    "pid {tgid}: hottest thread busy {busy:.2}, {calls} calls captured in {:.0}% of the period: capture share {:.2} -> {share:.2}",
                    captured_share * 100.0,
                    p.share
                );
                p.share = share;
            }
            true
        });
        let shedding = self.count_shedding();
        if shedding > self.stats.shedding {
            self.stats.episodes += (shedding - self.stats.shedding) as u64;
        }
        self.stats.shedding = shedding;
    }

    fn count_shedding(&self) -> usize {
        self.processes.values().filter(|p| p.share < 1.0).count()
    }
}

/// The share of the next period to capture a process for, from its hottest thread's busy
/// share in the last one (and whether it has been CPU-bound for `SATURATED_PERIODS`), the
/// calls captured from that thread, the period's length and the share of it that was captured.
fn next_share(
    budget: f64,
    share: f64,
    busy: f64,
    sustained: bool,
    calls: u64,
    period_ns: f64,
    captured_share: f64,
) -> f64 {
    if captured_share <= 0.0 {
        return share;
    }
    // The thread's call rate had it been captured all period, and what capture costs it
    // then, and shed, as shares of a CPU.
    let calls_per_ns = calls as f64 / (period_ns * captured_share);
    let cost_captured = calls_per_ns * CAPTURED_NS_PER_CALL;
    let cost_shed = calls_per_ns * SHED_NS_PER_CALL;
    let fitting = ((budget - cost_shed) / (cost_captured - cost_shed)).clamp(MIN_SHARE, 1.0);
    if share >= 1.0 {
        if sustained && cost_captured > budget {
            fitting
        } else {
            1.0
        }
    } else {
        // Busy as it would be with full capture: shedding gave the thread time it now uses.
        let busy_captured = busy + (1.0 - captured_share) * (cost_captured - cost_shed);
        if busy_captured < UNSATURATED {
            1.0
        } else {
            // A few tens of milliseconds captured make a noisy estimate of the rate: move
            // halfway. Below 1 even when full capture fits the budget after all, so that the
            // next period measures the same way and the hysteresis decides.
            ((share + fitting) / 2.0).min(0.99)
        }
    }
}

/// Time thread `tid` of `tgid` ran, in nanoseconds, from `/proc` (`schedstat`'s first field:
/// time on a CPU).
pub fn thread_busy_ns(tgid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/schedstat")).ok()?;
    text.split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const PERIOD: u64 = 200 * MS;

    /// Drives a governor over `periods` periods in 10 ms ticks for one process with one
    /// thread that makes `calls_per_s` captured calls while captured and is `busy` of a CPU;
    /// returns the governor and the actions.
    fn run(
        budget: f64,
        busy: f64,
        calls_per_s: u64,
        periods: u64,
    ) -> (Governor, Vec<(u64, Action)>) {
        let mut g = Governor::new(budget, PERIOD, 0);
        let mut all = Vec::new();
        let mut shed = false;
        let tick = 10 * MS;
        for step in 1..=(periods * PERIOD / tick) {
            let now = step * tick;
            if !shed {
                for _ in 0..(calls_per_s * tick / 1_000_000_000) {
                    g.observe(7, 8);
                }
            }
            let cpu = (now as f64 * busy) as u64;
            for a in g.tick(now, |_, _| Some(cpu)) {
                match &a {
                    Action::Shed(_) => shed = true,
                    Action::Resume { .. } => shed = false,
                }
                all.push((now, a));
            }
        }
        (g, all)
    }

    #[test]
    fn an_idle_thread_is_never_shed() {
        // 20k requests/s, two calls each, on a thread busy 60%: every request captured.
        let (g, actions) = run(0.03, 0.6, 40_000, 20);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(g.stats().shed_ns, 0);
        assert_eq!(g.stats().shedding, 0);
    }

    #[test]
    fn a_saturated_thread_is_captured_within_the_budget() {
        // nginx at saturation: 30k requests/s, 60k calls/s, the worker busy 97%.
        let (g, actions) = run(0.03, 0.97, 60_000, 20);
        assert!(matches!(actions.first(), Some((_, Action::Shed(7)))));
        let p = &g.processes[&7];
        // (0.03 - 0.015) / (0.24 - 0.015) ≈ 0.067 of each period captured.
        assert!((0.06..0.075).contains(&p.share), "share {}", p.share);
        // Shed about 93% of the time after the first two periods (the thread's CPU time is
        // read as soon as it is seen; it must be CPU-bound two periods in a row).
        let shed_s = g.stats().shed_ns as f64 / 1e9;
        assert!((3.1..3.5).contains(&shed_s), "shed {shed_s} s of 4");
        // It alternates: a resume for each shed after the first.
        let sheds = actions
            .iter()
            .filter(|(_, a)| matches!(a, Action::Shed(_)))
            .count();
        let resumes = actions.len() - sheds;
        assert!(sheds >= 17 && resumes >= sheds - 1, "{sheds} {resumes}");
        assert_eq!(g.stats().episodes, 1);
    }

    #[test]
    fn a_moment_of_saturation_is_not_shed() {
        // A server catching up after a stall: CPU-bound for one period in three.
        let mut g = Governor::new(0.03, PERIOD, 0);
        let mut cpu = 0u64;
        let mut actions = Vec::new();
        for step in 1..=300u64 {
            let now = step * 10 * MS;
            let busy = if (now / PERIOD) % 3 == 1 { 0.95 } else { 0.6 };
            for _ in 0..400 {
                g.observe(7, 8);
            }
            cpu += (10.0 * MS as f64 * busy) as u64;
            let c = cpu;
            actions.extend(g.tick(now, |_, _| Some(c)));
        }
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn cheap_capture_is_not_shed_even_when_saturated() {
        // A slow server (Python): 4k calls/s at 97% busy costs 1.6% < 3%.
        let (_, actions) = run(0.03, 0.97, 4_000, 10);
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_zero_budget_never_sheds() {
        let (g, actions) = run(0.0, 1.0, 100_000, 10);
        assert!(actions.is_empty());
        assert!(!g.enabled());
    }

    #[test]
    fn shedding_ends_when_the_load_falls() {
        let mut g = Governor::new(0.03, PERIOD, 0);
        let mut shed = false;
        let mut now = 0;
        let mut cpu = 0u64;
        let mut step = |g: &mut Governor, busy: f64, rate: u64, shed: &mut bool, now: &mut u64| {
            *now += 10 * MS;
            if !*shed {
                for _ in 0..rate / 100 {
                    g.observe(7, 8);
                }
            }
            cpu += (10.0 * MS as f64 * busy) as u64;
            let c = cpu;
            let actions = g.tick(*now, |_, _| Some(c));
            for a in &actions {
                *shed = matches!(a, Action::Shed(_));
            }
            actions
        };
        for _ in 0..100 {
            step(&mut g, 0.97, 60_000, &mut shed, &mut now);
        }
        assert_eq!(g.stats().shedding, 1);
        // The load halves: 30k calls/s, the thread busy 45% while mostly shed.
        let mut resumed_for_good = false;
        for _ in 0..100 {
            step(&mut g, 0.45, 30_000, &mut shed, &mut now);
            resumed_for_good = g.stats().shedding == 0;
        }
        assert!(resumed_for_good);
        assert!(!shed);
    }

    #[test]
    fn shedding_ends_when_the_load_stops() {
        let (mut g, _) = run(0.03, 0.97, 60_000, 5);
        assert_eq!(g.stats().shedding, 1);
        // No calls at all from now on: captured again at the next period's end, for good.
        let mut last = Vec::new();
        for step in 1..=40 {
            let now = 5 * PERIOD + step * 10 * MS;
            last.extend(g.tick(now, |_, _| Some(0)));
        }
        assert_eq!(g.stats().shedding, 0);
        assert!(!g.processes.get(&7).is_some_and(|p| p.shed));
        assert!(
            matches!(last.last(), None | Some(Action::Resume { .. })),
            "the last action must be a resume: {last:?}"
        );
    }

    #[test]
    fn a_gone_process_is_resumed_and_forgotten() {
        let (mut g, _) = run(0.03, 0.97, 60_000, 5);
        assert_eq!(g.stats().shedding, 1);
        let shed = g.processes[&7].shed;
        let mut actions = Vec::new();
        g.forget(7, &mut actions);
        assert_eq!(g.stats().shedding, 0);
        assert_eq!(
            actions,
            if shed {
                vec![Action::Resume {
                    tgid: 7,
                    tids: vec![],
                }]
            } else {
                vec![]
            }
        );
    }

    #[test]
    fn resume_names_the_threads_seen() {
        let (_, actions) = run(0.03, 0.97, 60_000, 5);
        let tids = actions.iter().find_map(|(_, a)| match a {
            Action::Resume { tids, .. } => Some(tids.clone()),
            _ => None,
        });
        assert_eq!(tids, Some(vec![8]));
    }
}
