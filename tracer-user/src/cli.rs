//! Command-line interface: one struct per subcommand, options shared through `CommonOptions`.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Traces requests of unmodified programs from the kernel (eBPF) and exports Zipkin v2 spans.
///
/// Without --zipkin, finished spans are printed to stdout as they happen.
#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace the whole host, or the processes the filters select (daemon mode). Processes
    /// started later are traced too.
    Run(RunOptions),
    /// Trace one running process (its threads and the children it forks) without restarting it.
    Attach(AttachOptions),
    /// Relay spans from agents to Zipkin, joining the client and server halves of hops between
    /// hosts that no trace header linked (needs no root).
    Collect(CollectOptions),
}

#[derive(Debug, Args)]
pub struct CollectOptions {
    /// Address to receive spans on, as a Zipkin collector (POST /api/v2/spans).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9412")]
    pub listen: std::net::SocketAddr,
    /// The Zipkin collector to forward to.
    #[arg(long, value_name = "URL", env = "TRACER_ZIPKIN_URL")]
    pub zipkin: String,
    /// How long spans wait for the other half of their hop, in milliseconds: longer than the
    /// agents' flush interval.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub hold_ms: u64,
    /// Spans per Zipkin request.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_size: u64,
    /// Spans held while Zipkin is slow or down; more are dropped and counted.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub queue_size: u64,
    /// Send uncompressed JSON to Zipkin.
    #[arg(long)]
    pub no_gzip: bool,
}

#[derive(Debug, Args)]
pub struct RunOptions {
    /// Trace only this process id (repeatable). Combined with --comm as "either".
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace only processes with this command name, as in /proc/PID/comm (repeatable).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
    /// Trace only connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Trace only processes in this network namespace: a name from `ip netns` or a path such
    /// as /proc/PID/ns/net (one tracer per container or test host).
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,
    #[command(flatten)]
    pub common: CommonOptions,
}

#[derive(Debug, Args)]
pub struct AttachOptions {
    /// The process to trace.
    #[arg(long, value_name = "PID")]
    pub pid: u32,
    /// Trace only connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    #[command(flatten)]
    pub common: CommonOptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One readable line per finished span.
    Text,
    /// One Zipkin v2 span JSON object per line.
    Json,
}

