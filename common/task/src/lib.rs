//! Tasks: named, pure functions from (params, records) to a JSON result, with an aggregate
//! that folds batch results into a job summary.
//!
//! This crate is all a task author needs (it depends on serde and rmp-serde only): implement [`Task`] in
//! one file and register it in your own worker's [`Registry`]
//! (`taskmill_tasks::builtin().with(MyTask)`; the `taskmill-tasks` crate has the built-in
//! ones). [`hash`] has stable hashes for tasks that need them (the same on every machine and
//! toolchain).
//!
//! A batch's records reach a task as [`Records`]: the MessagePack they travelled in, read on
//! demand. [`Task::run`] sees them decoded into JSON values; a task that reads a few fields
//! of each record can implement [`Task::run_records`] instead and read just those
//! ([`Records::str_field`], [`Records::decode`]), which spares decoding the rest.

pub mod hash;
pub mod msgpack;

use std::{collections::BTreeMap, collections::HashMap, sync::Arc};

use serde_json::Value;

/// What a task knows about the batch it runs on.
#[derive(Debug, Clone, Copy)]
pub struct TaskContext<'a> {
    /// Task parameters from `--param KEY=VALUE`.
    pub params: &'a BTreeMap<String, String>,
    /// Job id.
    pub job: &'a str,
    /// Batch number within the job.
    pub batch: u64,
    /// Attempt number, 1 for the first.
    pub attempt: u32,
    /// When the batch's time limit (`enqueue --time-limit`) runs out, if it has one. A batch
    /// that runs past it counts as a transient failure (`time_limit`); a long task can check
    /// [`TaskContext::past_deadline`] and stop early.
    pub deadline: Option<std::time::Instant>,
}

impl TaskContext<'_> {
    /// Whether the batch's time limit has run out (cheap: one clock read). Rust cannot stop a
    /// thread from outside, so a task that may run long should check this now and then and
    /// return early (an error, or what it has).
    pub fn past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
    }

    /// A text parameter, or `default` when absent.
    pub fn str_param<'s>(&'s self, key: &str, default: &'s str) -> &'s str {
        self.params.get(key).map(String::as_str).unwrap_or(default)
    }

    /// A parameter parsed as `T`, or `default` when absent; an unparseable value is a
    /// permanent error (retrying cannot fix it).
    pub fn param<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, TaskError> {
        match self.params.get(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|_| TaskError::Permanent(format!("parameter {key}={raw:?} is not valid"))),
        }
    }
}

/// The deepest nesting of arrays and objects a stored result or summary may have: what
/// serde_json (the producer, the dashboard, the client) reads back (it refuses 128 levels).
pub const MAX_JSON_DEPTH: usize = 127;

/// How deeply `value` nests arrays and objects (a scalar is 0, `[]` is 1), counted without
/// recursion, and only up to `limit + 1`: enough to tell a value over `limit`.
pub fn json_depth(value: &Value, limit: usize) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let depth = depth + 1;
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth))),
            Value::Object(o) => stack.extend(o.values().map(|c| (c, depth))),
            _ => continue,
        }
        deepest = deepest.max(depth);
        if deepest > limit {
            return deepest;
        }
    }
    deepest
}

/// A batch's result.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutput {
    /// The result stored for the batch.
    pub result: Value,
    /// Records the task used.
    pub records_done: u64,
    /// Records the task could not use and skipped.
    pub records_invalid: u64,
}

/// How a task failed, which tells the worker what to do with the batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// Might succeed later: the batch is retried.
    #[error("{0}")]
    Transient(String),
    /// Will never succeed: the batch is dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
    /// A record is not MessagePack data that a JSON value can be made of (a forged message):
    /// the batch is dead-lettered as undecodable.
    #[error("{0}")]
    BadRecord(String),
}

/// A record that could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("record {index} of the batch: {reason}")]
pub struct RecordError {
    /// Its position in the batch, from 0.
    pub index: usize,
    /// Why it could not be decoded.
    pub reason: String,
}

/// A batch's records as they arrived: each one's MessagePack bytes, decoded only when and
/// as far as a task asks.
#[derive(Debug, Clone, Default)]
pub struct Records<'a> {
    items: Vec<&'a [u8]>,
}

