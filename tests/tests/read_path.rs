//! The read path never crashes, loops or hangs: every job state × {lease live, lapsed, none} ×
//! {batches_total set, unset}, a job deleted behind its index entry, and hashes edited by hand,
//! walked through `status`, `wait`, `results`, `jobs`, `cancel`, `delete`, the HTTP API and the
//! Python client; and the issue's own reproduction (a killed stdin enqueue, cancelled, whose
//! lease then lapses).
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, process::Command, time::Duration};

use serde_json::{json, Value};
use taskmill_common::{now_ms, store::Store};
use taskmill_tests::{
    catalog_ready, producer_within, python_venv, sample, until, workspace_root, Dashboard, TestNs,
};

/// A command that has not ended by then hangs (it is killed and the test fails).
const HANG: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Lease {
    Live,
    Lapsed,
    None,
}

/// What a case is.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// A job as taskmill writes it: state `state` before it is read.
    Job {
        state: &'static str,
        lease: Lease,
        total: bool,
    },
    /// In the index, its hash gone.
    Deleted,
    /// A hash edited by hand: `field` is what the reader names.
    Unreadable { field: &'static str },
    /// A readable job whose results key is not a hash.
    ResultsWrongType,
}

struct Case {
    id: String,
    kind: Kind,
}

/// Counters a state's job has: (state stored, fields).
fn state_fields(name: &str, now: u64) -> (&'static str, Vec<(&'static str, String)>) {
    let n = |v: u64| v.to_string();
    let summary = json!({"processed_count": 20}).to_string();
    match name {
        "pending_countdown" => (
            "pending",
            vec![("batches_published", n(5)), ("eta_ms", n(now + 3_600_000))],
        ),
        "running" => (
            "running",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(2)),
                ("started_ms", n(now - 1000)),
            ],
        ),
        "completed" => (
            "completed",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(5)),
                ("finished_ms", n(now - 10)),
                ("summary", summary),
            ],
        ),
        "completed_with_errors" => (
            "completed_with_errors",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(3)),
                ("batches_dead", n(2)),
                ("finished_ms", n(now - 10)),
                ("summary", summary),
            ],
        ),
        "cancelled_while_running" => (
            "cancelled",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(2)),
                ("cancelled_ms", n(now - 10)),
                ("finished_ms", n(now - 10)),
            ],
        ),
        "cancelled_while_pending" => (
            "cancelled",
            vec![
                ("batches_published", n(5)),
                ("cancelled_ms", n(now - 10)),
                ("finished_ms", n(now - 10)),
            ],
        ),
        "interrupted_unsettled" => (
            "interrupted",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(2)),
                ("interrupted_ms", n(now - 10)),
            ],
        ),
        "interrupted_settled" => (
            "interrupted",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(5)),
                ("interrupted_ms", n(now - 10)),
                ("finished_ms", n(now - 10)),
            ],
        ),
        "interrupted_then_cancelled" => (
            "cancelled",
            vec![
                ("batches_published", n(5)),
                ("batches_done", n(2)),
                ("interrupted_ms", n(now - 20)),
                ("cancelled_ms", n(now - 10)),
                ("finished_ms", n(now - 10)),
            ],
        ),
        "expired" => (
            "completed_with_errors",
            vec![
                ("batches_published", n(5)),
                ("batches_expired", n(5)),
                ("expires_ms", n(now - 100)),
                ("finished_ms", n(now - 10)),
            ],
        ),
        other => panic!("no state {other}"),
    }
}

const STATES: [&str; 10] = [
    "pending_countdown",
    "running",
    "completed",
    "completed_with_errors",
    "cancelled_while_running",
    "cancelled_while_pending",
    "interrupted_unsettled",
    "interrupted_settled",
    "interrupted_then_cancelled",
    "expired",
];

async fn cmd(con: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    let _: redis::Value = c.query_async(con).await.unwrap();
}

