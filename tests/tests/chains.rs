//! Follow-up jobs (`enqueue --then`): a chain of steps, each over the batch results of the job
//! before it, fired by the script that stores the last result (an outbox entry) and published
//! by a worker; a trigger that does not hold records why; a worker killed as the job finishes
//! loses no follow-up and makes none twice. The real `producer` binary, workers in-process
//! and as a binary.

#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use taskmill_tests::{
    bin_path, catalog_ready, enqueue_file, producer, python_venv, sample, until, write_jsonl,
    Dashboard, KillOnDrop, TestNs, ALL_DIE,
};

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `producer wait JOB --chain --json`, a minute at most.
fn wait_chain(ns: &str, job: &str) -> std::process::Output {
    producer(ns, &["wait", job, "--chain", "--json", "--timeout", "60s"])
}

fn status(ns: &str, job: &str) -> Value {
    let out = producer(ns, &["status", job, "--json"]);
    assert!(out.status.success(), "status {job}: {out:?}");
    json(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_runs_each_step_over_the_results_of_the_one_before() {
    let t = TestNs::new();
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let file = write_jsonl(sample::posts(100));
    // post-stats over 100 posts in 10 batches; chaos over its 10 results in batches of 5;
    // chaos again over those 2 results.
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            file.to_str().unwrap(),
            "--task",
            "post-stats",
            "--batch-size",
            "10",
            "--job",
            "c1",
            "--then",
            "chaos",
            "--then-param",
            "sleep_ms=1",
            "--then-batch-size",
            "5",
            "--then",
            "chaos",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = wait_chain(&t.ns, "c1");
    assert!(out.status.success(), "{out:?}");
    let last = json(&out);
    assert_eq!(last["job"], "c1.then2", "{last}");
    assert_eq!(last["state"], "completed", "{last}");
    assert_eq!(last["records_total"], 2, "{last}");
    assert_eq!(last["parent"], "c1.then1", "{last}");
    assert!(
        last.get("then").is_none(),
        "the last step has none after it: {last}"
    );

    let first = status(&t.ns, "c1");
    assert_eq!(first["then_job"], "c1.then1", "{first}");
    assert_eq!(first["then_note"], "published chaos", "{first}");
    let middle = status(&t.ns, "c1.then1");
    assert_eq!(middle["parent"], "c1", "{middle}");
    assert_eq!(middle["params"]["sleep_ms"], "1", "{middle}");
    assert_eq!(
        middle["records_total"], 10,
        "one record a result of c1: {middle}"
    );
    assert_eq!(middle["batches_total"], 2, "{middle}");
    assert_eq!(middle["then_job"], "c1.then2", "{middle}");
    // Each result of c1 became one record of c1.then1, in batch order (chaos says how many
    // records each batch had: 5 and 5).
    let out = producer(&t.ns, &["results", "c1.then1"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\"records\":5").count(), 2, "{text}");
    // The text status names both ends of each link.
    let out = producer(&t.ns, &["status", "c1.then1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("follows: c1"), "{text}");
    assert!(
        text.contains("then:    chaos (published chaos: job c1.then2)"),
        "{text}"
    );
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_that_does_not_run_says_why() {
    let t = TestNs::new();
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let file = write_jsonl(sample::posts(30));
    // Every batch of the parent dies: `--then-on success` does not run, and says so.
    let out = enqueue_file(
        &t.ns,
        &file,
        &[
            &ALL_DIE[..],
            &[
                "--job",
                "dies",
                "--then",
                "post-stats",
                "--then-on",
                "success",
            ],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{out:?}");
    let out = wait_chain(&t.ns, "dies");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let last = json(&out);
    assert_eq!(last["job"], "dies", "{last}");
    assert_eq!(last["state"], "completed_with_errors", "{last}");
    let note = last["then_note"].as_str().unwrap_or_default();
    assert!(
        note.contains("skipped") && note.contains("success"),
        "{last}"
    );
    assert!(last.get("then_job").is_none(), "{last}");
    let out = producer(&t.ns, &["status", "dies.then1"]);
    assert_eq!(out.status.code(), Some(4), "no follow-up job: {out:?}");

    // With the default trigger (complete) it runs even so: over no results, it cannot be
    // enqueued, and says that instead of waiting for ever.
    let out = enqueue_file(
        &t.ns,
        &file,
        &[&ALL_DIE[..], &["--job", "dies2", "--then", "post-stats"]].concat(),
    );
    assert!(out.status.success(), "{out:?}");
    let out = wait_chain(&t.ns, "dies2");
    let last = json(&out);
    assert_eq!(last["job"], "dies2", "{last}");
    assert!(
        last["then_note"]
            .as_str()
            .is_some_and(|n| n.starts_with("not enqueued")),
        "{last}"
    );

    // Some batches die (which ones is a pure function of the seed): the `complete` follow-up
    // runs over the others' results, and carries how its parent ended.
    let killed = |seed: u64| {
        (0..3u64)
            .filter(|b| taskmill_common::tasks::chaos::fails(0.5, seed, "half", *b, 1))
            .count()
    };
    let seed = (0..100).find(|s| (1..3).contains(&killed(*s))).unwrap();
    let dead = killed(seed);
    let seed_param = format!("seed={seed}");
    let out = enqueue_file(
        &t.ns,
        &file,
        &[
            "--task",
            "chaos",
            "--param",
            "fail_rate=0.5",
            "--param",
            &seed_param,
            "--param",
            "fail=permanent",
            "--job",
            "half",
            "--then",
            "chaos",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = wait_chain(&t.ns, "half");
    assert!(out.status.success(), "{out:?}");
    let last = json(&out);
    assert_eq!(last["job"], "half.then1", "{last}");
    assert_eq!(last["records_total"], 3 - dead, "{last}");
    let outcome = &last["parent_outcome"];
    assert_eq!(outcome["state"], "completed_with_errors", "{last}");
    assert_eq!(outcome["batches_dead"], dead, "{last}");
    assert_eq!(outcome["batches_done"], 3 - dead, "{last}");
    let text =
        String::from_utf8_lossy(&producer(&t.ns, &["status", "half.then1"]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "follows: half, which ended completed_with_errors ({} batches done, {dead} dead)",
            3 - dead
        )),
        "{text}"
    );

    // A cancelled job fires nothing: `wait --chain` returns at once with its status.
    let out = enqueue_file(
        &t.ns,
        &file,
        &[
            "--queue",
            "nobody",
            "--job",
            "stopped",
            "--then",
            "chaos",
            "--no-check",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(producer(&t.ns, &["cancel", "stopped"]).status.success());
    let out = wait_chain(&t.ns, "stopped");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let last = json(&out);
    assert_eq!(last["state"], "cancelled", "{last}");
    assert!(last.get("then_fired_ms").is_none(), "{last}");

    // A typo'd step is refused at the enqueue, by the catalog, and registers nothing; an
    // option of a step before any --then is a usage error.
    let out = enqueue_file(&t.ns, &file, &["--job", "typo", "--then", "post-statz"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("follow-up step: unknown task"), "{said}");
    assert_eq!(producer(&t.ns, &["status", "typo"]).status.code(), Some(4));
    let out = enqueue_file(&t.ns, &file, &["--then-param", "a=1", "--then", "chaos"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--then-param comes before any --then"));
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}

/// The worker that stores a job's last result is killed (kill -9) between that store and the
/// follow-up's publish: held there deterministically by a claim on the outbox entry taken by
/// the test first (as a worker that claimed it and died would hold it). Once the claim lapses,
/// another worker publishes the follow-up, once, and the three-step chain over 10,000 posts
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_as_the_job_finishes_loses_no_follow_up() {
    let t = TestNs::new();
    let store = t.store().await;
    let mut first = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    catalog_ready(&store).await;
    let mut con = taskmill_tests::redis_con().await;
    let claim = store.keys().outbox_claim("k1");
    let _: () = redis::cmd("SET")
        .arg(&claim)
        .arg("the-test")
        .arg("PX")
        .arg(600_000)
        .query_async(&mut con)
        .await
        .unwrap();
    let file = write_jsonl(sample::posts(10_000));
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            file.to_str().unwrap(),
            "--task",
            "post-stats",
            "--job",
            "k1",
            "--then",
            "chaos",
            "--then",
            "chaos",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    // Finished and fired, in one script: the entry is in the outbox; nothing published.
    until("k1 finished", Duration::from_secs(120), || async {
        store
            .job_status("k1")
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.is_finished())
    })
    .await;
    let fired = store.job_status("k1").await.unwrap().unwrap();
    assert_eq!(fired.batches_done, 1000, "{fired:?}");
    assert!(fired.then_fired_ms.is_some(), "fired with the last result");
    assert!(fired.then_job.is_none(), "{fired:?}");
    assert_eq!(store.outbox(10).await.unwrap(), ["k1"]);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert_eq!(
        producer(&t.ns, &["status", "k1.then1"]).status.code(),
        Some(4)
    );
    // The claim lapses in 2 s, as a dead worker's would; another worker publishes.
    let _: () = redis::cmd("PEXPIRE")
        .arg(&claim)
        .arg(2000)
        .query_async(&mut con)
        .await
        .unwrap();
    let second = t.spawn_worker(t.worker_args());
    let out = wait_chain(&t.ns, "k1");
    assert!(out.status.success(), "{out:?}");
    let last = json(&out);
    assert_eq!(last["job"], "k1.then2", "{last}");
    assert_eq!(last["state"], "completed", "{last}");
    // Each step's records are the step before's results: k1's 1,000 batches, then1's 100.
    assert_eq!(last["records_total"], 100, "{last}");
    let middle = status(&t.ns, "k1.then1");
    assert_eq!(middle["records_total"], 1000, "{middle}");
    assert_eq!(middle["batches_total"], 100, "{middle}");
    let out = producer(&t.ns, &["jobs", "--json"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listed.matches("\"job\":").count(),
        3,
        "k1 and one job a step: {listed}"
    );
    assert_eq!(status(&t.ns, "k1")["then_note"], "published chaos");
    let outbox: Vec<String> = store.outbox(10).await.unwrap();
    assert!(outbox.is_empty(), "settled: {outbox:?}");
    second.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}

/// Through the Python client: a follow-up in batches of 5, waited for with `chain=True`; a
/// bad trigger refused before anything is registered.
const PYTHON: &str = r#"
import json, os
from taskmill import Client
c = Client(namespace=os.environ["TASKMILL_NAMESPACE"])
records = [json.loads(line) for line in open(os.environ["RECORDS"])]
job = c.enqueue("post-stats", records, batch_size=10, job_id="py",
                then=[{"task": "chaos", "params": {"sleep_ms": 1}, "batch_size": 5}])
last = c.wait(job, timeout=60, chain=True)
out = {"last": last, "first": c.status("py")}
try:
    c.enqueue("post-stats", records, job_id="py-bad", then=[{"task": "chaos", "on": "always"}])
except ValueError as e:
    out["bad"] = str(e)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_and_the_python_client_take_follow_ups() {
    let t = TestNs::new();
    let venv = tokio::task::spawn_blocking(python_venv);
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let dash = Dashboard::start(&t.ns, &[]);
    let http = reqwest::Client::new();
    let records: Vec<Value> = sample::posts(40).collect();
    let body = serde_json::json!({
        "task": "post-stats", "records": records, "job": "api", "batch_size": 10,
        "then": [{"task": "chaos", "params": {"sleep_ms": 1}, "on": "success", "batch_size": 2}],
    });
    let r = http
        .post(format!("{}api/jobs", dash.url))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    let bad = serde_json::json!({"task": "post-stats", "records": [{}], "then": [{"task": "chaos", "on": "always"}]});
    let r = http
        .post(format!("{}api/jobs", dash.url))
        .body(bad.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let said = r.text().await.unwrap();
    assert!(said.contains("then[0].on"), "{said}");
    let out = wait_chain(&t.ns, "api");
    assert!(out.status.success(), "{out:?}");
    let last = json(&out);
    assert_eq!(last["job"], "api.then1", "{last}");
    assert_eq!(last["records_total"], 4, "{last}");
    assert_eq!(last["batches_total"], 2, "{last}");
    assert_eq!(last["params"]["sleep_ms"], "1", "{last}");
    dash.stop();

    let venv = venv.await.unwrap();
    let file = write_jsonl(sample::posts(30));
    let got = taskmill_tests::run_python(&venv, PYTHON, &t.ns, Some(&file));
    let _ = std::fs::remove_dir_all(&venv);
    let _ = std::fs::remove_file(&file);
    assert_eq!(got["last"]["job"], "py.then1", "{got}");
    assert_eq!(got["last"]["records_total"], 3, "{got}");
    assert_eq!(got["last"]["parent"], "py", "{got}");
    assert_eq!(got["first"]["then_job"], "py.then1", "{got}");
    assert!(
        got["bad"]
            .as_str()
            .unwrap_or_default()
            .contains("not complete or success"),
        "{got}"
    );
    assert_eq!(
        producer(&t.ns, &["status", "py-bad"]).status.code(),
        Some(4)
    );
    worker.stop().await.unwrap();
    t.cleanup().await;
}
