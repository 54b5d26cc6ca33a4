"""A dense worker's core and its I/O (DenseIO) in this process, against the test's Redis: the
commands are performed as the worker performs them, and a fault is put where it matters (the
connection drops with outcomes and a claim in flight)."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import redis

from kickq.keys import Keys
from kickq_supervisor.worker import DenseIO, StopRequest
from kickq_supervisor.worker_core import Lost, Pause, Settle, WorkerCore
from tests.helpers import wait_until


def run_dense(kq: Any, handler: Any, jobs: int, *, drop_after: int | None = None,
              slots: int = 4) -> list[str]:
    """Drive a dense worker over `jobs` jobs of "w" until they are all done, dropping the connection
    once (at a Settle, after it ran on Redis) when `drop_after` runs have ended. The jobs it ran."""
    keys = Keys(kq.settings()["redis_namespace"])
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    io = DenseIO(kq.redis, keys, ["w"], "w1", handler, write_fd, slots=slots, wait_timeout=0.05,
                 stop=StopRequest())
    core = WorkerCore(1, ["w"], keys, "w1", clock=time.monotonic, prefetch=4, wait_timeout=0.05, slots=slots)
    created = [kq.create("w") for _ in range(jobs)]
    steps = core.steps()
    command: Any = next(steps)
    dropped = drop_after is None
    try:
        deadline = time.monotonic() + 20
        while command is not None and time.monotonic() < deadline:
            if not core.stopping and all(kq.get(job.id).state == "success" for job in created):
                core.request_stop()
                io.wake()
            if isinstance(command, Pause):
                result = None  # no real backoff in a test
            elif not dropped and isinstance(command, Settle) and core.pace.jobs_done >= drop_after:
                io.perform(command)  # it ran on Redis; the replies are lost with the connection
                io.channel.reset()
                result = Lost(redis.exceptions.ConnectionError("dropped (test)"))
                dropped = True
            else:
                result = io.perform(command)
            try:
                command = steps.send(result)
            except StopIteration:
                command = None
        assert command is None, f"still running: {command!r}"
        assert dropped, "the connection was never dropped"
        return [job.id for job in created]
    finally:
        io.close()
        os.close(read_fd)
        os.close(write_fd)


def recording_handler() -> tuple[Callable[[Any, Any], str], list[str]]:
    """A thread-slot handler that takes 5 ms, and the ids of the jobs it ran, in order."""
    ran: list[str] = []
    lock = threading.Lock()

    def handler(job: Any, data: Any) -> str:
        time.sleep(0.005)
        with lock:
            ran.append(job.id)
        return f"ok {job.id}"

    return handler, ran


def test_a_dense_worker_runs_every_job_once(kq):
    handler, ran = recording_handler()
    ids = run_dense(kq, handler, 30)
    assert sorted(ran, key=int) == ids
    assert all(kq.get(job_id).result == f"ok {job_id}" for job_id in ids)


def test_a_dropped_connection_in_a_dense_worker_loses_no_outcome_and_runs_no_job_twice(kq):
    handler, ran = recording_handler()
    ids = run_dense(kq, handler, 30, drop_after=6)
    assert sorted(ran, key=int) == ids  # each once
    for job_id in ids:
        job = kq.get(job_id)
        assert job.state == "success" and len(job.runs) == 1, job.to_dict()


def test_an_async_dense_worker_in_this_process(kq):
    import asyncio
    ran: list[str] = []

    async def handler(job: Any, data: Any) -> str:
        await asyncio.sleep(0.005)
        ran.append(job.id)
        return f"ok {job.id}"

    ids = run_dense(kq, handler, 20, drop_after=4, slots=8)
    wait_until(lambda: len(ran) == 20, timeout=5)
    assert sorted(ran, key=int) == ids
