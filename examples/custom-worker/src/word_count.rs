//! `word-count`: the words of one text field of each record, and the batch's total.

use serde_json::{json, Value};
use taskmill_task::{
    str_field, u64_of, ParamKind, ParamSpec, Task, TaskContext, TaskError, TaskOutput,
};

/// Counts the words of a field (param `field`, default `body`).
pub struct WordCount;

impl Task for WordCount {
    fn name(&self) -> &'static str {
        "word-count"
    }

    fn run(&self, ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        let field = ctx.str_param("field", "body");
        let mut words = 0u64;
        let mut used = 0u64;
        for r in records {
            if let Some(text) = str_field(r, field) {
                words += text.split_whitespace().count() as u64;
                used += 1;
            }
        }
        Ok(TaskOutput {
            result: json!({"words": words, "records": used}),
            records_done: used,
            records_invalid: records.len() as u64 - used,
        })
    }

    fn description(&self) -> &'static str {
        "Counts the words of a text field"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new(
            "field",
            ParamKind::Str,
            "body",
            "the field whose words count",
        )]
    }

    fn aggregate(&self, results: &[Value]) -> Value {
        let words: u64 = results.iter().map(|r| u64_of(r, "words")).sum();
        let records: u64 = results.iter().map(|r| u64_of(r, "records")).sum();
        json!({"words": words, "records": records})
    }
}
