"""A worker's batch bookkeeping driven step by step in this process, against the test's Redis: what
it does when the connection drops with an outcome and a claim in flight."""
from __future__ import annotations

import json
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
    assert [call.kind for call in worker.inflight][:1] == ["journal"] and worker.inflight[-1].claims
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
    assert worker.inflight[-1].claims  # the next batch is claimed, its reply not read yet
    worker.claims_lost = True  # e.g. an idle claim failed meanwhile
    worker._refill()
    assert [j.job_id for j in worker.ready] == [j.id for j in jobs[2:]]  # each once


def claim_batch(worker, kq, count, opts=None):
    jobs = [kq.create("w", None, opts) for _ in range(count)]
    worker.run_seconds = 0.001  # recent runs were quick: batches of 4
    worker.jobs_done, worker.last_busy = 1, time.monotonic()
    worker._refill()  # claims a batch at once
    assert [j.job_id for j in worker.ready] == [j.id for j in jobs[:4]]
    return jobs


def journal(kq, worker):
    return [json.loads(e)[:3] for e in kq.redis.lrange(worker.keys.journal(worker.claimer), 0, -1)]


def test_the_next_jobs_start_mark_rides_with_the_previous_outcome(worker, kq):
    jobs = claim_batch(worker, kq, 4)
    first = worker.ready.popleft()
    assert worker._mark_start(first)  # the first of a batch: a write of its own
    worker._save(Done(first.job_id, first.token, "success", "", 1, time.monotonic(), False), claim=False)
    worker._settled(worker.channel.settle())
    a, b = jobs[0].id, jobs[1].id
    assert journal(kq, worker) == [[a, "1", "start"], [a, "1", "success"], [b, "1", "start"]]
    second = worker.ready.popleft()
    sent = len(worker.channel.sent)
    assert worker._mark_start(second) and len(worker.channel.sent) == sent  # marked already: no write
    worker._send([], 0)  # a finish_many applies the journal
    worker._settled(worker.channel.settle())
    assert kq.get(a).state == "success"
    fields = {j.id: kq.redis.hgetall(worker.keys.job(j.id)) for j in jobs[1:]}
    assert "run_start" in fields[b]  # known to have started: a lost run of it is ghosted
    assert "run_start" not in fields[jobs[2].id]  # claimed ahead, not started: it would go back


def test_a_job_that_must_not_run_twice_starts_only_once_redis_has_its_mark(worker, kq):
    claim_batch(worker, kq, 4, {"ghost_retry": False})
    job = worker.ready.popleft()
    assert worker._mark_start(job) and not worker.inflight and not worker.channel.sent  # acknowledged
    assert journal(kq, worker) == [[job.job_id, "1", "start"]]
    # Redis cannot be reached: the next one is not started but given back (with the next call)
    nxt = worker.ready.popleft()

    def dropped(*args, **kwargs):
        raise redis.exceptions.ConnectionError("connection dropped (test)")

    worker.channel.send_commands = dropped
    assert not worker._mark_start(nxt)
    del worker.channel.send_commands
    assert worker.give_back == [(nxt.job_id, nxt.token)]
    worker._send([], 0)
    worker._settled(worker.channel.settle())
    assert kq.get(nxt.job_id).state == "queued" and kq.get(nxt.job_id).runs == []


def told_master(worker, monkeypatch):
    """Each write the worker makes to the master's pipe, as a list of its lines."""
    writes = []
    monkeypatch.setattr(worker, "_notify", lambda message: writes.append(message.split("\n")))
    return writes


def test_the_next_start_goes_to_the_master_in_the_same_write_as_the_last_end(worker, kq, monkeypatch):
    jobs = claim_batch(worker, kq, 4, {"process_timeout": 7})
    ids = [j.id for j in jobs]
    writes = told_master(worker, monkeypatch)
    for _ in range(4):
        assert worker._run_next()
    assert [[line.split()[:2] for line in lines] for lines in writes] == [
        [["S", ids[0]]],
        [["F", ids[0]], ["S", ids[1]]],  # the next job is in hand: its start rides along
        [["F", ids[1]], ["S", ids[2]]],
        [["F", ids[2]], ["S", ids[3]]],
        [["F", ids[3]]]]  # nothing left in hand
    assert writes[1][1].split()[2] == "1" and float(writes[1][1].split()[4]) == 7.0  # token, timeout
    worker._send([], 0)
    worker._settled(worker.channel.settle())
    assert [kq.get(i).state for i in ids] == ["success"] * 4


def test_a_start_told_ahead_is_told_again_when_the_job_starts_late(worker, kq, monkeypatch):
    jobs = claim_batch(worker, kq, 4)
    writes = told_master(worker, monkeypatch)
    assert worker._run_next()
    assert [line.split()[:2] for line in writes[-1]] == [["F", jobs[0].id], ["S", jobs[1].id]]
    worker.announced = (jobs[1].id, time.monotonic() - 1)  # e.g. the save waited on Redis
    assert worker._run_next()
    assert [line.split()[:2] for line in writes[-2]] == [["S", jobs[1].id]]  # its deadline runs from now