#[derive(Debug, Args)]
pub struct CommonOptions {
    /// Send spans to this Zipkin collector (http://host:9411 or its full /api/v2/spans URL)
    /// instead of printing them.
    #[arg(long, value_name = "URL", env = "TRACER_ZIPKIN_URL")]
    pub zipkin: Option<String>,
    /// How spans are printed when there is no --zipkin.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Service name for every span (default: the process's command name).
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
    /// Payload bytes copied per syscall, at most 4096: enough for request lines and headers.
    #[arg(long, value_name = "BYTES", default_value_t = tracer_common::DEFAULT_CAPTURE,
          value_parser = clap::value_parser!(u32).range(64..=4096))]
    pub capture_bytes: u32,
    /// Kernel-to-agent ring buffer size in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = parse_ring_size)]
    pub ring_buffer_mib: u32,
    /// Spans per Zipkin request.
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_size: u64,
    /// Longest wait before a partial batch is sent, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub flush_interval_ms: u64,
    /// Spans held while the collector is slow or down; more are dropped and counted.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub queue_size: u64,
    /// Send uncompressed JSON to the collector.
    #[arg(long)]
    pub no_gzip: bool,
    /// Do not trace the children a traced process forks.
    #[arg(long)]
    pub no_follow_forks: bool,
    /// Do not attach the OpenSSL uprobes: TLS connections are then not parsed.
    #[arg(long)]
    pub no_tls: bool,
    /// Trace context header written into outgoing HTTP/1.x requests of traced processes, in
    /// the kernel, so that the tracer on the receiving host joins their trace.
    #[arg(long, value_enum, default_value_t = InjectMode::Traceparent)]
    pub inject: InjectMode,
    /// Inject only into requests to this destination port (repeatable; default: any port).
    #[arg(long = "inject-port", value_name = "PORT")]
    pub inject_ports: Vec<u16>,
    /// Inject only into requests to this network, e.g. 10.0.0.0/8 or fd00::/8 (repeatable;
    /// default: any address).
    #[arg(long = "inject-net", value_name = "CIDR", value_parser = parse_cidr)]
    pub inject_nets: Vec<(std::net::IpAddr, u8)>,
    /// Serve Prometheus metrics of the agent and RED metrics of the traced services at
    /// http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Have the kernel count each of tracer's programs' runs and their time, for the metrics
    /// (`tracer_probe_runs_total`, `tracer_probe_run_seconds_total`) and the exit summary:
    /// what each probe costs. While on, every BPF program on the host reads the clock twice a
    /// run (about 0.1 µs more a run, measured on a 2-vCPU virtual machine).
    #[arg(long)]
    pub probe_stats: bool,
    /// Print agent statistics to stderr every this many seconds (0: only at exit).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub stats_interval: u64,
    /// The most CPU that capturing a CPU-bound process may cost, in percent of the CPU time
    /// its busiest thread gets (its probes and the agent's work on its events): while one of
    /// its threads is runnable nearly all the time, only a share of its requests is captured,
    /// picked at random, whole, and the rest is shed (counted). 0: capture everything, always.
    #[arg(long, value_name = "PCT", default_value_t = 3.0, value_parser = parse_budget)]
    pub overhead_budget: f64,
    /// CPU priority of the thread that reads and parses what the kernel captured.
    #[arg(long, value_enum, default_value_t = CapturePriority::Idle)]
    pub capture_priority: CapturePriority,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CapturePriority {
    /// Compete for CPU like any other thread.
    Normal,
    /// Run on CPU time no other thread wants (SCHED_IDLE), and compete normally only while
    /// the ring buffer backs up: the traced programs keep their CPUs, the agent drains larger
    /// batches (a few MiB more memory). Without CAP_SYS_NICE, as `normal`.
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InjectMode {
    /// Never change what traced processes send.
    Off,
    /// W3C `traceparent`.
    Traceparent,
    /// Zipkin's single `b3` header.
    B3,
}

fn parse_budget(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(pct) if (0.0..=100.0).contains(&pct) => Ok(pct),
        _ => Err(format!("`{s}` is not a percentage from 0 to 100")),
    }
}

fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, bits) = s.split_once('/').unwrap_or((s, ""));
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = if bits.is_empty() {
        max
    } else {
        bits.parse::<u8>()
            .map_err(|_| format!("`{bits}` is not a prefix length"))?
    };
    if bits > max {
        return Err(format!("prefix length {bits} is longer than {max}"));
    }
    Ok((ip, bits))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let mib: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !mib.is_power_of_two() || !(1..=1024).contains(&mib) {
        return Err("must be a power of two between 1 and 1024".into());
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_run_filters() {
        let cli = Cli::try_parse_from([
            "tracer", "run", "--pid", "1", "--pid", "2", "--comm", "nginx", "--port", "80",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!()
        };
        assert_eq!(run.pids, [1, 2]);
        assert_eq!(run.comms, ["nginx"]);
        assert_eq!(run.ports, [80]);
        assert_eq!(run.common.output, OutputFormat::Text);
        // The capture thread yields unless told otherwise.
        assert_eq!(run.common.capture_priority, CapturePriority::Idle);
        let cli = Cli::try_parse_from([
            "tracer",
            "attach",
            "--pid",
            "1",
            "--capture-priority",
            "normal",
        ])
        .unwrap();
        let Command::Attach(attach) = cli.command else {
            panic!()
        };
        assert_eq!(attach.common.capture_priority, CapturePriority::Normal);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Cli::try_parse_from(["tracer", "attach"]).is_err());
        assert!(Cli::try_parse_from(["tracer", "attach", "--pid", "x"]).is_err());
        assert!(Cli::try_parse_from(["tracer", "run", "--ring-buffer-mib", "3"]).is_err());
        assert!(Cli::try_parse_from(["tracer", "run", "--capture-bytes", "100000"]).is_err());
    }
}
