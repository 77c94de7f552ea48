//! Connection settings shared by every command, and URL redaction.
//!
//! Every setting is a flag with an environment variable behind it; defaults come last.

use clap::Args;

pub use taskmill_protocol::{
    names::{validate_job_id, validate_name},
    redact,
};

/// Where the broker and Redis are, and which namespace this process works in.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Connection")]
pub struct ConnArgs {
    /// TOML file of settings (keys as the flags, with `_`): below flags and the environment,
    /// above the defaults.
    #[arg(long, env = "TASKMILL_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,

    /// RabbitMQ URL (amqp:// or amqps://); `?heartbeat=N` sets the AMQP heartbeat in seconds.
    /// Several nodes of one cluster, separated by commas: a connection goes to the first that
    /// answers, in a shuffled order, and a lost one moves on to the next.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    pub amqp_url: String,

    /// Redis URL (redis:// or rediss://), or the primary named by sentinels:
    /// `redis+sentinel://[:password@]host1:26379,host2:26379/MASTER_NAME/DB` (rediss+sentinel://
    /// for TLS). Options: `?wait_replicas=N` (writes wait for N replicas before a batch is acked;
    /// 1 under Sentinel, else 0), `wait_timeout_ms=T` (1000), `sentinel_password=...`.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/0",
        global = true
    )]
    pub redis_url: String,

    /// RabbitMQ management API, for queue views; several nodes' APIs separated by commas are
    /// tried in turn.
    #[arg(
        long,
        env = "RABBITMQ_API_URL",
        hide_env_values = true,
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
            config: None,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            rabbitmq_api_url: "http://guest:guest@127.0.0.1:15672/api".into(),
            namespace: namespace.into(),
            result_ttl: 24 * 3600,
        }
    }

    /// The client library's settings for these connection options (the one conversion: the
    /// producer's commands, the dashboard and the worker's outbox sweeper use it).
    pub fn client_settings(&self) -> taskmill_client::Settings {
        taskmill_client::Settings {
            amqp_url: self.amqp_url.clone(),
            redis_url: self.redis_url.clone(),
            namespace: self.namespace.clone(),
            result_ttl: self.result_ttl,
        }
    }
}

impl ConnArgs {
    /// Checks the namespace and the URLs before anything connects, so that a typo is one clear
    /// error instead of a connection retried.
    pub fn check(&self) -> Result<(), String> {
        validate_name("namespace", &self.namespace)?;
        check_urls("--amqp-url", &self.amqp_url, &["amqp", "amqps"])?;
        taskmill_protocol::redis_url::parse(&self.redis_url)
            .map_err(|e| format!("--redis-url: {e}"))?;
        if !taskmill_protocol::redis_url::is_sentinel(&self.redis_url) {
            check_url(
                "--redis-url",
                &self.redis_url,
                &["redis", "rediss", "unix", "redis+unix"],
            )?;
        }
        check_urls(
            "--rabbitmq-api-url",
            &self.rabbitmq_api_url,
            &["http", "https"],
        )
    }
}

/// Checks a setting that may list several URLs (the nodes of one cluster), each one.
fn check_urls(flag: &str, raw: &str, schemes: &[&str]) -> Result<(), String> {
    let list = taskmill_protocol::url_list(raw);
    if list.is_empty() {
        return Err(format!("{flag} is empty"));
    }
    list.into_iter()
        .try_for_each(|one| check_url(flag, one, schemes))
}

fn check_url(flag: &str, raw: &str, schemes: &[&str]) -> Result<(), String> {
    match url::Url::parse(raw) {
        Ok(u) if schemes.contains(&u.scheme()) => Ok(()),
        Ok(u) => Err(format!(
            "{flag} {} has scheme {:?}; expected {}",
            redact(raw),
            u.scheme(),
            schemes.join(", ")
        )),
        Err(e) => Err(format!("{flag} is not a URL ({e})")),
    }
}

/// Every key a config file may hold, for either binary: the long names (with `_`) of the
/// flags that have an environment variable. Each binary applies the keys of its own flags and
/// passes over the other's; a key of neither is an error. (A test checks this list against
/// both binaries' flags.)
pub const SETTING_KEYS: &[&str] = &[
    "amqp_url",
    "batch_size",
    "celery_alias",
    "celery_key_prefix",
    "celery_queue",
    "celery_queue_type",
    "celery_result_expires",
    "celery_result_serializer",
    "concurrency",
    "confirm_window",
    "follow_redirects",
    "gather_ms",
    "http_retries",
    "http_timeout",
    "lease_seconds",
    "linger_ms",
    "listen",
    "log_format",
    "max_message_bytes",
    "max_record_bytes",
    "max_response_bytes",
    "max_result_bytes",
    "metrics_addr",
    "namespace",
    "prefetch",
    "queue",
    "rabbitmq_api_url",
    "redis_url",
    "result_ttl",
    "retry_base_ms",
    "retry_factor",
    "retry_max_attempts",
    "retry_max_delay_ms",
    "shards",
    "shutdown_timeout",
    "stall_after",
    "task",
    "threads",
    "token",
    "unknown_task_wait",
    "webhook_secret",
];

