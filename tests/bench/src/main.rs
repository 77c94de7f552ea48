//! `bench`: runs taskmill's benchmark workloads against the local RabbitMQ and Redis and
//! prints a Markdown table; writes the figures as JSON and the batch-size sweep as SVG.

use std::path::PathBuf;

use clap::Parser;
use serde_json::{json, Value};
use taskmill_bench as bench;

/// Command line of the benchmark harness.
#[derive(Parser)]
#[command(name = "bench", about = "taskmill benchmark harness")]
struct Args {
    /// Workloads to run (comma-separated): throughput, raw, cpu, latency, sweep, memory, peers;
    /// and the diagnostics split (the broker's CPU for publishing and for consuming apart) and
    /// producer (the producer's path apart: the file read alone, the transcoding alone, the
    /// producer alone into the broker).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,raw,cpu,latency,sweep,memory,peers"
    )]
    only: Vec<String>,
    /// Posts in the throughput workload.
    #[arg(long, default_value_t = 500_000)]
    posts: u64,
    /// Confirm windows the raw round trip tries in its first run; the fastest is kept.
    #[arg(long, value_delimiter = ',', default_value = "2000,4000,8000")]
    raw_windows: Vec<usize>,
    /// Seconds the CPU-bound workload should run in process (its size is chosen for it).
    #[arg(long, default_value_t = 10.0)]
    cpu_seconds: f64,
    /// Seconds of the latency workload.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// Batches a second of the latency workload (default: half the measured throughput, or
    /// 500 when throughput is not measured in this run).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Worker prefetch (default: the worker's own default, as a user gets it).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Runs of each workload (throughput and raw alternating, taskmill and raw latency
    /// alternating, CPU-bound in process and end to end alternating); medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where to write results.json and sweep.svg.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => v.to_string(),
    }
}

/// The table rows and the JSON results, filled workload by workload.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
    results: serde_json::Map<String, Value>,
}

impl Report {
    /// The rows of run-pair ratios `pairs` (sorted) of `what`: each pair, then their median
    /// against `target`. Returns the median (None without pairs).
    fn pair_rows(
        &mut self,
        workload: &str,
        what: &str,
        target: &str,
        pairs: &[f64],
    ) -> Option<f64> {
        let m = bench::median(pairs)?;
        self.rows.push((
            workload.into(),
            format!("{what} of each run pair"),
            listed(pairs),
        ));
        self.rows.push((
            workload.into(),
            format!("{what}, median of the pairs ({target})"),
            format!("{m:.2}"),
        ));
        Some(m)
    }
}

