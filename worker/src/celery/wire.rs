//! Celery's message protocol, version 2, as Celery 5 publishes it: the task's name, id and
//! workflow ids, retries, ETA, expiry and time limits in the headers; the body
//! `[args, kwargs, embed]` in JSON (with kombu's type tags) or MessagePack. Pure: no I/O.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};

/// One Celery call, as far as taskmill uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The task id (what `AsyncResult` waits on).
    pub id: String,
    /// The task's name as the app called it.
    pub task: String,
    /// The workflow's first call.
    pub root_id: Option<String>,
    /// The call before it in a workflow.
    pub parent_id: Option<String>,
    /// The Celery group it belongs to.
    pub group: Option<String>,
    /// Times Celery retried it before.
    pub retries: u64,
    /// Not before then (ms since the epoch).
    pub eta_ms: Option<u64>,
    /// Not started after then.
    pub expires_ms: Option<u64>,
    /// The hard time limit, else the soft one.
    pub time_limit: Option<Duration>,
    /// Positional arguments: the records come first.
    pub args: Vec<Value>,
    /// Keyword arguments: the task's parameters.
    pub kwargs: Map<String, Value>,
    /// What else the call asked for that taskmill does not run yet (`chord`, `callbacks`,
    /// `errbacks`), by name.
    pub workflow: Vec<&'static str>,
    /// The rest of its Celery chain (signatures, the next one last).
    pub chain: Vec<Value>,
}

/// A message that cannot be a call, with what to tell the app.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The task id, when the headers have one (else nobody can be told).
    pub id: Option<String>,
    /// The exception type `get()` raises.
    pub exc_type: &'static str,
    /// Why, in one sentence.
    pub why: String,
}

/// A header as JSON (nested tables and arrays too).
pub fn header_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(header_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), header_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
        other => taskmill_common::amqp::int_value(other).map_or(Value::Null, Value::from),
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// An ISO 8601 time as Celery writes one (`isoformat()`, with or without a zone: without one
/// it is UTC) in ms since the epoch.
fn iso_ms(raw: &str) -> Result<u64, String> {
    let t = raw.trim();
    let zoned = t
        .split_once('T')
        .is_some_and(|(_, clock)| clock.contains(['Z', 'z', '+', '-']));
    if zoned {
        taskmill_client::spec::parse_rfc3339(t)
    } else {
        taskmill_client::spec::parse_rfc3339(&format!("{t}Z"))
    }
}

/// kombu's JSON type tags (`{"__type__": "datetime", "__value__": "..."}`; also `date`,
/// `time`, `uuid`, `decimal`, `bytes`) as plain JSON: times, ids and bytes as text, decimals
/// as numbers when they are finite.
pub fn untag(v: Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.into_iter().map(untag).collect()),
        Value::Object(mut o) => {
            let tagged = o.len() == 2 && o.get("__type__").is_some_and(Value::is_string);
            if tagged {
                if let Some(value) = o.remove("__value__") {
                    let kind = o
                        .get("__type__")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    return match (kind, value) {
                        ("decimal", Value::String(s)) => s
                            .parse::<f64>()
                            .ok()
                            .and_then(serde_json::Number::from_f64)
                            .map_or(Value::String(s), Value::Number),
                        (_, value) => untag(value),
                    };
                }
            }
            Value::Object(o.into_iter().map(|(k, v)| (k, untag(v))).collect())
        }
        other => other,
    }
}

