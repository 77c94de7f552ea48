"""Reads every job named on the command line through the client, as a user would, and prints
one JSON object a job: what status, wait and results gave, or which exception they raised.
Run by taskmill's tests (tests/tests/read_path.rs) against jobs in every state."""

import json
import os
import sys

import taskmill
from taskmill import Client


def outcome(call):
    """The call's value, or the name of the taskmill exception it raised (anything else is
    a bug, and propagates)."""
    try:
        return {"ok": call()}
    except taskmill.TaskmillError as e:
        return {"error": type(e).__name__, "message": str(e)}


def main() -> None:
    with Client(namespace=os.environ["TASKMILL_NAMESPACE"]) as c:
        read(c)


def read(c: Client) -> None:
    for job in sys.argv[1:]:
        reads = {"n": 0}
        status = c.status

        def counted(j, _status=status):
            reads["n"] += 1
            return _status(j)

        c.status = counted
        waited = outcome(lambda: c.wait(job, timeout=0.5)["state"])
        wait_reads = reads["n"]
        c.status = status
        print(json.dumps({
            "job": job,
            "status": outcome(lambda: c.status(job)),
            "wait": waited,
            "wait_reads": wait_reads,
            "results": outcome(lambda: len(list(c.results(job)))),
            "dead": outcome(lambda: len(c.dead(job))),
            # Then steered through a job handle: cancel, delete (cancelling first), gone.
            "cancel": outcome(lambda: c.job(job).cancel()),
            "delete": outcome(lambda: c.job(job).delete(cancel=True)),
            "after": outcome(lambda: c.job(job).status()),
        }), flush=True)


if __name__ == "__main__":
    main()
