//! Celery ingress: a real Celery 5 app (pip-installed in a fresh virtualenv) calls taskmill's
//! worker binaries through Celery's own API, unchanged: `send_task(...).get()` returns the
//! task's result, failures raise with the task's message, refused calls (an unknown task,
//! pickle, a bad parameter, no records) raise saying why, an ETA holds, an expired call is
//! revoked unrun, and a worker killed mid-stream loses no call. Each call is a taskmill job
//! too, read with `producer status`.

#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use taskmill_common::store::Store;
use taskmill_tests::{
    catalog_ready, celery_venv, mgmt, producer, until, workspace_root, Logged, TestNs,
};

/// The machine's Redis.
const LOCAL: &str = "redis://127.0.0.1:6379/0";

/// A worker binary consuming the namespace's Celery queue (results under the namespace), on
/// the Redis at `redis_url`.
fn worker(ns: &str, redis_url: &str) -> Logged {
    worker_of(ns, redis_url, &format!("{ns}-celery"), &[])
}

/// A worker binary consuming Celery queue `queue`, with `extra` flags.
fn worker_of(ns: &str, redis_url: &str, queue: &str, extra: &[&str]) -> Logged {
    let prefix = format!("{ns}:celery-task-meta-");
    let mut args = vec![
        "--threads",
        "1",
        "--celery-queue",
        queue,
        "--celery-key-prefix",
        &prefix,
    ];
    args.extend_from_slice(extra);
    Logged::spawn(
        ns,
        "worker",
        &args,
        &[
            ("RUST_LOG", "warn".to_string()),
            ("REDIS_URL", redis_url.to_string()),
        ],
        Stdio::null(),
    )
}

