//! The agent: wires the stages together and runs until a signal (or, for `attach`, until the
//! traced process exits). Capture never waits on export: spans go through a bounded queue.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use log::{debug, info, warn};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracer_common::stat;

use crate::{
    cli::{AttachOptions, CapturePriority, CommonOptions, InjectMode, OutputFormat, RunOptions},
    conn::{ConnTracker, Finished, TrackerConfig},
    events::{Event, decode},
    export::{Exporter, Output, USER_AGENT, ZipkinConfig, parse_zipkin_url},
    governor::{Action, Governor, HostReadings},
    metrics::Red,
    probes::{InjectOptions, ProbeOptions, Probes},
    protocols::Exchange,
    spans::{Clock, span_of},
};

/// What to trace, resolved from the command line.
struct Plan {
    /// `--metrics`: bound at plan time so that a taken port fails the start.
    metrics: Option<std::net::TcpListener>,
    probe: ProbeOptions,
    tracker: TrackerConfig,
    output: Output,
    /// `attach`: stop when this process is gone.
    attached_pid: Option<u32>,
    stats_interval: Option<Duration>,
    /// `--capture-priority idle`: the capture thread yields the CPU (see `yielding`).
    yield_cpu: bool,
    /// `--overhead-budget`, as a share (see `governor`).
    overhead_budget: f64,
    /// `--probe-stats`.
    probe_stats: bool,
}

pub fn run(opts: RunOptions) -> anyhow::Result<()> {
    for pid in &opts.pids {
        check_pid(*pid)?;
    }
    let filter = !opts.pids.is_empty() || !opts.comms.is_empty();
    let mut plan = plan(
        &opts.common,
        opts.pids,
        opts.comms,
        filter,
        opts.ports,
        None,
    )?;
    if let Some(netns) = &opts.netns {
        plan.probe.netns_inum = netns_inode(netns)?;
    }
    execute(plan)
}

/// The inode number of a network namespace given as an `ip netns` name or a path.
fn netns_inode(netns: &str) -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let path = if netns.contains('/') {
        netns.to_string()
    } else {
        format!("/var/run/netns/{netns}")
    };
    let meta = std::fs::metadata(&path)
        .map_err(|e| anyhow::anyhow!("--netns {netns}: cannot open {path}: {e}"))?;
    u32::try_from(meta.ino())
        .map_err(|_| anyhow::anyhow!("--netns {netns}: inode number out of range"))
}

/// `tracer collect`: the span relay (see `relay`).
pub fn collect(opts: crate::cli::CollectOptions) -> anyhow::Result<()> {
    crate::relay::run(crate::relay::RelayOptions {
        listen: opts.listen,
        zipkin: ZipkinConfig {
            url: parse_zipkin_url(&opts.zipkin)?,
            batch_size: opts.batch_size as usize,
            flush_interval: Duration::from_millis(200),
            queue_capacity: opts.queue_size as usize,
            gzip: !opts.no_gzip,
            request_timeout: Duration::from_secs(10),
        },
        hold: Duration::from_millis(opts.hold_ms),
    })
}

pub fn attach(opts: AttachOptions) -> anyhow::Result<()> {
    check_pid(opts.pid)?;
    let plan = plan(
        &opts.common,
        vec![opts.pid],
        Vec::new(),
        true,
        opts.ports,
        Some(opts.pid),
    )?;
    execute(plan)
}

fn check_pid(pid: u32) -> anyhow::Result<()> {
    if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process with pid {pid}");
    }
    if pid == std::process::id() {
        bail!("tracer cannot trace itself (pid {pid})");
    }
    Ok(())
}

