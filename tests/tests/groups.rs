//! Groups of jobs (`enqueue --group`): counted by state with `status --group`, waited for as
//! one with `wait --group`, from the command line and the HTTP API.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use taskmill_tests::{
    catalog_ready, enqueue_file, post_job, producer, sample, write_jsonl, Dashboard, TestNs,
    ALL_DIE,
};

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_counted_and_waited_for_as_one() {
    let t = TestNs::new();
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let file = write_jsonl(sample::posts(30));
    let path = file.to_str().unwrap();
    let enqueue = |extra: &[&str]| {
        let mut args = vec!["enqueue", "--file", path, "--group", "nightly"];
        args.extend_from_slice(extra);
        let out = producer(&t.ns, &args);
        assert!(out.status.success(), "{out:?}");
    };
    enqueue(&["--job", "g-a"]);
    enqueue(&[&ALL_DIE[..], &["--job", "g-b"]].concat());
    // No worker serves this queue: the job stays pending, so the group is not finished.
    enqueue(&["--job", "g-c", "--queue", "nobody", "--no-check"]);
    let dash = Dashboard::start(&t.ns, &[]);
    let records: Vec<Value> = sample::posts(20).collect();
    let body = serde_json::json!({"task": "post-stats", "records": records, "job": "g-d", "group": "nightly"});
    assert_eq!(post_job(&dash.url, &body).await, 201);
    dash.stop();

    // The waiting ends at the timeout (exit 3) while g-c is pending, with the group's view.
    let out = producer(
        &t.ns,
        &["wait", "--group", "nightly", "--timeout", "2s", "--json"],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let view = json(&out);
    assert_eq!(view["jobs"], 4, "{view}");
    assert_eq!(view["finished"], false, "{view}");
    assert_eq!(view["counts"]["pending"], 1, "{view}");
    let out = producer(&t.ns, &["status", "g-a", "--json"]);
    assert_eq!(json(&out)["group"], "nightly");

    // Cancelled, g-c finishes the group: not every job completed, so exit 1.
    assert!(producer(&t.ns, &["cancel", "g-c"]).status.success());
    let out = producer(
        &t.ns,
        &["wait", "--group", "nightly", "--json", "--timeout", "60s"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let view = json(&out);
    assert_eq!(view["finished"], true, "{view}");
    assert_eq!(view["counts"]["completed"], 2, "{view}");
    assert_eq!(view["counts"]["completed_with_errors"], 1, "{view}");
    assert_eq!(view["counts"]["cancelled"], 1, "{view}");
    let ids: Vec<&str> = view["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["job"].as_str())
        .collect();
    assert_eq!(ids, ["g-a", "g-b", "g-c", "g-d"]);
    let out = producer(&t.ns, &["status", "--group", "nightly"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("group nightly: 4 jobs, finished"),
        "{text}"
    );
    assert!(
        text.contains("g-b  completed_with_errors  0 done, 3 dead of 3 batches"),
        "{text}"
    );

    // Unknown group: exit 4; a job id and --group together: a usage error.
    assert_eq!(
        producer(&t.ns, &["status", "--group", "nope"])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(
        producer(&t.ns, &["wait", "g-a", "--group", "nightly"])
            .status
            .code(),
        Some(2)
    );
    let out = producer(&t.ns, &["enqueue", "--file", path, "--group", "a:b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}

/// `group close G --then TASK` (a chord): the follow-up runs once over the results of every job
/// of the group, fired by the script that ends the last of them (two workers finishing jobs at
/// once); the closed group refuses new jobs; a close after every job ended fires at once; a
/// trigger that does not hold says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_group_fires_its_chord_once_over_every_result() {
    let t = TestNs::new();
    let w1 = t.spawn_worker(t.worker_args());
    let w2 = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    catalog_ready(&store).await;
    let file = write_jsonl(sample::posts(10));
    // 20 jobs of 2 batches each, spread over two workers; the last on a queue no worker serves
    // yet, so that the group is closed while a job of it has not ended.
    for i in 0..20 {
        let job = format!("ch-{i:02}");
        let queue = if i == 19 { "later" } else { "tasks" };
        let out = enqueue_file(
            &t.ns,
            &file,
            &[
                "--task",
                "chaos",
                "--param",
                "sleep_ms=20",
                "--batch-size",
                "5",
                "--job",
                &job,
                "--group",
                "g20",
                "--queue",
                queue,
                "--no-check",
            ],
        );
        assert!(out.status.success(), "{out:?}");
    }
    // A typo'd follow-up is refused by the catalog, and the group stays open.
    let out = producer(&t.ns, &["group", "close", "g20", "--then", "chaoss"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("follow-up step: unknown task"),
        "{out:?}"
    );
    assert!(store.group_info("g20").await.unwrap().closed_ms.is_none());
    let out = producer(
        &t.ns,
        &[
            "group",
            "close",
            "g20",
            "--then",
            "chaos",
            "--then-batch-size",
            "8",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["then_job_id"], "g20.chord");
    // Closed: no more jobs join it; closing again the same way is harmless, another way not.
    let out = enqueue_file(&t.ns, &file, &["--group", "g20", "--job", "late"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("group g20 is closed"),
        "{out:?}"
    );
    let out = producer(
        &t.ns,
        &[
            "group",
            "close",
            "g20",
            "--then",
            "chaos",
            "--then-batch-size",
            "8",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("closed already"),
        "{out:?}"
    );
    let out = producer(&t.ns, &["group", "close", "g20", "--then", "post-stats"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        producer(&t.ns, &["group", "close", "nope"]).status.code(),
        Some(4)
    );

    // 19 jobs ended, one pending: nothing fired.
    taskmill_tests::until("19 jobs completed", Duration::from_secs(60), || async {
        let out = producer(&t.ns, &["status", "--group", "g20", "--json"]);
        json(&out)["counts"]["completed"] == 19
    })
    .await;
    let info = store.group_info("g20").await.unwrap();
    assert!(
        info.fired_ms.is_none() && info.then_job.is_none(),
        "{info:?}"
    );
    assert_eq!(info.ended.len(), 19);
    assert!(store.outbox(10).await.unwrap().is_empty());
    let mut later = t.worker_args();
    later.queues = vec!["later".into()];
    let w3 = t.spawn_worker(later);

    // wait --group --chain ends with the chord's status.
    let out = producer(
        &t.ns,
        &[
            "wait",
            "--group",
            "g20",
            "--chain",
            "--json",
            "--timeout",
            "120s",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let chord = json(&out);
    assert_eq!(chord["job"], "g20.chord", "{chord}");
    assert_eq!(chord["state"], "completed", "{chord}");
    assert_eq!(chord["parent"], "group:g20", "{chord}");
    assert_eq!(chord["parent_outcome"]["jobs"], 20, "{chord}");
    assert_eq!(
        chord["parent_outcome"]["counts"]["completed"], 20,
        "{chord}"
    );
    // One record a result of each of the 20 jobs' 2 batches: 40 records in batches of 8.
    assert_eq!(chord["records_total"], 40, "{chord}");
    assert_eq!(chord["batches_total"], 5, "{chord}");
    // Fired once: one entry went through the outbox and was settled with the chord job.
    let out = producer(&t.ns, &["status", "--group", "g20", "--json"]);
    let view = json(&out);
    assert_eq!(view["closed"], true, "{view}");
    assert_eq!(view["then_job"], "g20.chord", "{view}");
    assert_eq!(view["then_note"], "published chaos over 20 jobs", "{view}");
    let mut con = taskmill_tests::redis_con().await;
    let outbox: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{}:outbox", t.ns))
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(outbox.is_empty(), "{outbox:?}");
    let text =
        String::from_utf8_lossy(&producer(&t.ns, &["status", "g20.chord"]).stdout).into_owned();
    assert!(
        text.contains("follows: group g20, which ended completed (20 jobs: 20 completed)"),
        "{text}"
    );

    // A group closed after its jobs ended fires at once; `success` does not run after a dead
    // batch, and says why.
    let out = enqueue_file(&t.ns, &file, &["--group", "late-close", "--job", "lc-a"]);
    assert!(out.status.success(), "{out:?}");
    let out = enqueue_file(
        &t.ns,
        &file,
        &[&ALL_DIE[..], &["--group", "late-close", "--job", "lc-b"]].concat(),
    );
    assert!(out.status.success(), "{out:?}");
    let out = producer(
        &t.ns,
        &["wait", "--group", "late-close", "--timeout", "60s"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = producer(
        &t.ns,
        &[
            "group",
            "close",
            "late-close",
            "--then",
            "chaos",
            "--then-on",
            "success",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = producer(
        &t.ns,
        &[
            "wait",
            "--group",
            "late-close",
            "--chain",
            "--json",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let view = json(&out);
    assert_eq!(
        view["then_note"],
        "skipped: job lc-b ended completed_with_errors and chaos runs on success",
        "{view}"
    );
    assert!(view.get("then_job").is_none_or(Value::is_null), "{view}");
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
    w3.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}

/// Through the Python client: two jobs in a group, closed with a chord; the chord's job waited
/// for; enqueueing into the closed group refused.
const PYTHON: &str = r#"
import json, os, time
from taskmill import Client
c = Client(namespace=os.environ["TASKMILL_NAMESPACE"])
records = [json.loads(line) for line in open(os.environ["RECORDS"])]
for j in ("py-a", "py-b"):
    c.enqueue("post-stats", records, batch_size=10, job_id=j, group="py-g")
out = {"chord_id": c.close_group("py-g", then=[{"task": "chaos", "batch_size": 3}])}
out["again"] = c.close_group("py-g", then=[{"task": "chaos", "batch_size": 3}])
for what, call in (("other", lambda: c.close_group("py-g", then=[{"task": "post-stats"}])),
                   ("late", lambda: c.enqueue("post-stats", records, group="py-g")),
                   ("none", lambda: c.close_group("py-nope"))):
    try:
        call()
    except (ValueError, KeyError) as e:
        out[what] = f"{type(e).__name__}: {e}"
deadline = time.monotonic() + 60
while "then_job" not in c.group("py-g") and time.monotonic() < deadline:
    time.sleep(0.1)
out["chord"] = c.wait(out["chord_id"], timeout=60)
out["group"] = c.group("py-g")
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_and_the_python_client_close_groups() {
    let t = TestNs::new();
    let venv = tokio::task::spawn_blocking(taskmill_tests::python_venv);
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let dash = Dashboard::start(&t.ns, &[]);
    let http = reqwest::Client::new();
    let records: Vec<Value> = sample::posts(20).collect();
    for id in ["api-a", "api-b"] {
        let body = serde_json::json!({"task": "post-stats", "records": records, "job": id, "batch_size": 10, "group": "api-g"});
        assert_eq!(post_job(&dash.url, &body).await, 201);
    }
    let close = |group: &str, body: String| {
        let req = http
            .post(format!("{}api/groups/{group}/close", dash.url))
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let chord = r#"{"then": [{"task": "chaos", "batch_size": 2, "params": {"sleep_ms": 1}}]}"#;
    let (code, text) = close("api-g", chord.into()).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(r#""then_job_id":"api-g.chord""#), "{text}");
    assert_eq!(close("api-g", chord.into()).await.0, 200);
    assert_eq!(close("api-g", String::new()).await.0, 409);
    assert_eq!(close("nope", String::new()).await.0, 404);
    let (code, text) = close(
        "api-g",
        r#"{"then": [{"task": "chaos", "on": "never"}]}"#.into(),
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("then[0].on"), "{text}");
    assert_eq!(close("a:b", String::new()).await.0, 400);
    let late = serde_json::json!({"task": "post-stats", "records": records, "group": "api-g"});
    let r = http
        .post(format!("{}api/jobs", dash.url))
        .body(late.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let said = r.text().await.unwrap();
    assert!(said.contains("group api-g is closed"), "{said}");

    let out = producer(
        &t.ns,
        &[
            "wait",
            "--group",
            "api-g",
            "--chain",
            "--json",
            "--timeout",
            "60s",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let last = json(&out);
    assert_eq!(last["job"], "api-g.chord", "{last}");
    assert_eq!(last["records_total"], 4, "{last}");
    assert_eq!(last["params"]["sleep_ms"], "1", "{last}");
    let view: Value = http
        .get(format!("{}api/groups/api-g", dash.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["jobs"], 2, "{view}");
    assert_eq!(view["closed"], true, "{view}");
    assert_eq!(view["then_job"], "api-g.chord", "{view}");
    dash.stop();

    let venv = venv.await.unwrap();
    let file = write_jsonl(sample::posts(30));
    let got = taskmill_tests::run_python(&venv, PYTHON, &t.ns, Some(&file));
    let _ = std::fs::remove_dir_all(&venv);
    let _ = std::fs::remove_file(&file);
    assert_eq!(got["chord_id"], "py-g.chord", "{got}");
    assert_eq!(got["again"], "py-g.chord", "{got}");
    assert!(
        got["other"]
            .as_str()
            .unwrap_or_default()
            .contains("another follow-up"),
        "{got}"
    );
    assert!(
        got["late"]
            .as_str()
            .unwrap_or_default()
            .contains("group py-g is closed"),
        "{got}"
    );
    assert!(
        got["none"]
            .as_str()
            .unwrap_or_default()
            .starts_with("NoSuchJob"),
        "{got}"
    );
    assert_eq!(got["chord"]["state"], "completed", "{got}");
    // Two jobs of 3 batches each: 6 results, in batches of 3.
    assert_eq!(got["chord"]["records_total"], 6, "{got}");
    assert_eq!(got["chord"]["parent"], "group:py-g", "{got}");
    assert_eq!(got["chord"]["parent_outcome"]["jobs"], 2, "{got}");
    assert_eq!(got["group"]["closed"], true, "{got}");
    assert_eq!(got["group"]["counts"]["completed"], 2, "{got}");
    worker.stop().await.unwrap();
    t.cleanup().await;
}