/// The settings of a command line: (key, environment variable) for every flag of `cmd` and
/// its subcommands that has an environment variable, the key being the long name with `_`.
pub fn settings_of(cmd: &clap::Command) -> Vec<(String, String)> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, String)>) {
        for a in cmd.get_arguments() {
            if let (Some(long), Some(env)) = (a.get_long(), a.get_env()) {
                let key = long.replace('-', "_");
                if key != "config" && !out.iter().any(|(k, _)| *k == key) {
                    out.push((key, env.to_string_lossy().into_owned()));
                }
            }
        }
        for sc in cmd.get_subcommands() {
            walk(sc, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, &mut out);
    out.sort();
    out
}

/// The config file named by `--config PATH` / `--config=PATH` in `args`, else by
/// `TASKMILL_CONFIG`.
pub fn config_path(args: &[String]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(Into::into);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    std::env::var_os("TASKMILL_CONFIG").map(Into::into)
}

fn toml_text(key: &str, shown: &str, value: toml::Value) -> Result<String, String> {
    Ok(match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| i.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => return Err(format!("setting {key:?} in {shown} cannot be {other}")),
    })
}

/// The settings of a TOML config file for binary `binary` (`worker` or `producer`) with the
/// given `settings` (see [`settings_of`]), as (environment variable, value) pairs. Top-level
/// keys apply to both binaries; a `[worker]` or `[producer]` table applies to that binary
/// only, above the top level. Keys that neither binary knows, and values that are not
/// strings, numbers, booleans or arrays, are errors.
pub fn read_config(
    path: &std::path::Path,
    binary: &str,
    settings: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {shown}: {e}"))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {shown} is not valid TOML: {e}"))?;
    let mut top = Vec::new();
    let mut own = Vec::new();
    for (key, value) in table {
        if key == "worker" || key == "producer" {
            let toml::Value::Table(inner) = value else {
                return Err(format!("[{key}] in {shown} must be a table"));
            };
            if key == binary {
                own.extend(inner);
            }
            continue;
        }
        top.push((key, value));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, value) in top.into_iter().chain(own) {
        let norm = key.replace('-', "_");
        if !SETTING_KEYS.contains(&norm.as_str()) {
            return Err(format!(
                "unknown setting {key:?} in config file {shown}; known: {}",
                SETTING_KEYS.join(", ")
            ));
        }
        let Some((_, env)) = settings.iter().find(|(k, _)| *k == norm) else {
            continue; // the other binary's
        };
        let text = toml_text(&key, &shown, value)?;
        out.retain(|(e, _)| e != env);
        out.push((env.clone(), text));
    }
    Ok(out)
}

/// Applies the config file (if any) under the environment: each setting becomes its
/// environment variable unless that is already set. Call before parsing the command line and
/// before any other thread starts.
pub fn apply_config_file(args: &[String], binary: &str, cmd: &clap::Command) -> Result<(), String> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    for (env, value) in read_config(&path, binary, &settings_of(cmd))? {
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_map_to_environment_variables() {
        let dir = std::env::temp_dir().join(format!("tm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings: Vec<(String, String)> = [
            ("namespace", "TASKMILL_NAMESPACE"),
            ("prefetch", "TASKMILL_PREFETCH"),
            ("queue", "TASKMILL_QUEUES"),
            ("retry_factor", "TASKMILL_RETRY_FACTOR"),
        ]
        .iter()
        .map(|(k, e)| (k.to_string(), e.to_string()))
        .collect();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "namespace = \"prod\"\nprefetch = 32\nqueue = [\"a\", \"b\"]\nretry-factor = 1.5\n\
             batch_size = 5\n[worker]\nprefetch = 8\n[producer]\nqueue = \"c\"\n",
        )
        .unwrap();
        let mut got = read_config(&good, "worker", &settings).unwrap();
        got.sort();
        let want: Vec<(String, String)> = [
            ("TASKMILL_NAMESPACE", "prod"),
            ("TASKMILL_PREFETCH", "8"),
            ("TASKMILL_QUEUES", "a,b"),
            ("TASKMILL_RETRY_FACTOR", "1.5"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "nmespace = \"x\"\n").unwrap();
        assert!(read_config(&bad, "worker", &settings)
            .unwrap_err()
            .contains("unknown setting \"nmespace\""));
        std::fs::write(&bad, "namespace = \n").unwrap();
        assert!(read_config(&bad, "worker", &settings)
            .unwrap_err()
            .contains("not valid TOML"));
        assert!(read_config(&dir.join("missing.toml"), "worker", &settings).is_err());
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            config_path(&args(&["worker", "--config", "/x.toml"])),
            Some("/x.toml".into())
        );
        assert_eq!(
            config_path(&args(&["producer", "--config=/y.toml", "jobs"])),
            Some("/y.toml".into())
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
