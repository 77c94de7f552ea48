//! One subcommand a file.

pub mod cancel;
pub mod dashboard;
pub mod dlq;
pub mod enqueue;
pub mod jobs;
pub mod queues;
pub mod results;
pub mod status;
pub mod tasks;
pub mod wait;
