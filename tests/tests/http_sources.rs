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
