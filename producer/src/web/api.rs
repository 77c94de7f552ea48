//! The dashboard's JSON API: every handler answers JSON; a bad request is `400` with
//! `{"error": "..."}` saying what is wrong, an unknown job `404`, a service that cannot be
//! reached `503`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{rejection::JsonRejection, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};

use taskmill_common::{
    now_ms,
    store::{JobRead, JobStatus, StoreError},
    JobState,
};

use super::AppState;
use std::time::Duration;

use taskmill_client::{
    spec::{parse_duration, parse_rfc3339},
    Error as ClientError, ErrorKind, JobSpec, Rate,
};

use crate::error::CliError;

type Shared = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// An error answer: a status and one sentence.
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn no_job(id: &str) -> Self {
        Self(
            StatusCode::NOT_FOUND,
            format!(
                "no job {:?} in namespace (it never existed, or it expired)",
                taskmill_common::envelope::bounded(id, 200)
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        for cause in e.chain() {
            if let Some(c) = cause.downcast_ref::<ClientError>() {
                return c.into();
            }
            if let Some(c) = cause.downcast_ref::<CliError>() {
                let status = match c {
                    CliError::Usage(_) => StatusCode::BAD_REQUEST,
                    CliError::NoSuchJob(_) => StatusCode::NOT_FOUND,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                return Self(status, c.to_string());
            }
            match cause.downcast_ref::<StoreError>() {
                Some(StoreError::JobExists(_) | StoreError::GroupClosed(_)) => {
                    return Self(StatusCode::CONFLICT, cause.to_string());
                }
                // Not a service that is down: data that is not a job's. 500, never 503.
                Some(StoreError::BadJob(bad)) => {
                    return Self(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{bad} (DELETE /api/jobs/{} removes it)", bad.job),
                    );
                }
                _ => {}
            }
        }
        Self(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
    }
}

impl From<&ClientError> for ApiError {
    fn from(e: &ClientError) -> Self {
        let status = match e.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Exists => StatusCode::CONFLICT,
            ErrorKind::NoSuchJob => StatusCode::NOT_FOUND,
            // Not a service that is down: data that is not a job's. 500, never 503.
            ErrorKind::Unreadable => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        match e {
            ClientError::Unreadable(bad) => Self(
                status,
                format!("{bad} (DELETE /api/jobs/{} removes it)", bad.job),
            ),
            other => Self(status, taskmill_common::error_text(other)),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        (&e).into()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        anyhow::Error::from(e).into()
    }
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Records per second over the job's life so far (or until it finished).
fn rate(s: &JobStatus) -> f64 {
    let Some(start) = s.started_ms else {
        return 0.0;
    };
    let end = s.finished_ms.unwrap_or_else(now_ms);
    let secs = (end.saturating_sub(start) as f64 / 1000.0).max(0.001);
    s.records_done as f64 / secs
}

/// Adds what the pages show beside a job's status: `finished`, `rate` and `age_ms`.
fn with_live_fields(mut v: Value, s: &JobStatus) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("finished".into(), json!(s.is_finished()));
        o.insert("rate".into(), json!(rate(s)));
        o.insert(
            "age_ms".into(),
            json!(now_ms().saturating_sub(s.created_ms)),
        );
    }
    v
}

/// A job as the lists show it; an unreadable one as its id and what is wrong.
fn row(r: &JobRead) -> Value {
    match r {
        Ok(s) => with_live_fields(s.to_json(), s),
        Err(bad) => bad.to_json(),
    }
}

async fn load(state: &AppState, id: &str) -> Result<JobStatus, ApiError> {
    state
        .store
        .job_status(id)
        .await?
        .ok_or_else(|| ApiError::no_job(id))
}

#[derive(Deserialize)]
pub(crate) struct JobsQuery {
    state: Option<String>,
    task: Option<String>,
    q: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// `GET /api/jobs?state=&task=&q=&offset=&limit=`: newest first.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "jobs"))]
pub(crate) async fn jobs(
    State(st): Shared,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    if let Some(s) = query.state.as_deref().filter(|s| !s.is_empty()) {
        s.parse::<JobState>().map_err(|e| {
            let all: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad(format!("{e}; states: {}", all.join(", ")))
        })?;
    }
    let mut ids: Vec<(String, u64)> = st.store.jobs().await?;
    ids.reverse();
    if let Some(q) = query.q.as_deref().filter(|q| !q.is_empty()) {
        ids.retain(|(id, _)| id.contains(q));
    }
    let state_filter = query.state.filter(|s| !s.is_empty());
    let task_filter = query.task.filter(|s| !s.is_empty());
    let (total, page) = if state_filter.is_none() && task_filter.is_none() {
        let total = ids.len();
        let page: Vec<String> = ids
            .into_iter()
            .skip(query.offset)
            .take(limit)
            .map(|(id, _)| id)
            .collect();
        let statuses = st.store.job_statuses(&page).await?;
        (total, statuses.into_iter().flatten().collect::<Vec<_>>())
    } else {
        let all: Vec<String> = ids.into_iter().map(|(id, _)| id).collect();
        // An unreadable job has no state or task to match: it shows only unfiltered.
        let matching: Vec<JobRead> = st
            .store
            .job_statuses(&all)
            .await?
            .into_iter()
            .flatten()
            .filter(|r| {
                r.as_ref().is_ok_and(|s| {
                    state_filter
                        .as_deref()
                        .is_none_or(|f| s.state.as_str() == f)
                        && task_filter.as_deref().is_none_or(|f| s.task == f)
                })
            })
            .collect();
        let total = matching.len();
        (
            total,
            matching
                .into_iter()
                .skip(query.offset)
                .take(limit)
                .collect(),
        )
    };
    ok(json!({
        "total": total,
        "offset": query.offset,
        "limit": limit,
        "jobs": page.iter().map(row).collect::<Vec<_>>(),
    }))
}

/// `GET /api/jobs/{id}`: the status (`producer status --json`), its rate, and its dead
/// batches with their reasons.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "job", id = %id))]
pub(crate) async fn job(State(st): Shared, Path(id): Path<String>) -> ApiResult {
    let s = st.client.job(&id).status().await?;
    let mut v = with_live_fields(s.to_json(), &s);
    let dead: Vec<Value> = st
        .store
        .dead_batches(&id)
        .await?
        .into_iter()
        .map(|(batch, reason)| json!({"batch": batch, "reason": reason}))
        .collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("dead".into(), json!(dead));
    }
    ok(v)
}

#[derive(Deserialize)]
pub(crate) struct Page {
    #[serde(default)]
    offset: u64,
    limit: Option<u64>,
}

/// `GET /api/jobs/{id}/results?offset=&limit=`: stored results of batches
/// `offset..offset+limit`, in batch order.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "results"))]
pub(crate) async fn results(
    State(st): Shared,
    Path(id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(page) = page.map_err(|e| ApiError::bad(e.body_text()))?;
    let s = load(&st, &id).await?;
    let total = s.batches_total.unwrap_or(s.batches_published);
    let limit = page.limit.unwrap_or(50).clamp(1, 1000);
    let to = page.offset.saturating_add(limit).min(total);
    let got = st.store.results_range(&id, page.offset, to).await?;
    ok(json!({
        "total": total,
        "offset": page.offset,
        "limit": limit,
        "results": got.into_iter().map(|(b, r)| json!({"batch": b, "result": r})).collect::<Vec<_>>(),
    }))
}

/// `POST /api/jobs/{id}/cancel`.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "cancel", id = %id))]
pub(crate) async fn cancel(State(st): Shared, Path(id): Path<String>) -> ApiResult {
    let before = st
        .store
        .cancel(&id)
        .await?
        .ok_or_else(|| ApiError::no_job(&id))?;
    ok(json!({"job": id, "was": before.was.as_str(), "cancelled": before.now}))
}

/// `DELETE /api/jobs/{id}`: a finished or cancelled job (409 while it runs), or one whose
/// record cannot be read.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "delete", id = %id))]
pub(crate) async fn delete(State(st): Shared, Path(id): Path<String>) -> ApiResult {
    match st.store.job_status(&id).await {
        Ok(Some(s)) => {
            let running = matches!(s.state, JobState::Pending | JobState::Running)
                || (s.state == JobState::Interrupted && s.finished_ms.is_none());
            if running {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("job {id} is {}: cancel it first", s.state),
                ));
            }
        }
        Ok(None) => return Err(ApiError::no_job(&id)),
        Err(StoreError::BadJob(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let deleted = st.store.delete_job(&id).await?;
    ok(json!({"job": id, "deleted": deleted}))
}

/// `POST /api/jobs/{id}/replay`: the job's dead letters back to their queue.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "replay_job", id = %id))]
pub(crate) async fn replay_job(State(st): Shared, Path(id): Path<String>) -> ApiResult {
    load(&st, &id).await?;
    let r = st.client.replay_dead(Some(&id)).await?;
    ok(json!({"job": id, "replayed": r.replayed, "skipped": r.skipped}))
}

#[derive(Deserialize)]
pub(crate) struct DeadQuery {
    job: Option<String>,
}

/// `GET /api/dead?job=`: the dead letters in the queue now, and their count by job and kind.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "dead"))]
pub(crate) async fn dead(
    State(st): Shared,
    q: Result<Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let job = q.job.filter(|j| !j.is_empty());
    let letters = st.client.dead_letters(job.as_deref()).await?;
    let mut groups: BTreeMap<(String, String), (u64, Option<String>)> = BTreeMap::new();
    for d in &letters {
        let key = (d.job.clone().unwrap_or_default(), d.kind.clone());
        let g = groups.entry(key).or_insert((0, d.task.clone()));
        g.0 += 1;
    }
    ok(json!({
        "total": letters.len(),
        "groups": groups.into_iter().map(|((job, kind), (count, task))| json!({
            "job": job, "kind": kind, "count": count, "task": task,
        })).collect::<Vec<_>>(),
        "letters": letters.iter().take(1000).map(|d| {
            let mut v = d.to_json();
            if let (Some(o), Some(j), Some(b)) = (v.as_object_mut(), &d.job, d.batch) {
                o.insert("id".into(), json!(taskmill_common::envelope::message_id(j, b)));
            }
            v
        }).collect::<Vec<_>>(),
    }))
}

/// `GET /api/dead/{JOB:BATCH}`: one dead letter with headers, params and records.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "dead_letter", id = %id))]
pub(crate) async fn dead_letter(State(st): Shared, Path(id): Path<String>) -> ApiResult {
    match st.client.dead_letter(&id).await? {
        Some(v) => ok(v),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no dead letter {:?} (ids are JOB:BATCH)",
                taskmill_common::envelope::bounded(&id, 200)
            ),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Which {
    job: Option<String>,
    #[serde(default)]
    all: bool,
}

fn which(body: Result<Json<Which>, JsonRejection>) -> Result<Option<String>, ApiError> {
    let Json(w) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    match (w.job.filter(|j| !j.is_empty()), w.all) {
        (Some(job), false) => Ok(Some(job)),
        (None, true) => Ok(None),
        _ => Err(ApiError::bad(
            "say which dead letters: {\"job\": ID} or {\"all\": true}",
        )),
    }
}

/// `POST /api/dead/replay` with `{"job": ID}` or `{"all": true}`.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "replay_dead"))]
pub(crate) async fn replay_dead(
    State(st): Shared,
    body: Result<Json<Which>, JsonRejection>,
) -> ApiResult {
    let job = which(body)?;
    let r = st.client.replay_dead(job.as_deref()).await?;
    ok(json!({"replayed": r.replayed, "skipped": r.skipped}))
}

/// `POST /api/dead/purge` with `{"job": ID}` or `{"all": true}`.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "purge_dead"))]
pub(crate) async fn purge_dead(
    State(st): Shared,
    body: Result<Json<Which>, JsonRejection>,
) -> ApiResult {
    let job = which(body)?;
    let purged = st.client.purge_dead(job.as_deref()).await?;
    ok(json!({"purged": purged}))
}

/// `GET /api/queues`: each queue now, and the samples of the last hour.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "queues"))]
pub(crate) async fn queues(State(st): Shared) -> ApiResult {
    let queues = crate::mgmt::queues(&st.conn.rabbitmq_api_url, &st.conn.namespace).await?;
    let history = st.store.samples(&st.store.keys().queue_history()).await?;
    ok(json!({
        "queues": queues,
        "history": history,
        "sample_seconds": st.sample_every.as_secs(),
    }))
}

/// `GET /api/schedules`: the namespace's periodic schedules (as `producer schedule list
/// --json` prints them).
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "schedules"))]
pub(crate) async fn schedules(State(st): Shared) -> ApiResult {
    let mut all = Vec::new();
    for name in st.store.schedule_names().await? {
        if let Some(v) = crate::schedules::view(&st.store, &name).await? {
            all.push(v);
        }
    }
    Ok(Json(json!({ "schedules": all })).into_response())
}

fn no_schedule(name: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no schedule {:?} in namespace",
            taskmill_common::envelope::bounded(name, 200)
        ),
    )
}

/// `POST /api/schedules` `{"name", "every" | "cron", "missed"?, "enqueue": [options]}`: adds a
/// schedule, checked like `producer schedule add` (400 saying why, 409 when the name is
/// taken); 201 with the schedule.
#[tracing::instrument(
    level = "debug",
    name = "api",
    skip_all,
    fields(route = "add_schedule")
)]
pub(crate) async fn add_schedule(
    State(st): Shared,
    body: Result<Json<crate::schedules::NewSchedule>, JsonRejection>,
) -> ApiResult {
    use crate::schedules::Added;
    let Json(new) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    match crate::schedules::add(&st.store, &new).await? {
        Added::Yes(..) => {
            let view = crate::schedules::view(&st.store, &new.name).await?;
            Ok((StatusCode::CREATED, Json(json!({ "schedule": view }))).into_response())
        }
        Added::Invalid(why) => Err(ApiError::bad(why)),
        Added::Exists => Err(ApiError(
            StatusCode::CONFLICT,
            format!("schedule {:?} exists", new.name),
        )),
    }
}

