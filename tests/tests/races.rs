//! Two producers enqueueing the same job id at once (two schedulers reaching one tick, a
//! retried deploy script): one job, run once; the producer that lost the registration says the
//! id exists and leaves the other's job alone (it once marked it `interrupted`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use taskmill_common::JobState;
use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{sample, write_jsonl, TestNs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_producers_racing_for_one_job_id_leave_one_job_that_completes() {
    let t = TestNs::new();
    let store = t.store().await;
    let worker = t.spawn_worker(t.worker_args());
    let file = write_jsonl(sample::posts(40));
    for round in 0..5 {
        let job = format!("race-{round}");
        let mut args = EnqueueArgs::new("post-stats");
        args.files = vec![file.clone()];
        args.batch_size = 4;
        args.job = Some(job.clone());
        args.no_check = true;
        let (conn_a, conn_b) = (t.conn(), t.conn());
        let (a, b) = tokio::join!(
            enqueue(&conn_a, &args, |_| {}),
            enqueue(&conn_b, &args, |_| {})
        );
        let (won, lost) = match (a, b) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            (a, b) => panic!("round {round}: one should win: {a:?} / {b:?}"),
        };
        assert_eq!(won.batches, 10);
        assert!(format!("{lost:#}").contains("already exists"), "{lost:#}");
        let s = t.wait_finished(&store, &job, Duration::from_secs(60)).await;
        assert_eq!(s.state(), JobState::Completed, "round {round}: {s:?}");
        assert_eq!((s.batches_done, s.records_done), (10, 40), "{s:?}");
        assert!(s.problems.is_empty(), "{s:?}");
    }
    worker.stop().await.unwrap();
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
