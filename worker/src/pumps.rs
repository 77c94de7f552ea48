//! Jobs for the rayon pool, run by "pumps": rayon jobs that take analysis jobs from a queue
//! and, between them, wait on it asleep for a little while before giving their thread back.
//!
//! Why not `pool.spawn` a job at a time: a rayon thread that runs out of work spins, calling
//! `sched_yield` some thirty times, before it sleeps, and a worker of small batches runs out
//! of work between every few batches. On a machine whose cores the broker and Redis share,
//! each of those yields is a context switch: measured on 50,000 batches of ten posts, 167,000
//! yields, 140,000 context switches and 30 % more worker CPU than the same analysis on
//! threads that sleep. A pump sleeps on the queue (a futex) instead, so under a steady stream
//! no thread spins; after [`LINGER`] without work it ends and its thread is rayon's again
//! (to steal the halves of a task's own `par_iter`, say, or to sleep for good).
//!
//! Nor does every queued job wake a thread: the pumps learn how long a job takes, and a
//! queue worth less than [`SPLIT_WORTH`] of work a thread is left to the pumps already at
//! work (at least one) while jobs are short; long jobs do not wait for a busy pump. Waking a thread costs a context switch on each side, and one thread
//! is done with a group of small batches about when a second would have started: measured
//! on 50,000 batches of ten posts (four alternating runs), the worker's CPU went from 1.60
//! to 1.49 s. A CPU-bound task's batches spread over every thread from the first group on
//! (the first guess of a job's time is high), and a job queued behind one far longer than
//! the average waits at most [`LINGER`]: while any job waits, a pump either waits too (and
//! looks at the queue when its wait times out) or starts. No more pumps wake than there
//! are jobs: a pump with nothing to do lingers on its thread, where a task's own `par_iter`
//! could have used it (waking two for one job cost the CPU-bound workload a seventh).

use taskmill_common::topology;

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

/// How long a pump waits for the next job before it gives its thread back to rayon.
pub(crate) const LINGER: Duration = Duration::from_millis(20);

/// The work queued for one more thread to be worth waking: a queue holding less than this
/// a thread is left to the pumps already at work.
pub(crate) const SPLIT_WORTH: Duration = Duration::from_micros(200);

/// The guess of a job's run time before one has run: high, so that the first jobs spread.
const FIRST_GUESS: Duration = Duration::from_millis(1);