/// Writes every case into the namespace, as the scripts would have left it (or as a hand
/// edit did), each in the jobs index.
async fn forge(store: &Store) -> Vec<Case> {
    let mut con = taskmill_tests::redis_con().await;
    let keys = store.keys().clone();
    let now = now_ms();
    let created = now - 3_600_000;
    let mut cases = Vec::new();
    for name in STATES {
        for lease in [Lease::Live, Lease::Lapsed, Lease::None] {
            for total in [true, false] {
                let id = format!("{name}-{lease:?}-{}", if total { "total" } else { "open" })
                    .to_lowercase();
                let (state, mut fields) = state_fields(name, now);
                let published: u64 = fields
                    .iter()
                    .find(|(k, _)| *k == "batches_published")
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                if total {
                    fields.push(("batches_total", published.to_string()));
                }
                match lease {
                    Lease::Live => fields.push(("lease_until_ms", (now + 3_600_000).to_string())),
                    Lease::Lapsed => fields.push(("lease_until_ms", "1".into())),
                    Lease::None => {}
                }
                write_job(&mut con, &keys, &id, state, &fields, created).await;
                cases.push(Case {
                    id,
                    kind: Kind::Job {
                        state: name,
                        lease,
                        total,
                    },
                });
            }
        }
    }
    // Deleted behind the index's back.
    cmd(
        &mut con,
        &["ZADD", &keys.jobs(), &created.to_string(), "deleted"],
    )
    .await;
    cases.push(Case {
        id: "deleted".into(),
        kind: Kind::Deleted,
    });
    // Hand edits.
    let (_, done) = state_fields("running", now);
    write_job(
        &mut con,
        &keys,
        "garbage-counter",
        "running",
        &done,
        created,
    )
    .await;
    cmd(
        &mut con,
        &["HSET", &keys.job("garbage-counter"), "batches_done", "abc"],
    )
    .await;
    cases.push(Case {
        id: "garbage-counter".into(),
        kind: Kind::Unreadable {
            field: "batches_done",
        },
    });
    write_job(&mut con, &keys, "unknown-state", "weird", &done, created).await;
    cases.push(Case {
        id: "unknown-state".into(),
        kind: Kind::Unreadable { field: "state" },
    });
    write_job(&mut con, &keys, "missing-state", "running", &done, created).await;
    cmd(&mut con, &["HDEL", &keys.job("missing-state"), "state"]).await;
    cases.push(Case {
        id: "missing-state".into(),
        kind: Kind::Unreadable { field: "state" },
    });
    cmd(&mut con, &["SET", &keys.job("string-key"), "not a hash"]).await;
    cmd(
        &mut con,
        &["ZADD", &keys.jobs(), &created.to_string(), "string-key"],
    )
    .await;
    cases.push(Case {
        id: "string-key".into(),
        kind: Kind::Unreadable { field: "key" },
    });
    let (_, completed) = state_fields("completed", now);
    let mut completed = completed;
    completed.push(("batches_total", "5".into()));
    write_job(
        &mut con,
        &keys,
        "results-string",
        "completed",
        &completed,
        created,
    )
    .await;
    cmd(&mut con, &["DEL", &keys.results("results-string")]).await;
    cmd(&mut con, &["SET", &keys.results("results-string"), "x"]).await;
    cases.push(Case {
        id: "results-string".into(),
        kind: Kind::ResultsWrongType,
    });
    cases
}

