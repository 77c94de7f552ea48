//! taskmill-common: the parts that the producer, the worker and the tests share.
//!
//! # Layout
//! - [`config`]: connection settings (flags backed by environment variables) and URL redaction.
//! - [`envelope`]: the versioned batch envelope, its MessagePack codec and message headers.
//! - [`topology`]: names of exchanges and queues, and their idempotent declaration.
//! - [`amqp`]: connecting to RabbitMQ.
//! - [`store`]: the Redis layout of jobs and results, and the atomic scripts that update it.
//! - [`task`]: the task trait, task errors and the registry of tasks by name.
//! - [`tasks`]: the built-in tasks (`post-stats`, `text-stats`, `similarity`, `chaos`).
//! - [`draw`]: deterministic pseudo-random draws (retry jitter, the `chaos` task).
//! - [`logging`]: tracing set-up shared by both binaries.

pub mod amqp;
pub mod config;
pub mod draw;
pub mod envelope;
pub mod logging;
pub mod store;
pub mod task;
pub mod tasks;
pub mod topology;

/// An error and its causes in one line, each cause once: a cause whose text its parent
/// already shows is not repeated.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

/// Milliseconds since the Unix epoch, the unit of every time taskmill stores.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        Ok(rt) => rt.block_on(main()),
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
