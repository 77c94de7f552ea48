//! Sharded work queues (`--shards N`): a job's batches spread over N quorum queues, every
//! worker consuming every shard, the count kept in Redis and only raised, a running worker
//! taking up new shards, and cancel and priorities across shards. On one node here; the
//! cluster test checks that the shards' leaders land on different nodes.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use serde_json::Value;
use taskmill_tests::{
    bin_path, catalog_ready, enqueue_file, producer, python_venv, queue_consumers, queue_messages,
    raw_channel, run_python, sample, sigterm, until, wait_batches_done, write_jsonl, KillOnDrop,
    TestNs,
};

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ready messages in each of `shorts` (short names) of namespace `ns`.
async fn ready(ns: &str, shorts: &[&str]) -> Vec<Option<u32>> {
    let (conn, _ch) = raw_channel().await;
    let mut out = Vec::new();
    for q in shorts {
        out.push(queue_messages(&conn, &format!("{ns}.{q}")).await);
    }
    let _ = conn.close(200, "".into()).await;
    out
}

const PYTHON: &str = r#"
import json, os
from taskmill import Client
c = Client(namespace=os.environ["TASKMILL_NAMESPACE"])
records = [json.loads(l) for l in open(os.environ["RECORDS"])][:40]
job = c.enqueue("post-stats", records, batch_size=10, check=False, shards=2, job_id="py")
try:
    c.enqueue("post-stats", records, check=False, shards=17)
    bad = None
except ValueError as e:
    bad = str(e)