impl<'a> Records<'a> {
    /// Records from their MessagePack bytes, one slice a record.
    pub fn new(items: Vec<&'a [u8]>) -> Self {
        Self { items }
    }

    /// How many records there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Record `index`'s MessagePack bytes.
    pub fn raw(&self, index: usize) -> Option<&'a [u8]> {
        self.items.get(index).copied()
    }

    /// The text under key `name` of record `index`, read in place: what [`str_field`] gives
    /// of the record as a JSON value (None when the record is no object, lacks the key, or
    /// holds no text there).
    pub fn str_field(&self, index: usize, name: &str) -> Option<&'a str> {
        msgpack::str_field(self.raw(index)?, name)
    }

    /// The texts under keys `names` of record `index`, read in place in one walk over the
    /// record (each None as [`Records::str_field`] gives it).
    pub fn str_fields<const N: usize>(
        &self,
        index: usize,
        names: [&str; N],
    ) -> [Option<&'a str>; N] {
        match self.raw(index) {
            Some(record) => msgpack::str_fields(record, names),
            None => [None; N],
        }
    }

    /// The value under key `name` of record `index` as a JSON value (None when the record is
    /// no object, lacks the key, or the value is no JSON).
    pub fn field_value(&self, index: usize, name: &str) -> Option<Value> {
        rmp_serde::from_slice(msgpack::field(self.raw(index)?, name)?).ok()
    }

    /// Record `index` decoded as `T` (with serde; text fields can borrow from the batch).
    pub fn decode<T: serde::Deserialize<'a>>(&self, index: usize) -> Result<T, RecordError> {
        let bytes = self.raw(index).ok_or_else(|| RecordError {
            index,
            reason: format!("the batch has {} records", self.len()),
        })?;
        rmp_serde::from_slice(bytes).map_err(|e| RecordError {
            index,
            reason: e.to_string(),
        })
    }

    /// Record `index` as a JSON value.
    pub fn value(&self, index: usize) -> Result<Value, RecordError> {
        self.decode(index)
    }

    /// Every record as a JSON value.
    pub fn values(&self) -> Result<Vec<Value>, RecordError> {
        (0..self.len()).map(|i| self.value(i)).collect()
    }
}

/// Runs `task` on `records` both ways, [`Task::run`] on the values and [`Task::run_records`]
/// on their MessagePack, and returns the output once it checked that both agree: for the tests
/// of a task that implements `run_records`.
///
/// # Panics
/// When the two outputs differ.
pub fn run_both(
    task: &dyn Task,
    ctx: &TaskContext<'_>,
    records: &[Value],
) -> Result<TaskOutput, TaskError> {
    let bytes = encode_records(records);
    let in_place = task.run_records(
        ctx,
        &Records::new(bytes.iter().map(Vec::as_slice).collect()),
    );
    let decoded = task.run(ctx, records);
    assert_eq!(in_place, decoded, "run_records and run disagree");
    decoded
}

/// Records encoded as a batch carries them (for running a task on values in tests or in
/// process): pass `Records::new(bytes.iter().map(Vec::as_slice).collect())`.
pub fn encode_records(values: &[Value]) -> Vec<Vec<u8>> {
    // A JSON value into a Vec cannot fail.
    values
        .iter()
        .map(|v| rmp_serde::to_vec(v).unwrap_or_default())
        .collect()
}

/// The type of a task parameter (values travel as text and are checked against it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A whole number (may be negative).
    Int,
    /// A number.
    Float,
    /// Any text.
    Str,
    /// `true` or `false`.
    Bool,
}

/// One declared parameter of a task: its name, type, default (as text) and what it does.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParamSpec {
    /// The name given with `--param NAME=VALUE`.
    pub name: String,
    /// Its type.
    pub kind: ParamKind,
    /// The value when it is not given.
    pub default: String,
    /// One line on what it does.
    pub description: String,
    /// The least value a number may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The greatest value a number may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The only values it may have (empty: any of its type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
}

