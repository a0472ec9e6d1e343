//! Project tasks: `cargo xtask setup | build | run -- ARGS | test | bench`.
//!
//! `run` and `test` do `setup` first, so that on a fresh machine each is the one command needed.

mod bench;
mod paced;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.4";

#[derive(Parser)]
#[command(name = "xtask", about = "tracer's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs: nightly's rust-src and bpf-linker.
    Setup,
    /// Build the tracer (release).
    Build,
    /// Build and run the tracer as root: `cargo xtask run -- attach --pid 1234`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: lints off, unit tests, the collector's self-test, and the end-to-end
    /// tests (these need root; in CI they must run).
    Test {
        /// Only unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Arguments passed to the end-to-end test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Measure the cost of tracing (root): real servers under wrk, untraced vs traced vs
    /// traced with export, and the in-kernel cost per syscall. Writes bench/results.md.
    Bench {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 8)]
        duration: u64,
        /// Rounds of untraced / traced / exported runs (medians are reported).
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Pairs of untraced and traced runs after the rounds, for the judged ratios (the
        /// median of each pair's ratio over the rounds and the pairs).
        #[arg(long, default_value_t = 10)]
        pairs: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// Writes per syscall-cost loop.
        #[arg(long, default_value_t = 200_000)]
        syscalls: u64,
        /// The servers measured under load, of nginx, nginx-per-cpu (the paced target),
        /// python, and nginx-twins and python-twins (two identical servers on one CPU, one
        /// traced: the throughput and p99 targets); `none` for the other sections only. A
        /// report of fewer than all goes to bench/results-partial.md.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "nginx,nginx-per-cpu,python,nginx-twins,python-twins"
        )]
        servers: Vec<String>,
    },
    /// Fuzz the parsers of untrusted bytes (cargo-fuzz, nightly): replays fuzz/regressions,
    /// then fuzzes each target for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Paced (open-loop) HTTP/1.1 load on a loopback server: `rate` requests/s over keep-alive
    /// connections, latency measured from each request's due time. Prints one line of results.
    PacedLoad(paced::PacedLoadArgs),
    /// (internal) the syscall loop the benchmark times.
    #[command(hide = true)]
    SyscallLoop {
        n: u64,
        /// Write HTTP/1.1 requests instead of opaque bytes.
        #[arg(long)]
        http: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Run { args } => {
            setup()?;
            build()?;
            run_tracer(&args)
        }
        Task::Test { unit, filter } => {
            setup()?;
            test(unit, &filter)
        }
        Task::Bench {
            duration,
            rounds,
            pairs,
            connections,
            syscalls,
            servers,
        } => {
            let mut chosen = [false; bench::SERVERS.len()];
            for name in servers.iter().filter(|n| *n != "none") {
                let Some(i) = bench::SERVERS.iter().position(|s| s == name) else {
                    bail!(
                        "unknown server {name:?} (expected some of {} or none)",
                        bench::SERVERS.join(", ")
                    );
                };
                chosen[i] = true;
            }
            setup()?;
            bench::bench(&bench::BenchOptions {
                duration,
                rounds,
                pairs,
                connections,
                syscalls,
                servers: chosen,
            })
        }
        Task::SyscallLoop { n, http } => bench::syscall_loop(n, http),
        Task::PacedLoad(args) => paced::paced_load(&args),
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz(seconds)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> anyhow::Result<()> {
    // The eBPF crate is built with nightly and -Z build-std=core, which needs rust-src.
    let has_src = output_of(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .is_some_and(|out| out.lines().any(|l| l.starts_with("rust-src")));
    if !has_src {
        eprintln!("xtask: installing the nightly toolchain's rust-src");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let linker_ok =
        output_of("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        // 0.10.4 loads rustc's own LLVM; newer versions want a system LLVM.
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION}");
        status(cargo().args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
    }
    // The eBPF build depends on nightly's codegen (a new LLVM once pushed a program past the
    // 512-byte stack limit): say which one this is, for whoever reads a failed build's log.
    if let Some(version) = output_of("rustup", &["run", "nightly", "rustc", "--version"]) {
        eprintln!("xtask: eBPF toolchain {}", version.trim());
    }
    Ok(())
}

const FUZZ_TARGETS: [&str; 5] = ["http1", "decode", "context", "redis", "postgres"];

fn fuzz(seconds: u64) -> anyhow::Result<()> {
    if output_of("cargo", &["fuzz", "--version"]).is_none() {
        eprintln!("xtask: installing cargo-fuzz");
        status(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS {
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let regressions = root().join("fuzz/regressions").join(target);
        // New inputs go to the first directory only: the committed regressions are replayed
        // at start and never written to. A crash leaves its input in fuzz/artifacts/TARGET:
        // fix the bug, then move the file into fuzz/regressions/TARGET.
        status(
            Command::new("cargo")
                .current_dir(root())
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(&regressions)
                .args([
                    "--",
                    &format!("-max_total_time={seconds}"),
                    "-rss_limit_mb=2048",
                    "-max_len=65536",
                ])
                // The fuzz targets need the parsers, not the eBPF object.
                .env("AYA_BUILD_SKIP", "1"),
        )?;
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    status(cargo().args(["build", "--release", "-p", "tracer-user"]))
}

fn is_root() -> bool {
    output_of("id", &["-u"]).is_some_and(|s| s.trim() == "0")
}

fn run_tracer(args: &[String]) -> anyhow::Result<()> {
    let bin = root().join("target/release/tracer");
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: tracer needs root; running it with sudo");
        let mut c = Command::new("sudo");
        c.arg(&bin);
        c
    };
    cmd.args(args);
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    std::process::exit(st.code().unwrap_or(1));
}

fn test(unit_only: bool, filter: &[String]) -> anyhow::Result<()> {
    status(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--exclude",
        "tracer-e2e",
    ]))?;
    status(Command::new("python3").current_dir(root()).args([
        "-m",
        "unittest",
        "-v",
        "tests/collector/test_zipkin_collector.py",
    ]))?;
    if unit_only {
        return Ok(());
    }
    let in_ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !is_root() {
        if in_ci {
            bail!("the end-to-end tests need root and BPF, and CI must run them: run CI as root");
        }
        eprintln!(
            "xtask: NOT running the end-to-end tests: they need root (try `sudo -E cargo xtask test`)"
        );
        return Ok(());
    }
    // The tracer binary the end-to-end tests run.
    build()?;
    // The end-to-end tests share kernel state and ports: one at a time.
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "--no-fail-fast",
        "-p",
        "tracer-e2e",
        "--",
        "--test-threads=1",
    ]);
    cmd.args(filter);
    cmd.env("TRACER_BIN", root().join("target/release/tracer"));
    status(&mut cmd)
}
