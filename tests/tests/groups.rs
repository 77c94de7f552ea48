//! Groups of jobs (`enqueue --group`): counted by state with `status --group`, waited for as
//! one with `wait --group`, from the command line and the HTTP API.

#![allow(clippy::unwrap_used)]

use serde_json::Value;
use taskmill_tests::{
    catalog_ready, post_job, producer, sample, write_jsonl, Dashboard, TestNs, ALL_DIE,
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
