//! Tracing set-up for both binaries: `RUST_LOG` filters, `--log-format` picks the output.

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Installs the global subscriber; `default_filter` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: never escape codes in a pipe or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: try_init just reports that one is set.
    let _ = match format {
        LogFormat::Pretty => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// How many places a backtrace is logged for (the first panic at each): a task that panics on
/// every batch logs one backtrace, not one a batch.
const BACKTRACE_PLACES: usize = 64;

/// Sends panics through the log instead of stderr's raw lines: one event a panic (`error`,
/// target `taskmill::panic`) with its thread, place and message; the backtrace as a field of
/// that event only when asked (`RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` set and not `0`), and
/// only for the first panic at each place. Resolving a backtrace loads the binary's debug
/// information (tens of MB); the cache is let go of right after, so a worker's memory does
/// not keep it. Panics are still caught where they were.
pub fn install_panic_hook() {
    use std::{collections::HashSet, sync::Mutex};
    static TRACED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    std::panic::set_hook(Box::new(|info| {
        let message = taskmill_protocol::panic_message(info.payload());
        let place = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let asked = std::env::var_os("RUST_BACKTRACE")
            .or_else(|| std::env::var_os("RUST_LIB_BACKTRACE"))
            .is_some_and(|v| v != "0");
        let first_here = || {
            let mut traced = TRACED.lock().unwrap_or_else(|e| e.into_inner());
            let traced = traced.get_or_insert_with(HashSet::new);
            traced.len() < BACKTRACE_PLACES && traced.insert(place.clone())
        };
        if asked && first_here() {
            let trace = format!("{:?}", backtrace::Backtrace::new());
            backtrace::clear_symbol_cache();
            tracing::error!(
                target: "taskmill::panic", thread, place = %place, backtrace = %trace,
                "panicked: {message}"
            );
        } else {
            tracing::error!(target: "taskmill::panic", thread, place = %place, "panicked: {message}");
        }
    }));
}
