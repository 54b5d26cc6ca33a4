"""Clients made before os.fork() used in the children (gunicorn --preload, a multiprocessing pool):
hotjob results arrive there, from the sync client whose waiter threads do not survive the fork and
from the asyncio client whose event loop does not. A real supervisor runs the jobs."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kickq
from kickq import aio
from tests.helpers import wait_until

HOT = {"hotjob": True, "hotjob_timeout": 5}
CHILDREN = 4
THREADS = 4
JOBS_PER_THREAD = 10
#: A child gives up this long after its start: a hotjob it still waits for has long timed out.
CHILD_SECONDS = 40.0

MODULE = '''
import time

import kickq

def echo(job, data):
    if isinstance(data, dict):  # {"ref": ..., "sleep": seconds}
        time.sleep(data["sleep"])
        return data["ref"]
    return data

kickq.Kickq().process(["hot"], {"concurrent_jobs": 2}, echo)
'''


@pytest.fixture
def supervisor(start_supervisor: Callable[..., Any], tmp_path: Path) -> Any:
    module = tmp_path / "fork_handlers.py"
    module.write_text(MODULE)
    return start_supervisor(module, workers=2)


def in_children(count: int, work: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Fork `count` children, each running `work(index)`; their reports (JSON through a pipe).
    A child that crashes or does not end within CHILD_SECONDS reports that instead."""
    children = []
    for index in range(count):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(read_fd)
                report = work(index)
                os.write(write_fd, json.dumps(report).encode())
                code = 0
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                try:
                    os.write(write_fd, json.dumps({"crashed": repr(exc)}).encode())
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
    reports = []
    deadline = time.monotonic() + CHILD_SECONDS + 10
    for pid, read_fd in children:
        try:
            wait_until(lambda pid=pid: os.waitpid(pid, os.WNOHANG)[0] == pid, interval=0.05,
                       timeout=max(0.1, deadline - time.monotonic()), message=f"child {pid} ends")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            reports.append({"crashed": f"child {pid} still running after {CHILD_SECONDS + 10}s: killed"})
            os.close(read_fd)
            continue
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        os.close(read_fd)
        reports.append(json.loads(b"".join(chunks) or b'{"crashed": "no report"}'))
    return reports


def expected(child: int) -> list[str]:
    return sorted(f"{child}.{thread}.{job}" for thread in range(THREADS) for job in range(JOBS_PER_THREAD))


def hotjobs_in_threads(client: kickq.Kickq, child: int) -> dict[str, Any]:
    """THREADS threads, each creating JOBS_PER_THREAD hotjobs one after the other and waiting for
    each: the results, and the errors (a thread stops at its first)."""
    results: list[str] = []
    errors: list[str] = []
    started = time.monotonic()

    def run(thread: int) -> None:
        for job in range(JOBS_PER_THREAD):
            ref = f"{child}.{thread}.{job}"
            try:
                created = client.create("hot", ref, HOT)
                assert created is not None and created.hotjob_promise is not None
                left = CHILD_SECONDS - (time.monotonic() - started)
                results.append(created.hotjob_promise.result(timeout=max(0.1, left)).result)
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(f"{ref}: {type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_SECONDS)
    return {"results": sorted(results), "errors": errors}


def test_a_parent_that_waited_on_a_hotjob_then_forked_children_running_threads_of_hotjobs(supervisor, kq):
    """Every result arrives in every child, none times out."""
    first = kq.create("hot", "parent", HOT)
    assert first.hotjob_promise.result(timeout=10).result == "parent"  # the waiter's threads run
    reports = in_children(CHILDREN, lambda child: hotjobs_in_threads(kq, child))
    assert [r.get("errors", r) for r in reports] == [[]] * CHILDREN
    assert [r["results"] for r in reports] == [expected(child) for child in range(CHILDREN)]
    # and the parent's waiter still works
    assert kq.create("hot", "parent again", HOT).hotjob_promise.result(timeout=10).result == "parent again"


def test_a_fork_while_another_thread_holds_the_waiters_lock(supervisor, kq):
    """A lock held at the fork stays held in the child, where its holder does not exist."""
    assert kq.create("hot", "parent", HOT).hotjob_promise.result(timeout=10).result == "parent"
    waiter = kq._waiters[kq.settings()["redis_namespace"]]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with waiter._lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        reports = in_children(1, lambda child: hotjobs_in_threads(kq, child))
    finally:
        release.set()
        holder.join()
    assert reports == [{"results": expected(0), "errors": []}]


def test_a_hotjob_pending_at_the_fork_is_delivered_in_the_child_too(supervisor, kq):
    assert kq.create("hot", "parent", HOT).hotjob_promise.result(timeout=10).result == "parent"
    slow = kq.create("hot", {"ref": "slow", "sleep": 1.0}, HOT)
    assert not slow.hotjob_promise.done()

    def wait_in_child(child: int) -> dict[str, Any]:
        return {"result": slow.hotjob_promise.result(timeout=10).result}

    assert in_children(1, wait_in_child) == [{"result": "slow"}]
    assert slow.hotjob_promise.result(timeout=10).result == "slow"


# --- the asyncio client -------------------------------------------------------------------------------

async def gather_hotjobs(client: aio.Kickq, child: int) -> dict[str, Any]:
    async def one(ref: str) -> str:
        job = await client.create("hot", ref, HOT)
        return (await job.hotjob_promise).result

    refs = [f"{child}.{t}.{j}" for t in range(THREADS) for j in range(JOBS_PER_THREAD)]
    outcomes = await asyncio.wait_for(asyncio.gather(*(one(ref) for ref in refs), return_exceptions=True),
                                      CHILD_SECONDS)
    return {"results": sorted(o for o in outcomes if isinstance(o, str)),
            "errors": [f"{type(o).__name__}: {o}" for o in outcomes if not isinstance(o, str)]}


def in_a_new_loop(client: aio.Kickq, child: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        try:
            return await gather_hotjobs(client, child)
        finally:
            # What the child has of the parent's connections, were it garbage, would be closed
            # here, inside a running loop: that must leave the parent's sockets alone.
            gc.collect()
            await client.close()
    return asyncio.run(main())


def test_an_async_client_used_before_fork_works_in_the_children_in_new_loops(supervisor, kq_config):
    client = aio.Kickq()

    async def parent() -> str:
        job = await client.create("hot", "parent", HOT)
        return (await job.hotjob_promise).result

    assert asyncio.run(parent()) == "parent"  # its loop is gone; the client is not closed
    reports = in_children(2, lambda child: in_a_new_loop(client, child))
    assert reports == [{"results": expected(child), "errors": []} for child in range(2)]


def test_an_async_client_forked_while_its_loop_runs_works_in_the_children(supervisor, kq_config):
    """As a multiprocessing pool started from a coroutine: the child has a copy of the running
    loop, which nothing runs there; the client starts afresh in the child's own loop."""
    client = aio.Kickq()

    async def parent() -> list[dict[str, Any]]:
        job = await client.create("hot", "parent", HOT)
        assert (await job.hotjob_promise).result == "parent"  # the listener task runs
        reports = in_children(2, lambda child: in_a_new_loop(client, child))
        job = await client.create("hot", "parent again", HOT)  # and the parent's client goes on
        assert (await job.hotjob_promise).result == "parent again"
        await client.close()
        return reports

    reports = asyncio.run(parent())
    assert reports == [{"results": expected(child), "errors": []} for child in range(2)]