/// Ratios as "0.85, 0.91, …".
fn listed(ratios: &[f64]) -> String {
    ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let want = |w: &str| args.only.iter().any(|o| o == w);
    let data = PathBuf::from("target/bench-data");
    std::fs::create_dir_all(&args.out)?;
    let mut rep = Report::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    rep.results
        .insert("machine".into(), json!({"cores": threads}));
    let throughput = throughput_and_raw(&args, &data, &mut rep).await?;
    if want("cpu") {
        cpu(&args, &data, &mut rep).await?;
    }
    if want("latency") {
        latency(&args, &mut rep, throughput).await?;
    }
    if want("sweep") {
        sweep(&args, &data, &mut rep).await?;
    }
    if want("split") {
        split(&args, &data, &mut rep).await?;
    }
    if want("producer") {
        producer_path(&args, &data, throughput, &mut rep).await?;
    }
    if want("memory") {
        memory(&data, &mut rep).await?;
    }
    if want("peers") {
        peers(&args, &data, &mut rep, throughput).await?;
    }
    let (rows, results) = (rep.rows, rep.results);
    println!("| workload | figure | value |\n|---|---|---|");
    for (w, k, v) in &rows {
        println!("| {w} | {k} | {v} |");
    }
    let path = args.out.join("results.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(results))?,
    )?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// Throughput and the raw round trip, alternating; the median throughput in batches/s.
async fn throughput_and_raw(
    args: &Args,
    data: &std::path::Path,
    rep: &mut Report,
) -> anyhow::Result<Option<f64>> {
    let want = |w: &str| args.only.iter().any(|o| o == w);
    let mut raws: Vec<bench::RawFigures> = Vec::new();
    let mut runs: Vec<bench::RunFigures> = Vec::new();
    let file = bench::posts_file(data, args.posts)?;
    let mut window = args.raw_windows.first().copied().unwrap_or(2000);
    for run in 1..=args.runs.max(1) {
        if want("raw") {
            raws.extend(raw_run(args, run, &mut window).await?);
        }
        if want("throughput") || (want("latency") && args.latency_rate.is_none()) {
            eprintln!(
                "bench: throughput ({} posts, batches of 10, post-stats, default flags), run {run}",
                args.posts
            );
            let r = bench::end_to_end(&file, 10, "post-stats", &[], args.prefetch).await?;
            eprintln!(
                "bench:   {:.0} batches/s; worker peak RSS {:.1} MiB",
                r.batches_per_s(),
                r.worker.peak_rss_mib
            );
            runs.push(r);
        }
    }
    // Each taskmill run over the raw run just before it: the machine's speed drifts by a
    // fifth within minutes, and a pair of neighbouring runs sees the same machine.
    let pairs = bench::pair_ratios(
        &runs.iter().map(|r| r.batches_per_s()).collect::<Vec<_>>(),
        &raws.iter().map(|r| r.messages_per_s).collect::<Vec<_>>(),
    );
    let throughput = report_throughput(args, &file, runs, rep)?;
    report_raw(raws, &pairs, throughput, rep);
    Ok(throughput)
}

/// One run of the bare round trip; the first run tries every confirm window and keeps the
/// fastest (the strongest reference), whose window the later runs use.
async fn raw_run(
    args: &Args,
    run: usize,
    window: &mut usize,
) -> anyhow::Result<Option<bench::RawFigures>> {
    if run > 1 {
        eprintln!("bench: raw round trip, confirm window {window}, run {run}");
        let r = bench::raw_round_trip(args.posts, 10, *window).await?;
        eprintln!("bench:   {:.0} messages/s", r.messages_per_s);
        return Ok(Some(r));
    }
    let mut best: Option<bench::RawFigures> = None;
    for &w in &args.raw_windows {
        eprintln!("bench: raw round trip, confirm window {w}, run {run}");
        let acks = bench::RAW_ACKS.load(std::sync::atomic::Ordering::Relaxed);
        let r = bench::raw_round_trip(args.posts, 10, w).await?;
        eprintln!(
            "bench:   {:.0} messages/s, {} acks",
            r.messages_per_s,
            bench::RAW_ACKS.load(std::sync::atomic::Ordering::Relaxed) - acks
        );
        if best
            .as_ref()
            .is_none_or(|b| r.messages_per_s > b.messages_per_s)
        {
            best = Some(r);
        }
    }
    if let Some(b) = &best {
        *window = b.window;
    }
    Ok(best)
}

/// The throughput rows of the report from taskmill's runs (the median run's figures); its
/// batches a second.
fn report_throughput(
    args: &Args,
    file: &std::path::Path,
    mut runs: Vec<bench::RunFigures>,
    rep: &mut Report,
) -> anyhow::Result<Option<f64>> {
    runs.sort_by(|a, b| a.records_per_s().total_cmp(&b.records_per_s()));
    let Some(r) = runs.get(runs.len() / 2) else {
        return Ok(None);
    };
    let mut j = r.to_json();
    j["runs_records_per_s"] = json!(runs.iter().map(|r| r.records_per_s()).collect::<Vec<_>>());
    rep.rows.push((
        "throughput".into(),
        "records/s".into(),
        f(&j["records_per_s"]),
    ));
    rep.rows.push((
        "throughput".into(),
        "batches/s".into(),
        f(&j["batches_per_s"]),
    ));
    for (who, key) in [
        ("producer", "producer_cpu_s_per_1000_batches"),
        ("worker", "worker_cpu_s_per_1000_batches"),
        ("broker", "broker_cpu_s_per_1000_batches"),
        ("Redis", "redis_cpu_s_per_1000_batches"),
    ] {
        rep.rows.push((
            "throughput".into(),
            format!("{who} CPU s / 1000 batches"),
            format!("{:.3}", j[key].as_f64().unwrap_or(0.0)),
        ));
    }
    for who in ["producer", "worker"] {
        let c = &j[format!("{who}_ctxt_per_1000_batches")];
        rep.rows.push((
            "throughput".into(),
            format!("{who} context switches / 1000 batches, voluntary / involuntary"),
            format!(
                "{:.0} / {:.0}",
                c["voluntary"].as_f64().unwrap_or(0.0),
                c["involuntary"].as_f64().unwrap_or(0.0)
            ),
        ));
        // By thread, the busiest first: which hop costs them.
        let by = &j[format!("{who}_ctxt_by_thread_per_1000_batches")];
        let mut threads: Vec<(String, f64, f64)> = by
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, c)| {
                let v = c["voluntary"].as_f64().unwrap_or(0.0);
                (name.clone(), v, c["involuntary"].as_f64().unwrap_or(0.0))
            })
            .collect();
        threads.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        let shown: Vec<String> = threads
            .iter()
            .filter(|(_, v, i)| v + i >= 1.0)
            .map(|(name, v, i)| format!("{name} {v:.0}/{i:.0}"))
            .collect();
        rep.rows.push((
            "throughput".into(),
            format!("{who} context switches by thread / 1000 batches"),
            shown.join(", "),
        ));
    }
    rep.rows.push((
        "throughput".into(),
        "producer peak RSS MiB".into(),
        f(&j["producer_peak_rss_mib"]),
    ));
    rep.rows.push((
        "throughput".into(),
        "worker peak RSS MiB".into(),
        f(&j["worker_peak_rss_mib"]),
    ));
    // What of the client side is work the bare round trip skips (it sends bodies encoded
    // beforehand and runs no task), measured alone.
    let (transcode, task) = bench::inherent_work(file, args.posts, 10, "post-stats")?;
    rep.rows.push((
        "throughput".into(),
        "of which the records' JSON → MessagePack alone / the task alone, CPU s / 1000 batches"
            .into(),
        format!("{transcode:.3} / {task:.3}"),
    ));
    j["inherent_cpu_s_per_1000_batches"] = json!({"transcode": transcode, "task": task});
    rep.results.insert("throughput".into(), j);
    Ok(Some(r.batches_per_s()))
}

