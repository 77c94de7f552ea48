//! Operations: the worker's metrics and health endpoints, checked against a real job.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use taskmill_common::store::Store;
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{
    batches_done, bin_path, publish_raw, raw_channel, sample, sigterm, until, wait_batches_done,
    write_jsonl, TestNs,
};

/// The value of the sample `name{labels...}` whose labels include all of `want`.
fn sample_value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (l, v) = r.split_once('}')?;
                (l, v)
            }
            None => ("", rest),
        };
        if !value.starts_with(' ') {
            return None;
        }
        let ok = want
            .iter()
            .all(|(k, v)| labels.split(',').any(|l| l == format!("{k}=\"{v}\"")));
        ok.then(|| value.trim().parse().ok()).flatten()
    })
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_the_job() {
    let t = TestNs::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut worker = Command::new(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("TASKMILL_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("TASKMILL_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until("the worker ready", Duration::from_secs(60), || {
        let url = format!("{base}/readyz");
        async move {
            match reqwest::get(&url).await {
                Ok(r) => r.status().as_u16() == 200,
                Err(_) => false,
            }
        }
    })
    .await;
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);

    let file = write_jsonl(sample::posts(2000));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.params = vec!["spin_us=500".into()];
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    let store = t.store().await;
    let job = report.job.clone();
    // Scrape during the job: counters are there and never ahead of Redis.
    wait_batches_done(&store, &job, 20).await;
    let (code, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    let during = sample_value(
        &text,
        "taskmill_batches_total",
        &[("task", "chaos"), ("outcome", "done")],
    )
    .unwrap();
    assert!(during >= 1.0 && during <= batches_done(&store, &job).await as f64);
    assert_eq!(
        sample_value(&text, "taskmill_worker_threads", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample_value(&text, "taskmill_connected", &[("to", "rabbitmq")]),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&text, "taskmill_connected", &[("to", "redis")]),
        Some(1.0)
    );

    let status = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(status.batches_done, 200);
    let (_, text) = get(&format!("{base}/metrics")).await;
    let m = |name: &str, labels: &[(&str, &str)]| sample_value(&text, name, labels).unwrap();
    assert_eq!(
        m(
            "taskmill_batches_total",
            &[("task", "chaos"), ("outcome", "done")]
        ),
        200.0
    );
    assert_eq!(
        m(
            "taskmill_records_total",
            &[("task", "chaos"), ("outcome", "done")]
        ),
        2000.0
    );
    assert_eq!(
        m("taskmill_batch_latency_seconds_count", &[("task", "chaos")]),
        200.0
    );
    assert_eq!(
        m("taskmill_task_duration_seconds_count", &[("task", "chaos")]),
        200.0
    );
    assert!(m("taskmill_task_duration_seconds_sum", &[("task", "chaos")]) > 0.0);
    assert_eq!(m("taskmill_batches_in_flight", &[]), 0.0);
    assert!(text.contains("taskmill_batch_latency_seconds_bucket{"));
    // The part of the latency spent in the worker: one a batch, never more than the whole
    // (the whole is counted in whole ms, hence the 1 ms a batch of slack).
    assert_eq!(
        m(
            "taskmill_batch_in_worker_seconds_count",
            &[("task", "chaos")]
        ),
        200.0
    );
    let in_worker = m("taskmill_batch_in_worker_seconds_sum", &[("task", "chaos")]);
    let whole = m("taskmill_batch_latency_seconds_sum", &[("task", "chaos")]);
    assert!(
        in_worker > 0.0 && in_worker <= whole + 0.2,
        "in the worker {in_worker} s of {whole} s"
    );
    let (_, stats) = get(&format!("{base}/stats")).await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let (here_max, whole_max) = (
        stats["in_worker_us"]["max"].as_u64().unwrap(),
        stats["latency_ms"]["max"].as_u64().unwrap(),
    );
    assert!(
        here_max > 0 && here_max <= (whole_max + 1) * 1000 + 1000,
        "{stats}"
    );

    // A job that dies shows up as dead batches.
    let mut dead = EnqueueArgs::new("chaos");
    dead.files = vec![file.clone()];
    dead.params = vec!["fail_rate=1".into(), "fail=permanent".into()];
    let report = enqueue(&t.conn(), &dead, |_| {}).await.unwrap();
    t.wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(
        sample_value(
            &text,
            "taskmill_batches_total",
            &[("task", "chaos"), ("outcome", "dead")]
        ),
        Some(200.0)
    );

    // Task names taken from messages never become labels: 100 forged names of 20 KB each
    // leave /metrics small, counted under `unknown`.
    let (_c, ch) = raw_channel().await;
    let names = taskmill_common::topology::Names::new(&t.ns);
    for i in 0..100 {
        let env = taskmill_common::envelope::Envelope {
            v: taskmill_common::envelope::FORMAT_VERSION,
            job: "forged".into(),
            batch: i,
            task: format!("zz{i}{}", "z".repeat(20_000)),
            params: Default::default(),
            records: vec![],
            created_ms: 1,
        };
        publish_raw(
            &ch,
            &names.work_exchange(),
            "tasks",
            &taskmill_common::envelope::encode(&env),
            taskmill_common::amqp::batch_properties(&env, 1),
        )
        .await;
    }
    until("the forged batches dead", Duration::from_secs(60), || {
        let url = format!("{base}/metrics");
        async move {
            let (_, text) = get(&url).await;
            sample_value(
                &text,
                "taskmill_batches_total",
                &[("task", "unknown"), ("outcome", "dead")],
            ) == Some(100.0)
        }
    })
    .await;
    let (_, after) = get(&format!("{base}/metrics")).await;
    assert!(!after.contains("zzz"));
    assert!(after.len() < text.len() + 8 * 1024, "{} bytes", after.len());

    assert!(sigterm(worker.id()));
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_workers_views_show_the_namespace() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let conn = t.conn();
    // The management API refreshes its statistics every few seconds: wait for the consumer.
    until(
        "the worker visible in the management API",
        Duration::from_secs(60),
        || {
            let conn = conn.clone();
            async move {
                let qs = taskmill_producer::cmd::queues::queues(&conn).await.unwrap();
                qs.iter().any(|q| {
                    q["queue"] == format!("{}.tasks", conn.namespace) && q["consumers"] == 1
                })
            }
        },
    )
    .await;
    let qs = taskmill_producer::cmd::queues::queues(&conn).await.unwrap();
    let names: Vec<&str> = qs.iter().map(|q| q["queue"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            format!("{}.dead", t.ns),
            format!("{}.dead.events", t.ns),
            format!("{}.tasks", t.ns),
            format!("{}.tasks.p1", t.ns),
            format!("{}.tasks.p5", t.ns),
        ]
    );
    let workers = taskmill_producer::cmd::queues::workers(&conn)
        .await
        .unwrap();
    // One row a consumed queue: the work queue and its two priority bands.
    assert_eq!(workers.len(), 3);
    assert!(workers.iter().all(|w| w["prefetch"] == 256));
    assert!(workers[0]["connection"]
        .as_str()
        .unwrap()
        .starts_with("taskmill-worker@"));

    // A management API that cannot be reached is one clear sentence, without the password.
    let out = Command::new(bin_path("producer"))
        .args([
            "--rabbitmq-api-url",
            "http://guest:s3cret@127.0.0.1:1/api",
            "queues",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        err.contains("cannot reach the RabbitMQ management API"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    w.stop().await.unwrap();
    t.cleanup().await;
}

/// `producer namespace delete`: refused while a worker of the namespace lives; then its queues,
/// exchanges and keys go, and nothing of a namespace whose name merely starts the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_is_deleted_whole_and_alone() {
    let t = TestNs::new();
    let sibling = format!("{}x", t.ns);
    let file = write_jsonl(sample::posts(20));
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    // The sibling namespace, with a job of its own (no worker: its batches wait).
    let mut other = t.conn();
    other.namespace = sibling.clone();
    let other_job = enqueue(&other, &args, |_| {}).await.unwrap().job;

    let out = taskmill_tests::producer(&t.ns, &["namespace", "delete", &t.ns, "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 live workers") && err.contains("--force"),
        "{err}"
    );
    w.stop().await.unwrap();

    let out = taskmill_tests::producer(&t.ns, &["namespace", "delete", &t.ns]);
    assert_eq!(out.status.code(), Some(2), "no --yes off a terminal");
    let out = taskmill_tests::producer(&t.ns, &["namespace", "delete", &t.ns, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("deleted namespace {}", t.ns)));
    assert!(taskmill_tests::broker_queues(&format!("{}.", t.ns))
        .await
        .is_empty());
    let exchanges: Value = reqwest::Client::new()
        .get("http://127.0.0.1:15672/api/exchanges")
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = exchanges
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(&format!("{}.", t.ns))),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.starts_with(&format!("{sibling}."))));
    let keys = Store::connect("redis://127.0.0.1:6379/0", &t.ns, 60)
        .await
        .unwrap()
        .keys_of_namespace()
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    // The sibling is untouched.
    let sib = Store::connect("redis://127.0.0.1:6379/0", &sibling, 60)
        .await
        .unwrap();
    assert!(sib.job_status(&other_job).await.unwrap().is_some());
    assert!(!taskmill_tests::broker_queues(&format!("{sibling}."))
        .await
        .is_empty());
    taskmill_tests::cleanup_namespace(&sibling).await;
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