fn plan(
    common: &CommonOptions,
    pids: Vec<u32>,
    comms: Vec<String>,
    filter_pids: bool,
    ports: Vec<u16>,
    attached_pid: Option<u32>,
) -> anyhow::Result<Plan> {
    for comm in &comms {
        if comm.is_empty() || comm.len() > 15 {
            bail!("--comm {comm:?}: a command name is 1 to 15 bytes (as in /proc/PID/comm)");
        }
    }
    let output = match &common.zipkin {
        Some(url) => Output::Zipkin(ZipkinConfig {
            url: parse_zipkin_url(url)?,
            batch_size: common.batch_size as usize,
            flush_interval: Duration::from_millis(common.flush_interval_ms),
            queue_capacity: common.queue_size as usize,
            gzip: !common.no_gzip,
            request_timeout: Duration::from_secs(10),
        }),
        None => match common.output {
            OutputFormat::Text => Output::Text,
            OutputFormat::Json => Output::Json,
        },
    };
    Ok(Plan {
        probe: ProbeOptions {
            pids,
            comms,
            filter_pids,
            follow_forks: !common.no_follow_forks,
            capture_bytes: common.capture_bytes,
            ring_bytes: common.ring_buffer_mib * 1024 * 1024,
            inject: InjectOptions {
                mode: match common.inject {
                    InjectMode::Off => tracer_common::INJECT_OFF,
                    InjectMode::Traceparent => tracer_common::INJECT_TRACEPARENT,
                    InjectMode::B3 => tracer_common::INJECT_B3,
                },
                ports: common.inject_ports.clone(),
                nets: common.inject_nets.clone(),
            },
            netns_inum: 0,
            tls: !common.no_tls,
        },
        tracker: TrackerConfig {
            ports,
            service_name: common.service_name.clone(),
            ..TrackerConfig::default()
        },
        output,
        attached_pid,
        metrics: common.metrics.map(crate::metrics::bind).transpose()?,
        stats_interval: (common.stats_interval > 0)
            .then(|| Duration::from_secs(common.stats_interval)),
        yield_cpu: common.capture_priority == CapturePriority::Idle,
        overhead_budget: common.overhead_budget / 100.0,
        probe_stats: common.probe_stats,
    })
}

fn execute(plan: Plan) -> anyhow::Result<()> {
    // Capture runs on a runtime of its own thread: its drain timer, the ring's wakeups and the
    // signals are all handled by the thread that drains. On a multi-threaded runtime a worker
    // fired each drain timer and woke the capture thread, two context switches a drain and
    // about 15% of the agent's CPU under load. Export (HTTP, gzip, stdout) has its own thread.
    let capture = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Taken before the seconds of loading and attaching, and held back until the run starts:
    // a stop asked for meanwhile ends the run as soon as it starts. Without a handler, SIGINT
    // did what the parent left it to do, which for a background job of a script is nothing:
    // it was lost, and the tracer ran on. Delivered during loading, it would make the kernel's
    // verifier give up on the program under way (EINTR), and aya load it again with the
    // verifier's log on, for minutes.
    let stop_signals = {
        let _runtime = capture.enter();
        StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        }
    };
    hold_stop_signals(true);
    let mut probes = Probes::load(&plan.probe)?;
    // Reading the kernel's BTF and loading the programs took tens of MiB of heap that is all
    // free now; glibc keeps it unless asked.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let injected = plan
        .probe
        .pids
        .iter()
        .map(|pid| probes.inject_existing(*pid, &plan.probe.inject))
        .sum::<usize>();
    if injected > 0 {
        info!("{injected} connections opened before the tracer will carry trace context too");
    }
    let seeded = plan
        .probe
        .pids
        .iter()
        .map(|pid| probes.seed_blocked_reads(*pid))
        .sum::<usize>();
    if seeded > 0 {
        debug!("{seeded} threads were blocked in a socket read at attach");
    }
    match plan.attached_pid {
        Some(pid) => info!("attached to pid {pid}"),
        None if plan.probe.filter_pids => info!(
            "tracing pids {:?} and commands {:?}",
            plan.probe.pids, plan.probe.comms
        ),
        None if plan.probe.netns_inum != 0 => {
            info!(
                "tracing processes in network namespace {}",
                plan.probe.netns_inum
            )
        }
        None => info!("tracing every process on this host"),
    }
    let export = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("tracer-export")
        .build()
        .context("cannot start the async runtime")?;
    capture.block_on(event_loop(plan, probes, export.handle(), stop_signals))
}

