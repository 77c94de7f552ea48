"""Dramatiq peer benchmark: the throughput workload (post-stats, batches of 10) through Dramatiq.

Settings: 2 processes x 4 threads (dramatiq's defaults scaled to the cores), RabbitMQ broker
(acks after the actor ran, persistent messages, no publisher confirms), Redis results backend.

    dramatiq dramatiq_bench ...                   # the worker
    python dramatiq_bench.py produce FILE SIZE    # sends every batch, waits for every result
"""
import json
import os
import sys
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from poststats import batches, post_stats

QUEUE = os.environ.get("PEER_QUEUE", "bench-dramatiq")
broker = RabbitmqBroker(url=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
backend = RedisBackend(url=os.environ.get("RESULT_URL", "redis://127.0.0.1:6379/0"))
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0)
def post_stats_actor(records):
    return post_stats(records)


if __name__ == "__main__" and sys.argv[1:2] == ["produce"]:
    path, size = sys.argv[2], int(sys.argv[3])
    work = list(batches(path, size))
    start = time.time()
    messages = [post_stats_actor.send(b) for b in work]
    for m in messages:
        m.get_result(block=True, timeout=600_000)
    seconds = time.time() - start
    # Leave nothing behind in the user's Redis: the results' keys, deleted a thousand at a
    # time (not timed).
    keys = [backend.build_message_key(m) for m in messages]
    for i in range(0, len(keys), 1000):
        backend.client.delete(*keys[i : i + 1000])
    print(json.dumps({"tasks": len(work), "seconds": seconds}))
