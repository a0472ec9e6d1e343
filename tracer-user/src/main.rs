//! The `tracer` binary: parses the command line and hands over to the agent. Every error ends
//! here as one line on stderr and a non-zero exit.
use clap::Parser;
use tracer_user::{agent, cli};

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .format_target(false)
        .init();
    let result = match cli.command {
        cli::Command::Run(opts) => agent::run(opts),
        cli::Command::Attach(opts) => agent::attach(opts),
        cli::Command::Collect(opts) => agent::collect(opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
