"""The taskmill client: enqueue jobs, follow them, read their results.

Speaks the protocol of taskmill's docs/PROTOCOL.md: MessagePack batches published with
publisher confirms to ``{ns}.work``, job state in Redis changed by the same Lua scripts the
Rust producer runs (copies in ``lua/``).
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import re
import time
import urllib.parse
import uuid
import warnings
from collections import deque
from importlib import resources
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import msgpack
import pika
import pika.exceptions
import redis

from ._amqp import ConfirmChannel, Declare
from .exceptions import NoSuchJob, Refused, Timeout, Unavailable, UnreadableJob

FORMAT_VERSION = 1
CONTENT_TYPE = "application/msgpack"
HEADER_ATTEMPT = "x-taskmill-attempt"
HEADER_CONTROL = "x-taskmill-control"
# The headers a job's options ride in, on every batch (docs/PROTOCOL.md).
HEADER_ETA = "x-taskmill-eta-ms"
HEADER_EXPIRES = "x-taskmill-expires-ms"
HEADER_TIME_LIMIT = "x-taskmill-time-limit-ms"
HEADER_RATE_INTERVAL = "x-taskmill-rate-interval-ms"
HEADER_RATE_KEY = "x-taskmill-rate-key"
DEFAULT_QUEUE = "tasks"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DELIVERY_LIMIT = 10
DEAD_EVENTS_MAX = 1_000_000
PRIORITY_BANDS = ((1, "p1"), (5, "p5"))
# Most shards a work queue may be spread over (its shards: QUEUE, QUEUE.s1, ...).
MAX_SHARDS = 16
RETRY_PARAMS = ("retry_max_attempts", "retry_base_ms", "retry_factor", "retry_max_delay_ms")
STATES = ("pending", "running", "completed", "completed_with_errors", "cancelled", "interrupted", "stalled")  # noqa: E501
FINISHED = ("completed", "completed_with_errors", "cancelled", "stalled")
# Batch numbers reserved ahead of publishing (one Redis round trip per this many).
RESERVE_AHEAD = 1024
# How many times one batch may be refused (nack or return), and reconnects in a row.
MAX_REFUSALS = 5
REFUSALS_BEFORE_RECONNECT = 3
MAX_RECONNECTS = 8
# Publisher confirms kept in flight (and bytes of unconfirmed batches held for republishing):
# waiting for each confirm before the next publish made one broker round trip a batch.
CONFIRM_WINDOW = 1000
MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
LEASE_SECONDS = 30
# A job with no lease registered longer ago than this was abandoned by its producer (which
# writes its lease right after registering): the store's LEASE_GRACE_MS.
LEASE_GRACE_MS = 60_000
POLL_SECONDS = 0.1
# While waiting, Redis may be unreachable this long in a row (a failover, a restart) before
# wait gives up with Unavailable: each poll asks again (a Sentinel URL's pool asks the
# sentinels for the primary after a lost connection).
REDIS_OUTAGE_SECONDS = 60
RESULTS_PAGE = 500

# What a lost connection or channel raises.
_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
         pika.exceptions.StreamLostError, ConnectionError)

# What refused credentials or vhost raise (every node of a cluster would say the same).
_REFUSED = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError,
            pika.exceptions.ProbableAccessDeniedError)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
# A completion webhook's URL (enqueue --on-complete): http or https, with a host.
_HOOK_URL = re.compile(r"^https?://[^/?#\s]+[^\s]*$")
# Fields of the job hash that are numbers, and those only present once set.
_NUMBERS = (
    "ttl", "batches_published", "batches_done", "batches_dead", "records_total",
    "records_done", "records_invalid", "batches_cancelled", "batches_expired", "retries",
    "sources_failed", "created_ms", "priority",
)
_OPTIONAL_NUMBERS = (
    "batches_total", "started_ms", "finished_ms", "cancelled_ms", "interrupted_ms",
    "eta_ms", "expires_ms", "then_fired_ms",
)


def _lua(name: str) -> str:
    return resources.files("taskmill").joinpath("lua", name).read_text(encoding="utf-8")


def _state_table() -> str:
    entries = ", ".join(f"{s} = '{s}'" for s in STATES)
    return f"local STATE = {{ {entries} }}\n"


def _with_finish(body: str) -> str:
    """A script as the Rust store builds it: the state table, the shared prelude, the body."""
    return f"{_state_table()}{_lua('prelude.lua')}\n{body}"


def _redis_spec(url: str) -> Dict[str, Any]:
    """A ``REDIS_URL``, parsed as the Rust side parses it (``taskmill_protocol::redis_url``):
    ``redis://...`` or ``redis+sentinel://[[user]:password@]h1:26379,h2:26379/MASTER/DB``, with
    the options ``wait_replicas``, ``wait_timeout_ms``, ``sentinel_username`` and
    ``sentinel_password``."""
    url = url.strip()
    base, _, query = url.partition("?")
    opts: Dict[str, str] = {}
    kept = []
    for pair in filter(None, query.split("&")):
        k, _, v = pair.partition("=")
        if k in ("wait_replicas", "wait_timeout_ms", "sentinel_username", "sentinel_password"):
            opts[k] = urllib.parse.unquote_plus(v)
        else:
            kept.append(pair)
    sentinel = base.startswith(("redis+sentinel://", "rediss+sentinel://"))
    try:
        replicas = int(opts.get("wait_replicas", "1" if sentinel else "0"))
        timeout_ms = int(opts.get("wait_timeout_ms", "1000"))
    except ValueError:
        raise ValueError("REDIS_URL options wait_replicas and wait_timeout_ms are whole numbers") from None
    if replicas < 0 or timeout_ms <= 0:
        raise ValueError("REDIS_URL: wait_replicas must be 0 or more, wait_timeout_ms above 0")
    spec: Dict[str, Any] = {"wait_replicas": replicas, "wait_timeout_ms": timeout_ms}
    if not sentinel:
        if "sentinel_username" in opts or "sentinel_password" in opts:
            raise ValueError("REDIS_URL options sentinel_* need the redis+sentinel:// form")
        spec["url"] = base + ("?" + "&".join(kept) if kept else "")
        return spec
    if kept:
        raise ValueError(f"REDIS_URL option {kept[0].split('=')[0]!r} is not one of wait_replicas, "
                         "wait_timeout_ms, sentinel_username, sentinel_password")
    tls = base.startswith("rediss+")
    rest = base.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    user = password = None
    if at:
        u, colon, pw = userinfo.partition(":")
        user = urllib.parse.unquote(u) or None
        password = urllib.parse.unquote(pw) if colon and pw else None
    sentinels = []
    for h in filter(None, (x.strip() for x in hosts.split(","))):
        if h.startswith("["):
            host, _, after = h[1:].partition("]")
            port = after[1:] if after.startswith(":") else "26379"
        else:
            host, colon, port = h.rpartition(":")
            if not colon:
                host, port = h, "26379"
        if not host or not port.isdigit():
            raise ValueError(f"REDIS_URL sentinel {h!r} is not host:port")
        sentinels.append((host, int(port)))
    if not sentinels:
        raise ValueError("REDIS_URL redis+sentinel:// names no sentinel")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("REDIS_URL redis+sentinel:// needs /MASTER_NAME[/DB] after the sentinels")
    spec.update(sentinels=sentinels, master=urllib.parse.unquote(parts[0]),
                db=int(parts[1]) if len(parts) == 2 else 0, tls=tls, username=user,
                password=password, sentinel_username=opts.get("sentinel_username"),
                sentinel_password=opts.get("sentinel_password"))
    return spec


def _connect_redis(spec: Dict[str, Any]) -> "redis.Redis":
    """A client for the spec: the one server, or the primary the sentinels name (redis-py's
    Sentinel pool asks them again after a lost connection or a ``READONLY``)."""
    if "url" in spec:
        return redis.Redis.from_url(spec["url"], decode_responses=True)
    from redis.sentinel import Sentinel
    sentinel_kwargs = {k: spec[f"sentinel_{k}"] for k in ("username", "password")
                       if spec.get(f"sentinel_{k}")}
    sentinels = Sentinel(spec["sentinels"], sentinel_kwargs=sentinel_kwargs, socket_timeout=5)
    extra: Dict[str, Any] = {"ssl": True} if spec["tls"] else {}
    return sentinels.master_for(spec["master"], db=spec["db"], username=spec["username"],
                                password=spec["password"], decode_responses=True,
                                socket_timeout=30, **extra)


def _steps(then: Optional[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Follow-up steps (``then``) checked and in the store's form."""
    steps = []
    for i, step in enumerate(then or []):
        unknown = set(step) - {"task", "params", "on", "batch_size"}
        if unknown or not isinstance(step.get("task"), str) or not step["task"]:
            raise ValueError(f"then[{i}]: a step is {{task, params?, on?, batch_size?}}")
        on = step.get("on", "complete")
        if on not in ("complete", "success"):
            raise ValueError(f"then[{i}].on {on!r} is not complete or success")
        size = int(step.get("batch_size", 10))
        if size < 1:
            raise ValueError(f"then[{i}].batch_size must be at least 1")
        steps.append({"task": step["task"], "on": on, "batch_size": size,
                      "params": {str(k): _param_text(v)
                                 for k, v in (step.get("params") or {}).items()}})
    return steps


