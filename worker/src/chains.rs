//! Publishing follow-up jobs (`enqueue --then`): every worker looks at the namespace's outbox
//! (see `taskmill_store::chains`) twice a second; for each finished job there it claims the
//! entry, decides whether the next step runs (its trigger against the job's final state),
//! enqueues it over the job's batch results (one record a result, in batch order) with the
//! chain's derived id, and settles the entry. A refused registration (the id exists: an
//! earlier worker published it and died before settling) counts as published.

use futures::StreamExt as _;
use taskmill_client::{Client, Error, JobSpec, JobState};
use taskmill_common::store::{chains::Chain, chains::Trigger, Store};
use tracing::{info, warn};

/// How long a claim on an outbox entry lasts: a worker that dies holding it delays the
/// follow-up this long at most.
const CLAIM_MS: u64 = 60_000;

/// Entries looked at per sweep.
const PER_SWEEP: usize = 16;

/// What the outbox publishes with: the client (for follow-up jobs, made on first use) and a
/// channel for the next calls of Celery chains.
#[derive(Default)]
pub(crate) struct Outlets {
    client: tokio::sync::Mutex<Option<Client>>,
    celery: crate::celery::NextCalls,
}

/// One sweep of the outbox.
pub(crate) async fn sweep(
    store: Store,
    outlets: &Outlets,
    settings: &taskmill_client::Settings,
    who: &str,
) {
    let Ok(due) = store.outbox(PER_SWEEP).await else {
        return;
    };
    if due.is_empty() {
        return;
    }
    let mut guard = outlets.client.lock().await;
    if guard.is_none() {
        match Client::connect(settings.clone()).await {
            Ok(c) => *guard = Some(c),
            Err(e) => {
                warn!("follow-up jobs: cannot connect: {e}");
                return;
            }
        }
    }
    let Some(client) = guard.as_ref() else {
        return;
    };
    for job in due {
        match store.claim_outbox(&job, who, CLAIM_MS).await {
            Ok(true) => {}
            _ => continue,
        }
        let span = tracing::info_span!("follow-up", parent = %job);
        let _enter = span.enter();
        let fired = match store.celery_settings(&job).await {
            Ok(Some(c)) if !c.chain.is_empty() => {
                fire_celery(&outlets.celery, &settings.amqp_url, &store, &job, &c).await
            }
            _ => match job.strip_prefix("group:") {
                Some(group) => fire_chord(client, &store, group).await,
                None => fire(client, &store, &job).await,
            },
        };
        match fired {
            Ok((child, note)) => {
                info!(child = child.as_deref().unwrap_or("-"), "{note}");
                if let Err(e) = store.settle_outbox(&job, child.as_deref(), &note).await {
                    warn!("settling the follow-up of {job}: {e}");
                }
            }
            Err(e) => {
                warn!("publishing the follow-up of {job}: {e}; trying again");
                let _ = store.release_outbox(&job).await;
            }
        }
    }
}

/// Publishes the next call of the Celery chain of `job` (which succeeded: only then is it in
/// the outbox) over its result.
async fn fire_celery(
    next: &crate::celery::NextCalls,
    amqp_url: &str,
    store: &Store,
    job: &str,
    c: &taskmill_common::store::celery::CelerySettings,
) -> Result<(Option<String>, String), Error> {
    let retval = store
        .results(job)
        .await?
        .into_iter()
        .next()
        .map_or(serde_json::Value::Null, |(_, v)| v);
    match next.publish(amqp_url, job, c, retval).await {
        Ok((id, task)) => Ok((
            Some(id),
            format!("published the chain's next Celery call, {task}"),
        )),
        Err(e) => Err(Error::Broker(taskmill_common::error_text(&*e))),
    }
}

/// Whether a step with trigger `on` runs after a job that ended `state`: `complete` after
/// every batch settled (completed, with errors, stalled), `success` only after completed.
fn runs(on: Trigger, state: JobState) -> bool {
    match on {
        Trigger::Complete => matches!(
            state,
            JobState::Completed | JobState::CompletedWithErrors | JobState::Stalled
        ),
        Trigger::Success => state == JobState::Completed,
    }
}

