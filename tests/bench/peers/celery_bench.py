"""Celery peer benchmark: the throughput workload (post-stats, batches of 10) through Celery.

Settings chosen for the job, as a Celery user would tune them for throughput without losing
work: prefork pool with one process per core, acks_late (ack after the task ran), prefetch
multiplier 16, Redis result backend, persistent messages, no publisher confirms (Celery's
default).

    celery -A celery_bench worker ...          # the worker
    python celery_bench.py produce FILE SIZE   # sends every batch, waits for every result

The workers alone (the app's client out of the figure): `preload FILE SIZE IDS` sends every
batch before any worker runs and writes the task ids to IDS; `collect IDS`, once a worker
runs, waits for every result and prints the span between the first and the last result's
`date_done` (what the worker wrote, whichever worker it was).
"""
import json
import os
import sys
import time

from celery import Celery

from poststats import batches, post_stats

QUEUE = os.environ.get("PEER_QUEUE", "bench-celery")
app = Celery(
    "celery_bench",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("RESULT_URL", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=16,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_hijack_root_logger=False,
    # No remote control, events or heartbeats: nothing the benchmark needs, and they would
    # leave Celery's exchanges (celery.pidbox, celeryev) behind in the user's broker.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="post_stats")
def post_stats_task(records):
    return post_stats(records)


if __name__ == "__main__" and sys.argv[1:2] == ["produce"]:
    path, size = sys.argv[2], int(sys.argv[3])
    work = list(batches(path, size))
    start = time.time()
    results = [post_stats_task.apply_async(args=[b], queue=QUEUE) for b in work]
    for r in results:
        r.get(timeout=600)
    seconds = time.time() - start
    # Leave nothing behind in the user's Redis: the results' keys, deleted a thousand at a
    # time (not timed).
    keys = [app.backend.get_key_for_task(r.id) for r in results]
    for i in range(0, len(keys), 1000):
        app.backend.client.delete(*keys[i : i + 1000])
    print(json.dumps({"tasks": len(work), "seconds": seconds}))


if __name__ == "__main__" and sys.argv[1:2] == ["preload"]:
    path, size, ids_file = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    work = list(batches(path, size))
    ids = [app.send_task("post_stats", args=[b], queue=QUEUE).id for b in work]
    with open(ids_file, "w") as f:
        json.dump(ids, f)
    print(json.dumps({"tasks": len(ids)}))

if __name__ == "__main__" and sys.argv[1:2] == ["collect"]:
    from datetime import datetime

    with open(sys.argv[2]) as f:
        ids = json.load(f)
    keys = [app.backend.get_key_for_task(i) for i in ids]
    client = app.backend.client
    deadline = time.time() + 600
    metas = []
    while True:
        metas = []
        for i in range(0, len(keys), 1000):
            metas.extend(client.mget(keys[i : i + 1000]))
        if all(m is not None for m in metas) or time.time() > deadline:
            break
        time.sleep(0.2)
    done = [json.loads(m) for m in metas if m is not None]
    assert len(done) == len(keys), f"{len(done)} of {len(keys)} results"
    assert all(m["status"] == "SUCCESS" for m in done), [m for m in done if m["status"] != "SUCCESS"][:1]
    times = [datetime.fromisoformat(m["date_done"]) for m in done]
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    print(json.dumps({"tasks": len(done), "seconds": (max(times) - min(times)).total_seconds()}))
