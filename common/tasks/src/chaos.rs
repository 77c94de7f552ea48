//! `chaos`: a task for testing a deployment's failure handling.
//!
//! Params: `fail_rate` (0..1, default 0), `fail` (`transient`, `permanent`, `panic` or `abort`,
//! which kills the worker process; default `transient`), `sleep_ms` (per batch), `spin_us` (CPU per record), `seed`. Whether an attempt
//! fails is a pure function of seed, job, batch and attempt ([`fails`]), so that a test can
//! predict which batches fail and how often.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use taskmill_task::hash::draw;
use taskmill_task::{hash::mix, u64_of, Task, TaskContext, TaskError, TaskOutput};

/// The `chaos` task.
pub struct Chaos;

/// Whether this attempt of this batch fails, for the given seed and rate.
pub fn fails(fail_rate: f64, seed: u64, job: &str, batch: u64, attempt: u32) -> bool {
    draw(seed, job, batch, attempt) < fail_rate
}

impl Task for Chaos {
    fn name(&self) -> &'static str {
        "chaos"
    }

    fn run(&self, ctx: &TaskContext<'_>, records: &[Value]) -> Result<TaskOutput, TaskError> {
        let fail_rate: f64 = ctx.param("fail_rate", 0.0)?;
        let seed: u64 = ctx.param("seed", 0)?;
        let sleep_ms: u64 = ctx.param("sleep_ms", 0)?;
        let spin_us: u64 = ctx.param("spin_us", 0)?;
        let kind = ctx.str_param("fail", "transient");
        if sleep_ms > 0 {
            // Deliberately holds this rayon thread, as a slow task would.
            std::thread::sleep(Duration::from_millis(sleep_ms));
        }
        if spin_us > 0 {
            let until = Instant::now() + Duration::from_micros(spin_us * records.len() as u64);
            let mut x = 0u64;
            while Instant::now() < until {
                x = std::hint::black_box(mix(x));
            }
        }
        if fails(fail_rate, seed, ctx.job, ctx.batch, ctx.attempt) {
            let msg = format!(
                "chaos: batch {} attempt {} fails (seed {seed}, rate {fail_rate})",
                ctx.batch, ctx.attempt
            );
            return match kind {
                "permanent" => Err(TaskError::Permanent(msg)),
                "panic" => panic!("{msg}"),
                // Kills the whole worker process, as a segfault or the OOM killer would: for
                // testing crash loops against worker processes (never in-process workers).
                "abort" => {
                    eprintln!("{msg}: aborting the process");
                    std::process::abort()
                }
                "transient" => Err(TaskError::Transient(msg)),
                other => Err(TaskError::Permanent(format!(
                    "chaos: fail={other:?} is not one of transient, permanent, panic, abort"
                ))),
            };
        }
        Ok(TaskOutput {
            result: json!({"records": records.len(), "attempt": ctx.attempt}),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }

    fn description(&self) -> &'static str {
        "Fails, sleeps or spins on purpose, to test a deployment's failure handling"
    }

    fn params(&self) -> Vec<taskmill_task::ParamSpec> {
        use taskmill_task::{ParamKind, ParamSpec};
        vec![
            ParamSpec::new(
                "fail_rate",
                ParamKind::Float,
                "0",
                "share of attempts that fail, 0 to 1",
            )
            .range(0.0, 1.0),
            ParamSpec::new(
                "fail",
                ParamKind::Str,
                "transient",
                "how: transient, permanent, panic or abort",
            )
            .choices(&["transient", "permanent", "panic", "abort"]),
            ParamSpec::new("sleep_ms", ParamKind::Int, "0", "ms each batch sleeps").at_least(0.0),
            ParamSpec::new(
                "spin_us",
                ParamKind::Int,
                "0",
                "CPU microseconds per record",
            )
            .at_least(0.0),
            ParamSpec::new("seed", ParamKind::Int, "0", "seed of the failure draws"),
        ]
    }

    fn aggregate(&self, results: &[Value]) -> Value {
        let records: u64 = results.iter().map(|r| u64_of(r, "records")).sum();
        // A result is one batch; a summary (folded in pages) says how many it covers.
        let batches: u64 = results
            .iter()
            .map(|r| r.get("batches").and_then(Value::as_u64).unwrap_or(1))
            .sum();
        json!({"records": records, "batches": batches})
    }

    fn folds_in_pages(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_deterministic_and_spread() {
        assert_eq!(draw(1, "job", 3, 1), draw(1, "job", 3, 1));
        assert_ne!(draw(1, "job", 3, 1), draw(1, "job", 3, 2));
        let n = 10_000;
        let failing = (0..n).filter(|&b| fails(0.3, 7, "job", b, 1)).count();
        assert!((2_700..3_300).contains(&failing), "{failing}");
    }

    #[test]
    fn fails_as_predicted() {
        let params = [("fail_rate", "0.5"), ("seed", "9"), ("fail", "permanent")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for batch in 0..50 {
            let ctx = TaskContext {
                params: &params,
                job: "j",
                batch,
                attempt: 1,
                deadline: None,
            };
            let res = Chaos.run(&ctx, &[json!(1)]);
            assert_eq!(res.is_err(), fails(0.5, 9, "j", batch, 1));
        }
    }
}
