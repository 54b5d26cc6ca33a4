"""A worker's core and its I/O (WorkerIO) in this process, against the test's Redis, driven command by
command so that a fault can be put exactly where it matters: a connection that drops with outcomes
and a claim in flight, Redis out of reach when a job must not run twice, a batch read late."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest
import redis

from kickq.keys import Keys
from kickq_supervisor.runner import Runner
from kickq_supervisor.worker import StopRequest, WorkerIO, drive
from kickq_supervisor.worker_core import (
    MAX_PREFETCH_WAIT,
    FinishMany,
    Interrupted,
    Lost,
    Pause,
    Settle,
    Start,
    WaitForWork,
    WorkerCore,
)
from tests.supervisor.test_worker_core import Clock

RUN_TIME = 2 ** -10  # each run takes about 1 ms of the core's clock: batches of 4


def first_run(job: Any) -> str:
    """The attempt token of the job's first claim (scripts.run_token)."""
    return f"1:{job.create_time}"


class Live:
    """Performs the core's commands on Redis until the test steps in."""

    def __init__(self, kq: Any, ran: list[str], prefetch: int = 4) -> None:
        self.clock = Clock()
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.write_fd = write_fd
        keys = Keys(kq.settings()["redis_namespace"])
        self.slow: set[str] = set()

        def handler(job: Any, data: Any) -> str:
            ran.append(job.id)
            return f"ok {job.id}"

        self.io = WorkerIO(kq.redis, keys, ["w"], "w1", Runner(handler), write_fd)
        self.core = WorkerCore(1, ["w"], keys, "w1", clock=self.clock, prefetch=prefetch, wait_timeout=0.05)
        self.gen = self.core.steps()
        self.command: Any = next(self.gen)

    def feed(self, result: Any) -> None:
        try:
            self.command = self.gen.send(result)
        except StopIteration:
            self.command = None

    def perform(self) -> Any:
        command = self.command
        if isinstance(command, Start):  # the run takes time on the core's clock
            self.clock.advance(MAX_PREFETCH_WAIT + 0.05 if command.job.job_id in self.slow else RUN_TIME)
        if isinstance(command, Pause):  # no real backoff in a test
            self.feed(None)
            return command
        self.feed(self.io.perform(command))
        return command

    def until(self, found: Callable[[Any], bool], limit: int = 500) -> Any:
        """Perform commands until the pending one is `found` (not performed)."""
        for _ in range(limit):
            if found(self.command):
                return self.command
            self.perform()
        raise AssertionError(f"not reached in {limit} commands; pending {self.command!r}")

    def drop_connection(self, error: str) -> None:
        """The pending command runs on Redis, then the connection drops before the worker has the
        reply: the core learns only that the connection was lost."""
        if isinstance(self.command, Settle):
            self.io.perform(self.command)
        self.io.close()
        self.feed(Lost(redis.exceptions.ConnectionError(error)))

    def finish(self) -> None:
        """Work until idle (every job done), then stop."""
        self.until(lambda command: isinstance(command, WaitForWork))
        self.core.request_stop()
        self.feed(Interrupted())
        self.until(lambda command: command is None)

    def close(self) -> None:
        self.io.close()
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def ran() -> list[str]:
    return []


@pytest.fixture
def live(kq, ran) -> Iterator[Live]:
    worker = Live(kq, ran)
    yield worker
    worker.close()


def starting(job_id: str) -> Callable[[Any], bool]:
    return lambda command: isinstance(command, Start) and command.job.job_id == job_id