/// Publishes `job`'s next step if it runs: the child's id (when one was published) and a note
/// for the parent. Err: try again later (a passing error).
async fn fire(
    client: &Client,
    store: &Store,
    job: &str,
) -> Result<(Option<String>, String), Error> {
    let Some(status) = store.job_status(job).await? else {
        return Ok((
            None,
            "not enqueued: the job is gone (expired or deleted)".into(),
        ));
    };
    let Some(chain) = status
        .then
        .as_ref()
        .and_then(|v| serde_json::from_value::<Chain>(v.clone()).ok())
    else {
        return Ok((
            None,
            "not enqueued: the job's follow-up steps cannot be read".into(),
        ));
    };
    let Some(step) = chain.steps.first() else {
        return Ok((None, "no follow-up step".into()));
    };
    let state = status.state;
    if !runs(step.on, state) {
        return Ok((
            None,
            format!(
                "skipped: the job ended {state} and {} runs on {}",
                step.task,
                step.on.as_str()
            ),
        ));
    }
    let child = chain.next_id();
    let mut spec = JobSpec::new(&step.task)
        .batch_size(step.batch_size)
        .queue(&status.queue)
        .id(&child);
    spec.params = step.params.clone();
    spec.then = chain.rest();
    spec.parent = Some(job.to_string());
    spec.parent_outcome = Some(serde_json::json!({
        "state": state.as_str(),
        "batches_total": status.batches_total,
        "batches_done": status.batches_done,
        "batches_dead": status.batches_dead,
        "records_done": status.records_done,
        "records_invalid": status.records_invalid,
    }));
    // The follow-up's records are the job's batch results, in batch order.
    let handle = client.job(job);
    let results = handle
        .results()
        .filter_map(|r| futures::future::ready(r.ok().map(|(_, v)| v)));
    let published = format!("published {}", step.task);
    publish(client, &spec, results, published).await
}

/// Enqueues follow-up `spec` over `results`: its id and `published` as the parent's note; a
/// registration refused because the id exists counts as published (a worker that published
/// it died before settling), a refused job is settled with why. Err: try again later.
async fn publish(
    client: &Client,
    spec: &JobSpec,
    results: impl futures::Stream<Item = serde_json::Value>,
    published: String,
) -> Result<(Option<String>, String), Error> {
    match client.enqueue_stream(spec, results).await {
        Ok(h) => Ok((Some(h.id().to_string()), published)),
        Err(Error::JobExists(_)) => Ok((
            spec.id.clone(),
            format!("published {} (found registered already)", spec.task),
        )),
        Err(Error::Invalid(why)) => Ok((None, format!("not enqueued: {why}"))),
        Err(e) => Err(e),
    }
}

/// Publishes the chord follow-up of closed group `group` (every job in it has ended) if its
/// trigger says it runs: one job over the results of every job of the group (jobs in id order,
/// each one's results in batch order), with the id the close gave it.
async fn fire_chord(
    client: &Client,
    store: &Store,
    group: &str,
) -> Result<(Option<String>, String), Error> {
    let info = store.group_info(group).await?;
    let Some(chain) = info.then else {
        return Ok((
            None,
            "not enqueued: the group's follow-up steps cannot be read".into(),
        ));
    };
    let Some(step) = chain.steps.first() else {
        return Ok((None, "no follow-up step".into()));
    };
    let ids = store.group_jobs(group).await?;
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let mut blocker = None;
    let mut queue = None;
    for id in &ids {
        let Some(status) = store.job_status(id).await? else {
            return Ok((
                None,
                format!("not enqueued: job {id} of the group is gone (expired)"),
            ));
        };
        queue.get_or_insert(status.queue);
        let state = status.state;
        *counts.entry(state.as_str()).or_default() += 1;
        if !runs(step.on, state) && blocker.is_none() {
            blocker = Some(format!(
                "skipped: job {id} ended {state} and {} runs on {}",
                step.task,
                step.on.as_str()
            ));
        }
    }
    if let Some(note) = blocker {
        return Ok((None, note));
    }
    let all_completed = counts.keys().all(|s| *s == JobState::Completed.as_str());
    // On the queue of the group's first job.
    let mut spec = JobSpec::new(&step.task)
        .batch_size(step.batch_size)
        .id(&chain.root);
    if let Some(queue) = &queue {
        spec = spec.queue(queue);
    }
    spec.params = step.params.clone();
    spec.then = (chain.steps.len() > 1).then(|| Chain {
        root: chain.root.clone(),
        next: chain.next,
        steps: chain.steps[1..].to_vec(),
    });
    spec.parent = Some(taskmill_common::store::chains::group_entry(group));
    spec.parent_outcome = Some(serde_json::json!({
        "state": if all_completed { "completed" } else { "completed_with_errors" },
        "jobs": ids.len(),
        "counts": counts,
    }));
    // The follow-up's records: every job's batch results, jobs in id order.
    let handles: Vec<_> = ids.iter().map(|id| client.job(id)).collect();
    let results = futures::stream::iter(handles.iter())
        .flat_map(|h| h.results())
        .filter_map(|r| futures::future::ready(r.ok().map(|(_, v)| v)));
    let published = format!(
        "published {} over {} job{}",
        step.task,
        ids.len(),
        if ids.len() == 1 { "" } else { "s" }
    );
    publish(client, &spec, results, published).await
}
