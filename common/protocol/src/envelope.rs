//! The batch envelope: one AMQP message carries one batch of records.
//!
//! The body is MessagePack with named fields (rmp-serde), so that a field added in a later
//! version is ignored by older readers and the format is readable from any language.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The envelope format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// MIME type of the body, set as the message's `content_type`.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// Default limit on a message body; larger batches are split by the producer and refused by
/// the worker (dead-lettered). RabbitMQ's own limit is far higher, but a message this big
/// already holds a worker's core for too long.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Header that counts attempts: 1 for the first delivery of a batch, +1 for each retry.
pub const HEADER_ATTEMPT: &str = "x-taskmill-attempt";
/// Dead-letter header: the error text.
pub const HEADER_ERROR: &str = "x-taskmill-error";
/// Dead-letter header: the error kind (see `DeadKind`).
pub const HEADER_ERROR_KIND: &str = "x-taskmill-error-kind";
/// Dead-letter header: the work queue the batch came from (full name).
pub const HEADER_ORIGINAL_QUEUE: &str = "x-taskmill-original-queue";
/// Not before this time (ms since the epoch): `enqueue --countdown/--eta`. A worker that
/// meets the batch earlier sends it back to wait in a delay queue.
pub const HEADER_ETA: &str = "x-taskmill-eta-ms";
/// Not after this time (ms since the epoch): `enqueue --expires`. A batch not started by then
/// is dropped unrun and counted in `batches_expired`.
pub const HEADER_EXPIRES: &str = "x-taskmill-expires-ms";
/// The longest a batch may run, in ms: `enqueue --time-limit`. Longer is a transient failure
/// (`time_limit`).
pub const HEADER_TIME_LIMIT: &str = "x-taskmill-time-limit-ms";
/// At most one batch of this job (or of every job with the same rate key) starts per this
/// many ms, across all workers: `enqueue --rate-limit`.
pub const HEADER_RATE_INTERVAL: &str = "x-taskmill-rate-interval-ms";
/// The key whose budget the rate limit shares (`--rate-key`; the job id by default).
pub const HEADER_RATE_KEY: &str = "x-taskmill-rate-key";
/// A control message rather than a batch: `summarize` asks a worker to fold a finished job's
/// results into its summary (sent by the producer when publishing ends, since a job that its
/// last batch did not finish has nobody else to do it). Its message id is `{job}:summary`.
pub const HEADER_CONTROL: &str = "x-taskmill-control";
/// The headers a job's options ride in, set by the producer on every batch: a replayed dead
/// letter keeps them (the job's limits and times still apply), unlike the headers of its
/// attempt and death.
pub const JOB_OPTION_HEADERS: [&str; 5] = [
    HEADER_ETA,
    HEADER_EXPIRES,
    HEADER_TIME_LIMIT,
    HEADER_RATE_INTERVAL,
    HEADER_RATE_KEY,
];
/// When a worker that lacks the batch's task first gave it back (ms since the epoch): it keeps
/// going back while a live worker of its queue serves the task, and the wait is bounded.
pub const HEADER_DEFERRED_SINCE: &str = "x-taskmill-deferred-since-ms";
/// Dead-letter header: when it was dead-lettered, in ms since the epoch.
pub const HEADER_DEAD_AT: &str = "x-taskmill-dead-at-ms";
/// When a worker put the batch into a delay queue, in ms since the epoch: a batch still there
/// long after the queue's TTL was left behind by the broker, and a worker moves it back.
pub const HEADER_DELAYED_AT: &str = "x-taskmill-delayed-at-ms";

/// Longest text taskmill writes into a header or a log field taken from a message (an error
/// text, a task name): a message's headers must fit in one AMQP frame (128 KiB by default).
pub const MAX_HEADER_TEXT: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when it was cut.
pub fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &s[..end]))
}

/// One batch of records for one task, as published by the producer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Format version; a reader refuses versions it does not know.
    pub v: u16,
    /// Job this batch belongs to.
    pub job: String,
    /// Sequence number of the batch within its job, from 0.
    pub batch: u64,
    /// Name of the task that analyses the records.
    pub task: String,
    /// Task parameters, as given with `--param KEY=VALUE`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// The records: arbitrary JSON-like values.
    pub records: Vec<Value>,
    /// When the batch was created, in ms since the epoch (for latency figures).
    pub created_ms: u64,
}

/// Why a message body could not be turned into an envelope.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body is larger than the configured limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Body size in bytes.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The body is not a MessagePack envelope (garbage, a missing field, a wrong type).
    #[error("undecodable message: {0}")]
    Malformed(String),
    /// The envelope was written by a format version this worker does not read.
    #[error("unsupported envelope version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
}