impl ParamSpec {
    /// A parameter declaration.
    pub fn new(name: &str, kind: ParamKind, default: &str, description: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            default: default.into(),
            description: description.into(),
            min: None,
            max: None,
            choices: Vec::new(),
        }
    }

    /// A number from `min` to `max`, both included.
    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }

    /// A number of at least `min`.
    pub fn at_least(mut self, min: f64) -> Self {
        self.min = Some(min);
        self
    }

    /// One of these values.
    pub fn choices(mut self, values: &[&str]) -> Self {
        self.choices = values.iter().map(|v| v.to_string()).collect();
        self
    }

    /// What it accepts beyond its type, for people: `1 to 4096`, `at least 0`, `one of: a, b`;
    /// empty when any value of its type is accepted.
    pub fn allowed(&self) -> String {
        let num = |v: f64| {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{}", v as i64)
            } else {
                v.to_string()
            }
        };
        match (self.min, self.max) {
            _ if !self.choices.is_empty() => format!("one of: {}", self.choices.join(", ")),
            (Some(lo), Some(hi)) => format!("{} to {}", num(lo), num(hi)),
            (Some(lo), None) => format!("at least {}", num(lo)),
            (None, Some(hi)) => format!("at most {}", num(hi)),
            (None, None) => String::new(),
        }
    }
}

/// Parameters every task accepts: the worker's retry settings for one job.
pub const RETRY_PARAMS: &[&str] = &[
    "retry_max_attempts",
    "retry_base_ms",
    "retry_factor",
    "retry_max_delay_ms",
];

/// Checks parameters against a task's declarations: unknown names and values of the wrong
/// type are errors, in one sentence that lists what is valid.
pub fn check_params(
    task: &str,
    specs: &[ParamSpec],
    given: &BTreeMap<String, String>,
) -> Result<(), String> {
    let valid = || {
        let mut names: Vec<String> = specs
            .iter()
            .map(|p| format!("{} ({:?}, default {:?})", p.name, p.kind, p.default).to_lowercase())
            .collect();
        names.extend(RETRY_PARAMS.iter().map(|r| r.to_string()));
        names.join(", ")
    };
    for (name, value) in given {
        let Some(spec) = specs.iter().find(|p| p.name == *name) else {
            if RETRY_PARAMS.contains(&name.as_str()) {
                continue;
            }
            return Err(format!(
                "task {task} has no parameter {name:?}; valid: {}",
                valid()
            ));
        };
        let v = value.trim();
        let ok = match spec.kind {
            ParamKind::Int => v.parse::<i64>().is_ok(),
            ParamKind::Float => v.parse::<f64>().is_ok_and(f64::is_finite),
            ParamKind::Str => true,
            ParamKind::Bool => matches!(v, "true" | "false"),
        };
        if !ok {
            return Err(format!(
                "parameter {name}={value:?} of task {task} is not {}",
                match spec.kind {
                    ParamKind::Int => "a whole number",
                    ParamKind::Float => "a number",
                    ParamKind::Str => "text",
                    ParamKind::Bool => "true or false",
                }
            ));
        }
        let out_of_range = match spec.kind {
            ParamKind::Int | ParamKind::Float => v.parse::<f64>().is_ok_and(|n| {
                spec.min.is_some_and(|lo| n < lo) || spec.max.is_some_and(|hi| n > hi)
            }),
            _ => false,
        };
        if out_of_range {
            return Err(format!(
                "parameter {name}={value:?} of task {task} is out of range: {}",
                spec.allowed()
            ));
        }
        if !spec.choices.is_empty() && !spec.choices.iter().any(|c| c == v) {
            return Err(format!(
                "parameter {name}={value:?} of task {task} is not {}",
                spec.allowed()
            ));
        }
    }
    Ok(())
}