/// Reads one message. `content_type` and `encoding` are the AMQP properties.
pub fn decode(
    content_type: Option<&str>,
    encoding: Option<&str>,
    headers: Option<&FieldTable>,
    body: &[u8],
) -> Result<Call, Refused> {
    let h: Map<String, Value> = headers
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), header_json(v)))
                .collect()
        })
        .unwrap_or_default();
    let id = text(h.get("id"));
    let refuse = |exc_type: &'static str, why: String| Refused {
        id: id.clone(),
        exc_type,
        why,
    };
    let Some(task) = text(h.get("task")) else {
        return Err(refuse(
            "ProtocolError",
            "the message has no task header: Celery's message protocol 1 (task_protocol = 1) \
             is not read; use protocol 2, Celery's default"
                .into(),
        ));
    };
    let Some(id_text) = id.clone() else {
        return Err(refuse(
            "ProtocolError",
            "the message has no id header".into(),
        ));
    };
    let content_type = content_type.unwrap_or("application/json");
    let body: Value = match content_type {
        "application/json" => {
            if encoding.is_some_and(|e| !e.eq_ignore_ascii_case("utf-8")) {
                return Err(refuse(
                    "ContentDisallowed",
                    format!("a JSON body in {encoding:?} is not read (utf-8 is)"),
                ));
            }
            serde_json::from_slice(body).map(untag).map_err(|e| {
                refuse("DecodeError", format!("the body is not JSON: {e}"))
            })?
        }
        "application/x-msgpack" => rmp_serde::from_slice(body).map_err(|e| {
            refuse("DecodeError", format!("the body is not MessagePack taskmill reads: {e}"))
        })?,
        "application/x-python-serialize" | "application/x-yaml" | "application/data" => {
            let name = match content_type {
                "application/x-python-serialize" => "pickle",
                "application/x-yaml" => "yaml",
                _ => "a raw body",
            };
            return Err(refuse(
                "ContentDisallowed",
                format!(
                    "taskmill does not read {name} ({content_type}): configure \
                     task_serializer = \"json\" (or \"msgpack\") for the calls it runs"
                ),
            ));
        }
        other => {
            return Err(refuse(
                "ContentDisallowed",
                format!("content type {other:?} is not read (application/json and application/x-msgpack are)"),
            ))
        }
    };
    let Value::Array(mut parts) = body else {
        return Err(refuse(
            "ProtocolError",
            "the body is not [args, kwargs, embed] (Celery's message protocol 2)".into(),
        ));
    };
    parts.resize(3, Value::Null);
    let embed = parts.pop().unwrap_or(Value::Null);
    let kwargs = match parts.pop() {
        Some(Value::Object(m)) => m,
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err(refuse("ProtocolError", "kwargs is not a mapping".into())),
    };
    let args = match parts.pop() {
        Some(Value::Array(a)) => a,
        Some(Value::Null) | None => Vec::new(),
        Some(_) => return Err(refuse("ProtocolError", "args is not a list".into())),
    };
    let mut workflow = Vec::new();
    let chain = match embed.get("chain") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(_) => return Err(refuse("ProtocolError", "embed.chain is not a list".into())),
    };
    for name in ["chord", "callbacks", "errbacks"] {
        if embed.get(name).is_some_and(|v| match v {
            Value::Array(a) => !a.is_empty(),
            Value::Null => false,
            _ => true,
        }) {
            workflow.push(name);
        }
    }
    let when = |name: &str| -> Result<Option<u64>, Refused> {
        match h.get(name) {
            Some(Value::String(s)) => iso_ms(s)
                .map(Some)
                .map_err(|e| refuse("ProtocolError", format!("header {name}: {e}"))),
            _ => Ok(None),
        }
    };
    let eta_ms = when("eta")?;
    let expires_ms = when("expires")?;
    // Celery's own code writes [hard, soft] (its protocol document says soft first).
    let limits: Vec<Option<f64>> = h
        .get("timelimit")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or_default();
    let time_limit = limits
        .first()
        .copied()
        .flatten()
        .or_else(|| limits.get(1).copied().flatten())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64);
    Ok(Call {
        id: id_text,
        task,
        root_id: text(h.get("root_id")),
        parent_id: text(h.get("parent_id")),
        group: text(h.get("group")),
        retries: h.get("retries").and_then(Value::as_u64).unwrap_or(0),
        eta_ms,
        expires_ms,
        time_limit,
        args,
        kwargs,
        workflow,
        chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};
    use serde_json::json;

    /// Headers as Celery 5.7 sent them (captured from `send_task` with countdown and expires).
    fn celery_headers(id: &str) -> FieldTable {
        let mut t = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v));
        t.insert(ShortString::from("lang"), s("py"));
        t.insert(ShortString::from("task"), s("post-stats"));
        t.insert(ShortString::from("id"), s(id));
        t.insert(ShortString::from("shadow"), AMQPValue::Void);
        t.insert(
            ShortString::from("eta"),
            s("2026-12-07T13:59:00.308400+00:00"),
        );
        t.insert(
            ShortString::from("expires"),
            s("2026-12-07T13:59:58.308400"),
        );
        t.insert(ShortString::from("group"), AMQPValue::Void);
        t.insert(ShortString::from("retries"), AMQPValue::LongLongInt(2));
        t.insert(
            ShortString::from("timelimit"),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Double(30.0),
                AMQPValue::Void,
            ])),
        );
        t.insert(ShortString::from("root_id"), s(id));
        t.insert(ShortString::from("parent_id"), AMQPValue::Void);
        t
    }

    #[test]
    fn a_celery_5_message_reads_as_a_call() {
        let h = celery_headers("b6c9401c-ee2f-49ec-8cdd-b5c803cd0bc3");
        let body = br#"[[[{"title": "a", "body": "b"}]], {"x": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
        let call = decode(Some("application/json"), Some("utf-8"), Some(&h), body).unwrap();
        assert_eq!(call.task, "post-stats");
        assert_eq!(call.id, "b6c9401c-ee2f-49ec-8cdd-b5c803cd0bc3");
        assert_eq!(call.args, vec![json!([{"title": "a", "body": "b"}])]);
        assert_eq!(call.kwargs.get("x"), Some(&json!(1)));
        assert_eq!(call.retries, 2);
        assert_eq!(call.eta_ms, Some(1_796_651_940_308));
        // A naive time is UTC.
        assert_eq!(call.expires_ms, Some(1_796_651_998_308));
        assert_eq!(call.time_limit, Some(Duration::from_secs(30)));
        assert_eq!(call.parent_id, None);
        assert!(call.workflow.is_empty());
    }

    #[test]
    fn msgpack_bodies_and_kombu_tags_read_and_pickle_is_refused_with_a_reason() {
        let h = celery_headers("x1");
        let value = json!([[[{"n": 1}]], {}, {"chain": [{"task": "t"}]}]);
        let body = rmp_serde::to_vec(&value).unwrap();
        let call = decode(
            Some("application/x-msgpack"),
            Some("binary"),
            Some(&h),
            &body,
        )
        .unwrap();
        assert_eq!(call.args, vec![json!([{"n": 1}])]);
        assert!(call.workflow.is_empty());
        assert_eq!(call.chain, vec![json!({"task": "t"})]);

        let tagged = br#"[[[{"at": {"__type__": "datetime", "__value__": "2026-01-01T00:00:00"}, "d": {"__type__": "decimal", "__value__": "1.5"}}]], {}, {}]"#;
        let call = decode(Some("application/json"), None, Some(&h), tagged).unwrap();
        assert_eq!(
            call.args,
            vec![json!([{"at": "2026-01-01T00:00:00", "d": 1.5}])]
        );

        let e = decode(
            Some("application/x-python-serialize"),
            None,
            Some(&h),
            b"\x80\x04",
        )
        .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("x1"));
        assert!(
            e.why.contains("pickle") && e.why.contains("task_serializer"),
            "{}",
            e.why
        );
        let e = decode(Some("application/json"), None, None, b"{}").unwrap_err();
        assert!(e.why.contains("protocol 1"), "{}", e.why);
        let e = decode(Some("application/json"), None, Some(&h), b"[1, 2").unwrap_err();
        assert_eq!(e.exc_type, "DecodeError");
    }
}
