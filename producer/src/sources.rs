//! Record sources: files (JSON Lines, a JSON array, or one JSON document), stdin, and HTTP.
//!
//! Every source streams its records into one bounded channel, so memory stays flat whatever
//! the input size: a file or an HTTP response is read a line (or an array element) at a time,
//! each record capped (`--max-record-bytes`), on a blocking thread; HTTP fetches run with
//! bounded concurrency. What cannot be read is counted and described in [`Problems`].

use std::{
    io::{BufRead, BufReader, Read},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::StreamExt;
use serde_json::Value;
pub use taskmill_client::problems::{ProblemLog, Problems, MAX_PROBLEMS};
use taskmill_common::envelope::Record;
use tokio::sync::mpsc;
use tracing::debug;

/// Records travel in chunks of this many, so that the channel wakes its reader once a chunk
/// rather than once a record.
pub const CHUNK: usize = 256;

/// Collects records into chunks and sends full chunks (blocking; for reader threads).
struct Chunker<'a> {
    tx: &'a mpsc::Sender<Vec<Record>>,
    buf: Vec<Record>,
}

impl<'a> Chunker<'a> {
    fn new(tx: &'a mpsc::Sender<Vec<Record>>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }
    /// Adds a record; false when the receiver is gone.
    fn push(&mut self, r: Record) -> bool {
        self.buf.push(r);
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
    /// How many it sent, or None when the receiver is gone.
    fn emit(&mut self, v: Value) -> Option<u64> {
        match v {
            Value::Array(items) => {
                let all = items.iter().all(|i| self.push(Record::from_value(i)));
                all.then_some(items.len() as u64)
            }
            other => self.push(Record::from_value(&other)).then_some(1),
        }
    }
}

/// Default of `--max-record-bytes`: a record, a line or a document larger than this is
/// skipped and reported, so that memory stays flat whatever the input.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;

/// What reading one line or array element gave.
enum Piece {
    /// The bytes are in the buffer.
    Bytes,
    /// Longer than the limit: skipped, with its full length.
    TooLarge(u64),
    /// The input ended before anything was read.
    Eof,
}

/// A buffered input read a line or an array element at a time, never holding more than the
/// record limit; it tells when it has nothing more buffered (the next read may wait), so that
/// what was read reaches the batcher at once from a slow stream such as stdin.
struct Input<R> {
    reader: BufReader<R>,
    cap: usize,
}

impl<R: Read> Input<R> {
    fn idle(&self) -> bool {
        self.reader.buffer().is_empty()
    }

    /// The next line (without its end) into `buf`, or how long it was when over the limit.
    fn line(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Piece> {
        buf.clear();
        let mut len = 0u64;
        loop {
            let avail = self.reader.fill_buf()?;
            if avail.is_empty() {
                return Ok(if len == 0 {
                    Piece::Eof
                } else if len as usize > self.cap {
                    Piece::TooLarge(len)
                } else {
                    Piece::Bytes
                });
            }
            let (chunk, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (&avail[..i], Some(i + 1)),
                None => (avail, None),
            };
            len += chunk.len() as u64;
            if len as usize <= self.cap {
                buf.extend_from_slice(chunk);
            } else {
                buf.clear();
            }
            let used = done.unwrap_or(chunk.len());
            self.reader.consume(used);
            if done.is_some() {
                return Ok(if len as usize > self.cap {
                    Piece::TooLarge(len)
                } else {
                    Piece::Bytes
                });
            }
        }
    }

    /// Skips white space; the next byte, not consumed (None at the end of the input).
    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let ws = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
            if ws < buf.len() {
                let b = buf[ws];
                self.reader.consume(ws);
                return Ok(Some(b));
            }
            let n = buf.len();
            self.reader.consume(n);
        }
    }

    /// The bytes of one array element, up to (not including) the `,` or `]` that ends it at
    /// depth 0. Strings and nesting are followed, nothing is parsed.
    fn element(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Piece> {
        buf.clear();
        let (mut depth, mut in_string, mut escape) = (0u64, false, false);
        let mut len = 0u64;
        loop {
            let avail = self.reader.fill_buf()?;
            if avail.is_empty() {
                return Ok(Piece::Eof);
            }
            let mut end = None;
            for (i, &b) in avail.iter().enumerate() {
                if in_string {
                    if escape {
                        escape = false;
                    } else if b == b'\\' {
                        escape = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    b']' | b',' | b'}' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let take = end.unwrap_or(avail.len());
            len += take as u64;
            if len as usize <= self.cap {
                buf.extend_from_slice(&avail[..take]);
            } else {
                buf.clear();
            }
            self.reader.consume(take);
            if end.is_some() {
                return Ok(if len as usize > self.cap {
                    Piece::TooLarge(len)
                } else {
                    Piece::Bytes
                });
            }
        }
    }
}

/// Reads records from `reader` (blocking; run it on a blocking thread). `source` names it in
/// problems; a record, line or document over `max_record_bytes` is skipped and reported.
/// Returns the number of records sent.
pub fn read_records(
    reader: impl Read,
    source: &str,
    max_record_bytes: usize,
    tx: &mpsc::Sender<Vec<Record>>,
    problems: &ProblemLog,
) -> u64 {
    let mut out = Chunker::new(tx);
    let mut input = Input {
        reader: BufReader::with_capacity(256 * 1024, reader),
        cap: max_record_bytes.max(1),
    };
    // The first significant byte: '[' means one array, anything else JSON Lines.
    let n = match input.peek() {
        Ok(None) => 0,
        Ok(Some(b'[')) => read_array(&mut input, source, &mut out, problems),
        Ok(Some(_)) => read_lines(&mut input, source, &mut out, problems),
        Err(e) => {
            problems.failed(format!("{source}: cannot read: {e}"));
            0
        }
    };
    out.flush();
    n
}

fn too_large(source: &str, at: &str, len: u64, cap: usize) -> String {
    format!("{source}:{at}: {len} bytes exceed the record limit of {cap} bytes (--max-record-bytes); skipped")
}

/// Streams the elements of a top-level JSON array, one at a time.
fn read_array<R: Read>(
    input: &mut Input<R>,
    source: &str,
    out: &mut Chunker<'_>,
    problems: &ProblemLog,
) -> u64 {
    input.reader.consume(1); // the '['
    let mut sent = 0u64;
    let mut index = 0u64;
    let mut buf = Vec::new();
    let malformed = |index: u64, what: String| {
        problems.invalid(format!(
            "{source}: malformed JSON array at element {index}: {what}; the records before it were kept"
        ))
    };
    if let Ok(Some(b']')) = input.peek() {
        input.reader.consume(1);
        return 0;
    }
    loop {
        match input.element(&mut buf) {
            Err(e) => {
                problems.failed(format!("{source}: cannot read: {e}"));
                return sent;
            }
            Ok(Piece::Eof) => {
                malformed(index, "the input ended inside the array".into());
                return sent;
            }
            Ok(Piece::TooLarge(len)) => problems.invalid(too_large(
                source,
                &format!("element {index}"),
                len,
                input.cap,
            )),
            Ok(Piece::Bytes) => match Record::from_json(&buf) {
                Ok(r) => {
                    if !out.push(r) {
                        return sent;
                    }
                    sent += 1;
                }
                Err(e) => {
                    malformed(index, e.to_string());
                    return sent;
                }
            },
        }
        index += 1;
        match input.peek() {
            Ok(Some(b',')) => input.reader.consume(1),
            Ok(Some(b']')) => {
                input.reader.consume(1);
                if let Ok(Some(_)) = input.peek() {
                    problems.invalid(format!(
                        "{source}: content after the JSON array was ignored"
                    ));
                }
                return sent;
            }
            Ok(Some(b)) => {
                malformed(
                    index,
                    format!("unexpected {:?} after an element", b as char),
                );
                return sent;
            }
            Ok(None) => {
                malformed(index, "the input ended inside the array".into());
                return sent;
            }
            Err(e) => {
                problems.failed(format!("{source}: cannot read: {e}"));
                return sent;
            }
        }
        if input.idle() && !out.flush() {
            return sent;
        }
    }
}

/// What a line gave: one record, or a parsed document (an array gives its elements).
enum LineRead {
    Record(Record),
    Document(Value),
}

/// A pretty-printed document being gathered: it starts with a line that is just `{` or `[`.
#[derive(Default)]
struct Document {
    text: String,
    start: u64,
}

impl Document {
    /// One line of JSON Lines input: a record (or an array of them), or nothing when the line
    /// is blank, malformed (reported) or part of a document still being gathered.
    fn line(
        &mut self,
        line: &str,
        at: (&str, u64),
        cap: usize,
        problems: &ProblemLog,
    ) -> Option<LineRead> {
        let (source, line_no) = at;
        if self.text.is_empty() {
            let t = line.trim();
            if t.is_empty() {
                return None;
            }
            if t == "{" || t == "[" {
                self.start = line_no;
                self.text.push_str(line);
                self.text.push('\n');
                return None;
            }
            let malformed =
                |e| problems.invalid(format!("{source}:{line_no}: malformed JSON: {e}"));
            // The common case, a record a line, goes straight to MessagePack; a line that is
            // an array of records is parsed to be split.
            if t.starts_with('[') {
                return serde_json::from_str::<Value>(t)
                    .map_err(malformed)
                    .ok()
                    .map(LineRead::Document);
            }
            return Record::from_json_str(t)
                .map_err(malformed)
                .ok()
                .map(LineRead::Record);
        }
        self.text.push_str(line);
        self.text.push('\n');
        match serde_json::from_str::<Value>(&self.text) {
            Ok(v) => {
                self.text.clear();
                Some(LineRead::Document(v))
            }
            Err(e) if e.is_eof() && self.text.len() <= cap => None,
            Err(e) => {
                let what = if e.is_eof() {
                    format!(
                        "JSON document over the record limit of {cap} bytes (--max-record-bytes); skipped"
                    )
                } else {
                    format!("malformed JSON document: {e}")
                };
                problems.invalid(format!("{source}:{}: {what}", self.start));
                self.text.clear();
                None
            }
        }
    }

    /// A line too long to read cut the document being gathered: drop it, say so.
    fn cut(&mut self, source: &str, problems: &ProblemLog) {
        if !self.text.is_empty() {
            self.text.clear();
            problems.invalid(format!(
                "{source}:{}: JSON document cut by an oversized line; skipped",
                self.start
            ));
        }
    }
}

fn read_lines<R: Read>(
    input: &mut Input<R>,
    source: &str,
    out: &mut Chunker<'_>,
    problems: &ProblemLog,
) -> u64 {
    let mut sent = 0u64;
    let mut line_no = 0u64;
    let mut raw = Vec::new();
    let mut doc = Document::default();
    loop {
        let piece = match input.line(&mut raw) {
            Ok(p) => p,
            Err(e) => {
                problems.failed(format!("{source}:{line_no}: cannot read: {e}"));
                break;
            }
        };
        line_no += 1;
        match piece {
            Piece::Eof => break,
            Piece::TooLarge(len) => {
                let at = format!("line {line_no}");
                problems.invalid(too_large(source, &at, len, input.cap));
                doc.cut(source, problems);
                continue;
            }
            Piece::Bytes => {}
        }
        let Ok(line) = std::str::from_utf8(&raw) else {
            problems.invalid(format!("{source}:{line_no}: not UTF-8 text"));
            continue;
        };
        match doc.line(line, (source, line_no), input.cap, problems) {
            Some(LineRead::Record(r)) => {
                if !out.push(r) {
                    return sent;
                }
                sent += 1;
            }
            Some(LineRead::Document(v)) => {
                let Some(n) = out.emit(v) else {
                    return sent;
                };
                sent += n;
            }
            None => {}
        }
        if input.idle() && !out.flush() {
            return sent;
        }
    }
    if !doc.text.is_empty() {
        problems.invalid(format!(
            "{source}:{}: JSON document cut short at the end of the input",
            doc.start
        ));
    }
    sent
}

/// Which HTTP redirects a source follows (`--follow-redirects`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Redirects {
    /// None: a redirect is a failed source, naming where it pointed.
    None,
    /// Only to the same scheme, host and port as the URL given (the default): a source cannot
    /// send the producer to another machine, such as a service on the producer's network.
    #[default]
    SameHost,
    /// To any host (at most 10 hops).
    Any,
}

/// HTTP fetching settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Attempts after the first, for connection errors, timeouts, 429 and 5xx.
    pub retries: u32,
    /// Timeout of one request, its body included.
    pub timeout: Duration,
    /// First backoff delay; doubles with each retry (with jitter).
    pub backoff: Duration,
    /// A record (an array element, a line, a document) larger than this is skipped unread.
    pub max_record_bytes: usize,
    /// A response is cut after this many bytes (the records before are kept); None: no cap.
    pub max_response_bytes: Option<u64>,
    /// Which redirects are followed.
    pub redirects: Redirects,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            concurrency: 32,
            retries: 3,
            timeout: Duration::from_secs(30),
            backoff: Duration::from_millis(200),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            max_response_bytes: None,
            redirects: Redirects::SameHost,
        }
    }
}

/// The reader's buffer for a response body (a file's is larger: it is read for longer).
const HTTP_READ_BUFFER: usize = 32 * 1024;

/// Chunks of a body in flight from the async side to the reader thread, per response.
const HTTP_CHUNKS_IN_FLIGHT: usize = 2;

/// The request with its status checked: Err((retryable, message)).
async fn open(
    client: &reqwest::Client,
    url: &str,
    opts: &HttpOptions,
) -> Result<reqwest::Response, (bool, String)> {
    let resp = client.get(url).send().await.map_err(|e| {
        // A refused redirect is the source's answer: trying again cannot help.
        (!e.is_redirect(), format!("{url}: {}", error_chain(&e)))
    })?;
    let source = named(url, &resp);
    let status = resp.status();
    if status.is_redirection() {
        let to = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(|l| taskmill_common::envelope::bounded(l, 300).into_owned())
            .unwrap_or_default();
        return Err((
            false,
            format!("{source}: HTTP {status} to {to:?}, not followed (--follow-redirects)"),
        ));
    }
    if !status.is_success() {
        let retry = status.as_u16() == 429 || status.is_server_error();
        return Err((retry, format!("{source}: HTTP {status}")));
    }
    if let (Some(cap), Some(len)) = (opts.max_response_bytes, resp.content_length()) {
        if len > cap {
            return Err((
                false,
                format!("{source}: the response ({len} bytes) is larger than --max-response-bytes {cap}"),
            ));
        }
    }
    Ok(resp)
}

/// The URL as problems name it: with where it was redirected to, if it was.
fn named(url: &str, resp: &reqwest::Response) -> String {
    if resp.url().as_str() == url {
        url.to_string()
    } else {
        format!("{url} (redirected to {})", resp.url())
    }
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

/// A response body as a blocking reader: its chunks come from the async side through a
/// small bounded channel, so a response holds a few chunks and the reader's buffer at most,
/// whatever its size.
struct BodyReader {
    rx: mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.cur = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Reads one response's records (blocking; on a blocking thread): an array streams its
/// elements like a file's; an object body is one record (a body of several objects, one a
/// line, is JSON Lines); anything else is not JSON. Each record is capped like a file's.
fn read_response(
    reader: impl Read,
    source: &str,
    cap: usize,
    tx: &mpsc::Sender<Vec<Record>>,
    problems: &ProblemLog,
) -> u64 {
    let mut out = Chunker::new(tx);
    let cap = cap.max(1);
    let mut input = Input {
        reader: BufReader::with_capacity(HTTP_READ_BUFFER, reader),
        cap,
    };
    let n = match input.peek() {
        Ok(Some(b'[')) => read_array(&mut input, source, &mut out, problems),
        Ok(Some(b'{')) => read_objects(&mut input, source, &mut out, problems),
        Ok(Some(b)) => {
            problems.invalid(format!(
                "{source}: response is not JSON: it starts with {:?}, not an object or an array",
                b as char
            ));
            0
        }
        Ok(None) => {
            problems.invalid(format!("{source}: response is not JSON: it is empty"));
            0
        }
        Err(e) => {
            problems.failed(format!("{source}: cannot read: {e}"));
            0
        }
    };
    out.flush();
    n
}

/// A body that starts with `{`: when it fits in the record limit, parsed whole as one or
/// more JSON values (an object in any layout, or JSON Lines); when longer, read as JSON Lines
/// a line at a time (each line capped), never held.
fn read_objects<R: Read>(
    input: &mut Input<R>,
    source: &str,
    out: &mut Chunker<'_>,
    problems: &ProblemLog,
) -> u64 {
    let cap = input.cap;
    let mut head = Vec::new();
    if let Err(e) = (&mut input.reader)
        .take(cap as u64 + 1)
        .read_to_end(&mut head)
    {
        problems.failed(format!("{source}: cannot read: {e}"));
        return 0;
    }
    if head.len() > cap {
        let mut lines = Input {
            reader: BufReader::with_capacity(
                HTTP_READ_BUFFER,
                std::io::Cursor::new(head).chain(&mut input.reader),
            ),
            cap,
        };
        return read_lines(&mut lines, source, out, problems);
    }
    let mut sent = 0u64;
    for (i, v) in serde_json::Deserializer::from_slice(&head)
        .into_iter::<Value>()
        .enumerate()
    {
        match v {
            Ok(v @ (Value::Object(_) | Value::Array(_))) => {
                let Some(n) = out.emit(v) else {
                    return sent;
                };
                sent += n;
            }
            Ok(_) => problems.invalid(format!(
                "{source}: value {i} is JSON but neither an object nor an array; skipped"
            )),
            Err(e) => {
                let what = if i == 0 {
                    "response is not JSON"
                } else {
                    "malformed JSON"
                };
                problems.invalid(format!(
                    "{source}: {what}: {e}; the records before it were kept"
                ));
                return sent;
            }
        }
    }
    sent
}

/// Fetches one URL (retrying what may pass) and streams its records.
async fn fetch(
    client: &reqwest::Client,
    url: String,
    opts: &HttpOptions,
    tx: mpsc::Sender<Vec<Record>>,
    problems: ProblemLog,
    tally: &Tally,
) {
    let mut backoff = taskmill_common::Backoff::new(opts.backoff, Duration::from_secs(10));
    let mut attempt = 0;
    let resp = loop {
        match open(client, &url, opts).await {
            Ok(resp) => {
                if attempt > 0 {
                    tally.settled();
                }
                break resp;
            }
            Err((true, m)) if attempt < opts.retries => {
                tally.retrying(attempt == 0);
                // Jitter, so that many failing URLs do not come back all at once.
                let delay = backoff.next_delay().mul_f64(rand::random_range(0.5..1.5));
                debug!("{m}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err((retryable, m)) => {
                if attempt > 0 {
                    tally.settled();
                }
                tally.failed(&url);
                if retryable {
                    problems.unreachable(format!("{m} (gave up after {} attempts)", attempt + 1));
                } else {
                    problems.failed(m);
                }
                return;
            }
        }
    };
    let source = named(&url, &resp);
    // The body is parsed on a blocking thread, a chunk at a time, as it arrives.
    let (body_tx, body_rx) = mpsc::channel(HTTP_CHUNKS_IN_FLIGHT);
    let reader = {
        let (source, cap, problems) = (source.clone(), opts.max_record_bytes, problems.clone());
        tokio::task::spawn_blocking(move || {
            let body = BodyReader {
                rx: body_rx,
                cur: bytes::Bytes::new(),
            };
            read_response(body, &source, cap, &tx, &problems)
        })
    };
    let mut resp = resp;
    let mut seen = 0u64;
    loop {
        let item = match resp.chunk().await {
            Ok(Some(chunk)) => {
                seen += chunk.len() as u64;
                match opts.max_response_bytes {
                    Some(cap) if seen > cap => Err(std::io::Error::other(format!(
                        "the response is larger than --max-response-bytes {cap}; cut there"
                    ))),
                    _ => Ok(chunk),
                }
            }
            Ok(None) => break,
            Err(e) => Err(std::io::Error::other(error_chain(&e))),
        };
        let last = item.is_err();
        // The reader stops early (not JSON, or nobody takes records any more): so do we.
        if body_tx.send(item).await.is_err() || last {
            break;
        }
    }
    drop(body_tx);
    if let Err(e) = reader.await {
        problems.failed(format!("{source}: the reader failed: {e}"));
    }
}

/// The redirect policy of `--follow-redirects`.
fn redirect_policy(redirects: Redirects) -> reqwest::redirect::Policy {
    match redirects {
        Redirects::None => reqwest::redirect::Policy::none(),
        Redirects::Any => reqwest::redirect::Policy::limited(10),
        Redirects::SameHost => reqwest::redirect::Policy::custom(|attempt| {
            let first = attempt.previous().first();
            let same = first.is_some_and(|f| {
                f.scheme() == attempt.url().scheme()
                    && f.host_str() == attempt.url().host_str()
                    && f.port_or_known_default() == attempt.url().port_or_known_default()
            });
            if attempt.previous().len() > 10 {
                attempt.error("more than 10 redirects")
            } else if same {
                attempt.follow()
            } else {
                let to = attempt.url().to_string();
                attempt.error(format!(
                    "redirected to another host, {to}: not followed (--follow-redirects any follows it)"
                ))
            }
        }),
    }
}

/// Fetches every URL with bounded concurrency; each response's records stream into `tx` as
/// they are read.
pub async fn fetch_all(
    urls: Box<dyn Iterator<Item = String> + Send>,
    opts: &HttpOptions,
    tx: mpsc::Sender<Vec<Record>>,
    problems: ProblemLog,
) -> Result<(), reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(opts.concurrency)
        .redirect(redirect_policy(opts.redirects))
        .user_agent(concat!("taskmill/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let tally = std::sync::Arc::new(Tally::default());
    let mut fetches = futures::stream::iter(urls)
        .map(|url| {
            let (client, opts, tx, problems, tally) = (
                client.clone(),
                opts.clone(),
                tx.clone(),
                problems.clone(),
                tally.clone(),
            );
            async move {
                // Nobody takes records any more (the enqueue stopped): fetch nothing.
                if !tx.is_closed() {
                    fetch(&client, url, &opts, tx, problems, &tally).await;
                }
                tally.done.fetch_add(1, Ordering::Relaxed);
            }
        })
        .buffer_unordered(opts.concurrency.max(1));
    // On a terminal, a line says how the fetching goes while retries take their time.
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut shown = false;
    loop {
        tokio::select! {
            next = fetches.next() => if next.is_none() { break },
            _ = tick.tick(), if progress => {
                eprint!("\r\x1b[2K{}", tally.line());
                shown = true;
            }
        }
    }
    if shown {
        eprint!("\r\x1b[2K");
    }
    if let Some(summary) = tally.failing_hosts() {
        eprintln!("{summary}");
    }
    Ok(())
}

/// How the fetching goes: for the progress line and the summary of failing hosts.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
    /// URLs waiting for a retry now.
    retrying: AtomicU64,
    /// Failed URLs by host.
    hosts: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    /// A URL waits for a retry (counted once, at its first).
    fn retrying(&self, first: bool) {
        if first {
            self.retrying.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// A URL that waited for a retry has its answer (or gave up).
    fn settled(&self) {
        self.retrying.fetch_sub(1, Ordering::Relaxed);
    }
    fn failed(&self, url: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let host = url::Url::parse(url).ok().map_or_else(
            || "?".to_string(),
            |u| match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => "?".to_string(),
            },
        );
        *self
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(host)
            .or_default() += 1;
    }
    fn line(&self) -> String {
        format!(
            "fetching: {} URLs done, {} failed, {} waiting to retry",
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.retrying.load(Ordering::Relaxed),
        )
    }
    /// `failing hosts: a:80 (12 URLs), b (3 URLs)`, worst first, at most five named.
    fn failing_hosts(&self) -> Option<String> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.is_empty() {
            return None;
        }
        let mut worst: Vec<(&String, &u64)> = hosts.iter().collect();
        worst.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let named: Vec<String> = worst
            .iter()
            .take(5)
            .map(|(h, n)| format!("{h} ({n} URL{})", if **n == 1 { "" } else { "s" }))
            .collect();
        let rest = worst.len().saturating_sub(5);
        let more = if rest > 0 {
            format!(" and {rest} more")
        } else {
            String::new()
        };
        Some(format!("failing hosts: {}{more}", named.join(", ")))
    }
}

/// Checks a `--url` or `--url-template` before anything is fetched: an http(s) URL with a
/// host.
pub fn check_url(raw: &str) -> Result<(), String> {
    let probe = raw.replace("{id}", "0");
    match url::Url::parse(&probe) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "{:?} is not an http:// or https:// URL (scheme {:?})",
            taskmill_common::envelope::bounded(raw, 200),
            u.scheme()
        )),
        Err(e) => Err(format!(
            "{:?} is not a URL: {e}",
            taskmill_common::envelope::bounded(raw, 200)
        )),
    }
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
        let n = read_records(input.as_bytes(), "in", 1000, &tx, &problems);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(v) = rx.try_recv() {
            out.extend(v.iter().map(Record::to_value));
        }
        assert_eq!(n as usize, out.len());
        (out, problems.snapshot())
    }

