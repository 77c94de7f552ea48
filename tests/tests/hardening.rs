//! Hardening: nothing stuck, nothing forged, nothing miscounted, nothing leaked.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use serde_json::{json, Value};
use taskmill_common::{
    amqp::{batch_properties, header_str},
    envelope::{
        encode, Envelope, FORMAT_VERSION, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_ORIGINAL_QUEUE,
        MAX_HEADER_TEXT,
    },
    store::{DoneBatch, NewJob, PublishTotals, Recorded, Store},
    topology::{Names, DELAY_TIERS_MS},
};
use taskmill_producer::cmd::{
    dlq,
    enqueue::{enqueue, EnqueueArgs},
};
use taskmill_tests::{
    bin_path, broker_queues, drain_queue, peak_rss_kib, publish_raw, queue_messages, raw_channel,
    sample, until, write_jsonl, TestNs,
};
use taskmill_worker::Stats;

fn envelope(job: &str, batch: u64, task: &str, records: Vec<Value>) -> Envelope {
    Envelope {
        v: FORMAT_VERSION,
        job: job.into(),
        batch,
        task: task.into(),
        params: BTreeMap::new(),
        records,
        created_ms: taskmill_common::now_ms(),
    }
}

async fn wait_dead(stats: &Stats, n: u64) {
    until(
        &format!("{n} batches dead-lettered"),
        Duration::from_secs(60),
        || async { Stats::get(&stats.batches_dead) >= n },
    )
    .await;
}

/// Registers a job of `task` on the `tasks` queue.
async fn register(store: &Store, id: &str, task: &str) {
    store
        .register_job(&NewJob {
            id,
            task,
            queue: "tasks",
            params: &BTreeMap::new(),
            unique_key: None,
            token: "",
            then: "",
            parent: "",
            group: "",
            on_complete: "",
            parent_outcome: "",
        })
        .await
        .unwrap();
}

/// An integer Redis command on `key`: `TTL`, `PTTL`, or `EXPIRE`/`PEXPIRE` with `arg`.
async fn key_cmd(
    con: &redis::aio::MultiplexedConnection,
    cmd: &str,
    key: String,
    arg: Option<i64>,
) -> i64 {
    let mut con = con.clone();
    redis::cmd(cmd)
        .arg(key)
        .arg(arg)
        .query_async(&mut con)
        .await
        .unwrap()
}

