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
use taskmill_tests::{celery_venv, producer, until, workspace_root, Logged, TestNs};

/// A worker binary consuming the namespace's Celery queue (results under the namespace).
fn worker(ns: &str) -> Logged {
    let queue = format!("{ns}-celery");
    let prefix = format!("{ns}:celery-task-meta-");
    Logged::spawn(
        ns,
        "worker",
        &[
            "--threads",
            "1",
            "--celery-queue",
            &queue,
            "--celery-key-prefix",
            &prefix,
        ],
        &[("RUST_LOG", "warn".to_string())],
        Stdio::null(),
    )
}

/// `tests/celery/calls.py` against the namespace's queue: (exit status, stdout, stderr).
fn calls(venv: &Path, ns: &str, mode: &str, n: u64) -> std::process::Child {
    Command::new(venv.join("bin/python"))
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
async fn each_succeeded_once(t: &TestNs, ids: &[Value]) {
    let store = t.store().await;
    let mut con = taskmill_tests::redis_con().await;
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
            .arg(format!("{}:celery-task-meta-{id}", t.ns))
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
    let w = worker(&t.ns);
    let venv = venv.await.unwrap();
    let ns = t.ns.clone();
    let v = venv.clone();
    let out =
        tokio::task::spawn_blocking(move || calls(&v, &ns, "checks", 2000).wait_with_output())
            .await
            .unwrap()
            .unwrap();
    let ids = ids_of(out);
    assert!(
        w.said().is_empty() || !w.said().contains("panicked"),
        "{}",
        w.said()
    );

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
    let eta = status(&t.ns, ids["eta"].as_str().unwrap());
    assert!(
        eta["started_ms"].as_u64().unwrap() >= eta["created_ms"].as_u64().unwrap() + 1900,
        "ran before its ETA: {eta}"
    );
    each_succeeded_once(&t, ids["many"].as_array().unwrap()).await;
    drop(w);
    let _ = std::fs::remove_dir_all(&venv);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_no_celery_call() {
    const CALLS: u64 = 4000;
    let venv = tokio::task::spawn_blocking(celery_venv);
    let t = TestNs::new();
    let mut doomed = worker(&t.ns);
    let other = worker(&t.ns);
    let venv = venv.await.unwrap();
    let app = calls(&venv, &t.ns, "many", CALLS);
    // Killed once a quarter of the calls are jobs: it holds Celery messages not yet acked and
    // batches not yet stored, which the broker gives to the other worker.
    let mut con = taskmill_tests::redis_con().await;
    let jobs = format!("{}:jobs", t.ns);
    until(
        "a quarter of the calls registered",
        Duration::from_secs(120),
        || {
            let (mut con, jobs) = (con.clone(), jobs.clone());
            async move {
                let n: u64 = redis::cmd("ZCARD")
                    .arg(&jobs)
                    .query_async(&mut con)
                    .await
                    .unwrap_or(0);
                n >= CALLS / 4
            }
        },
    )
    .await;
    doomed.process.kill().unwrap();
    let out = tokio::task::spawn_blocking(move || app.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let ids = ids_of(out);
    let many = ids["many"].as_array().unwrap();
    assert_eq!(many.len() as u64, CALLS);
    each_succeeded_once(&t, many).await;
    let n: u64 = redis::cmd("ZCARD")
        .arg(&jobs)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(n, CALLS, "one job a call");
    drop(other);
    let _ = std::fs::remove_dir_all(&venv);
    t.cleanup().await;
}