/// `DELETE /api/schedules/{name}`: removes it (its jobs stay).
#[tracing::instrument(
    level = "debug",
    name = "api",
    skip_all,
    fields(route = "remove_schedule")
)]
pub(crate) async fn remove_schedule(State(st): Shared, Path(name): Path<String>) -> ApiResult {
    if !st.store.remove_schedule(&name).await? {
        return Err(no_schedule(&name));
    }
    ok(json!({ "removed": name }))
}

/// `POST /api/schedules/{name}/pause` and `/resume`.
#[tracing::instrument(
    level = "debug",
    name = "api",
    skip_all,
    fields(route = "pause_schedule")
)]
pub(crate) async fn pause_schedule(
    State(st): Shared,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult {
    use crate::schedules::Paused;
    let pause = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return Err(ApiError(StatusCode::NOT_FOUND, "pause or resume".into())),
    };
    match crate::schedules::set_paused(&st.store, &name, pause).await? {
        Paused::Done => {
            let view = crate::schedules::view(&st.store, &name).await?;
            ok(json!({ "schedule": view }))
        }
        Paused::NoSuch => Err(no_schedule(&name)),
        Paused::Unreadable(why) => Err(ApiError::bad(why)),
    }
}

/// `GET /api/workers`: every worker that beat in the last hour; `alive` when its last
/// heartbeat is recent (three periods) and it did not say it stopped.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "workers"))]
pub(crate) async fn workers(State(st): Shared) -> ApiResult {
    let now = now_ms();
    let list: Vec<Value> = st
        .store
        .workers()
        .await?
        .into_iter()
        .map(|mut w| {
            let seen = w["last_seen_ms"].as_u64().unwrap_or(0);
            let stopped = w["stopped_ms"].as_u64().is_some();
            let alive = taskmill_common::store::heartbeat_alive(&w, now);
            if let Some(o) = w.as_object_mut() {
                o.insert("alive".into(), json!(alive));
                o.insert("seen_ago_ms".into(), json!(now.saturating_sub(seen)));
                o.insert(
                    "gone_because".into(),
                    match (alive, stopped) {
                        (true, _) => Value::Null,
                        (false, true) => json!("stopped"),
                        (false, false) => json!("no heartbeat"),
                    },
                );
            }
            w
        })
        .collect();
    ok(json!({"workers": list}))
}