/// Item 1: a replay takes each dead letter that was there once, and ends, even when the
/// replayed batches fail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_still_failing_dead_letters_ends() {
    let t = TestNs::new();
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    // 200 letters: enough that the worker fails replayed ones again and dead-letters them
    // back while the replay still reads, so a replay that reads until the queue is empty
    // would take them again (and never end, or replay more than there were).
    const N: u64 = 200;
    let file = write_jsonl(sample::posts(N));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["fail_rate=1".into(), "fail=permanent".into()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.batches_dead, N);

    for round in 1..=2 {
        let r = tokio::time::timeout(Duration::from_secs(60), dlq::replay(&t.conn(), Some(&job)))
            .await
            .expect("replay ends")
            .unwrap();
        assert_eq!(r.replayed, N, "round {round}");
        assert!(r.skipped.is_empty());
        // They fail again and come back: N dead letters, each counted once in the job.
        until(
            "the replays dead again",
            Duration::from_secs(60),
            || async { Stats::get(&w.stats.batches_dead) >= N + N * round },
        )
        .await;
        assert_eq!(
            dlq::list(&t.conn(), Some(&job)).await.unwrap().len() as u64,
            N
        );
        let s = store.job_status(&job).await.unwrap().unwrap();
        assert_eq!(s.batches_dead, N);
        assert_eq!(s.state(), "completed_with_errors");
    }
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Item 2, as issue 24 asks: a worker crash-looping on one batch (a chaos abort on one batch
/// number, the worker restarted after each death, default prefetch and threads) ends with that
/// batch dead-lettered as `worker_crash` and every other batch done: the batches that were
/// only in the dying workers' hands (prefetched, or running beside it) go back to work, and
/// none reaches the broker's delivery limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_dead_letters_the_culprit_and_no_innocent_batch() {
    const BATCHES: u64 = 60;
    let t = TestNs::new();
    let store = t.store().await;
    let file = write_jsonl(sample::posts(BATCHES * 10));
    // A seed under which exactly one batch of the job fails (on its first attempt, which is
    // every delivery of it: a redelivery is the same attempt).
    let job = "loop";
    let culprits = |seed: u64| -> Vec<u64> {
        (0..BATCHES)
            .filter(|b| taskmill_common::tasks::chaos::fails(0.02, seed, job, *b, 1))
            .collect()
    };
    let seed = (0..10_000)
        .find(|s| matches!(culprits(*s).as_slice(), [b] if *b >= 4))
        .unwrap();
    let culprit = culprits(seed)[0];
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.job = Some(job.into());
    args.params = vec![
        "fail_rate=0.02".into(),
        format!("seed={seed}"),
        "fail=abort".into(),
        "sleep_ms=100".into(),
    ];
    enqueue(&t.conn(), &args, |_| {}).await.unwrap();

    let mut deaths = 0;
    let status = loop {
        if let Some(s) = store.job_status(job).await.unwrap() {
            if s.is_finished() {
                break s;
            }
        }
        assert!(deaths < 12, "still not finished after {deaths} crashes");
        let mut worker = Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // It crashes on the batch, or (once it dead-lettered it) finishes the job.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a worker neither crashed nor saw the job finish in 120 s"
            );
            if worker.try_wait().unwrap().is_some() {
                deaths += 1;
                break;
            }
            if taskmill_tests::job_finished(&store, job, Duration::ZERO)
                .await
                .is_ok()
            {
                let _ = worker.kill();
                let _ = worker.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    eprintln!("batch {culprit} of {BATCHES} killed {deaths} workers before it was dead-lettered");
    assert!(
        (3..=6).contains(&deaths),
        "{deaths} deaths: the culprit is found after it ran alone twice"
    );
    assert_eq!(status.state(), "completed_with_errors", "{status:?}");
    assert_eq!(status.batches_done, BATCHES - 1, "{status:?}");
    assert_eq!(status.batches_dead, 1, "{status:?}");
    let dead = store.dead_batches(job).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, culprit);
    assert_eq!(dead[0].1["kind"], "worker_crash", "{:?}", dead[0].1);
    // The dead letter is there for people too, with the reason, and it is the only one.
    let letters = dlq::list(&t.conn(), Some(job)).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].kind, "worker_crash");
    assert!(letters[0].error.contains("ran alone"), "{:?}", letters[0]);
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// The broker's most recent dead-lettering is the reason: a batch that once waited in a delay
/// queue (an `expired` death, how every retry comes back) and then hit the delivery limit
/// died of the delivery limit, in the job and in `dlq list` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_that_hits_the_delivery_limit_reads_delivery_limit() {
    use lapin::options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions,
    };
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let store = t.store().await;
    let file = write_jsonl(sample::posts(10));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // No worker yet: move the batch through the shortest delay queue, as a retry goes.
    let (conn, ch) = raw_channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let work = names.queue("tasks");
    let m = ch
        .basic_get(work.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the batch");
    let delay =
        taskmill_common::topology::declare_delay_queue(&ch, &names, "tasks", DELAY_TIERS_MS[0])
            .await
            .unwrap();
    ch.basic_publish(
        "".into(),
        delay.as_str().into(),
        BasicPublishOptions::default(),
        &m.delivery.data,
        m.delivery.properties.clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    m.delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    until(
        "the batch back from the delay queue",
        Duration::from_secs(30),
        || async { queue_messages(&conn, &work).await == Some(1) },
    )
    .await;
    // Now consumers that never ack it: the broker dead-letters it after its delivery limit.
    for _ in 0..100 {
        let Some(m) = ch
            .basic_get(work.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        else {
            if queue_messages(&conn, &names.dead_queue()).await == Some(1) {
                break;
            }
            continue;
        };
        let again = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        m.delivery.acker.nack(again).await.unwrap();
    }
    assert_eq!(queue_messages(&conn, &names.dead_queue()).await, Some(1));
    // A worker counts it in the job.
    let w = t.spawn_worker(t.worker_args());
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed_with_errors");
    let dead = store.dead_batches(&job).await.unwrap();
    assert_eq!(dead[0].1["kind"], "delivery_limit", "{:?}", dead[0].1);
    assert_eq!(dead[0].1["queue"], work.as_str(), "{:?}", dead[0].1);
    let letters = dlq::list(&t.conn(), Some(&job)).await.unwrap();
    assert_eq!(letters[0].kind, "delivery_limit", "{:?}", letters[0]);
    assert_eq!(letters[0].queue.as_deref(), Some(work.as_str()));
    assert_eq!(letters[0].error, dead[0].1["error"].as_str().unwrap());
    // How many deliveries it had, not "attempts: 1" alone.
    assert!(
        letters[0].error.contains("delivered 11 times"),
        "{}",
        letters[0].error
    );
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// An operator adds a length policy to a work queue: the batches the broker drops from the
/// full queue are dead letters of kind `queue_full`, the same in the job and in `dlq list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_a_length_policy_drops_read_queue_full_everywhere() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let store = t.store().await;
    let mgmt = taskmill_tests::mgmt::Client::new();
    let policy = format!("/api/policies/%2f/{}-maxlen", t.ns);
    mgmt.put_json(
        &policy,
        &json!({
            "pattern": format!("^{}\\.tasks$", t.ns),
            "definition": {"max-length": 5},
            "apply-to": "queues",
            "priority": 7,
        }),
    )
    .await
    .unwrap();
    let file = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    // The policy applies to the queue when it is declared: the enqueue's declaration.
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let w = t.spawn_worker(t.worker_args());
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    mgmt.delete(&policy).await.unwrap();
    assert_eq!(s.state(), "completed_with_errors");
    assert_eq!((s.batches_done, s.batches_dead), (5, 15));
    let dead = store.dead_batches(&job).await.unwrap();
    assert!(
        dead.iter().all(|(_, r)| r["kind"] == "queue_full"),
        "{dead:?}"
    );
    assert!(dead[0].1["error"].as_str().unwrap().contains("full queue"));
    let letters = dlq::list(&t.conn(), Some(&job)).await.unwrap();
    assert_eq!(letters.len(), 15);
    assert!(
        letters.iter().all(|l| l.kind == "queue_full"),
        "{letters:?}"
    );
    assert_eq!(
        letters[0].queue.as_deref(),
        Some(names.queue("tasks").as_str())
    );
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Item 3: forged batch numbers, message ids and job ids leave every job unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_leave_jobs_unchanged() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(100));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    until("the summary", Duration::from_secs(30), || async {
        store
            .job_status(&job)
            .await
            .unwrap()
            .unwrap()
            .summary
            .is_some()
    })
    .await;
    let before = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(before.state(), "completed");
    let results_before = store.results(&job).await.unwrap();

    let (_c, ch) = raw_channel().await;
    let send = |env: Envelope| {
        let props = batch_properties(&env, 1);
        (encode(&env), props)
    };
    let records: Vec<Value> = sample::posts(11).collect();
    let forged = [
        // Batch numbers the job never published.
        send(envelope(&job, 10, "post-stats", records.clone())),
        send(envelope(&job, 999, "post-stats", records.clone())),
        // A job id that aliases the job's results hash, and a job that does not exist.
        send(envelope(
            &format!("{job}:results"),
            0,
            "post-stats",
            records.clone(),
        )),
        send(envelope("no-such-job", 0, "post-stats", records.clone())),
        // Garbage bodies whose message ids name the job.
        (
            b"\x00garbage".to_vec(),
            BasicProperties::default().with_message_id(format!("{job}:999").into()),
        ),
        (
            b"\x00garbage".to_vec(),
            BasicProperties::default().with_message_id(format!("{job}:3").into()),
        ),
    ];
    for (body, props) in &forged {
        publish_raw(&ch, &names.work_exchange(), "tasks", body, props.clone()).await;
    }
    wait_dead(&w.stats, 6).await;

    let after = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(after, before, "the job's hash changed");
    assert_eq!(store.results(&job).await.unwrap(), results_before);
    assert!(store.dead_batches(&job).await.unwrap().is_empty());
    assert!(store.job_status("no-such-job").await.unwrap().is_none());
    let dead = drain_queue(&ch, &names.dead_queue()).await;
    let mut kinds: Vec<String> = dead
        .iter()
        .map(|m| header_str(&m.delivery.properties, HEADER_ERROR_KIND).unwrap())
        .collect();
    kinds.sort();
    // One attempt header (`x-taskmill-attempt`), never a second spelling of it.
    for m in &dead {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        assert!(headers.inner().contains_key("x-taskmill-attempt"));
        assert!(!headers.inner().contains_key("x-taskmill-attempts"));
    }
    assert_eq!(
        kinds,
        [
            "undecodable",
            "undecodable",
            "unknown_batch",
            "unknown_batch",
            "unknown_job",
            "unknown_job"
        ]
    );

    // While a job is still publishing, a batch above what it published is refused too.
    let open = "still-publishing";
    register(&store, open, "post-stats").await;
    store.reserve_batches(open, 2).await.unwrap();
    for batch in [5, 1] {
        let (body, props) = send(envelope(open, batch, "post-stats", records.clone()));
        publish_raw(&ch, &names.work_exchange(), "tasks", &body, props).await;
    }
    until("batch 1 stored", Duration::from_secs(60), || async {
        taskmill_tests::batches_done(&store, open).await == 1
    })
    .await;
    wait_dead(&w.stats, 7).await;
    let s = store.job_status(open).await.unwrap().unwrap();
    assert_eq!(s.batches_done, 1);
    assert_eq!(s.batches_dead, 0);
    assert_eq!(s.records_done, 11);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Item 4: `batches_published` is never behind `batches_done`, at any moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_published_is_never_behind_batches_done() {
    let t = TestNs::new();
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(3000));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.job = Some(format!("{}-pub", t.ns));
    let conn = t.conn();
    let producer = tokio::spawn(async move { enqueue(&conn, &args, |_| {}).await });
    let job = format!("{}-pub", t.ns);
    let mut reads = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {job} not finished in 120 s"
        );
        if let Some(s) = store.job_status(&job).await.unwrap() {
            reads += 1;
            let settled = s.batches_done + s.batches_dead;
            assert!(
                s.batches_published >= settled,
                "published {} < done {}",
                s.batches_published,
                settled
            );
            if s.is_finished() {
                assert_eq!(s.batches_published, 3000);
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    assert!(reads > 10);
    producer.await.unwrap().unwrap();
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Item 5: an enormous task name is dead-lettered once with bounded headers (no frame error,
/// no session restart), and `dlq replay --all` skips a dead letter whose original queue is
/// not a work queue, says so, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_bounded_and_replay_skips_what_it_cannot_route() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let job = "huge-task-name";
    register(&store, job, "?").await;
    store.reserve_batches(job, 1).await.unwrap();
    let env = envelope(job, 0, &"t".repeat(7 * 1024 * 1024), vec![json!(1)]);
    let (_c, ch) = raw_channel().await;
    // The topology exists once the worker consumes.
    until("the worker consuming", Duration::from_secs(60), || async {
        broker_queues(&names.queue("tasks"))
            .await
            .contains(&names.queue("tasks"))
    })
    .await;
    publish_raw(
        &ch,
        &names.work_exchange(),
        "tasks",
        &encode(&env),
        batch_properties(&env, 1),
    )
    .await;
    wait_dead(&w.stats, 1).await;
    assert_eq!(
        Stats::get(&w.stats.sessions),
        1,
        "the worker's session restarted"
    );
    store
        .finish_publishing(
            job,
            &PublishTotals {
                batches: 1,
                records: 1,
                ..PublishTotals::default()
            },
        )
        .await
        .unwrap();
    let s = store.job_status(job).await.unwrap().unwrap();
    assert_eq!(s.state(), "completed_with_errors");
    let dead = store.dead_batches(job).await.unwrap();
    assert_eq!(dead[0].1["kind"], "unknown_task");

    // A dead letter whose original queue is a delay queue cannot be replayed: skipped.
    let odd = BasicProperties::default()
        .with_message_id(format!("{job}:0").into())
        .with_headers(FieldTable::from(BTreeMap::from([(
            HEADER_ORIGINAL_QUEUE.into(),
            AMQPValue::LongString(LongString::from(names.delay_queue("tasks", 1000))),
        )])));
    publish_raw(&ch, "", &names.dead_queue(), b"odd", odd).await;
    let r = dlq::replay(&t.conn(), None).await.unwrap();
    assert_eq!(r.replayed, 1, "{r:?}");
    assert_eq!(r.skipped.len(), 1, "{r:?}");
    assert!(r.skipped[0].contains("is not a work queue"), "{r:?}");
    // The skipped one is still a dead letter; the replayed one died again.
    until("the replay dead again", Duration::from_secs(60), || async {
        Stats::get(&w.stats.batches_dead) >= 2
    })
    .await;
    let letters = drain_queue(&ch, &names.dead_queue()).await;
    assert_eq!(letters.len(), 2);
    for m in &letters {
        let p = &m.delivery.properties;
        if let Some(e) = header_str(p, HEADER_ERROR) {
            assert!(e.len() <= MAX_HEADER_TEXT, "{}", e.len());
        }
    }
    assert_eq!(Stats::get(&w.stats.sessions), 1);
    w.stop().await.unwrap();
    t.cleanup().await;
}

/// Item 8: every key of a job keeps the TTL it was enqueued with (not the worker's), the
/// index outlives its longest job, expired ids leave the index, and retries of unknown jobs
/// create nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_keeps_the_ttl_it_was_enqueued_with() {
    let t = TestNs::new();
    let store = t.store().await;
    let mut wargs = t.worker_args();
    wargs.conn.result_ttl = 30 * 24 * 3600;
    let w = t.spawn_worker(wargs);
    let file = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let long = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let mut short_conn = t.conn();
    short_conn.result_ttl = 3;
    let enqueued = std::time::Instant::now();
    let short = enqueue(&short_conn, &args, |_| {}).await.unwrap().job;
    t.wait_finished(&store, &long, Duration::from_secs(60))
        .await;
    t.wait_finished(&store, &short, Duration::from_secs(60))
        .await;

    let mut con = taskmill_tests::redis_con().await;
    let ttl = |key: String| key_cmd(&con, "TTL", key, None);
    let keys = store.keys().clone();
    // The short job's keys live 3 s: still there with at most that left, or (on a machine
    // slow enough that 3 s passed since its enqueue began) gone already.
    for key in [keys.job(&short), keys.results(&short)] {
        let left = ttl(key).await;
        let gone_in_time = left == -2 && enqueued.elapsed() >= Duration::from_secs(3);
        assert!((1..=3).contains(&left) || gone_in_time, "{left}");
    }
    let long_ttl = ttl(keys.job(&long)).await;
    assert!(long_ttl > 3000 && long_ttl <= 24 * 3600, "{long_ttl}");
    assert!(ttl(keys.results(&long)).await > 3000);
    assert!(
        ttl(keys.jobs()).await > 3000,
        "the index outlives the longest job"
    );

    until("the short job expired", Duration::from_secs(30), || async {
        store.job_status(&short).await.unwrap().is_none()
    })
    .await;
    let listed: Vec<String> = store
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.0)
        .collect();
    assert_eq!(listed, vec![long.clone()]);
    let raw: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.jobs())
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(raw, vec![long.clone()], "the expired id left the index");

    // A transient failure of a job that does not exist: dead-lettered, no key created.
    let (_c, ch) = raw_channel().await;
    let mut env = envelope("ghost", 0, "chaos", vec![json!(1)]);
    env.params.insert("fail_rate".into(), "1".into());
    publish_raw(
        &ch,
        &Names::new(&t.ns).work_exchange(),
        "tasks",
        &encode(&env),
        batch_properties(&env, 1),
    )
    .await;
    wait_dead(&w.stats, 1).await;
    assert_eq!(Stats::get(&w.stats.batches_retried), 0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(keys.job("ghost"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// One store call with a batch twice counts it once; a later call with a stored batch calls
/// it a duplicate; the keys' TTL is renewed when the results' has run down, not at every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storing_results_counts_each_batch_once_and_renews_the_ttl_when_it_runs_down() {
    let t = TestNs::new();
    let store = t.store().await;
    let job = "store-once";
    register(&store, job, "post-stats").await;
    store.reserve_batches(job, 10).await.unwrap();
    let done = |batch: u64| DoneBatch {
        job: job.into(),
        batch,
        result: format!("{{\"batch\":{batch}}}"),
        records_done: 10,
        records_invalid: 1,
    };
    let first = store
        .record_done_many(&[done(0), done(1), done(0), done(12)])
        .await
        .unwrap();
    assert_eq!(
        first,
        [
            Recorded::Stored,
            Recorded::Stored,
            Recorded::Duplicate,
            Recorded::UnknownBatch
        ]
    );
    let mut con = taskmill_tests::redis_con().await;
    let keys = store.keys().clone();
    let full = store.job_status(job).await.unwrap().unwrap().ttl as i64;
    let ttl = |key: String| key_cmd(&con, "TTL", key, None);
    assert!(
        ttl(keys.results(job)).await > full - 5,
        "a new results hash gets the TTL"
    );

    // The results' TTL is fresh: the next call leaves the keys' TTL alone (the job's,
    // raised here by hand, stays raised).
    key_cmd(&con, "EXPIRE", keys.job(job), Some(full * 2)).await;
    let second = store.record_done_many(&[done(1), done(2)]).await.unwrap();
    assert_eq!(second, [Recorded::Duplicate, Recorded::Stored]);
    assert!(ttl(keys.job(job)).await > full);
    // The results' TTL ran down: the next call renews every key's.
    key_cmd(&con, "EXPIRE", keys.results(job), Some(full / 2)).await;
    let third = store.record_done_many(&[done(3)]).await.unwrap();
    assert_eq!(third, [Recorded::Stored]);
    assert!(ttl(keys.results(job)).await > full - 5);
    let job_ttl = ttl(keys.job(job)).await;
    assert!(job_ttl <= full && job_ttl > full - 5, "{job_ttl}");

    let s = store.job_status(job).await.unwrap().unwrap();
    assert_eq!(s.batches_done, 4);
    assert_eq!(s.records_done, 40);
    assert_eq!(s.records_invalid, 4);
    let results: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.results(job))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results["2"], "{\"batch\":2}");

    // A job with a TTL of two seconds is renewed as it runs down too (its results' TTL is
    // read in ms: 1.9 s left is less than 2 s less a hundredth).
    let short = "store-once-short";
    let short_store = Store::connect("redis://127.0.0.1:6379/0", &t.ns, 2)
        .await
        .unwrap();
    register(&short_store, short, "post-stats").await;
    short_store.reserve_batches(short, 10).await.unwrap();
    let short_done = |batch: u64| DoneBatch {
        job: short.into(),
        ..done(batch)
    };
    short_store
        .record_done_many(&[short_done(0)])
        .await
        .unwrap();
    for key in [keys.job(short), keys.results(short)] {
        key_cmd(&con, "PEXPIRE", key, Some(1900)).await;
    }
    // Renewed, the TTL went back to 2,000 ms during the call: what is left is at least that
    // less the time since the call began (clocks the test reads; not renewed, it would be at
    // most 1,900 less that time).
    let before = std::time::Instant::now();
    short_store
        .record_done_many(&[short_done(1)])
        .await
        .unwrap();
    let pttl = key_cmd(&con, "PTTL", keys.job(short), None).await;
    // (Both rounded down to the ms: one ms more for each.)
    let since = before.elapsed().as_millis() as i64 + 1;
    assert!(
        pttl + 1 + since >= 2_000,
        "the short job's TTL was not renewed: {pttl} ms left {since} ms after the call began"
    );
    t.cleanup().await;
}

/// Item 12: a 200 MB line is skipped and reported, and the producer's memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_line_is_skipped_with_flat_memory() {
    use std::io::Write;
    let t = TestNs::new();
    let path = std::env::temp_dir().join(format!("{}-huge.jsonl", t.ns));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(f, "{}", json!({"title": "a", "body": "b"})).unwrap();
        write!(f, "{{\"title\": \"x\", \"body\": \"").unwrap();
        let chunk = "y".repeat(1024 * 1024);
        for _ in 0..200 {
            f.write_all(chunk.as_bytes()).unwrap();
        }
        writeln!(f, "\"}}").unwrap();
        write!(f, "[{{\"title\": \"x\", \"body\": \"").unwrap();
        for _ in 0..50 {
            f.write_all(chunk.as_bytes()).unwrap();
        }
        writeln!(f, "\"}}]").unwrap();
        writeln!(f, "{}", json!({"title": "c", "body": "d"})).unwrap();
    }
    let mut child = Command::new(bin_path("producer"))
        .args(["enqueue", "--queue", "idle", "--json", "--file"])
        .arg(&path)
        .env("TASKMILL_NAMESPACE", &t.ns)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(peak > 0 && peak < 100 * 1024, "peak RSS {peak} KiB");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], 2);
    assert_eq!(report["records_invalid"], 2);
    let problems = report["problems"].to_string();
    assert!(problems.contains("line 2: 209715"), "{problems}");
    assert!(problems.contains("--max-record-bytes"), "{problems}");
    let store = t.store().await;
    let s = store
        .job_status(report["job"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.records_invalid, 2);
    assert_eq!(s.records_total, 2);
    let _ = std::fs::remove_file(path);
    t.cleanup().await;
}

