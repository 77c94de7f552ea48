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
//! - [`logging`]: tracing set-up shared by both binaries.

pub mod amqp;
pub mod config;
pub mod envelope;
pub mod logging;
pub mod store;
pub mod task;
pub mod tasks;
pub mod topology;

/// Milliseconds since the Unix epoch, the unit of every time taskmill stores.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
