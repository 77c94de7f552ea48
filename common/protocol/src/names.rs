//! Names: exchanges and queues on the broker, keys in Redis, and the rules for namespaces,
//! queue names and job ids.
//!
//! Broker (namespace `ns`): `{ns}.work` (direct exchange), `{ns}.{queue}` (work queues),
//! `{ns}.dlx` (dead-letter fanout) → `{ns}.dead` and `{ns}.dead.events`,
//! `{ns}.{queue}.delay.{ms}` (retry delays), `{ns}.{queue}.s{i}` (shards). Redis: `{ns}:job:{job}`, `{ns}:job:{job}:results`,
//! `{ns}:job:{job}:dead`, `{ns}:jobs`.
//!
//! Namespaces and queue names cannot contain `.` and job ids cannot contain `:`, so every
//! name has exactly one reading.

/// Default short name of the work queue.
pub const DEFAULT_QUEUE: &str = "tasks";

/// How many times the broker delivers a batch before it dead-letters it itself. Counts
/// deliveries that ended without an ack (a worker died or lost its connection); taskmill's
/// own retries are new messages and do not count here.
pub const DELIVERY_LIMIT: i64 = 10;

/// The delays a retry can wait, in ms: a small fixed set, so that a work queue has at most
/// this many delay queues whatever the retry settings. A computed delay is rounded to one of
/// its two neighbouring tiers (see the worker's retry policy).
pub const DELAY_TIERS_MS: &[u64] = &[
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_800_000, 3_600_000, 10_800_000, 21_600_000, 43_200_000, 86_400_000,
];

/// The longest delay tier no longer than `ms` (the shortest tier when `ms` is below it): a
/// batch that must wait `ms` waits this long in a delay queue, then again for what is left,
/// so it never comes back early by more than nothing and late by at most the shortest tier.
pub fn tier_at_most(ms: u64) -> u64 {
    DELAY_TIERS_MS
        .iter()
        .rev()
        .copied()
        .find(|&t| t <= ms)
        .unwrap_or(DELAY_TIERS_MS[0])
}

/// Priority bands: each work queue `{ns}.{queue}` (priority 0) has a queue for each band
/// beside it, `{ns}.{queue}.{band}` (routing key `{queue}.{band}`): `p1` takes priorities 1
/// to 4, `p5` takes 5 to 9. Quorum queues have no message priorities here; a band is a queue
/// that workers consume beside the others, so its batches do not wait behind their backlog.
pub const PRIORITY_BANDS: &[(u8, &str)] = &[(1, "p1"), (5, "p5")];

/// The short name (routing key) of the queue that priority `priority` of work queue `queue`
/// goes to.
pub fn priority_queue(queue: &str, priority: u8) -> String {
    match PRIORITY_BANDS
        .iter()
        .rev()
        .find(|(min, _)| priority >= *min)
    {
        Some((_, band)) => format!("{queue}.{band}"),
        None => queue.to_string(),
    }
}

/// The work queue a routed queue belongs to: `tasks` for `tasks`, its bands `tasks.p5`... and
/// its shards `tasks.s1`...
pub fn base_queue(routed: &str) -> &str {
    let unsharded = retry_queue(routed);
    PRIORITY_BANDS
        .iter()
        .find_map(|(_, band)| unsharded.strip_suffix(band)?.strip_suffix('.'))
        .unwrap_or(unsharded)
}

/// Most shards a work queue may be spread over.
pub const MAX_SHARDS: u16 = 16;

/// The short name (routing key) of shard `shard` of work queue `queue`: the queue itself for
/// shard 0 (an unsharded queue is its own only shard), `{queue}.s{shard}` for the others.
pub fn shard_queue(queue: &str, shard: u16) -> String {
    if shard == 0 {
        queue.to_string()
    } else {
        format!("{queue}.s{shard}")
    }
}

