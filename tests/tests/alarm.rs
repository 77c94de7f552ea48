//! A broker memory alarm blocks publishers: workers keep storing and acking what they can,
//! since draining is what clears an alarm, and retries go out once it is cleared. When most
//! batches fail, their retry copies are parked in Redis and the originals acked, so that
//! failing batches do not hold every prefetch slot and the others keep completing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskmill_common::tasks::chaos::fails;
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{batches_done, broker::PrivateBroker, sample, until, write_jsonl, TestNs};
use taskmill_worker::Stats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_draining_during_a_memory_alarm() {
    let broker = tokio::task::spawn_blocking(PrivateBroker::start)
        .await
        .unwrap();
    let t = TestNs::new();
    let mut conn = t.conn();
    conn.amqp_url = broker.url.clone();
    let store = t.store().await;

    // 500 batches, published before the alarm; some fail their first attempt (transient),
    // so the worker has retries to publish while the broker blocks publishers.
    let job = "alarm-job";
    let (rate, seed, total) = (0.05, 3, 500u64);
    let (file, failing) = enqueue_failing(&conn, job, rate, seed, total).await;
    assert!(failing > 5 && failing < 60, "{failing}");

    broker.memory_alarm(true);
    let mut wargs = t.worker_args();
    wargs.conn.amqp_url = broker.url.clone();
    let w = t.spawn_worker(wargs);
    // Under the alarm, every batch that needs no retry is stored and acked.
    until(
        "the batches that need no retry done under the alarm",
        Duration::from_secs(120),
        || async { batches_done(&store, job).await >= total - failing },
    )
    .await;
    // No retry reaches the broker while the alarm lasts: those counted were parked in Redis.
    assert_eq!(
        Stats::get(&w.stats.batches_retried),
        Stats::get(&w.stats.copies_parked),
        "no retry can be published while the alarm lasts"
    );

    broker.memory_alarm(false);
    let s = t.wait_finished(&store, job, Duration::from_secs(120)).await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.batches_done, total);
    // Each failed attempt is retried once, counted once (the draws are deterministic):
    // batch b fails attempts 1, 2, ... until one succeeds.
    let retries: u64 = (0..total)
        .map(|b| (1..).take_while(|&a| fails(rate, seed, job, b, a)).count() as u64)
        .sum();
    assert_eq!(s.retries, retries);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;

    most_batches_fail_under_an_alarm(&broker).await;
}

/// 600 batches of which 60 % fail their first attempt, the alarm on before the worker starts
/// (default prefetch, 256): every batch that needs no retry completes under the alarm, the
/// failing ones give their prefetch slots back (their retry copies parked in Redis), and once
/// the alarm clears the parked copies go out and the job ends with every batch settled.
async fn most_batches_fail_under_an_alarm(broker: &PrivateBroker) {
    let t = TestNs::new();
    let mut conn = t.conn();
    conn.amqp_url = broker.url.clone();
    let store = t.store().await;
    let job = "most-fail";
    let (rate, seed, total) = (0.6, 3, 600u64);
    let (file, failing) = enqueue_failing(&conn, job, rate, seed, total).await;
    assert!(
        failing > 256,
        "more failing batches than a prefetch: {failing}"
    );

    broker.memory_alarm(true);
    let mut wargs = t.worker_args();
    wargs.conn.amqp_url = broker.url.clone();
    let w = t.spawn_worker(wargs);
    until(
        "every batch that needs no retry done under the alarm",
        Duration::from_secs(120),
        || async { batches_done(&store, job).await >= total - failing },
    )
    .await;
    until(
        "the failing batches' slots given back",
        Duration::from_secs(60),
        || async { w.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0 },
    )
    .await;
    assert!(
        Stats::get(&w.stats.copies_parked) >= failing,
        "{:?}",
        w.stats
    );
    assert!(store.parked_count().await.unwrap() > 0);

    broker.memory_alarm(false);
    let s = t.wait_finished(&store, job, Duration::from_secs(180)).await;
    // A batch dies when all 5 attempts fail (the draws are deterministic).
    let dead = (0..total)
        .filter(|&b| (1..=5).all(|a| fails(rate, seed, job, b, a)))
        .count() as u64;
    assert_eq!(s.batches_dead, dead, "{s:?}");
    assert_eq!(s.batches_done, total - dead, "{s:?}");
    assert_eq!(store.results(job).await.unwrap().len() as u64, total - dead);
    until(
        "every parked copy published",
        Duration::from_secs(30),
        || async { store.parked_count().await.unwrap() == 0 },
    )
    .await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Enqueues `total` batches of one post as job `job` of `chaos` failing transiently at `rate`
/// (draws from `seed`), retried after 100 ms at first: the records' file, and how many
/// batches fail their first attempt.
async fn enqueue_failing(
    conn: &taskmill_common::config::ConnArgs,
    job: &str,
    rate: f64,
    seed: u64,
    total: u64,
) -> (std::path::PathBuf, u64) {
    let file = write_jsonl(sample::posts(total));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.job = Some(job.into());
    args.params = vec![
        format!("fail_rate={rate}"),
        format!("seed={seed}"),
        "retry_base_ms=100".into(),
    ];
    enqueue(conn, &args, |_| {}).await.unwrap();
    let failing = (0..total).filter(|&b| fails(rate, seed, job, b, 1)).count() as u64;
    (file, failing)
}
