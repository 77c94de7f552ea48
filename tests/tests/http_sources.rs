//! HTTP sources against local servers: the sample server and wiremock for failures.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{sample, TestNs};
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, ResponseTemplate,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_template_fetches_every_post() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let addr = sample::spawn(500).await.unwrap();
    let mut args = EnqueueArgs::new("post-stats");
    args.url_template = Some(format!("http://{addr}/posts/{{id}}"));
    args.ids = Some("1-500".into());
    args.concurrency = 8;
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    assert_eq!(report.records, 500);
    assert_eq!(report.batches, 50);
    assert_eq!(report.problems.sources_failed, 0);
    let store = t.store().await;
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.state(), "completed");
    assert_eq!(status.records_done, 500);
    w.stop().await.unwrap();
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_urls_are_retried_then_reported() {
    let t = TestNs::new();
    let w = t.spawn_worker(t.worker_args());
    let server = MockServer::start().await;
    // Always 500: tried 1 + 2 retries = 3 times, then reported.
    Mock::given(method("GET"))
        .and(path("/broken"))
        .respond_with(ResponseTemplate::new(500))
        .expect(3)
        .mount(&server)
        .await;
    // 429 once, then a good answer: the retry gets it.
    Mock::given(method("GET"))
        .and(path("/busy"))
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/busy"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"title": "t", "body": "b"})))
        .expect(1)
        .mount(&server)
        .await;
    // 404 is not retried.
    Mock::given(method("GET"))
        .and(path("/missing"))
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(&server)
        .await;
    // Not JSON: one invalid record, not retried.
    Mock::given(method("GET"))
        .and(path("/html"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>"))
        .expect(1)
        .mount(&server)
        .await;
    // An array answer gives many records.
    Mock::given(method("GET"))
        .and(path("/many"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([
            {"title": "a", "body": "1"}, {"title": "b", "body": "22"}, {"title": "c", "body": "333"}
        ])))
        .expect(1)
        .mount(&server)
        .await;
    // A port where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/x", closed.local_addr().unwrap());
    drop(closed);

    let mut args = EnqueueArgs::new("post-stats");
    args.urls = ["/broken", "/busy", "/missing", "/html", "/many"]
        .iter()
        .map(|p| format!("{}{p}", server.uri()))
        .chain([closed_url.clone()])
        .collect();
    args.http_retries = 2;
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.problems.sources_failed, 3, "{:?}", report.problems);
    assert_eq!(report.problems.records_invalid, 1);
    let all = report.problems.samples.join("\n");
    assert!(all.contains("/broken: HTTP 500"), "{all}");
    assert!(all.contains("gave up after 3 attempts"), "{all}");
    assert!(all.contains("/missing: HTTP 404"), "{all}");
    assert!(all.contains("/html: response is not JSON"), "{all}");
    assert!(all.contains(&closed_url), "{all}");

    let store = t.store().await;
    let status = t
        .wait_finished(&store, &report.job, Duration::from_secs(60))
        .await;
    assert_eq!(status.state(), "completed");
    assert_eq!(status.records_done, 4);
    assert_eq!(status.sources_failed, 3);
    assert_eq!(status.records_invalid, 1);
    server.verify().await;
    w.stop().await.unwrap();
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_readable_registers_no_job_and_is_an_error() {
    let t = TestNs::new();
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let mut args = EnqueueArgs::new("post-stats");
    args.urls = vec![format!("{}/nope", server.uri())];
    args.job = Some("never-registered".into());
    let mut registered = false;
    let err = enqueue(&t.conn(), &args, |_| registered = true)
        .await
        .unwrap_err();
    assert!(!registered);
    let text = format!("{err:#}");
    assert!(text.contains("nothing to enqueue"), "{text}");
    assert!(text.contains("HTTP 404"), "{text}");
    assert_eq!(taskmill_producer::error::exit_code(&err), 2);
    // No job was registered: nothing reports a finished job that never ran.
    let store = t.store().await;
    assert!(store
        .job_status("never-registered")
        .await
        .unwrap()
        .is_none());
    assert!(store.jobs().await.unwrap().is_empty());
    t.cleanup().await;
}

/// A hostile HTTP server on every loopback address: `/endless` starts an array whose first
/// element never ends, `/big` is an array of `BIG_RECORDS` records of ~1 KB (64 MiB), `/5kb`
/// one 5 KB object, `/one` one small post, `/away` redirects to `/one` on another host
/// (127.0.0.2), `/here` to `/one` on this one. Bodies are close-delimited and written as the
/// reader takes them.
async fn hostile_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                let redirect = |to: String| {
                    format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                };
                let _ = match path.as_str() {
                    "/endless" => {
                        let _ = sock.write_all(ok.as_bytes()).await;
                        let _ = sock.write_all(b"[{\"title\": \"").await;
                        // Endless, at a steady 160 KB/s: only the request timeout ends it.
                        let chunk = vec![b'x'; 16 * 1024];
                        while sock.write_all(&chunk).await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(())
                    }
                    "/big" => {
                        let _ = sock.write_all(ok.as_bytes()).await;
                        let _ = sock.write_all(b"[").await;
                        let body = "y".repeat(1000);
                        let mut out = Vec::new();
                        for i in 0..BIG_RECORDS {
                            let sep = if i == 0 { "" } else { "," };
                            out.extend_from_slice(
                                format!("{sep}{{\"title\":\"{i}\",\"body\":\"{body}\"}}")
                                    .as_bytes(),
                            );
                            if out.len() >= 256 * 1024 {
                                if sock.write_all(&out).await.is_err() {
                                    return;
                                }
                                out.clear();
                            }
                        }
                        out.push(b']');
                        sock.write_all(&out).await
                    }
                    "/5kb" => {
                        let rec = format!("{{\"title\":\"t\",\"body\":\"{}\"}}", "z".repeat(5000));
                        sock.write_all(format!("{ok}{rec}").as_bytes()).await
                    }
                    "/one" => {
                        sock.write_all(format!("{ok}{{\"title\":\"t\",\"body\":\"b\"}}").as_bytes())
                            .await
                    }
                    "/away" => {
                        sock.write_all(redirect(format!("http://127.0.0.2:{port}/one")).as_bytes())
                            .await
                    }
                    "/here" => {
                        sock.write_all(redirect(format!("http://127.0.0.1:{port}/one")).as_bytes())
                            .await
                    }
                    _ => {
                        sock.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                            .await
                    }
                };
                let _ = sock.shutdown().await;
            });
        }
    });
    port
}