/// `GET /api/tasks`: the task catalog.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "tasks"))]
pub(crate) async fn tasks(State(st): Shared) -> ApiResult {
    ok(json!({"tasks": st.store.catalog().await?}))
}

/// The body of `POST /api/jobs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewJob {
    task: String,
    #[serde(default)]
    params: BTreeMap<String, Value>,
    batch_size: Option<usize>,
    /// Checked to be an array and counted here; the records themselves are read in a second
    /// pass over the body, streaming, once the job is accepted (see [`enqueue`]).
    records: RecordCount,
    queue: Option<String>,
    job: Option<String>,
    priority: Option<u8>,
    /// Spread the queue over at least this many shards (`enqueue --shards`).
    shards: Option<u16>,
    unique_key: Option<String>,
    /// `30s`, `5m`, ... (or a number of seconds): no batch starts before then.
    countdown: Option<String>,
    /// An RFC 3339 time: no batch starts before it.
    eta: Option<String>,
    /// A duration: batches not started within it are dropped.
    expires: Option<String>,
    /// A duration: the longest one batch may run.
    time_limit: Option<String>,
    /// `100/s`, `30/m`, `500/h`.
    rate_limit: Option<String>,
    /// The key the rate limit is shared under.
    rate_key: Option<String>,
    /// Check the task and parameters against the catalog (default true).
    check: Option<bool>,
    /// Follow-up jobs (`enqueue --then`), in order.
    #[serde(default)]
    then: Vec<NewStep>,
    /// The group the job belongs to (`enqueue --group`).
    group: Option<String>,
    /// Where the final status is POSTed when the job ends (`enqueue --on-complete`).
    on_complete: Option<String>,
}

