//! Dead-letter tooling: list, show, replay after the cause is removed, purge.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use taskmill_common::task::{Task, TaskContext, TaskError, TaskOutput};
use taskmill_producer::cmd::{
    dlq,
    enqueue::{enqueue, EnqueueArgs},
};
use taskmill_tests::{sample, write_jsonl, TestNs};

/// A task that the first workers do not know: deploying it is "removing the cause".
struct LateTask;

impl Task for LateTask {
    fn name(&self) -> &'static str {
        "late-task"
    }
    fn run(&self, _: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        Ok(TaskOutput {
            result: json!({"records": records.len()}),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }
    fn aggregate(&self, results: &[Value]) -> Value {
        json!({"batches": results.len()})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_cause_is_removed_completes_the_job() {
    let t = TestNs::new();
    let store = t.store().await;
    let old = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("late-task");
    args.files = vec![file.clone()];
    // The workers alive do not know it yet: enqueue it anyway (the check would refuse it).
    args.no_check = true;
    let late = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    let status = t
        .wait_finished(&store, &late.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.state(), "completed_with_errors");
    assert_eq!(status.batches_dead, 3);

    // A second job with dead letters, to check that --job selects.
    let mut other = EnqueueArgs::new("chaos");
    other.files = vec![file.clone()];
    other.params = vec!["fail_rate=1".into(), "fail=permanent".into()];
    let other = enqueue(&t.conn(), &other, |_| {}).await.unwrap();
    t.wait_finished(&store, &other.job, Duration::from_secs(60))
        .await;

    let listed = dlq::list(&t.conn(), Some(&late.job)).await.unwrap();
    assert_eq!(listed.len(), 3);
    for d in &listed {
        assert_eq!(d.kind, "unknown_task");
        assert_eq!(d.task.as_deref(), Some("late-task"));
        assert!(d.error.contains("unknown task"), "{}", d.error);
        assert_eq!(d.attempts, 1);
    }
    // Listing changes nothing.
    assert_eq!(dlq::list(&t.conn(), None).await.unwrap().len(), 6);

    // Deploy workers that know the task, then replay that job's dead letters.
    old.stop().await.unwrap();
    let mut registry = taskmill_common::tasks::builtin();
    registry.register(LateTask);
    let new = t.spawn_worker_with(t.worker_args(), registry);
    assert_eq!(
        dlq::replay(&t.conn(), Some(&late.job))
            .await
            .unwrap()
            .replayed,
        3
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = store.job_status(&late.job).await.unwrap().unwrap();
        if s.state() == "completed" {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:?}", s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.batches_done, 3);
    assert_eq!(status.batches_dead, 0);
    assert_eq!(status.records_done, 30);

    // The other job's dead letters are still there; purge them.
    let left = dlq::list(&t.conn(), None).await.unwrap();
    assert_eq!(left.len(), 3);
    assert!(left
        .iter()
        .all(|d| d.job.as_deref() == Some(other.job.as_str())));
    assert_eq!(dlq::purge(&t.conn(), Some("no-such-job")).await.unwrap(), 0);
    assert_eq!(dlq::purge(&t.conn(), Some(&other.job)).await.unwrap(), 3);
    assert!(dlq::list(&t.conn(), None).await.unwrap().is_empty());

    new.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