/// `tests/celery/calls.py` against the namespace's queue, results on the Redis at `redis_url`.
fn calls(venv: &Path, ns: &str, redis_url: &str, mode: &str, n: u64) -> std::process::Child {
    Command::new(venv.join("bin/python"))
        .env("CELERY_TEST_BACKEND", redis_url)
        .arg(workspace_root().join("tests/celery/calls.py"))
        .args([
            &format!("{ns}-celery"),
            &format!("{ns}:"),
            mode,
            &n.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The JSON the script printed last, once it succeeded.
fn ids_of(out: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "calls.py: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

fn status(ns: &str, job: &str) -> Value {
    let out = producer(ns, &["status", job, "--json"]);
    assert!(out.status.success(), "status {job}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every call in `ids` is a completed job of one batch whose Celery result says SUCCESS.
async fn each_succeeded_once(ns: &str, redis_url: &str, ids: &[Value]) {
    let store = Store::connect(redis_url, ns, 3600).await.unwrap();
    let mut con = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for id in ids {
        let id = id.as_str().unwrap();
        let s = store.job_status(id).await.unwrap().unwrap();
        assert_eq!(
            s.state(),
            taskmill_common::JobState::Completed,
            "{id}: {s:?}"
        );
        assert_eq!(
            (s.batches_total, s.batches_done),
            (Some(1), 1),
            "{id}: {s:?}"
        );
        let meta: String = redis::cmd("GET")
            .arg(format!("{ns}:celery-task-meta-{id}"))
            .query_async(&mut con)
            .await
            .unwrap();
        let meta: Value = serde_json::from_str(&meta).unwrap();
        assert_eq!(meta["status"], "SUCCESS", "{meta}");
        assert_eq!(meta["task_id"], id, "{meta}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_app_calls_taskmill_workers_unchanged() {
    let venv = tokio::task::spawn_blocking(celery_venv);
    let t = TestNs::new();
    let w = worker(&t.ns, LOCAL);
    // Results as msgpack, for an app with result_serializer = "msgpack".
    let mp = worker_of(
        &t.ns,
        LOCAL,
        &format!("{}-celery-mp", t.ns),
        &["--celery-result-serializer", "msgpack"],
    );
    let venv = venv.await.unwrap();
    let ns = t.ns.clone();
    let v = venv.clone();
    let out = tokio::task::spawn_blocking(move || {
        calls(&v, &ns, LOCAL, "checks", 2000).wait_with_output()
    })
    .await
    .unwrap()
    .unwrap();
    let ids = ids_of(out);
    assert!(!w.said().contains("panicked"), "{}", w.said());

    // Each call is a taskmill job, read like any other.
    let ok = status(&t.ns, ids["ok"].as_str().unwrap());
    assert_eq!(ok["state"], "completed", "{ok}");
    assert_eq!(ok["task"], "post-stats", "{ok}");
    assert_eq!(
        (ok["records_done"].as_u64(), ok["records_invalid"].as_u64()),
        (Some(2), Some(1)),
        "{ok}"
    );
    let failed = status(&t.ns, ids["failed"].as_str().unwrap());
    assert_eq!(failed["state"], "completed_with_errors", "{failed}");
    assert_eq!(failed["batches_dead"], 1, "{failed}");
    let expired = status(&t.ns, ids["expired"].as_str().unwrap());
    assert_eq!(expired["batches_expired"], 1, "{expired}");
    assert_eq!(expired["batches_done"], 0, "{expired}");
    let urgent = status(&t.ns, ids["urgent"].as_str().unwrap());
    assert_eq!(urgent["priority"], 9, "{urgent}");
    let eta = status(&t.ns, ids["eta"].as_str().unwrap());
    assert!(
        eta["eta_ms"].as_u64().is_some(),
        "the ETA is not shown: {eta}"
    );
    assert!(
        eta["started_ms"].as_u64().unwrap() >= eta["created_ms"].as_u64().unwrap() + 1900,
        "ran before its ETA: {eta}"
    );
    // A chain's calls are jobs linked both ways, as taskmill's own follow-ups are.
    let chain: Vec<&str> = ids["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let (last, middle, first) = (chain[0], chain[1], chain[2]);
    assert_eq!(status(&t.ns, last)["parent"], middle);
    assert_eq!(status(&t.ns, middle)["parent"], first);
    assert_eq!(status(&t.ns, first)["then_job"], middle);
    let said = String::from_utf8_lossy(&producer(&t.ns, &["status", first]).stdout).into_owned();
    assert!(
        said.contains(&format!(
            "celery:  a Celery call; its result at {}:celery-task-meta-{first}",
            t.ns
        )) && said.contains(&format!("next call {middle} published")),
        "{said}"
    );
    let mut all = ids["many"].as_array().unwrap().clone();
    all.extend(ids["chain"].as_array().unwrap().iter().cloned());
    each_succeeded_once(&t.ns, LOCAL, &all).await;
    drop((w, mp));
    let _ = std::fs::remove_dir_all(&venv);
    t.cleanup().await;
}

/// The worker is killed while its ingress holds calls it has not acked: Redis writes are
/// paused (a private Redis, so that no other test waits) before the app sends, so the ingress
/// takes a round from the broker and waits to register it. The other worker, started then,
/// gets those calls from the broker; every call returns once. (An ingress that acked calls
/// before their batches were confirmed loses that round: watched failing so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_no_celery_call() {
    const CALLS: u64 = 10_000;
    let venv = tokio::task::spawn_blocking(celery_venv);
    let t = TestNs::new();
    let redis = taskmill_tests::redis_server::PrivateRedis::start().await;
    let url = redis.url();
    let store = Store::connect(&url, &t.ns, 3600).await.unwrap();
    let mut doomed = worker(&t.ns, &url);
    catalog_ready(&store).await;
    let queue = format!("/api/queues/%2f/{}-celery", t.ns);
    let queue_has = |field: &'static str, ok: fn(u64) -> bool| {
        let queue = queue.clone();
        move || {
            let queue = queue.clone();
            async move {
                let q = mgmt::Client::new()
                    .get_json(&queue)
                    .await
                    .unwrap_or_default();
                q[field].as_u64().is_some_and(ok)
            }
        }
    };
    until(
        "the ingress consuming",
        Duration::from_secs(60),
        queue_has("consumers", |n| n == 1),
    )
    .await;
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("WRITE")
        .query_async(&mut con)
        .await
        .unwrap();
    let venv = venv.await.unwrap();
    let mut app = calls(&venv, &t.ns, &url, "many", CALLS);
    let stdout = app.stdout.take().unwrap();
    let stdout = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let sent = lines.next();
        (sent, lines)
    });
    let (sent, rest) = stdout.await.unwrap();
    assert_eq!(sent.unwrap().unwrap(), format!("sent {CALLS}"));
    // Every call is in the broker; the ingress took some (its prefetch) and waits on Redis.
    until(
        "the ingress holding calls",
        Duration::from_secs(60),
        queue_has("messages_ready", |n| n < CALLS),
    )
    .await;
    doomed.process.kill().unwrap();
    let other = worker(&t.ns, &url);
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut con)
        .await
        .unwrap();
    let (status, rest) = tokio::task::spawn_blocking(move || {
        let rest: Vec<String> = rest.map_while(Result::ok).collect();
        (app.wait().unwrap(), rest)
    })
    .await
    .unwrap();
    assert!(status.success(), "calls.py: {status:?}: {rest:?}");
    let ids: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    let many = ids["many"].as_array().unwrap();
    assert_eq!(many.len() as u64, CALLS);
    each_succeeded_once(&t.ns, &url, many).await;
    let jobs: u64 = redis::cmd("ZCARD")
        .arg(format!("{}:jobs", t.ns))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(jobs, CALLS, "one job a call");
    drop(other);
    let _ = std::fs::remove_dir_all(&venv);
    t.cleanup().await;
}
