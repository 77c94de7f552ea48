//! Transient failures are retried through the broker's delay queues; permanent ones are
//! dead-lettered at once. The `chaos` task makes both predictable from its seed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskmill_common::{
    amqp::{header_i64, header_str},
    envelope::{parse_message_id, HEADER_ATTEMPT, HEADER_ERROR_KIND},
    tasks::chaos::fails,
    topology::Names,
};
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{drain_queue, raw_channel, sample, write_jsonl, TestNs};

const BATCHES: u64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_as_predicted() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let job = format!("retry-{}", t.ns);
    let file = write_jsonl(sample::posts(BATCHES * 5));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 5;
    args.job = Some(job.clone());
    args.params = [
        "fail_rate=0.3",
        "seed=42",
        "fail=transient",
        "retry_base_ms=20",
        "retry_max_attempts=4",
    ]
    .map(String::from)
    .to_vec();
    enqueue(&t.conn(), &args, |_| {}).await.unwrap();

    // What the seed predicts: retries before success, and batches that fail all 4 attempts.
    let (mut retries, mut dead) = (0, 0);
    for b in 0..BATCHES {
        let failures = (1..=4).take_while(|&a| fails(0.3, 42, &job, b, a)).count() as u64;
        if failures == 4 {
            dead += 1;
            retries += 3;
        } else {
            retries += failures;
        }
    }
    assert!(retries > 10, "the seed should make failures: {retries}");

    let store = t.store().await;
    let status = t
        .wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_eq!(status.retries, retries, "{:?}", status);
    assert_eq!(status.batches_dead, dead);
    assert_eq!(status.batches_done, BATCHES - dead);
    let expected_state = if dead > 0 {
        "completed_with_errors"
    } else {
        "completed"
    };
    assert_eq!(status.state(), expected_state);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_at_once_with_their_reason() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let job = format!("perm-{}", t.ns);
    let file = write_jsonl(sample::posts(BATCHES * 5));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 5;
    args.job = Some(job.clone());
    args.params = ["fail_rate=0.25", "seed=7", "fail=permanent"]
        .map(String::from)
        .to_vec();
    enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    let mut predicted: Vec<u64> = (0..BATCHES)
        .filter(|&b| fails(0.25, 7, &job, b, 1))
        .collect();
    assert!(!predicted.is_empty());

    let store = t.store().await;
    let status = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(status.state(), "completed_with_errors");
    assert_eq!(status.batches_dead, predicted.len() as u64);
    assert_eq!(status.retries, 0);

    let (_conn, ch) = raw_channel().await;
    let dead = drain_queue(&ch, &Names::new(&t.ns).dead_queue()).await;
    let mut batches: Vec<u64> = dead
        .iter()
        .map(|m| {
            let p = &m.delivery.properties;
            assert_eq!(
                header_str(p, HEADER_ERROR_KIND).as_deref(),
                Some("permanent")
            );
            assert_eq!(header_i64(p, HEADER_ATTEMPT), Some(1));
            let id = p.message_id().as_ref().unwrap().to_string();
            parse_message_id(&id).unwrap().1
        })
        .collect();
    batches.sort_unstable();
    predicted.sort_unstable();
    assert_eq!(batches, predicted);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_is_dead_lettered_and_the_worker_goes_on() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.params = ["fail_rate=1", "fail=panic"].map(String::from).to_vec();
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    let store = t.store().await;
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.batches_dead, 3);
    let reasons = store.dead_batches(&report.job).await.unwrap();
    assert!(reasons.iter().all(|(_, r)| r["kind"] == "panic"));
    // The same worker then completes a normal job.
    let mut ok = EnqueueArgs::new("post-stats");
    ok.files = vec![file.clone()];
    let report = enqueue(&t.conn(), &ok, |_| {}).await.unwrap();
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.state(), "completed");
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A task's panics go through the worker's log, never as raw lines: with `--log-format json`
/// every stderr line is a JSON object; each panic is one event (target `taskmill::panic`,
/// with its place); the backtrace is a field of the first panic's event when it is asked for
/// (`RUST_BACKTRACE=1`), and of none when it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_are_log_events_with_a_backtrace_only_when_asked() {
    use std::process::{Command, Stdio};
    let t = TestNs::new();
    let store = t.store().await;
    let file = write_jsonl(sample::posts(30));
    for asked in ["1", "0"] {
        let w = Command::new(taskmill_tests::bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("TASKMILL_LOG_FORMAT", "json")
            .env("RUST_BACKTRACE", asked)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut args = EnqueueArgs::new("chaos");
        args.files = vec![file.clone()];
        args.params = ["fail_rate=1", "fail=panic"].map(String::from).to_vec();
        let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
        let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
        assert_eq!(s.batches_dead, 3);
        assert!(taskmill_tests::sigterm(w.id()));
        let out = tokio::task::spawn_blocking(move || w.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let events: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|_| panic!("a raw line in the log: {l:?}"))
            })
            .collect();
        let panics: Vec<_> = events
            .iter()
            .filter(|e| e["target"] == "taskmill::panic")
            .collect();
        assert_eq!(panics.len(), 3, "{stderr}");
        assert!(panics.iter().all(|e| e["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("panicked: chaos: batch")
            && e["fields"]["place"].as_str().unwrap().contains("chaos.rs")));
        let traced = panics
            .iter()
            .filter(|e| e["fields"]["backtrace"].is_string())
            .count();
        assert_eq!(
            traced,
            usize::from(asked == "1"),
            "RUST_BACKTRACE={asked}: {stderr}"
        );
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
