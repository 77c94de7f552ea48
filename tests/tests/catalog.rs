//! The task catalog: live workers record their tasks; enqueue checks tasks and parameters
//! against it; workers check parameters too.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use taskmill_common::{
    amqp::{batch_properties, header_str},
    envelope::{encode, Envelope, FORMAT_VERSION, HEADER_ERROR_KIND},
    topology::Names,
};
use taskmill_tests::{
    bin_path, drain_queue, producer, publish_raw, raw_channel, sample, sigterm, until, write_jsonl,
    TestNs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_lists_live_tasks_and_enqueue_checks_against_it() {
    let t = TestNs::new();
    let mut worker = Command::new(bin_path("custom-worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ns = t.ns.clone();
    let listed = move || {
        let out = producer(&ns, &["tasks", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    until(
        "the custom worker in the catalog",
        Duration::from_secs(60),
        || {
            let listed = listed.clone();
            async move { listed().iter().any(|e| e["name"] == "word-count") }
        },
    )
    .await;
    let entries = listed();
    let wc = entries.iter().find(|e| e["name"] == "word-count").unwrap();
    assert_eq!(wc["params"][0]["name"], "field");
    assert_eq!(wc["params"][0]["kind"], "str");
    assert_eq!(wc["params"][0]["default"], "body");
    assert!(entries.iter().any(|e| e["name"] == "similarity"));
    let text = String::from_utf8_lossy(&producer(&t.ns, &["tasks"]).stdout).into_owned();
    assert!(
        text.contains("word-count") && text.contains("--param field="),
        "{text}"
    );

    // Refused before anything is registered: unknown task, unknown parameter, bad value.
    let file = write_jsonl(sample::posts(20));
    let f = file.to_str().unwrap();
    for (args, needle) in [
        (vec!["--task", "nope"], "unknown task \"nope\""),
        (
            vec!["--task", "similarity", "--param", "treshold=0.1"],
            "no parameter \"treshold\"",
        ),
        (
            vec!["--task", "text-stats", "--param", "top=abc"],
            "not a whole number",
        ),
        // Declared ranges and choices, refused at enqueue (they used to pass and then
        // dead-letter every batch, or run in an undefined mode).
        (
            vec!["--task", "similarity", "--param", "hashes=99999"],
            "parameter hashes=\"99999\" of task similarity is out of range: 1 to 4096",
        ),
        (
            vec!["--task", "text-stats", "--param", "top=-1"],
            "out of range: at least 0",
        ),
        (
            vec!["--task", "chaos", "--param", "fail=sometimes"],
            "is not one of: transient, permanent, panic, abort",
        ),
    ] {
        let mut all = vec!["enqueue", "--file", f];
        all.extend(args.iter());
        let out = producer(&t.ns, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
    let err = String::from_utf8_lossy(
        &producer(&t.ns, &["enqueue", "--file", f, "--task", "nope"]).stderr,
    )
    .into_owned();
    assert!(
        err.contains("word-count") && err.contains("post-stats"),
        "lists what is valid: {err}"
    );
    // The client's words are no front door's: no command-line flag in them (the HTTP API and
    // Python say the same sentence).
    assert!(!err.contains("--"), "{err}");
    let store = t.store().await;
    assert!(store.jobs().await.unwrap().is_empty());
    // The set of task names expires with its entries (it never did).
    let mut con = taskmill_tests::redis_con().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}:tasks", t.ns))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "{ttl}");

    // A declared parameter goes through.
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            f,
            "--task",
            "word-count",
            "--param",
            "field=title",
            "--wait",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = stdout.lines().next().unwrap_or_default().to_string();
    let s = store.job_status(&first).await.unwrap().unwrap();
    assert_eq!(
        (s.state(), s.task()),
        (taskmill_common::JobState::Completed, "word-count")
    );
    assert_eq!(s.params.get("field").map(String::as_str), Some("title"));
    assert!(s.summary.is_some(), "{s:?}");

    // --no-check: enqueued anyway, and dead-lettered by the worker.
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            f,
            "--task",
            "nope",
            "--no-check",
            "--wait",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let unchecked = stdout.lines().next().unwrap_or_default().to_string();
    let s = store.job_status(&unchecked).await.unwrap().unwrap();
    let total = s.batches_total.unwrap();
    assert_eq!((s.batches_done, s.batches_dead), (0, total), "{s:?}");
    let dead = store.dead_batches(&unchecked).await.unwrap();
    assert!(
        dead.iter().all(|(_, r)| r["kind"] == "unknown_task"),
        "{dead:?}"
    );

    // Workers check parameters too: a forged batch with a bad one is dead-lettered.
    let names = Names::new(&t.ns);
    let (_c, ch) = raw_channel().await;
    let env = Envelope {
        v: FORMAT_VERSION,
        job: "forged".into(),
        batch: 0,
        task: "similarity".into(),
        params: [("treshold".to_string(), "0.1".to_string())].into(),
        records: vec![],
        created_ms: 1,
    };
    // (The unchecked job's letters, taken out of the way.)
    let before = drain_queue(&ch, &names.dead_queue()).await.len() as u64;
    assert_eq!(before, total);
    publish_raw(
        &ch,
        &names.work_exchange(),
        "tasks",
        &encode(&env),
        batch_properties(&env, 1),
    )
    .await;
    let kinds = std::sync::Mutex::new(Vec::new());
    until("the forged batch dead", Duration::from_secs(60), || async {
        let got = drain_queue(&ch, &names.dead_queue()).await;
        let mut k = kinds.lock().unwrap();
        k.extend(
            got.iter()
                .filter_map(|m| header_str(&m.delivery.properties, HEADER_ERROR_KIND)),
        );
        !k.is_empty()
    })
    .await;
    assert_eq!(*kinds.lock().unwrap(), ["bad_params"]);
    assert!(sigterm(worker.id()));
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
