//! Errors that decide the exit code, and the exit-code table every command follows:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the job finished, but not every batch was done (dead, cancelled, expired, interrupted) |
//! | 2 | usage error: bad flags, an unknown task or parameter, nothing to enqueue; refused before anything happened |
//! | 3 | timeout (`wait --timeout`, `enqueue --wait --timeout`) |
//! | 4 | no such job (or no such dead letter) |
//! | 5 | a service (RabbitMQ, Redis, the management API) is unreachable or refused the credentials, or every source of an enqueue failed on the network |
//! | 6 | a job's record in Redis is unreadable (edited by hand, or written by another program); `delete JOB --yes` removes it |

use taskmill_client::ErrorKind;
use taskmill_common::{amqp::ConnectError, store::StoreError};

/// Exit code: the job finished, but not every batch was done.
pub const EXIT_UNFINISHED: u8 = 1;
/// Exit code: usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: timeout.
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit code: no such job.
pub const EXIT_NO_SUCH_JOB: u8 = 4;
/// Exit code: a service is unreachable or refused the credentials.
pub const EXIT_SERVICE: u8 = 5;
/// Exit code: a job's record in Redis cannot be read as a job.
pub const EXIT_UNREADABLE: u8 = 6;

/// A failure whose exit code is known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// Bad flags or input, refused before anything happened (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The job (or dead letter) does not exist (exit 4).
    #[error("{0}")]
    NoSuchJob(String),
    /// A service could not be reached or refused us (exit 5).
    #[error("{0}")]
    Service(String),
    /// A signal stopped the command before its work was done (exit 1).
    #[error("{0}")]
    Interrupted(String),
}

/// A usage error (exit 2) saying `msg`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    CliError::Usage(msg.into()).into()
}

/// The exit code for an error: the first cause in its chain that says which.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<CliError>() {
            return match c {
                CliError::Usage(_) => EXIT_USAGE,
                CliError::NoSuchJob(_) => EXIT_NO_SUCH_JOB,
                CliError::Service(_) => EXIT_SERVICE,
                CliError::Interrupted(_) => EXIT_UNFINISHED,
            };
        }
        if let Some(c) = cause.downcast_ref::<taskmill_client::Error>() {
            return match c.kind() {
                ErrorKind::Invalid | ErrorKind::Exists => EXIT_USAGE,
                ErrorKind::NoSuchJob => EXIT_NO_SUCH_JOB,
                ErrorKind::Timeout => EXIT_TIMEOUT,
                ErrorKind::Interrupted => EXIT_UNFINISHED,
                ErrorKind::Unreadable => EXIT_UNREADABLE,
                _ => EXIT_SERVICE,
            };
        }
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return match s {
                StoreError::JobExists(_) | StoreError::GroupClosed(_) => EXIT_USAGE,
                StoreError::BadJob(_) => EXIT_UNREADABLE,
                _ => EXIT_SERVICE,
            };
        }
        if cause.is::<ConnectError>()
            || cause.is::<lapin::Error>()
            || cause.is::<redis::RedisError>()
            || cause.is::<reqwest::Error>()
        {
            return EXIT_SERVICE;
        }
    }
    // Anything else is a service misbehaving mid-way (a channel closed by the broker, a
    // confirm that never came): the work is not done, and retrying later may help.
    EXIT_SERVICE
}