/// Holds SIGINT and SIGTERM back from this thread (and the threads it starts) while `hold`, and
/// lets them, and any that came meanwhile, through when not.
fn hold_stop_signals(hold: bool) {
    // SAFETY: a signal set of our own, filled by sigemptyset/sigaddset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let how = if hold {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// The signals that stop a run.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

async fn event_loop(
    plan: Plan,
    mut probes: Probes,
    export: &tokio::runtime::Handle,
    stop_signals: StopSignals,
) -> anyhow::Result<()> {
    // Held open for the run: the kernel counts programs' runs and time while it is.
    let run_stats = plan
        .probe_stats
        .then(|| match crate::probes::enable_run_stats() {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("--probe-stats: cannot turn on the kernel's BPF run-time statistics ({e})");
                None
            }
        })
        .flatten();
    // RED metrics cost a series lookup per span: kept only when someone can read them.
    let mut red = plan.metrics.is_some().then(Red::default);
    let metrics_text = Arc::new(RwLock::new(String::new()));
    if let Some(listener) = plan.metrics {
        let listener = tokio::net::TcpListener::from_std(listener).context("metrics listener")?;
        info!("metrics on http://{}/metrics", listener.local_addr()?);
        crate::metrics::serve(listener, metrics_text.clone());
    }
    let mut exporter = {
        let _export_runtime = export.enter();
        Exporter::start(plan.output)
    };
    let ring = probes.take_events()?;
    // This is the capture thread (the runtime's only one).
    let yielding = plan
        .yield_cpu
        .then(|| crate::yielding::Yielding::start(&ring))
        .flatten();
    let capture_raises = yielding.as_ref().map(|y| y.raises.clone());
    // SAFETY: the RingBuf owns its map fd, which stays open and the same until it is dropped,
    // and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
    let StopSignals {
        interrupt: mut sigint,
        terminate: mut sigterm,
    } = stop_signals;
    hold_stop_signals(false);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_delay = DRAIN_BUSY;
    let drain_sleep = tokio::time::sleep(drain_delay);
    tokio::pin!(drain_sleep);

    let mut clock = Clock::now_calibrated();
    let mut tracker = ConnTracker::new(plan.tracker);
    let mut governor = Governor::new(plan.overhead_budget, SHED_PERIOD_NS, monotonic_ns());
    let mut finished: Vec<Finished> = Vec::new();
    let mut decode_errors = 0u64;
    let mut lost_reported = 0u64;
    let mut missed_reported = 0u64;
    let mut last_missed_check = std::time::Instant::now();
    let mut last_stats = std::time::Instant::now();
    let mut last_calibration = std::time::Instant::now();

    if let Some(yielding) = &yielding {
        yielding.draining();
    }
    let reason = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll failed")?;
                drain_ring(guard.get_inner_mut(), &mut tracker, &mut governor, &mut finished, &mut decode_errors,
                    |f| submit(&mut exporter, f, &clock, &mut red));
                guard.clear_ready();
                submit(&mut exporter, &mut finished, &clock, &mut red);
                // Under a flood the wakeups may come faster than the timer below, which each
                // one pushes back: the kernel's tables are brought up to date here too.
                update_kernel_tables(&mut probes, &mut tracker, &mut governor);
                drain_delay = DRAIN_BUSY;
                drain_sleep.as_mut().reset(tokio::time::Instant::now() + drain_delay);
            }
            // The probes wake the agent only when data piles up (see WAKEUP_BYTES in
            // tracer-ebpf): the rest is picked up here, within milliseconds while events flow.
            // An idle agent backs off rather than wake a CPU a hundred times a second: on a
            // virtual machine each wakeup preempts a busy task or brings an idle CPU back from
            // the hypervisor (a process doing only that cost an untraced nginx about 5% in an
            // A/B here, within this machine's noise).
            _ = &mut drain_sleep => {
                let drained = drain_ring(
                    ring.get_mut(),
                    &mut tracker,
                    &mut governor,
                    &mut finished,
                    &mut decode_errors,
                    |f| submit(&mut exporter, f, &clock, &mut red),
                );
                submit(&mut exporter, &mut finished, &clock, &mut red);
                update_kernel_tables(&mut probes, &mut tracker, &mut governor);
                drain_delay = next_drain_delay(drain_delay, drained);
                drain_sleep.as_mut().reset(tokio::time::Instant::now() + drain_delay);
            }
            _ = sigint.recv() => break "interrupted",
            _ = sigterm.recv() => break "terminated",
            _ = tick.tick() => {
                if let Some(red) = &red
                    && let Ok(mut text) = metrics_text.write()
                {
                    let raises = capture_raises.as_ref().map_or(0, |r| r.load(std::sync::atomic::Ordering::Relaxed));
                    *text = render_metrics(&probes, &tracker, &governor, &exporter, decode_errors, raises, red);
                    render_probe_runs(&mut text, &probes.probe_runs(), run_stats.is_some());
                }
                tracker.sweep(monotonic_ns());
                probes.refresh_verdicts();
                for pid in tracker.take_new_processes() {
                    probes.tls_scan(pid);
                }
                if last_calibration.elapsed() >= Duration::from_secs(60) {
                    clock.recalibrate();
                    last_calibration = std::time::Instant::now();
                }
                let lost = probes.kernel_stats()[stat::RINGBUF_LOST as usize];
                if lost > lost_reported {
                    warn!("lost {} events: the ring buffer was full (raise --ring-buffer-mib)", lost - lost_reported);
                    lost_reported = lost;
                }
                // Runs a probe missed are events not seen, as surely as a full ring's.
                if last_missed_check.elapsed() >= MISSED_CHECK {
                    last_missed_check = std::time::Instant::now();
                    let missed = probes.missed_runs();
                    if missed > missed_reported {
                        warn!("{} probe runs missed (a probe was already running on the CPU): their events were not seen", missed - missed_reported);
                        missed_reported = missed;
                    }
                }
                if let Some(interval) = plan.stats_interval && last_stats.elapsed() >= interval {
                    eprintln!("{}", stats_line(&probes, &tracker, &governor, &exporter.stats(), decode_errors));
                    last_stats = std::time::Instant::now();
                }
                if let Some(pid) = plan.attached_pid && !Path::new(&format!("/proc/{pid}")).exists() {
                    break "the traced process exited";
                }
            }
        }
    };
    // Whatever is still in the ring belongs to requests that already happened.
    drain_ring(
        ring.get_mut(),
        &mut tracker,
        &mut governor,
        &mut finished,
        &mut decode_errors,
        |f| submit(&mut exporter, f, &clock, &mut red),
    );
    submit(&mut exporter, &mut finished, &clock, &mut red);
    info!("stopping: {reason}; flushing spans");
    // The counts are read after the flush: spans sent while flushing count as exported.
    let export_stats = exporter.stats();
    exporter.shutdown(Duration::from_secs(5)).await;
    drop(yielding);
    let summary = stats_line(&probes, &tracker, &governor, &export_stats, decode_errors);
    eprintln!("tracer: {reason}. {summary}");
    if run_stats.is_some() {
        eprintln!("tracer: probes: {}", probe_runs_line(&probes.probe_runs()));
    }
    Ok(())
}

