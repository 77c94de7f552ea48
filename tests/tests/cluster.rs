//! Losing a broker node: a three-node RabbitMQ cluster (`deploy/scripts/cluster.sh`), the real
//! `producer` and two real `worker`s given the three nodes' URLs, and a node killed with
//! kill -9 mid-job: every batch's result stored and counted exactly once, nothing
//! dead-lettered, the producer and `producer wait` exit 0. Then a queue spread over three
//! shards (`--shards 3`): leaders on three nodes, done exactly once, priority and cancel across
//! shards, time and broker CPU against one shard reported. The cluster's ports are fixed, so
//! the scenarios run in one test, one after the other, with each killed node started again in
//! between.

#![allow(clippy::unwrap_used)]

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use taskmill_tests::{catalog_ready, cluster::Cluster, until, Dashboard, Logged, TestNs};

/// Batches of one post each, as the scenario has them: the producer is still
/// publishing when the node goes.
const BATCHES: u64 = 50_000;

/// Which node to kill.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// The node that leads the work queue (its quorum queue elects a new leader).
    Leader,
    /// A node the workers are connected to (they reconnect to another).
    WorkersNode,
    /// The node the producer is connected to, while it publishes a burst (it reconnects to
    /// another and publishes again what was unconfirmed).
    ProducersNode,
    /// A node the workers are connected to, restarted mid-job as a rolling upgrade does
    /// (`stop_app` closes its connections, `start_app` brings it back while the job runs).
    Restarted,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_loses_nothing_when_a_broker_node_dies() {
    let cluster = tokio::task::spawn_blocking(Cluster::up).await.unwrap();
    spread_over_the_cluster(&cluster).await;
    for victim in [
        Victim::Leader,
        Victim::WorkersNode,
        Victim::ProducersNode,
        Victim::Restarted,
    ] {
        let node = lose_a_node(&cluster, victim).await;
        if !matches!(victim, Victim::Restarted) {
            tokio::task::block_in_place(|| cluster.start(node));
        }
    }
}

/// Batches of one post each in each job of the sharded scenario.
const SHARDED_BATCHES: u64 = 10_000;