/// Records of `/big`: 64 MiB of ~1 KB records.
const BIG_RECORDS: u64 = 64 * 1024;

/// Item 1 of the hostile-input issue: HTTP bodies stream through the record reader, so 32
/// endless responses and a 64 MiB array at the default concurrency keep the producer small;
/// a record over --max-record-bytes from a URL is skipped like one from a file; a redirect
/// to another host is not followed, and the problem names where it pointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_sources_stream_in_flat_memory() {
    let t = TestNs::new();
    let port = hostile_server().await;
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let mut cmd = std::process::Command::new(taskmill_tests::bin_path("producer"));
    cmd.env("TASKMILL_NAMESPACE", &t.ns)
        .env_remove("RUST_LOG")
        .args(["enqueue", "--task", "post-stats", "--no-check", "--json"])
        .args([
            "--batch-size",
            "1000",
            "--max-record-bytes",
            "2000",
            "--http-timeout",
            "30",
        ])
        .args([
            "--url",
            &url("/away"),
            "--url",
            &url("/here"),
            "--url",
            &url("/5kb"),
        ])
        .args(["--url", &url("/big")]);
    for _ in 0..31 {
        cmd.args(["--url", &url("/endless")]);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The peak resident memory, read until the process ends (VmHWM only grows).
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            let now = taskmill_tests::peak_rss_kib(pid);
            if now == 0 {
                return peak;
            }
            peak = peak.max(now);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let peak_kib = sampler.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    eprintln!("peak RSS of the producer: {} MB", peak_kib / 1024);
    assert!(
        peak_kib < 100 * 1024,
        "the producer peaked at {} MB",
        peak_kib / 1024
    );
    // /big's records and /here's; not /5kb's (over the record cap) nor /away's.
    assert_eq!(report["records"], BIG_RECORDS + 1, "{report}");
    let problems = report["problems"].to_string();
    assert!(problems.contains("--max-record-bytes"), "{problems}");
    assert!(
        problems.contains(&format!("http://127.0.0.2:{port}/one"))
            && problems.contains("not followed"),
        "{problems}"
    );
    // The endless ones failed at the timeout, and the redirect.
    assert_eq!(report["sources_failed"], 32, "{report}");
    assert_eq!(report["records_invalid"], 1, "{report}");
    t.cleanup().await;
}

/// Every source failed on the network: a service failure (exit 5), not a usage error, and
/// stderr names the failing hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_unreachable_exits_5_and_names_the_hosts() {
    let t = TestNs::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let a = format!("http://127.0.0.1:{port}/a");
    let b = format!("http://127.0.0.1:{port}/b");
    let out = taskmill_tests::producer_within(
        &t.ns,
        &[
            "enqueue",
            "--no-check",
            "--http-retries",
            "1",
            "--url",
            &a,
            "--url",
            &b,
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("every source failed on the network"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("failing hosts: 127.0.0.1:{port} (2 URLs)")),
        "{stderr}"
    );
    assert!(stderr.contains("gave up after 2 attempts"), "{stderr}");
    t.cleanup().await;
}
