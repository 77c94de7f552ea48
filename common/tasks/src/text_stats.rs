//! `text-stats`: word and character statistics of one text field.
//!
//! Params: `field` (default `body`), `top` (default 10). Per batch and per job: `records`,
//! `words`, `avg_words` (per record), `top_words` (`[[word, count], ...]`, most frequent first,
//! ties by word), `char_entropy` (Shannon entropy of the characters, in bits) and
//! `lexical_diversity` (distinct words / words).
//!
//! Character counts travel with each batch result, so the job's `char_entropy` is exact. Word
//! counts travel for each batch's 200 most frequent words, so the job's `top_words` is exact
//! unless a word is frequent overall but never among a batch's 200 first; the job's
//! `lexical_diversity` is the mean of the batches' values weighted by words.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use taskmill_task::{f64_of, str_field, u64_of, Records, Task, TaskContext, TaskError, TaskOutput};

/// The `text-stats` task.
pub struct TextStats;

/// How many word counts a batch result keeps for the job summary.
const KEPT_WORDS: usize = 200;

fn top_n(counts: &HashMap<String, u64>, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.iter().map(|(w, c)| (w.clone(), *c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

fn entropy(chars: &BTreeMap<String, u64>) -> f64 {
    let total: u64 = chars.values().sum();
    if total == 0 {
        return 0.0;
    }
    chars
        .values()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum()
}

fn figures(
    records: u64,
    words: u64,
    distinct_or_diversity: f64,
    top: usize,
    word_counts: &HashMap<String, u64>,
    chars: &BTreeMap<String, u64>,
) -> Value {
    let avg = if records == 0 {
        0.0
    } else {
        words as f64 / records as f64
    };
    json!({
        "records": records,
        "words": words,
        "avg_words": avg,
        "top_words": top_n(word_counts, top),
        "char_entropy": entropy(chars),
        "lexical_diversity": distinct_or_diversity,
        "top": top,
        "word_counts": top_n(word_counts, KEPT_WORDS),
        "char_counts": chars,
    })
}

/// A batch's output from each record's text (None for a record without one).
fn stats<'a>(
    ctx: &TaskContext<'_>,
    texts: impl Iterator<Item = Option<&'a str>>,
) -> Result<TaskOutput, TaskError> {
    let top: usize = ctx.param("top", 10)?;
    let (mut used, mut invalid) = (0u64, 0u64);
    let mut words = 0u64;
    let mut word_counts: HashMap<String, u64> = HashMap::new();
    let mut chars: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        let Some(text) = text else {
            invalid += 1;
            continue;
        };
        used += 1;
        for c in text.chars() {
            *chars.entry(c.to_string()).or_default() += 1;
        }
        for w in text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            words += 1;
            *word_counts.entry(w.to_lowercase()).or_default() += 1;
        }
    }
    let diversity = if words == 0 {
        0.0
    } else {
        word_counts.len() as f64 / words as f64
    };
    Ok(TaskOutput {
        result: figures(used, words, diversity, top, &word_counts, &chars),
        records_done: used,
        records_invalid: invalid,
    })
}