/// A queue spread over three shards: their leaders on the three nodes, jobs done exactly
/// once, a priority job ahead of a backlog and a cancel across shards; the time and broker CPU
/// of the same job on one shard and on three are reported.
async fn spread_over_the_cluster(cluster: &Cluster) {
    let t = TestNs::new();
    let store = t.store().await;
    // Nothing else on the cluster leads a queue now (it is new, and each scenario deletes its
    // queues), so the leader policy places the namespace's queues in turn.
    let file = taskmill_tests::write_jsonl(taskmill_tests::sample::posts(SHARDED_BATCHES));
    let path = file.to_string_lossy().to_string();
    let mut reported = Vec::new();
    for (queue, shards) in [("one", "1"), ("three", "3")] {
        let cpu = cluster.cpu_seconds();
        let started = Instant::now();
        let (code, said) = spawn(
            cluster,
            &t.ns,
            "producer",
            &[
                "enqueue",
                "--file",
                &path,
                "--batch-size",
                "1",
                "--queue",
                queue,
                "--shards",
                shards,
                "--job",
                queue,
                "--no-check",
            ],
            Stdio::null(),
        )
        .exited()
        .await;
        assert!(code.success(), "producer: {said}");
        if queue == "three" {
            // Before any worker: each shard holds a third, led by a node of its own.
            let mut leaders = Vec::new();
            for q in ["three", "three.s1", "three.s2"] {
                leaders.push(cluster.leader(&format!("{}.{q}", t.ns)).await);
            }
            let mut distinct = leaders.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 3, "the shards' leaders: {leaders:?}");
            eprintln!("sharded: the three shards are led by {leaders:?}");
        }
        let workers: Vec<Logged> = (0..2)
            .map(|_| {
                spawn(
                    cluster,
                    &t.ns,
                    "worker",
                    &["--threads", "1", "--queue", queue],
                    Stdio::null(),
                )
            })
            .collect();
        let (code, said) = spawn(
            cluster,
            &t.ns,
            "producer",
            &["wait", queue, "--timeout", "180s"],
            Stdio::null(),
        )
        .exited()
        .await;
        assert!(code.success(), "producer wait: {said}");
        let took = started.elapsed().as_secs_f64();
        let cpu = cluster.cpu_seconds() - cpu;
        let s = store.job_status(queue).await.unwrap().unwrap();
        assert_eq!(s.state(), "completed", "{s:?}");
        assert_eq!(s.batches_done, SHARDED_BATCHES, "{s:?}");
        assert_eq!(s.batches_dead, 0, "{s:?}");
        assert_eq!(
            store.results(queue).await.unwrap().len() as u64,
            SHARDED_BATCHES
        );
        reported.push(format!(
            "{shards} shard(s): {SHARDED_BATCHES} batches in {took:.1} s ({:.0}/s), broker {:.3} \
             CPU-s per 1,000 batches",
            SHARDED_BATCHES as f64 / took,
            cpu * 1000.0 / SHARDED_BATCHES as f64
        ));
        if queue == "one" {
            for w in workers {
                taskmill_tests::sigterm(w.process.id());
                let (code, said) = w.exited().await;
                assert!(code.success(), "worker: {said}");
            }
            continue;
        }
        // A backlog across the shards, a priority-9 job ahead of it, then the backlog
        // cancelled: what is left of it in every shard is dropped.
        let backlog = taskmill_tests::write_jsonl(taskmill_tests::sample::posts(1000));
        let small = taskmill_tests::write_jsonl(taskmill_tests::sample::posts(5));
        let enqueue = |job: &str, priority: &str, file: &std::path::Path| -> Vec<String> {
            let file = file.to_string_lossy();
            [
                "enqueue",
                "--file",
                &file,
                "--batch-size",
                "1",
                "--queue",
                "three",
                "--task",
                "chaos",
                "--param",
                "sleep_ms=20",
                "--job",
                job,
                "--priority",
                priority,
                "--no-check",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect()
        };
        let low = enqueue("low", "0", &backlog);
        let low: Vec<&str> = low.iter().map(String::as_str).collect();
        let (code, said) = spawn(cluster, &t.ns, "producer", &low, Stdio::null())
            .exited()
            .await;
        assert!(code.success(), "producer: {said}");
        taskmill_tests::wait_batches_done(&store, "low", 5).await;
        let high = enqueue("high", "9", &small);
        let mut high: Vec<&str> = high.iter().map(String::as_str).collect();
        high.push("--wait");
        let (code, said) = spawn(cluster, &t.ns, "producer", &high, Stdio::null())
            .exited()
            .await;
        assert!(code.success(), "producer --wait: {said}");
        let (code, said) = spawn(
            cluster,
            &t.ns,
            "producer",
            &["cancel", "low"],
            Stdio::null(),
        )
        .exited()
        .await;
        assert!(code.success(), "producer cancel: {said}");
        until(
            "every batch of the backlog done or dropped",
            Duration::from_secs(60),
            || async {
                let s = store.job_status("low").await.unwrap().unwrap();
                s.batches_done + s.batches_cancelled == 1000
            },
        )
        .await;
        let l = store.job_status("low").await.unwrap().unwrap();
        let h = store.job_status("high").await.unwrap().unwrap();
        assert_eq!(h.state(), "completed", "{h:?}");
        assert_eq!(l.state(), "cancelled", "{l:?}");
        assert!(l.batches_cancelled > 0, "{l:?}");
        assert!(h.finished_ms.unwrap() < l.cancelled_ms.unwrap());
        for w in &workers {
            taskmill_tests::sigterm(w.process.id());
        }
        for w in workers {
            let (code, said) = w.exited().await;
            assert!(code.success(), "worker: {said}");
        }
        let _ = std::fs::remove_file(small);
        let _ = std::fs::remove_file(backlog);
    }
    for line in reported {
        eprintln!("sharded: {line}");
    }
    let _ = std::fs::remove_file(file);
    cluster.delete_queues(&format!("{}.", t.ns)).await;
    t.cleanup().await;
}

/// A binary of the workspace pointed at the cluster.
fn spawn(cluster: &Cluster, ns: &str, bin: &str, args: &[&str], stdin: Stdio) -> Logged {
    let env = [
        ("AMQP_URL", cluster.amqp_url()),
        ("RABBITMQ_API_URL", cluster.api_url()),
        ("RUST_LOG", "warn".to_string()),
    ];
    Logged::spawn(ns, bin, args, &env, stdin)
}