/// Each program that ran: its runs and the time a run took, the most costly first.
fn probe_runs_line(runs: &[crate::probes::ProbeRuns]) -> String {
    let mut ran: Vec<&crate::probes::ProbeRuns> = runs.iter().filter(|p| p.runs > 0).collect();
    if ran.is_empty() {
        return "none ran".to_string();
    }
    ran.sort_by_key(|p| std::cmp::Reverse(p.run_ns));
    ran.iter()
        .map(|p| format!("{} {} runs, {} ns a run", p.name, p.runs, p.run_ns / p.runs))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether an exchange becomes a span: sampled (an upstream caller may have said no), and not
/// the agent's own export (tracing the collector's host would otherwise add a span per batch,
/// forever).
pub fn is_exported(exchange: &Exchange, identity: &crate::conn::link::Identity) -> bool {
    identity.sampled
        && match exchange {
            Exchange::Http(e) => e.header("user-agent") != Some(USER_AGENT),
            Exchange::Db(_) => true,
        }
}

/// Builds and queues the spans of finished exchanges that are exported (`is_exported`).
fn submit(
    exporter: &mut Exporter,
    finished: &mut Vec<Finished>,
    clock: &Clock,
    red: &mut Option<Red>,
) {
    for (exchange, conn, identity) in finished.drain(..) {
        if is_exported(&exchange, &identity) {
            let span = span_of(&exchange, &conn, &identity, clock);
            if let Some(red) = red {
                red.observe(&span);
            }
            exporter.submit(&span);
        }
    }
    exporter.flush();
}

/// How often the probes' missed runs are looked at (a file read per program).
const MISSED_CHECK: Duration = Duration::from_secs(10);

/// How often the ring is drained while events flow fast.
const DRAIN_BUSY: Duration = Duration::from_millis(10);
/// Records a drain should find while events flow: when fewer came, the delay grows in
/// proportion, up to `DRAIN_TRICKLE`. The few events a second of a process sampled at a few
/// percent are not worth waking a CPU a hundred times a second: each wakeup preempts the
/// traced program or its clients, or brings an idle CPU back from the hypervisor.
const DRAIN_BATCH: u32 = 256;
const DRAIN_TRICKLE: Duration = Duration::from_millis(80);
/// ... and at the longest when none came: the delay doubles with each empty drain.
const DRAIN_IDLE: Duration = Duration::from_millis(320);

fn next_drain_delay(current: Duration, drained: usize) -> Duration {
    if drained == 0 {
        return (current * 2).min(DRAIN_IDLE);
    }
    let drained = u32::try_from(drained).unwrap_or(u32::MAX);
    (current.min(DRAIN_TRICKLE) * DRAIN_BATCH / drained).clamp(DRAIN_BUSY, DRAIN_TRICKLE)
}

/// Records handled between two hand-overs of what they finished: a drain that finds a backlog
/// (megabytes, when the capture thread yields the CPU and a load starts) never holds the spans
/// of all of it at once.
const DRAIN_CHUNK: usize = 4096;

/// Handles every record in the ring, giving `hand_over` what finished every `DRAIN_CHUNK`
/// records (the caller takes the rest); returns how many records there were.
fn drain_ring(
    ring: &mut RingBuf<MapData>,
    tracker: &mut ConnTracker,
    governor: &mut Governor,
    out: &mut Vec<Finished>,
    errors: &mut u64,
    mut hand_over: impl FnMut(&mut Vec<Finished>),
) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        n += 1;
        if n % DRAIN_CHUNK == 0 {
            hand_over(out);
        }
        match decode(&item) {
            Ok(event) => {
                if let Event::Data { .. } = event {
                    let hdr = event.header();
                    governor.observe(hdr.tgid, hdr.tid);
                }
                tracker.handle(&event, out)
            }
            Err(e) => {
                *errors += 1;
                if *errors == 1 || errors.is_power_of_two() {
                    warn!("undecodable event ({e}); {errors} so far");
                }
            }
        }
    }
    n
}

