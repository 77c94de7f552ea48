//! `post-stats`: the reference analysis of posts with a `title` and a `body`.
//!
//! Titles are trimmed of white space. Per batch and per job:
//! - `avg_title_length`: mean title length in characters;
//! - `max_body_length`: longest body in characters;
//! - `title_entropy`: mean over records of (distinct characters in the lower-cased title /
//!   title length), 0 for an empty title;
//! - `processed_count`: records used.
//!
//! A batch result also carries the exact sums (`title_chars`, `title_entropy_sum`) so that the
//! job summary weighs every record equally, however the records fell into batches.

use serde_json::{json, Value};

use taskmill_task::{f64_of, str_field, u64_of, Records, Task, TaskContext, TaskError, TaskOutput};

/// The `post-stats` task.
pub struct PostStats;

/// Figures for one post, or None when it lacks a string title or body.
fn post_figures(title: Option<&str>, body: Option<&str>) -> Option<(u64, u64, f64)> {
    let title = title?.trim();
    let body = body?;
    let title_len = title.chars().count() as u64;
    let body_len = body.chars().count() as u64;
    let entropy = if title_len == 0 {
        0.0
    } else {
        distinct_lowercase_chars(title) as f64 / title_len as f64
    };
    Some((title_len, body_len, entropy))
}

/// Distinct characters of the lower-cased text: a bit set for ASCII (the common case, no
/// allocation), a sorted list for the rest.
fn distinct_lowercase_chars(text: &str) -> usize {
    let mut ascii: u128 = 0;
    let mut other: Vec<char> = Vec::new();
    for c in text.chars() {
        if c.is_ascii() {
            ascii |= 1u128 << (c.to_ascii_lowercase() as u32);
        } else {
            other.extend(c.to_lowercase());
        }
    }
    // Lower-casing a non-ASCII character can give ASCII ones (e.g. 'K', the Kelvin sign).
    other.retain(|c| {
        if c.is_ascii() {
            ascii |= 1u128 << (*c as u32);
            false
        } else {
            true
        }
    });
    other.sort_unstable();
    other.dedup();
    ascii.count_ones() as usize + other.len()
}

fn figures(count: u64, title_chars: u64, max_body: u64, entropy_sum: f64) -> Value {
    let mean = |x: f64| if count == 0 { 0.0 } else { x / count as f64 };
    json!({
        "avg_title_length": mean(title_chars as f64),
        "max_body_length": max_body,
        "title_entropy": mean(entropy_sum),
        "processed_count": count,
        "title_chars": title_chars,
        "title_entropy_sum": entropy_sum,
    })
}

/// A batch's output from each record's figures (None for a record that is no post).
fn batch_output(posts: impl Iterator<Item = Option<(u64, u64, f64)>>) -> TaskOutput {
    let (mut count, mut invalid, mut title_chars, mut max_body, mut entropy_sum) =
        (0u64, 0u64, 0u64, 0u64, 0.0);
    for post in posts {
        let Some((t, b, e)) = post else {
            invalid += 1;
            continue;
        };
        count += 1;
        title_chars += t;
        max_body = max_body.max(b);
        entropy_sum += e;
    }
    TaskOutput {
        result: figures(count, title_chars, max_body, entropy_sum),
        records_done: count,
        records_invalid: invalid,
    }
}