def test_a_dropped_connection_loses_no_outcome_and_takes_no_job_twice(live, kq, ran):
    jobs = [kq.create("w") for _ in range(9)]
    # Job 1 alone, then a batch of 4 (jobs 2-5) with job 1's outcome; job 3's outcome claims 6-9.
    live.until(lambda command: isinstance(command, Settle) and len(ran) == 5)
    assert kq.get(jobs[8].id).state == "processing"  # the claim ahead ran
    live.drop_connection("connection dropped (test)")  # ... and every reply in flight is lost
    live.until(starting(jobs[5].id))  # the lost claim's jobs are found through the claim record
    assert [j.job_id for j in live.core.hand] == [j.id for j in jobs[6:9]]  # ... each once
    saved = live.until(lambda command: isinstance(command, FinishMany))
    assert {j.id for j in jobs[1:5]} <= {d.job_id for d in saved.runs}  # the outcomes, sent again
    live.finish()
    assert sorted(ran, key=int) == [j.id for j in jobs]  # every job ran once
    for job in jobs:
        assert kq.get(job.id).state == "success" and kq.get(job.id).result == f"ok {job.id}"


def test_a_job_that_must_not_run_twice_is_given_back_when_redis_cannot_have_its_mark(live, kq, ran):
    jobs = [kq.create("w", None, {"ghost_retry": False}) for _ in range(4)]
    live.until(starting(jobs[1].id))  # a batch claimed ahead: job 2 started once Redis had its mark
    live.until(lambda command: isinstance(command, Settle) and len(ran) == 2)  # job 3's mark, read back
    live.drop_connection("connection dropped (test)")
    back = live.until(lambda command: isinstance(command, FinishMany)
                      and command.give_back)
    assert (jobs[2].id, first_run(jobs[2])) in back.give_back
    live.perform()
    live.until(lambda command: isinstance(command, (Settle, Start)))
    live.perform()
    assert kq.get(jobs[2].id).state in ("queued", "processing")  # back in its queue, or claimed again
    live.finish()
    assert sorted(ran, key=int) == [j.id for j in jobs]  # each ran once
    assert [len(kq.get(j.id).runs) for j in jobs] == [1, 1, 1, 1]


def test_a_batch_read_late_is_given_back_and_not_started(live, kq, ran):
    """A refill's reply is read when the worker runs out, maybe long after Redis claimed the jobs
    (a slow job ran meanwhile): the wait counts from the call, so they are given back, not started."""
    jobs = [kq.create("w") for _ in range(9)]
    live.slow.add(jobs[4].id)  # job 5, the last of the first batch, is slow
    back = live.until(lambda command: isinstance(command, FinishMany)
                      and command.give_back)
    assert back.give_back == [(j.id, first_run(j)) for j in jobs[5:9]]
    assert back.want == 1  # the same call claims again: one job, as runs have been slow
    live.perform()
    live.until(lambda command: isinstance(command, Settle))
    live.perform()
    assert ran == [j.id for j in jobs[:5]]
    assert [kq.get(j.id).state for j in jobs[:5]] == ["success"] * 5
    # Never started: no run ended, none began. The first of them is claimed again (a new attempt,
    # a fresh wait), the others wait in their queue.
    keys = Keys(kq.settings()["redis_namespace"])
    hashes = [kq.redis.hgetall(keys.job(job.id)) for job in jobs[5:]]
    assert all("runs" not in fields and "run_start" not in fields for fields in hashes)
    assert [(fields["state"], fields["attempt"]) for fields in hashes] == \
        [("processing", "2")] + [("queued", "1")] * 3
    live.finish()
    assert sorted(ran, key=int) == [j.id for j in jobs]


def test_a_worker_whose_master_is_gone_saves_its_run_and_ends(live, kq, ran):
    """The master gone (its pid no longer the parent): the run in progress is saved, nothing more is
    claimed, and the worker ends."""
    jobs = [kq.create("w") for _ in range(3)]
    stop = StopRequest(parent=os.getppid() + 1_000_000)  # not our parent: as if the master died
    live.io.stop = stop
    drive(live.core, live.io.handlers, stop)
    assert ran == [jobs[0].id]
    assert [kq.get(j.id).state for j in jobs] == ["success", "new", "new"]
