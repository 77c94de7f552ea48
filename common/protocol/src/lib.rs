//! taskmill-protocol: the contract every part shares, with no I/O.
//!
//! - [`envelope`]: the versioned batch envelope, its MessagePack codec and message headers.
//! - [`names`]: names of exchanges, queues and Redis keys; name and job-id rules.
//! - [`state`]: the job states.
//! - [`transcode`]: JSON text straight to MessagePack (the producer's records).
//! - [`redis_url`]: the Sentinel form of `REDIS_URL` and the replication options.
//! - [`dead`]: why a batch was dead-lettered, as written into and read from its headers.

pub mod dead;
pub mod envelope;
pub mod names;
pub mod redis_url;
pub mod state;
pub mod transcode;

pub use dead::DeadKind;
pub use state::JobState;

/// Milliseconds since the Unix epoch, the unit of every time taskmill stores.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An error and its causes in one line, each cause once: a cause whose text its parent
/// already shows is not repeated.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

/// What a panic said (its `&str` or `String` payload).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// A URL with its password replaced by `***`, safe for logs and error messages; a list of
/// URLs separated by commas (the nodes of a cluster) has each one's replaced.
pub fn redact(raw: &str) -> String {
    if redis_url::is_sentinel(raw) {
        return redis_url::redact_sentinel(raw);
    }
    if raw.contains(',') {
        return raw.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(raw)
}

/// The URLs of a setting that takes several (the nodes of one RabbitMQ cluster, separated by
/// commas), in the order given; a setting with one URL is a list of one.
pub fn url_list(raw: &str) -> Vec<&str> {
    raw.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

fn redact_one(raw: &str) -> String {
    match url::Url::parse(raw.trim()) {
        Ok(mut u) => {
            if u.password().is_some() {
                // set_password only fails for URLs that cannot have one, which has none then.
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_passwords() {
        use super::redact;
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("amqp://u:a@h1:5672/%2f,amqp://u:b@h2:5672/%2f"),
            "amqp://u:***@h1:5672/%2f,amqp://u:***@h2:5672/%2f"
        );
        assert!(!redact("rediss://:pw@h/0").contains("pw"));
    }
}
