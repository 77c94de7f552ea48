//! No work lost: cut broker connections, a Redis outage, kill -9 and SIGTERM of workers.
//! Each test checks that the job completes with every batch counted exactly once.
#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use taskmill_common::{store::Store, topology::Names};
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{
    batches_done, bin_path, proxy::Proxy, queue_messages, raw_channel, redis_server::PrivateRedis,
    sample, sigterm, until, wait_batches_done, write_jsonl, TestNs,
};
use taskmill_worker::Stats;

const RABBIT: &str = "127.0.0.1:5672";

fn chaos(file: &std::path::Path, params: &[&str]) -> EnqueueArgs {
    let mut a = EnqueueArgs::new("chaos");
    a.files = vec![file.to_path_buf()];
    a.params = params.iter().map(|p| p.to_string()).collect();
    a
}

/// Every batch done once: counters, results and the batch list agree.
async fn assert_exactly_once(store: &Store, job: &str, batches: u64, records: u64) {
    let s = store.job_status(job).await.unwrap().unwrap();
    assert_eq!(s.state(), "completed", "{:?}", s);
    assert_eq!(s.batches_total.unwrap_or(0), batches);
    assert_eq!(s.batches_done, batches);
    assert_eq!(s.batches_dead, 0);
    assert_eq!(s.records_done, records);
    let results = store.results(job).await.unwrap();
    assert_eq!(results.len() as u64, batches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_cut_broker_connection() {
    let t = TestNs::new();
    let proxy = Proxy::start(RABBIT.parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    let mut wargs = t.worker_args();
    wargs.conn.amqp_url = proxy.amqp_url();
    wargs.prefetch = 16;
    let w = t.spawn_worker(wargs);
    let file = write_jsonl(sample::posts(3000));
    let report = enqueue(&t.conn(), &chaos(&file, &["spin_us=1000"]), |_| {})
        .await
        .unwrap();
    let store = t.store().await;
    let job = report.job.clone();
    wait_batches_done(&store, &job, 60).await;
    proxy.outage().await;
    t.wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_exactly_once(&store, &job, 300, 3000).await;
    assert!(Stats::get(&w.stats.sessions) >= 2);
    // What the cut session held is not counted in flight for ever (the heartbeat shows it).
    until("nothing in flight", Duration::from_secs(10), || async {
        w.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_republishes_what_a_cut_connection_left_unconfirmed() {
    let t = TestNs::new();
    let proxy = Proxy::start(RABBIT.parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(40_000));
    let mut conn = t.conn();
    conn.amqp_url = proxy.amqp_url();
    let mut args = chaos(&file, &[]);
    args.batch_size = 4;
    let producer = tokio::spawn(async move { enqueue(&conn, &args, |_| {}).await });
    proxy.outage_after(2_000_000).await;
    let report = producer.await.unwrap().unwrap();
    assert!(proxy.accepted() >= 2, "the producer reconnected");
    assert_eq!(report.batches, 10_000);
    assert_eq!(report.records, 40_000);
    let store = t.store().await;
    t.wait_finished(&store, &report.job, Duration::from_secs(180))
        .await;
    assert_exactly_once(&store, &report.job, 10_000, 40_000).await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_delays_the_job_but_loses_nothing() {
    let t = TestNs::new();
    let mut redis = PrivateRedis::start().await;
    let mut conn = t.conn();
    conn.redis_url = redis.url();
    let mut wargs = t.worker_args();
    wargs.conn.redis_url = redis.url();
    // A few batches in hand at a time, so that most of the job is still to store when Redis
    // goes (with the default prefetch the worker could hold, and finish, all 200 at once).
    wargs.prefetch = 10;
    let w = t.spawn_worker(wargs);
    let file = write_jsonl(sample::posts(2000));
    let report = enqueue(&conn, &chaos(&file, &["spin_us=1000"]), |_| {})
        .await
        .unwrap();
    let store = Store::connect(&redis.url(), &t.ns, 3600).await.unwrap();
    let job = report.job.clone();
    wait_batches_done(&store, &job, 40).await;
    redis.kill();
    until(
        "the worker failing to store",
        Duration::from_secs(60),
        || async { Stats::get(&w.stats.store_errors) >= 1 },
    )
    .await;
    redis.restart().await;
    t.wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_exactly_once(&store, &job, 200, 2000).await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Redis full (`maxmemory` reached, `noeviction`) mid-job is a wait, like an outage: the
/// worker holds its batches, backs off and stores them when Redis takes writes again; nothing
/// is dead-lettered for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_mid_job_is_a_wait_not_a_dead_letter() {
    let t = TestNs::new();
    let redis = PrivateRedis::start().await;
    let mut conn = t.conn();
    conn.redis_url = redis.url();
    let mut wargs = t.worker_args();
    wargs.conn.redis_url = redis.url();
    wargs.prefetch = 10;
    let file = write_jsonl(sample::posts(2000));
    let report = enqueue(&conn, &chaos(&file, &["spin_us=1000"]), |_| {})
        .await
        .unwrap();
    let store = Store::connect(&redis.url(), &t.ns, 3600).await.unwrap();
    let job = report.job.clone();
    let w = t.spawn_worker(wargs);
    wait_batches_done(&store, &job, 40).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let set = |v: &'static str| {
        let mut admin = admin.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("noeviction")
                .arg("maxmemory")
                .arg(v)
                .query_async::<()>(&mut admin)
                .await
                .unwrap();
        }
    };
    set("1").await;
    until(
        "the worker refused by a full Redis",
        Duration::from_secs(60),
        || async { Stats::get(&w.stats.store_errors) >= 3 },
    )
    .await;
    set("0").await;
    t.wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_exactly_once(&store, &job, 200, 2000).await;
    assert_eq!(Stats::get(&w.stats.batches_dead), 0);
    let _ = redis::cmd("PING").query_async::<String>(&mut admin).await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

fn worker_process(ns: &str, extra: &[(&str, &str)]) -> std::process::Child {
    let mut c = Command::new(bin_path("worker"));
    c.env("TASKMILL_NAMESPACE", ns)
        .env("TASKMILL_THREADS", "1")
        .env("TASKMILL_PREFETCH", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_workers_loses_nothing() {
    let t = TestNs::new();
    let mut a = worker_process(&t.ns, &[]);
    let mut b = worker_process(&t.ns, &[]);
    let file = write_jsonl(sample::posts(4000));
    let report = enqueue(&t.conn(), &chaos(&file, &["spin_us=1000"]), |_| {})
        .await
        .unwrap();
    let store = t.store().await;
    let job = report.job.clone();
    wait_batches_done(&store, &job, 100).await;
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    t.wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_exactly_once(&store, &job, 400, 4000).await;
    b.kill().unwrap();
    b.wait().unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0_and_leaves_the_rest_in_the_queue() {
    let t = TestNs::new();
    let mut worker = worker_process(&t.ns, &[("TASKMILL_THREADS", "2")]);
    let file = write_jsonl(sample::posts(2000));
    let report = enqueue(&t.conn(), &chaos(&file, &["sleep_ms=20"]), |_| {})
        .await
        .unwrap();
    let store = t.store().await;
    let job = report.job.clone();
    wait_batches_done(&store, &job, 20).await;
    assert!(sigterm(worker.id()));
    let status = worker.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a clean drain exits 0");

    // Whatever the worker had is done; the rest waits in the queue: none lost.
    let done = batches_done(&store, &job).await;
    assert!(done < 200, "SIGTERM came before the end of the job");
    let (conn, _ch) = raw_channel().await;
    let ready = queue_messages(&conn, &Names::new(&t.ns).queue("tasks")).await;
    assert_eq!(done + u64::from(ready.unwrap()), 200);

    let w = t.spawn_worker(t.worker_args());
    t.wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_exactly_once(&store, &job, 200, 2000).await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_and_second_signal_give_batches_back_without_an_attempt() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let file = write_jsonl(sample::posts(40));
    // 4 batches of 10 that take 3 s each: nothing can finish within a 1 s shutdown timeout.
    let report = enqueue(&t.conn(), &chaos(&file, &["sleep_ms=3000"]), |_| {})
        .await
        .unwrap();
    let (conn, ch) = raw_channel().await;
    let conn = std::sync::Arc::new(conn);
    let ready = |conn: std::sync::Arc<lapin::Connection>, names: Names| async move {
        queue_messages(&conn, &names.queue("tasks")).await.unwrap()
    };
    for signals in [1, 2] {
        // One signal: the 1 s timeout ends the drain. Two: the second ends a 30 s drain at once.
        let timeout = if signals == 1 { "1" } else { "30" };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let mut worker = worker_process(
            &t.ns,
            &[
                ("TASKMILL_SHUTDOWN_TIMEOUT", timeout),
                ("TASKMILL_PREFETCH", "4"),
                ("TASKMILL_METRICS_ADDR", &metrics_addr),
            ],
        );
        // The worker holds all four batches (its in-flight gauge says so).
        until(
            "the worker holding the batches",
            Duration::from_secs(60),
            || {
                let url = format!("http://{metrics_addr}/metrics");
                async move {
                    let Ok(resp) = reqwest::get(&url).await else {
                        return false;
                    };
                    let text = resp.text().await.unwrap_or_default();
                    text.lines().any(|l| l == "taskmill_batches_in_flight 4")
                }
            },
        )
        .await;
        for n in 0..signals {
            assert!(sigterm(worker.id()));
            if n + 1 < signals {
                // The first signal was handled once the worker says it is draining (not ready).
                until("the worker draining", Duration::from_secs(30), || {
                    let url = format!("http://{metrics_addr}/readyz");
                    async move {
                        reqwest::get(&url)
                            .await
                            .is_ok_and(|r| r.status().as_u16() == 503)
                    }
                })
                .await;
            }
        }
        let status = worker.wait().unwrap();
        let expected = if signals == 1 { 0 } else { 130 };
        assert_eq!(status.code(), Some(expected), "{signals} signal(s)");
        // Everything is back in the queue, and the attempt was not counted as a failure.
        until(
            "the batches back in the queue",
            Duration::from_secs(30),
            || {
                let (conn, names) = (conn.clone(), names.clone());
                async move { ready(conn, names).await == 4 }
            },
        )
        .await;
    }
    let store = t.store().await;
    assert_eq!(batches_done(&store, &report.job).await, 0);
    let got = ch
        .basic_get(names.queue("tasks").into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        taskmill_common::amqp::attempt_of(&got.delivery.properties),
        1
    );
    got.delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut args = t.worker_args();
    args.threads = 4;
    let w = t.spawn_worker(args);
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.batches_done, 4);
    assert_eq!(status.retries, 0);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
