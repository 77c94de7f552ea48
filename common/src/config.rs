//! Connection settings shared by every command, and URL redaction.
//!
//! Every setting is a flag with an environment variable behind it; defaults come last.

use clap::Args;

/// Where the broker and Redis are, and which namespace this process works in.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// RabbitMQ URL (amqp:// or amqps://); `?heartbeat=N` sets the AMQP heartbeat in seconds.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    pub amqp_url: String,

    /// Redis URL (redis:// or rediss://).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0",
        global = true
    )]
    pub redis_url: String,

    /// RabbitMQ management API, for queue views.
    #[arg(
        long,
        env = "RABBITMQ_API_URL",
        default_value = "http://guest:guest@127.0.0.1:15672/api",
        global = true
    )]
    pub rabbitmq_api_url: String,

    /// Prefix of every exchange, queue and Redis key: two namespaces never see each other's work.
    #[arg(
        long,
        env = "TASKMILL_NAMESPACE",
        default_value = "taskmill",
        global = true
    )]
    pub namespace: String,

    /// How long job state and results stay in Redis, in seconds (default 7 days).
    #[arg(long, env = "TASKMILL_RESULT_TTL", default_value_t = 7 * 24 * 3600, global = true)]
    pub result_ttl: u64,
}

impl ConnArgs {
    /// Settings for the local services under the given namespace (tests and tools).
    pub fn local(namespace: &str) -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            rabbitmq_api_url: "http://guest:guest@127.0.0.1:15672/api".into(),
            namespace: namespace.into(),
            result_ttl: 24 * 3600,
        }
    }
}

/// A URL with its password replaced by `***`, safe for logs and error messages.
pub fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
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

/// Checks that a namespace or queue name is safe inside AMQP names and Redis keys.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} {name:?} is not valid: use 1 to 100 characters from A-Z, a-z, 0-9, '-', '_' and '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert!(!redact("rediss://:pw@h/0").contains("pw"));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("namespace", "taskmill").is_ok());
        assert!(validate_name("namespace", "t-1_a.b").is_ok());
        assert!(validate_name("namespace", "").is_err());
        assert!(validate_name("queue", "a b").is_err());
        assert!(validate_name("queue", "a:b").is_err());
    }
}
