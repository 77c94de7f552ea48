"""The Python client against the real RabbitMQ, Redis and Rust workers (run by the Rust test
`tests/tests/python_client.rs`, which starts the workers and checks the numbers).

Reads the records from the JSON Lines file $RECORDS, enqueues them, and prints one JSON
object: the job, its final status, its results, and the catalog errors it got.
"""

import json
import os
import sys
import warnings

import pika

import taskmill
import taskmill.client as tc
from taskmill import Client

c = Client(namespace=os.environ["TASKMILL_NAMESPACE"])
with open(os.environ["RECORDS"], encoding="utf-8") as f:
    records = [json.loads(line) for line in f]

# The catalog refuses, before anything is registered.
refused = {}
for name, kwargs in {
    "unknown_task": {"task": "post-statz"},
    "unknown_param": {"task": "text-stats", "params": {"treshold": 1}},
    "bad_value": {"task": "text-stats", "params": {"top": "abc"}},
    "out_of_range": {"task": "similarity", "params": {"hashes": 99999}},
    "not_a_choice": {"task": "chaos", "params": {"fail": "sometimes"}},
}.items():
    try:
        c.enqueue(records=records, **kwargs)
        refused[name] = None
    except ValueError as e:
        refused[name] = str(e)

# Records that are not JSON are skipped and reported; the rest go.
mixed = records + [b"bytes are not JSON", float("nan")]
job = c.enqueue("post-stats", mixed, params={}, batch_size=10)
status = c.wait(job, timeout=60)
results = [[batch, result] for batch, result in c.results(job)]

top = c.enqueue("text-stats", records, params={"top": 3, "field": "title"}, batch_size=25)
top_status = c.wait(top, timeout=60)

try:
    c.wait("no-such-job", timeout=1)
    unknown = None
except KeyError as e:
    unknown = str(e)

# A batch the broker cannot route (the queue's binding removed behind the client's back) is
# refused, published again, and the enqueue ends with an error at the fifth refusal.
ns = os.environ["TASKMILL_NAMESPACE"]
connect = tc._Publishing.connect


def connect_then_unbind(self):
    connect(self)
    with pika.BlockingConnection(pika.URLParameters(self.c.amqp_url)) as other:
        other.channel().queue_unbind(f"{ns}.unrouted", f"{ns}.work", routing_key="unrouted")


tc._Publishing.connect = connect_then_unbind
try:
    c.enqueue("post-stats", records[:20], queue="unrouted", check=False)
    unroutable = None
except RuntimeError as e:
    unroutable = str(e)
finally:
    tc._Publishing.connect = connect

with warnings.catch_warnings():
    warnings.simplefilter("error")
    unchecked_warned = False
    try:
        Client(namespace=os.environ["TASKMILL_NAMESPACE"] + "-empty").check("post-stats", {})
    except UserWarning:
        unchecked_warned = True

# A wrong password, or a broker that is not there: the client's own exception at once, and no
# job registered (it used to retry for 21 s and leave an interrupted 0/0 job behind).
broker = {}
for name, url in (("wrong_password", "amqp://guest:wrong-pw@127.0.0.1:5672/%2f"),
                  ("unreachable", "amqp://guest:guest@127.0.0.1:1/%2f")):
    try:
        Client(amqp_url=url, namespace=ns).enqueue("post-stats", records[:10])
        broker[name] = None
    except taskmill.TaskmillError as e:
        broker[name] = [type(e).__name__, str(e)]
try:
    Client(redis_url="redis://127.0.0.1:1/0", namespace=ns)
    broker["redis_unreachable"] = None
except taskmill.TaskmillError as e:
    broker["redis_unreachable"] = [type(e).__name__, str(e)]

json.dump({
    "job": job, "status": status, "results": results, "refused": refused, "broker": broker,
    "top": top, "top_status": top_status, "unknown": unknown,
    "unchecked_warned": unchecked_warned, "unroutable": unroutable,
}, sys.stdout)
