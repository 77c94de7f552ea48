//! One subcommand a file.

pub mod cancel;
pub mod dlq;
pub mod enqueue;
pub mod group;
pub mod jobs;
pub mod namespace;
pub mod queues;
pub mod results;
pub mod schedule;
pub mod status;
pub mod tasks;
pub mod wait;

/// Resolves at the first SIGINT or SIGTERM (never, when the handlers cannot be installed).
pub(crate) async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
