"""Calls taskmill's workers from a Celery app, unchanged Celery code: the Rust test starts the
workers with --celery-queue QUEUE (and --celery-key-prefix PREFIX) and runs

    calls.py QUEUE PREFIX checks N   every kind of call, then N more
    calls.py QUEUE PREFIX many N     N calls, then waits for each

Each check asserts; the last line printed is JSON the test reads (the ids of the calls)."""

import json
import os
import sys
import time

from celery import Celery, chain
from celery.exceptions import NotRegistered, TaskRevokedError
from kombu.exceptions import ContentDisallowed

QUEUE, PREFIX, MODE, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
BROKER = "amqp://guest:guest@127.0.0.1:5672//"
BACKEND = os.environ.get("CELERY_TEST_BACKEND", "redis://127.0.0.1:6379/0")
RECORDS = [
    {"title": "Hello", "body": "world wide web"},
    {"title": "  Bye ", "body": "x"},
    {"title": 3, "body": "not a post"},
]


def app(serializer="json", queue=QUEUE, results="json"):
    a = Celery("calls", broker=BROKER, backend=BACKEND)
    a.conf.task_default_queue = queue
    a.conf.task_serializer = serializer
    a.conf.result_serializer = results
    a.conf.accept_content = ["json", "msgpack", "pickle"]
    # The result keys live under the test's namespace: global_keyprefix + celery-task-meta-.
    a.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}
    return a


def raises(cls, call, *words):
    try:
        got = call.get(timeout=30)
    except cls as e:
        for w in words:
            assert w in str(e), f"{cls.__name__} without {w!r}: {e}"
        return str(e)
    raise AssertionError(f"expected {cls.__name__}, got the result {got!r}")


def many(a, n):
    """n calls of text-stats, each over one record; each returns its result once."""
    calls = [a.send_task("text-stats", args=[[{"body": f"word {i} " * (i % 7 + 1)}]]) for i in range(n)]
    print("sent", n, flush=True)
    for i, c in enumerate(calls):
        out = c.get(timeout=60)
        assert out["records"] == 1, out
    return [c.id for c in calls]


def checks():
    j = app()
    ids = {}
    # The result of the task over the call's records.
    r = j.send_task("post-stats", args=[RECORDS])
    got = r.get(timeout=30)
    assert got["processed_count"] == 2, got
    assert got["max_body_length"] == 14, got
    assert abs(got["avg_title_length"] - 4.0) < 1e-9, got
    assert r.status == "SUCCESS" and r.date_done is not None, (r.status, r.date_done)
    ids["ok"] = r.id
    # A name mapped by the documented rule (last dotted part, _ as -).
    assert j.send_task("myapp.tasks.post_stats", args=[RECORDS]).get(timeout=30) == got
    # A msgpack app; one whose results are msgpack too (its queue's worker writes them so).
    m = app("msgpack")
    assert m.send_task("post-stats", args=[RECORDS]).get(timeout=30) == got
    mm = app("msgpack", queue=QUEUE + "-mp", results="msgpack")
    assert mm.send_task("post-stats", args=[RECORDS]).get(timeout=30) == got
    raises(Exception, mm.send_task("chaos", args=[RECORDS], kwargs={"fail_rate": 1, "fail": "permanent"}), "permanent")
    raises(NotRegistered, mm.send_task("no.such.task", args=[RECORDS]), "no.such.task")
    # Chains: each step over the result before it (one record: a result is an object), the
    # frozen ids kept; an immutable step ignores it; a failure fails the rest.
    two = chain(j.signature("post-stats", args=(RECORDS,)), j.signature("chaos"))()
    assert two.get(timeout=30)["records"] == 1, two.get()
    assert two.parent.get(timeout=5) == got
    three = chain(
        j.signature("post-stats", args=(RECORDS,)),
        j.signature("chaos"),
        j.signature("text-stats", args=([{"body": "a b a"}],), immutable=True),
    )()
    out = three.get(timeout=30)
    assert out["records"] == 1 and out["words"] == 3, out
    assert three.parent.get(timeout=5)["records"] == 1
    ids["chain"] = [three.id, three.parent.id, three.parent.parent.id]
    broken = chain(
        j.signature("chaos", args=(RECORDS,), kwargs={"fail_rate": 1, "fail": "permanent"}),
        j.signature("post-stats"),
    )()
    raises(Exception, broken, "permanent")
    # The step after the failure is failed too (not left pending), as Celery's workers do.
    alone = j.AsyncResult(broken.id)
    raises(Exception, alone, "permanent")
    assert alone.status == "FAILURE", alone.status
    # A task that fails raises with the task's message.
    bad = j.send_task("chaos", args=[RECORDS], kwargs={"fail_rate": 1, "fail": "permanent"})
    raises(Exception, bad, "permanent", "fails")
    assert bad.status == "FAILURE", bad.status
    ids["failed"] = bad.id
    # Refused calls say why, and nothing hangs.
    raises(NotRegistered, j.send_task("no.such.task", args=[RECORDS]), "no.such.task", "--celery-alias")
    raises(TypeError, j.send_task("post-stats", args=[RECORDS], kwargs={"nope": 1}), "nope")
    raises(ValueError, j.send_task("post-stats", args=[[]]), "no records")
    p = app("pickle")
    raises(ContentDisallowed, p.send_task("post-stats", args=[RECORDS]), "pickle", "task_serializer")
    # An ETA 2 s ahead runs no earlier.
    sent = time.time()
    late = j.send_task("post-stats", args=[RECORDS], countdown=2)
    assert late.get(timeout=30) == got
    assert time.time() - sent >= 2.0, time.time() - sent
    ids["eta"] = late.id
    # Celery's priority (0 to 9, higher first) is taskmill's.
    urgent = j.send_task("post-stats", args=[RECORDS], priority=9)
    assert urgent.get(timeout=30) == got
    ids["urgent"] = urgent.id
    # Due after it expires: revoked, never run.
    gone = j.send_task("post-stats", args=[RECORDS], countdown=3, expires=1.5)
    raises(TaskRevokedError, gone, "expired")
    ids["expired"] = gone.id
    ids["many"] = many(j, N)
    return ids


if __name__ == "__main__":
    if MODE == "checks":
        print(json.dumps(checks()))
    else:
        print(json.dumps({"many": many(app(), N)}))
