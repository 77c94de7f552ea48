//! The whole pipeline on the real RabbitMQ and Redis: producer → workers → Redis.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{json, Value};
use taskmill_common::{
    store::JobStatus, task::Task, task::TaskContext, tasks::post_stats::PostStats,
};
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{sample, write_jsonl, TestNs};
use taskmill_worker::Stats;

fn expected_summary(posts: &[Value]) -> Value {
    let params = Default::default();
    let ctx = TaskContext {
        params: &params,
        job: "x",
        batch: 0,
        attempt: 1,
        deadline: None,
    };
    PostStats.run(&ctx, posts).unwrap().result
}

fn assert_close(a: &Value, b: &Value, field: &str) {
    let (x, y) = (a[field].as_f64().unwrap(), b[field].as_f64().unwrap());
    assert!((x - y).abs() < 1e-9, "{field}: {x} vs {y}");
}

fn assert_done_once(status: &JobStatus) {
    assert_eq!(status.state(), "completed", "{:?}", status);
    assert_eq!(
        Some(status.batches_done),
        status.batches_total,
        "{:?}",
        status
    );
    assert_eq!(status.batches_dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_through_two_workers_is_done_once_with_the_right_summary() {
    let t = TestNs::new();
    let mut wargs = t.worker_args();
    wargs.prefetch = 8;
    let w1 = t.spawn_worker(wargs.clone());
    let w2 = t.spawn_worker(wargs);
    let posts: Vec<Value> = sample::posts(3000).collect();
    let file = write_jsonl(posts.clone());
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    assert_eq!(report.batches, 300);
    assert_eq!(report.records, 3000);

    let store = t.store().await;
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(120))
        .await;
    assert_done_once(&status);
    assert_eq!(status.batches_total.unwrap_or(0), 300);
    assert_eq!(status.records_total, 3000);
    assert_eq!(status.records_done, 3000);
    assert_eq!(status.records_invalid, 0);

    // Every batch has exactly one result, and the workers' own counts add up to the total.
    let results = store.results(&report.job).await.unwrap();
    let numbers: Vec<u64> = results.iter().map(|(b, _)| *b).collect();
    assert_eq!(numbers, (0..300).collect::<Vec<_>>());
    let done = Stats::get(&w1.stats.batches_done) + Stats::get(&w2.stats.batches_done);
    assert_eq!(done, 300);
    assert!(Stats::get(&w1.stats.batches_done) > 0 && Stats::get(&w2.stats.batches_done) > 0);

    // The summary equals post-stats computed in one go over all posts.
    let task = taskmill_common::tasks::builtin().get("post-stats").unwrap();
    let summary = task.aggregate(&results.into_iter().map(|(_, r)| r).collect::<Vec<_>>());
    let expected = expected_summary(&posts);
    assert_eq!(summary["processed_count"], 3000);
    assert_eq!(summary["max_body_length"], expected["max_body_length"]);
    assert_close(&summary, &expected, "avg_title_length");
    assert_close(&summary, &expected, "title_entropy");

    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_skipped_counted_and_reported() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let path = std::env::temp_dir().join(format!("taskmill-bad-{}.jsonl", t.ns));
    let text = [
        r#"{"title": "good one", "body": "text"}"#,
        r#"{"title": "missing body"}"#,
        r#"{"title": "broken", "body": "#,
        r#"{"title": 42, "body": "title is not a string"}"#,
        "",
        r#"[{"title": "in an array", "body": "x"}, {"title": "also", "body": "yy"}]"#,
        "not json at all",
    ]
    .join("\n");
    std::fs::write(&path, text).unwrap();
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![path.clone()];
    args.batch_size = 2;
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    // 5 records parsed (good, missing body, title 42, two in the array); 2 lines malformed.
    assert_eq!(report.records, 5);
    assert_eq!(report.problems.records_invalid, 2);
    let name = path.display().to_string();
    assert!(report.problems.samples[0].starts_with(&format!("{name}:3:")));
    assert!(report.problems.samples[1].starts_with(&format!("{name}:7:")));

    let store = t.store().await;
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_done_once(&status);
    assert_eq!(status.records_done, 3);
    // 2 malformed lines (producer) + 2 unusable records (task).
    assert_eq!(status.records_invalid, 4);
    assert_eq!(status.problems().len(), 2);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(path);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_tasks_run_end_to_end() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    let mut posts: Vec<Value> = sample::posts(200).collect();
    // Two near-duplicates in the first batch of 100 for `similarity`.
    posts[1]["body"] = posts[0]["body"].clone();
    let file = write_jsonl(posts);
    for (task, params) in [
        ("post-stats", vec![]),
        ("text-stats", vec!["top=5".to_string()]),
        ("similarity", vec!["threshold=0.9".to_string()]),
        ("chaos", vec!["spin_us=10".to_string()]),
    ] {
        let mut args = EnqueueArgs::new(task);
        args.files = vec![file.clone()];
        args.batch_size = 100;
        args.params = params;
        let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
        let status = t
            .wait_finished(&store, &report.job, Duration::from_secs(60))
            .await;
        assert_done_once(&status);
        assert_eq!(status.records_done, 200, "{task}");
        let results: Vec<Value> = store
            .results(&report.job)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let summary = taskmill_common::tasks::builtin()
            .get(task)
            .unwrap()
            .aggregate(&results);
        match task {
            "text-stats" => {
                assert_eq!(summary["records"], 200);
                assert_eq!(summary["top_words"].as_array().unwrap().len(), 5);
            }
            "similarity" => {
                assert!(summary["pair_count"].as_u64().unwrap() >= 1);
                let top = &summary["top_pairs"][0];
                assert_eq!((top["a"].clone(), top["b"].clone()), (json!(1), json!(2)));
            }
            "chaos" => assert_eq!(summary["records"], 200),
            _ => assert_eq!(summary["processed_count"], 200),
        }
    }
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
