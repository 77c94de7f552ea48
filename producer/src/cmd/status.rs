//! `producer status JOB`: a job's state, counters, times and (once finished) summary.

use clap::Args;
use serde_json::Value;

use taskmill_client::{Client, Error};
use taskmill_common::{config::ConnArgs, store::JobStatus};

/// Arguments of `status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Job id.
    #[arg(required_unless_present = "group")]
    pub job: Option<String>,
    /// A group's jobs instead (`enqueue --group`): how many are in each state, and each one.
    #[arg(long, value_name = "G", conflicts_with = "job")]
    pub group: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Records per second from creation to finish (or to now).
pub fn rate(status: &JobStatus) -> (f64, f64) {
    let end = status.finished_ms.unwrap_or_else(taskmill_common::now_ms);
    let secs = end.saturating_sub(status.created_ms) as f64 / 1000.0;
    let rate = if secs > 0.0 {
        status.records_done as f64 / secs
    } else {
        0.0
    };
    (secs, rate)
}

/// `in 5 s` or `5 s ago`, from now.
fn from_now(ms: u64) -> String {
    let now = taskmill_common::now_ms();
    if ms >= now {
        format!("in {:.0} s", (ms - now) as f64 / 1000.0)
    } else {
        format!("{:.0} s ago", (now - ms) as f64 / 1000.0)
    }
}

/// What the job was enqueued with that steers it: priority, limits, start and expiry.
fn options(status: &JobStatus) -> Vec<String> {
    let mut o = Vec::new();
    if status.priority > 0 {
        o.push(format!("priority {}", status.priority));
    }
    if let Some(t) = status.time_limit_ms {
        o.push(format!("time limit {} ms", t));
    }
    if let Some(r) = status.rate_interval_ms {
        let key = status
            .rate_key
            .as_deref()
            .map(|k| format!(" (key {k})"))
            .unwrap_or_default();
        o.push(format!("rate limit one start every {r} ms{key}"));
    }
    if let Some(eta) = status.eta_ms {
        o.push(format!("starts {}", from_now(eta)));
    }
    if let Some(exp) = status.expires_ms {
        o.push(format!("expires {}", from_now(exp)));
    }
    o
}

/// The dead batches by kind, each with one example: `permanent 2 (batch 1: "why")`.
pub fn describe_dead(dead: &[(u64, Value)]) -> Option<String> {
    let mut kinds: std::collections::BTreeMap<String, (u64, u64, String)> = Default::default();
    for (batch, reason) in dead {
        let kind = reason["kind"].as_str().unwrap_or("unknown").to_string();
        let e = kinds.entry(kind).or_insert_with(|| {
            let why = reason["error"]
                .as_str()
                .map(|e| taskmill_common::envelope::bounded(e, 120).into_owned())
                .unwrap_or_else(|| reason.to_string());
            (0, *batch, why)
        });
        e.0 += 1;
    }
    (!kinds.is_empty()).then(|| {
        let parts: Vec<String> = kinds
            .iter()
            .map(|(k, (n, b, why))| format!("{k} {n} (batch {b}: {why:?})"))
            .collect();
        format!("  dead:    {}", parts.join("; "))
    })
}

