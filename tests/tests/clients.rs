//! Enqueueing from code: the Rust client library (and the README's example program that uses
//! it), against the real RabbitMQ and Redis with real workers.
#![allow(clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::{json, Value};
use taskmill_producer::{
    client::{Client, Job, TimedOut},
    error::CliError,
};
use taskmill_tests::{bin_path, catalog_ready, sample, TestNs};

async fn client(t: &TestNs) -> Client {
    Client::with_settings(t.conn()).await.unwrap()
}

fn usage_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<CliError>() {
        Some(CliError::Usage(m)) => m.clone(),
        _ => panic!("not a usage error: {e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_rust_client_enqueues_waits_and_reads_results() {
    let t = TestNs::new();
    let worker = t.spawn_worker(t.worker_args());
    let out = Command::new(bin_path("rust-client"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let job = lines
        .next()
        .unwrap()
        .strip_prefix("job ")
        .unwrap()
        .to_string();
    assert_eq!(lines.next(), Some("completed: 100 records done"));
    let summary: Value =
        serde_json::from_str(lines.next().unwrap().strip_prefix("summary: ").unwrap()).unwrap();
    assert_eq!(summary["processed_count"], 100);
    // One line a batch, in order, each as stored.
    let store = t.store().await;
    let stored = store.results(&job).await.unwrap();
    let printed: Vec<&str> = lines.collect();
    assert_eq!(printed.len(), 10);
    for ((batch, result), line) in stored.iter().zip(&printed) {
        assert_eq!(*line, format!("batch {batch}: {result}"));
        assert_eq!(result["processed_count"], 10);
    }
    worker.stop().await.unwrap();
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_checks_the_catalog_streams_and_reports() {
    let t = TestNs::new();
    let c = client(&t).await;
    // No worker yet: a wait runs out of time with the job's status.
    let job = c
        .enqueue(&Job::new("post-stats").id("early"), sample::posts(20))
        .await
        .unwrap();
    assert_eq!(job.id(), "early");
    let e = job.wait(Duration::from_millis(300)).await.unwrap_err();
    let timed_out = e.downcast_ref::<TimedOut>().unwrap();
    assert_eq!(timed_out.0.batches_total, Some(2));
    assert_eq!(timed_out.0.batches_done, 0);

    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let s = job.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(s.state(), "completed");
    assert_eq!(s.summary.as_ref().unwrap()["processed_count"], 20);

    // The catalog refuses, before anything is registered.
    let bad = [
        (Job::new("post-statz"), "unknown task"),
        (Job::new("post-stats").param("treshold", 1), "treshold"),
        (Job::new("text-stats").param("top", "abc"), "abc"),
    ];
    for (spec, expect) in bad {
        let e = c.enqueue(&spec, sample::posts(5)).await.err().unwrap();
        let msg = usage_error(&e);
        assert!(msg.contains(expect), "{msg}");
    }
    assert_eq!(
        store_jobs(&t).await,
        1,
        "a refused job registered something"
    );

    // A stream that is slower than the linger: batches go out as it produces. A record serde
    // cannot turn into JSON (a map with non-string keys) is skipped and reported.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Value>();
    let feeder = tokio::spawn(async move {
        for p in sample::posts(35) {
            tx.unbounded_send(p).unwrap();
        }
    });
    let job = c
        .enqueue_stream(&Job::new("text-stats").param("top", 3).batch_size(10), rx)
        .await
        .unwrap();
    feeder.await.unwrap();
    let report = job.report().unwrap();
    assert_eq!((report.batches, report.records), (4, 35));
    let s = job.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(s.records_done, 35);
    assert_eq!(s.params.get("top").map(String::as_str), Some("3"));
    let got: Vec<(u64, Value)> = job.results().try_collect().await.unwrap();
    assert_eq!(
        got.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(got
        .iter()
        .all(|(_, r)| r["top_words"].as_array().unwrap().len() <= 3));

    // A record serde cannot turn into JSON (a map with non-string keys) is skipped and
    // reported in the job; one alone is nothing to enqueue.
    let mut weird = std::collections::HashMap::new();
    weird.insert((1, 2), "tuple keys are not JSON");
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Record {
        Post(Value),
        Weird(std::collections::HashMap<(i32, i32), &'static str>),
    }
    let records = vec![
        Record::Post(json!({"id": 1, "title": "t", "body": "a b"})),
        Record::Weird(weird.clone()),
    ];
    let job = c.enqueue(&Job::new("post-stats"), records).await.unwrap();
    let s = job.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!((s.records_done, s.records_invalid), (1, 1));
    assert!(
        s.problems()[0].contains("record 2: cannot be turned into JSON"),
        "{:?}",
        s.problems()
    );
    let e = c
        .enqueue(&Job::new("post-stats"), vec![weird])
        .await
        .err()
        .unwrap();
    assert!(
        usage_error(&e).contains("cannot be turned into JSON"),
        "{e:#}"
    );

    // A handle from an id follows a job enqueued by anyone; an unknown id says so.
    let again = c.job(job.id()).status().await.unwrap();
    assert_eq!(again.job, job.id());
    let e = c.job("nope").status().await.unwrap_err();
    assert!(matches!(
        e.downcast_ref::<CliError>(),
        Some(CliError::NoSuchJob(_))
    ));
    let pages: Vec<_> = c.job("nope").results().collect().await;
    assert!(pages[0].is_err());

    worker.stop().await.unwrap();
    t.cleanup().await;
}

async fn store_jobs(t: &TestNs) -> usize {
    t.store().await.jobs().await.unwrap().len()
}
