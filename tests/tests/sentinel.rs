//! Losing the Redis primary: a private primary, two replicas and three sentinels
//! (`taskmill_tests::sentinel`), the real `producer` and `worker` given one
//! `redis+sentinel://` URL, and the machine's RabbitMQ. Two failovers mid-job, each ending
//! with every batch's result stored and counted once, nothing dead-lettered:
//! - a graceful one (`SENTINEL FAILOVER`): the old primary, still running, answers the
//!   worker's writes with `READONLY`, and the worker must move to the new one;
//! - the primary killed with SIGKILL while both replicas are cut off (SIGSTOP): the writes the
//!   primary took in that time are lost with it, so the worker must not have acked any batch
//!   whose result only the primary had. It waits (`WAIT`) for a replica before each ack and,
//!   with none answering, holds its acks; the batches are stored again on the new primary.

#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use taskmill_common::store::Store;
use taskmill_tests::{
    python_venv, sample, sentinel::SentinelSet, until, write_jsonl, Logged, TestNs,
};

/// Batches of one post each, 30 ms of work a batch: the job lasts long enough to fail over
/// twice in the middle of it.
const BATCHES: u64 = 1_500;

/// Through the Python client: a job enqueued and waited for; then one asking for three
/// replicas (`Unavailable`, its message kept).
const PYTHON: &str = r#"
import json, os
from taskmill import Client, Unavailable
url = os.environ["REDIS_URL"]
ns = os.environ["TASKMILL_NAMESPACE"]
records = [json.loads(line) for line in open(os.environ["RECORDS"])]
c = Client(redis_url=url, namespace=ns)
job = c.enqueue("post-stats", records, batch_size=10, job_id="py-sentinel")
st = c.wait(job, timeout=60)
out = {"state": st["state"], "done": st["batches_done"]}
strict = Client(redis_url=url + "&wait_replicas=3", namespace=ns)
try:
    strict.enqueue("post-stats", records, batch_size=10, job_id="py-strict")
    out["three"] = "enqueued"
except Unavailable as e:
    out["three"] = str(e)
print(json.dumps(out))
"#;

/// Through the Python client: waits for the big job across the primary's death (it polls
/// before the kill, says so on its first line, and must not give up when Redis goes).
const WAITER: &str = r#"
import json, os, sys
from taskmill import Client
c = Client(redis_url=os.environ["REDIS_URL"], namespace=os.environ["TASKMILL_NAMESPACE"])
c.status("failover")
print("polling", flush=True)
st = c.wait("failover", timeout=240)
print(json.dumps({"state": st["state"], "done": st["batches_done"]}))
"#;

/// A binary of the workspace pointed at the Sentinel set.
fn spawn(ns: &str, redis_url: &str, bin: &str, args: &[&str], stdin: Stdio) -> Logged {
    let env = [
        ("REDIS_URL", redis_url.to_string()),
        ("RUST_LOG", "warn,taskmill_store=info".to_string()),
    ];
    Logged::spawn(ns, bin, args, &env, stdin)
}

async fn done(store: &Store, job: &str) -> u64 {
    taskmill_tests::batches_done(store, job).await
}