    use serde_json::json;

    fn read_body(input: &str, cap: usize) -> (Vec<Value>, Problems) {
        let (tx, mut rx) = mpsc::channel(1000);
        let problems = ProblemLog::default();
        let n = read_response(input.as_bytes(), "url", cap, &tx, &problems);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(v) = rx.try_recv() {
            out.extend(v.iter().map(Record::to_value));
        }
        assert_eq!(n as usize, out.len());
        (out, problems.snapshot())
    }

    #[test]
    fn response_bodies_are_read_like_files_with_the_record_cap() {
        // One object, in any layout.
        let (v, p) = read_body("{\"a\":\n 1}", 1000);
        assert_eq!((v, p.records_invalid), (vec![json!({"a": 1})], 0));
        // JSON Lines, short and long (over the cap: read a line at a time).
        let (v, _) = read_body("{\"a\":1}\n{\"a\":2}\n", 1000);
        assert_eq!(v, vec![json!({"a": 1}), json!({"a": 2})]);
        let big = format!("{{\"s\":\"{}\"}}", "x".repeat(50));
        let (v, p) = read_body(&format!("{{\"a\":1}}\n{big}\n{{\"a\":3}}\n"), 40);
        assert_eq!(v, vec![json!({"a": 1}), json!({"a": 3})]);
        assert_eq!(p.records_invalid, 1);
        assert!(
            p.samples[0].contains("--max-record-bytes"),
            "{:?}",
            p.samples
        );
        // An array streams; an element over the cap is skipped unread.
        let (v, p) = read_body(&format!("[{{\"a\":1}}, {big}, {{\"a\":3}}]"), 40);
        assert_eq!(v, vec![json!({"a": 1}), json!({"a": 3})]);
        assert_eq!(p.records_invalid, 1);
        // Not JSON, empty, a scalar.
        for (body, says) in [
            ("<html>", "response is not JSON: it starts with '<'"),
            ("", "response is not JSON: it is empty"),
            ("  42", "not an object or an array"),
        ] {
            let (v, p) = read_body(body, 1000);
            assert!(v.is_empty());
            assert_eq!(p.records_invalid, 1, "{body}");
            assert!(p.samples[0].contains(says), "{:?}", p.samples);
        }
        // A broken object after a good one keeps the good one.
        let (v, p) = read_body("{\"a\":1} {\"a\":", 1000);
        assert_eq!(v, vec![json!({"a": 1})]);
        assert!(
            p.samples[0].contains("the records before it were kept"),
            "{:?}",
            p.samples
        );
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
        assert!(p.samples[0].contains("at element 2"), "{:?}", p.samples);
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
        read_records(&b"{\"a\":1}\n\xff\xfe\n"[..], "f", 1000, &tx, &problems);
        assert_eq!(problems.snapshot().records_invalid, 1);
    }