thread_local! {
    /// Whether this thread runs a pump now (one may start on top of another: see `pump`).
    static IN_PUMP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A job for the pool.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// Queued jobs by priority rank (see `topology::band_rank`): a thread that comes free takes
/// the oldest job of the highest rank, so a priority band's batch waits for the batches
/// running now, never for the backlog queued before it.
#[derive(Default)]
struct Queued {
    ranks: [VecDeque<Job>; topology::BAND_RANKS],
}

impl Queued {
    fn len(&self) -> usize {
        self.ranks.iter().map(VecDeque::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.ranks.iter().all(VecDeque::is_empty)
    }

    fn extend(&mut self, rank: usize, jobs: Vec<Job>) {
        let last = self.ranks.len() - 1;
        self.ranks[rank.min(last)].extend(jobs);
    }

    fn pop_front(&mut self) -> Option<Job> {
        self.ranks.iter_mut().rev().find_map(VecDeque::pop_front)
    }
}

/// The queue of analysis jobs and the pumps that run them on the rayon pool.
pub(crate) struct Pumps {
    pool: Arc<rayon::ThreadPool>,
    state: Mutex<State>,
    /// Signalled when a job is queued.
    more: Condvar,
    /// At most this many pumps (the pool's threads).
    max: usize,
}

/// The queue and the pumps' counts, under one lock: a condition variable waits on a futex,
/// where a channel's receiver would first spin and yield.
#[derive(Default)]
struct State {
    jobs: Queued,
    /// Pumps started and not ended.
    running: usize,
    /// Pumps waiting for a job now.
    idle: usize,
    /// A job's run time, a moving average; None before the first job ran.
    job_time: Option<Duration>,
}

impl State {
    /// How many pumps the queued work wants (none for an empty queue, else at least one and
    /// at most `max`), from the jobs' average run time.
    fn pumps_wanted(&self, max: usize) -> usize {
        if self.jobs.is_empty() {
            return 0;
        }
        let per_job = self.job_time.unwrap_or(FIRST_GUESS);
        let work = per_job.saturating_mul(u32::try_from(self.jobs.len()).unwrap_or(u32::MAX));
        let threads = work.as_nanos().div_ceil(SPLIT_WORTH.as_nanos()).max(1);
        usize::try_from(threads)
            .unwrap_or(usize::MAX)
            .min(max)
            .min(self.jobs.len())
    }

    /// Pumps to wake and pumps to start so that as many work as the queue wants (counting
    /// those already at work); the started ones are counted running.
    fn engage(&mut self, max: usize) -> (usize, usize) {
        // Pumps at work count when jobs are short (they are free again soon); with long jobs
        // they are not, and every queued job may have a waiting pump.
        let busy = if self.short_jobs() {
            self.running.saturating_sub(self.idle)
        } else {
            0
        };
        let more = self.pumps_wanted(max).saturating_sub(busy);
        let wake = more.min(self.idle);
        let mut start = (more - wake).min(max.saturating_sub(self.running));
        // With no pump waiting, one more starts (room permitting): once idle, it lingers and
        // takes what the busy ones leave queued (behind a job far longer than the average,
        // say) when its wait times out, within LINGER.
        if start == 0 && self.idle == 0 && !self.jobs.is_empty() {
            start = usize::from(self.running < max);
        }
        self.running += start;
        (wake, start)
    }

    /// Whether jobs are short: their average run time is known and under [`SPLIT_WORTH`].
    fn short_jobs(&self) -> bool {
        self.job_time.is_some_and(|t| t < SPLIT_WORTH)
    }

    /// How many groups of jobs the session keeps on the pool at once: one while jobs are
    /// short, else `max` (see [`Pumps::groups_wanted`]).
    fn groups_wanted(&self, max: usize) -> usize {
        if self.short_jobs() {
            1
        } else {
            max
        }
    }

    /// Takes a job's run time into the average.
    fn took(&mut self, time: Duration) {
        self.job_time = Some(match self.job_time {
            None => time,
            Some(avg) => (avg.saturating_mul(7) / 8).saturating_add(time / 8),
        });
    }
}

impl Pumps {
    /// Pumps for `pool`, at most one a thread.
    pub(crate) fn new(pool: Arc<rayon::ThreadPool>) -> Arc<Self> {
        let max = pool.current_num_threads().max(1);
        Arc::new(Self {
            pool,
            state: Mutex::default(),
            more: Condvar::new(),
            max,
        })
    }

    /// How many groups of jobs (a group: the deliveries that arrived together) the session
    /// keeps on the pool at once. While jobs are short, one: the deliveries that arrive
    /// while it runs wait and go together as the next group, so a group carries more
    /// batches and the pool and the session wake less often (its batches still spread over
    /// as many threads as they are worth). Measured on 50,000 batches of ten posts, nine
    /// runs alternating with the worker before: worker CPU 1.15 -> 1.12 s (medians; lower in
    /// six pairs), groups about 6,800 -> 5,100; a small gain, in the noise of a run. Long
    /// jobs keep one group a thread: a new group starts while the last jobs of the one
    /// before still run, and no thread idles at a group's tail.
    pub(crate) fn groups_wanted(&self) -> usize {
        self.lock().groups_wanted(self.max)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on the pool: a waiting pump takes it, or a new one starts for it.
    #[cfg(test)]
    pub(crate) fn run(self: &Arc<Self>, job: Job) {
        self.run_all(0, vec![job]);
    }

    /// Takes every job queued and not started (to run elsewhere: the worker is giving up).
    pub(crate) fn take_queued(&self) -> Vec<Job> {
        let mut st = self.lock();
        st.jobs.ranks.iter_mut().flat_map(|r| r.drain(..)).collect()
    }

    /// Runs `jobs` of priority rank `rank` on the pool, in order as threads come free and
    /// before any queued job of a lower rank: as many pumps as the queued work wants (see
    /// [`SPLIT_WORTH`]) take them, waiting ones first, then new ones, up to one a thread.
    pub(crate) fn run_all(self: &Arc<Self>, rank: usize, jobs: Vec<Job>) {
        let (wake, start) = {
            let mut st = self.lock();
            st.jobs.extend(rank, jobs);
            st.engage(self.max)
        };
        self.kick(wake, start);
    }

    /// Wakes `wake` waiting pumps and starts `start` new ones.
    fn kick(self: &Arc<Self>, wake: usize, start: usize) {
        for _ in 0..wake {
            self.more.notify_one();
        }
        for _ in 0..start {
            let me = Arc::clone(self);
            self.pool.spawn(move || me.pump());
        }
    }

    /// Runs jobs until none came for [`LINGER`].
    fn pump(self: Arc<Self>) {
        // A pump started on a thread that waits inside a job (for a half of the job's own
        // `par_iter` that another thread took, say) runs on top of that job: it must not
        // linger there, or the job below waits for it.
        let nested = IN_PUMP.with(|p| p.replace(true));
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                // What is left may want more pumps (the average grew, or none waits).
                let (wake, start) = st.engage(self.max);
                drop(st);
                self.kick(wake, start);
                let started = Instant::now();
                job();
                st = self.lock();
                st.took(started.elapsed());
                continue;
            }
            let until = Instant::now() + if nested { Duration::ZERO } else { LINGER };
            st.idle += 1;
            while st.jobs.is_empty() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = self
                    .more
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            st.idle -= 1;
            if st.jobs.is_empty() {
                // Checked and given up under the lock: a job queued later starts a pump.
                st.running -= 1;
                drop(st);
                IN_PUMP.with(|p| p.set(nested));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
        Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn every_job_runs_on_the_pool_and_pumps_end_when_idle() {
        let pumps = Pumps::new(pool(2));
        let (tx, rx) = std::sync::mpsc::channel();
        for round in 0..3 {
            for i in 0..500 {
                let tx = tx.clone();
                pumps.run(Box::new(move || {
                    let _ = tx.send((i, rayon::current_thread_index().is_some()));
                }));
            }
            let mut seen: Vec<usize> = (0..500)
                .map(|_| {
                    let (i, on_pool) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
                    assert!(on_pool);
                    i
                })
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..500).collect::<Vec<_>>(), "round {round}");
            assert!(pumps.lock().running <= 2);
            // Idle for longer than LINGER: the pumps end, and the next round starts new ones.
            until_pumps_end(&pumps);
        }
    }

    fn state(job_time: Option<Duration>, jobs: usize, running: usize, idle: usize) -> State {
        State {
            jobs: Queued {
                ranks: [
                    (0..jobs).map(|_| Box::new(|| ()) as Job).collect(),
                    VecDeque::new(),
                    VecDeque::new(),
                ],
            },
            running,
            idle,
            job_time,
        }
    }

    /// Waits until every pump has ended (each does after LINGER without work).
    fn until_pumps_end(pumps: &Pumps) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pumps.lock().running > 0 {
            assert!(std::time::Instant::now() < deadline, "pumps never ended");
            std::thread::sleep(LINGER);
        }
    }

    #[test]
    fn small_jobs_wake_one_pump_and_long_ones_every_thread() {
        let us = |n: u64| Some(Duration::from_micros(n));
        // Eight jobs of 5 µs: one waiting pump takes them all.
        assert_eq!(state(us(5), 8, 2, 2).engage(2), (1, 0));
        // ... or one starts when none waits.
        assert_eq!(state(us(5), 8, 0, 0).engage(2), (0, 1));
        // Eight jobs of 10 ms, or of the first guess: every thread.
        assert_eq!(state(us(10_000), 8, 2, 2).engage(2), (2, 0));
        assert_eq!(state(None, 8, 0, 0).engage(2), (0, 2));
        assert_eq!(state(us(10_000), 8, 1, 0).engage(4), (0, 3));
        // A pump at work counts: none more for small jobs while one waits...
        assert_eq!(state(us(5), 8, 2, 1).engage(2), (0, 0));
        // ... but with none waiting, a spare starts, to take what the busy one leaves.
        assert_eq!(state(us(5), 8, 1, 0).engage(2), (0, 1));
        assert_eq!(state(us(5), 8, 2, 0).engage(2), (0, 0));
        // Long jobs do not wait for a pump at work while one waits.
        assert_eq!(state(us(10_000), 1, 2, 1).engage(2), (1, 0));
        // No more pumps than jobs.
        assert_eq!(state(us(10_000), 1, 2, 2).engage(2), (1, 0));
        assert_eq!(state(None, 1, 0, 0).engage(2), (0, 1));
        // Nothing queued: nothing to do.
        assert_eq!(state(us(10_000), 0, 2, 2).engage(2), (0, 0));
        // One group on the pool at a time while jobs are short, one a thread otherwise.
        assert_eq!(state(us(5), 0, 0, 0).groups_wanted(4), 1);
        assert_eq!(state(us(10_000), 0, 0, 0).groups_wanted(4), 4);
        assert_eq!(state(None, 0, 0, 0).groups_wanted(4), 4);
        let mut st = state(None, 0, 0, 0);
        st.took(Duration::from_micros(8));
        st.took(Duration::from_micros(16));
        assert_eq!(st.job_time, Some(Duration::from_micros(9)));
    }

    #[test]
    fn a_higher_rank_is_taken_first_and_each_rank_in_order() {
        let (tx, rx) = std::sync::mpsc::channel();
        let job = |tag: &'static str| {
            let tx = tx.clone();
            Box::new(move || {
                let _ = tx.send(tag);
            }) as Job
        };
        let mut q = Queued::default();
        q.extend(0, vec![job("low 1"), job("low 2")]);
        q.extend(2, vec![job("p5 1")]);
        q.extend(1, vec![job("p1 1")]);
        q.extend(2, vec![job("p5 2")]);
        q.extend(9, vec![job("beyond the last rank")]);
        assert_eq!(q.len(), 6);
        while let Some(j) = q.pop_front() {
            j();
        }
        assert!(q.is_empty());
        let order: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            order,
            [
                "p5 1",
                "p5 2",
                "beyond the last rank",
                "p1 1",
                "low 1",
                "low 2"
            ]
        );
    }

    #[test]
    fn jobs_queued_behind_a_long_one_do_not_wait_for_it() {
        let pumps = Pumps::new(pool(2));
        // Jobs are short (set, not measured: a loaded machine can make a job of a few
        // microseconds take milliseconds).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        pumps.lock().job_time = Some(Duration::from_micros(5));
        // Down to one pump, waiting: the pumps end when idle, then one starts for a job.
        until_pumps_end(&pumps);
        let tx2 = tx.clone();
        pumps.run(Box::new(move || {
            let _ = tx2.send(());
        }));
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // A long job (it waits for the short ones), then short ones in one group.
        let (short_tx, short_rx) = std::sync::mpsc::channel();
        let (long_tx, long_rx) = std::sync::mpsc::channel();
        let mut jobs: Vec<Job> = vec![Box::new(move || {
            let got = (0..3).all(|_| short_rx.recv_timeout(Duration::from_secs(10)).is_ok());
            let _ = long_tx.send(got);
        })];
        for _ in 0..3 {
            let short_tx = short_tx.clone();
            jobs.push(Box::new(move || {
                let _ = short_tx.send(());
            }));
        }
        pumps.run_all(0, jobs);
        assert_eq!(
            long_rx.recv_timeout(Duration::from_secs(20)),
            Ok(true),
            "the short jobs waited behind the long one"
        );
    }

    #[test]
    fn a_task_s_own_par_iter_still_completes_inside_a_pump() {
        use rayon::prelude::*;
        let pumps = Pumps::new(pool(2));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            pumps.run(Box::new(move || {
                let s: u64 = (0..100_000u64).into_par_iter().map(|x| x % 7).sum();
                let _ = tx.send(s);
            }));
        }
        let want: u64 = (0..100_000u64).map(|x| x % 7).sum();
        for _ in 0..4 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), want);
        }
    }
}
