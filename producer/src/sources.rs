//! Record sources: files (JSON Lines, a JSON array, or one JSON document), stdin, and HTTP.
//!
//! Every source streams its records into one bounded channel, so memory stays flat whatever
//! the input size: a file is read a line (or an array element) at a time, and HTTP fetches run
//! with bounded concurrency. What cannot be read is counted and described in [`Problems`].

use std::{
    io::{BufRead, BufReader, Read},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::debug;

/// How many problems are kept word for word; the rest are only counted.
pub const MAX_PROBLEMS: usize = 20;

/// A pretty-printed document larger than this is not read as one.
const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;

/// What went wrong while reading, shared by every source.
#[derive(Debug, Default, Clone)]
pub struct Problems {
    /// Records skipped (malformed JSON, a response that is not JSON, a record too large).
    pub records_invalid: u64,
    /// Sources that could not be read at all (unreachable URL, missing file).
    pub sources_failed: u64,
    /// The first [`MAX_PROBLEMS`] problems, each with its source (and line).
    pub samples: Vec<String>,
    /// Problems beyond the samples.
    pub more: u64,
}

/// A handle to the shared [`Problems`].
#[derive(Debug, Default, Clone)]
pub struct ProblemLog(Arc<Mutex<Problems>>);

impl ProblemLog {
    fn note(&self, text: String, invalid: u64, failed: u64) {
        debug!("{text}");
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.records_invalid += invalid;
        p.sources_failed += failed;
        if p.samples.len() < MAX_PROBLEMS {
            p.samples.push(text);
        } else {
            p.more += 1;
        }
    }
    /// A record was skipped.
    pub fn invalid(&self, text: String) {
        self.note(text, 1, 0);
    }
    /// A whole source failed.
    pub fn failed(&self, text: String) {
        self.note(text, 0, 1);
    }
    /// A copy of what was noted so far.
    pub fn snapshot(&self) -> Problems {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Records travel in chunks of this many, so that the channel wakes its reader once a chunk
/// rather than once a record.
pub const CHUNK: usize = 256;

/// Collects records into chunks and sends full chunks (blocking; for reader threads).
struct Chunker<'a> {
    tx: &'a mpsc::Sender<Vec<Value>>,
    buf: Vec<Value>,
}

impl<'a> Chunker<'a> {
    fn new(tx: &'a mpsc::Sender<Vec<Value>>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }
    /// Adds a record; false when the receiver is gone.
    fn push(&mut self, v: Value) -> bool {
        self.buf.push(v);
        self.buf.len() < CHUNK || self.flush()
    }
    /// Sends what is collected; false when the receiver is gone.
    fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).is_ok()
    }
    /// Sends a parsed document's records: an array gives its elements, anything else one.
    fn emit(&mut self, v: Value) -> bool {
        match v {
            Value::Array(items) => items.into_iter().all(|i| self.push(i)),
            other => self.push(other),
        }
    }
}

/// Streams the elements of a top-level JSON array without holding the array.
struct ArrayStreamer<'a, 'b> {
    out: &'a mut Chunker<'b>,
    /// Elements sent, kept when a later element turns out malformed.
    sent: &'a mut u64,
}

impl<'de> Visitor<'de> for ArrayStreamer<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Value>()? {
            if !self.out.push(v) {
                return Err(A::Error::custom("publishing stopped"));
            }
            *self.sent += 1;
        }
        Ok(())
    }
}

/// Reads records from `reader` (blocking; run it on a blocking thread). `source` names it in
/// problems. Returns the number of records sent.
pub fn read_records(
    reader: impl Read,
    source: &str,
    tx: &mpsc::Sender<Vec<Value>>,
    problems: &ProblemLog,
) -> u64 {
    let mut out = Chunker::new(tx);
    let n = read_into(reader, source, &mut out, problems);
    out.flush();
    n
}

fn read_into(reader: impl Read, source: &str, out: &mut Chunker<'_>, problems: &ProblemLog) -> u64 {
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    // Find the first significant byte: '[' means one array, anything else JSON Lines.
    let first = loop {
        match reader.fill_buf() {
            Ok([]) => return 0,
            Ok(buf) => {
                let ws = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
                if ws < buf.len() {
                    let first = buf[ws];
                    reader.consume(ws);
                    break first;
                }
                let n = buf.len();
                reader.consume(n);
            }
            Err(e) => {
                problems.failed(format!("{source}: cannot read: {e}"));
                return 0;
            }
        }
    };
    if first == b'[' {
        let mut de = serde_json::Deserializer::from_reader(reader);
        let mut sent = 0;
        match de.deserialize_seq(ArrayStreamer {
            out,
            sent: &mut sent,
        }) {
            Ok(()) => {
                if de.end().is_err() {
                    problems.invalid(format!(
                        "{source}: content after the JSON array was ignored"
                    ));
                }
                sent
            }
            Err(e) => {
                problems.invalid(format!(
                    "{source}:{}: malformed JSON array ({e}); the records before it were kept",
                    e.line()
                ));
                sent
            }
        }
    } else {
        read_lines(reader, source, out, problems)
    }
}

