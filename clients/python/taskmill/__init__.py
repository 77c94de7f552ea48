"""taskmill for Python: enqueue jobs for taskmill's workers and follow them.

    from taskmill import Client
    c = Client(amqp_url="amqp://guest:guest@127.0.0.1:5672/%2f",
               redis_url="redis://127.0.0.1:6379/0", namespace="taskmill")
    job = c.enqueue("post-stats", records, params={}, batch_size=10)
    status = c.wait(job, timeout=60)
    for batch, result in c.results(job): ...
"""

from .client import Client, Job
from .exceptions import (NoSuchJob, Refused, TaskmillError, Timeout, Unavailable,
                         UnreadableJob)

__all__ = ["Client", "Job", "NoSuchJob", "Refused", "TaskmillError", "Timeout", "Unavailable",
           "UnreadableJob"]
__version__ = "0.1.0"
