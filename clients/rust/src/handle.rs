//! A handle on one job: its status (with the summary), a wait that ends, its results a page at
//! a time, cancel and delete.

use std::time::Duration;

use futures::Stream;
use serde_json::Value;

use taskmill_protocol::JobState;
use taskmill_store::{Cancelled, JobStatus, Store, StoreError};

use crate::{
    enqueue::EnqueueReport,
    error::{Error, Result},
};

/// Batch results read from Redis in one round trip by [`JobHandle::results`].
const RESULTS_PAGE: u64 = 500;
/// How often [`JobHandle::wait`] reads the job.
const POLL: Duration = Duration::from_millis(100);

/// A job: its id, and how to follow and steer it.
#[derive(Clone)]
pub struct JobHandle {
    id: String,
    store: Store,
    report: Option<EnqueueReport>,
}

impl JobHandle {
    pub(crate) fn new(id: String, store: Store, report: Option<EnqueueReport>) -> Self {
        Self { id, store, report }
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What enqueueing did (batches and records confirmed, records skipped and why), for a
    /// handle returned by an enqueue.
    pub fn report(&self) -> Option<&EnqueueReport> {
        self.report.as_ref()
    }

    /// For a job enqueued with a unique key: the id of the job that held it, when nothing was
    /// enqueued (this handle is that job's).
    pub fn duplicate(&self) -> Option<&str> {
        self.report.as_ref()?.duplicate_of.as_deref()
    }

    /// The job's state and counters as stored ([`Error::NoSuchJob`] when it is gone,
    /// [`Error::Unreadable`] when its record is not a job's), without folding a summary.
    pub async fn read(&self) -> Result<JobStatus> {
        self.store
            .job_status(&self.id)
            .await?
            .ok_or_else(|| Error::no_such_job(&self.id))
    }

    /// The job's state and counters now, with its summary once it is finished.
    #[tracing::instrument(level = "debug", name = "status", skip_all, fields(job = %self.id))]
    pub async fn status(&self) -> Result<JobStatus> {
        let status = self.read().await?;
        with_summary(&self.store, status).await
    }

    /// Waits until the job finishes (completed, completed with errors, cancelled or
    /// interrupted with everything it published settled) and returns its final status, with
    /// its summary; [`Error::Timeout`] (with the status then) after `timeout`.
    pub async fn wait(&self, timeout: Duration) -> Result<JobStatus> {
        self.wait_with(Some(timeout), |_| {}).await
    }

    /// [`JobHandle::wait`], with no timeout when None, calling `seen` with each status read
    /// (a progress bar).
    #[tracing::instrument(level = "debug", name = "wait", skip_all, fields(job = %self.id))]
    pub async fn wait_with(
        &self,
        timeout: Option<Duration>,
        mut seen: impl FnMut(&JobStatus),
    ) -> Result<JobStatus> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let status = match self.read().await {
                Ok(status) => status,
                // Redis restarting or failing over (Sentinel closes its clients' connections
                // when it promotes a replica): keep waiting, until the deadline.
                Err(Error::Store(e))
                    if e.is_transient()
                        && deadline.is_none_or(|d| tokio::time::Instant::now() < d) =>
                {
                    tracing::warn!("reading job {}: {e}; trying again", self.id);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            seen(&status);
            if status.is_finished() {
                let status = self.folded(status).await?;
                return with_summary(&self.store, status).await;
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Err(Error::Timeout(Box::new(status)));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A completed job whose summary a worker is still folding (a custom task's, which only
    /// the worker can fold): read again for up to 2 s. A cancelled or interrupted job gets
    /// none, so it is not waited for.
    async fn folded(&self, mut status: JobStatus) -> Result<JobStatus> {
        let foldable_here = taskmill_tasks::builtin().get(status.task()).is_some();
        for _ in 0..20 {
            let folds = matches!(
                status.state,
                JobState::Completed | JobState::CompletedWithErrors
            );
            if status.summary.is_some() || foldable_here || !folds || status.batches_done == 0 {
                break;
            }
            tokio::time::sleep(POLL).await;
            status = self.read().await?;
        }
        Ok(status)
    }

    /// Each stored batch result, in batch order, read a page at a time (memory stays flat on
    /// large jobs). Batches not done (dead, or still running) are left out.
    pub fn results(&self) -> impl Stream<Item = Result<(u64, Value)>> + Unpin + '_ {
        struct Page {
            next: u64,
            /// The last batch number + 1, and how many results are stored: paging stops at
            /// either (a total edited by hand cannot make it read empty pages for ever).
            end: Option<(u64, u64)>,
            seen: u64,
            buf: std::vec::IntoIter<(u64, Value)>,
        }
        let start = Page {
            next: 0,
            end: None,
            seen: 0,
            buf: Vec::new().into_iter(),
        };
        Box::pin(futures::stream::try_unfold(
            start,
            move |mut p| async move {
                loop {
                    if let Some(item) = p.buf.next() {
                        return Ok(Some((item, p)));
                    }
                    let (end, stored) = match p.end {
                        Some(end) => end,
                        None => {
                            let s = self.read().await?;
                            let end = s.batches_total.unwrap_or(s.batches_published);
                            let stored = self.store.results_count(&self.id).await?;
                            p.end = Some((end, stored));
                            (end, stored)
                        }
                    };
                    if p.next >= end || p.seen >= stored {
                        return Ok(None);
                    }
                    let to = (p.next + RESULTS_PAGE).min(end);
                    let page = self.store.results_range(&self.id, p.next, to).await?;
                    p.seen += page.len() as u64;
                    p.buf = page.into_iter();
                    p.next = to;
                }
            },
        ))
    }

    /// Cancels the job: batches not started yet are dropped unrun. Says the state it had and
    /// whether it was cancelled now (false: it had finished already, nothing changed).
    #[tracing::instrument(level = "debug", name = "cancel", skip_all, fields(job = %self.id))]
    pub async fn cancel(&self) -> Result<Cancelled> {
        self.store
            .cancel(&self.id)
            .await?
            .ok_or_else(|| Error::no_such_job(&self.id))
    }

    /// Deletes the job's keys and results. A job still pending or running is refused
    /// ([`Error::Invalid`]) unless `cancel_first`; a job whose record cannot be read is
    /// deleted as it is.
    #[tracing::instrument(level = "debug", name = "delete", skip_all, fields(job = %self.id))]
    pub async fn delete(&self, cancel_first: bool) -> Result<()> {
        match self.store.job_status(&self.id).await {
            Ok(Some(s)) if running(&s) => {
                if !cancel_first {
                    return Err(Error::Invalid(format!(
                        "job {} is {}: cancel it first",
                        self.id, s.state
                    )));
                }
                self.store.cancel(&self.id).await?;
            }
            Ok(Some(_)) | Err(StoreError::BadJob(_)) => {}
            Ok(None) => return Err(Error::no_such_job(&self.id)),
            Err(e) => return Err(e.into()),
        }
        if self.store.delete_job(&self.id).await? {
            Ok(())
        } else {
            Err(Error::no_such_job(&self.id))
        }
    }
}

/// Still pending or running: batches may still be published or settle.
pub fn running(s: &JobStatus) -> bool {
    matches!(s.state, JobState::Pending | JobState::Running)
        || (s.state == JobState::Interrupted && s.finished_ms.is_none())
}

/// A finished job's summary: the one a worker folded, or a built-in task's folded here from
/// the stored results (a job finished without one, e.g. by a dead letter). None before the
/// job is finished, or for a custom task no worker folded.
pub async fn summary(store: &Store, status: &JobStatus) -> Result<Option<Value>> {
    if !status.is_finished() {
        return Ok(None);
    }
    if let Some(s) = &status.summary {
        return Ok(Some(s.clone()));
    }
    let Some(task) = taskmill_tasks::builtin().get(status.task()) else {
        return Ok(None);
    };
    let results: Vec<Value> = store
        .results(&status.job)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    Ok(Some(task.aggregate(&results)))
}

async fn with_summary(store: &Store, mut status: JobStatus) -> Result<JobStatus> {
    if status.summary.is_none() {
        status.summary = summary(store, &status).await?;
    }
    Ok(status)
}