/// One scenario; the node it killed.
async fn lose_a_node(cluster: &Cluster, victim: Victim) -> u8 {
    let t = TestNs::new();
    let store = t.store().await;
    let workers: Vec<Logged> = (0..2)
        .map(|_| spawn(cluster, &t.ns, "worker", &["--threads", "1"], Stdio::null()))
        .collect();
    catalog_ready(&store).await;
    // The producer reads the posts from a pipe: the first half now, the second half once
    // the node is about to die (so that it is publishing a burst then).
    let job = format!("lose-{victim:?}").to_lowercase();
    let mut producer = spawn(
        cluster,
        &t.ns,
        "producer",
        &["enqueue", "--file", "-", "--batch-size", "1", "--job", &job],
        Stdio::piped(),
    );
    let stdin = producer.process.stdin.take().expect("the producer's stdin");
    // The dashboard, given the cluster's URLs, is asked for the job and the queues every
    // 100 ms throughout (it must answer while a node is gone).
    let dashboard = Dashboard::start(
        &t.ns,
        &[
            "--amqp-url",
            &cluster.amqp_url(),
            "--rabbitmq-api-url",
            &cluster.api_url(),
        ],
    );
    let polling = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn(poll_dashboard(
        dashboard.url.clone(),
        job.clone(),
        polling.clone(),
    ));
    let (go, writer) = taskmill_tests::posts_in_two_halves(stdin, BATCHES);
    // The connection of whoever is to lose its node, as the management API lists it (once
    // its node has sampled it, within seconds).
    let name = match victim {
        Victim::Leader => None,
        Victim::WorkersNode | Victim::Restarted => Some("taskmill-worker@"),
        Victim::ProducersNode => Some("taskmill-producer@"),
    };
    if let Some(name) = name {
        until(
            "the connections listed",
            Duration::from_secs(30),
            || async { !cluster.connections(name).await.is_empty() },
        )
        .await;
    }

    // Mid-job: a part published and some done (a tenth for a restart, so that the node is
    // back well before the end).
    let part = match victim {
        Victim::Restarted => BATCHES / 10,
        _ => BATCHES / 4,
    };
    until(
        "a part of the batches published",
        Duration::from_secs(120),
        || async {
            store
                .job_status(&job)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.batches_published >= part && s.batches_done > 0)
        },
    )
    .await;
    let node = match name {
        None => cluster.leader(&format!("{}.tasks", t.ns)).await,
        Some(name) => cluster.connections(name).await.first().map(|(_, n)| *n),
    }
    .unwrap_or_else(|| panic!("no node found for {victim:?}"));
    let done_before = taskmill_tests::batches_done(&store, &job).await;
    let published_before = store
        .job_status(&job)
        .await
        .ok()
        .flatten()
        .map_or(0, |s| s.batches_published);
    let _ = go.send(());
    let killed_at = Instant::now();
    // A restarted node is started again at once, and comes back while the job runs.
    match victim {
        Victim::Restarted => tokio::task::block_in_place(|| cluster.stop(node)),
        _ => tokio::task::block_in_place(|| cluster.kill(node)),
    }
    let back = matches!(victim, Victim::Restarted).then(|| {
        let start = cluster.starter(node);
        let store = store.clone();
        let job = job.clone();
        tokio::spawn(async move {
            tokio::task::spawn_blocking(start).await.unwrap();
            let done = taskmill_tests::batches_done(&store, &job).await;
            (killed_at.elapsed(), done)
        })
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let resumed_at = (done_before + 200).min(BATCHES);
    while taskmill_tests::batches_done(&store, &job).await < resumed_at {
        if Instant::now() > deadline {
            let queues = cluster.api("queues").await.unwrap_or_default();
            let ours: Vec<_> = queues
                .as_array()
                .into_iter()
                .flatten()
                .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(&t.ns)))
                .map(|q| {
                    serde_json::json!({"name": q["name"], "leader": q["leader"], "members": q["members"],
                        "online": q["online"], "messages": q["messages"], "consumers": q["consumers"]})
                })
                .collect();
            panic!(
                "no progress within 120 s of killing tm{node}: {:?}\nqueues: {ours:#?}\nconnections: {:?}",
                store.job_status(&job).await,
                cluster.connections("").await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = killed_at.elapsed();
    if let Some(back) = back {
        let (at, done) = back.await.unwrap();
        eprintln!(
            "Restarted: tm{node} back {:.1} s after it stopped, the job at {done} done of {BATCHES}",
            at.as_secs_f64()
        );
    }
    let gone = if matches!(victim, Victim::Restarted) {
        None
    } else {
        Some(node)
    };
    // Every worker is connected again, each through a live node: those that were on the dead
    // node moved to another of the list (after a restart, any node will do).
    let pids: Vec<String> = workers
        .iter()
        .map(|w| format!(":{}", w.process.id()))
        .collect();
    until(
        "every worker connected through a live node",
        Duration::from_secs(60),
        || async {
            let conns = cluster.connections("taskmill-worker@").await;
            pids.iter().all(|pid| {
                conns
                    .iter()
                    .any(|(name, n)| name.ends_with(pid.as_str()) && Some(*n) != gone)
            }) && conns.iter().all(|(_, n)| Some(*n) != gone)
        },
    )
    .await;
    eprintln!(
        "{victim:?}: lost tm{node} with {done_before} done and {published_before} published; \
         200 more done {:.1} s later, every worker connected through a live node {:.1} s later",
        resumed.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );

    // The producer finished publishing through another node, and says so.
    writer
        .join()
        .expect("the writer")
        .expect("writing the posts");
    let (code, said) = producer.exited().await;
    assert!(code.success(), "producer: {said}");
    let reopened = said.matches("on a new connection").count();
    if reopened > 0 {
        eprintln!("{victim:?}: the producer replaced a refusing connection {reopened} times");
    }
    let (code, said) = spawn(
        cluster,
        &t.ns,
        "producer",
        &["wait", &job, "--timeout", "180s"],
        Stdio::null(),
    )
    .exited()
    .await;
    assert!(code.success(), "producer wait: {said}");

    let s = store.job_status(&job).await.unwrap().unwrap();
    assert_eq!(s.state(), "completed", "{s:?}");
    assert_eq!(s.batches_total, Some(BATCHES), "{s:?}");
    assert_eq!(s.batches_done, BATCHES, "{s:?}");
    assert_eq!(s.batches_dead, 0, "{s:?}");
    assert_eq!(s.records_done, BATCHES, "{s:?}");
    assert_eq!(store.results(&job).await.unwrap().len() as u64, BATCHES);
    // Nothing reached the dead-letter queue (innocent batches redelivered by the node's loss
    // stay under the delivery limit).
    let conn = taskmill_common::amqp::connect(&cluster.amqp_url(), "test")
        .await
        .unwrap();
    assert_eq!(
        taskmill_tests::queue_messages(&conn, &format!("{}.dead", t.ns)).await,
        Some(0)
    );
    let _ = conn.close(0, "done".into()).await;
    for w in &workers {
        taskmill_tests::sigterm(w.process.id());
    }
    for w in workers {
        let (code, said) = w.exited().await;
        assert!(code.success(), "worker: {said}");
    }
    polling.cancel();
    let polled = poller.await.unwrap();
    eprintln!("{victim:?}: the dashboard {polled}");
    assert!(
        polled.unanswered == 0,
        "the dashboard did not answer: {polled}"
    );
    assert!(polled.job_ok > 0 && polled.job_not_ok == 0, "{polled}");
    assert!(
        polled.queues_ok_last,
        "the queue view did not come back: {polled}"
    );
    dashboard.stop();
    cluster.delete_queues(&format!("{}.", t.ns)).await;
    t.cleanup().await;
    node
}

/// What the dashboard answered while a node was lost.
#[derive(Debug, Default)]
struct Polled {
    /// `GET /api/jobs/{job}`: 200 (or 404 before the job is registered), other answers.
    job_ok: u32,
    job_not_ok: u32,
    /// `GET /api/queues`: 200, other answers (the management API of a dying node).
    queues_ok: u32,
    queues_not_ok: u32,
    /// Whether the last answer of the queue view was 200.
    queues_ok_last: bool,
    /// Requests with no answer within 10 s, or refused.
    unanswered: u32,
}

impl std::fmt::Display for Polled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answered the job {} times (other answers {}), the queues {} times (other answers \
             {}), left {} requests unanswered",
            self.job_ok, self.job_not_ok, self.queues_ok, self.queues_not_ok, self.unanswered
        )
    }
}

async fn poll_dashboard(
    url: String,
    job: String,
    stop: tokio_util::sync::CancellationToken,
) -> Polled {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut p = Polled::default();
    while !stop.is_cancelled() {
        match http.get(format!("{url}api/jobs/{job}")).send().await {
            Ok(r) if r.status().is_success() || r.status() == 404 => p.job_ok += 1,
            Ok(_) => p.job_not_ok += 1,
            Err(_) => p.unanswered += 1,
        }
        match http.get(format!("{url}api/queues")).send().await {
            Ok(r) => {
                p.queues_ok_last = r.status().is_success();
                if p.queues_ok_last {
                    p.queues_ok += 1;
                } else {
                    p.queues_not_ok += 1;
                }
            }
            Err(_) => p.unanswered += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p
}
