//! The worker's gather window (`--gather-ms`): deliveries that reach an idle worker wait that
//! long for more to join them, so that one wake-up of the analysis threads, one Redis call and
//! one ack carry many batches. Every other test runs with the default (1 ms), so every job's
//! first batch goes through the window; these check its edges.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{sample, until, write_jsonl, TestNs};

/// A drain does not wait out a gather window: with a window of ten minutes, a batch held in
/// it is analysed, stored and acked at once when the worker is told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_wait_out_the_gather_window() {
    let t = TestNs::new();
    let store = t.store().await;
    let mut args = t.worker_args();
    args.gather_ms = 600_000;
    let w = t.spawn_worker(args);
    let file = write_jsonl(sample::posts(10));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let stats = w.stats.clone();
    until(
        "the worker holding the batch",
        Duration::from_secs(30),
        || {
            let stats = stats.clone();
            async move { stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 1 }
        },
    )
    .await;
    // Still waiting for company: nothing stored yet.
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.batches_done, 0, "{s:?}");
    tokio::time::timeout(Duration::from_secs(30), w.stop())
        .await
        .expect("the drain waited for the gather window")
        .unwrap();
    let s = t.wait_finished(&store, &job, Duration::from_secs(10)).await;
    assert_eq!(
        (s.state(), s.batches_done),
        (taskmill_common::JobState::Completed, 1)
    );
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
