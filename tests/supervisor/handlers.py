"""Handlers that the supervisor tests run in a real kickq-supervisor.

The supervisor loads this file by path (its module name is then kickq_handlers_handlers) and the
import registers every handler below. The tests import it as tests.supervisor.handlers only to read
the layout (which names, how many workers), so registration is skipped under that name.

Handlers that must talk to the test (record a pid, wait for a release) get the Redis URL in the
job's data as "redis"; every key they touch is given in the data too.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import threading
import time
from typing import Any, Sequence

import redis

import kickq
from tests.helpers import any_key_client

_clients: dict[tuple[int, str], redis.Redis] = {}


def _redis(data: dict[str, Any]) -> redis.Redis:
    key = (os.getpid(), data["redis"])
    if key not in _clients:
        _clients[key] = any_key_client(data["redis"])  # a redis+cluster:// URL too
    return _clients[key]


def _hang() -> None:
    while True:
        time.sleep(3600)


# --- the four handler styles ----------------------------------------------------------------------

def sync_handler(job: Any, data: dict[str, Any]) -> Any:
    if "raise" in data:
        raise ValueError(data["raise"])
    if "lone_surrogate" in data:  # as in a file name read with surrogateescape
        text = data["lone_surrogate"] + "\udcff"
        if data.get("returned"):
            return text
        raise ValueError(f"cannot open {text}")
    return {"echo": data.get("value"), "job": job.id}


def callback_handler(job: Any, data: dict[str, Any], cb: Any) -> None:
    mode = data["mode"]
    if mode == "ok":  # cb(), then a late failure that must be ignored
        cb()
        cb("late error after success")
    elif mode == "ok-none":
        cb(None)
    elif mode == "err":  # cb(err), then a late success that must be ignored
        cb(data["err"])
        cb()
    elif mode == "exception":
        cb(KeyError("missing thing"))
    elif mode == "thread":  # reported later, from another thread; the late calls come after it
        def report() -> None:
            time.sleep(0.05)
            cb(data.get("err"))
            cb("late error from the thread")
        threading.Thread(target=report).start()
    else:
        raise AssertionError(f"unknown mode {mode!r}")


async def async_handler(job: Any, data: dict[str, Any]) -> Any:
    await asyncio.sleep(0.01)
    if "raise" in data:
        raise RuntimeError(data["raise"])
    return {"async": data.get("value")}


class _Awaitable:
    """An awaitable that is neither a coroutine nor a Future."""

    def __init__(self, value: Any, error: str | None) -> None:
        self.value, self.error = value, error

    def __await__(self) -> Any:
        yield from asyncio.sleep(0.01).__await__()
        if self.error is not None:
            raise LookupError(self.error)
        return self.value


def promise_handler(job: Any, data: dict[str, Any]) -> Any:
    kind = data["kind"]
    if kind == "future":
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def settle() -> None:
            time.sleep(0.05)
            if "reject" in data:
                future.set_exception(OSError(data["reject"]))
            else:
                future.set_result({"future": data.get("value")})
        threading.Thread(target=settle).start()
        return future
    if kind == "awaitable":
        return _Awaitable({"awaitable": data.get("value")}, data.get("reject"))
    raise AssertionError(f"unknown kind {kind!r}")


# --- the pool -------------------------------------------------------------------------------------

def barrier_handler(job: Any, data: dict[str, Any]) -> Any:
    """Arrive at a barrier of data["parties"] jobs: it only opens if that many run at once."""
    r = _redis(data)
    r.incr(data["key"])
    deadline = time.monotonic() + data.get("timeout", 5.0)
    while int(r.get(data["key"]) or 0) < data["parties"]:
        if time.monotonic() > deadline:
            raise RuntimeError("barrier not reached: the jobs did not run concurrently")
        time.sleep(0.01)
    return os.getpid()


def slow_handler(job: Any, data: dict[str, Any]) -> Any:
    """Runs until the test pushes on data["release"] (or gives up after data["timeout"])."""
    got = _redis(data).blpop([data["release"]], timeout=data.get("timeout", 10))
    if got is None:
        raise RuntimeError("never released")
    return "slow done"


def fast_handler(job: Any, data: dict[str, Any]) -> Any:
    if data and data.get("report") == "gc":
        import gc
        return gc.get_freeze_count()
    return "fast done"


def priority_handler(job: Any, data: dict[str, Any]) -> Any:
    r = _redis(data)
    if data.get("release"):
        r.rpush(data["started"], job.id)
        r.blpop([data["release"]], timeout=10)
    r.rpush(data["order"], f"{job.name}:{data['seq']}")
    return None


def pid_handler(job: Any, data: dict[str, Any]) -> Any:
    return os.getpid()


def count_handler(job: Any, data: dict[str, Any]) -> Any:
    """Counts its executions of each job in the hash data["counts"] (then sleeps data["sleep"] s)."""
    runs = _redis(data).hincrby(data["counts"], job.id, 1)
    if data.get("sleep"):
        time.sleep(data["sleep"])
    return runs


# --- misbehaviour ---------------------------------------------------------------------------------

def chaos_handler(job: Any, data: dict[str, Any]) -> Any:
    """data["do"] says how to misbehave; "key" (if given) receives a pid first."""
    do = data["do"]
    run = len(job.runs)  # this run included: 1 on the first attempt
    if "key" in data:
        _redis(data).rpush(data["key"], os.getpid())
    if do == "hang":
        _hang()
    if do == "fork":  # a grandchild in the worker's process group
        child = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)
        _redis(data).rpush(data["grandchild"], child.pid)
        _hang()
    if do == "fork_stubborn":  # a grandchild that ignores SIGTERM (ignored signals survive exec)
        child = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 3600"], stdin=subprocess.DEVNULL)
        _redis(data).rpush(data["grandchild"], child.pid)
        _hang()
    if do == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _redis(data).rpush(data["ready"], "ignoring TERM")
        _hang()
    if do == "exit":
        os._exit(data["code"])
    if do == "signal":  # e.g. SIGSEGV, as a crash in a C extension would
        os.kill(os.getpid(), data["signal"])
        _hang()
    if do == "hang_first":
        if run == 1:
            _hang()
        return f"run {run}"
    if do == "fail_until":
        if run <= data["fails"]:
            raise RuntimeError(f"failure {run}")
        return f"run {run}"
    if do == "block_first":  # the first attempt waits for a release, then answers late
        if run == 1:
            _redis(data).blpop([data["release"]], timeout=30)
            return "first attempt"
        return f"attempt {run}"
    if do == "sleep":
        time.sleep(data["seconds"])
        return "slept"
    if do == "return":
        return data.get("value")
    raise AssertionError(f"unknown action {do!r}")


#: (names, concurrent_jobs, handler) in registration order; worker numbers follow this order.
LAYOUT: list[tuple[list[str], int, Any]] = [
    (["style.sync"], 1, sync_handler),
    (["style.callback"], 1, callback_handler),
    (["style.async"], 1, async_handler),
    (["style.promise"], 1, promise_handler),
    (["pool"], 3, barrier_handler),
    (["slow"], 1, slow_handler),
    (["fast"], 1, fast_handler),
    (["prio.high", "prio.low"], 1, priority_handler),
    (["pid"], 1, pid_handler),
    (["chaos"], 2, chaos_handler),
    (["count"], 1, count_handler),
]
WORKERS = sum(n for _, n, _ in LAYOUT)


def worker_numbers(name: str, layout: Sequence[Sequence[Any]] = ()) -> list[int]:
    """The 1-based worker numbers (as in the titles) of the registration serving `name`, in
    `layout` ((names, workers, ...) each; default this module's LAYOUT)."""
    first = 1
    for names, n, *_ in layout or LAYOUT:
        if name in names:
            return list(range(first, first + n))
        first += n
    raise KeyError(name)


def register() -> None:
    kq = kickq.Kickq()
    for names, n, handler in LAYOUT:
        # The camelCase alias for one of them, so that both spellings are exercised.
        options = {"concurrentJobs": n} if names == ["pool"] else {"concurrent_jobs": n}
        kq.process(names, options, handler)


if __name__ != "tests.supervisor.handlers":
    register()
