//! The README's own-task example (`examples/custom-worker`) runs as a worker of its own and
//! serves its task through the stock producer.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use taskmill_common::JobState;
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{bin_path, sample, sigterm, until, write_jsonl, TestNs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_worker_serves_its_own_task() {
    let t = TestNs::new();
    let mut worker = Command::new(bin_path("custom-worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("TASKMILL_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let posts: Vec<serde_json::Value> = sample::posts(50).collect();
    let words: u64 = posts
        .iter()
        .map(|p| p["body"].as_str().unwrap().split_whitespace().count() as u64)
        .sum();
    let file = write_jsonl(posts);
    let mut args = EnqueueArgs::new("word-count");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let store = t.store().await;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.records_done, 50);
    let counted: u64 = store
        .results(&job)
        .await
        .unwrap()
        .iter()
        .map(|(_, r)| r["words"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, words);
    // The summary comes from the worker (the stock producer cannot run word-count) and shows
    // in `status`.
    taskmill_tests::until("the summary", Duration::from_secs(30), || async {
        store
            .job_status(&job)
            .await
            .unwrap()
            .unwrap()
            .summary
            .is_some()
    })
    .await;
    let out = taskmill_tests::producer(&t.ns, &["status", &job, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["summary"]["words"], words);
    assert_eq!(status["summary"]["records"], 50);
    // It still serves the built-in tasks.
    let mut builtin = EnqueueArgs::new("post-stats");
    builtin.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &builtin, |_| {}).await.unwrap().job;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert!(sigterm(worker.id()));
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A task whose `aggregate` panics.
struct BadSummary;

impl taskmill_common::task::Task for BadSummary {
    fn name(&self) -> &'static str {
        "bad-summary"
    }
    fn run(
        &self,
        _ctx: &taskmill_common::task::TaskContext<'_>,
        records: &[serde_json::Value],
    ) -> Result<taskmill_common::task::TaskOutput, taskmill_common::task::TaskError> {
        Ok(taskmill_common::task::TaskOutput {
            result: serde_json::json!({"n": records.len()}),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }
    fn aggregate(&self, _results: &[serde_json::Value]) -> serde_json::Value {
        panic!("the sums do not add up");
    }
}

/// A panic in a task's `aggregate` is said in the job's problems ("summary failed: ..."),
/// which `status` shows, instead of a silent `summary: null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summary_that_panics_is_said_in_the_job() {
    let t = TestNs::new();
    let mut registry = taskmill_common::tasks::builtin();
    registry.register(BadSummary);
    let w = t.spawn_worker_with(t.worker_args(), registry);
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("bad-summary");
    args.files = vec![file.clone()];
    args.no_check = true;
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let store = t.store().await;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.batches_done, 3);
    taskmill_tests::until(
        "the summary failure in the job",
        Duration::from_secs(30),
        || async {
            let s = store.job_status(&job).await.unwrap().unwrap();
            s.problems().iter().any(|p| {
                p.contains("summary failed: the task's aggregate panicked: the sums do not add up")
            })
        },
    )
    .await;
    let out = taskmill_tests::producer(&t.ns, &["status", &job]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("summary failed"));
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A task whose result is 5 KB a batch.
struct BigResult;

impl taskmill_common::task::Task for BigResult {
    fn name(&self) -> &'static str {
        "big-result"
    }
    fn run(
        &self,
        _ctx: &taskmill_common::task::TaskContext<'_>,
        records: &[serde_json::Value],
    ) -> Result<taskmill_common::task::TaskOutput, taskmill_common::task::TaskError> {
        Ok(taskmill_common::task::TaskOutput {
            result: serde_json::json!({"blob": "x".repeat(5000)}),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }
    fn aggregate(&self, _results: &[serde_json::Value]) -> serde_json::Value {
        serde_json::json!({})
    }
}

/// A result over the worker's `--max-result-bytes` is not stored: the batch is dead-lettered
/// `result_too_large`, saying how large it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_limit_is_dead_lettered_not_stored() {
    let t = TestNs::new();
    let mut registry = taskmill_common::tasks::builtin();
    registry.register(BigResult);
    let mut wargs = t.worker_args();
    wargs.max_result_bytes = 1000;
    let w = t.spawn_worker_with(wargs, registry);
    let file = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("big-result");
    args.files = vec![file.clone()];
    args.no_check = true;
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let store = t.store().await;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed_with_errors");
    assert_eq!((s.batches_done, s.batches_dead), (0, 2));
    assert!(store.results(&job).await.unwrap().is_empty());
    let dead = store.dead_batches(&job).await.unwrap();
    assert_eq!(dead[0].1["kind"], "result_too_large", "{:?}", dead[0].1);
    assert!(dead[0].1["error"]
        .as_str()
        .unwrap()
        .contains("over this worker's limit of 1000"));
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A task whose result nests arrays `depth` deep (param), and whose summary one level more.
struct DeepResult;

fn nested(depth: usize) -> serde_json::Value {
    let mut v = serde_json::json!(1);
    for _ in 0..depth {
        v = serde_json::Value::Array(vec![v]);
    }
    v
}

impl taskmill_common::task::Task for DeepResult {
    fn name(&self) -> &'static str {
        "deep-result"
    }
    fn run(
        &self,
        ctx: &taskmill_common::task::TaskContext<'_>,
        records: &[serde_json::Value],
    ) -> Result<taskmill_common::task::TaskOutput, taskmill_common::task::TaskError> {
        let depth: usize = ctx.param("depth", 1)?;
        Ok(taskmill_common::task::TaskOutput {
            result: nested(depth),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }
    fn params(&self) -> Vec<taskmill_common::task::ParamSpec> {
        use taskmill_common::task::{ParamKind, ParamSpec};
        vec![ParamSpec::new("depth", ParamKind::Int, "1", "levels of nesting").at_least(0.0)]
    }
    fn aggregate(&self, results: &[serde_json::Value]) -> serde_json::Value {
        // One level deeper than the results.
        serde_json::Value::Array(results.first().cloned().into_iter().collect())
    }
}

/// What is stored is what is read back: a result or summary nested as deep as JSON readers
/// parse is stored and read back equal; a result nested deeper (5,000 levels) is dead-lettered
/// as a task error saying so, never stored to read back as a string, and a summary nested
/// deeper is a summary failure in the job's problems, never a silent `summary: null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_deep_to_read_back_is_refused_and_one_at_the_limit_reads_back() {
    use taskmill_common::task::MAX_JSON_DEPTH;
    let t = TestNs::new();
    let mut registry = taskmill_common::tasks::builtin();
    registry.register(DeepResult);
    let w = t.spawn_worker_with(t.worker_args(), registry);
    let file = write_jsonl(sample::posts(4));
    let store = t.store().await;
    let run = |depth: usize| {
        let mut args = EnqueueArgs::new("deep-result");
        args.files = vec![file.clone()];
        args.batch_size = 2;
        args.no_check = true;
        args.params = vec![format!("depth={depth}")];
        args
    };
    let at_limit = enqueue(&t.conn(), &run(MAX_JSON_DEPTH - 1), |_| {})
        .await
        .unwrap()
        .job;
    let s = t
        .wait_finished(&store, &at_limit, Duration::from_secs(60))
        .await;
    assert_eq!(
        (s.state(), s.batches_done),
        (JobState::Completed, 2),
        "{s:?} {:?}",
        store.dead_batches(&at_limit).await.unwrap()
    );
    let results = store.results(&at_limit).await.unwrap();
    assert!(
        results
            .iter()
            .all(|(_, r)| *r == nested(MAX_JSON_DEPTH - 1)),
        "{results:?}"
    );
    until("the summary", Duration::from_secs(30), || async {
        store
            .job_status(&at_limit)
            .await
            .unwrap()
            .is_some_and(|s| s.summary == Some(nested(MAX_JSON_DEPTH)))
    })
    .await;
    // Results at the limit read back; their summary, one level deeper, is said to fail.
    let summary_over = enqueue(&t.conn(), &run(MAX_JSON_DEPTH), |_| {})
        .await
        .unwrap()
        .job;
    let s = t
        .wait_finished(&store, &summary_over, Duration::from_secs(60))
        .await;
    assert_eq!((s.state(), s.batches_done), (JobState::Completed, 2));
    let results = store.results(&summary_over).await.unwrap();
    assert!(results.iter().all(|(_, r)| *r == nested(MAX_JSON_DEPTH)));
    until("the summary failure", Duration::from_secs(30), || async {
        store
            .job_status(&summary_over)
            .await
            .unwrap()
            .is_some_and(|s| {
                s.problems.iter().any(|p| {
                    p.starts_with("summary failed: the task's aggregate returned a summary nested more than 127")
                })
            })
    })
    .await;
    let deep = enqueue(&t.conn(), &run(5000), |_| {}).await.unwrap().job;
    let s = t
        .wait_finished(&store, &deep, Duration::from_secs(60))
        .await;
    assert_eq!((s.batches_done, s.batches_dead), (0, 2), "{s:?}");
    assert!(store.results(&deep).await.unwrap().is_empty());
    let dead = store.dead_batches(&deep).await.unwrap();
    assert_eq!(dead[0].1["kind"], "permanent", "{:?}", dead[0].1);
    assert!(
        dead[0].1["error"]
            .as_str()
            .unwrap()
            .contains("nested more than 127 levels deep"),
        "{:?}",
        dead[0].1
    );
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
