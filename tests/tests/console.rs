//! Operators act in the RabbitMQ console while jobs run: what each action does to workers
//! and jobs.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{
    bin_path, raw_channel, sample, sigterm, until, wait_batches_done, write_jsonl, KillOnDrop,
    TestNs,
};

/// Consumers on `queue` now (a passive declare; 0 while it does not exist).
async fn consumers(conn: &lapin::Connection, queue: &str) -> u32 {
    let Ok(ch) = conn.create_channel().await else {
        return 0;
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(queue.into(), passive, Default::default())
        .await
    {
        Ok(q) => {
            let _ = ch.close(200, "".into()).await;
            q.consumer_count()
        }
        Err(_) => 0,
    }
}

/// A queue a worker consumes, deleted as the console's Delete button does, mid-job: the
/// worker notices (its consumer was cancelled), declares its queues again and consumes again,
/// and the next job completes. For the work queue, a priority band and the dead-letter
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_declared_again_and_consumed_again() {
    let t = TestNs::new();
    let store = t.store().await;
    let mut w = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("TASKMILL_THREADS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (conn, ch) = raw_channel().await;
    let file = write_jsonl(sample::posts(400));
    for short in ["tasks", "tasks.p5", "dead.events"] {
        let queue = format!("{}.{short}", t.ns);
        // Mid-job: a job of slow batches is running.
        let mut args = EnqueueArgs::new("chaos");
        args.files = vec![file.clone()];
        args.batch_size = 1;
        args.params = vec!["sleep_ms=10".into()];
        if short == "tasks.p5" {
            args.priority = 9;
        }
        let running = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
        wait_batches_done(&store, &running, 5).await;
        until(
            &format!("a consumer on {queue}"),
            Duration::from_secs(30),
            || async { consumers(&conn, &queue).await > 0 },
        )
        .await;
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        // The worker consumes it again (it declares it again itself).
        until(
            &format!("the worker consuming {queue} again"),
            Duration::from_secs(30),
            || async { consumers(&conn, &queue).await > 0 },
        )
        .await;
        // And work flows: a new job on the same queue completes.
        let small = write_jsonl(sample::posts(20));
        let mut next = EnqueueArgs::new("post-stats");
        next.files = vec![small.clone()];
        next.batch_size = 2;
        if short == "tasks.p5" {
            next.priority = 9;
        }
        let next = enqueue(&t.conn(), &next, |_| {}).await.unwrap().job;
        let s = t
            .wait_finished(&store, &next, Duration::from_secs(60))
            .await;
        assert_eq!(s.state(), "completed", "after deleting {queue}");
        let _ = std::fs::remove_file(small);
    }
    assert!(sigterm(w.id()));
    assert_eq!(w.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A delay queue deleted in the console after workers declared it: the next retry of that
/// tier declares it again and goes through it, instead of coming back unroutable until the
/// broker's delivery limit dead-letters the batch with attempts left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_delay_queue_is_declared_again_by_the_next_retry() {
    let t = TestNs::new();
    let store = t.store().await;
    let mut w = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .env("TASKMILL_RETRY_BASE_MS", "100")
            .env("TASKMILL_RETRY_FACTOR", "1")
            .env("TASKMILL_RETRY_MAX_ATTEMPTS", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (_conn, ch) = raw_channel().await;
    let file = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["fail_rate=1".into()];
    // Every attempt fails: each batch goes through the 100 ms delay queue twice, then dies.
    let first = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let s = t
        .wait_finished(&store, &first, Duration::from_secs(60))
        .await;
    assert_eq!(s.batches_dead, 20);
    ch.queue_delete(
        format!("{}.tasks.delay.100", t.ns).as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let second = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let s = t
        .wait_finished(&store, &second, Duration::from_secs(60))
        .await;
    assert_eq!(s.batches_dead, 20);
    assert_eq!(s.retries, 40, "{s:?}");
    let dead = store.dead_batches(&second).await.unwrap();
    assert!(
        dead.iter()
            .all(|(_, r)| r["kind"] == "retries_exhausted" && r["attempts"] == 3),
        "{dead:?}"
    );
    assert!(sigterm(w.id()));
    assert_eq!(w.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A worker frozen mid-job (SIGSTOP: a paused VM, a debugger) holds its prefetched batches
/// only until the broker misses its heartbeats (10 s by default, about 20 s to notice): the
/// other worker does them, each exactly once, long before the frozen one wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_s_batches_go_to_the_other_within_the_default_heartbeat() {
    let t = TestNs::new();
    let store = t.store().await;
    let spawn = || {
        KillOnDrop(
            Command::new(bin_path("worker"))
                .env("TASKMILL_NAMESPACE", &t.ns)
                .env("TASKMILL_THREADS", "1")
                .env("TASKMILL_PREFETCH", "50")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut frozen = spawn();
    let mut other = spawn();
    let file = write_jsonl(sample::posts(300));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["sleep_ms=10".into()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    wait_batches_done(&store, &job, 20).await;
    let signal = |sig: &str, pid: u32| {
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP", frozen.id());
    // Before the broker's own default heartbeat (60 s, noticed after two missed: 120 s)
    // would have given the frozen worker's 50 batches back.
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    signal("-CONT", frozen.id());
    assert_eq!(s.state(), "completed");
    assert_eq!((s.batches_done, s.records_done), (300, 300));
    for w in [&mut frozen, &mut other] {
        assert!(sigterm(w.id()));
        assert_eq!(w.wait().unwrap().code(), Some(0));
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A length policy with `reject-publish` on the work queue: the producer is refused while the
/// queue is full, publishes again with backoff (a few log lines, not thousands) and finishes
/// once a worker drains the queue: the full queue is backpressure, not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_that_rejects_publishes_slows_the_producer_down() {
    let t = TestNs::new();
    let store = t.store().await;
    let mgmt = taskmill_tests::mgmt::Client::new();
    let policy = format!("/api/policies/%2f/{}-full", t.ns);
    mgmt.put_json(
        &policy,
        &serde_json::json!({
            "pattern": format!("^{}\\.tasks$", t.ns),
            "definition": {"max-length": 20, "overflow": "reject-publish"},
            "apply-to": "queues",
            "priority": 7,
        }),
    )
    .await
    .unwrap();
    let file = write_jsonl(sample::posts(2000));
    let mut producer = Command::new(bin_path("producer"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env_remove("RUST_LOG")
        .args(["enqueue", "--no-check", "--batch-size", "1", "--file"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The queue fills up to its limit: the producer is being refused now.
    let (conn, _ch) = raw_channel().await;
    let work = format!("{}.tasks", t.ns);
    until("a full work queue", Duration::from_secs(30), || async {
        // (A quorum queue's limit is approximate: it may go a few over.)
        taskmill_tests::queue_messages(&conn, &work)
            .await
            .is_some_and(|n| n >= 20)
    })
    .await;
    // Held back: still running, with most of its batches refused so far.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        producer.try_wait().unwrap().is_none(),
        "the producer gave up"
    );
    let mut w = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = tokio::task::spawn_blocking(move || producer.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    mgmt.delete(&policy).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let job = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.batches_done, 2000);
    let refusal_lines = stderr.lines().filter(|l| l.contains("refuses")).count();
    assert!(
        (1..=20).contains(&refusal_lines),
        "{refusal_lines} refusal lines:\n{stderr}"
    );
    assert!(sigterm(w.id()));
    assert_eq!(w.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Redis edited by hand: the jobs index deleted is rebuilt on demand (`jobs --reindex`), and
/// results deleted from a finished job are said to be missing, not silently absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_index_is_rebuilt_and_missing_results_are_said() {
    use redis::AsyncCommands;
    let t = TestNs::new();
    let store = t.store().await;
    let w = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    let mut redis = taskmill_tests::redis_con().await;
    let _: () = redis.del(format!("{}:jobs", t.ns)).await.unwrap();
    let listed = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!listed(taskmill_tests::producer(&t.ns, &["jobs", "--json"])).contains(&job));
    let out = taskmill_tests::producer(&t.ns, &["jobs", "--reindex", "--json"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("reindexed: 1 job(s)"));
    assert!(listed(out).contains(&job));
    assert!(listed(taskmill_tests::producer(&t.ns, &["jobs", "--json"])).contains(&job));
    // Two of its three results deleted by hand.
    let _: () = redis
        .hdel(format!("{}:job:{job}:results", t.ns), &["0", "1"])
        .await
        .unwrap();
    let out = taskmill_tests::producer(&t.ns, &["status", &job]);
    assert!(
        listed(out).contains("results: missing for 2 of the 3 done batches"),
        "status says nothing of the missing results"
    );
    let out = taskmill_tests::producer(&t.ns, &["status", &job, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results_missing"], 2);
    let out = taskmill_tests::producer(&t.ns, &["results", &job]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("results missing for 2"));
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A work queue purged in the console mid-job takes batches that no worker will ever meet:
/// the job ends `stalled` soon after `--stall-after`, its lost batches counted and said, and
/// `wait` ends (exit 1) saying so. A job whose batches were all taken away stalls too, and
/// finishes `completed` when they come back after all (published again by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_queue_s_job_ends_stalled_with_its_lost_batches_counted() {
    use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
    let t = TestNs::new();
    let store = t.store().await;
    let (conn, ch) = raw_channel().await;
    let work = format!("{}.tasks", t.ns);
    // No worker yet: a small job whose batches the test takes away (and keeps).
    let small = write_jsonl(sample::posts(6));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![small.clone()];
    args.batch_size = 1;
    args.no_check = true;
    let taken_job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let taken = taskmill_tests::drain_queue(&ch, &work).await;
    assert_eq!(taken.len(), 6);
    // A job of slow batches, purged once a few are done.
    let file = write_jsonl(sample::posts(40));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["sleep_ms=100".into()];
    args.no_check = true;
    let purged = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let mut wa = t.worker_args();
    wa.stall_after = 2;
    wa.threads = 1;
    wa.prefetch = 1;
    let w = t.spawn_worker(wa);
    wait_batches_done(&store, &purged, 3).await;
    ch.queue_purge(work.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let s = t
        .wait_finished(&store, &purged, Duration::from_secs(60))
        .await;
    assert_eq!(s.state(), "stalled", "{s:?}");
    assert!(s.batches_lost > 0 && s.batches_done < 40, "{s:?}");
    assert_eq!(
        s.batches_done + s.batches_dead + s.batches_lost,
        40,
        "{s:?}"
    );
    assert!(
        s.problems.iter().any(|p| p.starts_with(&format!(
            "stalled: {} batches never came back",
            s.batches_lost
        ))),
        "{:?}",
        s.problems
    );
    // The CLI says it, and `wait` ends with 1.
    let out = taskmill_tests::producer(&t.ns, &["wait", &purged, "--timeout", "10"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("job {purged}: stalled")), "{text}");
    assert!(
        text.contains(&format!("lost:    {} batches", s.batches_lost)),
        "{text}"
    );
    let out = taskmill_tests::producer(&t.ns, &["status", &purged, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["batches_lost"], s.batches_lost, "{json}");
    // The job whose batches were taken: stalled with all 6 lost...
    let s = t
        .wait_finished(&store, &taken_job, Duration::from_secs(60))
        .await;
    assert_eq!(s.state(), "stalled", "{s:?}");
    assert_eq!(s.batches_lost, 6, "{s:?}");
    // ...until they come back: then it completes, with its summary, nothing lost.
    for m in &taken {
        ch.basic_publish(
            "".into(),
            work.as_str().into(),
            BasicPublishOptions::default(),
            &m.delivery.data,
            m.delivery.properties.clone(),
        )
        .await
        .unwrap();
    }
    until(
        "the taken batches stored",
        Duration::from_secs(60),
        || async {
            store
                .job_status(&taken_job)
                .await
                .unwrap()
                .is_some_and(|s| s.state() == "completed" && s.summary.is_some())
        },
    )
    .await;
    let s = store.job_status(&taken_job).await.unwrap().unwrap();
    assert_eq!((s.batches_done, s.batches_lost), (6, 0), "{s:?}");
    w.stop().await.unwrap();
    drop(conn);
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(small);
    t.cleanup().await;
}

/// A slow but healthy job is never called stalled, however short `--stall-after`: batches
/// that run longer than it are in a worker's hands, batches held by `--countdown` are in a
/// delay queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_healthy_job_is_never_called_stalled() {
    let t = TestNs::new();
    let store = t.store().await;
    let mut wa = t.worker_args();
    wa.stall_after = 1;
    wa.threads = 2;
    wa.prefetch = 2;
    let w = t.spawn_worker(wa.clone());
    wa.queues = vec!["later".into()];
    let w_later = t.spawn_worker(wa);
    // Two batches of 12 s, side by side: the watcher looks (every 5 s) at least twice while
    // the queue is empty and both are in the worker's hands.
    let file = write_jsonl(sample::posts(2));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["sleep_ms=12000".into()];
    args.no_check = true;
    let slow = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // Two batches that wait 15 s in the broker's delay queues (10 s, then 5 s) before they
    // run, on a queue of their own.
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.queue = "later".into();
    args.countdown = Some("15s".into());
    args.no_check = true;
    let later = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    for job in [&slow, &later] {
        let s = t.wait_finished(&store, job, Duration::from_secs(90)).await;
        assert_eq!(s.state(), "completed", "{s:?}");
        assert_eq!((s.batches_done, s.batches_lost), (2, 0), "{s:?}");
        assert!(s.problems.is_empty(), "{:?}", s.problems);
    }
    w.stop().await.unwrap();
    w_later.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