/// One job hash with `batches_done` results and `batches_dead` dead reasons, indexed.
async fn write_job(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &taskmill_common::store::Keys,
    id: &str,
    state: &str,
    fields: &[(&str, String)],
    created: u64,
) {
    let mut all: BTreeMap<&str, String> = [
        ("state", state.to_string()),
        ("task", "post-stats".into()),
        ("queue", "tasks".into()),
        ("params", "{}".into()),
        ("created_ms", created.to_string()),
        ("ttl", "3600".into()),
        ("batches_published", "0".into()),
        ("batches_done", "0".into()),
        ("batches_dead", "0".into()),
        ("records_total", "50".into()),
        ("records_done", "0".into()),
        ("records_invalid", "0".into()),
        ("retries", "0".into()),
        ("sources_failed", "0".into()),
    ]
    .into_iter()
    .collect();
    for (k, v) in fields {
        all.insert(k, v.clone());
    }
    let mut hset = redis::cmd("HSET");
    hset.arg(keys.job(id));
    for (k, v) in &all {
        hset.arg(*k).arg(v);
    }
    let _: i64 = hset.query_async(con).await.unwrap();
    let count = |f: &str| all.get(f).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    for b in 0..count("batches_done") {
        let r = json!({"processed_count": 10, "max_body_length": 3}).to_string();
        cmd(con, &["HSET", &keys.results(id), &b.to_string(), &r]).await;
    }
    for b in 0..count("batches_dead") {
        let batch = (count("batches_done") + b).to_string();
        let why = json!({"kind": "permanent", "error": "forged"}).to_string();
        cmd(con, &["HSET", &keys.dead(id), &batch, &why]).await;
    }
    for k in [keys.job(id), keys.results(id), keys.dead(id)] {
        let _: i64 = redis::cmd("EXPIRE")
            .arg(k)
            .arg(3600)
            .query_async(con)
            .await
            .unwrap();
    }
    cmd(con, &["ZADD", &keys.jobs(), &created.to_string(), id]).await;
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs the producer and checks it ended by itself with one of `codes` (never a crash: a
/// panic is 101, a stack overflow a signal).
fn run(ns: &str, args: &[&str], codes: &[i32]) -> std::process::Output {
    let out = producer_within(ns, args, HANG);
    assert!(
        out.status.code().is_some_and(|c| codes.contains(&c)),
        "producer {args:?}: {:?} (wanted one of {codes:?})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn json_line(out: &std::process::Output) -> Value {
    let s = text(&out.stdout);
    serde_json::from_str(s.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

/// Finished by the CLI's rule, from `status --json`.
fn finished(s: &Value) -> bool {
    matches!(
        s["state"].as_str(),
        Some("completed" | "completed_with_errors" | "cancelled")
    ) || (s["state"] == "interrupted" && s.get("finished_ms").is_some())
}

/// What a job's state must read as once read: a lapsed (or never written) lease with no total
/// settles publishing, once.
fn settled_state(state: &str, lease: Lease, total: bool) -> &'static str {
    let stored = state_fields(state, now_ms()).0;
    if !total && lease != Lease::Live && matches!(stored, "pending" | "running") {
        "interrupted"
    } else {
        stored
    }
}

/// Reads every case through the CLI; returns each readable job's status JSON.
fn walk_cli(ns: &str, cases: &[Case]) -> BTreeMap<String, Value> {
    let mut statuses = BTreeMap::new();
    for case in cases {
        let id = case.id.as_str();
        match &case.kind {
            Kind::Job {
                state,
                lease,
                total,
            } => {
                let s = json_line(&run(ns, &["status", id, "--json"], &[0]));
                let want = settled_state(state, *lease, *total);
                assert_eq!(s["state"], want, "{id}: {s}");
                if !total && *lease != Lease::Live {
                    assert!(s.get("batches_total").is_some(), "{id}: not settled: {s}");
                    assert!(s.get("lease_until_ms").is_none(), "{id}: {s}");
                }
                // Reading again changes nothing (settled once).
                let again = json_line(&run(ns, &["status", id, "--json"], &[0]));
                assert_eq!(again, s, "{id}: a second read differs");
                let out = run(ns, &["status", id], &[0]);
                assert!(
                    text(&out.stdout).starts_with(&format!("job {id}: {want}")),
                    "{}",
                    text(&out.stdout)
                );
                let code = if s["state"] == "completed" {
                    0
                } else if finished(&s) {
                    1
                } else {
                    3
                };
                run(ns, &["wait", id, "--timeout", "0.3"], &[code]);
                run(ns, &["wait", id, "--timeout", "0.3", "--json"], &[code]);
                let results = run(ns, &["results", id, "--json"], &[0]);
                assert_eq!(
                    text(&results.stdout).lines().count() as u64,
                    s["batches_done"].as_u64().unwrap(),
                    "{id}"
                );
                run(ns, &["results", id], &[0]);
                statuses.insert(case.id.clone(), s);
            }
            Kind::Deleted => {
                for args in [
                    vec!["status", id],
                    vec!["status", id, "--json"],
                    vec!["wait", id, "--timeout", "0.3"],
                    vec!["results", id],
                ] {
                    let out = run(ns, &args, &[4]);
                    assert!(
                        text(&out.stderr).contains("no job"),
                        "{}",
                        text(&out.stderr)
                    );
                }
            }
            Kind::Unreadable { field } => {
                let out = run(ns, &["status", id], &[6]);
                let said = format!("job {id} is unreadable: {field}: ");
                assert!(text(&out.stderr).contains(&said), "{}", text(&out.stderr));
                assert!(
                    text(&out.stdout).contains("unreadable"),
                    "{}",
                    text(&out.stdout)
                );
                let j = json_line(&run(ns, &["status", id, "--json"], &[6]));
                assert_eq!(j["job"], id);
                assert!(
                    j["unreadable"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{field}: ")),
                    "{j}"
                );
                for args in [vec!["wait", id, "--timeout", "0.3"], vec!["results", id]] {
                    let out = run(ns, &args, &[6]);
                    assert!(text(&out.stderr).contains(&said), "{}", text(&out.stderr));
                }
            }
            Kind::ResultsWrongType => {
                let s = json_line(&run(ns, &["status", id, "--json"], &[0]));
                assert_eq!(s["state"], "completed");
                let out = run(ns, &["results", id], &[6]);
                assert!(
                    text(&out.stderr).contains(&format!("job {id} is unreadable: results: ")),
                    "{}",
                    text(&out.stderr)
                );
            }
        }
    }
    statuses
}

/// `jobs` lists every job once (the deleted one left out), unreadable ones as such.
fn check_listing(ns: &str, cases: &[Case]) {
    let out = run(ns, &["jobs", "--json", "--limit", "0"], &[0]);
    let listed: BTreeMap<String, Value> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["job"].as_str().unwrap().to_string(), v)
        })
        .collect();
    for case in cases {
        let got = listed.get(&case.id);
        match &case.kind {
            Kind::Deleted => assert!(got.is_none(), "{}", case.id),
            Kind::Unreadable { field } => {
                let v = got.unwrap_or_else(|| panic!("{} not listed", case.id));
                assert!(v["unreadable"].as_str().unwrap().starts_with(field), "{v}");
            }
            _ => assert!(got.is_some_and(|v| v["state"].is_string()), "{}", case.id),
        }
    }
    assert_eq!(listed.len(), cases.len() - 1);
    let out = run(ns, &["jobs", "--limit", "0"], &[0]);
    let table = text(&out.stdout);
    assert_eq!(table.lines().count(), cases.len(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("unknown-state "))
        .unwrap();
    assert!(
        row.contains("unreadable") && row.contains("state: holds \"weird\""),
        "{row}"
    );
    // Filters see readable jobs only, newest first, and --limit holds.
    let out = run(ns, &["jobs", "--json", "--state", "cancelled"], &[0]);
    assert!(text(&out.stdout)
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).unwrap()["state"] == "cancelled"));
    let out = run(ns, &["jobs", "--json", "--limit", "3"], &[0]);
    assert_eq!(text(&out.stdout).lines().count(), 3);
    run(ns, &["jobs", "--state", "done"], &[2]);
}

/// Every read route of the API answers each case, and the process lives on.
async fn walk_api(dash: &mut Dashboard, cases: &[Case], cli: &BTreeMap<String, Value>) {
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{}api{path}", dash.url);
        async move {
            let r = http.get(url).send().await.unwrap();
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (code, listed) = get("/jobs?limit=500".into()).await;
    assert_eq!(code, 200, "{listed}");
    assert_eq!(listed["total"], cases.len() - 1, "{listed}");
    let unreadable = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j.get("unreadable").is_some())
        .count();
    let want = cases
        .iter()
        .filter(|c| matches!(c.kind, Kind::Unreadable { .. }))
        .count();
    assert_eq!(unreadable, want, "{listed}");
    for case in cases {
        let id = &case.id;
        let (code, job) = get(format!("/jobs/{id}")).await;
        let (rcode, results) = get(format!("/jobs/{id}/results")).await;
        match &case.kind {
            Kind::Job { .. } => {
                assert_eq!(code, 200, "{id}: {job}");
                assert_eq!(job["state"], cli[id]["state"], "{id}");
                assert_eq!(job["batches_total"], cli[id]["batches_total"], "{id}");
                assert_eq!(rcode, 200, "{id}: {results}");
                assert_eq!(
                    results["results"].as_array().unwrap().len() as u64,
                    cli[id]["batches_done"].as_u64().unwrap(),
                    "{id}"
                );
            }
            Kind::Deleted => assert_eq!((code, rcode), (404, 404), "{job}"),
            Kind::Unreadable { field } => {
                assert_eq!((code, rcode), (500, 500), "{id}: {job}");
                let e = job["error"].as_str().unwrap();
                assert!(e.contains(&format!("is unreadable: {field}: ")), "{e}");
            }
            Kind::ResultsWrongType => {
                assert_eq!((code, rcode), (200, 500), "{id}: {results}");
            }
        }
    }
    assert!(
        dash.child.try_wait().unwrap().is_none(),
        "the dashboard died"
    );
}

/// Cancel, then delete, every case through the CLI: each ends with its documented code, and
/// the job reads consistently after each step.
fn steer_cli(ns: &str, cases: &[Case], cli: &BTreeMap<String, Value>) {
    for case in cases {
        let id = case.id.as_str();
        match &case.kind {
            Kind::Job { .. } | Kind::ResultsWrongType => {
                let before = cli
                    .get(id)
                    .cloned()
                    .unwrap_or(json!({"state": "completed"}));
                let out = run(ns, &["cancel", id], &[0]);
                let s = json_line(&run(ns, &["status", id, "--json"], &[0]));
                if finished(&before) {
                    assert!(text(&out.stderr).contains("already finished"), "{id}");
                    assert_eq!(s["state"], before["state"], "{id}");
                } else {
                    assert!(text(&out.stderr).contains("cancelled job"), "{id}");
                    assert_eq!(s["state"], "cancelled", "{id}");
                }
                run(ns, &["wait", id, "--timeout", "0.3"], &[0, 1]);
                run(ns, &["delete", id, "--yes"], &[0]);
            }
            Kind::Deleted => {
                run(ns, &["cancel", id], &[4]);
                run(ns, &["delete", id, "--yes"], &[4]);
            }
            Kind::Unreadable { field } => {
                // A state it cannot read is left as it is: cancel says so (6).
                let code = if *field == "batches_done" { 0 } else { 6 };
                run(ns, &["cancel", id], &[code]);
                run(ns, &["status", id], &[6]);
                let out = run(ns, &["delete", id, "--yes"], &[0]);
                assert!(
                    text(&out.stderr).contains("deleted job"),
                    "{}",
                    text(&out.stderr)
                );
            }
        }
        run(ns, &["status", id], &[4]);
    }
    run(ns, &["jobs"], &[0]);
}

/// The same through the API: cancel, then delete; the process lives on.
async fn steer_api(dash: &mut Dashboard, cases: &[Case]) {
    let http = reqwest::Client::new();
    for case in cases {
        let url = format!("{}api/jobs/{}", dash.url, case.id);
        let cancel = http.post(format!("{url}/cancel")).send().await.unwrap();
        let code = cancel.status().as_u16();
        let body: Value = cancel.json().await.unwrap_or(Value::Null);
        let want: &[u16] = match &case.kind {
            Kind::Deleted => &[404],
            Kind::Unreadable { field } if *field != "batches_done" => &[500],
            _ => &[200],
        };
        assert!(want.contains(&code), "{}: cancel {code} {body}", case.id);
        let del = http.delete(&url).send().await.unwrap();
        let code = del.status().as_u16();
        let want = if case.kind == Kind::Deleted { 404 } else { 200 };
        assert_eq!(code, want, "{}: delete", case.id);
        let gone = http.get(&url).send().await.unwrap().status().as_u16();
        assert_eq!(gone, 404, "{}", case.id);
    }
    assert!(
        dash.child.try_wait().unwrap().is_none(),
        "the dashboard died"
    );
}

/// The Python client reads each case like the CLI: same state, its own exceptions, and no
/// summary polling on jobs that never get one.
fn walk_python(ns: &str, venv: &std::path::Path, cases: &[Case], cli: &BTreeMap<String, Value>) {
    let out = Command::new(venv.join("bin/python"))
        .arg(workspace_root().join("clients/python/tests/read_path.py"))
        .args(cases.iter().map(|c| c.id.as_str()))
        .env("TASKMILL_NAMESPACE", ns)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: BTreeMap<String, Value> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["job"].as_str().unwrap().to_string(), v)
        })
        .collect();
    for case in cases {
        let v = &got[&case.id];
        match &case.kind {
            Kind::Job { .. } => {
                let s = &v["status"]["ok"];
                let c = &cli[&case.id];
                for k in ["state", "batches_total", "batches_done", "batches_expired"] {
                    assert_eq!(s[k], c[k], "{}: {k}: {v}", case.id);
                }
                if finished(c) {
                    assert_eq!(v["wait"]["ok"], c["state"], "{v}");
                    if !matches!(
                        c["state"].as_str(),
                        Some("completed" | "completed_with_errors")
                    ) {
                        assert_eq!(v["wait_reads"], 1, "{}: polled for a summary: {v}", case.id);
                    }
                } else {
                    assert_eq!(v["wait"]["error"], "Timeout", "{v}");
                }
                assert_eq!(v["results"]["ok"], c["batches_done"], "{v}");
                assert_eq!(v["cancel"]["ok"]["cancelled"], !finished(c), "{v}");
                assert_eq!(v["delete"]["ok"], Value::Null, "{v}");
                assert_eq!(v["after"]["error"], "NoSuchJob", "{v}");
            }
            Kind::Deleted => {
                for k in ["status", "wait", "cancel", "delete"] {
                    assert_eq!(v[k]["error"], "NoSuchJob", "{k}: {v}");
                }
            }
            Kind::Unreadable { field } => {
                for k in ["status", "wait", "results"] {
                    assert_eq!(v[k]["error"], "UnreadableJob", "{k}: {v}");
                    let m = v[k]["message"].as_str().unwrap();
                    assert!(m.contains(&format!("unreadable: {field}: ")), "{m}");
                }
                // A state it cannot read is left as it is; deleting removes it all the same.
                if *field == "batches_done" {
                    assert_eq!(v["cancel"]["ok"]["cancelled"], true, "{v}");
                } else {
                    assert_eq!(v["cancel"]["error"], "UnreadableJob", "{v}");
                }
                assert_eq!(v["delete"]["ok"], Value::Null, "{v}");
                assert_eq!(v["after"]["error"], "NoSuchJob", "{v}");
            }
            Kind::ResultsWrongType => {
                assert_eq!(v["status"]["ok"]["state"], "completed", "{v}");
                assert_eq!(v["results"]["error"], "UnreadableJob", "{v}");
                assert_eq!(v["cancel"]["ok"]["cancelled"], false, "{v}");
                assert_eq!(v["after"]["error"], "NoSuchJob", "{v}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_state_reads_through_every_front_door() {
    let venv = tokio::task::spawn_blocking(python_venv);
    // a: the CLI and the API read, then the CLI steers; b: the API steers; c: the Python
    // client reads (before anything else settled its jobs).
    let (a, b, c) = (TestNs::new(), TestNs::new(), TestNs::new());
    let cases = forge(&a.store().await).await;
    forge(&b.store().await).await;
    forge(&c.store().await).await;
    let mut dash_a = Dashboard::start(&a.ns, &[]);
    let mut dash_b = Dashboard::start(&b.ns, &[]);

    let ns = a.ns.clone();
    let (cases, cli) = tokio::task::spawn_blocking(move || {
        let cli = walk_cli(&ns, &cases);
        check_listing(&ns, &cases);
        (cases, cli)
    })
    .await
    .unwrap();
    walk_api(&mut dash_a, &cases, &cli).await;
    let venv = venv.await.unwrap();
    walk_python(&c.ns, &venv, &cases, &cli);

    steer_api(&mut dash_b, &cases).await;
    let ns = a.ns.clone();
    tokio::task::spawn_blocking(move || steer_cli(&ns, &cases, &cli))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(venv);
    dash_a.stop();
    dash_b.stop();
    for t in [a, b, c] {
        t.cleanup().await;
    }
}

/// The reproduction: a stdin enqueue killed half-way, its job cancelled, then its
/// lease lapses. Every command reads it; it stays cancelled, with the total it published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_whose_producer_died_reads_everywhere() {
    use std::io::Write;
    let t = TestNs::new();
    let worker = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    catalog_ready(&store).await;
    let mut child = Command::new(taskmill_tests::bin_path("producer"))
        .args([
            "enqueue",
            "--file",
            "-",
            "--task",
            "post-stats",
            "--batch-size",
            "1",
            "--lease-seconds",
            "1",
        ])
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for p in sample::posts(200) {
        writeln!(stdin, "{p}").unwrap();
    }
    stdin.flush().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let job = line.trim().to_string();
    // Some batches were published and run; the producer is still reading stdin.
    taskmill_tests::wait_batches_done(&store, &job, 20).await;
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let ns = t.ns.clone();
    let j = job.clone();
    tokio::task::spawn_blocking(move || run(&ns, &["cancel", &j], &[0]))
        .await
        .unwrap();
    // The lease (1 s) lapses: nobody renews it.
    let key = store.keys().job(&job);
    let mut con = taskmill_tests::redis_con().await;
    until("the lease to lapse", Duration::from_secs(30), || {
        let mut con = con.clone();
        let key = key.clone();
        async move {
            let until: Option<u64> = redis::cmd("HGET")
                .arg(&key)
                .arg("lease_until_ms")
                .query_async(&mut con)
                .await
                .unwrap();
            until.is_some_and(|u| u < now_ms())
        }
    })
    .await;
    let mut dash = Dashboard::start(&t.ns, &[]);
    let ns = t.ns.clone();
    let j = job.clone();
    let s = tokio::task::spawn_blocking(move || {
        let s = json_line(&run(&ns, &["status", &j, "--json"], &[0]));
        run(&ns, &["jobs"], &[0]);
        run(&ns, &["wait", &j, "--timeout", "5"], &[1]);
        run(&ns, &["results", &j], &[0]);
        run(&ns, &["cancel", &j], &[0]);
        s
    })
    .await
    .unwrap();
    assert_eq!(s["state"], "cancelled", "{s}");
    let total = s["batches_total"].as_u64().unwrap();
    assert!(total >= 20, "{s}");
    assert!(s["batches_done"].as_u64().unwrap() <= total, "{s}");
    let http = reqwest::Client::new();
    let url = format!("{}api/jobs/{job}", dash.url);
    for path in ["", "/results"] {
        let code = http
            .get(format!("{url}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(code.as_u16(), 200, "GET {path}");
    }
    assert_eq!(
        http.delete(&url).send().await.unwrap().status().as_u16(),
        200
    );
    assert!(
        dash.child.try_wait().unwrap().is_none(),
        "the dashboard died"
    );
    let _: () = redis::cmd("PING").query_async(&mut con).await.unwrap();
    dash.stop();
    worker.stop().await.unwrap();
    t.cleanup().await;
}
