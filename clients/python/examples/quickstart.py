"""Enqueue a job from Python, wait for it and read its results (the README's example)."""

import os

from taskmill import Client

c = Client(amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
           redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
           namespace=os.environ.get("TASKMILL_NAMESPACE", "taskmill"))
records = [{"id": i, "title": f"post number {i}", "body": "lorem ipsum " * (i % 5 + 1)}
           for i in range(1, 101)]
job = c.enqueue("post-stats", records, params={}, batch_size=10)   # returns the job id
status = c.wait(job, timeout=60)       # the same dict as `producer status --json`
print(job, status["state"], status["records_done"], status["summary"]["processed_count"])
for batch, result in c.results(job):
    print(batch, result["processed_count"])
