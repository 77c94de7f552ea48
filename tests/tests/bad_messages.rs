//! Messages a worker cannot use are dead-lettered with the reason; the worker goes on.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, time::Duration};

use lapin::{options::BasicPublishOptions, BasicProperties};
use serde_json::json;
use taskmill_common::{
    amqp::{batch_properties, header_i64, header_str},
    envelope::{
        encode, Envelope, FORMAT_VERSION, HEADER_ATTEMPT, HEADER_ERROR, HEADER_ERROR_KIND,
        HEADER_ORIGINAL_QUEUE,
    },
    topology::Names,
};
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{drain_queue, raw_channel, sample, write_jsonl, TestNs};
use taskmill_worker::Stats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_unknown_and_oversized_messages_are_dead_lettered() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let mut wargs = t.worker_args();
    wargs.max_message_bytes = 64 * 1024;
    let w = t.spawn_worker(wargs);
    // A normal job first: this also waits until the topology exists and the worker consumes.
    let store = t.store().await;
    let file = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let first = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    t.wait_finished(&store, &first.job, Duration::from_secs(60))
        .await;

    let (_conn, ch) = raw_channel().await;
    let publish = |body: Vec<u8>, props: BasicProperties| {
        let ch = ch.clone();
        let exchange = names.work_exchange();
        async move {
            ch.basic_publish(
                exchange.into(),
                "tasks".into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    let env = |task: &str, records| Envelope {
        v: FORMAT_VERSION,
        job: "rawjob".into(),
        batch: 0,
        task: task.into(),
        params: BTreeMap::new(),
        records,
        created_ms: 0,
    };
    // 1. garbage bytes with a message id naming job "rawjob", batch 7
    publish(
        b"\x00\x01garbage".to_vec(),
        BasicProperties::default().with_message_id("rawjob:7".into()),
    )
    .await;
    // 2. a valid envelope with a task nobody knows
    let e = env("no-such-task", vec![json!({"title": "t", "body": "b"})]);
    publish(encode(&e), batch_properties(&e, 1)).await;
    // 3. an envelope with a missing field (no records)
    #[derive(serde::Serialize)]
    struct Partial {
        v: u16,
        job: &'static str,
        batch: u64,
        task: &'static str,
    }
    let partial = rmp_serde::to_vec_named(&Partial {
        v: 1,
        job: "rawjob",
        batch: 2,
        task: "post-stats",
    })
    .unwrap();
    publish(partial, BasicProperties::default()).await;
    // 4. a message over the worker's 64 KiB limit
    let big = env(
        "post-stats",
        vec![json!({"title": "t", "body": "x".repeat(100_000)})],
    );
    publish(encode(&big), batch_properties(&big, 1)).await;
    // 5. a future envelope version
    let mut future = env("post-stats", vec![]);
    future.v = 99;
    publish(
        rmp_serde::to_vec_named(&future).unwrap(),
        BasicProperties::default(),
    )
    .await;

    // Then a normal job again: the worker is alive and still works.
    let second = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    let status = t
        .wait_finished(&store, &second.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.state(), "completed");

    // All five bad messages are dead (the worker counts them before acking each).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Stats::get(&w.stats.batches_dead) < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters missing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = drain_queue(&ch, &names.dead_queue()).await;
    let mut kinds: Vec<String> = dead
        .iter()
        .map(|m| header_str(&m.delivery.properties, HEADER_ERROR_KIND).unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "too_large",
            "undecodable",
            "undecodable",
            "unknown_task",
            "unsupported_version"
        ]
    );
    for m in &dead {
        let p = &m.delivery.properties;
        assert_eq!(
            header_str(p, HEADER_ORIGINAL_QUEUE).as_deref(),
            Some(names.queue("tasks").as_str())
        );
        assert_eq!(header_i64(p, HEADER_ATTEMPT), Some(1));
        assert!(!header_str(p, HEADER_ERROR).unwrap().is_empty());
    }
    // The body is kept as it was, for inspection and replay.
    let garbage = dead
        .iter()
        .find(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str())
                == Some("rawjob:7")
        })
        .unwrap();
    assert_eq!(garbage.delivery.data, b"\x00\x01garbage");
    // The message id names a job that does not exist: no job is touched or created.
    assert!(store.dead_batches("rawjob").await.unwrap().is_empty());
    assert!(store.job_status("rawjob").await.unwrap().is_none());

    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_batches_never_count_twice() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let store = t.store().await;
    let file = write_jsonl(sample::posts(50));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    // Publish every batch a second time, as a producer that lost its confirms would.
    let (_conn, ch) = raw_channel().await;
    let posts: Vec<_> = sample::posts(50).collect();
    for (i, chunk) in posts.chunks(10).enumerate() {
        let e = Envelope {
            v: FORMAT_VERSION,
            job: report.job.clone(),
            batch: i as u64,
            task: "post-stats".into(),
            params: BTreeMap::new(),
            records: chunk.to_vec(),
            created_ms: 0,
        };
        ch.basic_publish(
            names.work_exchange().into(),
            "tasks".into(),
            BasicPublishOptions::default(),
            &encode(&e),
            batch_properties(&e, 1),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let w = t.spawn_worker(t.worker_args());
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    // Wait until the worker handled all ten messages, then check nothing counted twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Stats::get(&w.stats.batches_done) + Stats::get(&w.stats.batches_duplicate) < 10 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(Stats::get(&w.stats.batches_done), 5);
    assert_eq!(Stats::get(&w.stats.batches_duplicate), 5);
    let status = store.job_status(&status.job).await.unwrap().unwrap();
    assert_eq!(status.batches_done, 5);
    assert_eq!(status.records_done, 50);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
