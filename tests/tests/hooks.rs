//! Completion webhooks (`enqueue --on-complete URL`): the job's final status POSTed when it
//! ends, signed with the workers' secret, retried with backoff while the receiver fails, with
//! the same idempotency key each time; a cancelled job reports too; an unreachable receiver's
//! errors show in `status`; a URL that is not http(s) is refused at the enqueue.

#![allow(clippy::unwrap_used)]

use std::{process::Stdio, time::Duration};

use hmac::{Hmac, Mac};
use serde_json::Value;
use taskmill_tests::{
    catalog_ready, enqueue_file, post_job, producer, python_venv, sample, until, write_jsonl,
    Dashboard, Logged, TestNs,
};
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, ResponseTemplate,
};

fn status(ns: &str, job: &str) -> Value {
    let out = producer(ns, &["status", job, "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn status_text(ns: &str, job: &str) -> String {
    String::from_utf8_lossy(&producer(ns, &["status", job]).stdout).into_owned()
}

/// Through the Python client: `on_complete=`; a URL that is not http(s) refused.
const PYTHON: &str = r#"
import json, os, sys
from taskmill import Client
c = Client(namespace=os.environ["TASKMILL_NAMESPACE"])
records = [{"title": "a", "body": "b"}] * 5
job = c.enqueue("post-stats", records, job_id="py-hooked", on_complete=sys.argv[1])
out = {"job": job}
try:
    c.enqueue("post-stats", records, job_id="py-bad", on_complete="ftp://x")
except ValueError as e:
    out["bad"] = str(e)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_webhook_is_signed_retried_and_delivered() {
    let venv = tokio::task::spawn_blocking(python_venv);
    let server = MockServer::start().await;
    // Two failures, then the receiver takes it.
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let t = TestNs::new();
    let mut args = t.worker_args();
    args.webhook_secret = Some("s3cret".into());
    let worker = t.spawn_worker(args);
    catalog_ready(&t.store().await).await;
    let file = write_jsonl(sample::posts(30));
    let url = format!("{}/hook", server.uri());
    let out = enqueue_file(
        &t.ns,
        &file,
        &["--job", "hooked", "--on-complete", &url, "--wait"],
    );
    assert!(out.status.success(), "{out:?}");
    until("the webhook delivered", Duration::from_secs(60), || async {
        status(&t.ns, "hooked").get("hook_delivered_ms").is_some()
    })
    .await;
    let s = status(&t.ns, "hooked");
    assert_eq!(s["hook_attempts"], 3, "{s}");
    assert!(s.get("hook_error").is_none(), "{s}");
    let text = status_text(&t.ns, "hooked");
    assert!(
        text.contains(&format!("webhook: {url} (delivered (3 attempt(s)))")),
        "{text}"
    );
    let got = server.received_requests().await.unwrap();
    assert_eq!(got.len(), 3);
    for (i, r) in got.iter().enumerate() {
        let h = |k: &str| r.headers.get(k).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(h("idempotency-key").as_deref(), Some("hooked"));
        assert_eq!(h("x-taskmill-attempt"), Some((i + 1).to_string()));
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(&r.body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(h("x-taskmill-signature"), Some(format!("sha256={want}")));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["job"], "hooked", "{body}");
        assert_eq!(body["state"], "completed", "{body}");
        assert_eq!(body["records_done"], 30, "{body}");
        assert!(body["summary"]["processed_count"].is_number(), "{body}");
    }

    // A cancelled job reports too; an unreachable receiver's errors are kept and retried.
    let out = enqueue_file(
        &t.ns,
        &file,
        &[
            "--queue",
            "nobody",
            "--no-check",
            "--job",
            "stopped",
            "--on-complete",
            "http://127.0.0.1:9/nothing-listens",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(status_text(&t.ns, "stopped").contains("(when the job ends)"));
    assert!(producer(&t.ns, &["cancel", "stopped"]).status.success());
    until("two failed attempts", Duration::from_secs(60), || async {
        status(&t.ns, "stopped")["hook_attempts"].as_u64() >= Some(2)
    })
    .await;
    let s = status(&t.ns, "stopped");
    assert!(
        s["hook_error"].as_str().unwrap().contains("127.0.0.1:9"),
        "{s}"
    );
    assert!(
        status_text(&t.ns, "stopped").contains("attempt(s) failed, retrying"),
        "{}",
        status_text(&t.ns, "stopped")
    );

    // Through the HTTP API: delivered the same way (a 2xx at the first attempt now).
    let dash = Dashboard::start(&t.ns, &[]);
    let records: Vec<Value> = sample::posts(5).collect();
    let body = serde_json::json!({"task": "post-stats", "records": records, "job": "api-hooked", "on_complete": url});
    assert_eq!(post_job(&dash.url, &body).await, 201);
    dash.stop();
    until(
        "the API's job's webhook delivered",
        Duration::from_secs(60),
        || async {
            status(&t.ns, "api-hooked")
                .get("hook_delivered_ms")
                .is_some()
        },
    )
    .await;
    assert_eq!(status(&t.ns, "api-hooked")["hook_attempts"], 1);
    let venv = venv.await.unwrap();
    let out = std::process::Command::new(venv.join("bin/python"))
        .args(["-c", PYTHON, &url])
        .env("TASKMILL_NAMESPACE", &t.ns)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        said["bad"].as_str().unwrap().contains("on_complete"),
        "{said}"
    );
    until(
        "the Python client's job's webhook delivered",
        Duration::from_secs(60),
        || async {
            status(&t.ns, "py-hooked")
                .get("hook_delivered_ms")
                .is_some()
        },
    )
    .await;
    assert_eq!(
        producer(&t.ns, &["status", "py-bad"]).status.code(),
        Some(4)
    );
    let _ = std::fs::remove_dir_all(&venv);

    // Not http(s): refused before anything is registered.
    let out = enqueue_file(
        &t.ns,
        &file,
        &["--job", "badurl", "--on-complete", "ftp://example.com/x"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--on-complete"));
    assert_eq!(
        producer(&t.ns, &["status", "badurl"]).status.code(),
        Some(4)
    );
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}

/// A worker killed while its POST waits for the receiver never records the attempt; another
/// worker takes the webhook once the claim lapses and delivers it (at least once: the receiver
/// saw two requests with the same idempotency key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_whose_worker_dies_mid_delivery_is_delivered_by_another() {
    let server = MockServer::start().await;
    // The first request hangs (the worker is killed meanwhile); the next is taken.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let t = TestNs::new();
    let mut doomed = Logged::spawn(&t.ns, "worker", &["--threads", "1"], &[], Stdio::null());
    catalog_ready(&t.store().await).await;
    let file = write_jsonl(sample::posts(10));
    let url = format!("{}/hook", server.uri());
    let out = enqueue_file(
        &t.ns,
        &file,
        &["--job", "orphan", "--on-complete", &url, "--wait"],
    );
    assert!(out.status.success(), "{out:?}");
    until("the first POST sent", Duration::from_secs(30), || async {
        server.received_requests().await.unwrap_or_default().len() == 1
    })
    .await;
    doomed.process.kill().unwrap();
    let _ = doomed.process.wait();
    let other = Logged::spawn(&t.ns, "worker", &["--threads", "1"], &[], Stdio::null());
    until(
        "delivered by the other worker",
        Duration::from_secs(60),
        || async { status(&t.ns, "orphan").get("hook_delivered_ms").is_some() },
    )
    .await;
    let s = status(&t.ns, "orphan");
    assert_eq!(
        s["hook_attempts"], 1,
        "the killed worker recorded nothing: {s}"
    );
    let got = server.received_requests().await.unwrap();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(
            r.headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap()),
            Some("orphan")
        );
    }
    drop(other);
    let _ = std::fs::remove_file(&file);
    t.cleanup().await;
}
