//! Load shedding: what capture costs a CPU-bound traced thread stays within a budget.
//!
//! The probes run in the traced thread's own time, a few microseconds per request. While the
//! thread has idle time that costs CPU but no throughput, and every request is captured. When
//! a traced thread is CPU-bound (running most of a period), each microsecond of probes is a
//! microsecond the server does not serve requests in: then the agent has the kernel capture
//! only a share of its process's requests, so that the estimated cost stays within the budget
//! (`--overhead-budget`, a share of the thread's CPU), and sheds the rest. Shedding is
//! counted, never silent: the kernel counts the socket calls it did not capture, the agent
//! the time each process spent shed.
//!
//! The kernel side is a per-process share (`SHED_PIDS` in tracer-ebpf) that the data-path
//! programs read with their cached verdict: they capture that share of the process's
//! request/response turns, each picked whole at random as it begins (tracer-ebpf's `turns`),
//! and a skipped call costs little more than an untraced process's. The captured requests are
//! spread evenly over the load, and so is their cost. A connection whose calls were skipped
//! reports a gap before its next captured call, for the connection tracker to resync there.
//!
//! What a captured call costs has two parts: the probes in the traced thread, an estimate made
//! on this project's benchmark machine (`CAPTURED_NS_PER_CALL`), and the agent's own work on
//! its event, measured in place (the agent's CPU time over the calls it handled while nothing
//! was shed). Both count against the budget: on a host without a spare CPU the agent's time is
//! taken from the traced program too.
//!
//! A thread is CPU-bound when it never sleeps for want of work: it is on a CPU or waiting for
//! one nearly all the time (`/proc/PID/task/TID/schedstat`), averaged over about a second.
//! On-CPU time alone misses a server starved by its neighbours (fully captured, nginx ran 70-85%
//! of each period and waited for a CPU the rest, the agent among those it waited for); a single
//! period misses nothing but mistakes a catch-up after a stall for saturation (nginx at a steady
//! 20k requests/s, which must all be spans, runs 60-75% and sleeps 10-30% of a period, but
//! after a stall of the machine it is runnable for three or four periods in a row). However
//! little of the time it is on a CPU: a server sharing its CPU with another as busy runs half
//! the time and waits the rest, serves requests in the half it gets, and loses to capture what
//! capture takes of that half (fully captured beside an untraced twin on one CPU, nginx served
//! 13% fewer requests than its twin; it was shed only when on a CPU over half the time, and
//! captured in full again at once, since it never ran 75% of the time). So the budget is a
//! share of the CPU time the thread gets, and shedding ends when the thread would no longer
//! be runnable most of the time with full capture.

// Fx hashing as in the tracker: `observe` runs once per captured event.
use rustc_hash::FxHashMap as HashMap;