/// The shard a routed queue is: `Some((queue, n))` for `{queue}.s{n}` (n ≥ 1).
fn shard_of(routed: &str) -> Option<(&str, u16)> {
    let (queue, shard) = routed.rsplit_once('.')?;
    let n = shard.strip_prefix('s')?;
    if n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u16 = n.parse().ok()?;
    (1..MAX_SHARDS).contains(&n).then_some((queue, n))
}

/// Where a batch of a routed queue comes back to after a retry or a countdown: a priority band
/// to itself, a shard to its work queue (retries do not keep their shard: one set of delay
/// queues a work queue, whatever its shards).
pub fn retry_queue(routed: &str) -> &str {
    shard_of(routed).map_or(routed, |(queue, _)| queue)
}

/// The short names a worker consumes for work queue `queue` spread over `shards` shards:
/// every shard, then the priority bands (which are not sharded).
pub fn with_shards(queue: &str, shards: u16) -> Vec<String> {
    let mut out: Vec<String> = (0..shards.max(1)).map(|i| shard_queue(queue, i)).collect();
    out.extend(PRIORITY_BANDS.iter().map(|(_, b)| format!("{queue}.{b}")));
    out
}

/// How urgent a routed queue's batches are: 0 for a work queue, then 1, 2... for its priority
/// bands, lowest first (`tasks` 0, `tasks.p1` 1, `tasks.p5` 2).
pub fn band_rank(routed: &str) -> usize {
    PRIORITY_BANDS
        .iter()
        .position(|(_, band)| routed.strip_suffix(band).is_some_and(|b| b.ends_with('.')))
        .map_or(0, |i| i + 1)
}

/// How many ranks [`band_rank`] gives: the work queue and each band.
pub const BAND_RANKS: usize = PRIORITY_BANDS.len() + 1;

/// The short names of a work queue and of its priority bands.
pub fn with_bands(queue: &str) -> Vec<String> {
    std::iter::once(queue.to_string())
        .chain(PRIORITY_BANDS.iter().map(|(_, b)| format!("{queue}.{b}")))
        .collect()
}

/// Checks a short name that may carry a priority band or a shard (`tasks`, `tasks.p5`,
/// `tasks.s2`).
pub fn validate_routed_queue(short: &str) -> Result<(), String> {
    if let Some((base, _)) = shard_of(short) {
        return validate_queue(base);
    }
    match short.rsplit_once('.') {
        Some((base, band)) if PRIORITY_BANDS.iter().any(|(_, b)| *b == band) => {
            validate_queue(base)
        }
        _ => validate_queue(short),
    }
}

/// Longest queue of dead-letter events kept for counting when no worker runs.
pub const DEAD_EVENTS_MAX: i64 = 1_000_000;

/// Names of one namespace's broker objects.
#[derive(Debug, Clone)]
pub struct Names {
    /// The namespace prefix.
    pub ns: String,
}

impl Names {
    /// Names under namespace `ns`.
    pub fn new(ns: &str) -> Self {
        Self { ns: ns.to_string() }
    }
    /// The exchange that producers publish batches to.
    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.ns)
    }
    /// The full name of work queue `queue`.
    pub fn queue(&self, queue: &str) -> String {
        format!("{}.{}", self.ns, queue)
    }
    /// The dead-letter exchange.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }
    /// The dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// The queue of dead-letter copies that workers consume to count them in their jobs.
    pub fn dead_events(&self) -> String {
        format!("{}.dead.events", self.ns)
    }
    /// The delay queue that holds retries of work queue `queue` for `delay_ms`.
    pub fn delay_queue(&self, queue: &str, delay_ms: u64) -> String {
        format!("{}.{}.delay.{}", self.ns, queue, delay_ms)
    }
    /// The short queue name of a full work-queue name of this namespace.
    pub fn short_queue<'a>(&self, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(self.ns.as_str())?.strip_prefix('.')
    }
}