impl Task for TextStats {
    fn name(&self) -> &'static str {
        "text-stats"
    }

    fn run(&self, ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        let field = ctx.str_param("field", "body");
        stats(ctx, records.iter().map(|r| str_field(r, field)))
    }

    fn run_records(
        &self,
        ctx: &TaskContext<'_>,
        records: &Records<'_>,
    ) -> Result<TaskOutput, TaskError> {
        let field = ctx.str_param("field", "body");
        stats(ctx, (0..records.len()).map(|i| records.str_field(i, field)))
    }

    fn description(&self) -> &'static str {
        "Word counts, top words, character entropy and lexical diversity of a text field"
    }

    fn params(&self) -> Vec<taskmill_task::ParamSpec> {
        use taskmill_task::{ParamKind, ParamSpec};
        vec![
            ParamSpec::new("field", ParamKind::Str, "body", "the text field analysed"),
            ParamSpec::new("top", ParamKind::Int, "10", "how many top words").at_least(0.0),
        ]
    }

    fn aggregate(&self, results: &[Value]) -> Value {
        let (mut records, mut words, mut diversity_sum) = (0u64, 0u64, 0.0);
        let mut top = 10usize;
        let mut word_counts: HashMap<String, u64> = HashMap::new();
        let mut chars: BTreeMap<String, u64> = BTreeMap::new();
        for r in results {
            records += u64_of(r, "records");
            let w = u64_of(r, "words");
            words += w;
            diversity_sum += f64_of(r, "lexical_diversity") * w as f64;
            top = u64_of(r, "top") as usize;
            if let Some(list) = r.get("word_counts").and_then(Value::as_array) {
                for pair in list {
                    if let (Some(word), Some(count)) = (
                        pair.get(0).and_then(Value::as_str),
                        pair.get(1).and_then(Value::as_u64),
                    ) {
                        *word_counts.entry(word.to_string()).or_default() += count;
                    }
                }
            }
            if let Some(map) = r.get("char_counts").and_then(Value::as_object) {
                for (c, n) in map {
                    *chars.entry(c.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
        }
        let diversity = if words == 0 {
            0.0
        } else {
            diversity_sum / words as f64
        };
        let mut out = figures(records, words, diversity, top, &word_counts, &chars);
        if let Some(o) = out.as_object_mut() {
            // The summary is for people: the merge material stays in the batch results.
            o.remove("word_counts");
            o.remove("char_counts");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(params: &[(&str, &str)], records: &[Value]) -> Result<TaskOutput, TaskError> {
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ctx = TaskContext {
            params: &params,
            job: "j",
            batch: 0,
            attempt: 1,
            deadline: None,
        };
        taskmill_task::run_both(&TextStats, &ctx, records)
    }

    #[test]
    fn counts_words_and_entropy() {
        let out = run(
            &[("top", "2")],
            &[json!({"body": "the cat the dog"}), json!({"body": "aa"})],
        )
        .unwrap();
        let r = &out.result;
        assert_eq!(r["records"], 2);
        assert_eq!(r["words"], 5);
        assert_eq!(r["avg_words"], 2.5);
        assert_eq!(r["top_words"], json!([["the", 2], ["aa", 1]]));
        assert_eq!(r["lexical_diversity"], 4.0 / 5.0);
        // "aa" alone would have entropy 0; a two-symbol uniform text has entropy 1.
        let single = run(&[], &[json!({"body": "abab"})]).unwrap();
        assert!((f64_of(&single.result, "char_entropy") - 1.0).abs() < 1e-12);
    }

    #[test]
    fn other_field_and_invalid_records() {
        let out = run(
            &[("field", "title")],
            &[json!({"title": "Hi there"}), json!({"body": "x"}), json!(3)],
        )
        .unwrap();
        assert_eq!(out.records_done, 1);
        assert_eq!(out.records_invalid, 2);
    }

    #[test]
    fn bad_param_is_permanent() {
        let err = run(&[("top", "many")], &[json!({"body": "x"})]).unwrap_err();
        assert!(matches!(err, TaskError::Permanent(_)));
    }

    #[test]
    fn aggregate_merges_exactly() {
        let a = run(&[], &[json!({"body": "x y x"})]).unwrap().result;
        let b = run(&[], &[json!({"body": "y y z"})]).unwrap().result;
        let whole = run(&[], &[json!({"body": "x y x"}), json!({"body": "y y z"})])
            .unwrap()
            .result;
        let s = TextStats.aggregate(&[a, b]);
        assert_eq!(s["words"], 6);
        assert_eq!(s["top_words"], json!([["y", 3], ["x", 2], ["z", 1]]));
        assert!((f64_of(&s, "char_entropy") - f64_of(&whole, "char_entropy")).abs() < 1e-12);
        assert!(s.get("char_counts").is_none());
    }
}
