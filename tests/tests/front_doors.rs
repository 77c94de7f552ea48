//! The four front doors take the same enqueue options: the command line, the HTTP API, the
//! Rust client and the Python client enqueue the same job, each with every option, and each
//! job records the same options and each of its batches carries them.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, process::Command, time::Duration};

use lapin::options::BasicGetOptions;
use serde_json::{json, Value};
use taskmill_client::{Client, JobSpec};
use taskmill_tests::{
    catalog_ready, producer_within, python_venv, raw_channel, sample, write_jsonl, Dashboard,
    TestNs,
};

/// The doors, each enqueueing job `fd-{door}` with unique key `uk-{door}` and rate key
/// `rk-{door}`; the other options are the same for all.
const DOORS: [&str; 4] = ["cli", "api", "rust", "python"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_front_door_takes_every_enqueue_option() {
    let venv = tokio::task::spawn_blocking(python_venv);
    let t = TestNs::new();
    // A worker of another queue, for the catalog check; nobody consumes queue `fd`.
    let worker = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    catalog_ready(&store).await;
    let records: Vec<Value> = sample::posts(20).collect();
    let file = write_jsonl(records.clone());

    // The command line.
    let out = producer_within(
        &t.ns,
        &[
            "enqueue",
            "--file",
            file.to_str().unwrap(),
            "--task",
            "text-stats",
            "--param",
            "top=3",
            "--batch-size",
            "10",
            "--queue",
            "fd",
            "--job",
            "fd-cli",
            "--priority",
            "7",
            "--unique-key",
            "uk-cli",
            "--countdown",
            "1h",
            "--expires",
            "2h",
            "--time-limit",
            "5s",
            "--rate-limit",
            "50/s",
            "--rate-key",
            "rk-cli",
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The HTTP API.
    let dash = Dashboard::start(&t.ns, &[]);
    let resp = reqwest::Client::new()
        .post(format!("{}api/jobs", dash.url))
        .json(&json!({
            "task": "text-stats", "params": {"top": 3}, "batch_size": 10, "records": records,
            "queue": "fd", "job": "fd-api", "priority": 7, "unique_key": "uk-api",
            "countdown": "1h", "expires": "2h", "time_limit": "5s", "rate_limit": "50/s",
            "rate_key": "rk-api",
        }))
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    assert_eq!(code, 201, "{}", resp.text().await.unwrap());

    // The Rust client.
    let client = Client::connect(t.conn().client_settings()).await.unwrap();
    let spec = JobSpec::new("text-stats")
        .param("top", 3)
        .batch_size(10)
        .queue("fd")
        .id("fd-rust")
        .priority(7)
        .unique_key("uk-rust")
        .countdown(Duration::from_secs(3600))
        .expires(Duration::from_secs(7200))
        .time_limit(Duration::from_secs(5))
        .rate_limit("50/s".parse().unwrap())
        .rate_key("rk-rust");
    client.enqueue(&spec, records.clone()).await.unwrap();

    // The Python client, from a fresh virtualenv.
    let venv = venv.await.unwrap();
    let script = r#"
import json, os, sys
from taskmill import Client
records = [json.loads(line) for line in open(sys.argv[1])]
Client(namespace=os.environ["TASKMILL_NAMESPACE"]).enqueue(
    "text-stats", records, params={"top": 3}, batch_size=10, queue="fd", job_id="fd-python",
    priority=7, unique_key="uk-python", countdown=3600, expires=7200, time_limit=5,
    rate_limit="50/s", rate_key="rk-python")
"#;
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .arg(&file)
        .env("TASKMILL_NAMESPACE", &t.ns)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each job recorded the same options.
    let mut con = taskmill_tests::redis_con().await;
    for door in DOORS {
        let s = store
            .job_status(&format!("fd-{door}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.queue, "fd", "{door}");
        assert_eq!(s.priority, 7, "{door}");
        assert_eq!(s.params.get("top").map(String::as_str), Some("3"), "{door}");
        assert_eq!(s.batches_total, Some(2), "{door}");
        assert_eq!(s.time_limit_ms, Some(5000), "{door}");
        assert_eq!(s.rate_interval_ms, Some(20), "{door}");
        assert_eq!(s.rate_key.as_deref(), Some(format!("rk-{door}").as_str()));
        let eta = s.eta_ms.unwrap() - s.created_ms;
        let expires = s.expires_ms.unwrap() - s.created_ms;
        assert!((3_540_000..=3_660_000).contains(&eta), "{door}: eta {eta}");
        assert!(
            (7_140_000..=7_260_000).contains(&expires),
            "{door}: expires {expires}"
        );
        let holder: Option<String> = redis::cmd("GET")
            .arg(format!("{}:unique:uk-{door}", t.ns))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(
            holder,
            Some(store.keys().job(&format!("fd-{door}"))),
            "{door}"
        );
    }

    // Each batch carries them, in the priority band of queue fd.
    let (conn, ch) = raw_channel().await;
    let band = format!("{}.fd.p5", t.ns);
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    while let Some(m) = ch
        .basic_get(band.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        let p = &m.delivery.properties;
        let id = p.message_id().as_ref().unwrap().to_string();
        let door = id
            .split(':')
            .next()
            .unwrap()
            .strip_prefix("fd-")
            .unwrap()
            .to_string();
        let h = p.headers().clone().unwrap_or_default();
        let h = h.inner();
        let int = |k: &str| match h.get(k) {
            Some(lapin::types::AMQPValue::LongLongInt(n)) => Some(*n),
            Some(lapin::types::AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            Some(lapin::types::AMQPValue::LongUInt(n)) => Some(i64::from(*n)),
            _ => None,
        };
        assert_eq!(int("x-taskmill-time-limit-ms"), Some(5000), "{id}: {h:?}");
        assert_eq!(int("x-taskmill-rate-interval-ms"), Some(20), "{id}: {h:?}");
        assert!(int("x-taskmill-eta-ms").is_some() && int("x-taskmill-expires-ms").is_some());
        let key = taskmill_common::amqp::header_str(p, "x-taskmill-rate-key");
        assert_eq!(key, Some(format!("rk-{door}")), "{id}");
        *seen.entry(door).or_default() += 1;
    }
    assert_eq!(
        seen,
        DOORS
            .iter()
            .map(|d| (d.to_string(), 2))
            .collect::<BTreeMap<_, _>>()
    );
    taskmill_tests::nack_all(&ch).await;
    let _ = conn.close(200, "done".into()).await;

    dash.stop();
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_dir_all(venv);
    t.cleanup().await;
}
