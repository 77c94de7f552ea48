//! The store's Lua scripts called directly against the real Redis, each test in a namespace of
//! its own: the finish rule with lost batches, the set of jobs not finished that the stalled-
//! job watcher reads, and the ways out of `stalled`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde_json::json;
use taskmill_common::{
    store::{DoneBatch, NewJob, PublishTotals, Recorded, Store},
    JobState,
};
use taskmill_tests::TestNs;

/// A post-stats job `id` (in `group`, '' for none) as the registration script writes it.
fn new_job<'a>(id: &'a str, group: &'a str, params: &'a BTreeMap<String, String>) -> NewJob<'a> {
    NewJob {
        id,
        task: "post-stats",
        queue: "tasks",
        params,
        unique_key: None,
        token: "",
        then: "",
        parent: "",
        group,
        on_complete: "",
        parent_outcome: "",
    }
}

async fn register(store: &Store, id: &str) {
    store
        .register_job(&new_job(id, "", &BTreeMap::new()))
        .await
        .unwrap();
}

/// A job whose publishing ended with `total` batches.
async fn published(store: &Store, id: &str, total: u64, interrupted: bool) {
    register(store, id).await;
    store.reserve_batches(id, total).await.unwrap();
    let totals = PublishTotals {
        batches: total,
        records: total,
        interrupted,
        ..PublishTotals::default()
    };
    store.finish_publishing(id, &totals).await.unwrap();
}

async fn done(store: &Store, id: &str, batch: u64) -> Recorded {
    let b = DoneBatch {
        job: id.into(),
        batch,
        result: json!({"batch": batch}).to_string(),
        records_done: 1,
        records_invalid: 0,
    };
    store.record_done_many(&[b]).await.unwrap()[0]
}