/// The job's `batches_done` as the data node on `port` has it (0 when it cannot say).
async fn done_on(port: u16, store: &Store, job: &str) -> u64 {
    let Ok(client) = redis::Client::open(SentinelSet::node_url(port)) else {
        return 0;
    };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return 0;
    };
    redis::cmd("HGET")
        .arg(store.keys().job(job))
        .arg("batches_done")
        .query_async::<Option<u64>>(&mut con)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_loses_nothing_when_the_redis_primary_fails_over() {
    let venv = tokio::task::spawn_blocking(python_venv);
    let mut set = SentinelSet::start().await;
    let started = std::time::Instant::now();
    let t = TestNs::new();
    // A short WAIT, so that a worker with no replica answering says so soon.
    let url = set.url("wait_timeout_ms=300");
    let store = Store::connect(&url, &t.ns, 3600).await.unwrap();
    let worker = spawn(&t.ns, &url, "worker", &["--threads", "1"], Stdio::null());
    // 0. Both replicas stopped while the producer registers its job: the registration's WAIT
    // fails, the producer tries again (its registration token makes the retry of a
    // registration that did reach the primary count as registered) until they are back.
    let first = set.primary_port().await.unwrap();
    let replicas = set.others(first);
    for r in &replicas {
        set.pause(*r, true);
    }
    // The producer reads the posts from a pipe: the first half now, the second half after
    // the first failover has begun, so that it is still publishing (reserving batch numbers, counting
    // confirms) while the primary moves, and ends publishing on the new one.
    let job = "failover";
    let mut producer = spawn(
        &t.ns,
        &url,
        "producer",
        &[
            "enqueue",
            "--file",
            "-",
            "--task",
            "chaos",
            "--param",
            "sleep_ms=30",
            "--batch-size",
            "1",
            "--job",
            job,
        ],
        Stdio::piped(),
    );
    let stdin = producer.process.stdin.take().unwrap();
    let (go, writer) = taskmill_tests::posts_in_two_halves(stdin, BATCHES);
    until(
        "the producer trying its registration again",
        Duration::from_secs(30),
        || async { producer.said().contains("registering the job") },
    )
    .await;
    for r in &replicas {
        set.pause(*r, false);
    }
    // 1. A graceful failover mid-job: the old primary turns replica under the worker.
    until("100 batches done", Duration::from_secs(60), || async {
        done(&store, job).await >= 100
    })
    .await;
    set.failover().await;
    let _ = go.send(());
    let second = set.await_new_primary(first, Duration::from_secs(30)).await;
    writer.join().unwrap().unwrap();
    let (code, said) = producer.exited().await;
    assert!(code.success(), "enqueue through the failover: {said}");
    eprintln!(
        "{:.1} s: failed over from {first} to {second}",
        started.elapsed().as_secs_f64()
    );
    // Progress read from the new primary itself (the old one, until the sentinels turn it into
    // a replica, may still take writes that its new primary never sees).
    let at_failover = done_on(second, &store, job).await;
    until(
        "progress on the new primary",
        Duration::from_secs(60),
        || async { done_on(second, &store, job).await >= at_failover + 100 },
    )
    .await;
    eprintln!(
        "{:.1} s: progress on the new primary",
        started.elapsed().as_secs_f64()
    );
    // 2. Both replicas cut off, then the primary killed: what it took meanwhile dies with it.
    let mark = worker.said().len();
    let replicas = set.cut_replicas(second).await;
    until(
        "the worker holding its acks for want of a replica",
        Duration::from_secs(30),
        || async { worker.said()[mark..].contains("replica(s) asked for") },
    )
    .await;
    // A Python client waiting for the job meanwhile, through the same URL.
    let venv = venv.await.unwrap();
    let mut waiter = taskmill_tests::KillOnDrop(
        Command::new(venv.join("bin/python"))
            .args(["-c", WAITER])
            .env("REDIS_URL", &url)
            .env("TASKMILL_NAMESPACE", &t.ns)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut waiter_out = std::io::BufReader::new(waiter.stdout.take().unwrap());
    let (first_line, waiter_out) = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut waiter_out, &mut line);
        (line, waiter_out)
    })
    .await
    .unwrap();
    assert_eq!(
        first_line.trim(),
        "polling",
        "the Python waiter did not start"
    );
    eprintln!(
        "{:.1} s: acks held; killing the primary",
        started.elapsed().as_secs_f64()
    );
    set.kill(second);
    for r in &replicas {
        set.pause(*r, false);
    }
    let third = set.await_new_primary(second, Duration::from_secs(60)).await;
    assert!(replicas.contains(&third));
    eprintln!(
        "{:.1} s: failed over to {third}",
        started.elapsed().as_secs_f64()
    );

    // Every batch is stored exactly once on the last primary, nothing dead.
    let (code, said) = spawn(
        &t.ns,
        &url,
        "producer",
        &["wait", job, "--timeout", "180s"],
        Stdio::null(),
    )
    .exited()
    .await;
    assert!(
        code.success(),
        "producer wait: {said}\nworker: {}",
        worker.said()
    );
    // Read as a new process would (this test's own connection may still point at the dead
    // primary: its next command fails once, then asks the sentinels again).
    let store = Store::connect(&url, &t.ns, 3600).await.unwrap();
    let s = store.job_status(job).await.unwrap().unwrap();
    assert_eq!(s.batches_done, BATCHES, "{s:?}");
    assert_eq!(s.batches_dead, 0, "{s:?}");
    assert_eq!(s.records_done, BATCHES, "{s:?}");
    let mut con = redis::Client::open(SentinelSet::node_url(third))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored: u64 = redis::cmd("HLEN")
        .arg(store.keys().results(job))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(stored, BATCHES, "results on the last primary");

    // The Python waiter followed the failover and saw the job end.
    let (waited, said) = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut { waiter_out }, &mut rest);
        let status = waiter.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = waiter.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, format!("{rest}{err}"))
    })
    .await
    .unwrap();
    assert!(waited.success(), "the Python waiter: {said}");
    let got: serde_json::Value = serde_json::from_str(said.lines().next().unwrap_or("")).unwrap();
    assert_eq!(got["state"], "completed", "{got}");
    assert_eq!(got["done"], BATCHES, "{got}");

    // The Python client through the same URL, on the last primary (one replica left): a job
    // enqueued, run and waited for; asking for more replicas than there are refuses the
    // enqueue with the reason.
    let records = write_jsonl(sample::posts(100));
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", PYTHON])
        .env("REDIS_URL", &url)
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("RECORDS", &records)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&venv);
    let _ = std::fs::remove_file(&records);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["state"], "completed", "{got}");
    assert_eq!(got["done"], 10, "{got}");
    assert!(
        got["three"]
            .as_str()
            .unwrap()
            .contains("reached 1 of the 3 replica(s)"),
        "{got}"
    );
    drop(worker);
    t.cleanup().await;
}