/// Checks a short queue name given on the command line.
pub fn validate_queue(queue: &str) -> Result<(), String> {
    validate_name("queue name", queue)?;
    if matches!(queue, "dead" | "dlx" | "work") {
        return Err(format!(
            "queue name {queue:?} is reserved for taskmill's own use"
        ));
    }
    Ok(())
}

/// The key names of one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    ns: String,
}

impl Keys {
    /// The namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Keys under namespace `ns`.
    pub fn new(ns: &str) -> Self {
        Self { ns: ns.into() }
    }
    /// The job hash.
    pub fn job(&self, job: &str) -> String {
        format!("{}:job:{job}", self.ns)
    }
    /// Batch number → result.
    pub fn results(&self, job: &str) -> String {
        format!("{}:job:{job}:results", self.ns)
    }
    /// Batch number → dead-letter reason.
    pub fn dead(&self, job: &str) -> String {
        format!("{}:job:{job}:dead", self.ns)
    }
    /// Batch number → 1, for batches dropped unrun (their job was cancelled, or they
    /// expired).
    pub fn dropped(&self, job: &str) -> String {
        format!("{}:job:{job}:dropped", self.ns)
    }
    /// `batch:attempt` → 1, for the retries counted (each once).
    pub fn retried(&self, job: &str) -> String {
        format!("{}:job:{job}:retried", self.ns)
    }
    /// Job ids by creation time.
    pub fn jobs(&self) -> String {
        format!("{}:jobs", self.ns)
    }
    /// Worker ids by their last heartbeat (ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.ns)
    }
    /// A worker's last heartbeat (JSON).
    pub fn worker(&self, id: &str) -> String {
        format!("{}:worker:{id}", self.ns)
    }
    /// The dashboard's samples of queue depths and rates (a capped list of JSON).
    pub fn queue_history(&self) -> String {
        format!("{}:dashboard:queues", self.ns)
    }
    /// The job holding unique key `key` while it is pending or running.
    pub fn unique(&self, key: &str) -> String {
        format!("{}:unique:{key}", self.ns)
    }
    /// The rate-limit state of rate key `key`.
    pub fn rate(&self, key: &str) -> String {
        format!("{}:rate:{key}", self.ns)
    }
    /// The names of the tasks live workers serve (the catalog's index).
    pub fn catalog(&self) -> String {
        format!("{}:tasks", self.ns)
    }
    /// A task's catalog entry (JSON; expires unless a live worker renews it).
    pub fn catalog_task(&self, task: &str) -> String {
        format!("{}:task:{task}", self.ns)
    }

    /// Set (with the catalog's lifetime) while a live worker consuming `queue` serves `task`:
    /// a worker that lacks the task gives its batches back instead of dead-lettering them.
    pub fn served(&self, queue: &str, task: &str) -> String {
        format!("{}:served:{queue}:{task}", self.ns)
    }
    /// Ids of the jobs not finished, scored by their last progress (ms): the scripts keep it
    /// (written as `{ns}:active` in Lua, from a job's key), the stalled-job watcher reads it.
    pub fn active_jobs(&self) -> String {
        format!("{}:active", self.ns)
    }
    /// The delay queues workers declared (full names): where a job's retries may wait.
    pub fn delay_queues(&self) -> String {
        format!("{}:delay-queues", self.ns)
    }
    /// How many shards each work queue is spread over (a hash: short queue name → count;
    /// absent means 1). Counts only grow: a producer or worker asking for more raises it.
    pub fn shards(&self) -> String {
        format!("{}:shards", self.ns)
    }
    /// Copies of batches parked while a broker alarm blocks publishing (a hash: id → where
    /// and how to publish, JSON); their bodies are in [`Keys::parked_bodies`].
    pub fn parked(&self) -> String {
        format!("{}:parked", self.ns)
    }
    /// The bodies of the parked copies (a hash: id → body).
    pub fn parked_bodies(&self) -> String {
        format!("{}:parked-bodies", self.ns)
    }
    /// A worker's claim on parked copy `id` while it publishes it.
    pub fn parked_claim(&self, id: &str) -> String {
        format!("{}:parked-claim:{id}", self.ns)
    }
    /// The lock of the worker that watches for stalled jobs.
    pub fn stall_watch(&self) -> String {
        format!("{}:stall-watch", self.ns)
    }
    /// Ids of the cancelled jobs (workers read it to drop their batches).
    pub fn cancelled_jobs(&self) -> String {
        format!("{}:cancelled", self.ns)
    }
    /// The names of the namespace's periodic schedules.
    pub fn schedules(&self) -> String {
        format!("{}:schedules", self.ns)
    }
    /// One schedule (a hash: its spec as JSON, `next_ms`, `paused`, the last run).
    pub fn schedule(&self, name: &str) -> String {
        format!("{}:schedule:{name}", self.ns)
    }
    /// The ids of the jobs of group `group` (`enqueue --group`).
    pub fn group(&self, group: &str) -> String {
        format!("{}:group:{group}", self.ns)
    }
    /// The ids of the jobs of group `group` that have ended.
    pub fn group_done(&self, group: &str) -> String {
        format!("{}:group:{group}:done", self.ns)
    }
    /// Group `group` once closed (`producer group close`): a hash of `closed_ms`, its chord
    /// follow-up (`then`), `fired_ms`, `then_job`, `then_note`.
    pub fn group_info(&self, group: &str) -> String {
        format!("{}:group:{group}:info", self.ns)
    }
    /// Finished jobs (and closed groups, as `group:G`) whose follow-up is not settled yet (a
    /// sorted set by the time they fired).
    pub fn outbox(&self) -> String {
        format!("{}:outbox", self.ns)
    }
    /// A worker's claim on one outbox entry while it publishes the follow-up.
    pub fn outbox_claim(&self, job: &str) -> String {
        format!("{}:outbox-claim:{job}", self.ns)
    }
    /// Finished jobs whose completion webhook (`enqueue --on-complete`) is not delivered yet:
    /// a sorted set by the time the next attempt is due.
    pub fn hooks(&self) -> String {
        format!("{}:hooks", self.ns)
    }
    /// A worker's claim on one job's webhook while it delivers it.
    pub fn hook_claim(&self, job: &str) -> String {
        format!("{}:hook-claim:{job}", self.ns)
    }
}

