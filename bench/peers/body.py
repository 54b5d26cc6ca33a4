"""The job body every queue runs: the same work, the same Redis round trip.

- ``run()`` (no t0): a no-op job; it increments ``bench:done``, the counter the drain case waits on.
- ``run(t0)``: a latency probe; ``t0`` is the producer's time.time() just before it enqueued the job.
  The body takes time.time() first thing and appends "t0 start" to ``bench:starts``, then returns 1
  (a result to wait for).

Async queues (arq, SAQ) call ``run_async``, which does the same with redis.asyncio. Clients are made
lazily per process (and per event loop), never inherited across a fork.
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

_sync: tuple[int, redis.Redis] | None = None
_async: dict[tuple[int, int], Any] = {}


def url() -> str:
    return os.environ["BENCH_REDIS_URL"]


def client() -> redis.Redis:
    global _sync
    if _sync is None or _sync[0] != os.getpid():
        _sync = (os.getpid(), redis.Redis.from_url(url()))
    return _sync[1]


def run(t0: float | None = None) -> int | None:
    now = time.time()
    if t0 is None:
        client().incr(DONE)
        return None
    client().rpush(STARTS, f"{t0!r} {now!r}")
    return 1


async def run_async(t0: float | None = None) -> int | None:
    now = time.time()
    key = (os.getpid(), id(asyncio.get_running_loop()))
    conn = _async.get(key)
    if conn is None:
        import redis.asyncio
        conn = _async[key] = redis.asyncio.Redis.from_url(url())
    if t0 is None:
        await conn.incr(DONE)
        return None
    await conn.rpush(STARTS, f"{t0!r} {now!r}")
    return 1
