//! The client's errors: one enum a caller can match, each variant of one [`ErrorKind`], and the
//! kind decides what a front door answers (the CLI's exit code, the HTTP API's status, the
//! Python client's exception).

use taskmill_store::{BadJobHash, JobStatus, StoreError};

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Refused before anything happened: a bad option, an unknown task or parameter, nothing
    /// to enqueue (exit 2, HTTP 400).
    Invalid,
    /// The job id is taken (exit 2, HTTP 409).
    Exists,
    /// No such job: never registered, deleted, or expired (exit 4, HTTP 404).
    NoSuchJob,
    /// A wait ran out of time (exit 3).
    Timeout,
    /// A stop request ended the enqueue before its first batch: nothing registered (exit 1).
    Interrupted,
    /// RabbitMQ or Redis is unreachable, refused the credentials, or failed mid-way (exit 5,
    /// HTTP 503).
    Unavailable,
    /// A job's record in Redis cannot be read as a job (exit 6, HTTP 500).
    Unreadable,
}

/// A client failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Refused before anything happened, in one sentence that says what is valid.
    #[error("{0}")]
    Invalid(String),
    /// The job id is taken.
    #[error("job {0} already exists; choose another job id")]
    JobExists(String),
    /// No such job.
    #[error("{0}")]
    NoSuchJob(String),
    /// A wait ran out of time; the job's status when it did.
    #[error("timed out waiting for job {}", .0.job)]
    Timeout(Box<JobStatus>),
    /// A stop request ended the enqueue before its first batch.
    #[error("{0}")]
    Interrupted(String),
    /// A job's record cannot be read as a job.
    #[error(transparent)]
    Unreadable(BadJobHash),
    /// Redis could not be reached or failed.
    #[error(transparent)]
    Store(StoreError),
    /// RabbitMQ could not be reached, refused, or failed mid-way: what was being done and why.
    #[error("{0}")]
    Broker(String),
    /// Nothing to enqueue because every source failed on the network (refused, timed out,
    /// 429 or 5xx after every retry): the sources' failures, a few word for word.
    #[error("{0}")]
    SourcesUnreachable(String),
}

impl Error {
    /// The kind: what a front door makes of it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::JobExists(_) => ErrorKind::Exists,
            Error::NoSuchJob(_) => ErrorKind::NoSuchJob,
            Error::Timeout(_) => ErrorKind::Timeout,
            Error::Interrupted(_) => ErrorKind::Interrupted,
            Error::Unreadable(_) => ErrorKind::Unreadable,
            Error::Store(_) | Error::Broker(_) | Error::SourcesUnreachable(_) => {
                ErrorKind::Unavailable
            }
        }
    }

    /// A broker failure: `what` was being done when `e` (and its causes) happened.
    pub(crate) fn broker(what: &str, e: &(dyn std::error::Error + 'static)) -> Self {
        Error::Broker(format!("{what}: {}", taskmill_protocol::error_text(e)))
    }

    /// The "no such job" error for `job`.
    pub(crate) fn no_such_job(job: &str) -> Self {
        Error::NoSuchJob(format!(
            "no job {:?} in this namespace (wrong namespace, or it expired)",
            taskmill_protocol::envelope::bounded(job, 200)
        ))
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::JobExists(job) => Error::JobExists(job),
            e @ StoreError::GroupClosed(_) => Error::Invalid(e.to_string()),
            StoreError::BadJob(bad) => Error::Unreadable(bad),
            other => Error::Store(other),
        }
    }
}

/// The client's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
