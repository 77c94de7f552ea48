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

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

/// How long a pump waits for the next job before it gives its thread back to rayon.
pub(crate) const LINGER: Duration = Duration::from_millis(20);

/// A job for the pool.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

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
    jobs: VecDeque<Job>,
    /// Pumps started and not ended.
    running: usize,
    /// Pumps waiting for a job now.
    idle: usize,
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

    /// The pool's threads.
    pub(crate) fn threads(&self) -> usize {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on the pool: a waiting pump takes it, or a new one starts for it.
    #[cfg(test)]
    pub(crate) fn run(self: &Arc<Self>, job: Job) {
        self.run_all(vec![job]);
    }

    /// Runs `jobs` on the pool, in order as threads come free: waiting pumps take them, and
    /// new pumps start for those no waiting pump will take, up to one a thread.
    pub(crate) fn run_all(self: &Arc<Self>, jobs: Vec<Job>) {
        let (wake, start) = {
            let mut st = self.lock();
            st.jobs.extend(jobs);
            let wanted = st.jobs.len().saturating_sub(st.idle);
            let start = wanted.min(self.max - st.running.min(self.max));
            st.running += start;
            (st.idle.min(st.jobs.len()), start)
        };
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
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                drop(st);
                job();
                st = self.lock();
                continue;
            }
            let until = Instant::now() + LINGER;
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
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pumps.lock().running > 0 {
                assert!(std::time::Instant::now() < deadline, "pumps never ended");
                std::thread::sleep(LINGER);
            }
        }
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
