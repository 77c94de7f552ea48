//! The `producer` and `worker` binaries as users run them: output shapes and exit codes.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

use serde_json::Value;
use taskmill_tests::{bin_path, producer, sample, sigterm, write_jsonl, TestNs};

/// Runs the producer with its stdout a pipe whose reader is already gone (`| head -0`).
fn producer_to_closed_pipe(ns: &str, args: &[&str]) -> Output {
    let mut child = Command::new(bin_path("producer"))
        .args(args)
        .env("TASKMILL_NAMESPACE", ns)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn the_command_line_end_to_end() {
    let t = TestNs::new();
    let mut worker = Command::new(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("TASKMILL_THREADS", "2")
        .env("TASKMILL_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let worker_log = {
        use std::io::Read;
        let mut err = worker.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            err.read_to_string(&mut text).unwrap();
            text
        })
    };

    // enqueue --wait --json: stdout is JSON only: the report (with the job id), then the
    // final status.
    let file = write_jsonl(sample::posts(95));
    let f = file.to_str().unwrap();
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            f,
            "--wait",
            "--json",
            "--timeout",
            "60",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let report = &lines[0];
    let job = report["job"].as_str().unwrap().to_string();
    assert_eq!(job.len(), 32, "{text}");
    assert_eq!(report["records"], 95);
    assert_eq!(report["batches"], 10);
    let final_status = &lines[1];
    assert_eq!(final_status["state"], "completed");
    assert_eq!(final_status["job"], job.as_str());

    // status --json: numbers as numbers, summary once finished.
    let out = producer(&t.ns, &["status", &job, "--json"]);
    assert!(out.status.success());
    let s: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(s["job"], job.as_str());
    assert_eq!(s["batches_done"], s["batches_total"]);
    assert_eq!(s["batches_total"], 10);
    assert_eq!(s["records_done"], 95);
    assert_eq!(s["summary"]["processed_count"], 95);
    assert!(s["created_ms"].is_u64() && s["finished_ms"].is_u64());

    // results --json: one object a batch, one a line.
    let out = producer(&t.ns, &["results", &job, "--json"]);
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[9]["batch"], 9);
    assert_eq!(lines[9]["result"]["processed_count"], 5);

    // A reader that goes away (`| head -1`) ends the output quietly: no panic, exit 0.
    for args in [
        vec!["results", job.as_str(), "--json"],
        vec!["status", job.as_str()],
        vec!["jobs"],
    ] {
        let out = producer_to_closed_pipe(&t.ns, &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }

    // wait on a job with dead batches exits 1.
    let out = producer(
        &t.ns,
        &[
            "enqueue",
            "--file",
            f,
            "--task",
            "chaos",
            "--param",
            "fail_rate=1",
            "--param",
            "fail=permanent",
            "--wait",
            "--timeout",
            "60",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let dead_job = stdout(&out).lines().next().unwrap().to_string();
    let out = producer(&t.ns, &["wait", &dead_job]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("completed_with_errors"));

    // dlq list / show / purge on the command line.
    let out = producer(&t.ns, &["dlq", "list", "--job", &dead_job, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let letters: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 10);
    assert!(letters
        .iter()
        .all(|l| l["kind"] == "permanent" && l["task"] == "chaos"));
    let out = producer(&t.ns, &["dlq", "show", &format!("{dead_job}:3"), "--json"]);
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["batch"], 3);
    assert_eq!(shown["records"].as_array().unwrap().len(), 10);
    let out = producer(&t.ns, &["dlq", "purge", "--job", &dead_job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    let out = producer(&t.ns, &["dlq", "purge", "--job", &dead_job, "--yes"]);
    assert!(out.status.success());
    assert!(stderr(&out).contains("purged 10"), "{}", stderr(&out));

    // wait times out (exit 3) on a queue that no worker consumes.
    let out = producer(&t.ns, &["enqueue", "--file", f, "--queue", "idle"]);
    assert!(out.status.success());
    let idle_job = stdout(&out).lines().next().unwrap().to_string();
    let out = producer(&t.ns, &["wait", &idle_job, "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(3));
    // The timeout is a duration like every other (a bare number being seconds).
    let out = producer(&t.ns, &["wait", &idle_job, "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = producer(&t.ns, &["wait", &idle_job, "--timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // No such job: exit 4, for every command that takes one.
    for cmd in ["status", "wait", "results"] {
        let out = producer(&t.ns, &[cmd, "no-such-job"]);
        assert_eq!(out.status.code(), Some(4), "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no job \"no-such-job\""),
            "{}",
            stderr(&out)
        );
    }

    // jobs --json lists all three.
    let out = producer(&t.ns, &["jobs", "--json"]);
    let ids: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["job"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&job) && ids.contains(&dead_job) && ids.contains(&idle_job));

    // User mistakes: one clear sentence on stderr, exit 2, no panic.
    for (args, needle) in [
        (vec!["enqueue", "--file", "/no/such/file"], "no such file"),
        (
            vec!["enqueue", "--url", "not-a-url"],
            "--url \"not-a-url\" is not a URL",
        ),
        (vec!["enqueue", "--file", f, "--job", "a:results"], "job id"),
        (vec!["--namespace", "a.b", "jobs"], "namespace \"a.b\""),
        (
            vec!["--amqp-url", "nope", "dlq", "list"],
            "--amqp-url is not a URL",
        ),
        (vec!["enqueue"], "no records to read"),
        (
            vec!["enqueue", "--file", f, "--batch-size", "0"],
            "--batch-size",
        ),
        (
            vec!["enqueue", "--file", f, "--param", "novalue"],
            "KEY=VALUE",
        ),
        (
            vec!["enqueue", "--file", f, "--queue", "bad name"],
            "queue name",
        ),
    ] {
        let out = producer(&t.ns, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    }
    // Nothing readable (junk, or an empty file): exit 2, say so, register no job.
    let junk = std::env::temp_dir().join(format!("{}-junk.jsonl", t.ns));
    std::fs::write(&junk, "nope\n{broken\n").unwrap();
    let empty = std::env::temp_dir().join(format!("{}-empty.jsonl", t.ns));
    std::fs::write(&empty, "").unwrap();
    let out = producer(&t.ns, &["enqueue", "--file", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nothing to enqueue"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("junk.jsonl:1: malformed JSON"));
    assert!(stdout(&out).is_empty());
    let out = producer(
        &t.ns,
        &["enqueue", "--file", empty.to_str().unwrap(), "--wait"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    // A line nested 100,000 deep says so (it read "not a JSON value"); one record is one
    // record in one batch (it read "1 records in 1 batches").
    let deep = std::env::temp_dir().join(format!("{}-deep.jsonl", t.ns));
    let mut text = "{\"id\": 1, \"title\": \"t\", \"body\": \"b\"}\n".to_string();
    text.push_str(&"{\"a\": ".repeat(100_000));
    text.push('1');
    text.push_str(&"}".repeat(100_000));
    text.push('\n');
    std::fs::write(&deep, text).unwrap();
    let out = producer(&t.ns, &["enqueue", "--file", deep.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nested deeper than 128 levels"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(": 1 record in 1 batch in "),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_file(deep);
    // Wrong credentials: exit 5, one sentence, the password never shown.
    let out = producer(
        &t.ns,
        &[
            "--amqp-url",
            "amqp://guest:s3cret-pw@127.0.0.1:5672/%2f",
            "enqueue",
            "--file",
            f,
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("refused the connection"), "{err}");
    assert!(!err.contains("s3cret-pw"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // SIGTERM: the worker drains and exits 0.
    assert!(sigterm(worker.id()));
    let status = worker.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // Its JSON log: one object a line, no colour codes, fields as values (not debug dumps).
    let log = worker_log.join().unwrap();
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe");
    assert!(!log.contains("Some("), "{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let start = lines
        .iter()
        .find(|l| l["fields"]["message"] == "worker starting")
        .unwrap();
    assert_eq!(start["fields"]["queues"], "tasks");
    let dead_line = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("dead-lettered"))
        })
        .unwrap();
    // The batch's identity comes from its span: job, batch, task and attempt.
    assert_eq!(dead_line["span"]["job"], dead_job.as_str(), "{dead_line}");
    assert!(dead_line["span"]["batch"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    assert_eq!(dead_line["span"]["task"], "chaos");
    assert_eq!(dead_line["span"]["attempt"], 1);

    // Passwords in the environment never show in --help.
    for (bin, args) in [
        ("producer", vec!["--help"]),
        ("producer", vec!["enqueue", "--help"]),
        ("producer", vec!["dlq", "replay", "--help"]),
        ("worker", vec!["--help"]),
    ] {
        let out = Command::new(bin_path(bin))
            .args(&args)
            .env("AMQP_URL", "amqp://u:amqp-s3cret@127.0.0.1:5672/%2f")
            .env("REDIS_URL", "redis://:redis-s3cret@127.0.0.1:6379/0")
            .env(
                "RABBITMQ_API_URL",
                "http://u:api-s3cret@127.0.0.1:15672/api",
            )
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = stdout(&out);
        assert!(!text.contains("s3cret"), "{bin} {args:?}: {text}");
    }
    // A worker given a wrong password stops at once with one clear sentence and exit 5.
    let out = Command::new(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("AMQP_URL", "amqp://guest:wrong-pw@127.0.0.1:5672/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("refused the connection"), "{err}");
    assert!(!err.contains("wrong-pw"), "{err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe: {err}");
    // Redis refusing the credentials (a user it does not know): the worker and the producer
    // stop at once with exit 5, saying so, the password not shown.
    let redis_refuses = "redis://nobody-here:redis-wrong-pw@127.0.0.1:6379/0";
    let out = Command::new(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("REDIS_URL", redis_refuses)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("refused the worker's credentials"), "{err}");
    assert!(!err.contains("redis-wrong-pw"), "{err}");
    let out = Command::new(bin_path("producer"))
        .args(["jobs"])
        .env("TASKMILL_NAMESPACE", &t.ns)
        .env("REDIS_URL", redis_refuses)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(!err.contains("redis-wrong-pw"), "{err}");

    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(junk);
    let _ = std::fs::remove_file(empty);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(t.cleanup());
}

#[test]
fn a_config_file_sits_under_the_environment_and_the_flags() {
    let t = TestNs::new();
    let other = TestNs::new();
    let config = std::env::temp_dir().join(format!("{}.toml", t.ns));
    std::fs::write(
        &config,
        format!("namespace = \"{}\"\nresult_ttl = 600\n", t.ns),
    )
    .unwrap();
    let run = |args: &[&str], env_ns: Option<&str>| {
        let mut c = Command::new(bin_path("producer"));
        c.args(args)
            .env_remove("TASKMILL_NAMESPACE")
            .env_remove("TASKMILL_CONFIG");
        if let Some(ns) = env_ns {
            c.env("TASKMILL_NAMESPACE", ns);
        }
        c.output().unwrap()
    };
    let file = write_jsonl(sample::posts(3));
    let f = file.to_str().unwrap();
    let cfg = config.to_str().unwrap();
    // The file's namespace is used when nothing else says one.
    let out = run(&["--config", cfg, "enqueue", "--file", f], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let job = stdout(&out).lines().next().unwrap().to_string();
    let out = run(&["--config", cfg, "jobs", "--json"], None);
    assert!(stdout(&out).contains(&job));
    // The environment beats the file; the flag beats both.
    let out = run(&["--config", cfg, "jobs", "--json"], Some(&other.ns));
    assert!(!stdout(&out).contains(&job));
    let out = run(
        &["--config", cfg, "--namespace", &t.ns, "jobs", "--json"],
        Some(&other.ns),
    );
    assert!(stdout(&out).contains(&job));
    // A mistake in the file is one clear sentence.
    std::fs::write(&config, "namespce = \"x\"\n").unwrap();
    let out = run(&["--config", cfg, "jobs"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown setting \"namespce\""),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(file);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(t.cleanup());
}