/// A follow-up step of `POST /api/jobs`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewStep {
    task: String,
    #[serde(default)]
    params: BTreeMap<String, Value>,
    batch_size: Option<usize>,
    /// `complete` (default) or `success`.
    on: Option<String>,
}

/// The follow-up steps of a body's `then`, or a 400 naming the field.
fn steps_of(then: &[NewStep]) -> Result<Vec<taskmill_client::Step>, ApiError> {
    then.iter()
        .enumerate()
        .map(|(i, step)| {
            let on = match &step.on {
                None => taskmill_client::Trigger::Complete,
                Some(on) => on
                    .parse()
                    .map_err(|e: String| ApiError::bad(format!("then[{i}].on: {e}")))?,
            };
            Ok(taskmill_client::Step {
                task: step.task.clone(),
                params: param_texts(&format!("then[{i}].params"), &step.params)?,
                batch_size: step.batch_size.unwrap_or(10),
                on,
            })
        })
        .collect()
}

/// `GET /api/groups/{g}`: the group's jobs counted by state, each one's status, and its
/// close and chord follow-up (as `producer status --group G --json`).
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "group"))]
pub(crate) async fn group(State(st): Shared, Path(g): Path<String>) -> ApiResult {
    let view = crate::cmd::group::GroupView::read(&st.client, &g)
        .await?
        .ok_or_else(|| crate::cmd::group::no_group(&g))?;
    ok(view.to_json())
}