impl Task for PostStats {
    fn name(&self) -> &'static str {
        "post-stats"
    }

    fn run(&self, _ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        Ok(batch_output(records.iter().map(|r| {
            post_figures(str_field(r, "title"), str_field(r, "body"))
        })))
    }

    fn run_records(
        &self,
        _ctx: &TaskContext<'_>,
        records: &Records<'_>,
    ) -> Result<TaskOutput, TaskError> {
        // Two fields of each record, read in place in one walk.
        Ok(batch_output((0..records.len()).map(|i| {
            let [title, body] = records.str_fields(i, ["title", "body"]);
            post_figures(title, body)
        })))
    }

    fn description(&self) -> &'static str {
        "Title lengths, longest body and title entropy of posts (title, body)"
    }

    fn params(&self) -> Vec<taskmill_task::ParamSpec> {
        Vec::new()
    }

    fn aggregate(&self, results: &[Value]) -> Value {
        let (mut count, mut title_chars, mut max_body, mut entropy_sum) = (0u64, 0u64, 0u64, 0.0);
        for r in results {
            count += u64_of(r, "processed_count");
            title_chars += u64_of(r, "title_chars");
            max_body = max_body.max(u64_of(r, "max_body_length"));
            entropy_sum += f64_of(r, "title_entropy_sum");
        }
        figures(count, title_chars, max_body, entropy_sum)
    }

    fn folds_in_pages(&self) -> bool {
        // A summary has the fields of a result, and they are sums and a maximum.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn run(records: &[Value]) -> TaskOutput {
        let params = BTreeMap::new();
        let ctx = TaskContext {
            params: &params,
            job: "j",
            batch: 0,
            attempt: 1,
            deadline: None,
        };
        taskmill_task::run_both(&PostStats, &ctx, records).unwrap()
    }

    #[test]
    fn a_summary_folds_like_a_result() {
        let results: Vec<Value> = (0..25)
            .map(|i| {
                let t = format!("title number {i} {}", "x".repeat(i % 7));
                run(&[json!({"title": t, "body": "b".repeat(i * 3)})]).result
            })
            .collect();
        let whole = PostStats.aggregate(&results);
        // Pages of 10: each folded with the summary so far, as the worker does.
        let mut so_far: Vec<Value> = Vec::new();
        for page in results.chunks(10) {
            so_far.extend(page.iter().cloned());
            so_far = vec![PostStats.aggregate(&so_far)];
        }
        let paged = &so_far[0];
        assert!(PostStats.folds_in_pages());
        for k in ["processed_count", "title_chars", "max_body_length"] {
            assert_eq!(paged[k], whole[k], "{k}");
        }
        for k in ["avg_title_length", "title_entropy", "title_entropy_sum"] {
            let (a, b) = (paged[k].as_f64().unwrap(), whole[k].as_f64().unwrap());
            assert!((a - b).abs() < 1e-9, "{k}: {a} vs {b}");
        }
    }

    #[test]
    fn figures_by_hand() {
        // "  Hello " trims to "Hello": 5 chars, lower "hello" has {h,e,l,o} = 4 distinct → 0.8.
        // "abab": 4 chars, 2 distinct → 0.5. "" → length 0, entropy 0.
        let out = run(&[
            json!({"title": "  Hello ", "body": "xyz"}),
            json!({"title": "abab", "body": "a longer body"}),
            json!({"title": "", "body": ""}),
        ]);
        assert_eq!(out.records_done, 3);
        assert_eq!(out.records_invalid, 0);
        let r = &out.result;
        assert_eq!(r["processed_count"], 3);
        assert_eq!(r["max_body_length"], 13);
        assert!((f64_of(r, "avg_title_length") - 3.0).abs() < 1e-12); // (5 + 4 + 0) / 3
        assert!((f64_of(r, "title_entropy") - 1.3 / 3.0).abs() < 1e-12); // (0.8 + 0.5 + 0) / 3
    }

    #[test]
    fn counts_characters_not_bytes() {
        // "Ééé" is 3 characters (6 bytes); lower-cased "ééé" has 1 distinct character.
        let out = run(&[json!({"title": "Ééé", "body": "ñandú"})]);
        assert_eq!(out.result["max_body_length"], 5);
        assert!((f64_of(&out.result, "avg_title_length") - 3.0).abs() < 1e-12);
        assert!((f64_of(&out.result, "title_entropy") - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn unusable_records_are_skipped() {
        let out = run(&[
            json!({"title": "ok", "body": "b"}),
            json!({"title": 5, "body": "b"}),
            json!({"body": "no title"}),
            json!("a string"),
            json!(null),
        ]);
        assert_eq!(out.records_done, 1);
        assert_eq!(out.records_invalid, 4);
        assert_eq!(out.result["processed_count"], 1);
    }

    #[test]
    fn summary_does_not_depend_on_batching() {
        let posts: Vec<Value> = (0..37)
            .map(|i| json!({"title": format!("title number {i}"), "body": "b".repeat(i)}))
            .collect();
        let whole = run(&posts).result;
        let parts: Vec<Value> = posts.chunks(5).map(|c| run(c).result).collect();
        let summary = PostStats.aggregate(&parts);
        assert_eq!(summary["processed_count"], 37);
        assert_eq!(summary["max_body_length"], whole["max_body_length"]);
        assert_eq!(summary["avg_title_length"], whole["avg_title_length"]);
        assert!(
            (f64_of(&summary, "title_entropy") - f64_of(&whole, "title_entropy")).abs() < 1e-12
        );
    }

    #[test]
    fn distinct_characters_match_a_hash_set() {
        for t in ["Hello", "ÉéE e", "\u{212A}k", "İi", "日本日本", ""] {
            let expected: std::collections::HashSet<char> = t.to_lowercase().chars().collect();
            assert_eq!(distinct_lowercase_chars(t), expected.len(), "{t}");
        }
    }

    #[test]
    fn empty_batch() {
        let out = run(&[]);
        assert_eq!(out.result["processed_count"], 0);
        assert_eq!(out.result["avg_title_length"], 0.0);
    }
}