/// Item 16: records fed slowly on stdin go out after a short linger, before the input ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stdin_is_streamed() {
    use std::io::{BufRead, Write};
    let t = TestNs::new();
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let mut child = Command::new(bin_path("producer"))
        .args(["enqueue", "--file", "-", "--batch-size", "100"])
        .env("TASKMILL_NAMESPACE", &t.ns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for r in sample::posts(3) {
        writeln!(stdin, "{r}").unwrap();
    }
    stdin.flush().unwrap();
    // The job id comes with the first batch, while stdin is still open.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut job = String::new();
    let reader = std::thread::spawn(move || {
        stdout.read_line(&mut job).unwrap();
        job
    });
    let job = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap()
        .trim()
        .to_string();
    taskmill_tests::wait_batches_done(&store, &job, 1).await;
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.records_done, 3);
    assert_eq!(s.batches_total, None, "still publishing");
    for r in sample::posts(2) {
        writeln!(stdin, "{r}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.records_done, 5);
    assert_eq!(s.batches_total.unwrap_or(0), 2);
    w.stop().await.unwrap();
    t.cleanup().await;
}

/// Item 17: retries with any delay settings use delay queues of the fixed tiers only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_use_a_fixed_set_of_delay_queues() {
    let t = TestNs::new();
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(100));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.params = vec![
        "fail_rate=0.6".into(),
        "seed=5".into(),
        "retry_base_ms=37".into(),
        "retry_factor=1.3".into(),
        "retry_max_attempts=8".into(),
    ];
    args.batch_size = 2;
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let s = t
        .wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert!(s.retries > 20, "{:?}", s);
    let names = Names::new(&t.ns);
    // Which tier queues exist, asked of the broker itself (a passive declare fails, and
    // closes its channel, when the queue does not exist).
    let (conn, _ch) = raw_channel().await;
    let mut tiers = Vec::new();
    for &ms in DELAY_TIERS_MS {
        let name = names.delay_queue("tasks", ms);
        if queue_messages(&conn, &name).await.is_some() {
            tiers.push(name);
        }
    }
    // The tiers near 37 ms × 1.3^n: a handful, whatever the settings.
    assert!(!tiers.is_empty() && tiers.len() <= 5, "{tiers:?}");
    tiers.sort();
    // And no other delay queue: the management API (which lags a little) lists exactly those.
    let delay_prefix = format!("{}.tasks.delay.", t.ns);
    until(
        "the management API's list",
        Duration::from_secs(60),
        || async { broker_queues(&delay_prefix).await == tiers },
    )
    .await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Item 18: on a terminal, `enqueue --wait` draws a progress bar that never shows a total of 0