/// The status for people (with its summary, once finished).
pub fn describe(status: &JobStatus) -> String {
    let summary: Option<&Value> = status.summary.as_ref();
    let total = status
        .batches_total
        .map(|t| t.to_string())
        .unwrap_or_else(|| "? (still publishing)".into());
    let (secs, rate) = rate(status);
    let mut s = format!(
        "job {}: {}\n  task:    {} (queue {})\n  batches: {} done, {} dead of {} ({} published)\n  records: {} done, {} invalid of {} published\n  retries: {}\n  time:    {:.2} s, {:.0} records/s",
        status.job,
        status.state(),
        status.task(),
        status.queue,
        status.batches_done,
        status.batches_dead,
        total,
        status.batches_published,
        status.records_done,
        status.records_invalid,
        status.records_total,
        status.retries,
        secs,
        rate,
    );
    if let Some(parent) = &status.parent {
        let parent = parent.replacen("group:", "group ", 1);
        match &status.parent_outcome {
            Some(o) => s.push_str(&format!(
                "\n  follows: {parent}, which ended {}",
                outcome(o)
            )),
            None => s.push_str(&format!("\n  follows: {parent}")),
        }
    }
    if let Some(then) = &status.then {
        let steps: Vec<&str> = then["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["task"].as_str())
            .collect();
        let on = then["steps"][0]["on"].as_str().unwrap_or("complete");
        let what = match (&status.then_job, &status.then_note, status.then_fired_ms) {
            (Some(child), Some(note), _) => format!("{note}: job {child}"),
            (None, Some(note), _) => note.clone(),
            (None, None, Some(_)) => "publishing".into(),
            _ => format!("on {on}"),
        };
        s.push_str(&format!("\n  then:    {} ({what})", steps.join(" → ")));
    }
    if let Some(c) = &status.celery {
        let left = c["chain"].as_array().map_or(0, Vec::len);
        let mut line = format!(
            "\n  celery:  a Celery call; its result at {}",
            c["key"].as_str().unwrap_or("?")
        );
        if left > 0 {
            let next = match (&status.then_job, status.then_fired_ms) {
                (Some(next), _) => format!("next call {next} published"),
                (None, Some(_)) => "publishing the next call".into(),
                _ => "the next call runs on success".into(),
            };
            line.push_str(&format!(" ({left} call(s) left in its chain: {next})"));
        }
        s.push_str(&line);
    }
    if let Some(url) = &status.on_complete {
        let n = status.hook_attempts;
        let what = if status.hook_delivered_ms.is_some() {
            format!("delivered ({n} attempt(s))")
        } else if status.hook_gave_up_ms.is_some() {
            format!(
                "given up after {n} attempts: {}",
                status.hook_error.as_deref().unwrap_or("?")
            )
        } else if let Some(e) = &status.hook_error {
            format!("{n} attempt(s) failed, retrying: {e}")
        } else if status.is_finished() {
            "being delivered".into()
        } else {
            "when the job ends".into()
        };
        s.push_str(&format!("\n  webhook: {url} ({what})"));
    }
    if status.interrupted_ms.is_some() {
        s.push_str(&format!(
            "\n  interrupted: the enqueue stopped before its input ended (a signal, or the producer died); the {} batches it published run",
            status.batches_total.unwrap_or(0)
        ));
    }
    if status.batches_lost > 0 {
        s.push_str(&format!(
            "\n  lost:    {} batches never came back (the job stalled: see its problems)",
            status.batches_lost
        ));
    }
    if status.batches_expired > 0 {
        s.push_str(&format!(
            "\n  expired: {} batches dropped unrun (not started before the job's expiry)",
            status.batches_expired
        ));
    }
    let options = options(status);
    if !options.is_empty() {
        s.push_str(&format!("\n  options: {}", options.join(", ")));
    }
    if !status.params.is_empty() {
        let params: Vec<String> = status
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s.push_str(&format!("\n  params:  {}", params.join(", ")));
    }
    if status.batches_cancelled > 0 || status.cancelled_ms.is_some() {
        s.push_str(&format!(
            "\n  cancelled: {} batches dropped unrun",
            status.batches_cancelled
        ));
    }
    if status.sources_failed > 0 {
        s.push_str(&format!("\n  sources failed: {}", status.sources_failed));
    }
    let problems = status.problems();
    if !problems.is_empty() {
        s.push_str("\n  problems:");
        for p in problems {
            s.push_str("\n    ");
            s.push_str(p);
        }
    }
    if let Some(sum) = summary {
        let pretty = serde_json::to_string_pretty(sum).unwrap_or_default();
        s.push_str("\n  summary: ");
        s.push_str(&pretty.replace('\n', "\n  "));
    }
    s
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let client: Client = crate::client(conn).await?;
    if let Some(g) = &args.group {
        return super::group::status(&client, g, args.json).await;
    }
    let job = args.job.as_deref().unwrap_or_default();
    let status = match client.job(job).status().await {
        Ok(s) => s,
        Err(e) => {
            // An unreadable job: what is wrong goes to stdout too (`--json` readers get an
            // object), and the exit code says it (6).
            if let Error::Unreadable(bad) = &e {
                if args.json {
                    crate::out::line(&bad.to_json().to_string());
                } else {
                    crate::out::line(&format!("job {}: unreadable\n  {}", bad.job, bad.reason()));
                }
            }
            return Err(e.into());
        }
    };
    // Results deleted or renamed by hand (or expired apart from their job): said, not hidden.
    // (A results key that cannot be counted, of another type say, is the `results`
    // command's to report: the status itself reads.)
    let stored = client.store().results_count(job).await.ok();
    let missing = stored.map_or(0, |n| status.batches_done.saturating_sub(n));
    if args.json {
        let mut v = status.to_json();
        // Only then: the object is otherwise the job's status as every client reads it.
        if let Some(o) = v.as_object_mut().filter(|_| missing > 0) {
            o.insert("results_missing".into(), missing.into());
        }
        crate::out::line(&v.to_string());
    } else {
        let mut text = describe(&status);
        if missing > 0 {
            text.push_str(&format!(
                "\n  results: missing for {missing} of the {} done batches (deleted, renamed or expired in Redis)",
                status.batches_done
            ));
        }
        if status.batches_dead > 0 {
            if let Some(d) = describe_dead(&client.store().dead_batches(job).await?) {
                text.push('\n');
                text.push_str(&d);
            }
        }
        crate::out::line(&text);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// How a parent ended, from its `parent_outcome`: `completed_with_errors (8 batches done, 2
/// dead)`, or for a group `completed (20 jobs: 19 completed, 1 completed_with_errors)`.
fn outcome(o: &serde_json::Value) -> String {
    let state = o["state"].as_str().unwrap_or("?");
    if let Some(counts) = o["counts"].as_object() {
        let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        return format!("{state} ({} jobs: {})", o["jobs"], parts.join(", "));
    }
    format!(
        "{state} ({} batches done, {} dead)",
        o["batches_done"], o["batches_dead"]
    )
}
