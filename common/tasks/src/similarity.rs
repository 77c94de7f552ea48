//! `similarity`: near-duplicate detection inside a batch, the CPU-heavy analysis.
//!
//! Each record's text (param `field`, default `body`) is cut into shingles of `shingle`
//! consecutive lower-cased words (default 3); a MinHash signature of `hashes` values (default
//! 128) estimates the Jaccard similarity of two records' shingle sets. Every pair whose
//! estimate is at least `threshold` (default 0.8) is reported as `{"a", "b", "jaccard"}`, where
//! `a` and `b` are the records' `id` fields, or their positions in the batch when they have
//! none. Signatures are computed in parallel on the rayon pool, and so are the pair scans.

use taskmill_task::hash::hash_strs;

use rayon::prelude::*;
use serde_json::{json, Value};

use taskmill_task::{f64_of, str_field, u64_of, Records, Task, TaskContext, TaskError, TaskOutput};

/// The `similarity` task.
pub struct Similarity;

/// How many pairs a job summary lists (the most similar first).
const SUMMARY_PAIRS: usize = 100;

pub(crate) use taskmill_task::hash::mix;

fn shingle_hashes(text: &str, k: usize) -> Vec<u64> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if words.is_empty() {
        return Vec::new();
    }
    let k = k.clamp(1, words.len());
    let mut out: Vec<u64> = words
        .windows(k)
        // A stable hash: the same shingle hashes alike on every worker, whatever toolchain
        // built it.
        .map(|w| hash_strs(w.iter().map(String::as_str)))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn signature(shingles: &[u64], hashes: usize) -> Vec<u64> {
    (0..hashes as u64)
        .map(|i| {
            let seed = mix(i.wrapping_add(0x5EED));
            shingles
                .iter()
                .map(|&s| mix(s ^ seed))
                .min()
                .unwrap_or(u64::MAX)
        })
        .collect()
}

/// A batch's output from the (id, text) of each record that has the text, of `total`.
fn similar(
    ctx: &TaskContext<'_>,
    usable: Vec<(Value, &str)>,
    total: usize,
) -> Result<TaskOutput, TaskError> {
    let threshold: f64 = ctx.param("threshold", 0.8)?;
    let k: usize = ctx.param("shingle", 3)?;
    let hashes: usize = ctx.param("hashes", 128)?;
    if !(0.0..=1.0).contains(&threshold) || hashes == 0 || hashes > 4096 {
        return Err(TaskError::Permanent(
            "similarity needs 0 <= threshold <= 1 and 1 <= hashes <= 4096".into(),
        ));
    }
    let sigs: Vec<Option<Vec<u64>>> = usable
        .par_iter()
        .with_min_len(4)
        .map(|(_, text)| {
            let sh = shingle_hashes(text, k);
            (!sh.is_empty()).then(|| signature(&sh, hashes))
        })
        .collect();
    let mut pairs: Vec<(usize, usize, f64)> = (0..sigs.len())
        .into_par_iter()
        .with_min_len(8)
        .flat_map_iter(|i| {
            let sigs = &sigs;
            (i + 1..sigs.len()).filter_map(move |j| {
                let (a, b) = (sigs[i].as_ref()?, sigs[j].as_ref()?);
                let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
                let est = same as f64 / hashes as f64;
                (est >= threshold).then_some((i, j, est))
            })
        })
        .collect();
    pairs.sort_by_key(|p| (p.0, p.1));
    let listed: Vec<Value> = pairs
        .iter()
        .map(|&(i, j, est)| json!({"a": usable[i].0, "b": usable[j].0, "jaccard": est}))
        .collect();
    let used = usable.len() as u64;
    Ok(TaskOutput {
        result: json!({
            "records": used,
            "pair_count": listed.len(),
            "pairs": listed,
            "threshold": threshold,
        }),
        records_done: used,
        records_invalid: total as u64 - used,
    })
}