/// A named analysis. Implementations must be pure: the same batch gives the same result, so
/// that a redelivered batch stores what the first delivery would have.
pub trait Task: Send + Sync + 'static {
    /// The name that `--task` selects.
    fn name(&self) -> &'static str;

    /// Analyses one batch. Runs on a rayon thread; may use rayon inside.
    fn run(&self, ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError>;

    /// Analyses one batch as it arrived: what the worker calls. By default it decodes every
    /// record into a JSON value and calls [`Task::run`]; a task that reads only some fields
    /// can read them in place instead (it must give the same output as `run`).
    fn run_records(
        &self,
        ctx: &TaskContext<'_>,
        records: &Records<'_>,
    ) -> Result<TaskOutput, TaskError> {
        let values = records
            .values()
            .map_err(|e| TaskError::BadRecord(e.to_string()))?;
        self.run(ctx, &values)
    }

    /// Folds the batch results of a job (in batch order) into its summary.
    fn aggregate(&self, results: &[Value]) -> Value;

    /// True when a summary folds like a result: `aggregate` of the summaries of consecutive
    /// runs of results equals `aggregate` of all of them (sums, counts, maxima). The worker
    /// then folds a job a page of results at a time, in flat memory however large the job;
    /// otherwise it reads every result at once.
    fn folds_in_pages(&self) -> bool {
        false
    }

    /// One line on what the task does (shown by `producer tasks`).
    fn description(&self) -> &'static str {
        ""
    }

    /// The parameters it takes. A parameter not declared here (other than the retry
    /// settings) is refused, at enqueue and by the worker; so is a value of the wrong type.
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
}

/// Tasks by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: HashMap<&'static str, Arc<dyn Task>>,
    /// Each task's declared parameters, asked once at registration (workers check every
    /// batch that carries parameters against them).
    params: HashMap<&'static str, Arc<[ParamSpec]>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// This registry with `task` added (or replaced): `taskmill_tasks::builtin().with(MyTask)`.
    pub fn with(mut self, task: impl Task) -> Self {
        self.register(task);
        self
    }

    /// Adds (or replaces) a task.
    pub fn register(&mut self, task: impl Task) -> &mut Self {
        self.params.insert(task.name(), task.params().into());
        self.tasks.insert(task.name(), Arc::new(task));
        self
    }

    /// The declared parameters of task `name` (none for an unknown task).
    pub fn params(&self, name: &str) -> &[ParamSpec] {
        self.params.get(name).map_or(&[], |p| p)
    }

    /// The task called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        self.tasks.get(name).cloned()
    }

    /// Names of all tasks, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.tasks.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// A string field of a JSON object record.
pub fn str_field<'a>(record: &'a Value, field: &str) -> Option<&'a str> {
    record.get(field)?.as_str()
}

/// A number from a result object, 0 when absent.
pub fn f64_of(v: &Value, field: &str) -> f64 {
    v.get(field).and_then(Value::as_f64).unwrap_or(0.0)
}

/// An unsigned integer from a result object, 0 when absent.
pub fn u64_of(v: &Value, field: &str) -> u64 {
    v.get(field).and_then(Value::as_u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_what_serde_json_reads_back() {
        let nested = |d: usize| -> Value {
            serde_json::from_str(&("[".repeat(d) + &"]".repeat(d))).unwrap()
        };
        assert_eq!(json_depth(&serde_json::json!(1), 10), 0);
        assert_eq!(json_depth(&serde_json::json!({"a": [1, {"b": []}]}), 10), 4);
        let at_limit = nested(MAX_JSON_DEPTH);
        assert_eq!(json_depth(&at_limit, MAX_JSON_DEPTH), MAX_JSON_DEPTH);
        // What is at the limit reads back; one level more does not.
        let text = serde_json::to_string(&at_limit).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
        let over = Value::Array(vec![at_limit]);
        assert_eq!(json_depth(&over, MAX_JSON_DEPTH), MAX_JSON_DEPTH + 1);
        let text = serde_json::to_string(&over).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err());
    }

    #[test]
    fn params_are_checked_by_name_and_type() {
        let specs = vec![
            ParamSpec::new("top", ParamKind::Int, "10", "how many"),
            ParamSpec::new("threshold", ParamKind::Float, "0.8", "cut"),
        ];
        let p = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(check_params("t", &specs, &p("top", "5")).is_ok());
        assert!(check_params("t", &specs, &p("retry_base_ms", "10")).is_ok());
        let e = check_params("t", &specs, &p("treshold", "0.1")).unwrap_err();
        assert!(
            e.contains("no parameter \"treshold\"") && e.contains("threshold"),
            "{e}"
        );
        let e = check_params("t", &specs, &p("top", "abc")).unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
    }
}
