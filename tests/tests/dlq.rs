//! Dead-letter tooling: list, show, replay after the cause is removed, purge.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use taskmill_common::task::{Task, TaskContext, TaskError, TaskOutput};
use taskmill_producer::cmd::{
    dlq,
    enqueue::{enqueue, EnqueueArgs},
};
use taskmill_tests::{sample, write_jsonl, CountingTask, TestNs};

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
    // Dead letters live in the broker: listing them needs no Redis (one that is down).
    let mut no_redis = t.conn();
    no_redis.redis_url = "redis://127.0.0.1:1/0".into();
    assert_eq!(dlq::list(&no_redis, None).await.unwrap().len(), 6);

    // Deploy workers that know the task, then replay that job's dead letters.
    old.stop().await.unwrap();
    let mut registry = taskmill_common::tasks::builtin();
    registry.register(CountingTask("late-task"));
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

/// Odd batches fail for good until the fix is deployed (`fixed`).
struct Fixable {
    fixed: bool,
}

impl Task for Fixable {
    fn name(&self) -> &'static str {
        "fixable"
    }
    fn run(&self, ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        if !self.fixed && ctx.batch % 2 == 1 {
            return Err(TaskError::Permanent(
                "odd batches fail until the fix".into(),
            ));
        }
        Ok(TaskOutput {
            result: json!({"records": records.len()}),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }
    fn aggregate(&self, results: &[Value]) -> Value {
        let records: u64 = results.iter().filter_map(|r| r["records"].as_u64()).sum();
        json!({"batches": results.len(), "records": records})
    }
}

/// A replay reopens the job (running until the replayed batches settle, so `wait` waits for
/// them), republishes each batch with its job's options (time limit, rate limit) and folds
/// the summary again from every result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reopens_the_job_and_keeps_its_options() {
    use lapin::options::BasicGetOptions;
    let t = TestNs::new();
    let store = t.store().await;
    let with = |fixed| {
        let mut registry = taskmill_common::tasks::builtin();
        registry.register(Fixable { fixed });
        registry
    };
    let old = t.spawn_worker_with(t.worker_args(), with(false));
    taskmill_tests::catalog_ready(&store).await;
    let file = write_jsonl(sample::posts(40));
    let mut args = EnqueueArgs::new("fixable");
    args.files = vec![file.clone()];
    args.time_limit = Some("60s".into());
    args.rate_limit = Some("1000/s".into());
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(
        (s.state(), s.batches_done, s.batches_dead),
        ("completed_with_errors".parse().unwrap(), 2, 2)
    );
    taskmill_tests::until("the first summary", Duration::from_secs(30), || async {
        store
            .job_status(&job)
            .await
            .unwrap()
            .unwrap()
            .summary
            .is_some()
    })
    .await;
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.summary, Some(json!({"batches": 2, "records": 20})));
    // Text status says why they died and what the job was enqueued with.
    let out = taskmill_tests::producer_within(&t.ns, &["status", &job], Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  dead:    permanent 2 (batch 1: \"odd batches fail until the fix\")"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  options: time limit 60000 ms, rate limit one start every 1 ms (key job-{job})"
        )),
        "{text}"
    );
    old.stop().await.unwrap();

    // No worker runs: what the replay did to the job can be read before anything settles.
    let replayed = dlq::replay(&t.conn(), Some(&job)).await.unwrap();
    assert_eq!(replayed.replayed, 2, "{:?}", replayed.skipped);
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "running", "{s:?}");
    assert_eq!(s.batches_dead, 0);
    assert!(s.finished_ms.is_none() && s.summary.is_none(), "{s:?}");
    assert!(store.dead_batches(&job).await.unwrap().is_empty());
    let out = taskmill_tests::producer_within(
        &t.ns,
        &["wait", &job, "--timeout", "0.3"],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "wait must wait for the replayed batches"
    );

    // Each replayed batch carries its job's options; the headers of its death are gone.
    let (conn, ch) = taskmill_tests::raw_channel().await;
    let queue = format!("{}.tasks", t.ns);
    for _ in 0..2 {
        let m = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a replayed batch in the work queue");
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        let h = h.inner();
        for kept in [
            "x-taskmill-time-limit-ms",
            "x-taskmill-rate-interval-ms",
            "x-taskmill-rate-key",
        ] {
            assert!(h.contains_key(kept), "{kept} lost: {h:?}");
        }
        for gone in [
            "x-taskmill-error",
            "x-taskmill-error-kind",
            "x-taskmill-dead-at-ms",
        ] {
            assert!(!h.contains_key(gone), "{gone} kept: {h:?}");
        }
    }
    taskmill_tests::nack_all(&ch).await;
    let _ = conn.close(200, "done".into()).await;

    // The fix is deployed: the replayed batches run, the job completes, the summary is folded
    // again from all four results.
    let new = t.spawn_worker_with(t.worker_args(), with(true));
    let out = taskmill_tests::producer_within(
        &t.ns,
        &["wait", &job, "--timeout", "60", "--json"],
        Duration::from_secs(90),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["state"], "completed");
    assert_eq!(
        (s["batches_done"].as_u64(), s["batches_dead"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(s["summary"], json!({"batches": 4, "records": 40}), "{s}");
    new.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
