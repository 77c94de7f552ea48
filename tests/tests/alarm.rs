//! A broker memory alarm blocks publishers: workers keep storing and acking what they can,
//! since draining is what clears an alarm, and retries go out once it is cleared.
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
    enqueue(&conn, &args, |_| {}).await.unwrap();
    let failing = (0..total).filter(|&b| fails(rate, seed, job, b, 1)).count() as u64;
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
    assert_eq!(
        Stats::get(&w.stats.batches_retried),
        0,
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
}