print(json.dumps({"job": job, "bad": bad}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_spread_over_the_shards_and_every_worker_consumes_them_all() {
    let t = TestNs::new();
    let venv = tokio::task::spawn_blocking(python_venv);
    let store = t.store().await;
    let file = write_jsonl(sample::posts(90));
    // No worker yet: the batches stay where the producer put them, batch n in shard n mod 3.
    ok(&enqueue_file(
        &t.ns,
        &file,
        &[
            "--batch-size",
            "1",
            "--shards",
            "3",
            "--no-check",
            "--job",
            "spread",
        ],
    ));
    let shards = ["tasks", "tasks.s1", "tasks.s2"];
    assert_eq!(ready(&t.ns, &shards).await, [Some(30); 3]);
    assert_eq!(store.shards("tasks", 1).await.unwrap(), 3);
    // Out of range: refused before anything is registered.
    let out = enqueue_file(&t.ns, &file, &["--shards", "17", "--no-check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--shards"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The Python client asks for 2: the queue keeps its 3, and its four batches go to shards
    // 0, 1, 2, 0.
    let venv = venv.await.unwrap();
    let got = run_python(&venv, PYTHON, &t.ns, Some(&file));
    let _ = std::fs::remove_dir_all(&venv);
    assert_eq!(got["job"], "py", "{got}");
    assert!(
        got["bad"]
            .as_str()
            .is_some_and(|b| b.contains("out of range: 1 to 16")),
        "{got}"
    );
    assert_eq!(store.shards("tasks", 2).await.unwrap(), 3);
    assert_eq!(ready(&t.ns, &shards).await, [Some(32), Some(31), Some(31)]);
    // A worker started without --shards reads the count and consumes every shard.
    let worker = t.spawn_worker(t.worker_args());
    for (job, batches, records) in [("spread", 90, 90), ("py", 4, 40)] {
        let s = t.wait_finished(&store, job, Duration::from_secs(60)).await;
        assert_eq!(s.state(), "completed", "{s:?}");
        assert_eq!(s.batches_total, Some(batches));
        assert_eq!(s.batches_done, batches);
        assert_eq!(s.records_done, records);
        assert_eq!(store.results(job).await.unwrap().len() as u64, batches);
    }
    assert_eq!(ready(&t.ns, &shards).await, [Some(0); 3]);
    // `producer queues` lists every shard with the node that leads it and its consumer (the
    // management API's figures lag by a few seconds).
    let listed = || {
        let out = ok(&producer(&t.ns, &["queues", "--json"]));
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<Value>>()
    };
    until(
        "the console shows every shard consumed",
        Duration::from_secs(30),
        || async {
            let listed = listed();
            shards.iter().all(|q| {
                let name = format!("{}.{q}", t.ns);
                listed
                    .iter()
                    .any(|v| v["queue"] == name.as_str() && v["consumers"] == 1)
            })
        },
    )
    .await;
    for entry in listed() {
        assert!(
            entry["node"].as_str().is_some_and(|n| n.contains('@')),
            "{entry}"
        );
    }
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_takes_up_the_shards_a_producer_adds() {
    let t = TestNs::new();
    let store = t.store().await;
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&store).await;
    let (conn, _ch) = raw_channel().await;
    let queue = format!("{}.tasks", t.ns);
    until("the worker consumes", Duration::from_secs(30), || async {
        queue_consumers(&conn, &queue).await == Some(1)
    })
    .await;
    let file = write_jsonl(sample::posts(60));
    // The worker consumes one shard; the producer spreads this job over four.
    ok(&enqueue_file(
        &t.ns,
        &file,
        &["--batch-size", "1", "--shards", "4", "--job", "grown"],
    ));
    let s = t
        .wait_finished(&store, "grown", Duration::from_secs(60))
        .await;
    assert_eq!(s.state(), "completed", "{s:?}");
    assert_eq!(s.batches_done, 60);
    assert_eq!(s.batches_dead, 0);
    assert_eq!(store.results("grown").await.unwrap().len(), 60);
    // It finished its first session and opened a second that consumes all four.
    assert_eq!(worker.stats.sessions.load(Ordering::Relaxed), 2);
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A worker process consuming at least three shards, one thread and a prefetch of 4.
fn slow_worker(ns: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", ns)
            .env("TASKMILL_THREADS", "1")
            .env("TASKMILL_PREFETCH", "4")
            .args(["--shards", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_priorities_work_across_shards() {
    let t = TestNs::new();
    let store = t.store().await;
    let workers = [slow_worker(&t.ns), slow_worker(&t.ns)];
    catalog_ready(&store).await;
    until(
        "the workers raised the count",
        Duration::from_secs(30),
        || async { store.shards_of(&["tasks".into()]).await.unwrap() == [3] },
    )
    .await;
    // The workers' --shards set the queue's count: this backlog of 300 batches of 20 ms is
    // spread over three shards without the producer asking.
    let file = write_jsonl(sample::posts(300));
    let rest = [
        "--task",
        "chaos",
        "--param",
        "sleep_ms=20",
        "--batch-size",
        "1",
    ];
    let low: Vec<&str> = rest.iter().copied().chain(["--job", "low"]).collect();
    ok(&enqueue_file(&t.ns, &file, &low));
    wait_batches_done(&store, "low", 5).await;
    // A priority-9 job does not wait behind the backlog of any shard.
    let small = write_jsonl(sample::posts(5));
    let high: Vec<&str> = rest
        .iter()
        .copied()
        .chain(["--job", "high", "--priority", "9"])
        .collect();
    ok(&enqueue_file(&t.ns, &small, &high));
    let h = t
        .wait_finished(&store, "high", Duration::from_secs(60))
        .await;
    assert_eq!(h.state(), "completed", "{h:?}");
    // Cancelled: what is left of it in every shard is dropped.
    ok(&producer(&t.ns, &["cancel", "low"]));
    until(
        "every batch of the backlog done or dropped",
        Duration::from_secs(60),
        || async {
            let s = store.job_status("low").await.unwrap().unwrap();
            s.batches_done + s.batches_cancelled == 300
        },
    )
    .await;
    let l = store.job_status("low").await.unwrap().unwrap();
    assert_eq!(l.state(), "cancelled", "{l:?}");
    assert!(l.batches_cancelled > 0, "{l:?}");
    assert_eq!(l.batches_dead, 0);
    assert!(h.finished_ms.unwrap() < l.cancelled_ms.unwrap());
    until("every shard empty", Duration::from_secs(30), || async {
        ready(&t.ns, &["tasks", "tasks.s1", "tasks.s2"]).await == [Some(0); 3]
    })
    .await;
    for mut w in workers {
        assert!(sigterm(w.id()));
        assert_eq!(w.wait().unwrap().code(), Some(0));
    }
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(small);
    t.cleanup().await;
}
