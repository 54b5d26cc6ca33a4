"""Handlers for the dense-worker tests (jobs_per_worker > 1), run by a real kickq-supervisor.

Every registration has one worker process with several slots, so that jobs that meet at a barrier
prove they ran at once in one process. Handlers that talk to the test get the Redis URL in the
job's data as "redis" and the keys they touch in the data too.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import kickq
from tests.supervisor import handlers
from tests.supervisor.handlers import _redis

SLOTS = 8


def _record(data: dict[str, Any], what: str, job: Any) -> None:
    if "log" in data:
        _redis(data).rpush(data["log"], f"{what} {job.id} {os.getpid()} {time.monotonic():.6f}")


async def async_handler(job: Any, data: dict[str, Any]) -> Any:
    _record(data, "start", job)
    try:
        if "parties" in data:  # a barrier: it opens only if that many jobs run at once
            r = _redis(data)
            r.incr(data["key"])
            deadline = time.monotonic() + data.get("timeout", 5.0)
            while int(r.get(data["key"]) or 0) < data["parties"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("barrier not reached")
                await asyncio.sleep(0.01)
        if data.get("sleep"):
            await asyncio.sleep(data["sleep"])
        if data.get("block"):  # blocks the loop: no cancellation can land
            time.sleep(data["block"])
        if "raise" in data:
            raise ValueError(data["raise"])
    except asyncio.CancelledError:
        _record(data, "cancelled", job)
        raise
    _record(data, "end", job)
    return os.getpid()


def sync_handler(job: Any, data: dict[str, Any]) -> Any:
    r = _redis(data) if "redis" in data else None
    _record(data, "start", job)
    if "parties" in data:
        assert r is not None
        r.incr(data["key"])
        deadline = time.monotonic() + data.get("timeout", 5.0)
        while int(r.get(data["key"]) or 0) < data["parties"]:
            if time.monotonic() > deadline:
                raise RuntimeError("barrier not reached")
            time.sleep(0.01)
    if data.get("sleep"):
        time.sleep(data["sleep"])
    if "raise" in data:
        raise ValueError(data["raise"])
    _record(data, "end", job)
    return os.getpid()


def callback_handler(job: Any, data: dict[str, Any], cb: Any) -> None:
    """Reports from a thread of its own, a moment later."""
    def report() -> None:
        time.sleep(data.get("sleep", 0.01))
        cb(data.get("err"))
    threading.Thread(target=report).start()


def promise_handler(job: Any, data: dict[str, Any]) -> Any:
    """A plain function that returns a coroutine: it runs as a task, so it can be cancelled."""
    async def later() -> Any:
        try:
            await asyncio.sleep(data.get("sleep", 0.01))
        except asyncio.CancelledError:
            _record(data, "cancelled", job)
            raise
        return {"promised": job.id}
    return later()


#: (names, concurrent_jobs, jobs_per_worker, handler)
LAYOUT: list[tuple[list[str], int, int, Any]] = [
    (["dense.async"], 1, SLOTS, async_handler),
    (["dense.sync"], 1, SLOTS, sync_handler),
    (["one.sync"], 1, 1, sync_handler),
    (["dense.callback"], 1, 2, callback_handler),
    (["dense.promise"], 1, 2, promise_handler),
]
WORKERS = sum(n for _, n, _, _ in LAYOUT)


def worker_numbers(name: str) -> list[int]:
    return handlers.worker_numbers(name, LAYOUT)


def register() -> None:
    kq = kickq.Kickq()
    for names, n, slots, handler in LAYOUT:
        kq.process(names, {"concurrent_jobs": n, "jobs_per_worker": slots}, handler)


if __name__ != "tests.supervisor.handlers_dense":
    register()
