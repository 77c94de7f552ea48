//! Periodic schedules (`producer schedule`, `producer scheduler`): what cannot run at each tick
//! is refused when the schedule is added; three schedulers on one `--every 1s` schedule for a
//! minute, one of them killed with kill -9 and started again every ten ticks, enqueue exactly
//! one job a tick (`sched-NAME-SECONDS`) and miss none.

#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use taskmill_tests::{
    bin_path, catalog_ready, producer, sample, sigterm, until, write_jsonl, KillOnDrop, TestNs,
};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn scheduler(ns: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin_path("producer"))
            .arg("scheduler")
            .env("TASKMILL_NAMESPACE", ns)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a scheduler"),
    )
}

/// The schedule's last tick (ms), 0 before the first.
async fn last_tick(store: &taskmill_common::store::Store, name: &str) -> u64 {
    store
        .schedule(name)
        .await
        .ok()
        .flatten()
        .and_then(|f| f.get("last_tick_ms").and_then(|t| t.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_enqueue_each_tick_once_and_miss_none() {
    let t = TestNs::new();
    let store = t.store().await;
    let worker = t.spawn_worker(t.worker_args());
    catalog_ready(&store).await;
    let file = write_jsonl(sample::posts(4));
    let f = file.to_str().unwrap();

    // Refused when added, with the reason (exit 2), and nothing stored.
    for (args, why) in [
        (vec!["--every", "500ms", "--", "--file", f], "at least 1s"),
        (
            vec!["--cron", "every day", "--", "--file", f],
            "not a cron expression",
        ),
        (vec!["--every", "1s", "--", "--file", "-"], "stdin"),
        (
            vec!["--every", "1s", "--", "--file", f, "--job", "j"],
            "--job",
        ),
        (
            vec!["--every", "1s", "--", "--file", f, "--priority", "12"],
            "priority",
        ),
        (
            vec!["--every", "1s", "--missed", "later", "--", "--file", f],
            "catch-up:N",
        ),
        (vec!["--every", "1s", "--", "--flie", f], "--flie"),
        (
            vec![
                "--cron",
                "0 3 * * *",
                "--timezone",
                "Mars/Olympus",
                "--",
                "--file",
                f,
            ],
            "not an IANA time zone",
        ),
        (
            vec!["--every", "1s", "--timezone", "UTC", "--", "--file", f],
            "--cron",
        ),
    ] {
        let mut argv = vec!["schedule", "add", "bad"];
        argv.extend(args.iter().copied());
        let out = producer(&t.ns, &argv);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{argv:?}: {}", stderr(&out));
    }
    assert!(store.schedule_names().await.unwrap().is_empty());

    let add = [
        "schedule",
        "add",
        "tick",
        "--every",
        "1s",
        "--",
        "--file",
        f,
        "--batch-size",
        "2",
    ];
    let out = producer(&t.ns, &add);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = producer(&t.ns, &add);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("exists"));

    // Three schedulers for a minute; every ten ticks one of them is killed (kill -9) and
    // started again.
    let mut schedulers: Vec<KillOnDrop> = (0..3).map(|_| scheduler(&t.ns)).collect();
    let mut kills = 0;
    until("the first tick", Duration::from_secs(60), || async {
        last_tick(&store, "tick").await > 0
    })
    .await;
    for round in 0..6 {
        let from = last_tick(&store, "tick").await;
        until("ten more ticks", Duration::from_secs(60), || async {
            last_tick(&store, "tick").await >= from + 10_000
        })
        .await;
        let i = round % 3;
        let _ = schedulers[i].0.kill();
        let _ = schedulers[i].0.wait();
        kills += 1;
        schedulers[i] = scheduler(&t.ns);
    }
    let before_pause = last_tick(&store, "tick").await;
    until("two more ticks", Duration::from_secs(60), || async {
        last_tick(&store, "tick").await >= before_pause + 2000
    })
    .await;

    // Paused: shown so; the schedulers stop at it.
    let out = producer(&t.ns, &["schedule", "pause", "tick"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value =
        serde_json::from_slice(&producer(&t.ns, &["schedule", "show", "tick", "--json"]).stdout)
            .unwrap();
    assert_eq!(shown["paused"], true, "{shown}");
    for s in &schedulers {
        sigterm(s.id());
    }
    for mut s in schedulers {
        let code = tokio::task::spawn_blocking(move || s.0.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(code.success(), "a scheduler's exit: {code:?}");
    }

    // One job a tick, none missed: the ticks' seconds are consecutive.
    let mut ticks: Vec<u64> = store
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(id, _)| id.strip_prefix("sched-tick-")?.parse().ok())
        .collect();
    ticks.sort_unstable();
    assert!(ticks.len() >= 62, "{ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "a tick missed or run twice: {ticks:?}"
        );
    }
    assert_eq!(
        shown["last_job"],
        format!(
            "sched-tick-{}",
            shown["last_tick_ms"].as_u64().unwrap() / 1000
        ),
        "{shown}"
    );
    // Each tick's job ran its 4 posts, but for a scheduler killed in the middle of one
    // (its job ends `interrupted`, like any producer killed mid-enqueue).
    let mut interrupted = 0;
    for tick in &ticks {
        let job = format!("sched-tick-{tick}");
        let s = t
            .wait_finished(&store, &job, Duration::from_secs(120))
            .await;
        match s.state() {
            taskmill_common::JobState::Completed => assert_eq!(s.records_done, 4, "{s:?}"),
            taskmill_common::JobState::Interrupted => {
                eprintln!("{job}: {s:?}");
                interrupted += 1;
            }
            other => panic!("{job}: {other:?} {s:?}"),
        }
    }
    assert!(interrupted <= kills, "{interrupted} interrupted");

    let out = producer(&t.ns, &["schedule", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "tick", "{list}");
    let out = producer(&t.ns, &["schedule", "remove", "tick"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = producer(&t.ns, &["schedule", "show", "tick"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// A schedule edited by hand in Redis (its spec not JSON, its next tick not a number): `list`
/// and `show` still read it and say so, a scheduler records the error and goes on with the
/// other schedules, `pause` and `remove` work, `resume` says why it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_edited_by_hand_is_shown_and_does_not_stop_the_others() {
    let t = TestNs::new();
    let store = t.store().await;
    let file = write_jsonl(sample::posts(2));
    let f = file.to_str().unwrap();
    for name in ["good", "broken"] {
        let out = producer(
            &t.ns,
            &[
                "schedule",
                "add",
                name,
                "--every",
                "1s",
                "--",
                "--file",
                f,
                "--no-check",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let mut con = taskmill_tests::redis_con().await;
    let _: () = redis::cmd("HSET")
        .arg(store.keys().schedule("broken"))
        .arg(&["spec", "{not json", "next_ms", "soon"])
        .query_async(&mut con)
        .await
        .unwrap();
    // A cron schedule in a time zone: its next tick at 03:00 there, whatever the offset.
    let out = producer(
        &t.ns,
        &[
            "schedule",
            "add",
            "paris",
            "--cron",
            "0 3 * * *",
            "--timezone",
            "Europe/Paris",
            "--",
            "--file",
            f,
            "--no-check",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("T03:00:00+0"), "{}", stderr(&out));
    let out = producer(&t.ns, &["schedule", "show", "paris", "--json"]);
    let paris: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(paris["timezone"], "Europe/Paris", "{paris}");
    assert_eq!(paris["period"], "cron 0 3 * * * (Europe/Paris)", "{paris}");
    let local = paris["next_local"].as_str().unwrap_or_default();
    assert!(
        local.contains("T03:00:00+01:00") || local.contains("T03:00:00+02:00"),
        "{paris}"
    );
    let utc = paris["next"].as_str().unwrap_or_default();
    assert!(
        utc.contains("T01:00:00Z") || utc.contains("T02:00:00Z"),
        "{paris}"
    );
    assert!(producer(&t.ns, &["schedule", "remove", "paris"])
        .status
        .success());

    let out = producer(&t.ns, &["schedule", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "broken", "{list}");
    assert_eq!(list[0]["period"], "unreadable", "{list}");
    let out = producer(&t.ns, &["schedule", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unreadable"));

    // The scheduler goes on with the good one and records why the broken one cannot run.
    let mut s = scheduler(&t.ns);
    until(
        "the good schedule's tick and the broken one's error",
        Duration::from_secs(30),
        || async {
            last_tick(&store, "good").await > 0
                && store
                    .schedule("broken")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|f| {
                        f.get("last_error")
                            .is_some_and(|e| e.contains("not readable"))
                    })
        },
    )
    .await;
    assert!(sigterm(s.id()));
    assert!(s.0.wait().unwrap().success());

    let out = producer(&t.ns, &["schedule", "resume", "broken"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not readable"), "{}", stderr(&out));
    for cmd in ["pause", "remove"] {
        let out = producer(&t.ns, &["schedule", cmd, "broken"]);
        assert!(out.status.success(), "{cmd}: {}", stderr(&out));
    }
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}

/// Through the Python client: a schedule added, listed, paused, resumed; refusals at once.
const PYTHON: &str = r#"
import json, os
from taskmill import Client
c = Client(namespace=os.environ["TASKMILL_NAMESPACE"])
c.add_schedule("py-every", ["--file", os.environ["RECORDS"], "--no-check"], every=1)
out = {"refused": []}
for kwargs in (dict(name="py-every", enqueue=["--file", "x"], every=1),
               dict(name="py:bad", enqueue=["--file", "x"], every=1),
               dict(name="py-tz", enqueue=["--file", "x"], every=1, timezone="UTC"),
               dict(name="py-job", enqueue=["--file", "x", "--job", "j"], every=1),
               dict(name="py-fast", enqueue=["--file", "x"], every=0.5)):
    try:
        c.add_schedule(**kwargs)
    except ValueError as e:
        out["refused"].append(str(e))
out["listed"] = [s["name"] for s in c.schedules()]
out["paused"] = c.pause_schedule("py-every") and c.schedule("py-every")["paused"]
out["resumed"] = c.resume_schedule("py-every") and not c.schedule("py-every")["paused"]
out["missing"] = c.pause_schedule("nope")
print(json.dumps(out))
"#;

/// Schedules added from the Rust and the Python client: stored without a first tick, checked
/// by the first scheduler that sees them (as `schedule add` checks), then run; one whose
/// enqueue options or time zone the scheduler refuses is paused saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_added_by_the_clients_are_checked_then_run_by_the_scheduler() {
    use taskmill_client::{Client, NewSchedule, Period};
    let t = TestNs::new();
    let venv = tokio::task::spawn_blocking(taskmill_tests::python_venv);
    let store = t.store().await;
    let client = Client::connect(t.conn().client_settings()).await.unwrap();
    let file = write_jsonl(sample::posts(2));
    let f = file.to_str().unwrap().to_string();
    let new = |name: &str, period: Period, enqueue: &[&str]| NewSchedule {
        name: name.into(),
        period,
        catch_up: None,
        enqueue: enqueue.iter().map(|s| s.to_string()).collect(),
    };
    let every = Period::Every(Duration::from_secs(1));
    client
        .add_schedule(&new(
            "rs-every",
            every.clone(),
            &["--file", &f, "--no-check"],
        ))
        .await
        .unwrap();
    client
        .add_schedule(&new(
            "rs-typo",
            every.clone(),
            &["--file", &f, "--prioritty", "3"],
        ))
        .await
        .unwrap();
    let mars = Period::Cron {
        expr: "0 3 * * *".into(),
        timezone: Some("Mars/Olympus".into()),
    };
    client
        .add_schedule(&new("rs-mars", mars, &["--file", &f]))
        .await
        .unwrap();
    for (bad, why) in [
        (new("rs-every", every.clone(), &["--file", &f]), "exists"),
        (new("rs:colon", every.clone(), &["--file", &f]), "schedule"),
        (
            new("rs-job", every.clone(), &["--file", &f, "--job", "j"]),
            "--job",
        ),
        (new("rs-stdin", every.clone(), &["--file", "-"]), "stdin"),
        (
            new(
                "rs-fast",
                Period::Every(Duration::from_millis(500)),
                &["--file", &f],
            ),
            "at least 1s",
        ),
    ] {
        let e = client.add_schedule(&bad).await.unwrap_err();
        assert_eq!(e.kind(), taskmill_client::ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains(why), "{}: {e}", bad.name);
    }
    let info = client.schedule("rs-every").await.unwrap().unwrap();
    assert_eq!(
        info.next_ms, None,
        "no first tick before a scheduler checked it"
    );

    let venv = venv.await.unwrap();
    let py = taskmill_tests::run_python(&venv, PYTHON, &t.ns, Some(&file));
    let _ = std::fs::remove_dir_all(&venv);
    let refused: Vec<&str> = py["refused"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(refused.len(), 5, "{py}");
    for (said, why) in refused.iter().zip([
        "exists",
        "A-Z",
        "timezone goes with cron",
        "--job",
        "at least 1 second",
    ]) {
        assert!(said.contains(why), "{said:?} does not say {why:?}");
    }
    assert_eq!(
        py["listed"],
        serde_json::json!(["py-every", "rs-every", "rs-mars", "rs-typo"]),
        "{py}"
    );
    assert_eq!(py["paused"], true, "{py}");
    assert_eq!(py["resumed"], true, "{py}");
    assert_eq!(py["missing"], false, "{py}");

    // A scheduler checks each, runs the good ones, pauses the others saying why.
    let mut s = scheduler(&t.ns);
    until(
        "the clients' schedules checked and run",
        Duration::from_secs(60),
        || async {
            let ran = |name: &'static str| {
                let client = &client;
                async move {
                    client
                        .schedule(name)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|i| i.last_job.is_some())
                }
            };
            let refused = |name: &'static str| {
                let client = &client;
                async move {
                    client
                        .schedule(name)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|i| i.paused && i.last_error.is_some())
                }
            };
            ran("rs-every").await
                && ran("py-every").await
                && refused("rs-typo").await
                && refused("rs-mars").await
        },
    )
    .await;
    assert!(sigterm(s.id()));
    assert!(s.0.wait().unwrap().success());
    let typo = client.schedule("rs-typo").await.unwrap().unwrap();
    let why = typo.last_error.unwrap_or_default();
    assert!(
        why.starts_with("refused by the scheduler") && why.contains("--prioritty"),
        "{why}"
    );
    let mars = client.schedule("rs-mars").await.unwrap().unwrap();
    assert!(
        mars.last_error
            .unwrap_or_default()
            .contains("not an IANA time zone"),
        "refused with the reason"
    );
    let every = client.schedule("rs-every").await.unwrap().unwrap();
    let job = every.last_job.unwrap();
    assert!(job.starts_with("sched-rs-every-"), "{job}");
    assert!(
        store.job_status(&job).await.unwrap().is_some(),
        "{job} enqueued"
    );
    assert!(client.pause_schedule("rs-every").await.unwrap());
    assert!(client.remove_schedule("rs-every").await.unwrap());
    assert!(!client.remove_schedule("rs-every").await.unwrap());
    assert!(client.schedule("rs-every").await.unwrap().is_none());
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