/// How often the governor decides what share of a process to capture (see `governor`).
const SHED_PERIOD_NS: u64 = 200_000_000;

/// Tells the kernel what the events just parsed taught: processes that exited or exec'd (their
/// socket entries go), client connections that need no context injection, and which processes'
/// capture is shed now.
fn update_kernel_tables(probes: &mut Probes, tracker: &mut ConnTracker, governor: &mut Governor) {
    let gone = tracker.take_gone_processes();
    let mut actions = Vec::new();
    for (tgid, _) in &gone {
        governor.forget(*tgid, &mut actions);
    }
    actions.extend(governor.tick(monotonic_ns(), &mut HostReadings));
    for action in actions {
        match action {
            // What the process's connections wait for may now go unseen: one closed while
            // shed must not report its request as unanswered.
            Action::Sample { tgid, keep } => {
                tracker.set_shed(tgid, true);
                probes.set_shed(tgid, Some(keep));
            }
            Action::Resume(tgid) => {
                tracker.set_shed(tgid, false);
                probes.set_shed(tgid, None);
            }
        }
    }
    if !gone.is_empty() {
        let n = probes.forget_processes(&gone);
        debug!(
            "{} processes exited or exec'd: {n} kernel socket entries dropped",
            gone.len()
        );
    }
    probes.stop_injecting(&tracker.take_clients_to_release());
}

fn stats_line(
    probes: &Probes,
    tracker: &ConnTracker,
    governor: &Governor,
    e: &crate::export::ExportStats,
    decode_errors: u64,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let k = probes.kernel_stats();
    let t = tracker.stats();
    let l = tracker.link_stats();
    let injection = if probes.injecting() {
        format!(
            "; injection: {} headers, {} connections watched, {} released (no HTTP/1.x, or own context), {} left alone (blocking sockets)",
            k[stat::INJECTED as usize],
            k[stat::INJECT_SOCKETS as usize],
            probes.inject_released(),
            k[stat::INJECT_BLOCKING as usize],
        )
    } else {
        String::new()
    };
    let shedding = if governor.enabled() {
        let g = governor.stats();
        format!(
            "; shedding (CPU-bound, over the overhead budget): {} socket calls not captured, {:.1} s shed, {} requests cut by a gap",
            k[stat::SHED_IO as usize],
            g.shed_ns as f64 / 1e9,
            t.gap_requests,
        )
    } else {
        String::new()
    };
    let missed = probes.missed_runs();
    let missed = if missed > 0 {
        format!("; probe runs missed (the probe was already running on the CPU): {missed}")
    } else {
        String::new()
    };
    let holes = if t.holes > 0 {
        format!(
            "; bytes unseen (lost events): {} holes in connections, {} requests dropped there",
            t.holes, t.hole_requests
        )
    } else {
        String::new()
    };
    format!(
        "events: {} data, {} lost, {} undecodable; connections: {} open, {} evicted, {} not parsed (no known protocol), {} began with a TLS handshake, {} decrypted (OpenSSL); requests: {}; links: {} linked, {} left unlinked (uncertain), {} joined incoming context; spans: {} exported, {} dropped (queue full), {} failed{holes}{injection}{shedding}{missed}",
        k[stat::DATA_EVENTS as usize],
        k[stat::RINGBUF_LOST as usize],
        decode_errors,
        tracker.open_connections(),
        t.conns_evicted,
        t.not_parsed,
        t.tls_handshakes,
        t.tls_conns,
        t.exchanges,
        l.linked,
        l.unlinked_ambiguous,
        l.joined_incoming,
        e.exported.load(Relaxed),
        e.dropped.load(Relaxed),
        e.failed.load(Relaxed),
    )
}