/// What a captured socket call cost nginx's worker, all in (kernel BPF run time about 1.5 µs
/// a call, plus the caches and wakeups it disturbs): 6.1 to 8.4 µs more CPU per request of two
/// calls across benchmark runs (README, "What it costs"). An estimate for the budget, not a
/// measurement per host.
const CAPTURED_NS_PER_CALL: f64 = 4000.0;
/// The agent's CPU time per captured call until it has been measured (nginx fully captured:
/// 3.8 ms per 1k requests of two calls).
const AGENT_NS_PER_CALL: f64 = 2000.0;
/// Calls a period must bring, none of them shed, to measure the agent's cost per call: fewer
/// and the agent's fixed costs (its timers, reading /proc) weigh on the estimate.
const AGENT_MEASURE_CALLS: u64 = 1000;
/// What a shed call costs the thread: the programs that still run for it (the verdict, the
/// socket's turn bits, the early return). Sampled at 4 kHz, nginx shed under wrk (7.5% of its
/// requests captured) spent 3.8% of its CPU in the programs, about 1 µs a request of two
/// counted calls, of which the captured ones account for about 0.25.
const SHED_NS_PER_CALL: f64 = 400.0;
/// A thread runnable (on a CPU or waiting for one) this share of the time, on average, is
/// CPU-bound: tracing it takes throughput. Fully captured nginx under wrk: 82-100% of each
/// period, 94-99% on average (wrk, starved by the agent and the server, does not always have
/// a request waiting); at a steady 20k requests/s: 63-95%, up to 94% on average when the
/// machine is slow and the server falls behind its load (100+ ms p99). At 0.93 a benchmark's
/// paced 20k requests/s run was shed 11% of the time; at 0.95 a saturated nginx averaging
/// 94% may go unshed for a while (capture kept, throughput lost) rather than shed spans.
const SATURATED: f64 = 0.95;
/// A thread on a CPU this share of the time, on average, is CPU-bound too: the e2e test's nginx
/// gzipping each response under wrk went unshed on the runnable share alone in one CI run and
/// one of three local runs. At a steady 20k requests/s nginx runs 60-75% of the time, and
/// 80-99% for three or four periods after a stall: an average stays under 85%.
const SATURATED_ON_CPU: f64 = 0.85;
/// The least runnable share of each of the last two periods of a CPU-bound thread (or
/// `SATURATED_ON_CPU` on a CPU).
const SATURATED_LAST: f64 = 0.92;
/// Weight of the last period in the runnable share's running average (about a second's memory
/// at 200 ms periods): a catch-up of three or four periods after a stall stays under
/// `SATURATED`, sustained saturation crosses it within two or three periods of its start.
const RUNNABLE_WEIGHT: f64 = 0.2;
/// A shedding process returns to full capture once full capture would leave its hottest
/// thread runnable less than this share of the time (hysteresis: shedding itself frees the
/// thread's time). A thread that shares its CPU (on it half the time, waiting for it the
/// rest) stays runnable however little its calls cost: it is CPU-bound within its share.
const UNSATURATED: f64 = 0.75;
/// The least share of turns a shedding process is captured for: spans keep coming (a
/// saturated nginx serves 30-40k requests/s, of which this keeps 150-200 a second). More
/// and their capture alone costs nginx most of a 3% budget its shed calls have already
/// taken (2% of its turns cost it 0.7% of its CPU, on top of 2.7% for the shed calls).
const MIN_SHARE: f64 = 0.005;
/// The least relative change of a shedding process's share that is made.
const SHARE_STEP: f64 = 0.1;
/// Threads of a process whose busy time is read each period, the busiest by captured calls.
const THREADS_READ: usize = 4;
/// Processes governed at once; beyond, the least recently seen are forgotten.
const MAX_PROCESSES: usize = 4096;

/// What the agent must do to the kernel's shed set.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Capture `keep` (0 < keep < 1) of the process's request/response turns from now on.
    /// The agent tells the tracker too: a connection closed while shed must not report the
    /// request it waited on as unanswered.
    Sample { tgid: u32, keep: f64 },
    /// Capture all of it again. Each connection that skipped calls reports its gap with its
    /// next captured call; a thread's kernel trace context is always a captured request's.
    Resume(u32),
}

/// Counters for the stats line and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GovernorStats {
    /// Time processes spent shed (captured in part), summed over processes.
    pub shed_ns: u64,
    /// Processes shedding now (captured in part).
    pub shedding: usize,
    /// Times a process started shedding.
    pub episodes: u64,
}

#[derive(Debug)]
struct Process {
    /// Share of its turns the process is captured for, as the kernel has it (set at period
    /// ends only); 1.0: all (not shedding).
    share: f64,
    /// Times of the threads read, by tid, and when they were read: at the end of the last
    /// period, or as soon as a thread was first seen (so that a process can be judged at the
    /// end of its first period under load).
    times: HashMap<u32, (ThreadTime, u64)>,
    /// Periods in a row without a captured call.
    quiet_periods: u32,
    /// The hottest thread's running averages (`RUNNABLE_WEIGHT`); `None` until a period
    /// under load was measured.
    load: Option<Load>,
}

/// Running averages of a thread's runnable and on-CPU shares, and whether it was hot (see
/// `SATURATED_LAST`) in the last period.
#[derive(Clone, Copy, Debug)]
struct Load {
    runnable: f64,
    on_cpu: f64,
    last_hot: bool,
}