/// The bare round trip's rows of the report (the median run's figures), with taskmill's
/// ratios to it.
fn report_raw(
    mut raws: Vec<bench::RawFigures>,
    pairs: &[f64],
    throughput: Option<f64>,
    rep: &mut Report,
) {
    raws.sort_by(|a, b| a.messages_per_s.total_cmp(&b.messages_per_s));
    if let Some(raw) = raws.get(raws.len() / 2) {
        let rate = raw.messages_per_s;
        rep.rows.push((
            "raw".into(),
            format!("messages/s (confirm window {}, prefetch 1000)", raw.window),
            format!("{rate:.0}"),
        ));
        for (who, v) in [
            ("client (publisher and consumer)", raw.client_cpu_s_per_1000),
            ("broker", raw.broker_cpu_s_per_1000),
            ("Redis", raw.redis_cpu_s_per_1000),
        ] {
            rep.rows.push((
                "raw".into(),
                format!("{who} CPU s / 1000 messages"),
                format!("{v:.3}"),
            ));
        }
        rep.rows.push((
            "raw".into(),
            "client context switches / 1000 messages, voluntary / involuntary".into(),
            format!(
                "{:.0} / {:.0}",
                raw.client_ctxt_per_1000.0, raw.client_ctxt_per_1000.1
            ),
        ));
        let mut j = json!({
            "messages": raw.messages, "messages_per_s": rate, "confirm_window": raw.window,
            "client_ctxt_per_1000_messages": {
                "voluntary": raw.client_ctxt_per_1000.0,
                "involuntary": raw.client_ctxt_per_1000.1,
            },
            "prefetch": 1000, "broker_cpu_s_per_1000_messages": raw.broker_cpu_s_per_1000,
            "redis_cpu_s_per_1000_messages": raw.redis_cpu_s_per_1000,
            "client_cpu_s_per_1000_messages": raw.client_cpu_s_per_1000,
            "runs_messages_per_s": raws.iter().map(|r| r.messages_per_s).collect::<Vec<_>>(),
        });
        if let Some(t) = throughput {
            j["throughput_over_raw"] = json!(t / rate);
            rep.rows.push((
                "raw".into(),
                "throughput / raw, of the medians".into(),
                format!("{:.2}", t / rate),
            ));
        }
        if let Some(m) = rep.pair_rows("raw", "throughput / raw", "target ≥ 0.90", pairs) {
            j["pair_ratios"] = json!(pairs);
            j["throughput_over_raw_pairs_median"] = json!(m);
        }
        rep.results.insert("raw".into(), j);
    }
}

