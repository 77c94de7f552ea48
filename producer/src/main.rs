//! The `producer` binary: parses the command line, sets up logging, runs one command.

use std::process::ExitCode;

use clap::Parser;
use taskmill_common::logging;
use taskmill_producer::Cli;

/// mimalloc: batches are many small allocations (JSON values), where it is much faster than
/// the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The config file becomes environment variables (under those already set) before the
    // command line is parsed and before any thread starts.
    let argv: Vec<String> = std::env::args().collect();
    if let Err(e) = taskmill_common::config::apply_config_file(&argv) {
        eprintln!("producer: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("producer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main())
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, "warn");
    match taskmill_producer::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("producer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