impl Task for Similarity {
    fn name(&self) -> &'static str {
        "similarity"
    }

    fn run(&self, ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        let field = ctx.str_param("field", "body");
        let usable = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let text = str_field(r, field)?;
                let id = r.get("id").cloned().unwrap_or_else(|| json!(i));
                Some((id, text))
            })
            .collect();
        similar(ctx, usable, records.len())
    }

    fn run_records(
        &self,
        ctx: &TaskContext<'_>,
        records: &Records<'_>,
    ) -> Result<TaskOutput, TaskError> {
        let field = ctx.str_param("field", "body");
        let usable = (0..records.len())
            .filter_map(|i| {
                let text = records.str_field(i, field)?;
                let id = records.field_value(i, "id").unwrap_or_else(|| json!(i));
                Some((id, text))
            })
            .collect();
        similar(ctx, usable, records.len())
    }

    fn description(&self) -> &'static str {
        "Near-duplicate pairs inside a batch (MinHash over word shingles)"
    }

    fn params(&self) -> Vec<taskmill_task::ParamSpec> {
        use taskmill_task::{ParamKind, ParamSpec};
        vec![
            ParamSpec::new("field", ParamKind::Str, "body", "the text field compared"),
            ParamSpec::new(
                "threshold",
                ParamKind::Float,
                "0.8",
                "least estimated Jaccard similarity of a pair",
            )
            .range(0.0, 1.0),
            ParamSpec::new("shingle", ParamKind::Int, "3", "words in a shingle").at_least(1.0),
            ParamSpec::new(
                "hashes",
                ParamKind::Int,
                "128",
                "MinHash functions (1 to 4096)",
            )
            .range(1.0, 4096.0),
        ]
    }

    fn aggregate(&self, results: &[Value]) -> Value {
        let mut records = 0;
        let mut pair_count = 0;
        let mut pairs: Vec<Value> = Vec::new();
        for r in results {
            records += u64_of(r, "records");
            pair_count += u64_of(r, "pair_count");
            if let Some(p) = r.get("pairs").and_then(Value::as_array) {
                pairs.extend(p.iter().cloned());
            }
        }
        pairs.sort_by(|a, b| f64_of(b, "jaccard").total_cmp(&f64_of(a, "jaccard")));
        pairs.truncate(SUMMARY_PAIRS);
        json!({"records": records, "pair_count": pair_count, "top_pairs": pairs})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn run(records: &[Value]) -> TaskOutput {
        let params = BTreeMap::from([("threshold".to_string(), "0.5".to_string())]);
        let ctx = TaskContext {
            params: &params,
            job: "j",
            batch: 0,
            attempt: 1,
            deadline: None,
        };
        taskmill_task::run_both(&Similarity, &ctx, records).unwrap()
    }

    #[test]
    fn finds_near_duplicates_only() {
        let base = "the quick brown fox jumps over the lazy dog near the river bank today";
        let out = run(&[
            json!({"id": 1, "body": base}),
            json!({"id": 2, "body": format!("{base} again")}),
            json!({"id": 3, "body": "completely different words about databases and queues here"}),
            json!({"id": 4, "title": "no body"}),
        ]);
        assert_eq!(out.records_done, 3);
        assert_eq!(out.records_invalid, 1);
        let pairs = out.result["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 1, "{pairs:?}");
        assert_eq!(pairs[0]["a"], 1);
        assert_eq!(pairs[0]["b"], 2);
        assert!(f64_of(&pairs[0], "jaccard") > 0.7);
    }

    #[test]
    fn identical_texts_score_one_and_deterministic() {
        let recs = [json!({"body": "a b c d e"}), json!({"body": "A b, c d e"})];
        let out = run(&recs);
        assert_eq!(out.result["pairs"][0]["jaccard"], 1.0);
        assert_eq!(out.result["pairs"][0]["a"], 0);
        assert_eq!(run(&recs), out);
    }

    #[test]
    fn aggregate_sums() {
        let r = json!({"records": 2, "pair_count": 1, "pairs": [{"a": 0, "b": 1, "jaccard": 0.9}]});
        let s = Similarity.aggregate(&[r.clone(), r]);
        assert_eq!(s["records"], 4);
        assert_eq!(s["pair_count"], 2);
        assert_eq!(s["top_pairs"].as_array().unwrap().len(), 2);
    }
}
