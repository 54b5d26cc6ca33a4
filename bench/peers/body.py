"""The job body every queue runs: the same work for each.

- ``run()`` (no t0): a no-op job. It marks its completion by appending one byte to the file named
  by BENCH_DONE_FILE (one write(2) with O_APPEND: no Redis, no lock), whose size the drain case
  polls. With BENCH_BODY=incr (the drain-io case) it first increments ``bench:done`` in Redis: a
  job that makes one round trip to the Redis its queue lives on, which that queue's work competes
  with. Its completion is still counted in the file, so the harness' polls never reach that Redis
  (its CPU per job is the queue's and the bodies' alone). With BENCH_BODY=sleep (the sleep case) it
  first sleeps BENCH_SLEEP seconds instead: a job that waits on I/O (``run_async``: asyncio.sleep).
- ``run(t0)``: a latency probe; ``t0`` is the producer's time.time() just before it enqueued the job.
  The body takes time.time() first thing and appends "t0 start" to ``bench:starts``, then returns 1
  (a result to wait for).

Async queues (arq, SAQ) call ``run_async``, which does the same with redis.asyncio. Clients and the
file are opened lazily per process (and per event loop), never inherited across a fork.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis

DONE = "bench:done"
STARTS = "bench:starts"
ORPHAN = "bench:orphan"  # kickq orphan case: "pid start" per run

# Read once at import (workers are started with it set): the no-op drain's hot path stays as it was.
SLEEP = float(os.environ.get("BENCH_SLEEP") or 0) if os.environ.get("BENCH_BODY") == "sleep" else 0.0

_sync: tuple[int, redis.Redis] | None = None
_async: dict[tuple[int, int], Any] = {}


def url() -> str:
    return os.environ["BENCH_REDIS_URL"]


def client() -> redis.Redis:
    global _sync
    if _sync is None or _sync[0] != os.getpid():
        _sync = (os.getpid(), redis.Redis.from_url(url()))
    return _sync[1]


_done: tuple[int, int] | None = None  # (pid, fd of BENCH_DONE_FILE)


def counts_in_redis() -> bool:
    return os.environ.get("BENCH_BODY") == "incr"


def append_done() -> None:
    global _done
    if _done is None or _done[0] != os.getpid():
        _done = (os.getpid(), os.open(os.environ["BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND))
    os.write(_done[1], b".")


def mark_done() -> None:
    if counts_in_redis():
        client().incr(DONE)
    append_done()


def done_count() -> int:
    """Jobs completed so far (read by the harness, from the file: never a Redis command)."""
    return os.stat(os.environ["BENCH_DONE_FILE"]).st_size


def run(t0: float | None = None) -> int | None:
    now = time.time()
    if t0 is None:
        if SLEEP:
            time.sleep(SLEEP)
        mark_done()
        return None
    client().rpush(STARTS, f"{t0!r} {now!r}")
    return 1


async def run_async(t0: float | None = None) -> int | None:
    now = time.time()
    if t0 is None and SLEEP:
        await asyncio.sleep(SLEEP)
        append_done()
        return None
    key = (os.getpid(), id(asyncio.get_running_loop()))
    conn = _async.get(key)
    if conn is None:
        import redis.asyncio
        conn = _async[key] = redis.asyncio.Redis.from_url(url())
    if t0 is None:
        if counts_in_redis():
            await conn.incr(DONE)
        append_done()
        return None
    await conn.rpush(STARTS, f"{t0!r} {now!r}")
    return 1
