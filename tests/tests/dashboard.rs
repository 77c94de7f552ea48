//! The dashboard: its JSON API over plain HTTP, and its page driven in a real headless
//! Chromium (`tests/dashboard/drive.mjs`, playwright-core on Debian's chromium) while two
//! worker processes run a job.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};
use taskmill_tests::{
    bin_path, catalog_ready, producer, sample, sigterm, until, write_jsonl, Dashboard, TestNs,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Worker processes killed when the test ends, however it ends.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn worker_process(ns: &str) -> Child {
    Command::new(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", ns)
        .env("TASKMILL_THREADS", "2")
        // Few batches in hand, so that a job's progress moves a few batches at a time and
        // both workers share it (the page checks that progress advances).
        .env("TASKMILL_PREFETCH", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn enqueue_cli(ns: &str, args: &[&str]) -> String {
    let out = producer(ns, &[&["enqueue"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Http {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Http {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}api{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_api_enqueues_reports_and_refuses_bad_requests() {
    let t = TestNs::new();
    let worker = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    catalog_ready(&store).await;
    let dash = Dashboard::start(&t.ns, &["--token", "s3cret"]);
    let http = |token: Option<&str>| Http {
        client: reqwest::Client::new(),
        base: dash.url.clone(),
        token: token.map(str::to_string),
    };
    let (api, anon, wrong) = (http(Some("s3cret")), http(None), http(Some("guess")));

    // The page itself needs no token (it holds no data); every API call does.
    let page = reqwest::get(&dash.url).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<script src=\"/app.js\">"));
    assert_eq!(anon.get("/jobs").await.0, 401);
    let (status, body) = wrong.get("/jobs").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("wrong token")));

    // Bad requests say what is wrong.
    let bad = [
        ("{not json", "the request body is not a job"),
        (r#"{"task": "post-stats"}"#, "records"),
        (
            r#"{"task": "post-stats", "records": [], "colour": 1}"#,
            "colour",
        ),
        (
            r#"{"task": "post-statz", "records": [{"title": "a", "body": "b"}]}"#,
            "unknown task",
        ),
        (
            r#"{"task": "text-stats", "params": {"top": "abc"}, "records": [{"body": "b"}]}"#,
            "is not a whole number",
        ),
        (
            r#"{"task": "post-stats", "records": []}"#,
            "nothing to enqueue",
        ),
    ];
    for (body, expect) in bad {
        let (status, got) = api.post("/jobs", body).await;
        assert_eq!(status, 400, "{body}: {got}");
        let error = got["error"].as_str().unwrap();
        assert!(error.contains(expect), "{body}: {error}");
    }
    assert_eq!(
        store.jobs().await.unwrap().len(),
        0,
        "a refused job was registered"
    );
    assert_eq!(api.get("/jobs?state=bogus").await.0, 400);
    assert_eq!(api.get("/nothing-here").await.0, 404);
    assert_eq!(api.post("/dead/replay", "{}").await.0, 400);

    // A job over HTTP: 201 once every batch is confirmed.
    let records: Vec<Value> = sample::posts(45).collect();
    let body =
        json!({"task": "text-stats", "params": {"top": 3}, "batch_size": 10, "records": records});
    let (status, created) = api.post("/jobs", &body.to_string()).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (created["batches"].as_u64(), created["records"].as_u64()),
        (Some(5), Some(45))
    );
    let job = created["job"].as_str().unwrap().to_string();
    let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
    assert_eq!(s.records_done, 45);
    let (status, got) = api.get(&format!("/jobs/{job}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["state"], "completed");
    assert_eq!(got["params"]["top"], "3");
    assert!(got["summary"]["records"].as_u64().is_some(), "{got}");
    let (_, page) = api
        .get(&format!("/jobs/{job}/results?offset=3&limit=10"))
        .await;
    let batches: Vec<u64> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["batch"].as_u64().unwrap())
        .collect();
    assert_eq!((page["total"].as_u64(), batches), (Some(5), vec![3, 4]));
    let (_, listed) = api
        .get(&format!(
            "/jobs?task=text-stats&state=completed&q={}",
            &job[..8]
        ))
        .await;
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["jobs"][0]["job"], job.as_str());

    // Unknown jobs are 404 everywhere.
    assert_eq!(api.get("/jobs/nope").await.0, 404);
    assert_eq!(api.get("/jobs/nope/results").await.0, 404);
    assert_eq!(api.post("/jobs/nope/cancel", "").await.0, 404);
    assert_eq!(
        api.send(reqwest::Method::DELETE, "/jobs/nope", None)
            .await
            .0,
        404
    );

    // The worker's heartbeat.
    let workers = || async { api.get("/workers").await.1["workers"].clone() };
    let w = workers().await;
    assert_eq!(w.as_array().unwrap().len(), 1);
    assert_eq!(w[0]["alive"], true);
    assert_eq!(w[0]["pid"], std::process::id());
    until(
        "the heartbeat counts the batches",
        Duration::from_secs(10),
        || async { workers().await[0]["batches_done"].as_u64() == Some(5) },
    )
    .await;
    // Its latency and the part of it spent in the worker (the Workers page shows both).
    let w = workers().await;
    let (whole_ms, here_us) = (
        w[0]["latency_ms"]["p99"].as_u64().unwrap(),
        w[0]["in_worker_us"]["p99"].as_u64().unwrap(),
    );
    assert!(
        here_us > 0 && here_us <= (whole_ms + 1) * 1000 + 1000,
        "{w}"
    );

    // Delete: gone afterwards.
    let (status, _) = api
        .send(reqwest::Method::DELETE, &format!("/jobs/{job}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(api.get(&format!("/jobs/{job}")).await.0, 404);

    // Schedules through the API: checked like `producer schedule add`, listed, paused,
    // resumed, removed.
    let f = write_jsonl(sample::posts(3));
    let path = f.to_str().unwrap();
    for (body, status, why) in [
        (
            r#"{"name": "s", "enqueue": []}"#.to_string(),
            400,
            "--every",
        ),
        (
            format!(
                r#"{{"name": "s", "every": "1s", "cron": "* * * * *", "enqueue": ["--file", "{path}"]}}"#
            ),
            400,
            "not both",
        ),
        (
            format!(r#"{{"name": "s", "every": "10ms", "enqueue": ["--file", "{path}"]}}"#),
            400,
            "at least 1s",
        ),
        (
            r#"{"name": "s", "every": "1m", "enqueue": ["--file", "-"]}"#.into(),
            400,
            "stdin",
        ),
        (
            format!(
                r#"{{"name": "s", "every": "1m", "enqueue": ["--file", "{path}", "--tsak", "x"]}}"#
            ),
            400,
            "--tsak",
        ),
        (
            r#"{"name": "s", "every": "1m", "colour": 1, "enqueue": []}"#.into(),
            400,
            "colour",
        ),
    ] {
        let (got, answer) = api.post("/schedules", &body).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(why),
            "{body}: {answer}"
        );
    }
    let good = format!(
        r#"{{"name": "every-minute", "every": "1m", "enqueue": ["--file", "{path}", "--batch-size", "3"]}}"#
    );
    let (got, answer) = api.post("/schedules", &good).await;
    assert_eq!(got, 201, "{answer}");
    assert_eq!(answer["schedule"]["period"], "every 1m", "{answer}");
    assert_eq!(api.post("/schedules", &good).await.0, 409);
    assert_eq!(anon.get("/schedules").await.0, 401);
    let (_, list) = api.get("/schedules").await;
    assert_eq!(list["schedules"][0]["name"], "every-minute", "{list}");
    let (got, answer) = api.post("/schedules/every-minute/pause", "{}").await;
    assert_eq!(
        (got, &answer["schedule"]["paused"]),
        (200, &json!(true)),
        "{answer}"
    );
    let (got, answer) = api.post("/schedules/every-minute/resume", "{}").await;
    assert_eq!(
        (got, &answer["schedule"]["paused"]),
        (200, &json!(false)),
        "{answer}"
    );
    assert_eq!(api.post("/schedules/nope/pause", "{}").await.0, 404);
    for status in [200, 404] {
        let (got, _) = api
            .send(reqwest::Method::DELETE, "/schedules/every-minute", None)
            .await;
        assert_eq!(got, status);
    }
    assert!(store.schedule_names().await.unwrap().is_empty());
    let _ = std::fs::remove_file(f);

    // No token on a non-loopback address: refused before listening.
    let out = producer(&t.ns, &["dashboard", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));

    dash.stop();
    worker.stop().await.unwrap();
    t.cleanup().await;
}

/// Chromium and playwright-core, set up by `deploy/scripts/browser.sh` (part of `make test`).
fn browser_ready() {
    let modules = root().join("tests/dashboard/node_modules/playwright-core");
    if !(Path::new("/usr/bin/chromium").exists() && modules.exists()) {
        let ok = Command::new("bash")
            .arg(root().join("deploy/scripts/browser.sh"))
            .status()
            .unwrap();
        assert!(ok.success(), "deploy/scripts/browser.sh failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_page_in_chromium_follows_jobs_dead_letters_and_workers() {
    browser_ready();
    let t = TestNs::new();
    let mut workers = Workers(vec![worker_process(&t.ns), worker_process(&t.ns)]);
    let store = t.store().await;
    catalog_ready(&store).await;
    let dash = Dashboard::start(&t.ns, &["--token", "letmein"]);

    // A chaos job whose batches all die, finished before the page opens.
    let few = write_jsonl(sample::posts(30));
    let dead_job = enqueue_cli(
        &t.ns,
        &[
            "--task",
            "chaos",
            "--param",
            "fail_rate=1",
            "--param",
            "fail=permanent",
            "--file",
            few.to_str().unwrap(),
        ],
    );
    let s = t
        .wait_finished(&store, &dead_job, Duration::from_secs(60))
        .await;
    assert_eq!(s.batches_dead, 3);
    // A slow job: 200 batches of 300 ms on two workers of two threads (about 15 s): still
    // running when the browser, started on a loaded machine, first reads its progress.
    let many = write_jsonl(sample::posts(2000));
    let job = enqueue_cli(
        &t.ns,
        &[
            "--task",
            "chaos",
            "--param",
            "sleep_ms=300",
            "--file",
            many.to_str().unwrap(),
            "--group",
            "demo",
            "--then",
            "chaos",
        ],
    );
    // Its group closed, with a chord follow-up that runs once the job has ended.
    let close = taskmill_tests::producer(&t.ns, &["group", "close", "demo", "--then", "chaos"]);
    assert!(close.status.success(), "{close:?}");
    // A job whose state was edited by hand into nonsense.
    let bad_job = "edited-by-hand";
    let mut con = taskmill_tests::redis_con().await;
    let key = store.keys().job(bad_job);
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&key)
        .arg(&["state", "weird", "task", "post-stats", "created_ms", "1"])
        .ignore()
        .cmd("EXPIRE")
        .arg(&key)
        .arg(600)
        .ignore()
        .cmd("ZADD")
        .arg(store.keys().jobs())
        .arg(taskmill_common::now_ms())
        .arg(bad_job)
        .ignore()
        .query_async(&mut con)
        .await
        .unwrap();
    // A schedule, and its first tick enqueued by a scheduler (stopped once it has).
    let add = taskmill_tests::producer(
        &t.ns,
        &[
            "schedule",
            "add",
            "hourly-few",
            "--every",
            "1s",
            "--",
            "--file",
            few.to_str().unwrap(),
        ],
    );
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let mut scheduler = taskmill_tests::KillOnDrop(
        Command::new(taskmill_tests::bin_path("producer"))
            .arg("scheduler")
            .env("TASKMILL_NAMESPACE", &t.ns)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    taskmill_tests::until(
        "the schedule's first tick",
        Duration::from_secs(30),
        || async {
            store
                .schedule("hourly-few")
                .await
                .ok()
                .flatten()
                .is_some_and(|f| f.get("last_job").is_some_and(|j| !j.is_empty()))
        },
    )
    .await;
    assert!(taskmill_tests::sigterm(scheduler.id()));
    let _ = scheduler.0.wait();
    let schedule_job = store.schedule("hourly-few").await.unwrap().unwrap()["last_job"].clone();
    let shots = std::env::var("DASHBOARD_SHOTS").unwrap_or_default();
    let out = Command::new("node")
        .arg(root().join("tests/dashboard/drive.mjs"))
        .env("URL", &dash.url)
        .env("TOKEN", "letmein")
        .env("JOB", &job)
        .env("DEAD_JOB", &dead_job)
        .env("BAD_JOB", bad_job)
        .env(
            "WORKER_PIDS",
            format!("{},{}", workers.0[0].id(), workers.0[1].id()),
        )
        .env("SCHEDULE", "hourly-few")
        .env("SCHEDULE_JOB", &schedule_job)
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(few);
    let _ = std::fs::remove_file(many);
    assert!(
        out.status.success(),
        "drive.mjs: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["schedule_last_job"], schedule_job.as_str(), "{seen}");
    assert!(
        seen["schedule_row"]
            .as_str()
            .unwrap()
            .contains("hourly-few every 1s"),
        "{seen}"
    );
    assert_eq!(
        seen["schedule_job_opened"],
        format!("#/jobs/{schedule_job}"),
        "{seen}"
    );
    let progress = seen["progress"].as_array().unwrap();
    assert!(progress[1].as_u64() > progress[0].as_u64(), "{seen}");
    assert_eq!(seen["summary"]["batches"], 200);
    let chain = seen["chain"].as_str().unwrap_or_default();
    assert!(
        chain.contains("group demo") && chain.contains(&format!("then chaos: {job}.then1")),
        "{seen}"
    );
    assert_eq!(seen["follow_up"], format!("follows {job}"), "{seen}");
    assert!(
        seen["group_counts"]
            .as_str()
            .unwrap_or_default()
            .starts_with("1 job, finished"),
        "{seen}"
    );
    // "published chaos over 1 job", or "(found registered already)" when the worker stopped
    // during the page's run published it and another settled it.
    assert!(
        seen["group_chord"]
            .as_str()
            .unwrap_or_default()
            .starts_with("closed · then chaos: demo.chord (published chaos"),
        "{seen}"
    );
    assert_eq!(seen["chord_follows"], "follows group demo", "{seen}");
    assert_eq!(seen["summary"]["records"], 2000);
    assert_eq!(
        seen["unreadable_row"], "state: holds \"weird\", not a job state",
        "{seen}"
    );
    let page = seen["unreadable_page"].as_str().unwrap_or_default();
    assert!(
        page.contains("job edited-by-hand is unreadable: state"),
        "{seen}"
    );
    assert_eq!(seen["unreadable_listed_after"], false, "{seen}");
    assert!(store.job_status(bad_job).await.unwrap().is_none());
    assert_eq!(seen["dead_count"], 3);
    assert_eq!(seen["dead_records"], 10);
    assert_eq!(seen["replay_message"], "Replayed 3 dead letters.");
    assert_eq!(seen["queue_consumers"], 2);
    assert_eq!(seen["gone"], "gone (stopped)");
    let latency = seen["latency"].as_str().unwrap_or_default();
    assert!(
        latency.contains(" ms / ") && latency.ends_with(" ms"),
        "{seen}"
    );
    assert_eq!(seen["still_alive"], true);
    // The stopped worker exited cleanly; the replayed letters died again (permanent).
    assert_eq!(workers.0[0].wait().unwrap().code(), Some(0));
    let s = store.job_status(&dead_job).await.unwrap().unwrap();
    assert_eq!(s.batches_dead, 3);
    assert!(sigterm(workers.0[1].id()));
    assert_eq!(workers.0[1].wait().unwrap().code(), Some(0));
    dash.stop();
    t.cleanup().await;
}
