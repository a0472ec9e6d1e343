//! Twins: the throughput and p99 targets measured side by side, at the same instant.
//!
//! This machine class's speed drifts by tens of percent within seconds (untraced nginx under
//! the same load ran 36k, 47k and 41k requests/s in three 4 s runs back to back), and each of
//! its CPUs drifts on its own (two nginx servers each pinned on a CPU of their own, each under
//! its own load, served ratios from 0.84 to 1.07 of each other). Alternating runs, however
//! many, leave a few percent of doubt about a target a few percent wide. Two identical
//! servers pinned on the same CPU, under identical loads from the other CPU, share whatever
//! that CPU's speed does: the kernel splits its time evenly between them, and each serves as
//! many requests as its share of the CPU pays for. Neither traced, two nginx twins served
//! within 1.6% of each other in each of 14 rounds (Python's 50-thread servers within 9%); with
//! one traced, the ratio is what tracing costs a server whose CPU is its limit. The traced
//! twin alternates between rounds, so that any difference between the twins cancels.
//!
//! The untraced twin runs on a host where the tracer runs: its socket calls run the programs'
//! early return (what every untraced process pays). That share of its CPU, sampled by perf in
//! the same runs, converts the ratio to one against a host without the tracer: a server that
//! spends a share `s` of its CPU in the tracer's frames serves `1 - s` of what it would
//! without them.

use std::{fmt::Write as _, process::Command, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    Agent, BenchOptions, P99_TARGET, Profiler, Run, THROUGHPUT_TARGET, Target, WARMUP_SECS,
    have_perf, median, median_interval, parse_wrk, settled, summary_number, tree_pids,
    write_checks,
};

/// Connections of each twin's load (wrk -t1): half the saturation runs' 50, the twins
/// together taking as many.
const TWIN_CONNECTIONS: u32 = 25;

/// One round: the twins untraced, then one of them traced.
struct Round {
    /// No tracer: the twin traced next over the other.
    baseline: f64,
    traced: Run,
    untraced: Run,
    /// Samples of each twin's processes in a tracer frame, and all of them.
    traced_samples: Option<(u64, u64)>,
    untraced_samples: Option<(u64, u64)>,
    spans: u64,
    lost: u64,
    shed_s: f64,
    shed_calls: u64,
}

/// The twins' CPUs: both servers on the last CPU, their loads on the first.
fn cpus() -> anyhow::Result<(usize, usize)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n < 2 {
        bail!("the twins need two CPUs: one for the servers, one for their loads");
    }
    Ok((n - 1, 0))
}

/// Pins every thread of process `pid` and of its children to `cpu`.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    for p in tree_pids(pid) {
        let st = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &p.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .context("taskset (util-linux)")?;
        if !st.success() {
            bail!("taskset -a -p -c {cpu} {p} failed");
        }
    }
    Ok(())
}

/// Loads both twins at once for `seconds`, each from wrk pinned on `cpu`.
fn load_both(urls: [&str; 2], cpu: usize, seconds: u64) -> anyhow::Result<[Run; 2]> {
    finish_loads(start_loads(urls, cpu, seconds)?)
}

/// Starts the twins' loads (see `load_both`).
fn start_loads(
    urls: [&str; 2],
    cpu: usize,
    seconds: u64,
) -> anyhow::Result<[std::process::Child; 2]> {
    let spawn = |url: &str| {
        Command::new("taskset")
            .args(["-c", &cpu.to_string(), "wrk", "-t1"])
            .arg(format!("-c{TWIN_CONNECTIONS}"))
            .arg(format!("-d{seconds}s"))
            .args(["--latency", url])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("run wrk (apt-get install wrk)")
    };
    Ok([spawn(urls[0])?, spawn(urls[1])?])
}

/// Waits for the twins' loads; their results.
fn finish_loads(loads: [std::process::Child; 2]) -> anyhow::Result<[Run; 2]> {
    let [a, b] = loads;
    let parse = |child: std::process::Child| -> anyhow::Result<Run> {
        parse_wrk(&String::from_utf8_lossy(&child.wait_with_output()?.stdout))
    };
    Ok([parse(a)?, parse(b)?])
}