/// while publishing, and the final status starts on a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_bar_leaves_the_final_status_on_its_own_lines() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(2000));
    let cmd = format!(
        "{} enqueue --file {} --batch-size 2 --wait --timeout 60",
        bin_path("producer").display(),
        file.display()
    );
    // `script` runs the producer on a pseudo-terminal, as a person would.
    let ns = t.ns.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("TASKMILL_NAMESPACE", &ns)
            .env("TERM", "xterm-256color")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" batches"), "no progress bar drawn: {text:?}");
    // What a line shows: the text after its last carriage return, without escape sequences.
    let visible = |line: &str| -> String {
        let last = line
            .trim_end_matches('\r')
            .rsplit('\r')
            .next()
            .unwrap_or("");
        let mut out = String::new();
        let mut chars = last.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let status_line = text
        .split('\n')
        .map(visible)
        .find(|l| l.contains(": completed"))
        .unwrap_or_else(|| panic!("no final status: {text:?}"));
    assert!(status_line.starts_with("job "), "{status_line:?}");
    let zero_total = regex_lite_zero_total(&text);
    assert!(!zero_total, "a bar with a total of 0: {text:?}");
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Whether the text shows `N/0 batches` with N > 0.
fn regex_lite_zero_total(text: &str) -> bool {
    text.match_indices("/0 batches").any(|(i, _)| {
        text[..i]
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .any(|c| c != '0')
    })
}

/// A permanent Redis error (a job's key holding the wrong type) dead-letters that job's
/// batches as `store_error`, instead of retrying them for ever; other jobs go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_redis_error_dead_letters_instead_of_spinning() {
    let t = TestNs::new();
    let names = Names::new(&t.ns);
    let store = t.store().await;
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let broken = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let fine = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // Someone overwrote the results hash of one job with a string.
    let mut con = taskmill_tests::redis_con().await;
    let _: () = redis::cmd("SET")
        .arg(store.keys().results(&broken))
        .arg("not a hash")
        .query_async(&mut con)
        .await
        .unwrap();

    let w = t.spawn_worker(t.worker_args());
    let s = t
        .wait_finished(&store, &fine, Duration::from_secs(60))
        .await;
    assert_eq!(s.state(), "completed");
    wait_dead(&w.stats, 3).await;
    assert_eq!(
        Stats::get(&w.stats.sessions),
        1,
        "the worker's session restarted"
    );
    let (_c, ch) = raw_channel().await;
    let dead = drain_queue(&ch, &names.dead_queue()).await;
    assert_eq!(dead.len(), 3);
    for m in &dead {
        let p = &m.delivery.properties;
        assert_eq!(
            header_str(p, HEADER_ERROR_KIND).as_deref(),
            Some("store_error")
        );
        assert!(header_str(p, HEADER_ERROR).unwrap().contains("WRONGTYPE"));
    }
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
