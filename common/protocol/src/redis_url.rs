//! `REDIS_URL` beyond what the Redis client parses: the Sentinel form and the replication
//! options every form takes.
//!
//! ```text
//! redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/MASTER_NAME[/DB][?options]
//! rediss+sentinel://...   (TLS to the primary)
//! redis://host:6379/0?wait_replicas=1&wait_timeout_ms=1000
//! ```
//!
//! The user and password are the primary's (as in a `redis://` URL). Options:
//! - `sentinel_username`, `sentinel_password`: for sentinels that require a password (none
//!   by default: most deployments leave sentinels open to the data network only);
//! - `wait_replicas=N`: after every write that must survive a failover (a stored result, a
//!   registration, a retry), `WAIT` for N replicas before the write counts as done (and before
//!   a worker acks the batch). Default 1 under Sentinel, 0 for a single Redis;
//! - `wait_timeout_ms=T`: how long that `WAIT` may take (default 1000); fewer replicas in
//!   time make the write fail as a passing error (the batch is retried, not acked).

/// The replication a write waits for (`WAIT replicas timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitFor {
    /// Replicas that must acknowledge (0: no WAIT).
    pub replicas: u32,
    /// Milliseconds `WAIT` may block.
    pub timeout_ms: u64,
}

/// Default `wait_timeout_ms`.
pub const DEFAULT_WAIT_TIMEOUT_MS: u64 = 1000;

/// A `redis+sentinel://` URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, as given.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// Database number.
    pub db: i64,
    /// TLS to the primary (`rediss+sentinel://`).
    pub tls: bool,
    /// The primary's user (ACL), if any.
    pub username: Option<String>,
    /// The primary's password, if any.
    pub password: Option<String>,
    /// The sentinels' user, if any.
    pub sentinel_username: Option<String>,
    /// The sentinels' password, if any.
    pub sentinel_password: Option<String>,
}

impl SentinelUrl {
    /// A `redis://` (or `rediss://`) URL of the primary found at `host:port`.
    pub fn primary_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = userinfo(&self.username, &self.password);
        format!("{scheme}://{auth}{}:{port}/{}", bracketed(host), self.db)
    }

    /// A `redis://` URL of one sentinel (with the sentinels' credentials).
    pub fn sentinel_url(&self, host: &str, port: u16) -> String {
        let auth = userinfo(&self.sentinel_username, &self.sentinel_password);
        format!("redis://{auth}{}:{port}", bracketed(host))
    }

    /// The sentinels as `host:port,host:port`, for messages.
    pub fn sentinel_list(&self) -> String {
        self.sentinels
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a `REDIS_URL` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis: the URL for the client (without taskmill's own options).
    Direct(String),
    /// A primary found through sentinels.
    Sentinel(SentinelUrl),
}

/// A `REDIS_URL`, parsed: where Redis is and what writes wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSpec {
    /// Where.
    pub target: RedisTarget,
    /// What every write that must survive a failover waits for.
    pub wait: WaitFor,
}

/// Whether `raw` is in the Sentinel form.
pub fn is_sentinel(raw: &str) -> bool {
    let raw = raw.trim();
    raw.starts_with("redis+sentinel://") || raw.starts_with("rediss+sentinel://")
}

/// Parses a `REDIS_URL`; the error says what is wrong, without the password.
pub fn parse(raw: &str) -> Result<RedisSpec, String> {
    let raw = raw.trim();
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, q),
        None => (raw, ""),
    };
    let mut wait_replicas = None;
    let mut wait_timeout_ms = DEFAULT_WAIT_TIMEOUT_MS;
    let mut sentinel_username = None;
    let mut sentinel_password = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = dec(v);
        match k {
            "wait_replicas" => {
                wait_replicas = Some(value.parse::<u32>().map_err(|_| {
                    format!("REDIS_URL option wait_replicas={value:?} is not a whole number")
                })?)
            }
            "wait_timeout_ms" => {
                wait_timeout_ms = value
                    .parse::<u64>()
                    .ok()
                    .filter(|t| *t > 0)
                    .ok_or_else(|| {
                        format!("REDIS_URL option wait_timeout_ms={value:?} is not a positive whole number of milliseconds")
                    })?
            }
            "sentinel_username" => sentinel_username = Some(value),
            "sentinel_password" => sentinel_password = Some(value),
            _ => kept.push(pair),
        }
    }
    if !is_sentinel(base) {
        if sentinel_username.is_some() || sentinel_password.is_some() {
            return Err("REDIS_URL options sentinel_username and sentinel_password need the redis+sentinel:// form".into());
        }
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok(RedisSpec {
            target: RedisTarget::Direct(url),
            wait: WaitFor {
                replicas: wait_replicas.unwrap_or(0),
                timeout_ms: wait_timeout_ms,
            },
        });
    }
    if let Some(k) = kept.first() {
        return Err(format!(
            "REDIS_URL option {:?} is not one of wait_replicas, wait_timeout_ms, sentinel_username, sentinel_password",
            k.split('=').next().unwrap_or(k)
        ));
    }
    let (tls, rest) = match base.strip_prefix("rediss+sentinel://") {
        Some(r) => (true, r),
        None => (
            false,
            base.strip_prefix("redis+sentinel://").unwrap_or(base),
        ),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            (
                Some(dec(user)).filter(|s| !s.is_empty()),
                pass.map(dec).filter(|s| !s.is_empty()),
            )
        }
    };
    let mut sentinels = Vec::new();
    for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        sentinels.push(host_port(h)?);
    }
    if sentinels.is_empty() {
        return Err(
            "REDIS_URL redis+sentinel:// names no sentinel (host:port,host:port,...)".into(),
        );
    }
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let master = parts.next().map(dec).ok_or(
        "REDIS_URL redis+sentinel:// names no primary: add /MASTER_NAME after the sentinels",
    )?;
    let db = match parts.next() {
        None => 0,
        Some(d) => d
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| format!("REDIS_URL database {d:?} is not a number"))?,
    };
    if parts.next().is_some() {
        return Err("REDIS_URL redis+sentinel:// path is /MASTER_NAME/DB; it has more".into());
    }
    Ok(RedisSpec {
        target: RedisTarget::Sentinel(SentinelUrl {
            sentinels,
            master,
            db,
            tls,
            username,
            password,
            sentinel_username,
            sentinel_password,
        }),
        wait: WaitFor {
            replicas: wait_replicas.unwrap_or(1),
            timeout_ms: wait_timeout_ms,
        },
    })
}

