//! Tasks that never return: a batch past its time limit is settled without waiting for its
//! thread, a drain does not wait for such a thread, and a worker whose every thread is stuck
//! exits (code 7) for its supervisor to restart it.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{bin_path, sample, sigterm, write_jsonl, KillOnDrop, TestNs};

/// A worker process under a restart loop, as compose's `restart` or Kubernetes run it: started
/// again whenever it exits with code 7 (every analysis thread stuck); its exit codes are kept.
struct Supervised {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    codes: Arc<Mutex<Vec<Option<i32>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Supervised {
    /// A failing test leaves no worker behind.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = c.kill();
        }
    }
}

impl Supervised {
    fn start(ns: &str, threads: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::default();
        let codes: Arc<Mutex<Vec<Option<i32>>>> = Arc::default();
        let (ns, threads) = (ns.to_string(), threads.to_string());
        let thread = std::thread::spawn({
            let (stop, child, codes) = (stop.clone(), child.clone(), codes.clone());
            move || loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                *child.lock().unwrap() = Some(
                    Command::new(bin_path("worker"))
                        .env("TASKMILL_NAMESPACE", &ns)
                        .env("TASKMILL_THREADS", &threads)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
                let code = loop {
                    {
                        let mut c = child.lock().unwrap();
                        if let Some(status) = c.as_mut().and_then(|c| c.try_wait().unwrap()) {
                            *c = None;
                            break status.code();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                codes.lock().unwrap().push(code);
                if code != Some(7) {
                    return;
                }
            }
        });
        Self {
            stop,
            child,
            codes,
            thread: Some(thread),
        }
    }

    /// Stops the loop and the worker (SIGTERM); the exit codes it had, the last one last.
    fn stop(mut self) -> Vec<Option<i32>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.child.lock().unwrap().as_ref() {
            sigterm(c.id());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let codes = self.codes.lock().unwrap().clone();
        codes
    }
}

/// A worker process in namespace `ns` with `env` added, killed when dropped.
fn worker(ns: &str, env: &[(&str, &str)]) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin_path("worker"))
            .env("TASKMILL_NAMESPACE", ns)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Enqueues one batch that sleeps ten minutes under time limit `limit`, one attempt: its job
/// and the records' file.
async fn enqueue_stuck(t: &TestNs, limit: &str) -> (String, std::path::PathBuf) {
    let one = write_jsonl(sample::posts(1));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![one.clone()];
    args.time_limit = Some(limit.into());
    args.params = vec!["sleep_ms=600000".into(), "retry_max_attempts=1".into()];
    (enqueue(&t.conn(), &args, |_| {}).await.unwrap().job, one)
}

/// Two workers of one thread each, two batches that would sleep ten minutes under a 1 s time
/// limit, then a normal job: the normal job completes and the stuck batches are dead-lettered
/// `time_limit`, both within a minute; the workers whose only thread was stuck exited with
/// code 7 and were restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_never_returns_does_not_stall_the_queue() {
    let t = TestNs::new();
    let store = t.store().await;
    let workers = [Supervised::start(&t.ns, "1"), Supervised::start(&t.ns, "1")];
    let two = write_jsonl(sample::posts(2));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![two.clone()];
    args.batch_size = 1;
    args.time_limit = Some("1s".into());
    args.params = vec![
        "sleep_ms=600000".into(),
        "retry_max_attempts=2".into(),
        "retry_base_ms=100".into(),
    ];
    let stuck = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let twenty = write_jsonl(sample::posts(20));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![twenty.clone()];
    args.batch_size = 2;
    let normal = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    let s = t
        .wait_finished(&store, &normal, Duration::from_secs(60))
        .await;
    assert_eq!(
        (s.state(), s.batches_done),
        (taskmill_common::JobState::Completed, 10)
    );
    let s = t
        .wait_finished(&store, &stuck, Duration::from_secs(60))
        .await;
    assert_eq!(s.state(), "completed_with_errors", "{s:?}");
    assert_eq!((s.batches_dead, s.retries), (2, 2), "{s:?}");
    let dead = store.dead_batches(&stuck).await.unwrap();
    assert!(
        dead.iter().all(|(_, r)| r["kind"] == "time_limit"
            && r["error"].as_str().unwrap().starts_with("time_limit")),
        "{dead:?}"
    );
    let codes: Vec<_> = workers.into_iter().flat_map(Supervised::stop).collect();
    assert!(codes.contains(&Some(7)), "{codes:?}");
    // Every exit was a restart for stuck threads or the drain at the end.
    assert!(
        codes.iter().all(|c| matches!(c, Some(0) | Some(7))),
        "{codes:?}"
    );
    for f in [two, twenty] {
        let _ = std::fs::remove_file(f);
    }
    t.cleanup().await;
}

/// A drain does not wait for a thread stuck past its batch's time limit: with a shutdown
/// timeout of ten minutes, SIGTERM still ends the worker (exit 0) once its batches are
/// settled; the stuck one was dead-lettered `time_limit` already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_does_not_wait_for_a_stuck_thread() {
    let t = TestNs::new();
    let store = t.store().await;
    let w = worker(
        &t.ns,
        &[
            ("TASKMILL_THREADS", "2"),
            ("TASKMILL_SHUTDOWN_TIMEOUT", "600"),
        ],
    );
    let (job, one) = enqueue_stuck(&t, "500ms").await;
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.batches_dead, 1, "{s:?}");
    let dead = store.dead_batches(&job).await.unwrap();
    assert_eq!(dead[0].1["kind"], "time_limit", "{dead:?}");
    // The thread still sleeps; the worker drains without it.
    assert!(sigterm(w.id()));
    let exited = w.exit_within(Duration::from_secs(60)).await;
    assert_eq!(
        exited,
        Ok(Some(0)),
        "the worker did not end within 60 s of SIGTERM"
    );
    let _ = std::fs::remove_file(one);
    t.cleanup().await;
}