/// The minimal header read first, so that a future version with other fields is reported as
/// such rather than as malformed.
#[derive(Deserialize)]
struct VersionOnly {
    v: u16,
}

impl Envelope {
    /// Message id: stable across redeliveries and retries.
    pub fn message_id(&self) -> String {
        message_id(&self.job, self.batch)
    }
}

/// `"{job}:{batch}"`, the AMQP message id of a batch.
pub fn message_id(job: &str, batch: u64) -> String {
    format!("{job}:{batch}")
}

/// Splits a message id back into job and batch, for messages whose body cannot be decoded.
pub fn parse_message_id(id: &str) -> Option<(String, u64)> {
    let (job, batch) = id.rsplit_once(':')?;
    if job.is_empty() {
        return None;
    }
    Some((job.to_string(), batch.parse().ok()?))
}

/// Encodes an envelope as MessagePack with named fields.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    // Serialising a struct of strings, maps and JSON values into a Vec cannot fail:
    // serde_json::Value never fails to serialise and the writer is infallible.
    rmp_serde::to_vec_named(envelope).unwrap_or_default()
}

/// One record already encoded as MessagePack: what the producer carries from its readers to
/// the batcher, so that a record is turned from JSON text into MessagePack in one pass,
/// without a `serde_json::Value` tree in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record(Vec<u8>);

impl Record {
    /// Transcodes one JSON value from its text (the whole slice, surrounding whitespace
    /// allowed). The error is serde_json's, as parsing the text would give it.
    pub fn from_json(text: &[u8]) -> Result<Self, serde_json::Error> {
        match std::str::from_utf8(text) {
            Ok(text) => Self::from_json_str(text),
            Err(_) => {
                serde_json::from_slice::<serde::de::IgnoredAny>(text)?;
                Err(serde::de::Error::custom("not UTF-8 text"))
            }
        }
    }

    /// [`Record::from_json`] of text known to be UTF-8.
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        let mut out = Vec::with_capacity(text.len());
        if crate::transcode::json_to_msgpack(text, &mut out).is_ok() {
            return Ok(Self(out));
        }
        // The error path only: parse again for serde_json's own message. JSON that it takes
        // and the transcoder refused is nested too deep to be a record.
        serde_json::from_str::<serde::de::IgnoredAny>(text)?;
        Err(serde::de::Error::custom(format!(
            "nested deeper than {} levels",
            crate::transcode::MAX_DEPTH + 1
        )))
    }

    /// Encodes a parsed value.
    pub fn from_value(value: &Value) -> Self {
        // A Value into a Vec cannot fail.
        Self(rmp_serde::to_vec(value).unwrap_or_default())
    }

    /// The record as a JSON value (for tests and tools).
    pub fn to_value(&self) -> Value {
        rmp_serde::from_slice(&self.0).unwrap_or(Value::Null)
    }

    /// The MessagePack bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it has no bytes (never, for a record made by this type).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Encodes a batch from records already in MessagePack: the same message as [`encode`] of
/// the [`Envelope`] with these fields, written field by field.
pub fn encode_records(
    job: &str,
    batch: u64,
    task: &str,
    params: &BTreeMap<String, String>,
    records: &[Record],
    created_ms: u64,
) -> Vec<u8> {
    use rmp::encode::{write_array_len, write_map_len, write_str, write_uint};
    let size = 96 + job.len() + task.len() + records.iter().map(Record::len).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    // Writing into a Vec cannot fail; the results are only the io::Write plumbing.
    let w = &mut out;
    let _ = write_map_len(w, 7);
    let _ = write_str(w, "v");
    let _ = write_uint(w, u64::from(FORMAT_VERSION));
    let _ = write_str(w, "job");
    let _ = write_str(w, job);
    let _ = write_str(w, "batch");
    let _ = write_uint(w, batch);
    let _ = write_str(w, "task");
    let _ = write_str(w, task);
    let _ = write_str(w, "params");
    let _ = write_map_len(w, params.len() as u32);
    for (k, v) in params {
        let _ = write_str(w, k);
        let _ = write_str(w, v);
    }
    let _ = write_str(w, "records");
    let _ = write_array_len(w, records.len() as u32);
    for r in records {
        w.extend_from_slice(&r.0);
    }
    let _ = write_str(w, "created_ms");
    let _ = write_uint(w, created_ms);
    out
}