def test_no_start_is_told_ahead_for_a_job_that_may_be_given_back(worker, kq, monkeypatch):
    jobs = claim_batch(worker, kq, 4, {"ghost_retry": False})  # starts only once Redis has its mark
    writes = told_master(worker, monkeypatch)
    assert worker._run_next() and worker._run_next()
    assert [[line.split()[:2] for line in lines] for lines in writes] == [
        [["S", jobs[0].id]], [["F", jobs[0].id]], [["S", jobs[1].id]], [["F", jobs[1].id]]]
    worker.stopping = True  # a stop was asked: the job in hand will not start
    assert not worker._run_next()
    assert [line.split()[:2] for line in writes[-1]] == [["F", jobs[2].id]]


def test_a_job_told_ahead_runs_even_if_a_stop_comes_before_it_starts(worker, kq, monkeypatch):
    jobs = claim_batch(worker, kq, 4)
    writes = told_master(worker, monkeypatch)
    assert worker._run_next()
    assert worker.announced[0] == jobs[1].id
    worker.stopping = True  # USR1 between the two jobs: the master already holds the next one's start
    monkeypatch.setattr(worker, "_refill", lambda: None)
    monkeypatch.setattr(worker, "_install_signals", lambda: None)
    monkeypatch.setattr(worker, "_leave", lambda: None)
    monkeypatch.setattr("kickq_supervisor.worker.connect", lambda settings: kq.redis)
    worker.run()
    assert [line.split()[:2] for line in writes[-1]] == [["F", jobs[1].id]]
    assert worker.announced is None and [j.job_id for j in worker.ready] == [j.id for j in jobs[2:4]]


def test_a_hotjobs_outcome_goes_alone_when_nothing_else_is_in_hand(worker, kq):
    job = kq.create("w", None, {"hotjob": True})
    worker.run_seconds = 0.001
    worker.jobs_done, worker.last_busy = 1, time.monotonic()
    worker._refill()
    ready = worker.ready.popleft()
    assert ready.job_id == job.id and not worker.ready
    worker._save(Done(job.id, ready.token, "success", "1", 1, time.monotonic(), True), claim=True)
    (runs, claims, _, _), = [call for call in worker.inflight if call.kind.startswith("finish_many")]
    assert [d.job_id for d in runs] == [job.id] and not claims  # no claim in the script that publishes
    later = kq.create("w")
    worker._refill()  # reads the reply, then claims (the worker was busy a moment ago)
    assert kq.get(job.id).state == "success" and [j.job_id for j in worker.ready] == [later.id]


def test_a_batch_read_late_counts_its_wait_from_the_claim(worker, kq, monkeypatch):
    """A refill's reply is read when the worker runs out, maybe long after Redis claimed the jobs
    (a slow job ran meanwhile): the wait counts from the call, so they are given back, not started."""
    monkeypatch.setattr("kickq_supervisor.worker.MAX_PREFETCH_WAIT", 0.05)
    jobs = claim_batch(worker, kq, 8)
    for _ in range(2):  # the second save claims the next batch
        job = worker.ready.popleft()
        worker._save(Done(job.job_id, job.token, "success", "", 1, time.monotonic(), False), claim=True)
    sent = time.monotonic()
    assert worker.inflight[-1].claims
    wait_until(lambda: time.monotonic() - sent > 0.06, timeout=5, interval=0.01, message="a slow job's time")
    for _ in range(2):
        job = worker.ready.popleft()
        worker._save(Done(job.job_id, job.token, "success", "", 1, time.monotonic(), False), claim=True)
    worker._refill()  # out of jobs: the reply is read now
    assert [j.job_id for j in worker.ready] == [j.id for j in jobs[4:]]
    assert all(j.claimed_at <= sent for j in worker.ready)
    assert worker._run_next()  # not run: given back, all four
    assert not worker.ready and worker.jobs_done == 1
    worker._send([], 0)
    worker._settled(worker.channel.settle())
    assert [kq.get(j.id).state for j in jobs] == ["success"] * 4 + ["queued"] * 4


def test_a_lost_claim_found_again_counts_its_wait_from_the_claim(worker, kq):
    jobs = [kq.create("w") for _ in range(4)]
    worker.run_seconds = 0.001
    worker.jobs_done, worker.last_busy = 1, time.monotonic()
    conn = worker.channel._connection()

    def dropped(*args, **kwargs):
        raise redis.exceptions.ConnectionError("connection dropped (test)")

    conn.read_response = dropped
    worker._refill()  # the claim ran, its reply is lost
    del conn.read_response
    assert worker.claims_lost and not worker.ready
    for job in jobs:  # as if claimed a minute ago (update_time is the claim's, by Redis' clock)
        stamp = int(kq.redis.hget(worker.keys.job(job.id), "update_time"))
        kq.redis.hset(worker.keys.job(job.id), "update_time", stamp - 60_000)
    before = time.monotonic()
    worker._refill()
    assert [j.job_id for j in worker.ready] == [j.id for j in jobs]
    assert all(j.claimed_at < before - 59 for j in worker.ready)  # too old to start: given back
    assert worker._run_next() and not worker.ready and worker.give_back
