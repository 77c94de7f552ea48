//! Enqueueing from code: the Rust client library (and the README's example program that uses
//! it), against the real RabbitMQ and Redis with real workers.
#![allow(clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::{json, Value};
use taskmill_client::{Client, Error, ErrorKind, JobSpec};
use taskmill_tests::{bin_path, catalog_ready, sample, TestNs};

async fn client(t: &TestNs) -> Client {
    Client::connect(t.conn().client_settings()).await.unwrap()
}

fn usage_error(e: &Error) -> String {
    match e {
        Error::Invalid(m) => m.clone(),
        _ => panic!("not a usage error: {e}"),
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
        .enqueue(&JobSpec::new("post-stats").id("early"), sample::posts(20))
        .await
        .unwrap();
    assert_eq!(job.id(), "early");
    let e = job.wait(Duration::from_millis(300)).await.unwrap_err();
    let Error::Timeout(timed_out) = e else {
        panic!("not a timeout: {e}")
    };
    assert_eq!(timed_out.batches_total, Some(2));
    assert_eq!(timed_out.batches_done, 0);

    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&t.store().await).await;
    let s = job.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!(s.state(), "completed");
    assert_eq!(s.summary.as_ref().unwrap()["processed_count"], 20);

    // The catalog refuses, before anything is registered.
    let bad = [
        (JobSpec::new("post-statz"), "unknown task"),
        (JobSpec::new("post-stats").param("treshold", 1), "treshold"),
        (JobSpec::new("text-stats").param("top", "abc"), "abc"),
        (
            JobSpec::new("similarity").param("threshold", 2),
            "out of range: 0 to 1",
        ),
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
        .enqueue_stream(
            &JobSpec::new("text-stats").param("top", 3).batch_size(10),
            rx,
        )
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
    let job = c
        .enqueue(&JobSpec::new("post-stats"), records)
        .await
        .unwrap();
    let s = job.wait(Duration::from_secs(60)).await.unwrap();
    assert_eq!((s.records_done, s.records_invalid), (1, 1));
    assert!(
        s.problems()[0].contains("record 2: cannot be turned into JSON"),
        "{:?}",
        s.problems()
    );
    let e = c
        .enqueue(&JobSpec::new("post-stats"), vec![weird])
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
    assert!(matches!(e, Error::NoSuchJob(_)), "{e}");
    let pages: Vec<_> = c.job("nope").results().collect().await;
    assert!(pages[0].is_err());

    // The spec is validated the same way whatever the front door: out of range is refused
    // before anything is connected, naming the option.
    let posts = || sample::posts(5);
    for (spec, expect) in [
        (
            JobSpec::new("post-stats").priority(10),
            "priority: 10 is out of range: 0 to 9",
        ),
        (
            JobSpec::new("post-stats").batch_size(0),
            "batch_size: must be at least 1",
        ),
        (JobSpec::new("post-stats").id("a:b"), "job id"),
        (
            JobSpec::new("post-stats").time_limit(Duration::ZERO),
            "time_limit: must be more than 0",
        ),
        (
            JobSpec::new("post-stats")
                .countdown(Duration::from_secs(60))
                .expires(Duration::from_secs(10)),
            "expires: ends before",
        ),
    ] {
        let e = c.enqueue(&spec, posts()).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(usage_error(&e).contains(expect), "{e}");
    }

    // Cancel and delete through the handle: a finished job is not cancelled; deleting it
    // removes it, and a second delete says it is gone.
    let h = c.job(job.id());
    let cancelled = h.cancel().await.unwrap();
    assert!(!cancelled.now, "{cancelled:?}");
    h.delete(false).await.unwrap();
    assert_eq!(h.status().await.unwrap_err().kind(), ErrorKind::NoSuchJob);
    assert_eq!(
        h.delete(false).await.unwrap_err().kind(),
        ErrorKind::NoSuchJob
    );
    // A job still pending is refused unless cancelled first.
    let held = c
        .enqueue(
            &JobSpec::new("post-stats").countdown(Duration::from_secs(3600)),
            posts(),
        )
        .await
        .unwrap();
    let e = held.delete(false).await.unwrap_err();
    assert!(usage_error(&e).contains("cancel it first"), "{e}");
    held.delete(true).await.unwrap();
    assert!(matches!(held.read().await, Err(Error::NoSuchJob(_))));

    worker.stop().await.unwrap();
    t.cleanup().await;
}

async fn store_jobs(t: &TestNs) -> usize {
    t.store().await.jobs().await.unwrap().len()
}

/// The client library sits under every front door and depends on none of them: its whole
/// dependency tree (walked in Cargo.lock) holds no command-line, web-server or progress-bar
/// crate, and the producer depends on it (not the other way round).
#[test]
fn the_client_crate_depends_on_no_front_door() {
    let root = taskmill_tests::workspace_root();
    let lock: toml::Value =
        toml::from_str(&std::fs::read_to_string(root.join("Cargo.lock")).unwrap()).unwrap();
    let packages = lock["package"].as_array().unwrap();
    let deps_of = |name: &str| -> Vec<String> {
        packages
            .iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .flat_map(|p| p.get("dependencies").and_then(|d| d.as_array()).cloned())
            .flatten()
            .filter_map(|d| d.as_str().map(|s| s.split(' ').next().unwrap().to_string()))
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec!["taskmill-client".to_string()];
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            todo.extend(deps_of(&p));
        }
    }
    assert!(seen.len() > 20, "the walk found too little: {seen:?}");
    for banned in [
        "clap",
        "axum",
        "indicatif",
        "taskmill-producer",
        "taskmill-common",
        "hyper",
    ] {
        assert!(
            !seen.contains(banned),
            "taskmill-client depends on {banned}"
        );
    }
    assert!(deps_of("taskmill-producer").contains(&"taskmill-client".to_string()));
    // No source file of the client names a producer module.
    for entry in std::fs::read_dir(root.join("clients/rust/src")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in ["taskmill_producer", "clap::", "axum::", "indicatif"] {
            assert!(!text.contains(needle), "{} names {needle}", path.display());
        }
    }
}