impl Process {
    fn new() -> Self {
        Process {
            share: 1.0,
            times: HashMap::default(),
            quiet_periods: 0,
            load: None,
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
    /// The agent's CPU time per captured call (`AGENT_NS_PER_CALL` until measured).
    agent_ns_per_call: f64,
    agent_measured: bool,
    /// The agent's CPU time when the period began (`None`: not read yet).
    agent_cpu_ns: Option<u64>,
    /// Whether some process was shed in this period: its skipped calls then cost the agent
    /// nothing, and the period cannot measure the cost per call.
    shed_in_period: bool,
    stats: GovernorStats,
}

/// A thread's time so far, from its `schedstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTime {
    /// Time on a CPU.
    pub on_cpu_ns: u64,
    /// Time ready to run, waiting for a CPU.
    pub waiting_ns: u64,
}

/// What the governor reads of the host at its ticks.
pub trait Readings {
    /// Thread `tid` of `tgid` so far; `None` when it is gone.
    fn thread(&mut self, tgid: u32, tid: u32) -> Option<ThreadTime>;
    /// The agent's own CPU time so far, all its threads.
    fn agent_cpu_ns(&mut self) -> u64;
}

/// The readings of this host: `/proc/PID/task/TID/schedstat` and the agent's process clock.
pub struct HostReadings;

impl Readings for HostReadings {
    fn thread(&mut self, tgid: u32, tid: u32) -> Option<ThreadTime> {
        let text = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/schedstat")).ok()?;
        let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
        Some(ThreadTime {
            on_cpu_ns: fields.next()??,
            waiting_ns: fields.next()??,
        })
    }