/// The CPU-bound workload, end to end against in-process, alternating; the median ratio.
async fn cpu(args: &Args, data: &std::path::Path, rep: &mut Report) -> anyhow::Result<()> {
    // A CPU-bound job: MinHash with 512 functions (the task's heaviest ordinary setting), sized
    // so that the task alone runs for at least --cpu-seconds in process.
    let params = [("hashes", "512")];
    let probe = bench::in_process(5_000, 100, "similarity", &params)?;
    let mut posts =
        ((5_000.0 * 1.2 * args.cpu_seconds / probe.max(0.001)).ceil() as u64).div_ceil(100) * 100;
    let mut inproc = bench::in_process(posts, 100, "similarity", &params)?;
    while inproc < args.cpu_seconds {
        posts =
            ((posts as f64 * 1.2 * args.cpu_seconds / inproc).ceil() as u64).div_ceil(100) * 100;
        inproc = bench::in_process(posts, 100, "similarity", &params)?;
    }
    let file = bench::posts_file(data, posts)?;
    // (in-process s, end-to-end s, end-to-end run) of each run.
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        eprintln!(
            "bench: cpu (similarity, hashes=512, {posts} posts in batches of 100), run {run}"
        );
        if run > 1 {
            bench::quiesce().await;
            inproc = bench::in_process(posts, 100, "similarity", &params)?;
        }
        let e2e =
            bench::end_to_end(&file, 100, "similarity", &["hashes=512"], args.prefetch).await?;
        eprintln!(
            "bench:   in process {inproc:.2} s, end to end {:.2} s: {:.2}",
            e2e.seconds,
            inproc / e2e.seconds
        );
        runs.push((inproc, e2e.seconds, e2e));
    }
    runs.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
    let ratios: Vec<f64> = runs.iter().map(|r| r.0 / r.1).collect();
    let (inproc, seconds, e2e) = &runs[runs.len() / 2];
    let ratio = inproc / seconds;
    rep.rows.push((
        "cpu".into(),
        "similarity (hashes=512) end to end, s".into(),
        format!("{seconds:.2}"),
    ));
    rep.rows.push((
        "cpu".into(),
        "similarity (hashes=512) in-process, s".into(),
        format!("{inproc:.2}"),
    ));
    rep.rows.push((
        "cpu".into(),
        "end to end / in-process speed (target ≥ 0.90)".into(),
        format!("{ratio:.2}"),
    ));
    rep.rows
        .push(("cpu".into(), "ratio of each run".into(), listed(&ratios)));
    rep.results.insert(
        "cpu".into(),
        json!({"posts": posts, "end_to_end": e2e.to_json(), "in_process_seconds": inproc,
               "ratio": ratio, "runs_ratio": ratios}),
    );
    Ok(())
}