/// Checks that a namespace or queue name is safe inside AMQP names and Redis keys. `.` is the
/// separator of broker names (`{ns}.{queue}`) and `:` of Redis keys, so neither may appear in
/// a name: namespace `a` with queue `b-c` and namespace `a.b` with queue `c` can never meet.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    check_chars(kind, name, "")
}

/// Checks a job id: 1 to 100 characters from A-Z, a-z, 0-9, `-`, `_` and `.` (never `:`, the
/// separator of Redis keys, so that no job's keys can alias another's). The producer checks
/// the ids it is given, the worker the ids that messages carry.
pub fn validate_job_id(job: &str) -> Result<(), String> {
    validate_key("job id", job)
}

/// Checks a key of the same form as a job id (a unique key, a rate key), naming it `kind` in
/// the error.
pub fn validate_key(kind: &str, key: &str) -> Result<(), String> {
    check_chars(kind, key, ".")
}

fn check_chars(kind: &str, name: &str, extra: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(c));
    if ok {
        return Ok(());
    }
    let mut allowed = "A-Z, a-z, 0-9, '-', '_'".to_string();
    for c in extra.chars() {
        allowed.push_str(&format!(", '{c}'"));
    }
    Err(format!(
        "{kind} {:?} is not valid: use 1 to 100 characters from {allowed}",
        crate::envelope::bounded(name, 120)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_rank_above_their_work_queue() {
        assert_eq!(band_rank("tasks"), 0);
        assert_eq!(band_rank("tasks.p1"), 1);
        assert_eq!(band_rank("tasks.p5"), 2);
        assert_eq!(band_rank("p5"), 0);
        assert_eq!(band_rank("tasksp5"), 0);
        for (rank, q) in with_bands("tasks").iter().enumerate() {
            assert_eq!(band_rank(q), rank);
        }
        assert_eq!(with_bands("tasks").len(), BAND_RANKS);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("namespace", "taskmill").is_ok());
        assert!(validate_name("namespace", "t-1_a").is_ok());
        assert!(validate_name("namespace", "t-1_a.b").is_err());
        assert!(validate_job_id("j-1_a.b").is_ok());
        assert!(validate_job_id("j:results").is_err());
        assert!(validate_job_id(&"x".repeat(101)).is_err());
        assert!(validate_name("namespace", "").is_err());
        assert!(validate_name("queue", "a b").is_err());
        assert!(validate_name("queue", "a:b").is_err());
    }

    #[test]
    fn priorities_go_to_bands() {
        assert_eq!(priority_queue("tasks", 0), "tasks");
        assert_eq!(priority_queue("tasks", 4), "tasks.p1");
        assert_eq!(priority_queue("tasks", 9), "tasks.p5");
        assert_eq!(with_bands("q"), ["q", "q.p1", "q.p5"]);
        assert!(validate_routed_queue("tasks.p5").is_ok());
        assert!(validate_routed_queue("tasks.delay.100").is_err());
    }

    #[test]
    fn shards_have_one_reading() {
        assert_eq!(shard_queue("tasks", 0), "tasks");
        assert_eq!(shard_queue("tasks", 2), "tasks.s2");
        assert_eq!(with_shards("q", 1), ["q", "q.p1", "q.p5"]);
        assert_eq!(with_shards("q", 0), with_shards("q", 1));
        assert_eq!(with_shards("q", 3), ["q", "q.s1", "q.s2", "q.p1", "q.p5"]);
        assert_eq!(base_queue("tasks.s2"), "tasks");
        assert_eq!(base_queue("tasks.p5"), "tasks");
        assert_eq!(retry_queue("tasks.s2"), "tasks");
        assert_eq!(retry_queue("tasks.p5"), "tasks.p5");
        assert_eq!(retry_queue("tasks"), "tasks");
        // Not shards: a leading zero, shard 0 by name, beyond the most, no number.
        for q in ["tasks.s01", "tasks.s0", "tasks.s16", "tasks.s", "tasks.sx"] {
            assert_eq!(retry_queue(q), q, "{q}");
        }
        assert!(validate_routed_queue("tasks.s15").is_ok());
        assert!(validate_routed_queue("tasks.s16").is_err());
        assert!(validate_routed_queue("dead.s1").is_err());
        for (i, q) in with_shards("tasks", 3).iter().enumerate() {
            assert_eq!(band_rank(q), i.saturating_sub(2));
        }
    }

    #[test]
    fn tiers_never_overshoot_a_wait() {
        assert_eq!(tier_at_most(5_000), 5_000);
        assert_eq!(tier_at_most(4_999), 2_000);
        assert_eq!(tier_at_most(30), 100);
        assert_eq!(tier_at_most(u64::MAX), 86_400_000);
    }

    #[test]
    fn names_have_one_reading() {
        let n = Names::new("ns");
        assert_eq!(n.queue("tasks"), "ns.tasks");
        assert_eq!(n.delay_queue("tasks", 1000), "ns.tasks.delay.1000");
        assert_eq!(n.short_queue("ns.tasks"), Some("tasks"));
        assert!(validate_queue("b.tasks").is_err());
        assert!(validate_queue("dead").is_err());
        let k = Keys::new("ns");
        assert_eq!(k.results("j"), "ns:job:j:results");
    }
}