    fn agent_cpu_ns(&mut self) -> u64 {
        crate::spans::clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) as u64
    }
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
            agent_ns_per_call: AGENT_NS_PER_CALL,
            agent_measured: false,
            agent_cpu_ns: None,
            shed_in_period: false,
            stats: GovernorStats::default(),
        }
    }

    /// The agent's CPU time per captured call, as last measured.
    pub fn agent_ns_per_call(&self) -> f64 {
        self.agent_ns_per_call
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

    pub fn stats(&self) -> &GovernorStats {
        &self.stats
    }

    /// The process is gone (exit, exec): its share, if set, goes.
    pub fn forget(&mut self, tgid: u32, actions: &mut Vec<Action>) {
        if let Some(p) = self.processes.remove(&tgid) {
            if p.share < 1.0 {
                actions.push(Action::Resume(tgid));
            }
            self.stats.shedding = self.count_shedding();
        }
    }

    /// Called after each drain of the ring (every few milliseconds while events flow).
    /// Returns the changes to make to the kernel's shed set, in order.
    pub fn tick(&mut self, now_ns: u64, readings: &mut impl Readings) -> Vec<Action> {
        let mut actions = Vec::new();
        if !self.enabled() {
            return actions;
        }
        let elapsed = now_ns.saturating_sub(self.period_start_ns);
        if elapsed < self.period_ns {
            self.read_new_threads(now_ns, readings);
            return actions;
        }
        self.end_period(now_ns, elapsed, readings, &mut actions);
        self.period_start_ns = now_ns;
        self.shed_in_period = self.processes.values().any(|p| p.share < 1.0);
        actions
    }

    /// Takes a first CPU reading of the threads seen for the first time this period.
    fn read_new_threads(&mut self, now_ns: u64, readings: &mut impl Readings) {
        for (tgid, tid) in self.calls.keys() {
            if !self.processes.contains_key(tgid) {
                if self.processes.len() >= MAX_PROCESSES {
                    continue;
                }
                self.processes.insert(*tgid, Process::new());
            }
            let Some(p) = self.processes.get_mut(tgid) else {
                continue;
            };
            if p.times.len() < THREADS_READ
                && !p.times.contains_key(tid)
                && let Some(time) = readings.thread(*tgid, *tid)
            {
                p.times.insert(*tid, (time, now_ns));
            }
        }
    }

    /// Decides each process's share for the next period from the one that ended.
    /// Changes of share go to `actions`.
    fn end_period(
        &mut self,
        now_ns: u64,
        elapsed: u64,
        readings: &mut impl Readings,
        actions: &mut Vec<Action>,
    ) {
        let mut by_process: HashMap<u32, Vec<(u32, u64)>> = HashMap::default();
        let mut all_calls = 0;
        for ((tgid, tid), n) in self.calls.drain() {
            by_process.entry(tgid).or_default().push((tid, n));
            all_calls += n;
        }
        let agent_cpu_ns = readings.agent_cpu_ns();
        if let Some(before) = self.agent_cpu_ns
            && !self.shed_in_period
            && all_calls >= AGENT_MEASURE_CALLS
        {
            let per_call = agent_cpu_ns.saturating_sub(before) as f64 / all_calls as f64;
            // Halfway after the first: one period's reading is noisy (a collector's slow
            // response, a burst of connections).
            self.agent_ns_per_call = if self.agent_measured {
                (self.agent_ns_per_call + per_call) / 2.0
            } else {
                per_call
            };
            self.agent_measured = true;
        }
        self.agent_cpu_ns = Some(agent_cpu_ns);
        for tgid in by_process.keys() {
            if !self.processes.contains_key(tgid) && self.processes.len() < MAX_PROCESSES {
                self.processes.insert(*tgid, Process::new());
            }
        }
        let (budget, period, agent_ns_per_call) =
            (self.budget, elapsed as f64, self.agent_ns_per_call);
        let period_start_ns = self.period_start_ns;
        self.processes.retain(|tgid, p| {
            // Time accounting for the period that ended, and the share of its calls captured.
            let captured_share = p.share;
            if captured_share < 1.0 {
                self.stats.shed_ns += elapsed;
            }
            let Some(mut threads) = by_process.remove(tgid) else {
                // Nothing captured all period, not even its share: the load is gone, and with
                // it any reason to shed. Forgotten once quiet for a while, captured in full
                // again by then (the kernel has been told).
                p.quiet_periods += 1;
                p.times.clear();
                p.load = None;
                if captured_share < 1.0 {
                    p.share = 1.0;
                    actions.push(Action::Resume(*tgid));
                }
                return p.quiet_periods < 3 || captured_share < 1.0;
            };
            p.quiet_periods = 0;
            threads.sort_unstable_by_key(|t| std::cmp::Reverse(t.1));
            threads.truncate(THREADS_READ);
            // The thread runnable the largest share of the time: (runnable, on CPU, calls).
            let mut hottest: Option<(f64, f64, u64)> = None;
            let mut times = HashMap::default();
            for (tid, calls) in threads {
                let Some(now_time) = readings.thread(*tgid, tid) else {
                    continue;
                };
                times.insert(tid, (now_time, now_ns));
                if let Some((before, at)) = p.times.get(&tid) {
                    // Over the part of the period since the reading, when it is long enough
                    // to tell.
                    let span = now_ns.saturating_sub(*at);
                    if span < (now_ns - period_start_ns) / 2 {
                        continue;
                    }
                    let on_cpu = now_time.on_cpu_ns.saturating_sub(before.on_cpu_ns);
                    let waiting = now_time.waiting_ns.saturating_sub(before.waiting_ns);
                    let busy = on_cpu as f64 / span as f64;
                    let runnable = (on_cpu + waiting) as f64 / span as f64;
                    if hottest.is_none_or(|(r, _, _)| runnable > r) {
                        hottest = Some((runnable, busy, calls));
                    }
                }
            }
            p.times = times;
            if let Some((runnable, busy, calls)) = hottest {
                let before = p.load.unwrap_or(Load {
                    runnable,
                    on_cpu: busy,
                    last_hot: false,
                });
                let hot = runnable >= SATURATED_LAST || busy >= SATURATED_ON_CPU;
                let average = before.runnable + RUNNABLE_WEIGHT * (runnable - before.runnable);
                let on_cpu = before.on_cpu + RUNNABLE_WEIGHT * (busy - before.on_cpu);
                p.load = Some(Load {
                    runnable: average,
                    on_cpu,
                    last_hot: hot,
                });
                // Runnable nearly all the time, or on a CPU most of it (time the kernel spends
                // on interrupts, or the hypervisor steals, is in neither share). However
                // little of the time it is on a CPU: a thread that shares its CPU with others
                // as busy serves requests in the share it gets, and what their capture costs
                // is taken from that share.
                let cpu_bound = (average >= SATURATED || on_cpu >= SATURATED_ON_CPU)
                    && hot
                    && before.last_hot;
                let cost = CallCost {
                    calls_per_ns: calls as f64 / (period * captured_share),
                    agent_ns: agent_ns_per_call,
                };
                let thread = ThreadLoad { runnable, busy };
                let share = next_share(budget, p.share, thread, cpu_bound, &cost, captured_share);
                log::debug!(
                    "pid {tgid}: hottest thread runnable {runnable:.2} (average {average:.2}), on CPU {busy:.2} (average {on_cpu:.2}), {calls} calls captured of {:.0}% of its turns, agent {agent_ns_per_call:.0} ns a call: capture share {:.3} -> {share:.3}",
                    captured_share * 100.0,
                    p.share
                );
                if share != p.share {
                    actions.push(if share < 1.0 {
                        Action::Sample { tgid: *tgid, keep: share }
                    } else {
                        Action::Resume(*tgid)
                    });
                }
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

/// What capture costs a thread: its call rate had all its calls been captured, and the
/// agent's CPU time per call.
struct CallCost {
    calls_per_ns: f64,
    agent_ns: f64,
}

/// A thread's shares of a period: runnable (on a CPU or waiting for one), and on a CPU.
#[derive(Clone, Copy, Debug)]
struct ThreadLoad {
    runnable: f64,
    busy: f64,
}

/// The share of turns to capture a process for in the next period, from its hottest thread's
/// load in the last one, whether that thread is CPU-bound, what its calls cost, and the share
/// that was captured.
fn next_share(
    budget: f64,
    share: f64,
    thread: ThreadLoad,
    cpu_bound: bool,
    cost: &CallCost,
    captured_share: f64,
) -> f64 {
    if captured_share <= 0.0 || !cost.calls_per_ns.is_finite() {
        return share;
    }
    // What capturing every call costs, in the thread and all in, and shedding every call, as
    // shares of a CPU.
    let in_thread = cost.calls_per_ns * CAPTURED_NS_PER_CALL;
    let captured = cost.calls_per_ns * (CAPTURED_NS_PER_CALL + cost.agent_ns);
    let shed = cost.calls_per_ns * SHED_NS_PER_CALL;
    // The budget is a share of the CPU time the thread gets, all of which serves requests:
    // a thread on its CPU half the time loses twice as much of its throughput to a
    // microsecond of capture as one that has a CPU to itself.
    let budget = budget * thread.busy.min(1.0);
    let fitting = ((budget - shed) / (captured - shed)).clamp(MIN_SHARE, 1.0);
    if share >= 1.0 {
        if cpu_bound && captured > budget {
            fitting
        } else {
            1.0
        }
    } else {
        // Runnable as it would be with full capture: shedding gave the thread time it now
        // uses, and a thread that waits for its CPU waits in proportion to what it runs.
        let wanted = thread.busy + (1.0 - captured_share) * (in_thread - shed);
        let runnable_captured = if thread.busy > 0.0 {
            thread.runnable * wanted / thread.busy
        } else {
            0.0
        };
        if runnable_captured < UNSATURATED {
            1.0
        } else {
            // A few hundred calls captured make a noisy estimate of the rate: move halfway,
            // and not at all for less than a tenth (each change costs the kernel a round of
            // cached verdicts). Below 1 even when full capture fits the budget after all, so
            // that the next period measures the same way and the hysteresis decides.
            let next = ((share + fitting) / 2.0).min(0.99);
            if (next - share).abs() < share * SHARE_STEP {
                share
            } else {
                next
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const PERIOD: u64 = 200 * MS;

    /// One thread's times and the agent's CPU, as the test sets them.
    #[derive(Default)]
    struct Fake {
        thread: ThreadTime,
        agent_cpu_ns: u64,
    }

    impl Readings for Fake {
        fn thread(&mut self, _: u32, _: u32) -> Option<ThreadTime> {
            Some(self.thread)
        }

        fn agent_cpu_ns(&mut self) -> u64 {
            self.agent_cpu_ns
        }
    }

    /// The thread ran `on_cpu` of `ns` and waited for a CPU `waiting` of it.
    fn advance(fake: &mut Fake, ns: u64, on_cpu: f64, waiting: f64) {
        fake.thread.on_cpu_ns += (ns as f64 * on_cpu) as u64;
        fake.thread.waiting_ns += (ns as f64 * waiting) as u64;
    }

    /// Drives a governor over `periods` periods in 10 ms ticks for one process with one
    /// thread that makes `calls_per_s` calls (of which the share sampled is captured) and is
    /// `busy` of a CPU, never waiting for one, the agent spending 2 µs on each captured call;
    /// returns the governor and the actions.
    fn run(
        budget: f64,
        busy: f64,
        calls_per_s: u64,
        periods: u64,
    ) -> (Governor, Vec<(u64, Action)>) {
        run_with(budget, busy, 0.0, 2000, calls_per_s, periods)
    }

    /// `run`, the thread waiting for a CPU `waiting` of the time, the agent spending
    /// `agent_ns` on each call.
    fn run_with(
        budget: f64,
        busy: f64,
        waiting: f64,
        agent_ns: u64,
        calls_per_s: u64,
        periods: u64,
    ) -> (Governor, Vec<(u64, Action)>) {
        let mut g = Governor::new(budget, PERIOD, 0);
        let mut fake = Fake::default();
        let mut all = Vec::new();
        let mut keep = 1.0;
        let tick = 10 * MS;
        for step in 1..=(periods * PERIOD / tick) {
            let now = step * tick;
            let calls = captured_calls(calls_per_s, tick, keep);
            for _ in 0..calls {
                g.observe(7, 8);
            }
            fake.agent_cpu_ns += calls * agent_ns;
            advance(&mut fake, tick, busy, waiting);
            for a in g.tick(now, &mut fake) {
                keep = kept(&a);
                all.push((now, a));
            }
        }
        (g, all)
    }

    /// Calls captured in `ns` at `calls_per_s`, `keep` of them.
    fn captured_calls(calls_per_s: u64, ns: u64, keep: f64) -> u64 {
        ((calls_per_s * ns / 1_000_000_000) as f64 * keep).round() as u64
    }

    /// The share captured after `action`.
    fn kept(action: &Action) -> f64 {
        match action {
            Action::Sample { keep, .. } => *keep,
            Action::Resume(_) => 1.0,
        }
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
        // A server at saturation: 20k requests/s, 40k calls/s, the thread busy 97%.
        let (g, actions) = run(0.03, 0.97, 40_000, 20);
        // (0.03 - 0.016) / (0.04 * (4 + 2) - 0.016) = 0.0625 of the turns captured, from the
        // end of the second period (the thread's CPU time is read as soon as it is seen; it
        // must be CPU-bound two periods in a row), and the share holds: one action in all.
        let [(at, Action::Sample { tgid: 7, keep })] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(*at, 2 * PERIOD);
        assert!((0.058..0.067).contains(keep), "share {keep}");
        assert_eq!(g.processes[&7].share, *keep);
        let shed_s = g.stats().shed_ns as f64 / 1e9;
        assert!((3.55..3.65).contains(&shed_s), "shed {shed_s} s of 4");
        assert_eq!(g.stats().episodes, 1);
    }

    #[test]
    fn where_shed_calls_alone_cost_the_budget_the_least_share_is_captured() {
        // nginx at saturation: 30k requests/s, 60k calls/s, whose shed calls alone cost
        // 0.06 * 0.4 = 2.4% of a CPU, more than a 2% budget.
        let (g, actions) = run(0.02, 0.97, 60_000, 20);
        assert!(
            matches!(actions.as_slice(), [(_, Action::Sample { tgid: 7, .. })]),
            "{actions:?}"
        );
        assert_eq!(g.processes[&7].share, MIN_SHARE);
    }

    #[test]
    fn the_agents_cost_is_measured_and_counted() {
        // As above, the agent spending 6 µs on each call: (0.03 - 0.016) / (0.04 * (4 + 6)
        // - 0.016) ≈ 0.036.
        let (g, _) = run_with(0.03, 0.97, 0.0, 6000, 40_000, 20);
        assert!(
            (5500.0..6500.0).contains(&g.agent_ns_per_call()),
            "{}",
            g.agent_ns_per_call()
        );
        let share = g.processes[&7].share;
        assert!((0.033..0.04).contains(&share), "share {share}");
    }

    #[test]
    fn a_thread_starved_of_cpu_while_captured_is_shed() {
        // nginx fully captured on a busy host: on a CPU 75% of the time, waiting for one the
        // rest (the agent among those it waits for).
        let (g, actions) = run_with(0.03, 0.75, 0.24, 2000, 50_000, 10);
        assert!(matches!(
            actions.first(),
            Some((_, Action::Sample { tgid: 7, .. }))
        ));
        assert_eq!(g.stats().shedding, 1);
    }

    #[test]
    fn a_thread_on_a_cpu_most_of_the_time_is_shed() {
        // Runnable only 90% of the time (the rest went to interrupts or the hypervisor), on a
        // CPU all of that: CPU-bound all the same.
        let (g, actions) = run_with(0.03, 0.9, 0.0, 2000, 50_000, 10);
        assert!(matches!(
            actions.first(),
            Some((_, Action::Sample { tgid: 7, .. }))
        ));
        assert_eq!(g.stats().shedding, 1);
    }

    #[test]
    fn a_thread_sharing_its_cpu_is_shed_within_its_share() {
        // A server on a CPU half the time and waiting for it the rest (another as busy shares
        // it), 10k calls/s: the budget is 3% of its half, (0.015 - 0.004) / (0.01 * (4 + 2) -
        // 0.004) ≈ 0.196 of its turns, where a thread with a CPU to itself gets 0.45.
        let (g, actions) = run_with(0.03, 0.5, 0.5, 2000, 10_000, 20);
        // And it stays shed: it still waits for its CPU half the time.
        let [(_, Action::Sample { tgid: 7, keep })] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert!((0.19..0.2).contains(keep), "share {keep}");
        let (g_alone, _) = run_with(0.03, 0.97, 0.0, 2000, 10_000, 20);
        let alone = g_alone.processes[&7].share;
        assert!((0.44..0.46).contains(&alone), "share {alone}");
        assert_eq!(g.stats().shedding, 1);
    }

    #[test]
    fn a_thread_that_mostly_waits_for_a_busy_cpu_is_shed() {
        // On a CPU a third of the time, waiting for it the rest: its calls' capture is taken
        // from the third it gets.
        let (g, actions) = run_with(0.03, 0.3, 0.68, 2000, 50_000, 10);
        assert!(
            matches!(actions.as_slice(), [(_, Action::Sample { tgid: 7, .. })]),
            "{actions:?}"
        );
        assert_eq!(g.processes[&7].share, MIN_SHARE);
    }

    #[test]
    fn a_thread_sharing_its_cpu_is_captured_again_when_its_load_falls() {
        let mut g = Governor::new(0.03, PERIOD, 0);
        let mut keep = 1.0;
        let mut fake = Fake::default();
        let mut actions = Vec::new();
        for step in 1..=200u64 {
            let now = step * 10 * MS;
            // Saturated for a second, sharing its CPU; then a third of the load, which it
            // serves on a CPU 15% of the time, waiting for it 5% (its neighbour still busy).
            let (rate, on_cpu, waiting) = if step <= 100 {
                (40_000, 0.5, 0.5)
            } else {
                (13_000, 0.15, 0.05)
            };
            let calls = captured_calls(rate, 10 * MS, keep);
            for _ in 0..calls {
                g.observe(7, 8);
            }
            fake.agent_cpu_ns += calls * 2000;
            advance(&mut fake, 10 * MS, on_cpu, waiting);
            for a in g.tick(now, &mut fake) {
                keep = kept(&a);
                actions.push((now, a));
            }
        }
        let [
            (shed_at, Action::Sample { .. }),
            (resumed_at, Action::Resume(7)),
        ] = actions.as_slice()
        else {
            panic!("{actions:?}");
        };
        assert!(
            *shed_at <= 5 * PERIOD && *resumed_at > 5 * PERIOD,
            "{actions:?}"
        );
        assert_eq!(g.stats().shedding, 0);
    }

    /// Drives one process's thread through `shares`, (on CPU, waiting) per period, at 40k
    /// calls/s; returns the actions.
    fn periods(shares: &[(f64, f64)]) -> Vec<Action> {
        let mut g = Governor::new(0.03, PERIOD, 0);
        let mut fake = Fake::default();
        let mut actions = Vec::new();
        for step in 1..=(shares.len() as u64 * 20) {
            let now = step * 10 * MS;
            let (on_cpu, waiting) = shares[((now - 1) / PERIOD) as usize];
            for _ in 0..400 {
                g.observe(7, 8);
            }
            fake.agent_cpu_ns += 400 * 2000;
            advance(&mut fake, 10 * MS, on_cpu, waiting);
            actions.extend(g.tick(now, &mut fake));
        }
        actions
    }

    #[test]
    fn a_moment_of_saturation_is_not_shed() {
        // A server catching up after a stall: runnable all of one period in three.
        let shares: Vec<_> = (0..15)
            .map(|i| if i % 3 == 1 { (0.95, 0.05) } else { (0.6, 0.1) })
            .collect();
        let actions = periods(&shares);
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_catch_up_after_a_stall_is_not_shed() {
        // nginx at a steady 20k requests/s runnable about 80% of the time, then runnable all
        // of four periods in a row while it serves what queued during a stall of the machine.
        let mut shares = vec![(0.68, 0.12); 8];
        shares.extend([(0.92, 0.06), (0.99, 0.0), (0.94, 0.03), (0.89, 0.12)]);
        shares.extend([(0.68, 0.12); 6]);
        let actions = periods(&shares);
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
        let mut keep = 1.0;
        let mut now = 0;
        let mut fake = Fake::default();
        let mut step = |g: &mut Governor, busy: f64, rate: u64, keep: &mut f64, now: &mut u64| {
            *now += 10 * MS;
            let calls = captured_calls(rate, 10 * MS, *keep);
            for _ in 0..calls {
                g.observe(7, 8);
            }
            fake.agent_cpu_ns += calls * 2000;
            advance(&mut fake, 10 * MS, busy, 0.0);
            let actions = g.tick(*now, &mut fake);
            for a in &actions {
                *keep = kept(a);
            }
            actions
        };
        for _ in 0..100 {
            step(&mut g, 0.97, 60_000, &mut keep, &mut now);
        }
        assert_eq!(g.stats().shedding, 1);
        // The load halves: 30k calls/s, the thread busy 45% while mostly shed.
        let mut resumed = Vec::new();
        for _ in 0..100 {
            resumed.extend(step(&mut g, 0.45, 30_000, &mut keep, &mut now));
        }
        assert_eq!(g.stats().shedding, 0);
        assert_eq!(keep, 1.0);
        assert_eq!(resumed, vec![Action::Resume(7)]);
    }

    #[test]
    fn shedding_ends_when_the_load_stops() {
        let (mut g, _) = run(0.03, 0.97, 60_000, 5);
        assert_eq!(g.stats().shedding, 1);
        // No calls at all from now on: captured again at the next period's end, for good.
        let mut last = Vec::new();
        for step in 1..=40 {
            let now = 5 * PERIOD + step * 10 * MS;
            last.extend(g.tick(now, &mut Fake::default()));
        }
        assert_eq!(g.stats().shedding, 0);
        assert!(!g.processes.get(&7).is_some_and(|p| p.share < 1.0));
        assert!(
            matches!(last.as_slice(), [Action::Resume(7)]),
            "one resume: {last:?}"
        );
    }

    #[test]
    fn a_gone_process_is_resumed_and_forgotten() {
        let (mut g, _) = run(0.03, 0.97, 60_000, 5);
        assert_eq!(g.stats().shedding, 1);
        let mut actions = Vec::new();
        g.forget(7, &mut actions);
        assert_eq!(g.stats().shedding, 0);
        assert_eq!(actions, vec![Action::Resume(7)]);
    }
}
