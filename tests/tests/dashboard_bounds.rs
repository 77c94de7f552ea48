//! The dashboard under hostile clients: held half-open connections, declared huge bodies,
//! paths and methods nobody routed, tokens nobody can type.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use taskmill_tests::{producer_within, Dashboard, TestNs};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// `host:port` of a dashboard URL.
fn addr(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Reads one raw answer of a request sent by hand (the server closes after it, or it is
/// read until its head and a little of its body arrived).
async fn raw(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if text.contains("\r\n\r\n") && text.contains('}') {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_are_closed_and_others_still_served() {
    let t = TestNs::new();
    let d = Dashboard::start(&t.ns, &["--header-timeout", "2"]);
    let addr = addr(&d.url);
    // 500 clients that stop half-way through their headers.
    let mut held = Vec::new();
    for _ in 0..500 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /api/jobs HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    // A normal client is still served.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = http.get(format!("{}api/jobs", d.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Every held one is closed by the server (EOF or a reset), after the header timeout.
    let closes = held.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(closes))
        .await
        .expect("the dashboard closed every half-open connection");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_paths_methods_and_tokens_get_precise_json_answers() {
    let t = TestNs::new();
    let d = Dashboard::start(&t.ns, &["--token", "s3cret", "--body-timeout", "2"]);
    let addr = addr(&d.url);
    let auth = "Authorization: Bearer s3cret\r\n";
    // A declared body over the limit: 413 at once, nothing read.
    let a = raw(
        &addr,
        &format!("POST /api/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 413"), "{a}");
    assert!(a.contains("--max-body-bytes"), "{a}");
    // A body that never comes: 408 after the body timeout.
    let a = raw(
        &addr,
        &format!("POST /api/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"task\""),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 408"), "{a}");
    // An unknown API path without the token: 401 first, JSON.
    let http = reqwest::Client::new();
    let r = http.get(format!("{}api/nope", d.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].is_string());
    // A method nobody routed, and a body that is not JSON: JSON errors too.
    let r = http
        .put(format!("{}api/jobs", d.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("not allowed"),
        "{body}"
    );
    let r = http
        .post(format!("{}api/jobs", d.url))
        .bearer_auth("s3cret")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    d.stop();
    // A token nobody can send in a header is refused at start.
    let out = producer_within(
        &t.ns,
        &[
            "dashboard",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "pässwörd",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("printable ASCII"));
}

/// Four 64 MiB enqueues at once: three of tiny records for a task no worker has (refused
/// after the first pass, no record parsed), one of ~1 KB records that is enqueued. The
/// dashboard's peak memory stays bounded: bodies are held one at a time a turn
/// (`--max-enqueues`), and records stream from the body into batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_64_mib_enqueues_keep_the_dashboard_small() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let store = t.store().await;
    taskmill_tests::catalog_ready(&store).await;
    let d = Dashboard::start(&t.ns, &["--max-body-bytes", "70000000"]);
    const MIB64: usize = 64 * 1024 * 1024;
    let tiny = {
        let mut b = String::with_capacity(MIB64 + 64);
        b.push_str(r#"{"task": "post-statz", "records": [1"#);
        while b.len() < MIB64 {
            b.push_str(",1");
        }
        b.push_str("]}");
        b
    };
    let (big, big_records) = {
        let rec = format!(r#"{{"title": "t", "body": "{}"}}"#, "y".repeat(1000));
        let mut b = String::with_capacity(MIB64 + 2048);
        b.push_str(r#"{"task": "post-stats", "batch_size": 1000, "records": ["#);
        let mut n = 0u64;
        while b.len() < MIB64 {
            if n > 0 {
                b.push(',');
            }
            b.push_str(&rec);
            n += 1;
        }
        b.push_str("]}");
        (b, n)
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let post = |body: String| {
        let http = http.clone();
        let url = format!("{}api/jobs", d.url);
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let answers = futures::future::join_all([
        post(tiny.clone()),
        post(big),
        post(tiny.clone()),
        post(tiny),
    ])
    .await;
    // VmHWM: the dashboard's peak resident memory so far (it is still running).
    let peak_mb = taskmill_tests::peak_rss_kib(d.child.id()) / 1024;
    eprintln!("dashboard peak RSS: {peak_mb} MB");
    for (i, (status, body)) in answers.iter().enumerate() {
        if i == 1 {
            assert_eq!(*status, 201, "{body}");
            assert_eq!(body["records"], big_records, "{body}");
        } else {
            assert_eq!(*status, 400, "{body}");
            assert!(
                body["error"].as_str().unwrap().contains("unknown task"),
                "{body}"
            );
        }
    }
    assert!(peak_mb < 300, "the dashboard peaked at {peak_mb} MB");
    d.stop();
    w.stop().await.unwrap();
    t.cleanup().await;
}
