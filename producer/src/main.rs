//! The `producer` binary: parses the command line, sets up logging, runs one command.

use std::process::ExitCode;

use taskmill_common::logging;

/// mimalloc: batches are many small allocations (JSON values), where it is much faster than
/// the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    taskmill_common::run_binary("producer", &taskmill_producer::command(), async_main)
}

async fn async_main() -> ExitCode {
    let cli = taskmill_producer::parse();
    logging::init(cli.log_format, "warn,lapin=off");
    match taskmill_producer::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("producer: {}", taskmill_common::error_text(&*e));
            ExitCode::from(taskmill_producer::error::exit_code(&e))
        }
    }
}