fn read_lines(
    mut reader: impl BufRead,
    source: &str,
    out: &mut Chunker<'_>,
    problems: &ProblemLog,
) -> u64 {
    let mut sent = 0u64;
    let mut line_no = 0u64;
    let mut raw = Vec::new();
    // A pretty-printed document spans lines: it starts with a line that is just "{" or "[".
    let mut pending = String::new();
    let mut pending_start = 0u64;
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                problems.failed(format!("{source}:{line_no}: cannot read: {e}"));
                break;
            }
        }
        line_no += 1;
        let line = match std::str::from_utf8(&raw) {
            Ok(l) => l,
            Err(_) => {
                problems.invalid(format!("{source}:{line_no}: not UTF-8 text"));
                continue;
            }
        };
        if pending.is_empty() {
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            if t == "{" || t == "[" {
                pending_start = line_no;
                pending.push_str(line);
                continue;
            }
            match serde_json::from_str::<Value>(t) {
                Ok(v) => {
                    let n = if let Value::Array(a) = &v {
                        a.len() as u64
                    } else {
                        1
                    };
                    if !out.emit(v) {
                        return sent;
                    }
                    sent += n;
                }
                Err(e) => problems.invalid(format!("{source}:{line_no}: malformed JSON: {e}")),
            }
        } else {
            pending.push_str(line);
            match serde_json::from_str::<Value>(&pending) {
                Ok(v) => {
                    let n = if let Value::Array(a) = &v {
                        a.len() as u64
                    } else {
                        1
                    };
                    pending.clear();
                    if !out.emit(v) {
                        return sent;
                    }
                    sent += n;
                }
                Err(e) if e.is_eof() && pending.len() < MAX_DOCUMENT_BYTES => {}
                Err(e) => {
                    problems.invalid(format!(
                        "{source}:{pending_start}: malformed JSON document: {e}"
                    ));
                    pending.clear();
                }
            }
        }
    }
    if !pending.is_empty() {
        problems.invalid(format!(
            "{source}:{pending_start}: JSON document cut short at the end of the input"
        ));
    }
    sent
}

/// HTTP fetching settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Attempts after the first, for connection errors, timeouts, 429 and 5xx.
    pub retries: u32,
    /// Timeout of one request.
    pub timeout: Duration,
    /// First backoff delay; doubles with each retry (with jitter).
    pub backoff: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            concurrency: 32,
            retries: 3,
            timeout: Duration::from_secs(30),
            backoff: Duration::from_millis(200),
        }
    }
}

enum FetchError {
    /// The URL gave no usable answer; the whole source failed.
    Failed(String),
    /// It answered, but not with JSON: one invalid record.
    NotJson(String),
}

