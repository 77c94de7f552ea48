//! Steering jobs across worker processes: cancel, delete.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{bin_path, sample, sigterm, until, wait_batches_done, write_jsonl, TestNs};

fn worker(ns: &str) -> Child {
    Command::new(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", ns)
        .env("TASKMILL_THREADS", "2")
        .env("TASKMILL_PREFETCH", "16")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn producer(ns: &str, args: &[&str]) -> Output {
    Command::new(bin_path("producer"))
        .args(args)
        .env("TASKMILL_NAMESPACE", ns)
        .output()
        .unwrap()
}

fn stop(mut w: Child) {
    assert!(sigterm(w.id()));
    assert_eq!(w.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_drops_what_is_left_across_two_workers() {
    let t = TestNs::new();
    let workers = [worker(&t.ns), worker(&t.ns)];
    let file = write_jsonl(sample::posts(1000));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["sleep_ms=20".into()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let store = t.store().await;
    wait_batches_done(&store, &job, 20).await;

    let out = producer(&t.ns, &["cancel", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cancelled at once, and it stays so.
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "cancelled");
    assert!(s.is_finished() && s.cancelled_ms.is_some());
    until(
        "every batch done or dropped",
        Duration::from_secs(60),
        || async {
            let s = store.job_status(&job).await.unwrap().unwrap();
            s.batches_done + s.batches_cancelled == 1000
        },
    )
    .await;
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "cancelled");
    assert_eq!(s.batches_dead, 0);
    assert!(s.batches_cancelled > 500, "{s:?}");
    assert_eq!(
        store.results(&job).await.unwrap().len() as u64,
        s.batches_done
    );
    // wait exits 1; cancelling again says so and changes nothing.
    assert_eq!(producer(&t.ns, &["wait", &job]).status.code(), Some(1));
    let again = producer(&t.ns, &["cancel", &job]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already finished"));
    assert_eq!(store.job_status(&job).await.unwrap().unwrap(), s);
    assert_eq!(
        producer(&t.ns, &["cancel", "no-such-job"]).status.code(),
        Some(4)
    );

    // A finished job cannot be cancelled; it can be deleted, with its results.
    let mut quick = EnqueueArgs::new("post-stats");
    quick.files = vec![file.clone()];
    let done = enqueue(&t.conn(), &quick, |_| {}).await.unwrap().job;
    t.wait_finished(&store, &done, Duration::from_secs(60))
        .await;
    let out = producer(&t.ns, &["cancel", &done]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already finished (completed)"));
    assert_eq!(
        store.job_status(&done).await.unwrap().unwrap().state(),
        "completed"
    );
    assert_eq!(
        producer(&t.ns, &["delete", &done]).status.code(),
        Some(2),
        "no --yes off a terminal"
    );
    assert!(producer(&t.ns, &["delete", &done, "--yes"])
        .status
        .success());
    assert!(store.job_status(&done).await.unwrap().is_none());
    assert!(store.results(&done).await.unwrap().is_empty());
    assert!(!store.jobs().await.unwrap().iter().any(|(j, _)| *j == done));
    assert_eq!(
        producer(&t.ns, &["delete", &done, "--yes"]).status.code(),
        Some(4)
    );

    // A running job is refused unless --cancel.
    let mut slow = args.clone();
    slow.queue = "idle".into();
    let running = enqueue(&t.conn(), &slow, |_| {}).await.unwrap().job;
    let out = producer(&t.ns, &["delete", &running, "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cancel"));
    assert!(producer(&t.ns, &["delete", &running, "--yes", "--cancel"])
        .status
        .success());
    assert!(store.job_status(&running).await.unwrap().is_none());

    for w in workers {
        stop(w);
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
