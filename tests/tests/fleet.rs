//! Mixed fleets and rolling deploys: a worker that lacks a task gives its batches back while a
//! live worker of the queue serves it; a task nobody serves is still dead-lettered, with the
//! reason; enqueue warns when some live workers of the queue lack the task.
#![allow(clippy::unwrap_used)]

use std::{sync::atomic::Ordering, time::Duration};

use taskmill_common::task::Registry;
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{sample, until, write_jsonl, CountingTask, TestNs};

fn new_registry() -> Registry {
    let mut r = taskmill_common::tasks::builtin();
    r.register(CountingTask("new-task"));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_task_gives_its_batches_to_one_that_has_it() {
    let t = TestNs::new();
    let store = t.store().await;
    let old = t.spawn_worker(t.worker_args());
    let new = t.spawn_worker_with(t.worker_args(), new_registry());
    until(
        "two live workers that say their tasks",
        Duration::from_secs(30),
        || async {
            let ws = store.workers().await.unwrap_or_default();
            ws.iter().filter(|w| w["tasks"].is_array()).count() == 2
        },
    )
    .await;
    let file = write_jsonl(sample::posts(100));
    let mut args = EnqueueArgs::new("new-task");
    args.files = vec![file.clone()];

    // Both live: enqueue says one of them lacks the task, and every batch is done.
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    assert_eq!(
        report.warnings,
        ["1 of the 2 live workers of queue tasks lack task new-task: they give its batches back until a worker that has it takes them"]
    );
    assert_eq!(report.to_json()["warnings"].as_array().unwrap().len(), 1);
    let s = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_eq!((s.batches_done, s.batches_dead), (10, 0), "{s:?}");

    // The new worker restarts (a rolling deploy): meanwhile the old one gets every batch and
    // gives each back, none dead, until the new one is back and runs them.
    new.stop().await.unwrap();
    let before = old.stats.batches_deferred.load(Ordering::SeqCst);
    let second = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    until(
        "the old worker giving every batch back",
        Duration::from_secs(30),
        || async { old.stats.batches_deferred.load(Ordering::SeqCst) >= before + 10 },
    )
    .await;
    let s = store.job_status(&second).await.unwrap().unwrap();
    assert_eq!((s.batches_done, s.batches_dead), (0, 0), "{s:?}");
    let new = t.spawn_worker_with(t.worker_args(), new_registry());
    let s = t
        .wait_finished(&store, &second, Duration::from_secs(60))
        .await;
    assert_eq!(
        (s.state(), s.batches_done, s.batches_dead),
        ("completed".parse().unwrap(), 10, 0)
    );
    assert_eq!(old.stats.batches_dead.load(Ordering::SeqCst), 0);

    // A task no live worker serves is dead-lettered at once, saying so.
    let mut nobody = EnqueueArgs::new("nobody-has-it");
    nobody.files = vec![write_jsonl(sample::posts(10))];
    nobody.no_check = true;
    let job = enqueue(&t.conn(), &nobody, |_| {}).await.unwrap().job;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.batches_dead, 1);
    let dead = store.dead_batches(&job).await.unwrap();
    let error = dead[0].1["error"].as_str().unwrap();
    assert!(error.contains("unknown task \"nobody-has-it\""), "{error}");
    assert!(
        error.contains("no live worker of queue tasks serves it"),
        "{error}"
    );
    assert_eq!(dead[0].1["kind"], "unknown_task");

    old.stop().await.unwrap();
    new.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(&nobody.files[0]);
    t.cleanup().await;
}
