"""A worker's batch bookkeeping driven step by step in this process, against the test's Redis: what
it does when the connection drops with an outcome and a claim in flight."""
from __future__ import annotations

import os
import time

import pytest
import redis

from kickq import scripts
from kickq.registry import Registration
from kickq_supervisor.channel import Channel
from kickq_supervisor.worker import Done, Worker
from tests.helpers import wait_until


@pytest.fixture
def worker(kq):
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    w = Worker(1, Registration(("w",), 1, lambda job, data: None, {}), kq.settings(), write_fd,
               claimer="w1", prefetch=4)
    w.client = kq.redis
    w.scripts = scripts.Scripts(kq.redis)
    w.channel = Channel(kq.redis)
    w._delay = 0.001  # no real backoff in a test
    yield w
    w.channel.reset()
    os.close(read_fd)
    os.close(write_fd)


def test_a_dropped_connection_loses_no_outcome_and_takes_no_job_twice(worker, kq):
    jobs = [kq.create("w") for _ in range(8)]
    worker.run_seconds = 0.001  # recent runs were quick: batches of 4
    worker.jobs_done, worker.last_busy = 1, time.monotonic()
    worker._refill()  # claims a batch at once
    assert [j.job_id for j in worker.ready] == [j.id for j in jobs[:4]]
    dones = []
    for _ in range(2):  # two jobs run: the first outcome goes to the journal, the second claims ahead
        job = worker.ready.popleft()
        dones.append(Done(job.job_id, job.token, "success", f'"ok {job.job_id}"', 1, time.monotonic(), False))
        worker._save(dones[-1], claim=True)
    assert [kind for _, _, kind in worker.inflight][:1] == ["journal"] and worker.inflight[-1][1]
    # Redis ran them (the next batch is claimed) ... then the connection drops, the replies unread
    wait_until(lambda: kq.get(jobs[7].id).state == "processing", timeout=5)
    conn = worker.channel.conn

    def dropped(*args, **kwargs):
        raise redis.exceptions.ConnectionError("connection dropped (test)")

    conn.read_response = dropped
    worker._refill()  # the channel drops the connection, and with it the replies
    del conn.read_response
    assert worker.claims_lost and worker.unsaved == dones
    worker._refill()  # connected again: the outcomes are sent again, the lost claims are found
    for job in jobs[:2]:
        wait_until(lambda job=job: kq.get(job.id).state == "success", timeout=5)
        assert kq.get(job.id).result == f"ok {job.id}"
    held = [j.job_id for j in worker.ready]
    assert held == [j.id for j in jobs[2:8]]  # the two still held, then the four of the lost claim


def test_a_lost_idle_claim_is_looked_up_only_once_nothing_is_in_flight(worker, kq):
    jobs = [kq.create("w") for _ in range(6)]
    worker.run_seconds = 0.001
    worker.jobs_done, worker.last_busy = 1, time.monotonic()
    worker._refill()
    for _ in range(2):
        job = worker.ready.popleft()
        worker._save(Done(job.job_id, job.token, "success", "", 1, time.monotonic(), False), claim=True)
    assert worker.inflight[-1][1]  # the next batch is claimed, its reply not read yet
    worker.claims_lost = True  # e.g. an idle claim failed meanwhile
    worker._refill()
    assert [j.job_id for j in worker.ready] == [j.id for j in jobs[2:]]  # each once