/// Measures a pair of twins that `start` makes; appends the section and its verdicts.
pub(super) fn twins(
    report: &mut String,
    all_pass: &mut bool,
    name: &str,
    start: fn() -> anyhow::Result<Target>,
    opts: &BenchOptions,
) -> anyhow::Result<()> {
    let (server_cpu, load_cpu) = cpus()?;
    let twins = [start()?, start()?];
    for twin in &twins {
        pin(twin.server.0.id(), server_cpu)?;
    }
    let urls = [twins[0].url.as_str(), twins[1].url.as_str()];
    // Warm up (page cache, Python's first imports).
    load_both(urls, load_cpu, 1)?;
    let rounds = opts.rounds + opts.pairs;
    let profile = have_perf();
    let mut results = Vec::new();
    for round in 0..rounds {
        let traced = (round % 2) as usize;
        let untraced = 1 - traced;
        let base = load_both(urls, load_cpu, opts.duration)?;
        let pids = tree_pids(twins[traced].server.0.id());
        let mut args: Vec<String> = vec!["run".into()];
        for pid in &pids {
            args.extend(["--pid".into(), pid.to_string()]);
        }
        args.extend(["--output", "json", "--stats-interval", "0"].map(String::from));
        let agent = Agent::start(&args)?;
        load_both(urls, load_cpu, WARMUP_SECS)?;
        let groups = [pids, tree_pids(twins[untraced].server.0.id())];
        // perf attaches once the load runs: a pause between the warm-up and the load would
        // bring the governor a period without calls, which ends shedding.
        let running = start_loads(urls, load_cpu, opts.duration)?;
        let profiler = if profile {
            let all: Vec<String> = groups.concat().iter().map(u32::to_string).collect();
            Some(Profiler::start("-p", &all.join(","), 4999)?)
        } else {
            None
        };
        let loads = finish_loads(running)?;
        let samples = match profiler {
            Some(p) => Some(p.stop_grouped(&groups)?),
            None => None,
        };
        std::thread::sleep(Duration::from_millis(300));
        let (_, summary) = agent.stop()?;
        let r = Round {
            baseline: base[traced].rps / base[untraced].rps,
            traced: loads[traced].clone(),
            untraced: loads[untraced].clone(),
            traced_samples: samples.as_ref().map(|s| s[0]),
            untraced_samples: samples.as_ref().map(|s| s[1]),
            spans: summary_number(&summary, "exported"),
            lost: summary_number(&summary, "lost"),
            shed_s: summary_number(&summary, "s"),
            shed_calls: summary_number(&summary, "socket"),
        };
        eprintln!(
            "bench: {name} twins round {}: untraced {:.3} of each other; twin {} traced {:.0} req/s, p99 {:.3} ms, the other {:.0} req/s, p99 {:.3} ms: {:.3}",
            round + 1,
            r.baseline,
            traced + 1,
            r.traced.rps,
            r.traced.p99_ms,
            r.untraced.rps,
            r.untraced.p99_ms,
            r.traced.rps / r.untraced.rps
        );
        results.push(r);
    }
    drop(twins);
    write_report(report, all_pass, name, &results, opts, profile)
}

fn share(samples: Option<(u64, u64)>) -> Option<f64> {
    samples.map(|(tracer, all)| tracer as f64 / all.max(1) as f64)
}

/// `min, median, max` (and the middle half) of `v`, formatted with `digits`.
fn spread(v: &[f64], digits: usize) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return "-".into();
    }
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    format!(
        "{:.digits$} | {:.digits$} to {:.digits$} | {:.digits$} to {:.digits$}",
        median(s.clone()),
        at(0.25),
        at(0.75),
        s[0],
        s[s.len() - 1]
    )
}