/// The score of `id` among the jobs not finished, None when it is not there.
async fn active(store: &Store, id: &str) -> Option<f64> {
    let all = store.quiet_jobs(u64::MAX / 2, 10_000).await.unwrap();
    all.into_iter().find(|(j, _)| j == id).map(|(_, s)| s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_set_of_jobs_not_finished_follows_each_job() {
    let t = TestNs::new();
    let store = t.store().await;
    register(&store, "a").await;
    let registered = active(&store, "a")
        .await
        .expect("a registered job is active");
    store.reserve_batches("a", 2).await.unwrap();
    assert_eq!(done(&store, "a", 0).await, Recorded::Stored);
    let progressed = active(&store, "a").await.unwrap();
    assert!(progressed >= registered);
    // A duplicate is no progress: the score stays.
    assert_eq!(done(&store, "a", 0).await, Recorded::Duplicate);
    assert_eq!(active(&store, "a").await, Some(progressed));
    let totals = PublishTotals {
        batches: 2,
        records: 2,
        ..PublishTotals::default()
    };
    store.finish_publishing("a", &totals).await.unwrap();
    assert!(active(&store, "a").await.is_some());
    assert_eq!(done(&store, "a", 1).await, Recorded::Stored);
    assert_eq!(
        active(&store, "a").await,
        None,
        "a completed job left the set"
    );
    // Cancelled and deleted jobs leave it too.
    register(&store, "c").await;
    store.cancel("c").await.unwrap();
    assert_eq!(active(&store, "c").await, None);
    register(&store, "d").await;
    store.delete_job("d").await.unwrap();
    assert_eq!(active(&store, "d").await, None);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_job_counts_its_lost_batches_and_finishes_when_they_come_back() {
    let t = TestNs::new();
    let store = t.store().await;
    published(&store, "s", 4, false).await;
    assert_eq!(done(&store, "s", 0).await, Recorded::Stored);
    let score = active(&store, "s").await.unwrap();
    // Progress since the look: nothing changes.
    assert_eq!(
        store.mark_stalled("s", score - 1.0, "x").await.unwrap(),
        None
    );
    let marked = store
        .mark_stalled("s", score, "stalled: {lost} lost")
        .await
        .unwrap();
    assert_eq!(marked, Some((3, true)));
    let s = store.job_status("s").await.unwrap().unwrap();
    assert_eq!((s.state, s.batches_lost), (JobState::Stalled, 3));
    assert!(s.is_finished() && s.finished_ms.is_some());
    assert_eq!(s.problems, vec!["stalled: 3 lost".to_string()]);
    assert_eq!(active(&store, "s").await, None);
    // Finished: not marked again, and not cancelled.
    assert_eq!(store.mark_stalled("s", score, "x").await.unwrap(), None);
    let c = store.cancel("s").await.unwrap().unwrap();
    assert!(!c.now && c.was == JobState::Stalled);
    store
        .set_summary("s", &json!({"partial": true}))
        .await
        .unwrap();

    // Lost batches come back after all: one dies, two are done.
    let dead = store
        .record_dead("s", 1, &json!({"kind": "permanent", "error": "boom"}))
        .await
        .unwrap();
    assert_eq!(dead, Recorded::Stored);
    let s = store.job_status("s").await.unwrap().unwrap();
    assert_eq!(
        (s.state, s.batches_lost, s.batches_dead),
        (JobState::Stalled, 2, 1)
    );
    assert_eq!(done(&store, "s", 2).await, Recorded::Stored);
    assert_eq!(done(&store, "s", 3).await, Recorded::Stored);
    let s = store.job_status("s").await.unwrap().unwrap();
    assert_eq!(
        (s.state, s.batches_lost, s.batches_done, s.batches_dead),
        (JobState::CompletedWithErrors, 0, 3, 1)
    );
    assert_eq!(
        s.summary, None,
        "the partial summary is dropped, to be folded again"
    );
    // A replay of the dead one reopens it; done, the job completes.
    assert!(store.reopen_batch("s", 1).await.unwrap().is_some());
    let s = store.job_status("s").await.unwrap().unwrap();
    assert_eq!(s.state, JobState::Running);
    assert!(
        active(&store, "s").await.is_some(),
        "a reopened job is watched again"
    );
    assert_eq!(done(&store, "s", 1).await, Recorded::Stored);
    let s = store.job_status("s").await.unwrap().unwrap();
    assert_eq!((s.state, s.batches_done), (JobState::Completed, 4));
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_job_keeps_its_state_when_its_batches_are_lost() {
    let t = TestNs::new();
    let store = t.store().await;
    published(&store, "i", 2, true).await;
    assert_eq!(done(&store, "i", 0).await, Recorded::Stored);
    let score = active(&store, "i").await.unwrap();
    // Interrupted jobs get no summary, so none is asked for.
    assert_eq!(
        store
            .mark_stalled("i", score, "stalled: {lost}")
            .await
            .unwrap(),
        Some((1, false))
    );
    let s = store.job_status("i").await.unwrap().unwrap();
    assert_eq!((s.state, s.batches_lost), (JobState::Interrupted, 1));
    assert!(s.is_finished());
    // A job still publishing is never given up on.
    register(&store, "p").await;
    store.reserve_batches("p", 5).await.unwrap();
    let score = active(&store, "p").await.unwrap();
    assert_eq!(store.mark_stalled("p", score, "x").await.unwrap(), None);
    assert_eq!(
        store.job_status("p").await.unwrap().unwrap().state,
        JobState::Pending
    );
    t.cleanup().await;
}

/// A Celery call's registration and result, through the store's scripts: a redelivery before
/// the call ran publishes again, one after it finished publishes nothing, another job's token
/// is refused; the finishing script writes SUCCESS (JSON, or msgpack when asked), and a later
/// refusal for the same id never overwrites it.
#[tokio::test]
async fn a_celery_call_registers_once_and_its_success_is_never_overwritten() {
    use taskmill_common::store::celery::{CeleryRefusal, CeleryRegistered, CelerySettings};
    let t = TestNs::new();
    let store = t.store().await;
    let params = BTreeMap::new();
    let job = |id: &'static str, token: &'static str| NewJob {
        id,
        task: "post-stats",
        queue: "tasks",
        params: &params,
        unique_key: None,
        token,
        then: "",
        parent: "",
        group: "",
        on_complete: "",
        parent_outcome: "",
    };
    let settings = |id: &str, msgpack: bool| CelerySettings {
        key: format!("{}:celery-task-meta-{id}", t.ns),
        expires: 60,
        parent_id: None,
        group_id: None,
        root_id: None,
        queue: None,
        chain: Vec::new(),
        msgpack,
    };
    let register = |id: &'static str, token: &'static str, msgpack: bool| {
        let (store, s) = (store.clone(), settings(id, msgpack));
        let j = job(id, token);
        async move {
            store
                .register_celery_call(&j, 1, 1, &s, &[("priority", 7)])
                .await
                .unwrap()
        }
    };
    assert_eq!(
        register("c1", "celery-c1", false).await,
        CeleryRegistered::Publish
    );
    assert_eq!(
        register("c1", "celery-c1", false).await,
        CeleryRegistered::Publish
    );
    assert_eq!(
        register("c1", "other", false).await,
        CeleryRegistered::Taken
    );
    let s = store.job_status("c1").await.unwrap().unwrap();
    assert_eq!((s.batches_total, s.priority), (Some(1), 7), "{s:?}");
    assert_eq!(done(&store, "c1", 0).await, Recorded::Stored);
    let key = settings("c1", false).key;
    let meta: serde_json::Value =
        serde_json::from_str(&store.celery_result(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(meta["status"], "SUCCESS", "{meta}");
    assert_eq!(meta["result"], json!({"batch": 0}), "{meta}");
    assert_eq!(meta["task_id"], "c1", "{meta}");
    assert_eq!(
        register("c1", "celery-c1", false).await,
        CeleryRegistered::Finished
    );
    let refusal = CeleryRefusal {
        id: "c1",
        status: "FAILURE",
        exc_type: "ValueError",
        exc_module: "builtins",
        message: "late",
    };
    assert!(!store
        .celery_refuse(&settings("c1", false), &refusal)
        .await
        .unwrap());
    let again: serde_json::Value =
        serde_json::from_str(&store.celery_result(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(again, meta);

    // Packed as msgpack for an app whose result_serializer is msgpack.
    assert_eq!(
        register("c2", "celery-c2", true).await,
        CeleryRegistered::Publish
    );
    assert_eq!(done(&store, "c2", 0).await, Recorded::Stored);
    let mut con = taskmill_tests::redis_con().await;
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(settings("c2", true).key)
        .query_async(&mut con)
        .await
        .unwrap();
    let packed: serde_json::Value = rmp_serde::from_slice(&raw).unwrap();
    assert_eq!(packed["status"], "SUCCESS", "{packed}");
    assert_eq!(packed["children"], json!([]), "{packed}");
    t.cleanup().await;
}

async fn register_in(store: &Store, id: &str, group: &str, total: u64) {
    store
        .register_job(&new_job(id, group, &BTreeMap::new()))
        .await
        .unwrap();
    store.reserve_batches(id, total).await.unwrap();
    let totals = PublishTotals {
        batches: total,
        records: total,
        ..PublishTotals::default()
    };
    store.finish_publishing(id, &totals).await.unwrap();
}

/// A closed group's chord fires in the script that ends its last job, once: two jobs ending at
/// the same moment on two connections (as two workers would), a cancel, a delete; never while a
/// job is running, never for a group that is not closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_fires_once_when_the_last_job_of_a_closed_group_ends() {
    use taskmill_common::store::chains::{chord_id, Chain, Closed, Step, Trigger};
    let t = TestNs::new();
    let (a, b) = (t.store().await, t.store().await);
    let chain = |g: &str| Chain {
        root: chord_id(g),
        next: 1,
        steps: vec![Step {
            task: "chaos".into(),
            params: BTreeMap::new(),
            batch_size: 10,
            on: Trigger::Complete,
        }],
    };
    let outbox = |store: &Store| {
        let store = store.clone();
        async move { store.outbox(1000).await.unwrap() }
    };
    for round in 0..30 {
        let g = format!("race{round}");
        let (x, y) = (format!("{g}-x"), format!("{g}-y"));
        register_in(&a, &x, &g, 1).await;
        register_in(&a, &y, &g, 1).await;
        assert_eq!(
            a.close_group(&g, Some(&chain(&g))).await.unwrap(),
            Closed::Now
        );
        assert!(a.group_info(&g).await.unwrap().fired_ms.is_none());
        // The two last batches stored at once, from two connections.
        let (dx, dy) = tokio::join!(done(&a, &x, 0), done(&b, &y, 0));
        assert_eq!((dx, dy), (Recorded::Stored, Recorded::Stored));
        let info = a.group_info(&g).await.unwrap();
        let fired = info.fired_ms.expect("fired once both ended");
        let entry = format!("group:{g}");
        assert!(outbox(&a).await.contains(&entry), "round {round}");
        // Fired once: the entry's time is the first firing's.
        let score: f64 = {
            let mut con = taskmill_tests::redis_con().await;
            redis::cmd("ZSCORE")
                .arg(format!("{}:outbox", t.ns))
                .arg(&entry)
                .query_async(&mut con)
                .await
                .unwrap()
        };
        assert_eq!(score as u64, fired, "round {round}");
        assert_eq!(info.ended.len(), 2);
    }

    // Not closed: nothing fires however its jobs end; closing it then fires at once.
    register_in(&a, "open-x", "open", 1).await;
    done(&a, "open-x", 0).await;
    assert!(!outbox(&a).await.contains(&"group:open".to_string()));
    assert_eq!(
        a.close_group("open", Some(&chain("open"))).await.unwrap(),
        Closed::Now
    );
    assert!(outbox(&a).await.contains(&"group:open".to_string()));
    // Closed without a follow-up: it takes no more jobs, fires nothing.
    register_in(&a, "bare-x", "bare", 1).await;
    assert_eq!(a.close_group("bare", None).await.unwrap(), Closed::Now);
    done(&a, "bare-x", 0).await;
    assert!(!outbox(&a).await.contains(&"group:bare".to_string()));
    let refused = a
        .register_job(&new_job("bare-late", "bare", &BTreeMap::new()))
        .await;
    assert!(
        matches!(refused, Err(taskmill_common::store::StoreError::GroupClosed(ref g)) if g == "bare"),
        "{refused:?}"
    );

    // A running job holds the chord back; cancelled, it ends, and the chord fires.
    register_in(&a, "c-x", "cancelled", 1).await;
    register_in(&a, "c-y", "cancelled", 2).await;
    done(&a, "c-x", 0).await;
    done(&a, "c-y", 0).await;
    a.close_group("cancelled", Some(&chain("cancelled")))
        .await
        .unwrap();
    assert!(!outbox(&a).await.contains(&"group:cancelled".to_string()));
    a.cancel("c-y").await.unwrap();
    assert!(outbox(&a).await.contains(&"group:cancelled".to_string()));
    // A deleted job leaves its group: the others ended, the chord fires.
    register_in(&a, "d-x", "deleted", 1).await;
    register_in(&a, "d-y", "deleted", 2).await;
    done(&a, "d-x", 0).await;
    a.close_group("deleted", Some(&chain("deleted")))
        .await
        .unwrap();
    assert!(!outbox(&a).await.contains(&"group:deleted".to_string()));
    assert!(a.delete_job("d-y").await.unwrap());
    assert!(outbox(&a).await.contains(&"group:deleted".to_string()));
    assert_eq!(a.group_jobs("deleted").await.unwrap(), ["d-x"]);
    t.cleanup().await;
}

/// What a worker does with a batch delivered again: run it (counted), run it alone once it
/// was started before, dead-letter it once it was running alone twice when workers died; a
/// batch never started again and delivered half the delivery limit's times is renewed; a run
/// to an end forgets it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_batch_is_run_suspected_or_found_out_by_its_starts() {
    use taskmill_common::store::crashes::{Redelivered, RESET_AT, SOLO_LIMIT};
    let t = TestNs::new();
    let store = t.store().await;
    register(&store, "r").await;
    // Prefetched by a worker that died: never started again, so just run.
    assert_eq!(
        store.redelivered("r", 0, Some(1)).await.unwrap(),
        Redelivered::Run
    );
    // It was running when that worker died too: a suspect, run alone.
    assert_eq!(
        store.redelivered("r", 0, Some(2)).await.unwrap(),
        Redelivered::Alone
    );
    for n in 1..=SOLO_LIMIT {
        store.solo_start("r", 0).await.unwrap();
        let next = store.redelivered("r", 0, Some(2 + n as i64)).await.unwrap();
        if n < SOLO_LIMIT {
            assert_eq!(next, Redelivered::Alone);
        } else {
            assert_eq!(next, Redelivered::Culprit(SOLO_LIMIT));
        }
    }
    // Never started again, delivered half the limit's times: renewed; below that, run.
    assert_eq!(
        store.redelivered("r", 1, Some(RESET_AT)).await.unwrap(),
        Redelivered::Renew
    );
    assert_eq!(
        store.redelivered("r", 2, Some(RESET_AT - 1)).await.unwrap(),
        Redelivered::Run
    );
    // Batch 2 ran to an end (its ack lost with its worker): not a suspect next time.
    store.ran_through(&[("r".into(), 2)]).await.unwrap();
    assert_eq!(
        store.redelivered("r", 2, Some(1)).await.unwrap(),
        Redelivered::Run
    );
    // Unknown delivery count (no header): never renewed.
    assert_eq!(
        store.redelivered("r", 3, None).await.unwrap(),
        Redelivered::Run
    );
    t.cleanup().await;
}
