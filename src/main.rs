//! The `service-ca-operator` binary: parse the command line, set up logging, run.

// Arithmetic that can overflow or panic is refused outside tests: dates go through
// `dates`, counters saturate, and each exception says why it cannot overflow.
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

use service_ca_operator::config::{Cli, LogFormat, Mode};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let config = match Cli::parse_args().into_mode() {
        Mode::Run(config) => *config,
        Mode::Inspect(args) => return inspect(*args),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
        eprintln!("invalid --log-level {:?}: {e}; using info", config.log_level);
        tracing_subscriber::EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        // JSON escapes every control character itself.
        LogFormat::Json => logs.with_writer(std::io::stderr).with_ansi(false).json().init(),
        // Plain lines carry values from user input (annotations, certificate subjects):
        // escaped, one line per event. Without colours, which escaping would show as text.
        LogFormat::Plain => {
            logs.with_writer(|| service_ca_operator::EscapedLines(std::io::stderr().lock())).with_ansi(false).init()
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(service_ca_operator::app::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `inspect`: no logging set-up (its output is the report), a small runtime.
fn inspect(args: service_ca_operator::config::InspectArgs) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => std::process::ExitCode::from(runtime.block_on(service_ca_operator::inspect::run(args))),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::ExitCode::from(service_ca_operator::inspect::exit::FAILED)
        }
    }
}
