//! The README's own-task example (`examples/custom-worker`) runs as a worker of its own and
//! serves its task through the stock producer.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{bin_path, sample, sigterm, write_jsonl, TestNs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_worker_serves_its_own_task() {
    let t = TestNs::new();
    let mut worker = Command::new(bin_path("custom-worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("TASKMILL_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let posts: Vec<serde_json::Value> = sample::posts(50).collect();
    let words: u64 = posts
        .iter()
        .map(|p| p["body"].as_str().unwrap().split_whitespace().count() as u64)
        .sum();
    let file = write_jsonl(posts);
    let mut args = EnqueueArgs::new("word-count");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let store = t.store().await;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.records_done, 50);
    let counted: u64 = store
        .results(&job)
        .await
        .unwrap()
        .iter()
        .map(|(_, r)| r["words"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, words);
    // The summary comes from the worker (the stock producer cannot run word-count) and shows
    // in `status`.
    taskmill_tests::until("the summary", Duration::from_secs(30), || async {
        store
            .job_status(&job)
            .await
            .unwrap()
            .unwrap()
            .summary
            .is_some()
    })
    .await;
    let out = taskmill_tests::producer(&t.ns, &["status", &job, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["summary"]["words"], words);
    assert_eq!(status["summary"]["records"], 50);
    // It still serves the built-in tasks.
    let mut builtin = EnqueueArgs::new("post-stats");
    builtin.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &builtin, |_| {}).await.unwrap().job;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert!(sigterm(worker.id()));
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