    #[test]
    fn oversized_lines_and_elements_are_skipped() {
        let big = "x".repeat(5000);
        let (recs, p) = read(&format!("{{\"a\":1}}\n{{\"b\":\"{big}\"}}\n{{\"a\":3}}\n"));
        assert_eq!(recs.len(), 2);
        assert_eq!(p.records_invalid, 1);
        assert!(
            p.samples[0].contains("line 2: 5008 bytes exceed"),
            "{:?}",
            p.samples
        );
        let (recs, p) = read(&format!(
            "[{{\"a\":\"],{{\\\"\"}}, \"{big}\", [1,[2]] , {{\"c\":{{}}}}]"
        ));
        assert_eq!(recs.len(), 3, "{recs:?}");
        assert_eq!(recs[0]["a"], "],{\"");
        assert_eq!(recs[1], serde_json::json!([1, [2]]));
        assert_eq!(p.records_invalid, 1);
        assert!(p.samples[0].contains("element 1"), "{:?}", p.samples);
    }

    #[test]
    fn empty_arrays_and_trailing_content() {
        let (recs, p) = read("[]");
        assert!(recs.is_empty());
        assert_eq!(p.records_invalid, 0);
        let (recs, p) = read("[1, 2] x");
        assert_eq!(recs.len(), 2);
        assert_eq!(p.records_invalid, 1);
        let (recs, p) = read("[1, 2");
        assert_eq!(recs.len(), 1);
        assert!(p.samples[0].contains("ended inside"), "{:?}", p.samples);
    }

    #[test]
    fn ids_and_templates() {
        assert_eq!(parse_ids("1-3"), Ok((1, 3)));
        assert!(parse_ids("3-1").is_err());
        assert!(parse_ids("x").is_err());
        assert!(check_url("http://h/p/{id}").is_ok());
        assert!(check_url("not-a-url").unwrap_err().contains("not a URL"));
        assert!(check_url("ftp://h/x").unwrap_err().contains("scheme"));
        let urls: Vec<String> = expand_template("http://h/p/{id}".into(), (1, 2)).collect();
        assert_eq!(urls, ["http://h/p/1", "http://h/p/2"]);
    }
}