/// The Prometheus exposition of the agent's counters and the RED metrics of what it traces.
fn render_metrics(
    probes: &Probes,
    tracker: &ConnTracker,
    governor: &Governor,
    exporter: &Exporter,
    decode_errors: u64,
    capture_raises: u64,
    red: &Red,
) -> String {
    use crate::metrics::metric;
    use std::sync::atomic::Ordering::Relaxed;
    let k = probes.kernel_stats();
    let t = tracker.stats();
    let l = tracker.link_stats();
    let e = exporter.stats();
    let mut out = String::new();
    let kernel = |i: u32| k[i as usize];
    metric(
        &mut out,
        "tracer_events_total",
        "counter",
        "Data events from the kernel.",
        kernel(stat::DATA_EVENTS),
    );
    metric(
        &mut out,
        "tracer_events_lost_total",
        "counter",
        "Events the ring buffer had no room for.",
        kernel(stat::RINGBUF_LOST),
    );
    metric(
        &mut out,
        "tracer_events_undecodable_total",
        "counter",
        "Events that failed to decode.",
        decode_errors,
    );
    metric(
        &mut out,
        "tracer_shed_calls_total",
        "counter",
        "Socket calls of traced processes not captured while their capture was shed (a CPU-bound thread over the overhead budget).",
        kernel(stat::SHED_IO),
    );
    metric(
        &mut out,
        "tracer_shed_seconds_total",
        "counter",
        "Time traced processes spent with their capture shed, summed over processes.",
        governor.stats().shed_ns / 1_000_000_000,
    );
    metric(
        &mut out,
        "tracer_shedding_processes",
        "gauge",
        "Traced processes captured in part now (a share of their requests, sampled by turns).",
        governor.stats().shedding as u64,
    );
    metric(
        &mut out,
        "tracer_gap_requests_total",
        "counter",
        "Requests dropped unfinished because their connection's capture had a gap (shedding).",
        t.gap_requests,
    );
    metric(
        &mut out,
        "tracer_connection_holes_total",
        "counter",
        "Places where a connection's bytes went unseen (events lost to a full ring buffer) and what it waited for was dropped.",
        t.holes,
    );
    metric(
        &mut out,
        "tracer_hole_requests_total",
        "counter",
        "Requests dropped unfinished where their connection's bytes went unseen.",
        t.hole_requests,
    );
    metric(
        &mut out,
        "tracer_capture_raised_total",
        "counter",
        "Times the capture thread, yielding the CPU to other programs, fell behind and competed normally until it caught up.",
        capture_raises,
    );
    metric(
        &mut out,
        "tracer_probe_read_errors_total",
        "counter",
        "Kernel reads the probes could not make.",
        kernel(stat::READ_ERRORS),
    );
    metric(
        &mut out,
        "tracer_probe_payload_faults_total",
        "counter",
        "Payload copies from user memory that faulted.",
        kernel(stat::PAYLOAD_FAULTS),
    );
    metric(
        &mut out,
        "tracer_probe_saved_args_full_total",
        "counter",
        "Syscalls of traced threads missed because the per-thread saved-arguments map was full.",
        kernel(stat::SAVED_ARGS_FULL),
    );
    metric(
        &mut out,
        "tracer_tls_calls_total",
        "counter",
        "OpenSSL reads and writes whose plaintext was captured.",
        kernel(stat::TLS_CALLS),
    );
    metric(
        &mut out,
        "tracer_tls_no_socket_total",
        "counter",
        "OpenSSL calls dropped because their socket could not be told (memory BIOs).",
        kernel(stat::TLS_NO_SOCKET),
    );
    metric(
        &mut out,
        "tracer_tls_libraries",
        "gauge",
        "OpenSSL files (libraries, executables) the TLS probes are attached to.",
        probes.tls_files() as u64,
    );
    metric(
        &mut out,
        "tracer_connections_tls_total",
        "counter",
        "Connections found to carry TLS (parsed from the OpenSSL probes' plaintext).",
        tracker.stats().tls_conns,
    );
    metric(
        &mut out,
        "tracer_connections_tls_handshakes_total",
        "counter",
        "Connections that began with a TLS handshake: those not also in tracer_connections_tls_total use a TLS library the probes do not know.",
        tracker.stats().tls_handshakes,
    );
    metric(
        &mut out,
        "tracer_inject_headers_total",
        "counter",
        "Requests given a trace context header in the kernel.",
        kernel(stat::INJECTED),
    );
    metric(
        &mut out,
        "tracer_inject_skipped_total",
        "counter",
        "Requests left without a header (already had one, or head not whole).",
        kernel(stat::INJECT_SKIPPED),
    );
    metric(
        &mut out,
        "tracer_inject_sockets_total",
        "counter",
        "Client connections of traced processes watched for requests to add a header to.",
        kernel(stat::INJECT_SOCKETS),
    );
    metric(
        &mut out,
        "tracer_inject_blocking_total",
        "counter",
        "Client connections left without headers because their socket is in blocking mode (a socket map would change how their reads wait).",
        kernel(stat::INJECT_BLOCKING),
    );
    metric(
        &mut out,
        "tracer_inject_sockets_released_total",
        "counter",
        "Of those, connections no longer watched: they carry another protocol than HTTP/1.x, or requests with their own trace context.",
        probes.inject_released(),
    );
    metric(
        &mut out,
        "tracer_inject_errors_total",
        "counter",
        "Failures to grow or write a message.",
        kernel(stat::INJECT_ERRORS),
    );
    metric(
        &mut out,
        "tracer_connections_open",
        "gauge",
        "Connections tracked.",
        tracker.open_connections() as u64,
    );
    metric(
        &mut out,
        "tracer_connections_evicted_total",
        "counter",
        "Connections forgotten for space or idleness.",
        t.conns_evicted,
    );
    metric(
        &mut out,
        "tracer_connections_unparsed_total",
        "counter",
        "Connections whose bytes matched no protocol parser, or stopped matching one (binary protocols, garbage, upgrades): left alone from there.",
        t.not_parsed,
    );
    metric(
        &mut out,
        "tracer_requests_total",
        "counter",
        "Request/response exchanges parsed.",
        t.exchanges,
    );
    metric(
        &mut out,
        "tracer_links_linked_total",
        "counter",
        "Client spans given their server span as parent.",
        l.linked,
    );
    metric(
        &mut out,
        "tracer_links_unlinked_total",
        "counter",
        "Client spans left as roots because the link was uncertain.",
        l.unlinked_ambiguous,
    );
    metric(
        &mut out,
        "tracer_links_incoming_total",
        "counter",
        "Server spans that joined an incoming trace context.",
        l.joined_incoming,
    );
    metric(
        &mut out,
        "tracer_spans_exported_total",
        "counter",
        "Spans the destination accepted.",
        e.exported.load(Relaxed),
    );
    metric(
        &mut out,
        "tracer_spans_dropped_total",
        "counter",
        "Spans dropped because the export queue was full.",
        e.dropped.load(Relaxed),
    );
    metric(
        &mut out,
        "tracer_spans_failed_total",
        "counter",
        "Spans the collector rejected or that were unsent at exit.",
        e.failed.load(Relaxed),
    );
    metric(
        &mut out,
        "tracer_export_retries_total",
        "counter",
        "Export attempts retried.",
        e.retries.load(Relaxed),
    );
    metric(
        &mut out,
        "tracer_export_queue_depth",
        "gauge",
        "Spans waiting to be exported.",
        exporter.queue_depth() as u64,
    );
    red.render(&mut out);
    out
}

