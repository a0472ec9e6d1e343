//! `cargo xtask bench`: the cost of tracing, measured side by side.
//!
//! Real servers (nginx serving a small file, Python's keep-alive http.server) under a real load
//! generator (wrk, bounded in time and connections), on loopback, in rounds that alternate:
//! untraced, traced by `tracer run` filtered to the server (spans printed to /dev/null), and
//! traced with export to a Zipkin test collector. Then the in-kernel cost per traced syscall,
//! from a tight loop of writes on a TCP socket: not traced, traced, and "another process is
//! traced" (what untraced processes pay). The report compares each traced run with the
//! untraced runs of the same round and says pass or fail against the targets; it is written to
//! `bench/results.md` (and printed).

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{root, status};

mod twins;

pub struct BenchOptions {
    pub duration: u64,
    pub rounds: u32,
    pub pairs: u32,
    pub connections: u32,
    pub syscalls: u64,
    /// Which of `SERVERS` are measured under load.
    pub servers: [bool; SERVERS.len()],
}

/// The servers measured under load, in the order of the report: alternating runs of each
/// configuration, then the twins (`twins`), on which the throughput and p99 targets are judged.
pub const SERVERS: [&str; 5] = [
    "nginx",
    "nginx-per-cpu",
    "python",
    "nginx-twins",
    "python-twins",
];

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: signals our own, unreaped child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn tracer_bin() -> std::path::PathBuf {
    root().join("target/release/tracer")
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Untraced,
    /// The tracer runs, the server is not traced: the cost every process on the host pays.
    Idle,
    /// The same on the syscall-tracepoint path, which kernels before 6.3 get.
    IdleSyscalls,
    /// Traced with the default overhead budget: shed in part while the server is CPU-bound.
    Traced,
    /// Traced with the budget off: every request captured, whatever it costs.
    TracedFull,
    TracedSyscalls,
    Exported,
    /// The same paced load untraced: whether the server keeps up with it at all in the
    /// machine's state of the moment (its latency and late requests beside the traced run's).
    UntracedPaced,
    /// Traced (default budget) under a paced load of `PACED_RATE`, below saturation: every
    /// request must be a span.
    TracedPaced,
    /// The same with the budget off: what the tracer itself keeps up with at that rate (no
    /// event lost, every request a span), whatever the governor would judge.
    TracedFullPaced,
    /// Traced (default budget) with `--capture-priority normal`: the agent's capture thread
    /// competes for CPU with the server and its clients (the default yields), at saturation
    /// and paced.
    TracedCompeting,
    TracedCompetingPaced,
}

/// The offered load of `Mode::TracedPaced`, requests per second: the rate up to which the
/// project's target wants every request a span.
const PACED_RATE: u32 = 20_000;
/// Its connections, each with one request at a time: 50 (wrk's) could carry 20k req/s only
/// while every response came within 2.5 ms, and a stall of the machine made the generator
/// fall behind and send in bursts.
const PACED_CONNECTIONS: u32 = 200;

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Idle => "tracer idle",
            Mode::IdleSyscalls => "tracer idle (syscall tracepoints)",
            Mode::Traced => "traced",
            Mode::TracedFull => "traced, every request (--overhead-budget 0)",
            Mode::TracedSyscalls => "traced (syscall tracepoints)",
            Mode::Exported => "traced+export",
            Mode::UntracedPaced => "untraced, paced 20k req/s",
            Mode::TracedPaced => "traced, paced 20k req/s",
            Mode::TracedFullPaced => "traced, every request (--overhead-budget 0), paced 20k req/s",
            Mode::TracedCompeting => "traced, --capture-priority normal",
            Mode::TracedCompetingPaced => "traced, --capture-priority normal, paced 20k req/s",
        }
    }

    fn paced(self) -> bool {
        matches!(
            self,
            Mode::UntracedPaced
                | Mode::TracedPaced
                | Mode::TracedFullPaced
                | Mode::TracedCompetingPaced
        )
    }
}

#[derive(Default, Clone)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Requests wrk gave up on (socket errors, timeouts): the server may still answer them.
    wrk_errors: u64,
    agent_cpu_s: f64,
    agent_rss_kib: u64,
    events: u64,
    lost: u64,
    spans: u64,
    dropped: u64,
    failed: u64,
    /// Socket calls the kernel did not capture while the agent shed the server's capture,
    /// and the time it was shed.
    shed_calls: u64,
    shed_s: f64,
    /// Paced load, default budget, when it shed: the governor's readings of the period it
    /// first shed in and of the two before (its debug lines), for the report to say why.
    first_shed: Option<String>,
    /// Paced load only: requests sent more than 1 ms late.
    late: u64,
    /// Requests the server itself counted (its access log, or its own counter): what spans
    /// are checked against, since wrk does not count requests it had in flight at the end.
    served: u64,
    /// CPU seconds the server's processes used during the load: where the probes run.
    server_cpu_s: f64,
    /// CPU seconds the test's Zipkin collector used to take in this run's spans (export only).
    collector_cpu_s: f64,
    /// `measure(.., profile)`: samples of the server's threads during the load that were in a
    /// tracer frame, and all of them.
    server_samples: Option<(u64, u64)>,
    /// CPU seconds the hypervisor took from this machine's CPUs during the load.
    steal_s: f64,
    /// CPU seconds this machine's CPUs were idle during the load: the closed loop of wrk and
    /// the server was waiting, not computing.
    idle_s: f64,
    /// Inter-processor interrupts (function call and rescheduling) during the load: mostly
    /// wakeups of a thread that sleeps on the other CPU, which on a virtual machine cost the
    /// waker microseconds with interrupts off.
    ipis: u64,
}

/// CPU seconds of process `pid` and its children (nginx's master and workers).
fn tree_cpu_seconds(pid: u32) -> f64 {
    tree_pids(pid).into_iter().map(proc_cpu_seconds).sum()
}

