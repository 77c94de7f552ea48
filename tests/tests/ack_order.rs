//! "A batch is acked only after its result is stored", proven every run: a worker that holds
//! analysed batches it cannot store is killed with SIGKILL, and every batch still comes back.
//! With the ack before the store, every batch it held would be lost, every time (not only
//! when a kill happens to land in a half-millisecond window).
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{bin_path, proxy::Proxy, sample, until, write_jsonl, KillOnDrop, TestNs};

/// The worker's `/stats` (its counters) as JSON, or Null while it does not answer.
async fn stats(port: u16) -> serde_json::Value {
    match reqwest::get(format!("http://127.0.0.1:{port}/stats")).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_unstored_results_loses_no_batch() {
    let t = TestNs::new();
    let store = t.store().await;
    // The worker reaches Redis through a proxy the test cuts; the producer reaches it
    // directly.
    let proxy = Proxy::start("127.0.0.1:6379".parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    let port = taskmill_tests::free_port();
    let mut first = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("REDIS_URL", proxy.redis_url())
            .env("TASKMILL_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    until("the worker ready", Duration::from_secs(60), || async {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    proxy.cut();
    let file = write_jsonl(sample::posts(2000));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // Every batch delivered to the worker (none ready in the queue), which cannot store one.
    let (conn, _ch) = taskmill_tests::raw_channel().await;
    let queue = format!("{}.tasks", t.ns);
    until(
        "the worker holding every batch, unable to store",
        Duration::from_secs(60),
        || async {
            stats(port).await["store_errors"].as_u64() >= Some(1)
                && taskmill_tests::queue_messages(&conn, &queue).await == Some(0)
        },
    )
    .await;
    assert_eq!(stats(port).await["batches_done"], 0);
    first.kill().unwrap();
    first.wait().unwrap();
    proxy.restore();
    // A fresh worker gets every batch back from the broker and stores each once.
    let w = t.spawn_worker(t.worker_args());
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed", "{s:?}");
    assert_eq!(
        (
            s.batches_total,
            s.batches_done,
            s.batches_dead,
            s.records_done
        ),
        (Some(200), 200, 0, 2000)
    );
    assert_eq!(store.results(&job).await.unwrap().len(), 200);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// "The original is acked only after its retry copy is confirmed", proven every run: under a
/// broker memory alarm (a private node) the worker cannot publish the retry copies of its
/// failed batches, so it holds the originals; killed with SIGKILL then, every batch still
/// comes back, and each is retried, then dead-lettered, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_unconfirmed_retries_loses_no_batch() {
    let broker = tokio::task::spawn_blocking(taskmill_tests::broker::PrivateBroker::start)
        .await
        .unwrap();
    let t = TestNs::new();
    let store = t.store().await;
    let mut conn = t.conn();
    conn.amqp_url = broker.url.clone();
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec![
        "fail_rate=1".into(),
        "retry_max_attempts=2".into(),
        "retry_base_ms=100".into(),
    ];
    let job = enqueue(&conn, &args, |_| {}).await.unwrap().job;
    broker.memory_alarm(true);
    let port = taskmill_tests::free_port();
    let mut first = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("AMQP_URL", &broker.url)
            .env("TASKMILL_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Every batch ran and failed; none of their retry copies can be published.
    until(
        "the worker holding 30 failed batches",
        Duration::from_secs(60),
        || async {
            let s = stats(port).await;
            s["in_flight"].as_u64() == Some(30)
                && store
                    .job_status(&job)
                    .await
                    .unwrap()
                    .is_some_and(|j| j.retries == 30)
        },
    )
    .await;
    assert_eq!(stats(port).await["batches_retried"], 0);
    first.kill().unwrap();
    first.wait().unwrap();
    broker.memory_alarm(false);
    let mut wargs = t.worker_args();
    wargs.conn.amqp_url = broker.url.clone();
    let w = t.spawn_worker(wargs);
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(
        (s.batches_done, s.batches_dead, s.retries),
        (0, 30, 30),
        "{s:?}"
    );
    let dead = store.dead_batches(&job).await.unwrap();
    assert!(
        dead.iter().all(|(_, r)| r["kind"] == "retries_exhausted"),
        "{dead:?}"
    );
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