/// A suspect batch (one that was running when a worker died) waiting for the only thread of a
/// worker whose thread is stuck past a time limit is given back unrun when that worker exits 7:
/// its start alone is not counted, since it never ran (two such counts would dead-letter it as
/// `worker_crash`, an innocent batch of a healthy job; seen in CI under load), and the next
/// worker runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_batch_given_back_unrun_is_not_counted_as_run_alone() {
    use lapin::options::BasicGetOptions;
    use redis::AsyncCommands;
    let t = TestNs::new();
    let names = taskmill_common::topology::Names::new(&t.ns);
    let store = t.store().await;
    let mut con = taskmill_tests::redis_con().await;
    let ten = write_jsonl(sample::posts(10));
    let mut args = EnqueueArgs::new("post-stats");
    args.files = vec![ten.clone()];
    let normal = enqueue(&t.conn(), &args, |_| {}).await.unwrap().job;
    // Held unacked, as by a worker that dies: it comes back redelivered. It was running then:
    // started once.
    let (conn, ch) = taskmill_tests::raw_channel().await;
    let work = names.queue("tasks");
    let _held = ch
        .basic_get(work.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("the batch");
    let starts = format!(
        "{}:starts",
        taskmill_common::store::Keys::new(&t.ns).job(&normal)
    );
    let _: () = con.hset(&starts, "0", 1).await.unwrap();
    // A worker of one thread, stuck in a batch past its 1 s limit (for good 5 s later).
    let w = worker(&t.ns, &[("TASKMILL_THREADS", "1")]);
    let (stuck, one) = enqueue_stuck(&t, "1s").await;
    let s = t
        .wait_finished(&store, &stuck, Duration::from_secs(30))
        .await;
    assert_eq!(s.batches_dead, 1, "{s:?}");
    // The suspect comes back now, while the thread is still stuck.
    let _ = ch.close(200, "".into()).await;
    let exited = w.exit_within(Duration::from_secs(60)).await;
    assert_eq!(
        exited,
        Ok(Some(7)),
        "the stuck worker did not exit 7 within 60 s"
    );
    // The worker took it as a suspect (a second start) but never ran it.
    let counted: std::collections::HashMap<String, u64> = con.hgetall(&starts).await.unwrap();
    assert_eq!(counted.get("0"), Some(&2), "{counted:?}");
    assert_eq!(counted.get("0:solo"), None, "{counted:?}");
    // The next worker runs it, and the job completes.
    let _w = t.spawn_worker(t.worker_args());
    let s = t
        .wait_finished(&store, &normal, Duration::from_secs(60))
        .await;
    assert_eq!(
        (s.state(), s.batches_done),
        (taskmill_common::JobState::Completed, 1)
    );
    let _ = conn.close(200, "done".into()).await;
    for f in [one, ten] {
        let _ = std::fs::remove_file(f);
    }
    t.cleanup().await;
}