/// Decodes a message body, checking its size and version.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<Envelope, DecodeError> {
    check_size(body, max_bytes)?;
    match rmp_serde::from_slice::<Envelope>(body) {
        Ok(env) if env.v == FORMAT_VERSION => Ok(env),
        Ok(env) => Err(DecodeError::UnsupportedVersion(env.v)),
        // A later version may have other fields: say so rather than "malformed".
        Err(e) => match rmp_serde::from_slice::<VersionOnly>(body) {
            Ok(head) if head.v != FORMAT_VERSION => Err(DecodeError::UnsupportedVersion(head.v)),
            _ => Err(DecodeError::Malformed(e.to_string())),
        },
    }
}

fn check_size(body: &[u8], max_bytes: usize) -> Result<(), DecodeError> {
    if body.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit: max_bytes,
        });
    }
    Ok(())
}

/// A batch read in place: the envelope's fields, with each record left as the MessagePack it
/// arrived in (what the worker hands its task; see [`taskmill_task::Records`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchView<'a> {
    /// Job this batch belongs to.
    pub job: &'a str,
    /// Sequence number of the batch within its job.
    pub batch: u64,
    /// Name of the task.
    pub task: &'a str,
    /// Task parameters.
    pub params: BTreeMap<String, String>,
    /// Each record's MessagePack bytes.
    pub records: Vec<&'a [u8]>,
    /// When the batch was created, ms since the epoch.
    pub created_ms: u64,
}

/// Decodes a message body like [`decode`] (the same envelopes pass, the same errors), but
/// leaves the records undecoded: it only finds where each one starts and ends.
pub fn decode_view(body: &[u8], max_bytes: usize) -> Result<BatchView<'_>, DecodeError> {
    use taskmill_task::msgpack::Reader;
    check_size(body, max_bytes)?;
    let malformed = |what: String| DecodeError::Malformed(what);
    let mut r = Reader::new(body);
    let n = r
        .map_len()
        .ok_or_else(|| malformed("the body is not a map of fields".into()))?;
    let (mut v, mut job, mut batch, mut task, mut records, mut created_ms) =
        (None, None, None, None, None, None);
    let mut params = BTreeMap::new();
    // The first field of the wrong type; reported once the version is known to be this one
    // (a later version may type its fields otherwise).
    let mut wrong: Option<&'static str> = None;
    for _ in 0..n {
        let Some(key) = r.raw_str() else {
            return Err(malformed("a field name is not text".into()));
        };
        // Some(Ok) read, Some(Err) of the wrong type (not read), None a field of no use here.
        let read = match key {
            b"v" => Some(r.uint().map(|x| v = Some(x)).ok_or("v")),
            b"job" => Some(r.str().map(|x| job = Some(x)).ok_or("job")),
            b"batch" => Some(r.uint().map(|x| batch = Some(x)).ok_or("batch")),
            b"task" => Some(r.str().map(|x| task = Some(x)).ok_or("task")),
            b"created_ms" => Some(r.uint().map(|x| created_ms = Some(x)).ok_or("created_ms")),
            b"params" => Some(read_params(&mut r, &mut params).ok_or("params")),
            b"records" => Some(
                read_records(&mut r, body.len())
                    .map(|x| records = Some(x))
                    .ok_or("records"),
            ),
            _ => None,
        };
        if let Some(Err(field)) = read {
            wrong = wrong.or(Some(field));
        }
        if !matches!(read, Some(Ok(()))) {
            r.skip()
                .ok_or_else(|| malformed("the body is cut short or not MessagePack".into()))?;
        }
    }
    let missing = |name: &str| malformed(format!("missing field `{name}`"));
    if let Some(v) = v {
        match u16::try_from(v) {
            Ok(v) if v != FORMAT_VERSION => return Err(DecodeError::UnsupportedVersion(v)),
            Ok(_) => {}
            Err(_) => return Err(malformed(format!("version {v} is out of range"))),
        }
    }
    if let Some(field) = wrong {
        return Err(malformed(format!("field `{field}` has the wrong type")));
    }
    v.ok_or_else(|| missing("v"))?;
    Ok(BatchView {
        job: job.ok_or_else(|| missing("job"))?,
        batch: batch.ok_or_else(|| missing("batch"))?,
        task: task.ok_or_else(|| missing("task"))?,
        params,
        records: records.ok_or_else(|| missing("records"))?,
        created_ms: created_ms.ok_or_else(|| missing("created_ms"))?,
    })
}

