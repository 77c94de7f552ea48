//! The Python client (`clients/python`), installed with pip into a fresh virtualenv, enqueues
//! jobs that the Rust workers process; every number is checked against the task run here.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use taskmill_common::store::Store;
use taskmill_common::task::TaskContext;
use taskmill_tests::{
    catalog_ready, producer, proxy::Proxy, python_venv, sample, write_jsonl, TestNs,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the task computes for these records, batch by batch, here in the test.
fn expected(
    task: &str,
    params: &BTreeMap<String, String>,
    records: &[Value],
    size: usize,
) -> Vec<Value> {
    let registry = taskmill_common::tasks::builtin();
    let task = registry.get(task).unwrap();
    records
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let ctx = TaskContext {
                params,
                job: "local",
                batch: i as u64,
                attempt: 1,
                deadline: None,
            };
            task.run(&ctx, chunk).unwrap().result
        })
        .collect()
}

/// Equal JSON, floats to within a few ulps (serde_json's default float parser may be one
/// ulp off Python's shortest representation).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_enqueues_jobs_the_rust_workers_run() {
    let t = TestNs::new();
    let venv = tokio::task::spawn_blocking(python_venv);
    let worker = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    catalog_ready(&store).await;
    let records: Vec<Value> = sample::posts(95).collect();
    let file = write_jsonl(records.clone());
    let venv = venv.await.unwrap();
    let out = Command::new(venv.join("bin/python"))
        .arg(root().join("clients/python/tests/test_client.py"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("RECORDS", &file)
        .output()
        .unwrap();
    let quickstart = Command::new(venv.join("bin/python"))
        .arg(root().join("clients/python/examples/quickstart.py"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .output()
        .unwrap();
    let cut = cut_connection_half_way(&t, &venv).await;
    let _ = std::fs::remove_dir_all(&venv);
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The README's example: 100 records in 10 batches of 10.
    assert!(
        quickstart.status.success(),
        "{}",
        String::from_utf8_lossy(&quickstart.stderr)
    );
    let text = String::from_utf8(quickstart.stdout).unwrap();
    let mut lines = text.lines();
    let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
    assert_eq!(first[1..], ["completed", "100", "100"]);
    let batches: Vec<String> = lines.map(str::to_string).collect();
    let want: Vec<String> = (0..10).map(|b| format!("{b} 10")).collect();
    assert_eq!(batches, want);

    // The catalog refused three jobs, saying what is valid, and registered none of them.
    let refused = &got["refused"];
    assert!(refused["unknown_task"]
        .as_str()
        .unwrap()
        .contains("unknown task 'post-statz'"));
    assert!(refused["unknown_param"]
        .as_str()
        .unwrap()
        .contains("no parameter 'treshold'"));
    assert!(refused["unknown_param"]
        .as_str()
        .unwrap()
        .contains("top (int"));
    assert!(refused["bad_value"]
        .as_str()
        .unwrap()
        .contains("is not a whole number"));
    assert_eq!(
        refused["out_of_range"],
        "parameter hashes='99999' of task similarity is out of range: 1 to 4096"
    );
    assert_eq!(
        refused["not_a_choice"],
        "parameter fail='sometimes' of task chaos is not one of: transient, permanent, panic, abort"
    );
    // A wrong password or an unreachable service: the client's own exception, the password
    // never shown, and no job registered (the count below would be one more per ghost).
    let broker = &got["broker"];
    assert_eq!(broker["wrong_password"][0], "Refused", "{broker}");
    let said = broker["wrong_password"][1].as_str().unwrap();
    assert!(
        said.contains("refused the credentials") && !said.contains("wrong-pw"),
        "{said}"
    );
    assert_eq!(broker["unreachable"][0], "Unavailable", "{broker}");
    assert_eq!(broker["redis_unreachable"][0], "Unavailable", "{broker}");
    // (The jobs: post-stats, text-stats, the unroutable one, the quickstart's and the cut
    // connection's.)
    assert_eq!(store.jobs().await.unwrap().len(), 5);

    // post-stats: 95 records and 2 that are not JSON, in batches of 10.
    let job = got["job"].as_str().unwrap();
    let status = &got["status"];
    assert_eq!(status["state"], "completed");
    assert_eq!(status["batches_total"], 10);
    assert_eq!(status["records_total"], 95);
    assert_eq!(status["records_done"], 95);
    assert_eq!(status["records_invalid"], 2);
    let problems = status["problems"].as_array().unwrap();
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .starts_with("record 96: not JSON"),
        "{problems:?}"
    );
    assert!(
        problems[1]
            .as_str()
            .unwrap()
            .starts_with("record 97: not JSON"),
        "{problems:?}"
    );
    let want = expected("post-stats", &BTreeMap::new(), &records, 10);
    let results = got["results"].as_array().unwrap();
    assert_eq!(results.len(), want.len());
    for (i, (pair, want)) in results.iter().zip(&want).enumerate() {
        assert_eq!(pair[0], i);
        assert!(same(&pair[1], want), "batch {i}: {} vs {want}", pair[1]);
    }
    // Its status is the one `producer status --json` prints, summary included.
    let cli = producer(&t.ns, &["status", "--json", job]);
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert!(same(&cli, status), "{cli} vs {status}");
    assert_eq!(status["summary"]["processed_count"], 95);

    // text-stats with typed parameters, sent as text.
    let params: BTreeMap<String, String> =
        [("top".into(), "3".into()), ("field".into(), "title".into())].into();
    let top = &got["top_status"];
    assert_eq!(top["state"], "completed");
    assert_eq!(top["params"], serde_json::to_value(&params).unwrap());
    assert_eq!(top["records_done"], 95);
    let stored: Vec<Value> = Store::results(&store, got["top"].as_str().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let want = expected("text-stats", &params, &records, 25);
    assert!(same(&Value::from(stored), &Value::from(want)));

    assert!(got["unknown"].as_str().unwrap().contains("no-such-job"));
    assert_eq!(got["unchecked_warned"], true);
    // Unroutable batches: published again, and the fifth refusal ends the enqueue.
    let unroutable = got["unroutable"].as_str().unwrap_or_default();
    assert!(
        unroutable.contains("5 times (nacked or unroutable)"),
        "{unroutable:?}"
    );

    // The connection cut half-way through an enqueue: the client reconnected and published
    // again what was unconfirmed; every batch is done exactly once.
    let job = cut.expect("the enqueue through a cut connection finished");
    let s = t
        .wait_finished(&store, &job, Duration::from_secs(180))
        .await;
    assert_eq!(s.state(), "completed", "{s:?}");
    assert_eq!(s.batches_total, Some(10_000));
    assert_eq!(s.batches_done, 10_000);
    assert_eq!(s.batches_dead, 0);
    assert_eq!(s.records_done, 40_000);
    assert_eq!(store.results(&job).await.unwrap().len(), 10_000);
    worker.stop().await.unwrap();
    t.cleanup().await;
}

/// Enqueues 40,000 posts in batches of 4 through a proxy that is cut once 2 MB went through
/// (a part of the batches published, confirms in flight) and restored once the client tries
/// to reconnect; the job's id, or what the client printed when it failed.
async fn cut_connection_half_way(t: &TestNs, venv: &Path) -> Result<String, String> {
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let file = write_jsonl(sample::posts(40_000));
    let script = "import json, os, taskmill\n\
        c = taskmill.Client(amqp_url=os.environ['AMQP_URL'], namespace=os.environ['TASKMILL_NAMESPACE'])\n\
        records = [json.loads(line) for line in open(os.environ['RECORDS'])]\n\
        print(c.enqueue('post-stats', records, batch_size=4))\n";
    let child = Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("AMQP_URL", proxy.amqp_url())
        .env("RECORDS", &file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    proxy.outage_after(2_000_000).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(said);
    }
    assert!(proxy.accepted() >= 2, "the client reconnected: {said}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn the_python_client_and_the_page_use_the_store_s_scripts_and_states() {
    for f in [
        "prelude",
        "register",
        "finish_publishing",
        "raise",
        "check_lease",
        "cancel",
        "delete",
        "close_group",
        "shards",
    ] {
        let ours =
            std::fs::read_to_string(root().join(format!("common/store/src/lua/{f}.lua"))).unwrap();
        let theirs =
            std::fs::read_to_string(root().join(format!("clients/python/taskmill/lua/{f}.lua")))
                .unwrap();
        assert_eq!(
            ours, theirs,
            "clients/python/taskmill/lua/{f}.lua differs from the store's"
        );
    }
    let py = std::fs::read_to_string(root().join("clients/python/taskmill/client.py")).unwrap();
    // pika is used through its public API only: no private attribute of a connection or
    // channel (they change between pika releases without notice).
    for module in ["client.py", "_amqp.py", "exceptions.py", "__init__.py"] {
        let text =
            std::fs::read_to_string(root().join("clients/python/taskmill").join(module)).unwrap();
        for private in ["._impl", "._flush_output", "._process_data_events"] {
            assert!(
                !text.contains(private),
                "clients/python/taskmill/{module} uses pika's private {private}"
            );
        }
    }
    let states: Vec<String> = taskmill_common::JobState::ALL
        .iter()
        .map(|s| format!("\"{}\"", s.as_str()))
        .collect();
    assert!(
        py.contains(&format!("STATES = ({})", states.join(", "))),
        "the Python client's STATES differ from JobState::ALL"
    );
    let finished: Vec<String> = taskmill_common::JobState::ALL
        .iter()
        .filter(|s| s.is_finished())
        .map(|s| format!("\"{}\"", s.as_str()))
        .collect();
    assert!(
        py.contains(&format!("FINISHED = ({})", finished.join(", "))),
        "the Python client's FINISHED differs from JobState::is_finished"
    );
    // The dashboard's page spells them too.
    let js = std::fs::read_to_string(root().join("producer/src/web/assets/app.js")).unwrap();
    assert!(
        js.contains(&format!("const STATES = [{}];", states.join(", "))),
        "the dashboard's STATES (app.js) differ from JobState::ALL"
    );
}
