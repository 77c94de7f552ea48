//! Delivering completion webhooks (`enqueue --on-complete URL`): every worker looks at the
//! namespace's `hooks` set (see `taskmill_store::hooks`) twice a second; for each job due
//! there it claims the entry, POSTs the job's final status (the JSON of `status --json`) and
//! records the attempt: a 2xx answer delivers it; anything else (an error status, a refused
//! connection, a timeout) is tried again after a backoff (1 s, doubling, at most 10 min),
//! until [`MAX_ATTEMPTS`]. At least once: a worker that dies after the POST and before
//! recording it leaves the entry to be delivered again, so receivers deduplicate on the
//! `Idempotency-Key` header (the job id). With `--webhook-secret`, the body is signed:
//! `X-Taskmill-Signature: sha256=HEX` (HMAC-SHA256 of the body with the secret).

use std::time::Duration;

use hmac::{Hmac, Mac};
use taskmill_common::store::{hooks::HookAttempt, Store};
use tracing::{info, warn};

/// Attempts before a webhook is given up on (about 37 minutes of backoff in all).
pub const MAX_ATTEMPTS: u64 = 12;
/// How long one attempt may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A claim outlives an attempt: a worker that dies holding one delays the delivery this long.
const CLAIM_MS: u64 = 15_000;
/// Entries looked at per sweep.
const PER_SWEEP: usize = 16;

/// The delay before attempt `n + 1` after `n` failed ones.
pub fn backoff(n: u64) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(20);
    Duration::from_secs(secs.min(600))
}

/// The signature header's value for `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// One sweep: deliver what is due.
pub(crate) async fn sweep(store: Store, http: &reqwest::Client, secret: Option<&str>, who: &str) {
    let Ok(due) = store.hooks_due(PER_SWEEP).await else {
        return;
    };
    for job in due {
        match store.claim_hook(&job, who, CLAIM_MS).await {
            Ok(true) => {}
            _ => continue,
        }
        let attempt = deliver(&store, http, secret, &job).await;
        match store.hook_attempted(&job, &attempt).await {
            Ok(n) => match &attempt {
                HookAttempt::Delivered => info!(job = %job, attempts = n, "webhook delivered"),
                HookAttempt::Retry(e, _) => {
                    warn!(job = %job, attempts = n, "webhook attempt failed: {e}; trying again")
                }
                HookAttempt::GaveUp(e) => {
                    warn!(job = %job, attempts = n, "webhook given up: {e}")
                }
            },
            Err(e) => warn!(job = %job, "recording a webhook attempt: {e}"),
        }
    }
}

/// One attempt at `job`'s webhook.
async fn deliver(
    store: &Store,
    http: &reqwest::Client,
    secret: Option<&str>,
    job: &str,
) -> HookAttempt {
    let status = match store.job_status(job).await {
        Ok(Some(s)) => s,
        Ok(None) => return HookAttempt::GaveUp("the job is gone (expired or deleted)".into()),
        // Attempts unknown: tried again after the first backoff.
        Err(e) => return failed(0, format!("reading the job: {e}")),
    };
    let Some(url) = status.on_complete.clone() else {
        return HookAttempt::GaveUp("the job has no webhook URL".into());
    };
    let body = serde_json::to_vec(&status.to_json()).unwrap_or_default();
    let mut req = http
        .post(&url)
        .timeout(TIMEOUT)
        .header("content-type", "application/json")
        .header("idempotency-key", job)
        .header("x-taskmill-event", "job.finished")
        .header("x-taskmill-attempt", (status.hook_attempts + 1).to_string());
    if let Some(secret) = secret {
        req = req.header("x-taskmill-signature", signature(secret, &body));
    }
    match req.body(body).send().await {
        Ok(resp) if resp.status().is_success() => HookAttempt::Delivered,
        Ok(resp) => failed(
            status.hook_attempts,
            format!("{url} answered {}", resp.status()),
        ),
        Err(e) => {
            let why = taskmill_common::error_text(&e);
            failed(status.hook_attempts, format!("{url}: {why}"))
        }
    }
}

/// A failed attempt after `before` earlier ones: again after the backoff, or given up after
/// [`MAX_ATTEMPTS`].
fn failed(before: u64, why: String) -> HookAttempt {
    let made = before + 1;
    if made >= MAX_ATTEMPTS {
        HookAttempt::GaveUp(format!("{why} (after {made} attempts)"))
    } else {
        let at = taskmill_common::now_ms() + backoff(made).as_millis() as u64;
        HookAttempt::Retry(why, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_minutes_and_the_signature_is_hmac_sha256() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(11), Duration::from_secs(600));
        assert_eq!(backoff(40), Duration::from_secs(600));
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