/// Latency at half the throughput, taskmill and the raw round trip at the same rate,
/// alternating; the median p99 of each.
async fn latency(args: &Args, rep: &mut Report, throughput: Option<f64>) -> anyhow::Result<()> {
    let rate = args
        .latency_rate
        .unwrap_or(throughput.unwrap_or(1000.0) / 2.0);
    let p99 = |v: &Value| v["p99_ms"].as_f64().unwrap_or(f64::MAX);
    let (mut all, mut raws) = (Vec::new(), Vec::new());
    for run in 1..=args.runs.max(1) {
        eprintln!(
            "bench: latency at {rate:.0} batches/s for {} s, run {run}",
            args.latency_seconds
        );
        all.push(bench::latency(rate, args.latency_seconds, 10).await?);
        let last = &all[all.len() - 1];
        eprintln!(
            "bench:   p99 {} ms (in the worker: p99 {} ms)",
            f(&last["p99_ms"]),
            f(&last["in_worker_p99_ms"])
        );
        eprintln!(
            "bench: raw latency at {rate:.0} messages/s for {} s, run {run}",
            args.latency_seconds
        );
        raws.push(bench::raw_latency(rate, args.latency_seconds, 10).await?);
        eprintln!("bench:   p99 {} ms", f(&raws[raws.len() - 1]["p99_ms"]));
    }
    // Each taskmill run's p99 over the raw run's just after it (see the throughput's pairs).
    let pairs = bench::pair_ratios(
        &all.iter().map(p99).collect::<Vec<_>>(),
        &raws.iter().map(p99).collect::<Vec<_>>(),
    );
    all.sort_by(|a, b| p99(a).total_cmp(&p99(b)));
    raws.sort_by(|a, b| p99(a).total_cmp(&p99(b)));
    let mut j = all[all.len() / 2].clone();
    let raw = raws[raws.len() / 2].clone();
    for q in ["p50_ms", "p95_ms", "p99_ms", "max_ms"] {
        rep.rows.push((
            "latency".into(),
            format!("{q} at {rate:.0} batches/s"),
            f(&j[q]),
        ));
    }
    j["runs_p99_ms"] = json!(all.iter().map(|r| r["p99_ms"].clone()).collect::<Vec<_>>());
    rep.rows.push((
        "latency".into(),
        "of which in the worker (arrival to result stored), p50 / p99 / max ms".into(),
        format!(
            "{} / {} / {}",
            f(&j["in_worker_p50_ms"]),
            f(&j["in_worker_p99_ms"]),
            f(&j["in_worker_max_ms"])
        ),
    ));
    rep.rows.push((
        "latency".into(),
        format!("raw round trip p50 / p95 / p99 / max ms at {rate:.0}/s"),
        format!(
            "{} / {} / {} / {}",
            f(&raw["p50_ms"]),
            f(&raw["p95_ms"]),
            f(&raw["p99_ms"]),
            f(&raw["max_ms"])
        ),
    ));
    let ratio = p99(&j) / p99(&raw);
    rep.rows.push((
        "latency".into(),
        "p99 / raw p99, of the medians".into(),
        format!("{ratio:.2}"),
    ));
    j["p99_over_raw_p99"] = json!(ratio);
    let paired = rep
        .pair_rows("latency", "p99 / raw p99", "target ≤ 1.5", &pairs)
        .unwrap_or(f64::NAN);
    j["p99_over_raw_p99_pairs_median"] = json!(paired);
    j["pair_ratios"] = json!(pairs);
    j["raw"] = raw;
    j["raw"]["runs_p99_ms"] = json!(raws.iter().map(|r| r["p99_ms"].clone()).collect::<Vec<_>>());
    let each = |v: &[Value]| {
        v.iter()
            .map(|r| f(&r["p99_ms"]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    rep.rows
        .push(("latency".into(), "p99 ms of each run".into(), each(&all)));
    rep.rows.push((
        "latency".into(),
        "raw p99 ms of each run".into(),
        each(&raws),
    ));
    rep.results.insert("latency".into(), j);
    Ok(())
}

/// The broker's CPU for publishing and for consuming apart (a diagnostic, not in the default
/// run): medians of each figure.
async fn split(args: &Args, data: &std::path::Path, rep: &mut Report) -> anyhow::Result<()> {
    let file = bench::posts_file(data, args.posts)?;
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        eprintln!("bench: broker CPU of publishing and of consuming apart, run {run}");
        let r = bench::split(&file, args.posts).await?;
        eprintln!("bench:   {r}");
        runs.push(r);
    }
    let mut out = serde_json::Map::new();
    for (key, what) in [
        ("taskmill_publish", "producer publishing"),
        ("bare_publish", "bare publisher"),
        ("taskmill_consume", "worker draining"),
        (
            "bare_consume_of_taskmill_queue",
            "bare consumer draining taskmill's queue",
        ),
        ("bare_consume", "bare consumer draining its own queue"),
    ] {
        let Some(m) = median_of(&runs, key) else {
            continue;
        };
        rep.rows.push((
            "split".into(),
            format!("broker CPU s / 1000 messages, {what}"),
            format!("{m:.3}"),
        ));
        out.insert(key.into(), json!(m));
    }
    rep.results.insert("split".into(), Value::Object(out));
    Ok(())
}

/// The producer's path apart (see `bench::producer_path`), medians of the runs, beside the
/// end-to-end throughput when this run measured it.
async fn producer_path(
    args: &Args,
    data: &std::path::Path,
    throughput: Option<f64>,
    rep: &mut Report,
) -> anyhow::Result<()> {
    let file = bench::posts_file(data, args.posts)?;
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        eprintln!("bench: the producer's path apart, run {run}");
        let r = bench::producer_path(&file, args.posts).await?;
        eprintln!("bench:   {r}");
        runs.push(r);
    }
    let mut out = serde_json::Map::new();
    for (key, what) in [
        (
            "read_batches_per_s",
            "reading the file alone (lines split), batches/s",
        ),
        (
            "transcode_batches_per_s",
            "JSON → MessagePack of every record alone (one thread), batches/s",
        ),
        (
            "producer_alone_batches_per_s",
            "the producer alone into the broker (no worker), batches/s",
        ),
        (
            "producer_alone_cpu_s_per_1000_batches",
            "the producer alone, CPU s / 1000 batches",
        ),
    ] {
        let Some(m) = median_of(&runs, key) else {
            continue;
        };
        let shown = if key.ends_with("per_s") {
            format!("{m:.0}")
        } else {
            format!("{m:.3}")
        };
        rep.rows.push(("producer".into(), what.into(), shown));
        out.insert(key.into(), json!(m));
    }
    if let Some(t) = throughput {
        rep.rows.push((
            "producer".into(),
            "end to end (this run's throughput), batches/s".into(),
            format!("{t:.0}"),
        ));
        out.insert("end_to_end_batches_per_s".into(), json!(t));
    }
    rep.results.insert("producer".into(), Value::Object(out));
    Ok(())
}

/// The median of field `key` over `runs` (None when no run has it).
fn median_of(runs: &[Value], key: &str) -> Option<f64> {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Throughput by batch size, and its chart.
async fn sweep(args: &Args, data: &std::path::Path, rep: &mut Report) -> anyhow::Result<()> {
    let mut points = Vec::new();
    let mut sweep = serde_json::Map::new();
    for size in [1usize, 10, 100, 1000] {
        let posts = if size == 1 {
            args.posts / 5
        } else {
            args.posts
        };
        eprintln!("bench: sweep, batches of {size} ({posts} posts)");
        let file = bench::posts_file(data, posts)?;
        let r = bench::end_to_end(&file, size, "post-stats", &[], args.prefetch).await?;
        rep.rows.push((
            "sweep".into(),
            format!("records/s, batches of {size}"),
            format!("{:.0}", r.records_per_s()),
        ));
        points.push((size, r.records_per_s()));
        sweep.insert(size.to_string(), r.to_json());
    }
    let raw_records = rep
        .results
        .get("raw")
        .and_then(|r| r["messages_per_s"].as_f64())
        .map(|m| m * 10.0);
    bench::sweep_chart(&args.out.join("sweep.svg"), &points, raw_records)?;
    rep.results.insert("sweep".into(), Value::Object(sweep));
    Ok(())
}

/// The producer's memory on a million records.
async fn memory(data: &std::path::Path, rep: &mut Report) -> anyhow::Result<()> {
    eprintln!("bench: producer memory enqueuing 1,000,000 records from a file");
    let file = bench::posts_file(data, 1_000_000)?;
    let (stats, secs) = bench::producer_memory(&file).await?;
    rep.rows.push((
        "memory".into(),
        "producer peak RSS MiB, 1,000,000 records".into(),
        format!("{:.1}", stats.peak_rss_mib),
    ));
    rep.results.insert(
        "memory".into(),
        json!({"records": 1_000_000, "producer_peak_rss_mib": stats.peak_rss_mib, "seconds": secs}),
    );
    Ok(())
}

/// Celery and Dramatiq on the same workload, and Celery's producer calling taskmill's worker
/// through its Celery ingress (`taskmill-celery`).
async fn peers(
    args: &Args,
    data: &std::path::Path,
    rep: &mut Report,
    throughput: Option<f64>,
) -> anyhow::Result<()> {
    match bench::peers_venv(data) {
        Err(e) => {
            eprintln!("bench: peers SKIPPED: {e:#}");
            rep.rows.push((
                "peers".into(),
                "Celery, Dramatiq".into(),
                format!("skipped: {e}"),
            ));
            rep.results
                .insert("peers".into(), json!({"skipped": e.to_string()}));
        }
        Ok(python) => {
            let file = bench::posts_file(data, args.posts)?;
            let mut peers = serde_json::Map::new();
            for which in ["celery", "dramatiq", "taskmill-celery"] {
                eprintln!(
                    "bench: peers, {which} ({} posts, batches of 10)",
                    args.posts
                );
                // A peer that fails (its own bug, a package that changed) is reported, and the
                // figures of every other workload are still printed.
                let mut j = match bench::peer(&python, which, &file, 10).await {
                    Ok(j) => j,
                    Err(e) => {
                        eprintln!("bench: {which} FAILED: {e:#}");
                        rep.rows.push((
                            "peers".into(),
                            format!("{which} tasks (batches)/s"),
                            format!("failed: {e}"),
                        ));
                        peers.insert(which.into(), json!({"failed": e.to_string()}));
                        continue;
                    }
                };
                let rate = j["tasks_per_s"].as_f64().unwrap_or(f64::NAN);
                rep.rows.push((
                    "peers".into(),
                    format!("{which} tasks (batches)/s"),
                    format!("{rate:.0}"),
                ));
                if let Some(t) = throughput {
                    j["taskmill_over_peer"] = json!(t / rate);
                    rep.rows.push((
                        "peers".into(),
                        format!("taskmill / {which}"),
                        format!("{:.1}", t / rate),
                    ));
                }
                peers.insert(which.into(), j);
            }
            // The workers alone, on the same Celery messages: Celery's prefork workers against
            // taskmill's worker through its Celery ingress.
            for which in ["celery", "taskmill-celery"] {
                eprintln!("bench: peers, {which} workers alone (a preloaded queue)");
                match bench::peer_drain(&python, which, &file, 10).await {
                    Ok(j) => {
                        let rate = j["tasks_per_s"].as_f64().unwrap_or(f64::NAN);
                        rep.rows.push((
                            "peers".into(),
                            format!("{which} worker alone, tasks (batches)/s"),
                            format!("{rate:.0}"),
                        ));
                        peers.insert(format!("{which}-drain"), j);
                    }
                    Err(e) => {
                        eprintln!("bench: {which} drain FAILED: {e:#}");
                        rep.rows.push((
                            "peers".into(),
                            format!("{which} worker alone, tasks (batches)/s"),
                            format!("failed: {e}"),
                        ));
                    }
                }
            }
            rep.results.insert("peers".into(), Value::Object(peers));
        }
    }
    Ok(())
}