/// The result keys (batch numbers) of `job` on the data node on `port`.
async fn results_on(port: u16, store: &Store, job: &str) -> std::collections::BTreeSet<u64> {
    let mut con = redis::Client::open(SentinelSet::node_url(port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("HKEYS")
        .arg(store.keys().results(job))
        .query_async(&mut con)
        .await
        .unwrap();
    keys.iter().filter_map(|k| k.parse().ok()).collect()
}

/// With `wait_replicas=0` the worker acks a batch once the primary has its result, so a
/// primary that dies takes with it what its replicas had not received: exactly the results
/// stored after the replicas last heard from it (the window the README states), and none
/// before. Those batches were acked: nothing brings them back, and the stalled-job watcher
/// counts them lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_a_dying_primary_takes_what_its_replicas_had_not_received() {
    let mut set = SentinelSet::start().await;
    let t = TestNs::new();
    let url = set.url("wait_replicas=0");
    let store = Store::connect(&url, &t.ns, 3600).await.unwrap();
    let worker = spawn(
        &t.ns,
        &url,
        "worker",
        // Long enough that the progress and heartbeats lost with the primary (the new one
        // has them as of the cut) do not look like a stall before the worker writes again.
        &["--threads", "1", "--stall-after", "30"],
        Stdio::null(),
    );
    let total = 600u64;
    let file = write_jsonl(sample::posts(total));
    let path = file.to_string_lossy().to_string();
    let job = "no-wait";
    let (code, said) = spawn(
        &t.ns,
        &url,
        "producer",
        &[
            "enqueue",
            "--file",
            &path,
            "--task",
            "chaos",
            "--param",
            "sleep_ms=30",
            "--batch-size",
            "1",
            "--job",
            job,
            "--no-check",
        ],
        Stdio::null(),
    )
    .exited()
    .await;
    assert!(code.success(), "enqueue: {said}");
    until("50 batches done", Duration::from_secs(60), || async {
        done(&store, job).await >= 50
    })
    .await;
    // The replicas cut off: what the primary takes from now on reaches none of them.
    let primary = set.primary_port().await.unwrap();
    let before_cut = results_on(primary, &store, job).await;
    let replicas = set.cut_replicas(primary).await;
    // Stopped replicas still receive into their sockets what the primary sends (a few MB on
    // loopback), and would apply it once they run again: their replication links are closed
    // too, so that nothing sent after this point reaches them.
    let mut con = redis::Client::open(SentinelSet::node_url(primary))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(killed, 2, "the primary's replication links");
    let after_cut = results_on(primary, &store, job).await;
    until(
        "100 more results on the primary alone",
        Duration::from_secs(60),
        || async { results_on(primary, &store, job).await.len() >= after_cut.len() + 100 },
    )
    .await;
    let at_kill = results_on(primary, &store, job).await;
    set.kill(primary);
    for r in &replicas {
        set.pause(*r, false);
    }
    let new = set
        .await_new_primary(primary, Duration::from_secs(60))
        .await;
    // The job cannot complete: the watcher gives up on the batches it will never see again.
    let (code, said) = spawn(
        &t.ns,
        &url,
        "producer",
        &["wait", job, "--timeout", "120s"],
        Stdio::null(),
    )
    .exited()
    .await;
    assert_eq!(code.code(), Some(1), "producer wait: {said}");
    let store = Store::connect(&url, &t.ns, 3600).await.unwrap();
    let s = store.job_status(job).await.unwrap().unwrap();
    assert_eq!(s.state(), "stalled", "{s:?}");
    let kept = results_on(new, &store, job).await;
    let lost: std::collections::BTreeSet<u64> = at_kill.difference(&kept).copied().collect();
    let surely_lost: std::collections::BTreeSet<u64> =
        at_kill.difference(&after_cut).copied().collect();
    eprintln!(
        "without WAIT: {} results stored on the primary after the cut, {} lost with it",
        surely_lost.len(),
        lost.len()
    );
    // Lost: every result stored after the cut was read, and nothing the replicas had before
    // the cut; counted as lost in the job, and the rest of the job done.
    assert!(surely_lost.is_subset(&lost), "{surely_lost:?} vs {lost:?}");
    assert!(lost.is_disjoint(&before_cut), "{lost:?}");
    assert!(lost.len() >= 100, "{}", lost.len());
    assert_eq!(s.batches_lost, lost.len() as u64, "{s:?}");
    assert_eq!(s.batches_done + s.batches_lost, total, "{s:?}");
    assert_eq!(kept.len() as u64, s.batches_done);
    drop(worker);
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
