//! The `worker` binary: parses the command line, sets up logging and signals, runs the worker.

use std::process::ExitCode;

use clap::Parser;
use taskmill_common::{logging, task::Registry};
use taskmill_worker::WorkerArgs;
use tokio_util::sync::CancellationToken;

/// mimalloc: batches are many small allocations (JSON values), where it is much faster than
/// the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    use clap::CommandFactory;
    taskmill_common::run_binary("worker", &WorkerArgs::command(), async_main)
}

async fn async_main() -> ExitCode {
    let args = WorkerArgs::parse();
    logging::init(args.log_format, "info,lapin=off");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match taskmill_worker::run(args, Registry::builtin(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {}", taskmill_common::error_text(&*e));
            ExitCode::from(taskmill_worker::exit_code(&e))
        }
    }
}

/// First SIGTERM/SIGINT: drain. Second: exit at once; the broker gives every unacked batch
/// back to the queue when the connection drops.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("worker: cannot install signal handlers");
        return;
    };
    for n in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            tracing::info!("signal received: draining (send it again to stop at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: stopping now; unacked batches go back to the queue");
            std::process::exit(130);
        }
    }
}