def _chord_id(group: str) -> str:
    """The id of group ``group``'s chord follow-up (the store's ``chord_id``)."""
    if len(group) + 6 <= 100:
        return group + ".chord"
    h = 0xCBF29CE484222325
    for b in group.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{group[:70]}.{h:016x}.chord"


class _Durable:
    """A script whose writes must survive a failover: run with ``WAIT`` for the URL's
    ``wait_replicas`` after it, on the same connection (one pipeline)."""

    def __init__(self, client: "Client", script: Any) -> None:
        self.c = client
        self.script = script

    def __call__(self, keys: List[str], args: List[Any]) -> Any:
        wanted = self.c._wait_replicas
        if wanted == 0:
            return self.script(keys=keys, args=args)
        pipe = self.c.redis.pipeline(transaction=False)
        self.script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", wanted, self.c._wait_timeout_ms)
        got, acked = pipe.execute()
        if int(acked) < wanted:
            raise Unavailable(
                f"Redis: a write reached {acked} of the {wanted} replica(s) asked for within "
                f"{self.c._wait_timeout_ms} ms (is a replica down? the REDIS_URL option "
                "wait_replicas sets how many)")
        return got


def _redact(url: str) -> str:
    """The URL without its password, for errors (each of a comma-separated list)."""
    if url.strip().startswith(("redis+sentinel://", "rediss+sentinel://")):
        m = re.match(r"^([a-z+]+://)(?:([^@/]*)@)?(.*)$", url.strip())
        if not m:
            return "<unparseable URL>"
        head, userinfo, tail = m.groups()
        if userinfo and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        tail = re.sub(r"sentinel_password=[^&]*", "sentinel_password=***", tail)
        return head + (f"{userinfo}@" if userinfo else "") + tail
    if "," in url:
        return ",".join(_redact(one) for one in url.split(","))
    try:
        u = urllib.parse.urlsplit(url)
        if u.password is None:
            return url
        netloc = u.netloc.replace(f":{u.password}@", ":***@", 1)
        return urllib.parse.urlunsplit(u._replace(netloc=netloc))
    except ValueError:
        return "<unparseable URL>"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _seconds(what: str, value: Any) -> float:
    """A duration given as seconds (int or float) or a ``timedelta``."""
    if isinstance(value, _dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{what}: a number of seconds or a timedelta, not {value!r}")
    if value < 0:
        raise ValueError(f"{what}: must not be negative")
    return float(value)


def _rate_interval_ms(rate: str) -> int:
    """``N/s``, ``N/m`` or ``N/h`` as the interval between starts in ms (the Rust
    ``parse_rate``)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*/\s*([smh])\s*", str(rate))
    per = {"s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
    try:
        n = float(m.group(1)) if m else 0.0
    except ValueError:
        n = 0.0
    if not m or not n > 0:
        raise ValueError(f"rate_limit: {rate!r} is not a rate like 100/s, 30/m or 500/h")
    return max(int(round(per[m.group(2)] / n)), 1)


def _options(countdown: Any, eta: Any, expires: Any, time_limit: Any, rate_limit: Any,
             rate_key: Optional[str]) -> Dict[str, Any]:
    """The job's steering options as the headers every batch carries (ms since the epoch or
    ms), checked as the Rust ``JobSpec::check`` checks them."""
    now = _now_ms()
    out: Dict[str, Any] = {}
    if countdown is not None and eta is not None:
        raise ValueError("countdown and eta: give one of them")
    if countdown is not None:
        out[HEADER_ETA] = now + int(_seconds("countdown", countdown) * 1000)
    elif eta is not None:
        if isinstance(eta, _dt.datetime):
            if eta.tzinfo is None:
                raise ValueError("eta: a datetime with a time zone")
            out[HEADER_ETA] = int(eta.timestamp() * 1000)
        else:
            out[HEADER_ETA] = int(_seconds("eta", eta) * 1000)
    if expires is not None:
        out[HEADER_EXPIRES] = now + int(_seconds("expires", expires) * 1000)
        if HEADER_ETA in out and out[HEADER_EXPIRES] <= out[HEADER_ETA]:
            raise ValueError("expires: ends before the batches may start (countdown/eta)")
    if time_limit is not None:
        ms = int(_seconds("time_limit", time_limit) * 1000)
        if ms <= 0:
            raise ValueError("time_limit: must be more than 0")
        out[HEADER_TIME_LIMIT] = ms
    if rate_limit is not None:
        out[HEADER_RATE_INTERVAL] = _rate_interval_ms(rate_limit)
        if rate_key is not None:
            out[HEADER_RATE_KEY] = rate_key
    elif rate_key is not None:
        raise ValueError("rate_key: only with rate_limit")
    return out


def _check_param(task: str, specs: List[dict], name: str, value: str) -> None:
    """The catalog check of one parameter (as the Rust `check_params`)."""
    spec = next((p for p in specs if p.get("name") == name), None)
    if spec is None:
        if name in RETRY_PARAMS:
            return
        valid = [f"{p.get('name')} ({p.get('kind')}, default {p.get('default')!r})" for p in specs]
        valid.extend(RETRY_PARAMS)
        raise ValueError(f"task {task} has no parameter {name!r}; valid: {', '.join(valid)}")
    kind, v = spec.get("kind"), value.strip()
    ok = True
    if kind == "int":
        ok = re.fullmatch(r"[+-]?\d+", v) is not None
    elif kind == "float":
        try:
            f = float(v)
            ok = f == f and f not in (float("inf"), float("-inf"))
        except ValueError:
            ok = False
    elif kind == "bool":
        ok = v in ("true", "false")
    if not ok:
        what = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(kind, kind)
        raise ValueError(f"parameter {name}={value!r} of task {task} is not {what}")
    # Declared ranges and choices (the Rust `ParamSpec::allowed`).
    lo, hi, choices = spec.get("min"), spec.get("max"), spec.get("choices") or []

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)
    if kind in ("int", "float") and (
            (lo is not None and float(v) < lo) or (hi is not None and float(v) > hi)):
        allowed = (f"{num(lo)} to {num(hi)}" if lo is not None and hi is not None
                   else f"at least {num(lo)}" if lo is not None else f"at most {num(hi)}")
        raise ValueError(f"parameter {name}={value!r} of task {task} is out of range: {allowed}")
    if choices and v not in choices:
        raise ValueError(
            f"parameter {name}={value!r} of task {task} is not one of: {', '.join(choices)}")


class Client:
    """A connection to one namespace of taskmill: enqueue jobs and follow them.

    Redis is connected now; RabbitMQ for each ``enqueue``.
    """

    def __init__(
        self,
        amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2f",  # or several, comma-separated
        redis_url: str = "redis://127.0.0.1:6379/0",
        namespace: str = "taskmill",
        result_ttl: int = 7 * 24 * 3600,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if not _NAME.match(namespace):
            raise ValueError(f"namespace {namespace!r}: use 1 to 100 of A-Z a-z 0-9 - _")
        self.namespace = namespace
        self.amqp_url = amqp_url
        self.result_ttl = int(result_ttl)
        self.max_message_bytes = int(max_message_bytes)
        spec = _redis_spec(redis_url)
        self._wait_replicas = spec["wait_replicas"]
        self._wait_timeout_ms = spec["wait_timeout_ms"]
        self.redis = _connect_redis(spec)
        try:
            self.redis.ping()
        except redis.exceptions.AuthenticationError as e:
            raise Refused(f"Redis at {_redact(redis_url)} refused the credentials: {e}") from None
        except redis.exceptions.ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e) or "NOPERM" in str(e):
                raise Refused(f"Redis at {_redact(redis_url)} refused us: {e}") from None
            raise
        except redis.exceptions.ConnectionError as e:
            raise Unavailable(f"cannot reach Redis at {_redact(redis_url)}: {e}") from None
        script = self.redis.register_script
        self._register = _Durable(self, script(_with_finish(_lua("register.lua"))))
        self._finish = _Durable(self, script(_with_finish(_lua("finish_publishing.lua"))))
        self._raise = _Durable(self, script(_with_finish(_lua("raise.lua"))))
        self._check_lease = script(_with_finish(_lua("check_lease.lua")))
        self._cancel = _Durable(self, script(_with_finish(_lua("cancel.lua"))))
        self._delete = self.redis.register_script(_with_finish(_lua("delete.lua")))
        self._close_group = _Durable(self, script(_with_finish(_lua("close_group.lua"))))
        self._shards = _Durable(self, script(_lua("shards.lua")))

    # Life --------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the Redis connections (each enqueue closes its own broker connection)."""
        self.redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def job(self, job: str) -> "Job":
        """A handle on a job (enqueued by anyone): ``status()``, ``wait()``, ``results()``,
        ``dead()``, ``cancel()``, ``delete()``."""
        return Job(self, job)

    # Keys -------------------------------------------------------------------------------
    def _job_key(self, job: str) -> str:
        return f"{self.namespace}:job:{job}"

    # The catalog ------------------------------------------------------------------------
    def tasks(self) -> List[dict]:
        """The tasks the live workers serve (``producer tasks --json``)."""
        names = sorted(self.redis.smembers(f"{self.namespace}:tasks"))
        if not names:
            return []
        entries = self.redis.mget([f"{self.namespace}:task:{n}" for n in names])
        return [json.loads(e) for e in entries if e]

    def check(self, task: str, params: Dict[str, str]) -> None:
        """Refuses (``ValueError``) an unknown task, parameter or value, as ``enqueue`` does;
        with no live worker to ask, warns and lets it go."""
        catalog = self.tasks()
        if not catalog:
            warnings.warn(
                f"no live worker has recorded its tasks in namespace {self.namespace}: "
                f"task {task!r} and its parameters are not checked"
            )
            return
        entry = next((e for e in catalog if e.get("name") == task), None)
        if entry is None:
            names = ", ".join(e.get("name", "?") for e in catalog)
            raise ValueError(
                f"unknown task {task[:200]!r}: the live workers serve {names} "
                "(or pass check=False for a worker not deployed yet)"
            )
        for name, value in params.items():
            _check_param(task, entry.get("params") or [], name, value)

    # Enqueue ----------------------------------------------------------------------------
    def enqueue(
        self,
        task: str,
        records: Iterable[Any],
        params: Optional[Dict[str, Any]] = None,
        batch_size: int = 10,
        queue: str = DEFAULT_QUEUE,
        job_id: Optional[str] = None,
        priority: int = 0,
        unique_key: Optional[str] = None,
        check: bool = True,
        countdown: Any = None,
        eta: Any = None,
        expires: Any = None,
        time_limit: Any = None,
        rate_limit: Optional[str] = None,
        rate_key: Optional[str] = None,
        then: Optional[List[Dict[str, Any]]] = None,
        group: Optional[str] = None,
        on_complete: Optional[str] = None,
        shards: Optional[int] = None,
    ) -> str:
        """Publishes ``records`` (JSON-like values) as a new job of ``task`` and returns its id
        once the broker confirmed every batch.

        A record that is not JSON (bytes, NaN, a set) is skipped and reported in the job's
        problems. Raises ``ValueError`` before anything is registered or published for an
        unknown task, parameter or value, a bad name, a taken job id, or no record at all.
        With ``unique_key``, while a job with that key is pending or running nothing is
        enqueued and that job's id is returned. The options that steer the job are the
        command line's: ``countdown`` (seconds or a ``timedelta``) or ``eta`` (an aware
        ``datetime``, or seconds since the epoch), ``expires`` and ``time_limit`` (seconds or
        a ``timedelta``), ``rate_limit`` (``"100/s"``, ``"30/m"``, ``"500/h"``) and its
        ``rate_key``. ``then`` is a chain of follow-up jobs (``enqueue --then``): a list of
        ``{"task", "params"?, "on"?: "complete" | "success", "batch_size"?}``, each run over the
        batch results of the job before it. ``group`` puts the job in a group
        (``producer status --group``, ``wait --group``). ``on_complete`` is a URL the job's
        final status is POSTed to when it ends (``enqueue --on-complete``), by the workers.
        ``shards`` spreads the queue over at least that many shards (``enqueue --shards``; the
        queue's count is kept in Redis and only grows; batch n goes to shard n mod count).
        """
        params = {str(k): _param_text(v) for k, v in (params or {}).items()}
        if not _NAME.match(queue):
            raise ValueError(f"queue {queue!r}: use 1 to 100 of A-Z a-z 0-9 - _")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= priority <= 9:
            raise ValueError("priority must be 0 to 9")
        if shards is not None and not (isinstance(shards, int) and 1 <= shards <= MAX_SHARDS):
            raise ValueError(f"shards {shards!r} is out of range: 1 to {MAX_SHARDS}")
        job = job_id or uuid.uuid4().hex
        for what, value in (("job id", job), ("unique key", unique_key), ("rate key", rate_key),
                            ("group", group)):
            if value is not None and not _JOB_ID.match(value):
                raise ValueError(f"{what} {value!r}: use 1 to 100 of A-Z a-z 0-9 - _ . (no ':')")
        if on_complete is not None and not _HOOK_URL.match(on_complete):
            raise ValueError(f"on_complete {on_complete!r} is not an http:// or https:// URL")
        steps = _steps(then)
        if check:
            self.check(task, params)
            self._check_steps(steps)
        chain = (json.dumps({"root": job, "next": 1, "steps": steps}, separators=(",", ":"))
                 if steps else "")
        if self.redis.exists(self._job_key(job)):
            raise ValueError(f"job {job} already exists; choose another job_id")
        options = _options(countdown, eta, expires, time_limit, rate_limit, rate_key)
        if HEADER_RATE_INTERVAL in options and HEADER_RATE_KEY not in options:
            options[HEADER_RATE_KEY] = f"job-{job}"
        publishing = _Publishing(self, job, task, queue, params, priority, unique_key, options)
        publishing.shards = max(1, min(MAX_SHARDS, int(self._shards(
            keys=[f"{self.namespace}:shards"], args=[queue, shards or 1]))))
        publishing.then = chain
        publishing.group = group or ""
        publishing.on_complete = on_complete or ""
        try:
            # The broker first: a wrong password or a broker that is down fails now, once,
            # before anything is registered (no retries, no job left behind).
            publishing.first_connect()
            return publishing.run(records, batch_size)
        finally:
            publishing.close()

    def _check_steps(self, steps: List[Dict[str, Any]]) -> None:
        for step in steps:
            try:
                self.check(step["task"], step["params"])
            except ValueError as e:
                raise ValueError(f"follow-up step: {e}") from None

    # Groups -----------------------------------------------------------------------------
    def close_group(self, group: str, then: Optional[List[Dict[str, Any]]] = None,
                    check: bool = True) -> Optional[str]:
        """Closes ``group`` (``producer group close``): no more jobs join it, and its
        follow-up ``then`` (a chord; steps as ``enqueue``'s ``then``) runs once over the results
        of all its jobs when every one has ended. Returns the follow-up's job id (None without
        ``then``). Closing again the same way is harmless; ``ValueError`` when it was closed
        with another follow-up, ``NoSuchJob`` when the group has no job."""
        if not _JOB_ID.match(group):
            raise ValueError(f"group {group!r}: use 1 to 100 of A-Z a-z 0-9 - _ . (no ':')")
        steps = _steps(then)
        if check:
            self._check_steps(steps)
        root = _chord_id(group)
        chain = (json.dumps({"root": root, "next": 1, "steps": steps}, separators=(",", ":"))
                 if steps else "")
        members = f"{self.namespace}:group:{group}"
        got = self._close_group(keys=[members, members + ":info"],
                                args=[group, _now_ms(), chain, self.result_ttl])
        if got == 0:
            raise NoSuchJob(f"group {group}", self.namespace)
        if got == 3:
            raise ValueError(f"group {group} is closed already, with another follow-up")
        return root if steps else None

    def group(self, group: str) -> dict:
        """The group's jobs by state, whether they all finished, and its close and chord
        follow-up: the dict ``producer status --group G --json`` prints (``NoSuchJob`` when it
        has no job)."""
        ids = sorted(self.redis.smembers(f"{self.namespace}:group:{group}"))
        statuses = []
        for job in ids:
            try:
                statuses.append(self.status(job))
            except NoSuchJob:
                pass
        if not statuses:
            raise NoSuchJob(f"group {group}", self.namespace)
        counts: Dict[str, int] = {}
        for st in statuses:
            counts[st["state"]] = counts.get(st["state"], 0) + 1
        info = self.redis.hgetall(f"{self.namespace}:group:{group}:info")
        out = {"group": group, "jobs": len(statuses), "counts": counts,
               "finished": all(self.finished(st) for st in statuses),
               "closed": "closed_ms" in info, "statuses": statuses}
        for k in ("then_job", "then_note"):
            if k in info:
                out[k] = info[k]
        if "then" in info:
            try:
                out["then"] = json.loads(info["then"])
            except ValueError:
                pass
        return out

    # Schedules --------------------------------------------------------------------------
    def add_schedule(self, name: str, enqueue: List[str], every: Any = None,
                     cron: Optional[str] = None, timezone: Optional[str] = None,
                     catch_up: Optional[int] = None) -> None:
        """Adds a periodic schedule (``producer schedule add``): ``every`` (seconds or a
        ``timedelta``, at least 1 s) or ``cron`` (five fields, in ``timezone``, an IANA name,
        UTC without); ``catch_up`` runs the last N ticks missed while no scheduler ran
        (default: skip them); ``enqueue`` the options of ``producer enqueue`` for each tick's
        job (``["--file", "/data/posts.jsonl", "--task", "post-stats"]``). ``producer
        scheduler`` runs it: the first scheduler that sees it checks it as ``schedule add``
        does and sets its first tick, or pauses it with ``last_error`` saying why. ``ValueError``
        for what can be checked here (name, period, options a tick cannot take, a name taken)."""
        if not _NAME.match(name) or len(name) > 64:
            raise ValueError(f"schedule {name!r}: use 1 to 64 of A-Z a-z 0-9 - _")
        if (every is None) == (cron is None):
            raise ValueError("give every or cron, not both and not neither")
        if not enqueue or not all(isinstance(a, str) for a in enqueue):
            raise ValueError("enqueue: the options of producer enqueue, as a list of strings")
        spec: Dict[str, Any] = {"missed": "skip" if catch_up is None else f"catch-up:{int(catch_up)}",
                                "enqueue": list(enqueue)}
        if every is not None:
            ms = int(round(_seconds("every", every) * 1000))
            if ms < 1000:
                raise ValueError("every: at least 1 second")
            spec["every_ms"] = ms
        else:
            if len(str(cron).split()) < 5:
                raise ValueError(f"cron {cron!r} is not a cron expression (five fields)")
            spec["cron"] = cron
            if timezone is not None:
                spec["timezone"] = timezone
        if timezone is not None and cron is None:
            raise ValueError("timezone goes with cron (an every period has no time zone)")
        for refused in ("--job", "--wait", "--timeout"):
            if any(a == refused or a.startswith(refused + "=") for a in enqueue):
                raise ValueError(f"{refused} is not an option of a schedule "
                                 f"(each tick's job is sched-{name}-SECONDS)")
        if any(a == "--file" and b == "-" for a, b in zip(enqueue, enqueue[1:])):
            raise ValueError("--file - (stdin) cannot be read at each tick: name a file or a URL")
        key = f"{self.namespace}:schedule:{name}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "spec", json.dumps(spec, separators=(",", ":")))
        pipe.sadd(f"{self.namespace}:schedules", name)
        added, _ = pipe.execute()
        if not added:
            raise ValueError(f"schedule {name!r} exists")
        self.redis.hset(key, "paused", 0)

    def schedule(self, name: str) -> Optional[dict]:
        """One schedule: ``name``, ``spec`` (as stored; None when unreadable), ``next_ms``
        (None until a scheduler has checked it), ``paused``, ``last_tick_ms``, ``last_job``,
        ``last_error``; None when there is none."""
        raw = self.redis.hgetall(f"{self.namespace}:schedule:{name}")
        if "spec" not in raw:
            return None
        try:
            spec = json.loads(raw["spec"])
        except ValueError:
            spec = None

        def num(k: str) -> Optional[int]:
            try:
                return int(raw[k])
            except (KeyError, ValueError):
                return None
        return {"name": name, "spec": spec, "next_ms": num("next_ms"),
                "paused": raw.get("paused") == "1", "last_tick_ms": num("last_tick_ms"),
                "last_job": raw.get("last_job") or None, "last_error": raw.get("last_error") or None}

    def schedules(self) -> List[dict]:
        """Every schedule of the namespace, by name (as ``schedule``)."""
        names = sorted(self.redis.smembers(f"{self.namespace}:schedules"))
        return [s for s in (self.schedule(n) for n in names) if s is not None]

    def pause_schedule(self, name: str) -> bool:
        """Pauses a schedule; False when there is none."""
        key = f"{self.namespace}:schedule:{name}"
        if not self.redis.hexists(key, "spec"):
            return False
        self.redis.hset(key, "paused", 1)
        return True

    def resume_schedule(self, name: str) -> bool:
        """Resumes a schedule from the first tick after the next scheduler pass (the paused
        ticks are not run); False when there is none."""
        key = f"{self.namespace}:schedule:{name}"
        if not self.redis.hexists(key, "spec"):
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, "paused", 0)
        pipe.hdel(key, "next_ms")
        pipe.execute()
        return True

    def remove_schedule(self, name: str) -> bool:
        """Removes a schedule (its jobs stay); False when there was none."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(f"{self.namespace}:schedule:{name}")
        pipe.srem(f"{self.namespace}:schedules", name)
        removed, _ = pipe.execute()
        return removed > 0

    # Follow -----------------------------------------------------------------------------
    def _read(self, job: str) -> Optional[Dict[str, str]]:
        """The job hash as it is, None when there is none; ``UnreadableJob`` when the key
        holds another type."""
        try:
            raw = self.redis.hgetall(self._job_key(job))
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise UnreadableJob(job, "key", "not a hash (the key holds another type: "
                                    "written by something else)") from None
            raise
        return raw or None

    @staticmethod
    def _parse(job: str, raw: Dict[str, str]) -> dict:
        """The job hash as ``producer status --json`` prints it; ``UnreadableJob`` names the
        first field that is not what taskmill writes there."""
        def number(k: str) -> int:
            v = raw[k]
            try:
                return max(int(v), 0)
            except ValueError:
                raise UnreadableJob(job, k, f"holds {v[:100]!r}, not a whole number") from None
        state = raw.get("state")
        if state is None:
            raise UnreadableJob(job, "state", "missing")
        if state not in STATES:
            raise UnreadableJob(job, "state", f"holds {state[:100]!r}, not a job state")
        out: Dict[str, Any] = {"job": job}
        for k in _NUMBERS:
            out[k] = number(k) if k in raw else 0
        for k in _OPTIONAL_NUMBERS + ("lease_until_ms",):
            if k in raw:
                out[k] = number(k)
        # Batches given up on (a stalled job): shown while there are any, as the CLI does.
        if "batches_lost" in raw and number("batches_lost") > 0:
            out["batches_lost"] = number("batches_lost")
        for k in ("state", "task", "queue"):
            out[k] = raw.get(k, "")
        for k, default in (("params", {}), ("problems", [])):
            try:
                out[k] = json.loads(raw.get(k) or json.dumps(default))
            except ValueError:
                out[k] = default
        if "summary" in raw:
            try:
                out["summary"] = json.loads(raw["summary"])
            except ValueError:
                pass
        # Follow-up jobs: the job this one follows, the steps after it, what became of them.
        for k in ("group", "parent", "then_job", "then_note"):
            if k in raw:
                out[k] = raw[k]
        for k in ("then", "parent_outcome"):
            if k in raw:
                try:
                    out[k] = json.loads(raw[k])
                except ValueError:
                    pass
        return out

    @staticmethod
    def _lease_lapsed(status: dict, now: int) -> bool:
        """Publishing has no total and nobody renews the lease (the store's rule)."""
        if "batches_total" in status:
            return False
        if "lease_until_ms" in status:
            return status["lease_until_ms"] < now
        return status["created_ms"] + LEASE_GRACE_MS < now

    def status(self, job: str) -> dict:
        """The job's state and counters: the dict ``producer status --json`` prints. Raises
        ``NoSuchJob`` (a ``KeyError``) for an unknown (or expired) job, ``UnreadableJob`` for
        a record that is not a job's. A lapsed publishing lease is settled once, as the CLI
        does."""
        raw = self._read(job)
        if raw is None:
            raise NoSuchJob(job, self.namespace)
        status = self._parse(job, raw)
        now = _now_ms()
        if self._lease_lapsed(status, now):
            changed = self._check_lease(keys=[self._job_key(job)], args=[now, LEASE_GRACE_MS])
            if changed == 1:
                raw = self._read(job)
                if raw is None:
                    raise NoSuchJob(job, self.namespace)
                status = self._parse(job, raw)
        return status

    @staticmethod
    def finished(status: dict) -> bool:
        """Completed, completed with errors, cancelled, stalled (batches lost), or interrupted
        with all it published settled."""
        return status["state"] in FINISHED or (
            status["state"] == "interrupted" and "finished_ms" in status
        )

    def wait(self, job: str, timeout: Optional[float] = None, chain: bool = False) -> dict:
        """Waits until the job finishes and returns its final status (with the summary the
        workers fold); raises ``Timeout`` (a ``TimeoutError``) after ``timeout`` seconds.
        With ``chain``, follows the job's follow-ups (``then``) to the last one that runs and
        returns that job's status (``producer wait --chain``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self._wait_one(job, deadline, timeout)
        while chain and "then" in status:
            # The follow-up fires with the job's end (then_fired_ms) and is published by a
            # worker (then_job), or not (then_note says why); a cancelled job never fires.
            while ("then_job" not in status and "then_note" not in status
                   and "then_fired_ms" in status):
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(f"the follow-up of job {status['job']} was not published "
                                  f"within {timeout} s", status)
                time.sleep(POLL_SECONDS)
                status = self.status(status["job"])
            if "then_job" not in status:
                break
            status = self._wait_one(status["then_job"], deadline, timeout)
        return status

    def _wait_one(self, job: str, deadline: Optional[float], timeout: Optional[float]) -> dict:
        """One job of :meth:`wait`."""
        outage: Optional[float] = None
        last: dict = {}
        while True:
            try:
                status = last = self.status(job)
                outage = None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                now = time.monotonic()
                outage = outage or now
                if now - outage > REDIS_OUTAGE_SECONDS:
                    raise Unavailable(f"waiting for job {job}: Redis unreachable for "
                                      f"{REDIS_OUTAGE_SECONDS} s: {e}") from None
                if deadline is not None and now >= deadline:
                    raise Timeout(f"job {job}: Redis unreachable at the end of {timeout} s: "
                                  f"{e}", last) from None
                time.sleep(min(1.0, POLL_SECONDS * 5))
                continue
            if self.finished(status):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(
                    f"job {job} not finished after {timeout} s: "
                    f"{status['batches_done']} batches done of {status.get('batches_total', '?')}",
                    status,
                )
            time.sleep(POLL_SECONDS)
        # The worker that stored the last batch of a completed job folds the summary just
        # after; a cancelled or interrupted job gets none.
        for _ in range(50):
            if ("summary" in status or status["batches_done"] == 0
                    or status["state"] not in ("completed", "completed_with_errors", "stalled")):
                break
            time.sleep(POLL_SECONDS)
            status = self.status(job)
        return status

    def results(self, job: str) -> Iterator[Tuple[int, Any]]:
        """Each stored batch result as ``(batch, result)``, in batch order, read a page at a
        time; batches not done (dead, or still running) are left out."""
        status = self.status(job)
        end = status.get("batches_total", status["batches_published"])
        key = f"{self._job_key(job)}:results"
        try:
            stored = self.redis.hlen(key)
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise UnreadableJob(job, "results", "not a hash (the key holds another "
                                    "type: written by something else)") from None
            raise
        seen = 0
        for start in range(0, end, RESULTS_PAGE):
            if seen >= stored:
                break
            numbers = list(range(start, min(start + RESULTS_PAGE, end)))
            for batch, value in zip(numbers, self.redis.hmget(key, numbers)):
                if value is not None:
                    seen += 1
                    try:
                        yield batch, json.loads(value)
                    except ValueError:
                        yield batch, value

    def cancel(self, job: str) -> dict:
        """Cancels the job: its batches not started yet are dropped unrun. Returns
        ``{"was": STATE, "cancelled": bool}`` (False: it had finished already, nothing
        changed). ``NoSuchJob``; ``UnreadableJob`` when its state cannot be read (left as it
        is)."""
        key = self._job_key(job)
        try:
            got = self._cancel(keys=[key, f"{self.namespace}:cancelled"], args=[job, _now_ms()])
        except redis.exceptions.ResponseError as e:
            if "WRONGTYPE" in str(e):
                raise UnreadableJob(job, "key", "not a hash (the key holds another type: "
                                    "written by something else)") from None
            raise
        if got is None:
            raise NoSuchJob(job, self.namespace)
        code, before = int(got[0]), got[1]
        if code == 3:
            why = "missing" if before == "" else f"holds {before[:100]!r}, not a job state"
            raise UnreadableJob(job, "state", why)
        return {"was": before, "cancelled": code == 1}

    def delete(self, job: str, cancel: bool = False) -> None:
        """Deletes the job's keys and results. A job still pending or running is refused
        (``ValueError``) unless ``cancel``; a job whose record cannot be read is deleted as it
        is. ``NoSuchJob`` when there is none."""
        try:
            status = self.status(job)
            running = status["state"] in ("pending", "running") or (
                status["state"] == "interrupted" and "finished_ms" not in status)
        except UnreadableJob:
            running = False
        if running:
            if not cancel:
                raise ValueError(f"job {job} is {status['state']}: cancel it first")
            self.cancel(job)
        k = self._job_key(job)
        keys = [k, f"{k}:results", f"{k}:dead", f"{k}:dropped", f"{k}:retried",
                f"{self.namespace}:jobs", f"{self.namespace}:cancelled"]
        if self._delete(keys=keys, args=[job, _now_ms()]) != 1:
            raise NoSuchJob(job, self.namespace)

    def dead(self, job: str) -> Dict[int, dict]:
        """Why each dead batch of the job died, by batch number."""
        try:
            raw = self.redis.hgetall(f"{self._job_key(job)}:dead")
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise UnreadableJob(job, "dead batches", "not a hash (the key holds another "
                                    "type: written by something else)") from None
            raise
        out: Dict[int, dict] = {}
        for b, v in raw.items():
            if b.isdigit():
                try:
                    out[int(b)] = json.loads(v)
                except ValueError:
                    out[int(b)] = {"error": v}
        return dict(sorted(out.items()))


class Job:
    """A handle on one job of a client's namespace (``Client.job(id)``)."""

    def __init__(self, client: Client, job: str) -> None:
        self.client = client
        self.id = job

    def status(self) -> dict:
        """The job's state and counters (``Client.status``)."""
        return self.client.status(self.id)

    def wait(self, timeout: Optional[float] = None) -> dict:
        """Waits until it finishes (``Client.wait``)."""
        return self.client.wait(self.id, timeout)

    def results(self) -> Iterator[Tuple[int, Any]]:
        """Each stored batch result, in batch order (``Client.results``)."""
        return self.client.results(self.id)

    def dead(self) -> Dict[int, dict]:
        """Why each dead batch died (``Client.dead``)."""
        return self.client.dead(self.id)

    def cancel(self) -> dict:
        """Cancels it (``Client.cancel``)."""
        return self.client.cancel(self.id)

    def delete(self, cancel: bool = False) -> None:
        """Deletes it (``Client.delete``)."""
        self.client.delete(self.id, cancel)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


class _Publishing:
    """One enqueue: registers the job with its first batch, reserves batch numbers ahead,
    publishes with confirms (republishing on nack, return or a lost connection) and records
    the totals."""

    def __init__(self, client: Client, job: str, task: str, queue: str,
                 params: Dict[str, str], priority: int, unique_key: Optional[str],
                 options: Dict[str, Any]) -> None:
        self.c = client
        self.options = options
        self.job = job
        self.key = client._job_key(job)
        self.task = task
        self.queue = queue
        self.params = params
        self.priority = priority
        self.unique_key = unique_key
        self.routing_key = queue
        for least, band in PRIORITY_BANDS:
            if priority >= least:
                self.routing_key = f"{queue}.{band}"
        self.shards = 1
        self.registered = False
        self.then = ""
        self.group = ""
        self.on_complete = ""
        self.duplicate_of: Optional[str] = None
        self.reserved = 0
        self.batches = 0
        self.records = 0
        self.invalid = 0
        self.problems: List[str] = []
        self.more_problems = 0
        self.lease_renewed = 0.0
        self.channel: Optional[ConfirmChannel] = None
        # Publishing with a window of confirms: the unconfirmed batches by delivery tag (in
        # publish order), the batches to publish again (nacked, returned, or unconfirmed when
        # the connection went), message ids the broker returned, and the confirmed count.
        self.next_tag = 1  # the channel's next delivery tag
        self.unconfirmed: Dict[int, List[Any]] = {}
        self.inflight_bytes = 0
        self.again: deque = deque()
        self.returned: set = set()
        self.refused_error: Optional[str] = None
        self.reopen = False
        self.confirmed = 0

    # The broker -------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        ns = self.c.namespace
        quorum = {"x-queue-type": "quorum"}
        declares: List[Declare] = [
            ("exchange_declare", (f"{ns}.work", "direct"), {"durable": True}),
            ("exchange_declare", (f"{ns}.dlx", "fanout"), {"durable": True}),
        ]
        for name, args in ((f"{ns}.dead", dict(quorum)),
                           (f"{ns}.dead.events", {**quorum, "x-max-length": DEAD_EVENTS_MAX})):
            declares.append(("queue_declare", (name,), {"durable": True, "arguments": args}))
            declares.append(("queue_bind", (name, f"{ns}.dlx"), {"routing_key": ""}))
        shards = [self.queue] + [f"{self.queue}.s{i}" for i in range(1, self.shards)]
        for short in shards + [f"{self.queue}.{band}" for _, band in PRIORITY_BANDS]:
            args = {**quorum, "x-dead-letter-exchange": f"{ns}.dlx",
                    "x-delivery-limit": DELIVERY_LIMIT}
            declares.append(("queue_declare", (f"{ns}.{short}",),
                             {"durable": True, "arguments": args}))
            declares.append(("queue_bind", (f"{ns}.{short}", f"{ns}.work"),
                             {"routing_key": short}))
        # Several nodes of one cluster (comma-separated): tried in a shuffled order, the
        # first that accepts is used; refused credentials are refused by every node.
        nodes = [u.strip() for u in self.c.amqp_url.split(",") if u.strip()]
        random.shuffle(nodes)
        for i, url in enumerate(nodes):
            try:
                self.channel = ConfirmChannel(url, declares, self._on_confirm, self._on_return)
                break
            except _REFUSED:
                raise
            except _LOST:
                if i + 1 == len(nodes):
                    raise
        self.next_tag = 1

    def first_connect(self) -> None:
        """The first connection: refused credentials are ``Refused`` and an unreachable
        broker ``Unavailable``, at once (reconnects with backoff are for later losses)."""
        where = _redact(self.c.amqp_url)
        try:
            self.connect()
        except _REFUSED as e:
            raise Refused(f"RabbitMQ at {where} refused the credentials: {e!r}") from None
        except _LOST as e:
            raise Unavailable(f"cannot reach RabbitMQ at {where}: {e!r}") from None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel = None

    def route(self, batch: Optional[int]) -> str:
        """The routing key of batch `batch`: its shard (batch mod shards), or the priority
        band (not sharded); shard 0 for a message of no batch."""
        if self.routing_key != self.queue or self.shards <= 1 or not batch:
            return self.routing_key
        shard = batch % self.shards
        return self.queue if shard == 0 else f"{self.queue}.s{shard}"

    def publish(self, body: bytes, props: pika.BasicProperties,
                batch: Optional[int] = None) -> None:
        """Publishes one message; its confirm is awaited later (`settle`), with at most
        CONFIRM_WINDOW of them in flight."""
        self.again.append([body, props, 0, self.route(batch)])
        # Every 64 publishes the output is written out and what the broker sent is read
        # (confirms, returns), so the broker works while more are prepared.
        self.settle(CONFIRM_WINDOW - 1, flush=self.next_tag % 64 == 0)

    def send_again(self) -> None:
        """Publishes what waits to be published (new, refused or cut off), reconnecting when
        the connection or channel went."""
        reconnects = 0
        while self.again:
            try:
                if self.channel is None:
                    self.connect()
                while self.again:
                    item = self.again[0]
                    self.channel.publish(f"{self.c.namespace}.work", item[3], item[0], item[1])
                    self.again.popleft()
                    self.unconfirmed[self.next_tag] = item
                    self.inflight_bytes += len(item[0])
                    self.next_tag += 1
                return
            except _LOST as e:
                reconnects = self.after_loss(e, reconnects, "publishing")

    def after_loss(self, e: Exception, reconnects: int, what: str) -> int:
        """The connection or channel went while `what`: unconfirmed batches go back to be
        published again; re-raises after MAX_RECONNECTS in a row, else waits (backoff) and
        returns the new count."""
        reconnects += 1
        self.lost()
        if reconnects > MAX_RECONNECTS:
            raise e
        warnings.warn(f"{what}: {e!r}; reconnecting")
        time.sleep(min(0.1 * 2 ** reconnects, 5.0))
        return reconnects

    def lost(self) -> None:
        """The connection or channel went: every unconfirmed batch is published again, in
        order, ahead of those still waiting."""
        self.again.extendleft(reversed(self.unconfirmed.values()))
        self.unconfirmed.clear()
        self.inflight_bytes = 0
        self.returned.clear()
        self.close()

    def settle(self, keep: int, flush: bool = False) -> None:
        """Waits for confirms until at most `keep` batches are unconfirmed (and their bytes
        under MAX_INFLIGHT_BYTES), publishing refused ones again; with `flush`, writes the
        output and reads what arrived first."""
        reconnects = 0

        def settled() -> bool:
            return len(self.unconfirmed) <= keep and self.inflight_bytes <= MAX_INFLIGHT_BYTES

        while True:
            if self.refused_error is not None:
                raise RuntimeError(self.refused_error)
            if self.reopen:
                self.reopen = False
                self.lost()  # what is unconfirmed goes again, on a new connection
            self.send_again()
            if settled() and (not flush or self.channel is None):
                return
            try:
                if flush:
                    flush = False
                    self.channel.pump()
                else:
                    self.channel.wait(lambda: settled() or bool(self.again)
                                      or self.refused_error is not None)
            except _LOST as e:
                reconnects = self.after_loss(e, reconnects, "waiting for confirms")

    def _on_return(self, props: pika.BasicProperties) -> None:
        # The broker returns an unroutable mandatory message before it confirms it.
        self.returned.add(props.message_id)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nacked = isinstance(method, pika.spec.Basic.Nack)
        tags = []
        for t in self.unconfirmed:  # in publish order: ascending tags
            if t > method.delivery_tag:
                break
            if method.multiple or t == method.delivery_tag:
                tags.append(t)
        for tag in tags:
            item = self.unconfirmed.pop(tag)
            self.inflight_bytes -= len(item[0])
            refused = nacked or item[1].message_id in self.returned
            self.returned.discard(item[1].message_id)
            if not refused:
                self.confirmed += 1
                continue
            item[2] += 1
            if item[2] % REFUSALS_BEFORE_RECONNECT == 0:
                # A connection that keeps refusing a batch is replaced (as the Rust producer
                # does): after a cluster node died, a new connection was seen to nack what
                # the old one had left unconfirmed, round after round.
                self.reopen = True
            if item[2] >= MAX_REFUSALS:
                self.refused_error = (f"the broker refused message {item[1].message_id} "
                                      f"{item[2]} times (nacked or unroutable)")
            else:
                self.again.append(item)

    # The job ----------------------------------------------------------------------------
    def problem(self, text: str) -> None:
        self.invalid += 1
        if len(self.problems) < 20:
            self.problems.append(text)
        else:
            self.more_problems += 1

    def register(self) -> bool:
        """Registers the job; False when another job holds the unique key (nothing to do)."""
        unique = f"{self.c.namespace}:unique:{self.unique_key}" if self.unique_key else ""
        got = self.c._register(
            keys=[self.key, f"{self.c.namespace}:jobs", unique,
                  f"{self.c.namespace}:group:{self.group}" if self.group else ""],
            args=[self.job, self.task, self.queue,
                  json.dumps(self.params, separators=(",", ":"), sort_keys=True),
                  _now_ms(), self.c.result_ttl, self.c._job_key(""), "", self.then, "",
                  self.group, "", "", "", self.on_complete],
        )
        if got == 0:
            raise ValueError(f"job {self.job} already exists; choose another job_id")
        if got == 3:
            raise ValueError(f"group {self.group} is closed (producer group close): "
                             "a closed group takes no more jobs")
        if got != 1:
            self.duplicate_of = got
            return False
        if self.priority > 0:
            self.c._raise(keys=[self.key], args=["priority", self.priority])
        # The options, recorded with the job for its readers (as the Rust enqueue does).
        fields = {"eta_ms": HEADER_ETA, "expires_ms": HEADER_EXPIRES,
                  "time_limit_ms": HEADER_TIME_LIMIT, "rate_interval_ms": HEADER_RATE_INTERVAL}
        for field, header in fields.items():
            if header in self.options:
                self.c._raise(keys=[self.key], args=[field, self.options[header]])
        if HEADER_RATE_KEY in self.options:
            self.c.redis.hset(self.key, "rate_key", self.options[HEADER_RATE_KEY])
        self.renew_lease()
        self.registered = True
        return True

    def renew_lease(self) -> None:
        self.c._raise(keys=[self.key], args=["lease_until_ms", _now_ms() + LEASE_SECONDS * 1000])
        self.lease_renewed = time.monotonic()

    def envelope(self, records: List[Any]) -> bytes:
        return msgpack.packb({
            "v": FORMAT_VERSION, "job": self.job, "batch": self.batches, "task": self.task,
            "params": self.params, "records": records, "created_ms": _now_ms(),
        }, use_bin_type=True)

    def send(self, records: List[Any]) -> None:
        """Publishes one batch (split in halves while over the message limit)."""
        body = self.envelope(records)
        if len(body) > self.c.max_message_bytes:
            if len(records) == 1:
                self.problem(f"a record of {len(body)} bytes is over the message limit "
                             f"({self.c.max_message_bytes} bytes)")
                return
            half = len(records) // 2
            self.send(records[:half])
            self.send(records[half:])
            return
        if not self.registered and not self.register():
            return
        if self.batches >= self.reserved:
            self.reserved = self.batches + RESERVE_AHEAD
            self.c._raise(keys=[self.key], args=["batches_reserved", self.reserved])
        if time.monotonic() - self.lease_renewed > LEASE_SECONDS / 3:
            self.renew_lease()
        props = pika.BasicProperties(
            delivery_mode=2, content_type=CONTENT_TYPE, message_id=f"{self.job}:{self.batches}",
            timestamp=int(time.time()), headers=dict(self.options) or None,
        )  # no x-taskmill-attempt header: a first publish means attempt 1
        self.publish(body, props, self.batches)
        self.batches += 1
        self.records += len(records)
        if self.batches % 64 == 0 and self.confirmed:
            self.c._raise(keys=[self.key], args=["batches_published", self.confirmed])

    def run(self, records: Iterable[Any], batch_size: int) -> str:
        batch: List[Any] = []
        for n, record in enumerate(records, 1):
            try:
                # JSON is the records' model: keys become text, tuples lists; bytes, NaN
                # and sets are refused here rather than dead-lettered by a worker.
                batch.append(json.loads(json.dumps(record, allow_nan=False)))
            except (TypeError, ValueError) as e:
                self.problem(f"record {n}: not JSON: {e}")
                continue
            if len(batch) >= batch_size:
                self.send(batch)
                batch = []
                if self.duplicate_of is not None:
                    return self.duplicate_of
        if batch:
            self.send(batch)
        if self.duplicate_of is not None:
            return self.duplicate_of
        if not self.registered:
            detail = "".join(f"\n  {p}" for p in self.problems[:5])
            raise ValueError(f"nothing to enqueue: no record could be read{detail}")
        problems = list(self.problems)
        if self.more_problems:
            problems.append(f"... and {self.more_problems} more")
        self.settle(0)
        code = self.c._finish(
            keys=[self.key],
            args=[self.batches, self.records, self.invalid, 0,
                  json.dumps(problems), _now_ms(), self.c.result_ttl, "0"],
        )
        if code == 2:
            # Finished already, and no worker folded the summary: ask one to.
            props = pika.BasicProperties(delivery_mode=2, message_id=f"{self.job}:summary",
                                         headers={HEADER_CONTROL: "summarize"})
            try:
                self.publish(b"", props)
                self.settle(0)
            except Exception as e:  # the job is done; only its summary is missing
                warnings.warn(f"could not ask the workers for job {self.job}'s summary: {e!r}")
        return self.job
