//! taskmill-common: what both binaries start with (settings, the settings file, logging, the
//! runtime), and the small crates of `common/` re-exported under one roof:
//!
//! - [`envelope`], [`topology`] names, job states: `taskmill-protocol` (no I/O);
//! - [`task`]: `taskmill-task`, the task SDK (serde only; all a task author needs);
//! - [`tasks`]: `taskmill-tasks`, the built-in tasks;
//! - [`amqp`], [`topology`] declarations: `taskmill-broker` (RabbitMQ);
//! - [`store`]: `taskmill-store` (Redis);
//! - [`config`], [`logging`]: here.

pub mod config;
pub mod logging;

pub use taskmill_broker::{amqp, dead, Backoff};
pub use taskmill_protocol::{
    envelope, error_text, now_ms, panic_message, redis_url, url_list, DeadKind, JobState,
};
pub use taskmill_store as store;
pub use taskmill_task as task;
pub use taskmill_tasks as tasks;

/// Broker names and declarations.
pub mod topology {
    pub use taskmill_broker::topology::*;
}

/// The common start of both binaries: applies the config file (as environment variables,
/// under those already set; its keys are the flags of `cmd`) before the command line is
/// parsed and before any thread starts,
/// then runs `main` on a single-threaded tokio runtime (the async side only does I/O;
/// analysis runs on rayon).
pub fn run_binary<F>(
    name: &str,
    cmd: &clap::Command,
    main: impl FnOnce() -> F,
) -> std::process::ExitCode
where
    F: std::future::Future<Output = std::process::ExitCode>,
{
    let argv: Vec<String> = std::env::args().collect();
    if let Err(e) = config::apply_config_file(&argv, name, cmd) {
        eprintln!("{name}: {e}");
        // A usage error: the same exit code as a bad flag.
        return std::process::ExitCode::from(2);
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(main());
            // Do not wait for blocking tasks (a reader still blocked on an open stdin after an
            // interrupted enqueue): the work is done, the answer is given.
            rt.shutdown_background();
            code
        }
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