/// The body of `POST /api/groups/{g}/close`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct CloseGroup {
    /// The chord follow-up and the steps after it, as `then` of `POST /api/jobs`.
    #[serde(default)]
    then: Vec<NewStep>,
    /// Check the steps against the catalog (default true).
    check: Option<bool>,
}

/// `POST /api/groups/{g}/close` `{"then": [steps]}` (body optional): closes the group (as
/// `producer group close`); 200 with `then_job_id`, 404 when it has no job, 409 when it was
/// closed already with another follow-up.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "close_group"))]
pub(crate) async fn close_group(
    State(st): Shared,
    Path(g): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let new: CloseGroup = if body.iter().all(u8::is_ascii_whitespace) {
        CloseGroup::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("the request body is not a close: {e}")))?
    };
    let steps = steps_of(&new.then)?;
    let (closed, chord) = st
        .client
        .close_group(&g, steps, new.check.unwrap_or(true))
        .await?;
    if closed == taskmill_common::store::chains::Closed::Conflict {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("group {g} is closed already, with another follow-up"),
        ));
    }
    ok(json!({
        "group": g,
        "closed": true,
        "already": closed != taskmill_common::store::chains::Closed::Now,
        "then_job_id": chord,
    }))
}

/// Parameters as text (strings, numbers, booleans), or a 400 naming the field.
fn param_texts(
    field: &str,
    params: &BTreeMap<String, Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    params
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            Value::Number(_) | Value::Bool(_) => Ok((k.clone(), v.to_string())),
            _ => Err(ApiError::bad(format!(
                "{field}.{k}: a string, number or boolean, not {v}"
            ))),
        })
        .collect()
}

/// How many records a body's `records` array holds (each skipped unparsed).
struct RecordCount(u64);

impl<'de> Deserialize<'de> for RecordCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = RecordCount;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of records")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RecordCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(RecordCount(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// Streams the `records` array of a job's body into chunks of records (other fields are
/// skipped: the first pass read them).
struct RecordsOf<'a> {
    tx: &'a tokio::sync::mpsc::Sender<Vec<taskmill_common::envelope::Record>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for RecordsOf<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RecordsOf<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a job")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "records" {
                map.next_value_seed(RecordChunks { tx: self.tx })?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The records of the array, a chunk at a time into the channel.