fn write_report(
    report: &mut String,
    all_pass: &mut bool,
    name: &str,
    rounds: &[Round],
    opts: &BenchOptions,
    profiled: bool,
) -> anyhow::Result<()> {
    let baseline: Vec<f64> = rounds.iter().map(|r| r.baseline).collect();
    let rps: Vec<f64> = rounds
        .iter()
        .map(|r| r.traced.rps / r.untraced.rps)
        .collect();
    let p99: Vec<f64> = rounds
        .iter()
        .map(|r| r.traced.p99_ms / r.untraced.p99_ms)
        .collect();
    let untraced_share: Vec<f64> = rounds
        .iter()
        .filter_map(|r| share(r.untraced_samples))
        .collect();
    let traced_share: Vec<f64> = rounds
        .iter()
        .filter_map(|r| share(r.traced_samples))
        .collect();
    // Against a host without the tracer: each round's ratio times what the untraced twin
    // would serve without the programs' early returns.
    let against_none: Vec<f64> = rounds
        .iter()
        .filter_map(|r| Some(r.traced.rps / r.untraced.rps * (1.0 - share(r.untraced_samples)?)))
        .collect();
    writeln!(
        report,
        "## {name}: twins, traced and untraced side by side on one CPU\n"
    )?;
    writeln!(
        report,
        "Two identical servers pinned on one CPU, each under its own wrk (-t1 -c{TWIN_CONNECTIONS}, {} s after {WARMUP_SECS} s of warm-up) pinned on another: the kernel splits the servers' CPU evenly between them, and each serves what its half pays for, so that the machine's drift, which moves alternating runs by tens of percent, moves both alike. {} rounds, each the twins untraced (the tracer not running), then one of them traced by `tracer run --pid` with the default budget (the other twin in the next round). Shares of CPU are of each twin's samples (`perf record -e cpu-clock -F 4999`, both twins in the same runs) in the tracer's programs or the kernel code that runs them; the untraced twin's is what the tracer costs a process it does not trace, and the ratio against a host without the tracer is the traced twin's throughput over the untraced one's times one less that share.\n",
        opts.duration,
        rounds.len()
    )?;
    writeln!(report, "| over the rounds | median | middle half | range |")?;
    writeln!(report, "|---|---|---|---|")?;
    writeln!(
        report,
        "| no tracer: throughput, twin to be traced / the other | {} |",
        spread(&baseline, 3)
    )?;
    writeln!(
        report,
        "| throughput, traced twin / untraced twin | {} |",
        spread(&rps, 3)
    )?;
    writeln!(
        report,
        "| p99, traced twin / untraced twin | {} |",
        spread(&p99, 2)
    )?;
    if profiled {
        let pct = |v: &[f64]| v.iter().map(|x| x * 100.0).collect::<Vec<_>>();
        writeln!(
            report,
            "| untraced twin's CPU in tracer frames, % | {} |",
            spread(&pct(&untraced_share), 2)
        )?;
        writeln!(
            report,
            "| traced twin's CPU in tracer frames, % | {} |",
            spread(&pct(&traced_share), 2)
        )?;
        writeln!(
            report,
            "| throughput, traced twin / untraced without the tracer | {} |",
            spread(&against_none, 3)
        )?;
    }
    let n = rounds.len().max(1) as f64;
    let spans: u64 = rounds.iter().map(|r| r.spans).sum();
    let lost: u64 = rounds.iter().map(|r| r.lost).sum();
    let shed_calls: u64 = rounds.iter().map(|r| r.shed_calls).sum();
    let shed_share =
        rounds.iter().map(|r| r.shed_s).sum::<f64>() / (n * (opts.duration + WARMUP_SECS) as f64);
    writeln!(
        report,
        "\nThe traced twin was shed {:.0}% of the time ({shed_calls} socket calls not captured, {spans} spans, {lost} lost events). {}\n",
        shed_share.min(1.0) * 100.0,
        match median_interval(&baseline) {
            Some((low, high, c)) => format!(
                "Untraced, the twins' ratio's median lies in {low:.3} to {high:.3} ({:.0}% interval): the precision of this measurement.",
                c * 100.0
            ),
            None => String::new(),
        }
    )?;
    // Judged against a host without the tracer where perf could sample the twins, else
    // against the untraced twin (which the tracer's early returns make slower: a ratio in
    // the traced side's favour).
    let (judged, against) = if profiled && !against_none.is_empty() {
        (&against_none, "against a host without the tracer")
    } else {
        (
            &rps,
            "against the untraced twin, no perf to sample the tracer's cost to it",
        )
    };
    let rps_median = median(judged.clone());
    let p99_median = median(p99.clone());
    write_checks(
        report,
        all_pass,
        vec![
            (
                "throughput >= 97% of untraced (twins)",
                Some(rps_median >= THROUGHPUT_TARGET),
                format!(
                    "{:.1}% (median of {} rounds, {against}{})",
                    rps_median * 100.0,
                    judged.len(),
                    settled(judged, THROUGHPUT_TARGET)
                ),
            ),
            (
                "p99 latency <= 1.05x untraced (twins)",
                Some(p99_median <= P99_TARGET),
                format!(
                    "{p99_median:.2}x (median of {} rounds, against the untraced twin{})",
                    p99.len(),
                    settled(&p99, P99_TARGET)
                ),
            ),
        ],
    )?;
    writeln!(report)?;
    Ok(())
}
