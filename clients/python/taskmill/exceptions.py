"""What the taskmill client raises. Every error is a ``TaskmillError``; each also derives
from the built-in exception older callers caught, so ``except KeyError`` keeps working."""

from __future__ import annotations


class TaskmillError(Exception):
    """Anything the taskmill client raises on purpose."""


class NoSuchJob(TaskmillError, KeyError):
    """No such job in the namespace (never registered, deleted, or expired). The CLI's
    exit code 4, the API's 404."""

    def __init__(self, job: str, namespace: str) -> None:
        super().__init__(f"no job {job[:200]!r} in namespace {namespace}")
        self.job = job

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnreadableJob(TaskmillError, ValueError):
    """The job's record in Redis cannot be read as a job (a counter that is not a number, a
    missing or unknown state, a key of the wrong type: edited by hand, or written by another
    program). The CLI's exit code 6; ``producer delete JOB --yes`` removes it."""

    def __init__(self, job: str, field: str, why: str) -> None:
        super().__init__(f"job {job} is unreadable: {field}: {why}")
        self.job = job
        self.field = field
        self.why = why


class Timeout(TaskmillError, TimeoutError):
    """A wait ran out of time before the job finished (the CLI's exit code 3). ``status``
    holds the job's status when it gave up."""

    def __init__(self, message: str, status: dict) -> None:
        super().__init__(message)
        self.status = status


class Refused(TaskmillError, ConnectionError):
    """RabbitMQ or Redis refused the credentials or the permissions: trying again cannot
    help (the CLI's exit code 5). Nothing was registered or published."""


class Unavailable(TaskmillError, ConnectionError):
    """RabbitMQ or Redis could not be reached (the CLI's exit code 5). Nothing was registered
    or published when it happens before the first batch."""
