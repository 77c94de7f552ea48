"""Celery peer benchmark: the throughput workload (post-stats, batches of 10) through Celery.

Settings chosen for the job, as a Celery user would tune them for throughput without losing
work: prefork pool with one process per core, acks_late (ack after the task ran), prefetch
multiplier 16, Redis result backend, persistent messages, no publisher confirms (Celery's
default).

    celery -A celery_bench worker ...          # the worker
    python celery_bench.py produce FILE SIZE   # sends every batch, waits for every result
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