/// Process `pid` and its children.
fn tree_pids(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // The parent pid is the second field after the command.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// Machine-wide counters since boot: CPU seconds stolen by the hypervisor and idle, all CPUs,
/// and inter-processor interrupts.
#[derive(Clone, Copy)]
struct MachineCounters {
    steal_s: f64,
    idle_s: f64,
    ipis: u64,
}

impl MachineCounters {
    fn now() -> MachineCounters {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // "cpu  user nice system idle iowait irq softirq steal ...", in clock ticks.
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        let tick = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // "CAL:  n0  n1 ...  Function call interrupts", one count per CPU.
        let interrupts = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
        let ipis = interrupts
            .lines()
            .filter_map(|l| {
                let l = l.trim_start();
                l.strip_prefix("CAL:").or_else(|| l.strip_prefix("RES:"))
            })
            .flat_map(|counts| {
                counts
                    .split_whitespace()
                    .map_while(|v| v.parse::<u64>().ok())
            })
            .sum();
        MachineCounters {
            steal_s: tick(7) / hz,
            idle_s: (tick(3) + tick(4)) / hz,
            ipis,
        }
    }
}

/// `wrk` against `target` (or, with `paced`, that many requests per second), with the
/// server's CPU time and what the machine did meanwhile.
/// Seconds of load before each measured run, the same load: a server at saturation is measured
/// in its steady state, after the agent's governor has found it CPU-bound (within a second;
/// the README gives what that second costs).
const WARMUP_SECS: u64 = 2;

fn warm_up(target: &Target, opts: &BenchOptions, paced: Option<u32>) -> anyhow::Result<()> {
    let opts = BenchOptions {
        duration: WARMUP_SECS,
        ..*opts
    };
    load(target, &opts, paced).map(drop)
}

fn load(target: &Target, opts: &BenchOptions, paced: Option<u32>) -> anyhow::Result<Run> {
    let pid = target.server.0.id();
    let (cpu0, machine0) = (tree_cpu_seconds(pid), MachineCounters::now());
    let mut run = match paced {
        Some(rate) => paced_load(&target.url, rate, opts)?,
        None => wrk(&target.url, opts)?,
    };
    run.server_cpu_s = tree_cpu_seconds(pid) - cpu0;
    let machine = MachineCounters::now();
    run.steal_s = machine.steal_s - machine0.steal_s;
    run.idle_s = machine.idle_s - machine0.idle_s;
    run.ipis = machine.ipis - machine0.ipis;
    Ok(run)
}

/// A traced run's agent, started before the load and stopped after it.
struct Agent {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Agent {
    fn start(args: &[String]) -> anyhow::Result<Agent> {
        Self::start_with_env(args, &[])
    }

    fn start_with_env(args: &[String], env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        let mut child = Command::new(tracer_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start the tracer (cargo xtask build first)")?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = stderr.lock().unwrap().clone();
            if err.contains("tracing ") {
                return Ok(Agent { child, stderr });
            }
            if let Some(st) = child.try_wait()? {
                bail!("tracer exited ({st}): {err}");
            }
            if Instant::now() > deadline {
                bail!("tracer did not start: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.child.id())
    }

    /// Stops the agent; returns its RSS high-water mark (KiB) and its exit summary.
    fn stop(mut self) -> anyhow::Result<(u64, String)> {
        let rss = proc_status_kib(self.child.id(), "VmHWM:");
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        if !st.success() {
            bail!("tracer failed: {}", self.stderr.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
        let summary = self
            .stderr
            .lock()
            .unwrap()
            .lines()
            .rfind(|l| l.starts_with("tracer: "))
            .unwrap_or("")
            .to_string();
        Ok((rss, summary))
    }
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the command.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Waits (at most 10 s) until process `pid` has used no CPU for 300 ms.
fn wait_until_idle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = proc_cpu_seconds(pid);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = proc_cpu_seconds(pid);
        if now == last {
            return;
        }
        last = now;
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The number before `word` in the agent's summary line ("events: 123 data, 0 lost, ...",
/// "3.2 s shed"); 0 when absent.
fn summary_number<T: std::str::FromStr + Default>(summary: &str, word: &str) -> T {
    let words: Vec<&str> = summary
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == word)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_default()
}

fn parse_latency_ms(v: &str) -> f64 {
    let (num, unit) = v.trim().split_at(
        v.trim()
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(v.len()),
    );
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// `rate` requests per second on `PACED_CONNECTIONS` kept-alive connections for
/// `opts.duration` seconds (open loop: what wrk cannot do).
fn paced_load(url: &str, rate: u32, opts: &BenchOptions) -> anyhow::Result<Run> {
    let rest = url
        .strip_prefix("http://")
        .context("paced load: an http:// URL")?;
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let result = crate::paced::run(&crate::paced::PacedLoad {
        addr: addr.parse().context("paced load: an IP:port address")?,
        path: if path.is_empty() { "/" } else { path }.to_string(),
        rate,
        connections: PACED_CONNECTIONS,
        duration: Duration::from_secs(opts.duration),
    })?;
    Ok(Run {
        rps: result.ok as f64 / result.elapsed.as_secs_f64().max(1e-9),
        p50_ms: result.p50_us / 1000.0,
        p99_ms: result.p99_us / 1000.0,
        requests: result.sent,
        wrk_errors: result.errors,
        late: result.late,
        ..Run::default()
    })
}

fn wrk(url: &str, opts: &BenchOptions) -> anyhow::Result<Run> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{}", opts.connections),
            &format!("-d{}s", opts.duration),
            "--latency",
            url,
        ])
        .output()
        .context("run wrk (apt-get install wrk)")?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// What `wrk --latency` printed: requests/s, p50, p99, socket errors and requests.
fn parse_wrk(text: &str) -> anyhow::Result<Run> {
    let mut run = Run::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50_ms = parse_latency_ms(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_ms = parse_latency_ms(v);
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 12"
            run.wrk_errors = errors
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if line.contains("requests in") {
            run.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    if run.requests == 0 {
        bail!("wrk printed no results:\n{text}");
    }
    Ok(run)
}

struct Target {
    name: &'static str,
    /// Whether its paced runs are held to the "every request a span at 20k req/s" target:
    /// only where that rate is below the server's saturation (see `start_nginx_per_cpu`).
    paced_judged: bool,
    url: String,
    comm: &'static str,
    served: ServedCounter,
    server: Guard,
    _dir: Option<std::path::PathBuf>,
}

/// How a target counts the requests it answered.
enum ServedCounter {
    /// nginx's access log, one line per request.
    AccessLog(std::path::PathBuf),
    /// The test server's `/count` (which it does not count).
    CountUrl(String),
}

impl ServedCounter {
    fn read(&self) -> anyhow::Result<u64> {
        match self {
            ServedCounter::AccessLog(path) => Ok(std::fs::read(path)
                .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
                .unwrap_or(0)),
            ServedCounter::CountUrl(url) => {
                let out = Command::new("curl").args(["-s", url]).output()?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .with_context(|| format!("GET {url}"))
            }
        }
    }
}

/// nginx with one worker: the saturation runs' server, where the throughput target is
/// measured against a single core's worth of serving. At 20k req/s that worker runs 70-80% of
/// its core on this machine, near what the governor judges CPU-bound: its paced runs are
/// reported, not judged.
fn start_nginx() -> anyhow::Result<Target> {
    start_nginx_with("nginx (static file)", "1", false)
}

/// nginx as packaged (`worker_processes auto`: a worker per CPU), for the paced runs: 20k
/// req/s below saturation, where every request must be a span.
fn start_nginx_per_cpu() -> anyhow::Result<Target> {
    start_nginx_with("nginx (static file), a worker per CPU, paced", "auto", true)
}

fn start_nginx_with(
    name: &'static str,
    workers: &str,
    paced_judged: bool,
) -> anyhow::Result<Target> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!(
        "tracer-bench-nginx-{workers}-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index.html"), "<html>cats</html>\n".repeat(8))?;
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes {workers};\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ log_format count '.'; access_log {d}/access.log count buffer=64k flush=100ms; keepalive_requests 1000000;\n  server {{ listen 127.0.0.1:{port}; root {d}; }} }}\n"
        ),
    )?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .spawn()
        .context("start nginx (apt-get install nginx)")?;
    let guard = Guard(child);
    wait_port(port)?;
    Ok(Target {
        name,
        paced_judged,
        url: format!("http://127.0.0.1:{port}/index.html"),
        comm: "nginx",
        served: ServedCounter::AccessLog(dir.join("access.log")),
        server: guard,
        _dir: Some(dir),
    })
}

fn start_python() -> anyhow::Result<Target> {
    let port = free_port()?;
    let child = Command::new("python3")
        .arg(root().join("tests/servers/http_server.py"))
        .args(["--port", &port.to_string()])
        .spawn()
        .context("start python3")?;
    let guard = Guard(child);
    wait_port(port)?;
    Ok(Target {
        name: "python http.server (keep-alive)",
        paced_judged: false,
        url: format!("http://127.0.0.1:{port}/hello"),
        comm: "python3",
        served: ServedCounter::CountUrl(format!("http://127.0.0.1:{port}/count")),
        server: guard,
        _dir: None,
    })
}

/// The test's Zipkin collector (Python), which the export runs send their spans to.
struct Collector {
    process: Guard,
    url: String,
}

impl Collector {
    fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

fn start_collector() -> anyhow::Result<Collector> {
    let port = free_port()?;
    let child = Command::new("python3")
        .arg(root().join("tests/collector/zipkin_collector.py"))
        .args(["--port", &port.to_string()])
        .stderr(Stdio::null())
        .spawn()?;
    let process = Guard(child);
    wait_port(port)?;
    Ok(Collector {
        process,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// One run of `target` under load in `mode`; with `profile`, the server's threads sampled by
/// perf during the load.
fn measure(
    target: &Target,
    mode: Mode,
    collector: &Collector,
    opts: &BenchOptions,
    profile: bool,
) -> anyhow::Result<Run> {
    let comm = if matches!(mode, Mode::Idle | Mode::IdleSyscalls) {
        "no-such-program"
    } else {
        target.comm
    };
    let mut args: Vec<String> = vec![
        "run".into(),
        "--comm".into(),
        comm.into(),
        "--stats-interval".into(),
        "0".into(),
    ];
    let served0 = target.served.read()?;
    if matches!(mode, Mode::Untraced | Mode::UntracedPaced) {
        let paced = (mode == Mode::UntracedPaced).then_some(PACED_RATE);
        warm_up(target, opts, paced)?;
        let mut run = load(target, opts, paced)?;
        std::thread::sleep(Duration::from_millis(300));
        run.served = target.served.read()? - served0;
        return Ok(run);
    }
    if mode == Mode::Exported {
        args.extend(["--zipkin".into(), collector.url.clone()]);
    } else {
        args.extend(["--output".into(), "json".into()]);
    }
    // Spans of every request at 20k req/s, or a collector's batches: more than the default
    // queue takes in a second of stdout's or the collector's pace.
    if mode.paced() || mode == Mode::Exported {
        args.extend(["--queue-size".into(), "100000".into()]);
    }
    if matches!(mode, Mode::TracedFull | Mode::TracedFullPaced) {
        args.extend(["--overhead-budget".into(), "0".into()]);
    }
    if matches!(mode, Mode::TracedCompeting | Mode::TracedCompetingPaced) {
        args.extend(["--capture-priority".into(), "normal".into()]);
    }
    let env: &[(&str, &str)] = match mode {
        Mode::IdleSyscalls | Mode::TracedSyscalls => &[("TRACER_SYSCALL_TRACEPOINTS", "tp_btf")],
        // Below saturation nothing should be shed: where something is, the report says what
        // the governor saw.
        Mode::TracedPaced => &[("RUST_LOG", "info,tracer_user::governor=debug")],
        _ => &[],
    };
    let agent = Agent::start_with_env(&args, env)?;
    let paced = mode.paced().then_some(PACED_RATE);
    // The collector's CPU per span counts the warm-up's spans and its CPU alike.
    let collector_cpu0 = proc_cpu_seconds(collector.pid());
    warm_up(target, opts, paced)?;
    let cpu0 = agent.cpu_seconds();
    let mut run = if profile {
        // perf attaches once the load runs (its first half second unsampled): a pause
        // between the warm-up and the load would bring the governor a period without calls,
        // which ends shedding, and the run would begin with full capture.
        let pids: Vec<String> = tree_pids(target.server.0.id())
            .iter()
            .map(u32::to_string)
            .collect();
        std::thread::scope(|scope| -> anyhow::Result<Run> {
            let running = scope.spawn(|| load(target, opts, paced));
            std::thread::sleep(Duration::from_millis(100));
            let profiler = Profiler::start("-p", &pids.join(","), 4999)?;
            let mut run = running
                .join()
                .map_err(|_| anyhow::anyhow!("the load's thread panicked"))??;
            run.server_samples = Some(profiler.stop(None)?);
            Ok(run)
        })?
    } else {
        load(target, opts, paced)?
    };
    // Let the server answer what wrk left in flight (Python's p99 is over a second) and the
    // last spans reach the exporter, before the CPU reading and the agent's stop: a request
    // answered after the stop would be served without a span.
    std::thread::sleep(Duration::from_millis(500));
    wait_until_idle(target.server.0.id());
    run.agent_cpu_s = agent.cpu_seconds() - cpu0;
    let log = agent.stderr.clone();
    let (rss, summary) = agent.stop()?;
    // The agent flushed its last spans as it stopped; the collector has taken them in once
    // it is idle.
    if mode == Mode::Exported {
        wait_until_idle(collector.pid());
        run.collector_cpu_s = proc_cpu_seconds(collector.pid()) - collector_cpu0;
    }
    // Read after the agent stopped: asking the Python server is a request of its own.
    run.served = target.served.read()? - served0;
    run.agent_rss_kib = rss;
    run.events = summary_number(&summary, "data");
    run.lost = summary_number(&summary, "lost");
    run.spans = summary_number(&summary, "exported");
    run.dropped = summary_number(&summary, "dropped");
    run.failed = summary_number(&summary, "failed");
    run.shed_calls = summary_number(&summary, "socket");
    run.shed_s = summary_number(&summary, "s");
    if mode == Mode::TracedPaced && run.shed_calls > 0 {
        run.first_shed = first_shed(&log.lock().unwrap());
    }
    Ok(run)
}

/// The governor's debug lines (`pid N: hottest thread ... capture share A -> B`) of the first
/// period whose share fell below 1, and of the two periods of that process before it.
fn first_shed(log: &str) -> Option<String> {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hottest thread"))
        .collect();
    let at = lines.iter().position(|l| !l.ends_with("-> 1.000"))?;
    let pid = |l: &str| {
        l.split(": hottest")
            .next()
            .and_then(|h| h.rsplit("] ").next())
            .map(str::to_string)
    };
    let this = pid(lines[at]);
    let mut picked: Vec<&str> = lines[..at]
        .iter()
        .rev()
        .filter(|l| pid(l) == this)
        .take(2)
        .copied()
        .collect();
    picked.reverse();
    picked.push(lines[at]);
    Some(
        picked
            .iter()
            .map(|l| l.rsplit("] ").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join(" / "),
    )
}

/// A traced run accounts for every request the server answered: spans exported plus those
/// dropped or failed (counted by the agent) equal the server's own count exactly; at up to
/// 20k req/s nothing may be lost or shed at all, beyond any loss must be counted (lost events,
/// or socket calls not captured while shedding).
fn accounted(r: &Run) -> bool {
    if r.rps <= f64::from(PACED_RATE) {
        every_request_a_span(r)
    } else {
        r.spans + r.dropped + r.failed == r.served || r.lost > 0 || r.shed_calls > 0
    }
}

/// Every request the server answered is a span exported, nothing lost, dropped or shed.
fn every_request_a_span(r: &Run) -> bool {
    r.spans == r.served && r.lost == 0 && r.dropped == 0 && r.failed == 0 && r.shed_calls == 0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The least traced/untraced throughput and the most traced/untraced p99 at saturation.
const THROUGHPUT_TARGET: f64 = 0.97;
const P99_TARGET: f64 = 1.05;

/// An interval that holds the median of what `v` samples with at least 90% confidence, from
/// its order statistics (the sign test's interval: no assumption on the distribution), and
/// that confidence; `None` for fewer than 5 samples, too few for 90%.
fn median_interval(v: &[f64]) -> Option<(f64, f64, f64)> {
    let n = v.len();
    // P(Binomial(n, 1/2) <= j), for j = 0..n.
    let mut below = Vec::with_capacity(n + 1);
    let (mut term, mut sum) = (0.5f64.powi(n as i32), 0.0);
    for j in 0..=n {
        sum += term;
        below.push(sum);
        term = term * (n - j) as f64 / (j + 1) as f64;
    }
    // The kth smallest and kth largest hold the median with probability 1 - 2 P(B <= k - 1):
    // the largest k for which that is still 90%.
    let k = (1..=n / 2)
        .take_while(|&k| 1.0 - 2.0 * below[k - 1] >= 0.90)
        .last()?;
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((sorted[k - 1], sorted[n - k], 1.0 - 2.0 * below[k - 1]))
}

/// What the median's interval says of a target the median is judged against.
fn settled(v: &[f64], target: f64) -> String {
    match median_interval(v) {
        Some((low, high, confidence)) => format!(
            "; the median's {:.0}% interval {low:.3} to {high:.3} {}",
            confidence * 100.0,
            if low <= target && target <= high {
                "holds the target: this run does not settle it"
            } else {
                "is clear of the target"
            }
        ),
        None => String::new(),
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What the sink answers to each request head of `xtask syscall-loop --http`.
const LOOP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Writes of the write loop timed together.
const WRITE_BATCH: u64 = 256;

/// `xtask syscall-loop N [--http]`: prints "ready PID", then at each "go" on stdin runs one
/// phase and prints its calling thread's CPU nanoseconds and wall nanoseconds per call: N
/// 64-byte writes on a loopback TCP connection, then N 64-byte writes to /dev/null. Between
/// the phases the thread only waits on stdin, so a profile of the first phase is of its calls
/// alone.
///
/// The socket is corked (`TCP_CORK`) and a thread of its own reads the other end: a write
/// queues its bytes, and only one in about a thousand, the one that fills a 64 KiB segment,
/// sends them. A send that also delivers its bytes on loopback costs 4-6 µs here, and how
/// much of that falls on the writer swung by a third between runs: whether the reader was
/// asleep (a wakeup, perhaps an IPI), whether the congestion window let the write go out at
/// once. Corked, a write is the syscall, the socket layer and the copy into the send queue,
/// where the probes run, every time. The figures are the median batch's of `WRITE_BATCH`
/// writes, which leaves out a batch that a tick or a preemption fell on.
///
/// With `--http` each of the N is a whole HTTP/1.1 request whose response a sink thread on the
/// same CPU answers and this thread reads before the next (a client on a kept-alive
/// connection), timed as a whole; the times are per request.
pub fn syscall_loop(n: u64, http: bool) -> anyhow::Result<()> {
    if http {
        // Client and sink on one CPU: across two, each request and response is a wakeup of a
        // thread asleep on the other vCPU, whose interrupt costs this machine 30-100 µs of
        // noise per round trip, dwarfing the probes.
        // SAFETY: plain libc calls on a zeroed cpu_set_t of our own.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut s = TcpStream::connect(addr)?;
    let (mut peer, _) = listener.accept()?;
    std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        let mut head = Vec::new();
        loop {
            let n = peer.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            if !http {
                continue;
            }
            head.extend_from_slice(&buf[..n]);
            while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head.drain(..end + 4);
                peer.write_all(LOOP_RESPONSE)?;
            }
        }
    });
    if !http {
        cork(&s)?;
    }
    println!("ready {}", std::process::id());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let (cpu, wall) = if http {
        let t = Instant::now();
        let cpu = thread_cpu();
        http_requests(&mut s, n)?;
        let per = |d: Duration| d.as_nanos() as f64 / n as f64;
        (per(thread_cpu() - cpu), per(t.elapsed()))
    } else {
        let (mut cpu, mut wall) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < n {
            let k = WRITE_BATCH.min(n - done);
            let t = Instant::now();
            let c = thread_cpu();
            write_batch(&mut s, k)?;
            cpu.push((thread_cpu() - c).as_nanos() as f64 / k as f64);
            wall.push(t.elapsed().as_nanos() as f64 / k as f64);
            done += k;
        }
        (median(cpu), median(wall))
    };
    println!("{cpu:.1} {wall:.1}");
    line.clear();
    std::io::stdin().read_line(&mut line)?;
    // The same writes to a file that is not a socket: what any other syscall pays.
    let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let t = Instant::now();
    let null_cpu = thread_cpu();
    for _ in 0..n {
        null.write_all(&[0x5a; 64])?;
    }
    let null_cpu = (thread_cpu() - null_cpu).as_nanos() as f64 / n as f64;
    let null_wall = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{null_cpu:.1} {null_wall:.1}");
    Ok(())
}

/// `n` requests of the HTTP loop on `s`, each followed by reading its response.
fn http_requests(s: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let request = b"GET /loop HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: syscallloop\r\n\r\n";
    let mut response = [0u8; LOOP_RESPONSE.len()];
    for _ in 0..n {
        s.write_all(request)?;
        s.read_exact(&mut response)?;
    }
    Ok(())
}

/// `k` 64-byte writes on `s`.
fn write_batch(s: &mut TcpStream, k: u64) -> std::io::Result<()> {
    for _ in 0..k {
        s.write_all(&[0x5a; 64])?;
    }
    Ok(())
}

/// Sets `TCP_CORK` on `s`: its writes are sent a full segment at a time.
fn cork(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: an int option on a socket of ours.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum LoopMode {
    NoTracer,
    OtherTraced,
    Traced,
    /// HTTP requests and their responses, untraced.
    NoTracerHttp,
    /// The same traced: the kernel adds a trace context header to each request.
    TracedHttp,
}

/// Run time so far of each of the tracer's BPF programs, by program id, as the kernel's
/// run-time statistics have it (counted only while they are enabled).
fn tracer_program_run_ns() -> anyhow::Result<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs() {
        // A program unloaded while the list is read (an agent that just stopped): ENOENT.
        let Ok(info) = info else {
            continue;
        };
        if info.name_as_str().is_some_and(|n| n.starts_with("tracer_")) {
            out.push((info.id(), u64::try_from(info.run_time().as_nanos())?));
        }
    }
    Ok(out)
}

/// Nanoseconds of BPF program time per loop iteration: one more run of the loop of `mode`
/// with the kernel's run-time statistics on (their own clock reads are in the figure), over
/// all the tracer's programs, so for a write both the writer's and the sink's.
fn loop_probe_ns(mode: LoopMode, n: u64, other_pid: u32) -> anyhow::Result<f64> {
    let probe_ns = loop_run(mode, n, other_pid, LoopWatch::ProgramStats)?
        .program_ns
        .context("the loop ran without statistics")?;
    Ok(probe_ns as f64 / n as f64)
}

/// CPU and wall nanoseconds per write of one syscall loop: to a socket, then to /dev/null.
fn loop_cost(mode: LoopMode, n: u64, other_pid: u32) -> anyhow::Result<[f64; 4]> {
    Ok(loop_run(mode, n, other_pid, LoopWatch::Clocks)?.times)
}

/// The share of the loop thread's CPU time in its socket calls that went to the tracer's
/// programs and the kernel code that runs them, from one more run of the loop of `mode`
/// sampled by `perf`; `None` without perf.
fn loop_tracer_share(mode: LoopMode, n: u64, other_pid: u32) -> anyhow::Result<Option<f64>> {
    if !have_perf() {
        return Ok(None);
    }
    let (tracer, all) = loop_run(mode, n, other_pid, LoopWatch::Profile)?
        .samples
        .context("the loop ran without a profile")?;
    if all < 1000 {
        bail!("the loop's profile has {all} samples of its socket calls: too few to tell");
    }
    Ok(Some(tracer as f64 / all as f64))
}

/// How a run of the syscall loop is watched besides its own clocks.
#[derive(Clone, Copy, PartialEq)]
enum LoopWatch {
    Clocks,
    /// The kernel's BPF run-time statistics, on for the run.
    ProgramStats,
    /// `perf record` of the loop's thread.
    Profile,
}

/// What one run of the syscall loop measured.
struct LoopResult {
    /// CPU and wall nanoseconds per write, then per write to /dev/null.
    times: [f64; 4],
    /// `LoopWatch::ProgramStats`: the tracer's programs' run time over the run.
    program_ns: Option<u64>,
    /// `LoopWatch::Profile`: samples of the loop's socket calls that were in the tracer's
    /// programs or their dispatch, and all samples of those calls.
    samples: Option<(u64, u64)>,
}

/// Functions that run only for the tracer: its programs (JIT images named
/// `bpf_prog_<tag>_<name>`) and the kernel code that dispatches a tracepoint to them.
fn is_tracer_frame(sym: &str) -> bool {
    (sym.starts_with("bpf_prog_") && sym.contains("_tracer_"))
        || sym.starts_with("bpf_trace_run")
        || sym.starts_with("__bpf_trace_")
        || sym.starts_with("call_trace_")
        || sym.starts_with("__traceiter_")
}

/// `perf record` of some threads' CPU time, sampled by a CPU clock (the VM has no hardware
/// counters), with call chains.
struct Profiler {
    perf: Child,
    path: std::path::PathBuf,
}

impl Profiler {
    /// Starts recording the threads that `perf record {which} {ids}` names (`-t TID`, `-p
    /// PID,PID`), `hz` samples a second.
    fn start(which: &str, ids: &str, hz: u32) -> anyhow::Result<Profiler> {
        let path = std::env::temp_dir().join(format!(
            "tracer-bench-{}-{}.perf",
            std::process::id(),
            ids.replace(',', "-")
        ));
        let perf = Command::new("perf")
            .args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-g",
                "-F",
                &hz.to_string(),
                which,
                ids,
            ])
            .arg("-o")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start perf record")?;
        // perf has no "ready" to wait for; it is attached well within this.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Profiler { perf, path })
    }

    /// Stops recording; returns the samples in a tracer frame and all samples, of thread
    /// `tid` only when given.
    fn stop(self, tid: Option<u32>) -> anyhow::Result<(u64, u64)> {
        Ok(count_samples(&self.script("tid")?, tid))
    }

    /// Stops recording; returns, for each group of processes, the samples of its processes in
    /// a tracer frame and all of them.
    fn stop_grouped(self, groups: &[Vec<u32>]) -> anyhow::Result<Vec<(u64, u64)>> {
        let script = self.script("pid")?;
        Ok(groups
            .iter()
            .map(|pids| {
                pids.iter().fold((0, 0), |(t, a), pid| {
                    let (tracer, all) = count_samples(&script, Some(*pid));
                    (t + tracer, a + all)
                })
            })
            .collect())
    }

    /// Stops recording; returns `perf script`'s samples, each headed by its `head` field (tid
    /// or pid).
    fn script(self, head: &str) -> anyhow::Result<String> {
        // SAFETY: signals our own, unreaped child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        let perf = self.perf.wait_with_output()?;
        // perf ends an interrupted record by raising SIGINT again.
        if !perf.status.success()
            && std::os::unix::process::ExitStatusExt::signal(&perf.status) != Some(libc::SIGINT)
        {
            bail!(
                "perf record failed ({}): {}",
                perf.status,
                String::from_utf8_lossy(&perf.stderr)
            );
        }
        let script = Command::new("perf")
            .args(["script", "-F", &format!("{head},ip,sym"), "-i"])
            .arg(&self.path)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let _ = std::fs::remove_file(&self.path);
        Ok(String::from_utf8_lossy(&script.stdout).into_owned())
    }
}

/// Whether `perf` can be run.
fn have_perf() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Counts, in `perf script -F tid,ip,sym` output (or `pid,ip,sym`), the samples (of thread
/// or process `tid` when given), and of those the ones in a tracer frame.
fn count_samples(script: &str, tid: Option<u32>) -> (u64, u64) {
    let (mut tracer, mut all) = (0, 0);
    for sample in script.split("\n\n") {
        let mut lines = sample.lines().skip_while(|l| l.trim().is_empty());
        let Some(head) = lines.next() else { continue };
        if tid.is_some() && head.trim().parse::<u32>().ok() != tid {
            continue;
        }
        all += 1;
        // A frame is "ADDRESS SYMBOL"; a symbol perf could not name is "[unknown]".
        if lines.any(|l| {
            l.trim()
                .split_once(' ')
                .is_some_and(|(_, sym)| is_tracer_frame(sym))
        }) {
            tracer += 1;
        }
    }
    (tracer, all)
}

/// The syscall loop in `mode`: its times per write, and what `watch` asks for.
fn loop_run(
    mode: LoopMode,
    n: u64,
    other_pid: u32,
    watch: LoopWatch,
) -> anyhow::Result<LoopResult> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["syscall-loop", &n.to_string()])
        .args(matches!(mode, LoopMode::NoTracerHttp | LoopMode::TracedHttp).then_some("--http"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)?;
    let pid = child.id();
    let agent = match mode {
        LoopMode::NoTracer | LoopMode::NoTracerHttp => None,
        LoopMode::OtherTraced => Some(Agent::start(&[
            "run".into(),
            "--pid".into(),
            other_pid.to_string(),
            "--output".into(),
            "json".into(),
        ])?),
        // The loop is CPU-bound by design: with the default budget its capture would be shed,
        // and the loop would measure a shed call.
        LoopMode::Traced | LoopMode::TracedHttp => Some(Agent::start(&[
            "run".into(),
            "--pid".into(),
            pid.to_string(),
            "--output".into(),
            "json".into(),
            "--overhead-budget".into(),
            "0".into(),
        ])?),
    };
    let stats = if watch == LoopWatch::ProgramStats {
        let enabled = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enable BPF run-time statistics")?;
        Some((enabled, tracer_program_run_ns()?))
    } else {
        None
    };
    let profiler = if watch == LoopWatch::Profile {
        // The loop's main thread (its tid is its pid).
        Some(Profiler::start("-t", &pid.to_string(), 9999)?)
    } else {
        None
    };
    child.stdin.as_mut().unwrap().write_all(b"go\n")?;
    line.clear();
    out.read_line(&mut line)?;
    let samples = match profiler {
        Some(profiler) => Some(profiler.stop(Some(pid))?),
        None => None,
    };
    let program_ns = match stats {
        Some((_enabled, before)) => {
            let after = tracer_program_run_ns()?;
            Some(
                after
                    .iter()
                    .map(|&(id, ns)| {
                        let was = before.iter().find(|b| b.0 == id).map_or(0, |b| b.1);
                        ns.saturating_sub(was)
                    })
                    .sum(),
            )
        }
        None => None,
    };
    child.stdin.as_mut().unwrap().write_all(b"go\n")?;
    out.read_line(&mut line)?;
    child.wait()?;
    if let Some(agent) = agent {
        agent.stop()?;
    }
    let fields: Vec<f64> = line
        .split_whitespace()
        .map(str::parse::<f64>)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("syscall loop result {line:?}: {e}"))?;
    match fields[..] {
        [a, b, c, d] => Ok(LoopResult {
            times: [a, b, c, d],
            program_ns,
            samples,
        }),
        _ => bail!("syscall loop result: {line:?}"),
    }
}

pub fn bench(opts: &BenchOptions) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the benchmark runs the tracer: run it as root");
    }
    status(crate::cargo().args(["build", "--release", "-p", "tracer-user", "-p", "xtask"]))?;
    let collector = start_collector()?;
    let mut report = String::new();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    writeln!(report, "# tracer benchmark\n")?;
    writeln!(
        report,
        "{cpus} CPUs ({machine}), Linux {}; wrk -t2 -c{} -d{}s, each run after {WARMUP_SECS} s of the same load (steady state: a saturated server is shed within a second of the load's start); {} rounds (every other one in reverse order) of untraced / tracer idle (running, server not traced) / traced / traced with the capture thread competing for CPU (`--capture-priority normal`; the default yields it) / traced+export, and for nginx the idle and traced runs again on the syscall-tracepoint path (`TRACER_SYSCALL_TRACEPOINTS=tp_btf`, what kernels before 6.3 get), and a paced load of 20k req/s untraced, traced (also with `--capture-priority normal`), and traced with the budget off; then {} more pairs of untraced and traced runs; medians of the runs. After the servers: the in-kernel cost of a syscall, the agent's memory with {OPEN_CONNECTIONS} connections open, and the agent's own work per request.\n",
        kernel.trim(),
        opts.connections,
        opts.duration,
        opts.rounds,
        opts.pairs
    )?;
    let mut all_pass = true;
    for (start, modes) in [
        (
            start_nginx as fn() -> anyhow::Result<Target>,
            // The syscall-tracepoint path too, on the server where its cost shows; and the
            // paced load on one worker near its saturation, reported.
            &[
                Mode::Untraced,
                Mode::Idle,
                Mode::IdleSyscalls,
                Mode::Traced,
                Mode::TracedCompeting,
                Mode::TracedFull,
                Mode::TracedSyscalls,
                Mode::Exported,
                Mode::UntracedPaced,
                Mode::TracedPaced,
            ][..],
        ),
        (
            // A paced load below saturation, where every request must be a span.
            start_nginx_per_cpu,
            &[
                Mode::UntracedPaced,
                Mode::TracedPaced,
                Mode::TracedCompetingPaced,
                Mode::TracedFullPaced,
            ][..],
        ),
        (
            start_python,
            &[
                Mode::Untraced,
                Mode::Idle,
                Mode::Traced,
                Mode::TracedCompeting,
                Mode::TracedFull,
                Mode::Exported,
            ][..],
        ),
    ]
    .into_iter()
    .zip(opts.servers)
    .filter_map(|(target, chosen)| chosen.then_some(target))
    {
        let target = start()?;
        // Warm up (page cache, Python's first imports).
        let _ = wrk(
            &target.url,
            &BenchOptions {
                duration: 1,
                ..*opts
            },
        );
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); modes.len()];
        for round in 0..opts.rounds {
            // Every other round runs the modes in reverse (ABBA): this machine class drifts by
            // tens of percent over minutes, and a fixed order would charge the drift to
            // whichever mode runs last.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..modes.len()).collect()
            } else {
                (0..modes.len()).rev().collect()
            };
            for i in order {
                let mode = &modes[i];
                let run = measure(&target, *mode, &collector, opts, false)?;
                eprintln!(
                    "bench: {} round {} {}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms",
                    target.name,
                    round + 1,
                    mode.name(),
                    run.rps,
                    run.p50_ms,
                    run.p99_ms
                );
                runs[i].push(run);
            }
        }
        // More pairs of the two judged modes: one round's ratio carries this machine's noise
        // (untraced runs a minute apart differ by up to a third), and the median of many
        // pairs' ratios is what the targets are judged on.
        let traced_i = modes.iter().position(|m| *m == Mode::Traced);
        let saturation = traced_i.is_some();
        for pair in (0..opts.pairs).filter(|_| saturation) {
            let traced_i = traced_i.unwrap_or_default();
            let order = if pair % 2 == 0 {
                [0, traced_i]
            } else {
                [traced_i, 0]
            };
            for i in order {
                let run = measure(&target, modes[i], &collector, opts, false)?;
                eprintln!(
                    "bench: {} pair {} {}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms",
                    target.name,
                    pair + 1,
                    modes[i].name(),
                    run.rps,
                    run.p50_ms,
                    run.p99_ms
                );
                runs[i].push(run);
            }
        }
        // One more traced run, its server sampled by perf: what share of the server's CPU the
        // tracer's programs and their dispatch took, a figure the machine's drift, which the
        // throughput ratios carry, moves little.
        let server_share = match traced_i {
            Some(i) if have_perf() => {
                let run = measure(&target, modes[i], &collector, opts, true)?;
                run.server_samples
                    .map(|(tracer, all)| (tracer, all, run.shed_s > 0.0))
            }
            _ => None,
        };
        let base_rps = median(runs[0].iter().map(|r| r.rps).collect());
        let base_p50 = median(runs[0].iter().map(|r| r.p50_ms).collect());
        let base_p99 = median(runs[0].iter().map(|r| r.p99_ms).collect());
        writeln!(report, "## {}\n", target.name)?;
        writeln!(
            report,
            "| mode | req/s | vs untraced | p50 ms | vs | p99 ms | vs | server CPU µs / req | steal, cores | idle, cores | IPIs / req | agent CPU ms / 1k req | agent peak RSS MiB | events/s | lost | time shed | spans / requests served |"
        )?;
        writeln!(
            report,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for (i, mode) in modes.iter().enumerate() {
            let r = &runs[i];
            let rps = median(r.iter().map(|x| x.rps).collect());
            let p50 = median(r.iter().map(|x| x.p50_ms).collect());
            let p99 = median(r.iter().map(|x| x.p99_ms).collect());
            let requests: u64 = r.iter().map(|x| x.requests).sum();
            let cpu_per_1k =
                r.iter().map(|x| x.agent_cpu_s).sum::<f64>() * 1000.0 / (requests as f64 / 1000.0);
            let rss = r.iter().map(|x| x.agent_rss_kib).max().unwrap_or(0) as f64 / 1024.0;
            // Events and time shed count the warm-up too.
            let traced_s = (opts.duration + WARMUP_SECS) as f64 * r.len() as f64;
            let events_per_s = r.iter().map(|x| x.events).sum::<u64>() as f64 / traced_s;
            let lost: u64 = r.iter().map(|x| x.lost).sum();
            let spans: u64 = r.iter().map(|x| x.spans).sum();
            let served: u64 = r.iter().map(|x| x.served).sum();
            // Over the requests of the measured runs (the server's count takes in the
            // warm-ups too).
            let server_us = r.iter().map(|x| x.server_cpu_s).sum::<f64>() * 1e6
                / r.iter().map(|x| x.requests).sum::<u64>().max(1) as f64;
            let steal_cores =
                r.iter().map(|x| x.steal_s).sum::<f64>() / (opts.duration as f64 * r.len() as f64);
            let idle_cores =
                r.iter().map(|x| x.idle_s).sum::<f64>() / (opts.duration as f64 * r.len() as f64);
            let ipis_per_req = r.iter().map(|x| x.ipis).sum::<u64>() as f64 / served.max(1) as f64;
            let traced = !matches!(mode, Mode::Untraced | Mode::UntracedPaced);
            let spanned = traced && !matches!(mode, Mode::Idle | Mode::IdleSyscalls);
            // A paced run's offered load is not the untraced runs': no ratio to them.
            let vs = |x: f64, base: f64, digits: usize| {
                if mode.paced() {
                    "-".to_string()
                } else {
                    format!("{:.digits$}", x / base)
                }
            };
            let shed_share = r.iter().map(|x| x.shed_s).sum::<f64>() / traced_s;
            writeln!(
                report,
                "| {} | {:.0} | {} | {:.3} | {} | {:.3} | {} | {:.1} | {:.2} | {:.2} | {:.3} | {} | {} | {} | {} | {} | {} |",
                mode.name(),
                rps,
                vs(rps, base_rps, 3),
                p50,
                vs(p50, base_p50, 2),
                p99,
                vs(p99, base_p99, 2),
                server_us,
                steal_cores,
                idle_cores,
                ipis_per_req,
                if traced {
                    format!("{cpu_per_1k:.1}")
                } else {
                    "-".into()
                },
                if traced {
                    format!("{rss:.1}")
                } else {
                    "-".into()
                },
                if traced {
                    format!("{events_per_s:.0}")
                } else {
                    "-".into()
                },
                if traced { lost.to_string() } else { "-".into() },
                if spanned {
                    format!("{:.0}%", shed_share.min(1.0) * 100.0)
                } else {
                    "-".into()
                },
                if spanned {
                    format!("{spans} / {served}")
                } else {
                    "-".into()
                },
            )?;
        }
        let untraced_rps: Vec<f64> = runs[0].iter().map(|r| r.rps).collect();
        let noise = if saturation {
            format!(
                "Untraced rounds ranged from {:.0} to {:.0} req/s: the noise any ratio above carries. ",
                untraced_rps.iter().copied().fold(f64::INFINITY, f64::min),
                untraced_rps.iter().copied().fold(0.0, f64::max),
            )
        } else {
            format!(
                "The load is paced: {PACED_RATE} req/s over {PACED_CONNECTIONS} kept-alive connections, each request timed from when it was due. "
            )
        };
        writeln!(
            report,
            "\n{noise}Server CPU per request is the server's own CPU time over the requests the load generator counted in the measured runs, \
             where the probes run; steal is CPU time the hypervisor gave to other guests; idle \
             is CPU time no thread wanted (the load generator and the server waiting on each other); IPIs are \
             the machine's inter-processor interrupts per request served, mostly wakeups of a \
             thread asleep on the other CPU. The agent's RSS counts the 16 MiB ring buffer twice \
             (its pages are mapped twice in a row, so that a record is read across the end): \
             32 MiB of it are the kernel's pages, there whether the agent runs or not.",
        )?;
        if let Some(i) = modes.iter().position(|m| *m == Mode::Exported) {
            let r = &runs[i];
            let spans: u64 = r.iter().map(|x| x.spans).sum();
            let cpu: f64 = r.iter().map(|x| x.collector_cpu_s).sum();
            writeln!(
                report,
                "\nThe traced+export runs share the two CPUs with the test's Zipkin collector (Python), \
                 which used {:.1} ms of CPU per 1k spans taking them in (the equivalent of {:.2} cores over the load's \
                 duration): part of that mode's cost to the server, not the tracer's.",
                cpu * 1e6 / spans.max(1) as f64,
                cpu / ((opts.duration + WARMUP_SECS) as f64 * r.len() as f64),
            )?;
        }
        if let Some((tracer, all, shed)) = server_share {
            writeln!(
                report,
                "\nIn one more traced run, the server's threads sampled by perf during the load \
                 (`perf record -e cpu-clock -F 4999`): {:.1}% of their CPU samples were in the \
                 tracer's programs or the kernel code that runs them ({tracer} of {all}){}. At \
                 saturation that share is what capture costs the server's throughput where its \
                 CPU is the limit, a figure this machine's drift moves much less than the \
                 ratios above.",
                tracer as f64 * 100.0 / all.max(1) as f64,
                if shed {
                    ", with the server shed for part of the run"
                } else {
                    ", every call captured"
                },
            )?;
        }
        if saturation {
            // The throughput and p99 targets are judged on the twins where they run.
            let twins = opts.servers[if target.comm == "nginx" { 3 } else { 4 }];
            judge_saturation(&mut report, &mut all_pass, modes, &runs, opts, twins)?;
        }
        judge_paced(&mut report, &mut all_pass, &target, modes, &runs)?;
        writeln!(report)?;
    }

    for (i, name, start) in [
        (
            3,
            "nginx (static file)",
            start_nginx as fn() -> anyhow::Result<Target>,
        ),
        (4, "python http.server (keep-alive)", start_python),
    ] {
        if opts.servers[i] {
            twins::twins(&mut report, &mut all_pass, name, start, opts)?;
        }
    }

    // In-kernel cost per syscall.
    let other = Command::new("sleep").arg("600").spawn()?;
    let other = Guard(other);
    let n = opts.syscalls;
    let modes = [
        LoopMode::NoTracer,
        LoopMode::OtherTraced,
        LoopMode::Traced,
        LoopMode::NoTracerHttp,
        LoopMode::TracedHttp,
    ];
    let mut cpu: [Vec<f64>; 5] = Default::default();
    let mut wall: [Vec<f64>; 5] = Default::default();
    let mut null_cpu: [Vec<f64>; 5] = Default::default();
    let mut share: [Vec<f64>; 5] = Default::default();
    let mut profiled = true;
    for _ in 0..opts.rounds {
        for (i, mode) in modes.into_iter().enumerate() {
            let [c, w, nc, _] = loop_cost(mode, n, other.0.id())?;
            cpu[i].push(c);
            wall[i].push(w);
            null_cpu[i].push(nc);
            if profiled && !matches!(mode, LoopMode::NoTracer | LoopMode::NoTracerHttp) {
                match loop_tracer_share(mode, n, other.0.id())? {
                    Some(s) => share[i].push(s),
                    None => profiled = false,
                }
            }
        }
    }
    let [none, other_traced, traced, none_http, traced_http] = cpu.map(median);
    let [
        wall_none,
        wall_other,
        wall_traced,
        wall_none_http,
        wall_http,
    ] = wall.map(median);
    let [null_none, null_other, null_traced, _, _] = null_cpu.map(median);
    let [_, share_other, share_traced, _, share_http] = share.map(median);
    // The tracer's sampled share of a mode's CPU per call, as a table cell.
    let sampled = |share: f64, cpu: f64| {
        if profiled {
            format!("{:.1}%, {:.0} ns", share * 100.0, share * cpu)
        } else {
            "(no perf)".to_string()
        }
    };
    let probe_other = loop_probe_ns(LoopMode::OtherTraced, n, other.0.id())?;
    let probe_traced = loop_probe_ns(LoopMode::Traced, n, other.0.id())?;
    let probe_http = loop_probe_ns(LoopMode::TracedHttp, n, other.0.id())?;
    writeln!(report, "## In-kernel cost of a traced syscall\n")?;
    writeln!(
        report,
        "{n} writes of 64 bytes on a corked loopback TCP socket (`TCP_CORK`: a write queues its \
         bytes, and the one in about a thousand that fills a 64 KiB segment sends it to a \
         reading thread), timed by batches of {WRITE_BATCH}, the median batch's, medians of {} rounds:\n",
        opts.rounds
    )?;
    writeln!(
        report,
        "| | CPU ns per write (writing thread) | added | wall ns per write | added | in the tracer's programs and their dispatch (sampled) |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    writeln!(
        report,
        "| no tracer | {none:.0} | - | {wall_none:.0} | - | - |"
    )?;
    writeln!(
        report,
        "| tracer running, this process not traced | {other_traced:.0} | {:+.0} ns | {wall_other:.0} | {:+.0} ns | {} |",
        other_traced - none,
        wall_other - wall_none,
        sampled(share_other, other_traced),
    )?;
    writeln!(
        report,
        "| this process traced | {traced:.0} | {:+.0} ns | {wall_traced:.0} | {:+.0} ns | {} |",
        traced - none,
        wall_traced - wall_none,
        sampled(share_traced, traced),
    )?;
    writeln!(
        report,
        "\nA write here is the syscall, the socket layer and the copy into the send queue, where \
         the probes run: a send that also delivered its bytes on loopback cost 4-6 µs, and how much \
         of that fell on the writer (a wakeup of the reader, the congestion window) swung the \
         figures by a third between runs. CPU time is the writing thread's own; the machine's \
         speed still drifts by 10-30% over minutes, which the differences between runs carry. \
         The last column does not: it is the share of the writing thread's CPU samples during \
         its writes (`perf record -e cpu-clock`, one more run of each mode per round) that fell \
         in the tracer's programs or the kernel code that runs them (tracepoint dispatch), and \
         that share of the mode's CPU per write. The writes go out on a client connection of \
         the traced process, which the context injector watches until the agent has seen that \
         it carries no HTTP/1.x requests."
    )?;
    writeln!(
        report,
        "\nA traced HTTP client: {n} requests of 64 bytes on a kept-alive loopback connection, each \
         followed by reading its 40-byte response from a thread of the same process on the same \
         CPU, medians of {} rounds (CPU ns per request of the client's thread: one send, one \
         receive, and the loopback delivery they run):\n",
        opts.rounds
    )?;
    writeln!(
        report,
        "| | CPU ns per request | added | wall ns per request | added | in the tracer's programs and their dispatch (sampled) |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    writeln!(
        report,
        "| no tracer | {none_http:.0} | - | {wall_none_http:.0} | - | - |"
    )?;
    writeln!(
        report,
        "| traced, a `traceparent` added to each request | {traced_http:.0} | {:+.0} ns | {wall_http:.0} | {:+.0} ns | {} |",
        traced_http - none_http,
        wall_http - wall_none_http,
        sampled(share_http, traced_http),
    )?;
    writeln!(
        report,
        "\nThe same number of 64-byte writes to /dev/null (any syscall that is not socket I/O), \
         CPU ns per write: no tracer {null_none:.0}; tracer running, not traced {null_other:.0} \
         ({:+.0} ns); traced {null_traced:.0} ({:+.0} ns).",
        null_other - null_none,
        null_traced - null_none
    )?;
    writeln!(
        report,
        "\nThe tracer's BPF programs' own time, from the kernel's run-time statistics (one more \
         run of each loop with them on; their clock reads are included): {probe_other:.0} ns a \
         write with the process not traced (the early return of the writer's send program), \
         {probe_traced:.0} ns a write traced (and the batch's read, shared among its \
         writes), and {probe_http:.0} ns a request of the traced HTTP client (its send, header \
         injection and receive, and the sink's). The sampled share above also counts the \
         tracepoints' dispatch, which these statistics leave out."
    )?;
    let (memory, pass) = connections_memory()?;
    all_pass &= pass;
    report.push_str(&memory);
    writeln!(
        report,
        "\n## The agent's own work per request\n\n{}",
        agent_pipeline()?
    )?;
    writeln!(
        report,
        "\nOverall: {}",
        if all_pass { "PASS" } else { "FAIL (see above)" }
    )?;

    let out_dir = root().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(if opts.servers.iter().all(|s| *s) {
        "results.md"
    } else {
        "results-partial.md"
    });
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("bench: report written to {}", Path::new(&path).display());
    Ok(())
}

/// Connections held open at once for the memory target.
const OPEN_CONNECTIONS: usize = 10_000;
/// Connections opened and closed one after another once those are closed.
const CHURNED_CONNECTIONS: usize = 20_000;
/// The agent's resident memory target with `OPEN_CONNECTIONS` open.
const RSS_TARGET_KIB: u64 = 64 * 1024;

/// The agent's memory while nginx holds 10k traced connections open (each carried one request),
/// and after 20k more were opened and closed one by one: the report's section and whether the
/// RSS target held, with a span for every request.
fn connections_memory() -> anyhow::Result<(String, bool)> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("tracer-bench-conns-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index.html"), "hi\n")?;
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\nworker_rlimit_nofile 40000;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 30000; }}\n\
             http {{ access_log off; keepalive_timeout 600s; keepalive_requests 100000;\n  server {{ listen 127.0.0.1:{port} backlog=4096; root {d}; }} }}\n"
        ),
    )?;
    let nginx = Guard(
        Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .spawn()
            .context("start nginx (apt-get install nginx)")?,
    );
    wait_port(port)?;
    let agent = Agent::start(&[
        "run".into(),
        "--comm".into(),
        "nginx".into(),
        "--port".into(),
        port.to_string(),
        "--output".into(),
        "json".into(),
        "--stats-interval".into(),
        "0".into(),
        // Every request must be a span: the connections' bursts are not to be shed.
        "--overhead-budget".into(),
        "0".into(),
        "--queue-size".into(),
        "40000".into(),
    ])?;
    let agent_pid = agent.child.id();
    let rss_start = proc_status_kib(agent_pid, "VmRSS:");
    let mut client = Guard(
        Command::new("python3")
            .arg(root().join("tests/servers/many_conns.py"))
            .args([
                port.to_string(),
                OPEN_CONNECTIONS.to_string(),
                CHURNED_CONNECTIONS.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start python3 many_conns.py")?,
    );
    let mut out = BufReader::new(client.0.stdout.take().context("client stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != format!("open {OPEN_CONNECTIONS}") {
        bail!("many_conns.py did not open its connections: {line:?}");
    }
    // The agent drains every few milliseconds; let it take in the last opens and requests.
    std::thread::sleep(Duration::from_secs(2));
    let rss_open = proc_status_kib(agent_pid, "VmRSS:");
    client
        .0
        .stdin
        .take()
        .context("client stdin")?
        .write_all(b"go\n")?;
    for want in [
        "closed".to_string(),
        format!("churned {CHURNED_CONNECTIONS}"),
    ] {
        line.clear();
        out.read_line(&mut line)?;
        if line.trim() != want {
            bail!("many_conns.py: expected {want:?}, got {line:?}");
        }
    }
    if !client.0.wait()?.success() {
        bail!("many_conns.py failed");
    }
    // The last requests' spans: the agent has handled them once it is idle.
    wait_until_idle(agent_pid);
    let rss_end = proc_status_kib(agent_pid, "VmRSS:");
    let (hwm, summary) = agent.stop()?;
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
    let spans: u64 = summary_number(&summary, "exported");
    let lost: u64 = summary_number(&summary, "lost");
    let requests = (OPEN_CONNECTIONS + CHURNED_CONNECTIONS) as u64;
    let pass = hwm <= RSS_TARGET_KIB && spans == requests && lost == 0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut s = String::new();
    writeln!(
        s,
        "\n## Agent memory with {OPEN_CONNECTIONS} open connections\n"
    )?;
    writeln!(
        s,
        "nginx traced, {OPEN_CONNECTIONS} kept-alive connections opened and held (one request each), then closed, then {CHURNED_CONNECTIONS} more opened and closed one after another (tests/servers/many_conns.py):\n"
    )?;
    writeln!(
        s,
        "| agent RSS at start | with {OPEN_CONNECTIONS} open | after the churn | peak | spans / requests | lost events |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|")?;
    writeln!(
        s,
        "| {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {spans} / {requests} | {lost} |",
        mib(rss_start),
        mib(rss_open),
        mib(rss_end),
        mib(hwm)
    )?;
    writeln!(
        s,
        "\n- {} RSS <= {} MiB with {OPEN_CONNECTIONS} open connections, every request a span: peak {:.1} MiB, {spans} spans for {requests} requests, {lost} lost events (the ring buffer's 16 MiB are counted twice in RSS, see above)\n",
        if pass { "PASS" } else { "FAIL" },
        RSS_TARGET_KIB / 1024,
        mib(hwm)
    )?;
    Ok((s, pass))
}

/// The agent's CPU per request on a synthetic stream, without the kernel, the load generator or
/// the scheduler (`tracer-user/benches/pipeline.rs`): the line it prints.
fn agent_pipeline() -> anyhow::Result<String> {
    let out = crate::cargo()
        .args(["bench", "-q", "-p", "tracer-user", "--bench", "pipeline"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo bench --bench pipeline")?;
    if !out.status.success() {
        bail!("the agent pipeline benchmark failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("agent pipeline:"))
        .context("no result from the agent pipeline benchmark")?;
    Ok(format!(
        "{line}. Each request is a read of an 81-byte request and a write of nginx's 381-byte response, as the probes report them, taken through decoding, connection tracking, HTTP parsing, linking, the span and its JSON: the capture thread's work per request, less the ring buffer's reading and the writer's output, which the loaded runs above include."
    ))
}

/// One judged line of the report: `Some(pass)`, or `None` for a figure reported, not judged.
type Check = (&'static str, Option<bool>, String);

fn write_checks(report: &mut String, all_pass: &mut bool, checks: Vec<Check>) -> std::fmt::Result {
    for (what, verdict, value) in checks {
        let word = match verdict {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "NOT JUDGED",
        };
        *all_pass &= verdict.unwrap_or(true);
        writeln!(report, "- {word} {what}: {value}")?;
    }
    Ok(())
}

/// The same-round throughput ratios and the saturation targets of a target measured under wrk.
fn judge_saturation(
    report: &mut String,
    all_pass: &mut bool,
    modes: &[Mode],
    runs: &[Vec<Run>],
    opts: &BenchOptions,
    judged_on_twins: bool,
) -> anyhow::Result<()> {
    // Each round runs every mode within a minute or two, so a mode's ratio to the untraced
    // run of its own round shares more of the machine's state than the ratio of medians
    // above; for the traced mode, the pairs after the rounds are rounds too.
    writeln!(
        report,
        "\nThroughput against the untraced run of the same round (min, median, max over the rounds; for traced, over the rounds and the {} pairs after them):",
        opts.pairs
    )?;
    for (i, mode) in modes.iter().enumerate().skip(1) {
        if mode.paced() {
            continue;
        }
        let ratios: Vec<f64> = runs[i]
            .iter()
            .zip(&runs[0])
            .map(|(run, base)| run.rps / base.rps)
            .collect();
        writeln!(
            report,
            "- {}: {:.3}, {:.3}, {:.3}",
            mode.name(),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            median(ratios.clone()),
            ratios.iter().copied().fold(0.0, f64::max),
        )?;
    }
    // Targets, for the traced run without export (export is judged by spans/requests).
    let of = |m: Mode| &runs[modes.iter().position(|x| *x == m).expect("mode measured")];
    let traced = of(Mode::Traced);
    let exported = of(Mode::Exported);
    let full = of(Mode::TracedFull);
    // Judged on the median of the paired ratios (see the pairs above).
    let paired = |f: fn(&Run) -> f64| -> Vec<f64> {
        traced
            .iter()
            .zip(&runs[0])
            .map(|(run, base)| f(run) / f(base))
            .collect()
    };
    let rps_ratios = paired(|r| r.rps);
    let p99_ratios = paired(|r| r.p99_ms);
    let rps_ratio = median(rps_ratios.clone());
    let p99_ratio = median(p99_ratios.clone());
    let quartiles = |v: &[f64]| {
        if v.is_empty() {
            return "-".to_string();
        }
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        format!("{:.3} to {:.3}", at(0.25), at(0.75))
    };
    let requests: u64 = traced.iter().map(|x| x.requests).sum();
    let cpu_per_1k = traced.iter().map(|x| x.agent_cpu_s).sum::<f64>() * 1e6 / requests as f64;
    let saturated = || traced.iter().chain(exported).chain(full);
    let lost: u64 = saturated().map(|x| x.lost).sum();
    let spans_total: u64 = saturated().map(|x| x.spans).sum();
    let served_total: u64 = saturated().map(|x| x.served).sum();
    let shed_total: u64 = saturated().map(|x| x.shed_calls).sum();
    let max_rps = saturated().map(|x| x.rps).fold(0.0, f64::max);
    let twins_note = if judged_on_twins {
        "; judged on the twins below, side by side at the same instant"
    } else {
        ""
    };
    writeln!(report)?;
    write_checks(
        report,
        all_pass,
        vec![
            (
                "throughput >= 97% of untraced",
                (!judged_on_twins).then_some(rps_ratio >= THROUGHPUT_TARGET),
                format!(
                    "{:.1}% (median of {} paired runs' ratios; middle half {}{}){twins_note}",
                    rps_ratio * 100.0,
                    rps_ratios.len(),
                    quartiles(&rps_ratios),
                    settled(&rps_ratios, THROUGHPUT_TARGET)
                ),
            ),
            (
                "p99 latency <= 1.05x untraced",
                (!judged_on_twins).then_some(p99_ratio <= P99_TARGET),
                format!(
                    "{p99_ratio:.2}x (median of {} paired runs' ratios; middle half {}{}){twins_note}",
                    p99_ratios.len(),
                    quartiles(&p99_ratios),
                    settled(&p99_ratios, P99_TARGET)
                ),
            ),
            (
                "agent CPU <= 50 ms per 1k requests",
                Some(cpu_per_1k <= 50.0),
                format!("{cpu_per_1k:.1} ms"),
            ),
            (
                "at saturation, every request a span or its loss counted (lost events, shed calls)",
                Some(saturated().all(accounted)),
                format!(
                    "{lost} lost events, {shed_total} socket calls shed, {spans_total} spans for {served_total} requests served at up to {max_rps:.0} req/s"
                ),
            ),
        ],
    )?;
    Ok(())
}

/// The paced runs' verdicts: every request a span at `PACED_RATE`, with the default budget
/// and with it off; judged where the target is below saturation at that rate.
fn judge_paced(
    report: &mut String,
    all_pass: &mut bool,
    target: &Target,
    modes: &[Mode],
    runs: &[Vec<Run>],
) -> anyhow::Result<()> {
    let of = |m: Mode| modes.iter().position(|x| *x == m).map(|i| &runs[i]);
    let judged = |pass: bool| target.paced_judged.then_some(pass);
    let mut checks: Vec<Check> = Vec::new();
    if let Some(paced) = of(Mode::TracedPaced) {
        let spans: u64 = paced.iter().map(|x| x.spans).sum();
        let served: u64 = paced.iter().map(|x| x.served).sum();
        let lost: u64 = paced.iter().map(|x| x.lost).sum();
        let shed: u64 = paced.iter().map(|x| x.shed_calls).sum();
        let late: u64 = paced.iter().map(|x| x.late).sum();
        let rate = median(paced.iter().map(|x| x.rps).collect());
        // Whether the server kept up untraced in the same rounds: a machine too slow for
        // 20k req/s untraced fails the traced run for want of CPU, not for the tracer.
        let untraced = of(Mode::UntracedPaced).map_or(String::new(), |u| {
            format!(
                "; untraced at the same rate: p50 {:.3} ms, {} sent over 1 ms late",
                median(u.iter().map(|x| x.p50_ms).collect()),
                u.iter().map(|x| x.late).sum::<u64>()
            )
        });
        let why: Vec<&str> = paced
            .iter()
            .filter_map(|x| x.first_shed.as_deref())
            .collect();
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(
                ". Where a run was shed, the governor's last periods before it: {}",
                why.join("; ")
            )
        };
        let near_saturation = if target.paced_judged {
            ""
        } else {
            " (one worker near its saturation: shedding there is the governor at work, see the per-CPU server below)"
        };
        checks.push((
            "every request a span at 20k req/s (paced), nothing lost or shed",
            judged(paced.iter().all(every_request_a_span)),
            format!(
                "{spans} spans for {served} requests served at {rate:.0} req/s ({late} sent over 1 ms late), {lost} lost events, {shed} socket calls shed{untraced}{near_saturation}{why}"
            ),
        ));
    }
    if let Some(paced) = of(Mode::TracedFullPaced) {
        let spans: u64 = paced.iter().map(|x| x.spans).sum();
        let served: u64 = paced.iter().map(|x| x.served).sum();
        let lost: u64 = paced.iter().map(|x| x.lost).sum();
        checks.push((
            "the tracer keeps up at 20k req/s (paced, budget off): no event lost, every request a span",
            judged(paced.iter().all(every_request_a_span)),
            format!(
                "{spans} spans for {served} requests served at {:.0} req/s, {lost} lost events; p50 {:.3} ms, p99 {:.3} ms",
                median(paced.iter().map(|x| x.rps).collect()),
                median(paced.iter().map(|x| x.p50_ms).collect()),
                median(paced.iter().map(|x| x.p99_ms).collect()),
            ),
        ));
    }
    if !checks.is_empty() {
        writeln!(report)?;
        write_checks(report, all_pass, checks)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_medians_interval_is_the_sign_tests() {
        // 14 paired ratios: the 4th smallest to the 4th largest, 94.3% (1 - 2 * 470/16384).
        let v: Vec<f64> = (1..=14).rev().map(f64::from).collect();
        let (low, high, confidence) = median_interval(&v).unwrap();
        assert_eq!((low, high), (4.0, 11.0));
        assert!((confidence - (1.0 - 2.0 * 470.0 / 16384.0)).abs() < 1e-12);
        // Five samples: only the extremes, 93.75%; four are too few for 90%.
        assert_eq!(
            median_interval(&[3.0, 1.0, 2.0, 5.0, 4.0]),
            Some((1.0, 5.0, 0.9375))
        );
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0]), None);
        assert!(settled(&v, 7.0).contains("does not settle"));
        assert!(settled(&v, 3.0).contains("clear of"));
    }

    #[test]
    fn first_shed_gives_the_shed_periods_and_the_two_of_its_process_before() {
        let log = "\
[t INFO ] tracing 2 programs
[t DEBUG] pid 7: hottest thread runnable 0.50 (average 0.50), on CPU 0.40 (average 0.40), 10 calls captured of 100% of its turns, agent 2000 ns a call: capture share 1.000 -> 1.000
[t DEBUG] pid 8: hottest thread runnable 0.90 (average 0.80), on CPU 0.80 (average 0.80), 10 calls captured of 100% of its turns, agent 2000 ns a call: capture share 1.000 -> 1.000
[t DEBUG] pid 7: hottest thread runnable 0.60 (average 0.52), on CPU 0.50 (average 0.42), 10 calls captured of 100% of its turns, agent 2000 ns a call: capture share 1.000 -> 1.000
[t DEBUG] pid 8: hottest thread runnable 0.99 (average 0.96), on CPU 0.90 (average 0.86), 10 calls captured of 100% of its turns, agent 2000 ns a call: capture share 1.000 -> 1.000
[t DEBUG] pid 8: hottest thread runnable 0.99 (average 0.97), on CPU 0.95 (average 0.88), 10 calls captured of 100% of its turns, agent 2000 ns a call: capture share 1.000 -> 0.120
[t DEBUG] pid 8: hottest thread runnable 0.70 (average 0.90), on CPU 0.60 (average 0.80), 10 calls captured of 12% of its turns, agent 2000 ns a call: capture share 0.120 -> 1.000
";
        let got = first_shed(log).expect("a period shed");
        let periods: Vec<&str> = got.split(" / ").collect();
        assert_eq!(periods.len(), 3, "{got}");
        assert!(periods.iter().all(|p| p.starts_with("pid 8: ")), "{got}");
        assert!(periods[0].contains("average 0.80"), "{got}");
        assert!(periods[2].ends_with("-> 0.120"), "{got}");
        assert_eq!(
            first_shed(
                &log.replace("-> 0.120", "-> 1.000")
                    .replace("share 0.120", "share 1.000")
            ),
            None
        );
    }
}