async fn fetch_once(client: &reqwest::Client, url: &str) -> Result<Value, (bool, FetchError)> {
    let resp = client.get(url).send().await.map_err(|e| {
        (
            true,
            FetchError::Failed(format!("{url}: {}", error_chain(&e))),
        )
    })?;
    let status = resp.status();
    if !status.is_success() {
        let retry = status.as_u16() == 429 || status.is_server_error();
        return Err((retry, FetchError::Failed(format!("{url}: HTTP {status}"))));
    }
    let body = resp.bytes().await.map_err(|e| {
        (
            true,
            FetchError::Failed(format!("{url}: {}", error_chain(&e))),
        )
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        (
            false,
            FetchError::NotJson(format!("{url}: response is not JSON: {e}")),
        )
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    opts: &HttpOptions,
) -> Result<Value, FetchError> {
    let mut delay = opts.backoff;
    let mut attempt = 0;
    loop {
        match fetch_once(client, url).await {
            Ok(v) => return Ok(v),
            Err((true, e)) if attempt < opts.retries => {
                let (FetchError::Failed(m) | FetchError::NotJson(m)) = &e;
                debug!("{m}; retrying in {delay:?}");
                let jitter = rand::random_range(0.5..1.5);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
            Err((retryable, e)) => {
                return Err(match e {
                    FetchError::Failed(m) if retryable => {
                        FetchError::Failed(format!("{m} (gave up after {} attempts)", attempt + 1))
                    }
                    other => other,
                })
            }
        }
    }
}

/// Fetches every URL with bounded concurrency and sends the records of each response.
pub async fn fetch_all(
    urls: Box<dyn Iterator<Item = String> + Send>,
    opts: &HttpOptions,
    tx: mpsc::Sender<Vec<Value>>,
    problems: ProblemLog,
) -> Result<(), reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(opts.concurrency)
        .user_agent(concat!("taskmill/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut results = futures::stream::iter(urls)
        .map(|url| {
            let client = client.clone();
            let opts = opts.clone();
            async move { (fetch(&client, &url, &opts).await, url) }
        })
        .buffer_unordered(opts.concurrency.max(1));
    while let Some((res, url)) = results.next().await {
        match res {
            Ok(Value::Array(items)) => {
                if tx.send(items).await.is_err() {
                    return Ok(());
                }
            }
            Ok(Value::Object(o)) => {
                if tx.send(vec![Value::Object(o)]).await.is_err() {
                    return Ok(());
                }
            }
            Ok(_) => problems.invalid(format!(
                "{url}: response is JSON but neither an object nor an array"
            )),
            Err(FetchError::Failed(m)) => problems.failed(m),
            Err(FetchError::NotJson(m)) => problems.invalid(m),
        }
    }
    Ok(())
}

/// Expands `--url-template` over `--ids A-B`: `{id}` becomes each number.
pub fn expand_template(template: String, ids: (u64, u64)) -> impl Iterator<Item = String> {
    (ids.0..=ids.1).map(move |i| template.replace("{id}", &i.to_string()))
}

/// Parses `A-B` (inclusive, A ≤ B).
pub fn parse_ids(s: &str) -> Result<(u64, u64), String> {
    let err = || format!("--ids {s:?} is not a range like 1-100");
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| err())?,
        b.trim().parse().map_err(|_| err())?,
    );
    if a > b {
        return Err(format!(
            "--ids {s:?}: the first number is larger than the second"
        ));
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &str) -> (Vec<Value>, Problems) {
        let (tx, mut rx) = mpsc::channel(1000);
        let problems = ProblemLog::default();
        let n = read_records(input.as_bytes(), "in", &tx, &problems);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(v) = rx.try_recv() {
            out.extend(v);
        }
        assert_eq!(n as usize, out.len());
        (out, problems.snapshot())
    }

    #[test]
    fn json_lines_with_a_bad_line() {
        let (recs, p) = read("{\"a\":1}\n\n{\"a\":\n{\"a\":3}\n");
        assert_eq!(recs.len(), 2);
        assert_eq!(p.records_invalid, 1);
        assert!(
            p.samples[0].starts_with("in:3: malformed JSON"),
            "{:?}",
            p.samples
        );
    }

    #[test]
    fn array_streams() {
        let (recs, p) = read("  [ {\"a\":1}, {\"a\":2}, 3 ]\n");
        assert_eq!(recs.len(), 3);
        assert_eq!(p.records_invalid, 0);
    }

    #[test]
    fn broken_array_keeps_what_came_before() {
        let (recs, p) = read("[{\"a\":1},\n{\"a\":2},\n{oops}]");
        assert_eq!(recs.len(), 2);
        assert_eq!(p.records_invalid, 1);
        assert!(p.samples[0].starts_with("in:3:"), "{:?}", p.samples);
    }

    #[test]
    fn pretty_object_and_truncation() {
        let (recs, p) = read("{\n  \"title\": \"x\",\n  \"body\": \"y\"\n}\n{\n \"a\": 1\n");
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["title"], "x");
        assert_eq!(p.records_invalid, 1);
        assert!(p.samples[0].contains("cut short"), "{:?}", p.samples);
    }

    #[test]
    fn not_utf8() {
        let (tx, _rx) = mpsc::channel(10);
        let problems = ProblemLog::default();
        read_records(&b"{\"a\":1}\n\xff\xfe\n"[..], "f", &tx, &problems);
        assert_eq!(problems.snapshot().records_invalid, 1);
    }

    #[test]
    fn ids_and_templates() {
        assert_eq!(parse_ids("1-3"), Ok((1, 3)));
        assert!(parse_ids("3-1").is_err());
        assert!(parse_ids("x").is_err());
        let urls: Vec<String> = expand_template("http://h/p/{id}".into(), (1, 2)).collect();
        assert_eq!(urls, ["http://h/p/1", "http://h/p/2"]);
    }
}