/// A map of text to text; None (the cursor where it was) when the value is anything else.
fn read_params(
    r: &mut taskmill_task::msgpack::Reader<'_>,
    params: &mut BTreeMap<String, String>,
) -> Option<()> {
    let mut peek = r.clone();
    let n = peek.map_len()?;
    let mut read = BTreeMap::new();
    for _ in 0..n {
        let k = peek.str()?;
        let v = peek.str()?;
        read.insert(k.to_string(), v.to_string());
    }
    *params = read;
    *r = peek;
    Some(())
}

/// Where each record of an array starts and ends; None (the cursor where it was) when the
/// value is no array or a record is cut short.
fn read_records<'a>(
    r: &mut taskmill_task::msgpack::Reader<'a>,
    body_len: usize,
) -> Option<Vec<&'a [u8]>> {
    let mut peek = r.clone();
    let n = peek.array_len()?;
    // Each record takes a byte at least: a longer count is forged.
    if n > body_len {
        return None;
    }
    let items = (0..n).map(|_| peek.value()).collect::<Option<Vec<_>>>()?;
    *r = peek;
    Some(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_transcoded_from_json_make_the_same_batch() {
        let texts = [
            r#"{"id": 1, "title": "héllo \"you\"", "body": "x", "n": -3, "f": 1.5e3, "ok": true}"#,
            r#" {"nested": {"a": [1, 2, {"b": null}]}, "big": 18446744073709551615} "#,
            r#""just a string""#,
            "[1, 2, 3]",
        ];
        let values: Vec<Value> = texts
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect();
        let records: Vec<Record> = texts
            .iter()
            .map(|t| Record::from_json(t.as_bytes()).unwrap())
            .collect();
        for (r, v) in records.iter().zip(&values) {
            assert_eq!(&r.to_value(), v);
        }
        let params: BTreeMap<String, String> = [("top".to_string(), "3".to_string())].into();
        let by_hand = encode_records(
            "job-1",
            7,
            "post-stats",
            &params,
            &records,
            1_700_000_000_123,
        );
        let env = Envelope {
            v: FORMAT_VERSION,
            job: "job-1".into(),
            batch: 7,
            task: "post-stats".into(),
            params,
            records: values,
            created_ms: 1_700_000_000_123,
        };
        assert_eq!(agree(&by_hand, usize::MAX).unwrap(), env);
        // Keys in sorted order (as a Value keeps them), the bytes are serde's own.
        let sorted: Vec<Record> = env.records.iter().map(Record::from_value).collect();
        let again = encode_records(
            "job-1",
            7,
            "post-stats",
            &env.params,
            &sorted,
            env.created_ms,
        );
        assert_eq!(again, encode(&env));
    }

    #[test]
    fn malformed_json_gives_serde_json_s_error() {
        let e = Record::from_json(b"{\"a\": }").unwrap_err();
        assert_eq!(
            e.to_string(),
            serde_json::from_str::<Value>("{\"a\": }")
                .unwrap_err()
                .to_string()
        );
        assert!(Record::from_json(b"{} trailing").is_err());
        assert!(Record::from_json(b"").is_err());
    }
    use proptest::prelude::*;
    use serde_json::json;

    fn sample() -> Envelope {
        Envelope {
            v: FORMAT_VERSION,
            job: "j1".into(),
            batch: 7,
            task: "post-stats".into(),
            params: BTreeMap::from([("k".to_string(), "v".to_string())]),
            records: vec![json!({"title": "a", "body": "b", "n": [1, 2.5, null, true]})],
            created_ms: 1_700_000_000_000,
        }
    }

    /// An envelope from its view, records decoded: what `decode` gives.
    fn from_view(view: BatchView<'_>) -> Envelope {
        Envelope {
            v: FORMAT_VERSION,
            job: view.job.into(),
            batch: view.batch,
            task: view.task.into(),
            params: view.params,
            records: view
                .records
                .iter()
                .map(|r| rmp_serde::from_slice(r).unwrap())
                .collect(),
            created_ms: view.created_ms,
        }
    }

    /// `decode` and `decode_view` agree: the same envelope, or errors of the same kind.
    fn agree(bytes: &[u8], limit: usize) -> Result<Envelope, DecodeError> {
        let full = decode(bytes, limit);
        let view = decode_view(bytes, limit).map(from_view);
        match (&full, &view) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(DecodeError::Malformed(_)), Err(DecodeError::Malformed(_))) => {}
            (a, b) => assert_eq!(a, b),
        }
        full
    }

    #[test]
    fn round_trip() {
        let e = sample();
        assert_eq!(agree(&encode(&e), usize::MAX), Ok(e));
    }

    #[test]
    fn a_view_leaves_records_in_place_and_reads_fields_in_any_order() {
        // Fields in another order, and one this version does not know.
        let mut m = serde_json::Map::new();
        m.insert("records".into(), json!([{"title": "t"}, [1, 2], "x"]));
        m.insert("extra".into(), json!({"future": [1, 2, 3]}));
        m.insert("created_ms".into(), json!(5));
        m.insert("task".into(), json!("post-stats"));
        m.insert("batch".into(), json!(3));
        m.insert("job".into(), json!("j"));
        m.insert("v".into(), json!(FORMAT_VERSION));
        let bytes = rmp_serde::to_vec_named(&Value::Object(m)).unwrap();
        let view = decode_view(&bytes, usize::MAX).unwrap();
        assert_eq!((view.job, view.batch, view.task), ("j", 3, "post-stats"));
        assert_eq!(view.records.len(), 3);
        assert_eq!(view.records[2], rmp_serde::to_vec(&json!("x")).unwrap());
        agree(&bytes, usize::MAX).unwrap();
        // A record that is not UTF-8 inside passes the view (the task decides) but not decode.
        let bad = encode_records(
            "j",
            0,
            "t",
            &BTreeMap::new(),
            &[Record(vec![0xa2, 0xff, 0xfe])],
            1,
        );
        assert_eq!(decode_view(&bad, usize::MAX).unwrap().records.len(), 1);
        assert!(decode(&bad, usize::MAX).is_err());
    }

    #[test]
    fn too_large_is_refused() {
        let bytes = encode(&sample());
        let err = agree(&bytes, 10).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { limit: 10, .. }));
    }

    #[test]
    fn other_version_is_refused() {
        let mut e = sample();
        e.v = 99;
        let bytes = rmp_serde::to_vec_named(&e).unwrap();
        assert_eq!(
            agree(&bytes, usize::MAX),
            Err(DecodeError::UnsupportedVersion(99))
        );
    }

    #[test]
    fn missing_field_is_malformed() {
        #[derive(Serialize)]
        struct Partial {
            v: u16,
            job: String,
        }
        let bytes = rmp_serde::to_vec_named(&Partial {
            v: 1,
            job: "x".into(),
        })
        .unwrap();
        assert!(matches!(
            agree(&bytes, usize::MAX),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn bounded_cuts_on_char_boundaries() {
        assert_eq!(bounded("abc", 10), "abc");
        let long = "é".repeat(1000);
        let cut = bounded(&long, 101);
        assert!(cut.len() <= 101, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn message_ids() {
        assert_eq!(parse_message_id("abc:12"), Some(("abc".into(), 12)));
        assert_eq!(parse_message_id("a:b:3"), Some(("a:b".into(), 3)));
        assert_eq!(parse_message_id("abc"), None);
        assert_eq!(parse_message_id(":3"), None);
        assert_eq!(parse_message_id("abc:x"), None);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            ".{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn codec_round_trips(
            job in "[a-z0-9-]{1,40}",
            batch in any::<u64>(),
            task in "[a-z-]{1,20}",
            params in prop::collection::btree_map(".{0,10}", ".{0,10}", 0..5),
            records in prop::collection::vec(json_value(), 0..20),
            created_ms in any::<u64>(),
        ) {
            let e = Envelope { v: FORMAT_VERSION, job, batch, task, params, records, created_ms };
            prop_assert_eq!(agree(&encode(&e), usize::MAX), Ok(e));
        }

        /// Envelope-shaped maps with fields of arbitrary types (a missing field, a wrong type,
        /// an extra field): decoding gives an envelope or an error, never a panic, and whatever
        /// decodes has the current version.
        #[test]
        fn arbitrary_envelopes_never_panic(
            fields in prop::collection::btree_map(
                prop_oneof![
                    Just("v".to_string()), Just("job".to_string()), Just("batch".to_string()),
                    Just("task".to_string()), Just("params".to_string()),
                    Just("records".to_string()), Just("created_ms".to_string()), ".{0,5}",
                ],
                prop_oneof![json_value(), Just(Value::from(FORMAT_VERSION))],
                0..9,
            )
        ) {
            let map: serde_json::Map<String, Value> = fields.into_iter().collect();
            let bytes = rmp_serde::to_vec_named(&Value::Object(map)).unwrap();
            if let Ok(e) = agree(&bytes, usize::MAX) {
                prop_assert_eq!(e.v, FORMAT_VERSION);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 1024);
            let _ = decode_view(&bytes, 1024);
        }
    }
}
