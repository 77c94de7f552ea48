//! Steering jobs across worker processes: cancel, delete.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{
    batches_done, bin_path, producer, queue_messages, raw_channel, sample, sigterm, until,
    wait_batches_done, write_jsonl, KillOnDrop, TestNs,
};

/// A worker process, killed if the test fails before it stops it.
fn worker(ns: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", ns)
            .env("TASKMILL_THREADS", "2")
            .env("TASKMILL_PREFETCH", "16")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn stop(mut w: KillOnDrop) {
    assert!(sigterm(w.id()));
    assert_eq!(w.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_drops_what_is_left_across_two_workers() {
    let t = TestNs::new();
    let workers = [worker(&t.ns), worker(&t.ns)];
    let file = write_jsonl(sample::posts(1000));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.params = vec!["sleep_ms=20".into()];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let store = t.store().await;
    wait_batches_done(&store, &job, 20).await;

    let out = producer(&t.ns, &["cancel", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cancelled at once, and it stays so.
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "cancelled");
    assert!(s.is_finished() && s.cancelled_ms.is_some());
    until(
        "every batch done or dropped",
        Duration::from_secs(60),
        || async {
            let s = store.job_status(&job).await.unwrap().unwrap();
            s.batches_done + s.batches_cancelled == 1000
        },
    )
    .await;
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "cancelled");
    assert_eq!(s.batches_dead, 0);
    assert!(s.batches_cancelled > 500, "{s:?}");
    assert_eq!(
        store.results(&job).await.unwrap().len() as u64,
        s.batches_done
    );
    // wait exits 1; cancelling again says so and changes nothing.
    assert_eq!(producer(&t.ns, &["wait", &job]).status.code(), Some(1));
    let again = producer(&t.ns, &["cancel", &job]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already finished"));
    assert_eq!(store.job_status(&job).await.unwrap().unwrap(), s);
    assert_eq!(
        producer(&t.ns, &["cancel", "no-such-job"]).status.code(),
        Some(4)
    );

    // A finished job cannot be cancelled; it can be deleted, with its results.
    let mut quick = EnqueueArgs::new("post-stats");
    quick.files = vec![file.clone()];
    let done = enqueue(&t.conn(), &quick, |_| {}).await.unwrap().job;
    t.wait_finished(&store, &done, Duration::from_secs(60))
        .await;
    let out = producer(&t.ns, &["cancel", &done]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already finished (completed)"));
    assert_eq!(
        store.job_status(&done).await.unwrap().unwrap().state(),
        "completed"
    );
    assert_eq!(
        producer(&t.ns, &["delete", &done]).status.code(),
        Some(2),
        "no --yes off a terminal"
    );
    assert!(producer(&t.ns, &["delete", &done, "--yes"])
        .status
        .success());
    assert!(store.job_status(&done).await.unwrap().is_none());
    assert!(store.results(&done).await.unwrap().is_empty());
    assert!(!store.jobs().await.unwrap().iter().any(|(j, _)| *j == done));
    assert_eq!(
        producer(&t.ns, &["delete", &done, "--yes"]).status.code(),
        Some(4)
    );

    // A running job is refused unless --cancel.
    let mut slow = args.clone();
    slow.queue = "idle".into();
    let running = enqueue(&t.conn(), &slow, |_| {}).await.unwrap().job;
    let out = producer(&t.ns, &["delete", &running, "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cancel"));
    assert!(producer(&t.ns, &["delete", &running, "--yes", "--cancel"])
        .status
        .success());
    assert!(store.job_status(&running).await.unwrap().is_none());

    for w in workers {
        stop(w);
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// An enqueue from a stdin that is still open, with its job id read from its stdout.
struct Feeding {
    child: Child,
    stdin: std::process::ChildStdin,
    job: String,
}

fn feed(ns: &str, extra: &[&str], records: u64) -> Feeding {
    use std::io::{BufRead, Write};
    let mut child = Command::new(bin_path("producer"))
        .args(["enqueue", "--file", "-", "--batch-size", "10"])
        .args(extra)
        .env("TASKMILL_NAMESPACE", ns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for r in sample::posts(records) {
        writeln!(stdin, "{r}").unwrap();
    }
    stdin.flush().unwrap();
    let mut job = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut job)
        .unwrap();
    Feeding {
        child,
        stdin,
        job: job.trim().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_enqueue_leaves_an_interrupted_job_that_wait_ends() {
    let t = TestNs::new();
    let workers = [worker(&t.ns), worker(&t.ns)];
    let store = t.store().await;

    // Ctrl-C half-way: what was sent is confirmed, the job is interrupted with it.
    let f = tokio::task::spawn_blocking({
        let ns = t.ns.clone();
        move || feed(&ns, &[], 200)
    })
    .await
    .unwrap();
    until("200 records published", Duration::from_secs(60), || async {
        store
            .job_status(&f.job)
            .await
            .unwrap()
            .is_some_and(|s| s.batches_published >= 20)
    })
    .await;
    let job = f.job.clone();
    let Feeding { child, stdin, .. } = f;
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    drop(stdin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let wait = producer(&t.ns, &["wait", &job, "--timeout", "60"]);
    assert_eq!(
        wait.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&wait.stderr)
    );
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "interrupted");
    assert_eq!(s.batches_total, Some(20));
    assert_eq!(s.batches_done, 20);
    assert!(s.interrupted_ms.is_some() && s.finished_ms.is_some());

    // kill -9 half-way: the lease lapses and the job becomes interrupted the same way.
    let f = tokio::task::spawn_blocking({
        let ns = t.ns.clone();
        move || feed(&ns, &["--lease-seconds", "3"], 100)
    })
    .await
    .unwrap();
    until("100 records published", Duration::from_secs(60), || async {
        store
            .job_status(&f.job)
            .await
            .unwrap()
            .is_some_and(|s| s.batches_published >= 10)
    })
    .await;
    let job = f.job.clone();
    let Feeding {
        mut child, stdin, ..
    } = f;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    assert_ne!(
        store.job_status(&job).await.unwrap().unwrap().state(),
        "interrupted",
        "not before the lease lapses"
    );
    let wait = producer(&t.ns, &["wait", &job, "--timeout", "60"]);
    assert_eq!(
        wait.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&wait.stderr)
    );
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "interrupted");
    assert_eq!(s.batches_total, Some(s.batches_done));
    assert!(s.batches_done >= 10);
    let shown = producer(&t.ns, &["status", &job]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("interrupted"));

    for w in workers {
        stop(w);
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_key_admits_one_job_at_a_time() {
    let t = TestNs::new();
    // No worker: the holder stays pending (holding its key) until the test cancels it, however
    // slow the machine (with workers it could finish, and free the key, mid-test).
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.unique_key = Some("nightly-report".into());
    // Two producers race for the key: exactly one job is registered.
    let conn = t.conn();
    let (a, b) = tokio::join!(enqueue(&conn, &args, |_| {}), enqueue(&conn, &args, |_| {}));
    let (a, b) = (a.unwrap(), b.unwrap());
    let winner = match (&a.duplicate_of, &b.duplicate_of) {
        (None, Some(holder)) => {
            assert_eq!(holder, &a.job);
            a.job.clone()
        }
        (Some(holder), None) => {
            assert_eq!(holder, &b.job);
            b.job.clone()
        }
        other => panic!("exactly one job must win: {other:?}"),
    };
    let store = t.store().await;
    assert_eq!(store.jobs().await.unwrap().len(), 1);
    // The command line: the existing id on stdout, a notice on stderr, exit 0.
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            file.to_str().unwrap(),
            "--unique-key",
            "nightly-report",
        ],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), winner);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing enqueued"));
    assert_eq!(store.jobs().await.unwrap().len(), 1);
    // Once the holder is finished (here: cancelled), the key is free again.
    assert!(producer(&t.ns, &["cancel", &winner]).status.success());
    let next = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    assert_eq!(next.duplicate_of, None);
    assert_ne!(next.job, winner);
    assert_eq!(store.jobs().await.unwrap().len(), 2);
    assert!(producer(&t.ns, &["cancel", &next.job]).status.success());
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn countdown_waits_in_the_broker_and_expired_batches_are_dropped() {
    let t = TestNs::new();
    let workers = [worker(&t.ns), worker(&t.ns)];
    let store = t.store().await;
    let file = write_jsonl(sample::posts(50));
    // --countdown 2s: no batch starts before 2 s, and the workers hold none meanwhile.
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.countdown = Some("2s".into());
    // The ETA is 2 s after some moment of the enqueue: bounded by clocks read around it.
    let before = taskmill_common::now_ms();
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let after = taskmill_common::now_ms();
    let s = store.job_status(&job).await.unwrap().unwrap();
    let eta = s.eta_ms.unwrap();
    assert!(
        (before + 2_000..=after + 2_000).contains(&eta),
        "eta {eta}, enqueue from {before} to {after}"
    );
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.batches_done, 5);
    assert!(
        s.started_ms.unwrap() >= eta,
        "a batch started before its time: {s:?}"
    );

    // --expires 1s on a queue no worker consumes yet: past the expiry, a worker drops them.
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.queue = "later".into();
    args.expires = Some("1s".into());
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let expires = store
        .job_status(&job)
        .await
        .unwrap()
        .unwrap()
        .expires_ms
        .unwrap();
    until("the expiry", Duration::from_secs(10), || async {
        taskmill_common::now_ms() > expires
    })
    .await;
    let late = |ns: &str| {
        KillOnDrop(
            Command::new(bin_path("worker"))
                .env("TASKMILL_NAMESPACE", ns)
                .env("TASKMILL_QUEUES", "later")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let late = [late(&t.ns), late(&t.ns)];
    let wait = producer(&t.ns, &["wait", &job, "--timeout", "60"]);
    assert_eq!(wait.status.code(), Some(1));
    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.batches_expired, 5);
    let text = String::from_utf8_lossy(&producer(&t.ns, &["status", &job]).stdout).into_owned();
    assert!(
        text.contains("  expired: 5 batches dropped unrun") && text.contains("expires "),
        "{text}"
    );
    assert_eq!(s.batches_done, 0);
    assert!(store.results(&job).await.unwrap().is_empty());
    for w in late {
        stop(w);
    }
    for w in workers {
        stop(w);
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_its_time_limit_is_retried_and_the_worker_says_it_is_stuck() {
    let t = TestNs::new();
    let metered = |ns: &str| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", ns)
            .env("TASKMILL_THREADS", "2")
            .env("TASKMILL_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (child, port)
    };
    let workers = [metered(&t.ns), metered(&t.ns)];
    let ports = [workers[0].1, workers[1].1];
    let get = |port: u16, path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await;
        match r {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    };
    for port in ports {
        until("the worker ready", Duration::from_secs(60), || async {
            get(port, "/readyz").await.0 == 200
        })
        .await;
    }
    let file = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.time_limit = Some("200ms".into());
    args.params = vec![
        "sleep_ms=1500".into(),
        "retry_max_attempts=2".into(),
        "retry_base_ms=100".into(),
    ];
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // While a thread sleeps past twice the limit, its worker's /readyz says so.
    until(
        "/readyz reporting stuck threads",
        Duration::from_secs(60),
        || async {
            for port in ports {
                let (code, text) = get(port, "/readyz").await;
                if code == 503 && text.contains("stuck") {
                    return true;
                }
            }
            false
        },
    )
    .await;
    let store = t.store().await;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.state(), "completed_with_errors");
    assert_eq!((s.batches_dead, s.retries), (2, 2));
    let dead = store.dead_batches(&job).await.unwrap();
    assert!(dead
        .iter()
        .all(|(_, r)| r["error"].as_str().unwrap().starts_with("time_limit")));
    // Two batches, two attempts each, all over the limit: at least four overruns across the
    // workers (delivery is at-least-once: a batch may run twice; the job counts it once).
    let mut overruns = 0.0;
    for port in ports {
        let (_, metrics) = get(port, "/metrics").await;
        overruns += metrics
            .lines()
            .find(|l| l.starts_with("taskmill_time_limit_overruns_total{task=\"chaos\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    assert!(overruns >= 4.0, "{overruns}");
    for port in ports {
        until("/readyz ready again", Duration::from_secs(60), || async {
            get(port, "/readyz").await.0 == 200
        })
        .await;
    }
    for (mut w, _) in workers {
        stop_child(&mut w);
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

fn stop_child(w: &mut Child) {
    assert!(sigterm(w.id()));
    assert_eq!(w.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_workers_without_holding_others_back() {
    let t = TestNs::new();
    let workers = [worker(&t.ns), worker(&t.ns)];
    let store = t.store().await;
    let file = write_jsonl(sample::posts(100));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.batch_size = 1;
    args.rate_limit = Some("20/s".into());
    let before = std::time::Instant::now();
    let limited = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // Another job on the same queue, no limit, queued behind the 100 limited batches: it is
    // not held back by them.
    let mut free = EnqueueArgs::new("post-stats");
    free.files = vec![file.clone()];
    let free = enqueue(&t.conn(), &free, |_| {}).await.unwrap().job;
    let f = t
        .wait_finished(&store, &free, Duration::from_secs(60))
        .await;
    let took = before.elapsed();
    assert_eq!(f.state(), "completed");
    let s = store.job_status(&limited).await.unwrap().unwrap();
    // What the limit let start by then (20 a second, the first at once): the limited job
    // has done no more, and, had its batches held the workers while they waited for a slot,
    // the free job would have finished behind most of them.
    let allowed = (took.as_secs_f64() * 20.0).floor() as u64 + 1;
    assert!(
        s.batches_done <= allowed.min(50),
        "{} limited batches done when the free job finished, {took:?} after the start",
        s.batches_done
    );
    let s = t
        .wait_finished(&store, &limited, Duration::from_secs(120))
        .await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.batches_done, 100);
    // 100 starts at most 20 a second, across both workers: the first and the last are at
    // least 99 × 50 ms apart; and batches that wait for a slot in the broker's delay queues
    // come back within a tier of it, so the job is not much slower than its limit.
    let span = s.finished_ms.unwrap() - s.started_ms.unwrap();
    assert!(
        (4_800..=20_000).contains(&span),
        "100 batches in {span} ms at 20/s"
    );
    for w in workers {
        stop(w);
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_job_overtakes_a_low_priority_backlog() {
    let t = TestNs::new();
    let store = t.store().await;
    let slow = |ns: &str| {
        KillOnDrop(
            Command::new(bin_path("worker"))
                .env("TASKMILL_NAMESPACE", ns)
                .env("TASKMILL_THREADS", "1")
                .env("TASKMILL_PREFETCH", "4")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let workers = [slow(&t.ns), slow(&t.ns)];
    // A backlog of 200 low-priority batches of 20 ms each (two single-threaded workers: ~2 s).
    let file = write_jsonl(sample::posts(200));
    let mut low = EnqueueArgs::new("chaos");
    low.files = vec![file.clone()];
    low.batch_size = 1;
    low.params = vec!["sleep_ms=20".into()];
    let low = enqueue(&t.conn(), &low, |_| {}).await.unwrap().job;
    wait_batches_done(&store, &low, 5).await;
    // Then a priority-9 job: it does not wait behind the backlog.
    let small = write_jsonl(sample::posts(5));
    let mut high = EnqueueArgs::new("chaos");
    high.files = vec![small.clone()];
    high.batch_size = 1;
    high.params = vec!["sleep_ms=20".into()];
    high.priority = 9;
    let high = enqueue(&t.conn(), &high, |_| {}).await.unwrap().job;
    let h = t
        .wait_finished(&store, &high, Duration::from_secs(60))
        .await;
    assert_eq!(h.state(), "completed");
    assert_eq!(h.priority, 9);
    let l = store.job_status(&low).await.unwrap().unwrap();
    assert!(
        !l.is_finished() && l.batches_done < 150,
        "the high-priority job waited behind the backlog: {l:?}"
    );
    let l = t
        .wait_finished(&store, &low, Duration::from_secs(120))
        .await;
    assert!(h.finished_ms.unwrap() < l.finished_ms.unwrap());
    for w in workers {
        stop(w);
    }
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(small);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_flags_a_priority_job_overtakes_the_backlog_a_worker_holds() {
    let t = TestNs::new();
    let store = t.store().await;
    // One worker with default flags: it takes up to 256 batches of the backlog in hand.
    let w = KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", &t.ns)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // 600 batches of 20 ms each.
    let file = write_jsonl(sample::posts(600));
    let mut low = EnqueueArgs::new("chaos");
    low.files = vec![file.clone()];
    low.batch_size = 1;
    low.params = vec!["sleep_ms=20".into()];
    let low = enqueue(&t.conn(), &low, |_| {}).await.unwrap().job;
    wait_batches_done(&store, &low, 10).await;
    // The worker holds a full prefetch of the backlog now (in hand: neither ready in the
    // queue nor done; done is read last, so the count errs low).
    let work = format!("{}.tasks", t.ns);
    let (conn, _ch) = raw_channel().await;
    until(
        "the worker holds 256 batches",
        Duration::from_secs(30),
        || async {
            let ready = queue_messages(&conn, &work).await.unwrap_or(600);
            let done = batches_done(&store, &low).await;
            600 - u64::from(ready) - done >= 250
        },
    )
    .await;
    let before = store.job_status(&low).await.unwrap().unwrap().batches_done;
    // A priority-9 job of three batches: they run next, not after the 256 in hand.
    let small = write_jsonl(sample::posts(3));
    let mut high = EnqueueArgs::new("chaos");
    high.files = vec![small.clone()];
    high.batch_size = 1;
    high.params = vec!["sleep_ms=20".into()];
    high.priority = 9;
    let high = enqueue(&t.conn(), &high, |_| {}).await.unwrap().job;
    let h = t
        .wait_finished(&store, &high, Duration::from_secs(60))
        .await;
    let l = store.job_status(&low).await.unwrap().unwrap();
    assert_eq!(h.state(), "completed");
    assert!(
        l.batches_done - before < 64,
        "{} backlog batches ran before the priority job's 3 ({before} done before it)",
        l.batches_done - before
    );
    stop(w);
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(small);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_broker_leaves_in_a_delay_queue_past_its_ttl_is_moved_back() {
    use lapin::{
        options::{BasicAckOptions, BasicPublishOptions, BasicRejectOptions},
        types::{AMQPValue, FieldTable},
    };
    use taskmill_common::envelope::{HEADER_DELAYED_AT, HEADER_ETA};
    let t = TestNs::new();
    let w = worker(&t.ns);
    let store = t.store().await;
    let file = write_jsonl(sample::posts(10));
    // Two jobs of one batch, two hours ahead: the worker puts both into the hour's delay queue.
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.countdown = Some("2h".into());
    let held = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let stuck = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let delay = format!("{}.tasks.delay.3600000", t.ns);
    let (conn, ch) = taskmill_tests::raw_channel().await;
    let conn = std::sync::Arc::new(conn);
    // Messages in a queue (0 while it does not exist).
    let count = |conn: std::sync::Arc<lapin::Connection>, q: String| async move {
        taskmill_tests::queue_messages(&conn, &q).await.unwrap_or(0)
    };
    until(
        "both batches in the delay queue",
        Duration::from_secs(30),
        || {
            let (conn, q) = (conn.clone(), delay.clone());
            async move { count(conn, q).await == 2 }
        },
    )
    .await;
    // The second as the broker would leave it behind: delayed two hours ago, its time come.
    let mut got = Vec::new();
    for _ in 0..2 {
        let g = ch
            .basic_get(delay.as_str().into(), Default::default())
            .await
            .unwrap()
            .unwrap();
        got.push(g.delivery);
    }
    for d in got {
        let id = d.properties.message_id().as_ref().unwrap().to_string();
        if !id.starts_with(&stuck) {
            d.acker
                .reject(BasicRejectOptions { requeue: true })
                .await
                .unwrap();
            continue;
        }
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        let mut inner = headers.inner().clone();
        inner.remove(HEADER_ETA);
        headers = FieldTable::from(inner);
        let two_hours_ago = taskmill_common::now_ms() as i64 - 7_200_000;
        headers.insert(
            HEADER_DELAYED_AT.into(),
            AMQPValue::LongLongInt(two_hours_ago),
        );
        ch.basic_publish(
            "".into(),
            delay.as_str().into(),
            BasicPublishOptions::default(),
            &d.data,
            d.properties.clone().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    // A worker moves it back to its queue within a few looks, and runs it.
    let s = t
        .wait_finished(&store, &stuck, Duration::from_secs(30))
        .await;
    assert_eq!(s.state(), "completed");
    assert_eq!(s.batches_done, 1);
    // The other one's time has not come: it stays where it is.
    let s = store.job_status(&held).await.unwrap().unwrap();
    assert_eq!(s.batches_done, 0, "{s:?}");
    // (Waited for: the worker's sweep may be looking at the queue's head right now, which
    // holds it unacked for a moment.)
    until(
        "the held batch ready in the delay queue",
        Duration::from_secs(10),
        || {
            let (conn, q) = (conn.clone(), delay.clone());
            async move { count(conn, q).await == 1 }
        },
    )
    .await;
    stop(w);
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A job deleted while its batches wait out a countdown in a delay queue: when they come
/// back, the workers drop them quietly (no `unknown_job` dead letter, nothing counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_jobs_batches_are_dropped_quietly_wherever_they_are() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    taskmill_tests::catalog_ready(&store).await;
    let file = write_jsonl(sample::posts(30));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![file.clone()];
    args.countdown = Some("2s".into());
    let job = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let text = String::from_utf8_lossy(&producer(&t.ns, &["status", &job]).stdout).into_owned();
    assert!(text.contains("  options: starts in "), "{text}");
    // All three wait in a delay queue of the broker (the worker saw they were early).
    let (conn, _ch) = taskmill_tests::raw_channel().await;
    until(
        "the batches in a delay queue",
        Duration::from_secs(30),
        || async {
            let mut n = 0;
            for q in taskmill_tests::broker_queues(&t.ns).await {
                if q.contains(".delay.") {
                    n += taskmill_tests::queue_messages(&conn, &q).await.unwrap_or(0);
                }
            }
            n == 3
        },
    )
    .await;
    let out = producer(&t.ns, &["delete", &job, "--cancel", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(store.job_status(&job).await.unwrap().is_none());
    until(
        "the three batches dropped",
        Duration::from_secs(30),
        || async {
            w.stats
                .batches_deleted
                .load(std::sync::atomic::Ordering::SeqCst)
                == 3
        },
    )
    .await;
    assert_eq!(
        w.stats
            .batches_dead
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let dead = taskmill_tests::queue_messages(&conn, &format!("{}.dead", t.ns)).await;
    assert_eq!(dead, Some(0), "a deleted job's batch became a dead letter");
    assert!(
        store.job_status(&job).await.unwrap().is_none(),
        "nothing re-created the job"
    );
    let _ = conn.close(200, "done".into()).await;
    w.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