/// Per-program metrics: runs missed always (the kernel counts them regardless), runs and their
/// time when the kernel counts them (`--probe-stats`).
fn render_probe_runs(out: &mut String, runs: &[crate::probes::ProbeRuns], run_stats: bool) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP tracer_probe_missed_runs_total Runs of a probe the kernel skipped because it was already running on that CPU: events not seen.\n# TYPE tracer_probe_missed_runs_total counter"
    );
    for p in runs {
        let _ = writeln!(
            out,
            "tracer_probe_missed_runs_total{{probe=\"{}\"}} {}",
            p.name, p.recursion_misses
        );
    }
    if !run_stats {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP tracer_probe_runs_total Runs of each probe (--probe-stats).\n# TYPE tracer_probe_runs_total counter"
    );
    for p in runs {
        let _ = writeln!(
            out,
            "tracer_probe_runs_total{{probe=\"{}\"}} {}",
            p.name, p.runs
        );
    }
    let _ = writeln!(
        out,
        "# HELP tracer_probe_run_seconds_total Time spent in each probe, as the kernel counts it (--probe-stats).\n# TYPE tracer_probe_run_seconds_total counter"
    );
    for p in runs {
        let _ = writeln!(
            out,
            "tracer_probe_run_seconds_total{{probe=\"{}\"}} {}",
            p.name,
            p.run_ns as f64 / 1e9
        );
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    crate::spans::clock_ns(libc::CLOCK_MONOTONIC) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_summary_lists_those_that_ran_the_most_costly_first() {
        let run = |name: &str, runs, run_ns| crate::probes::ProbeRuns {
            name: name.into(),
            runs,
            run_ns,
            recursion_misses: 0,
        };
        assert_eq!(
            probe_runs_line(&[
                run("tracer_sock_send", 1000, 300_000),
                run("tracer_ssl_read", 0, 0),
                run("tracer_sock_recv", 2000, 900_000),
            ]),
            "tracer_sock_recv 2000 runs, 450 ns a run; tracer_sock_send 1000 runs, 300 ns a run"
        );
        assert_eq!(probe_runs_line(&[run("tracer_ssl_read", 0, 0)]), "none ran");
    }

    #[test]
    fn the_agents_own_export_and_unsampled_requests_are_not_spans() {
        use crate::protocols::{HttpExchange, Outcome, RequestText, Side};
        let request = |user_agent: &str| {
            Exchange::Http(HttpExchange {
                side: Side::Client,
                method: "POST".into(),
                request: RequestText::new(
                    "/api/v2/spans",
                    &[("host", "127.0.0.1:9411"), ("user-agent", user_agent)],
                ),
                minor_version: 1,
                status: Some(202),
                req_start_ns: 1,
                req_offset: 0,
                req_end_ns: 2,
                resp_start_ns: Some(3),
                end_ns: 4,
                req_bytes: 100,
                resp_bytes: 50,
                outcome: Outcome::Complete,
            })
        };
        let identity = |sampled| crate::conn::link::Identity {
            trace_id: 1,
            span_id: 2,
            parent_id: None,
            sampled,
        };
        assert!(!is_exported(&request(USER_AGENT), &identity(true)));
        assert!(is_exported(&request("curl/7.88.1"), &identity(true)));
        assert!(!is_exported(&request("curl/7.88.1"), &identity(false)));
    }

    #[test]
    fn an_idle_ring_is_drained_less_and_less_often_until_events_flow_again() {
        let mut delay = DRAIN_BUSY;
        let mut seen = Vec::new();
        for _ in 0..8 {
            delay = next_drain_delay(delay, 0);
            seen.push(delay.as_millis());
        }
        assert_eq!(seen, [20, 40, 80, 160, 320, 320, 320, 320]);
        // Events again: drained within the trickle delay, then as often as they fill a batch.
        assert_eq!(next_drain_delay(delay, 1), DRAIN_TRICKLE);
        assert_eq!(next_drain_delay(DRAIN_BUSY, 10_000), DRAIN_BUSY);
    }

    #[test]
    fn a_trickle_of_events_is_drained_in_batches() {
        // 5,000 events a second: the delay settles where a drain finds a batch.
        let mut delay = DRAIN_BUSY;
        for _ in 0..10 {
            let drained = (5_000 * delay.as_millis() / 1000) as usize;
            delay = next_drain_delay(delay, drained);
        }
        assert!((50..=52).contains(&delay.as_millis()), "{delay:?}");
    }
}