struct RecordChunks<'a> {
    tx: &'a tokio::sync::mpsc::Sender<Vec<taskmill_common::envelope::Record>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for RecordChunks<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RecordChunks<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        const CHUNK: usize = 256;
        let mut chunk = Vec::with_capacity(CHUNK);
        while let Some(v) = seq.next_element::<Value>()? {
            chunk.push(taskmill_common::envelope::Record::from_value(&v));
            if chunk.len() == CHUNK
                && self
                    .tx
                    .blocking_send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))
                    .is_err()
            {
                return Err(A::Error::custom("the enqueue stopped"));
            }
        }
        if !chunk.is_empty() {
            let _ = self.tx.blocking_send(chunk);
        }
        Ok(())
    }
}

/// A field's duration (`30s`, `5m`, a number of seconds), or a 400 naming the field.
fn duration_of(field: &str, raw: &Option<String>) -> Result<Option<Duration>, ApiError> {
    raw.as_deref()
        .map(|r| {
            parse_duration(r)
                .map(Duration::from_millis)
                .map_err(|e| ApiError::bad(format!("{field}: {e}")))
        })
        .transpose()
}

/// `POST /api/jobs`: enqueues the records; `201 {"job": ID, ...}` once every batch is
/// confirmed by the broker.
#[tracing::instrument(level = "debug", name = "api", skip_all, fields(route = "enqueue"))]
pub(crate) async fn enqueue(State(st): Shared, body: axum::body::Bytes) -> ApiResult {
    // First pass, off tokio's threads: every field but the records, which are only checked
    // (an array) and counted; nothing is held per record.
    let head = body.clone();
    let new = tokio::task::spawn_blocking(move || serde_json::from_slice::<NewJob>(&head))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::bad(format!("the request body is not a job: {e}")))?;
    let mut job = JobSpec::new(&new.task);
    job.params = param_texts("params", &new.params)?;
    for step in steps_of(&new.then)? {
        job = job.then(step);
    }
    if let Some(n) = new.batch_size {
        job = job.batch_size(n);
    }
    if let Some(q) = &new.queue {
        job = job.queue(q);
    }
    if let Some(id) = &new.job {
        job = job.id(id);
    }
    if let Some(p) = new.priority {
        job = job.priority(p);
    }
    job.shards = new.shards;
    if let Some(k) = &new.unique_key {
        job = job.unique_key(k);
    }
    job.group = new.group.clone();
    job.on_complete = new.on_complete.clone();
    if new.countdown.is_some() && new.eta.is_some() {
        return Err(ApiError::bad("countdown and eta: give one of them"));
    }
    if let Some(d) = duration_of("countdown", &new.countdown)? {
        job = job.countdown(d);
    }
    if let Some(t) = &new.eta {
        job = job.eta_ms(parse_rfc3339(t).map_err(|e| ApiError::bad(format!("eta: {e}")))?);
    }
    if let Some(d) = duration_of("expires", &new.expires)? {
        job = job.expires(d);
    }
    if let Some(d) = duration_of("time_limit", &new.time_limit)? {
        job = job.time_limit(d);
    }
    if let Some(r) = &new.rate_limit {
        let rate: Rate = r
            .parse()
            .map_err(|e: String| ApiError::bad(format!("rate_limit: {e}")))?;
        job = job.rate_limit(rate);
    }
    if let Some(k) = &new.rate_key {
        job = job.rate_key(k);
    }
    if new.check == Some(false) {
        job = job.no_check();
    }
    if new.records.0 == 0 {
        return Err(ApiError::bad(
            "records: nothing to enqueue (an empty array)",
        ));
    }
    // Second pass, once the spec, the services and the catalog accepted the job: the records
    // stream from the body into batches, a chunk at a time.
    let hooks = taskmill_client::Hooks {
        problems: taskmill_client::ProblemLog::default(),
        on_registered: |_: &str| {},
        stop: tokio_util::sync::CancellationToken::new(),
    };
    let start = move || {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            let mut de = serde_json::Deserializer::from_slice(&body);
            // The first pass read this body whole: nothing can fail here but the receiver.
            let _ = serde::de::DeserializeSeed::deserialize(RecordsOf { tx: &tx }, &mut de);
        });
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    };
    let report = st.client.enqueue_chunks(&job, start, hooks).await?;
    let body = json!({
        "job": report.job,
        "batches": report.batches,
        "records": report.records,
        "records_invalid": report.problems.records_invalid,
        "problems": report.problems.samples,
        "duplicate_of": report.duplicate_of,
    });
    let status = if report.duplicate_of.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(body)).into_response())
}

/// Anything else under `/api/`.
pub(crate) async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such API path; see the README's dashboard section".into(),
    )
}