/// A Sentinel URL without its passwords, for logs and messages.
pub fn redact_sentinel(raw: &str) -> String {
    match parse(raw) {
        Ok(RedisSpec {
            target: RedisTarget::Sentinel(s),
            wait,
        }) => {
            let scheme = if s.tls {
                "rediss+sentinel"
            } else {
                "redis+sentinel"
            };
            let auth = match (&s.username, &s.password) {
                (None, None) => String::new(),
                (u, None) => format!("{}@", u.as_deref().unwrap_or("")),
                (u, Some(_)) => format!("{}:***@", u.as_deref().unwrap_or("")),
            };
            let mut opts = vec![
                format!("wait_replicas={}", wait.replicas),
                format!("wait_timeout_ms={}", wait.timeout_ms),
            ];
            if let Some(u) = &s.sentinel_username {
                opts.push(format!("sentinel_username={u}"));
            }
            if s.sentinel_password.is_some() {
                opts.push("sentinel_password=***".into());
            }
            format!(
                "{scheme}://{auth}{}/{}/{}?{}",
                s.sentinel_list(),
                s.master,
                s.db,
                opts.join("&")
            )
        }
        _ => "<unparseable redis+sentinel URL>".into(),
    }
}

fn host_port(h: &str) -> Result<(String, u16), String> {
    let bad = || format!("REDIS_URL sentinel {h:?} is not host:port");
    if let Some(rest) = h.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => 26379,
            None => return Err(bad()),
        };
        return Ok((host.to_string(), port));
    }
    match h.rsplit_once(':') {
        Some((host, p)) if !host.is_empty() => {
            Ok((host.to_string(), p.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None => Ok((h.to_string(), 26379)),
    }
}

/// An IPv6 address in brackets, as a URL's host.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `user:password@` (encoded), or nothing without either.
fn userinfo(user: &Option<String>, password: &Option<String>) -> String {
    match (user, password) {
        (None, None) => String::new(),
        (u, p) => format!(
            "{}:{}@",
            enc(u.as_deref().unwrap_or("")),
            enc(p.as_deref().unwrap_or(""))
        ),
    }
}

fn dec(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_form() {
        let spec = parse("redis+sentinel://:p%40ss@h1:26391,[::1]:26392,h3/mymaster/2").unwrap();
        let RedisTarget::Sentinel(s) = spec.target else {
            panic!("not sentinel")
        };
        assert_eq!(
            s.sentinels,
            vec![
                ("h1".to_string(), 26391),
                ("::1".to_string(), 26392),
                ("h3".to_string(), 26379)
            ]
        );
        assert_eq!(s.master, "mymaster");
        assert_eq!(s.db, 2);
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert_eq!(s.primary_url("::1", 6391), "redis://:p%40ss@[::1]:6391/2");
        assert_eq!(
            spec.wait,
            WaitFor {
                replicas: 1,
                timeout_ms: 1000
            }
        );
    }

    #[test]
    fn options_and_errors() {
        let spec =
            parse("redis://127.0.0.1:6379/0?wait_replicas=2&wait_timeout_ms=50&protocol=resp3")
                .unwrap();
        assert_eq!(
            spec.target,
            RedisTarget::Direct("redis://127.0.0.1:6379/0?protocol=resp3".into())
        );
        assert_eq!(
            spec.wait,
            WaitFor {
                replicas: 2,
                timeout_ms: 50
            }
        );
        assert_eq!(parse("redis://h/0").unwrap().wait.replicas, 0);
        assert!(parse("redis+sentinel://h1:26379")
            .unwrap_err()
            .contains("MASTER_NAME"));
        assert!(parse("redis+sentinel://h1:x/m")
            .unwrap_err()
            .contains("host:port"));
        assert!(parse("redis+sentinel://h1/m?wait_replica=1")
            .unwrap_err()
            .contains("wait_replica"));
        assert!(parse("redis://h/0?sentinel_password=x").is_err());
        let shown = redact_sentinel("redis+sentinel://u:secret@h1:1,h2:2/m/0?sentinel_password=s2");
        assert!(
            !shown.contains("secret") && !shown.contains("s2"),
            "{shown}"
        );
        assert!(
            shown.starts_with("redis+sentinel://u:***@h1:1,h2:2/m/0"),
            "{shown}"
        );
    }
}
