"""Dense workers (jobs_per_worker > 1) in a real kickq-supervisor: async jobs as tasks and sync
jobs in threads run at once in one worker process; an async job past its deadline is cancelled and
ghosted while the others finish; a thread job past its deadline gets the worker killed (and every
job it ran ghosted); a graceful stop lets the jobs in flight finish; workers recycle by job count
and memory; a whole supervisor killed loses none of its jobs in flight; one job per worker is
unchanged."""
from __future__ import annotations

import os
import signal
from collections import Counter

import pytest

from kickq.keys import Keys
from tests.helpers import side_key, wait_until
from tests.supervisor import handlers_dense
from tests.supervisor.conftest import wait_job
from tests.supervisor.handlers_dense import SLOTS, worker_numbers

DENSE = handlers_dense.__file__
TIMED_OUT = "processing timed out"


@pytest.fixture
def dense(start_supervisor):
    return start_supervisor(DENSE, workers=handlers_dense.WORKERS)


def worker_pid(sup, name: str) -> int:
    return sup.workers()[worker_numbers(name)[0]].pid


def events(kq, log: str) -> list[tuple[str, str, int, float]]:
    """What the handlers recorded: (what, job id, pid, monotonic time) each."""
    out = []
    for entry in kq.redis.lrange(log, 0, -1):
        what, job_id, pid, at = entry.split()
        out.append((what, job_id, int(pid), float(at)))
    return out


@pytest.mark.parametrize("name", ["dense.async", "dense.sync"])
def test_the_slots_of_one_worker_run_at_once(dense, kq, redis_url, namespace, name):
    barrier, log = side_key(namespace, "barrier"), side_key(namespace, "log")
    data = {"redis": redis_url, "key": barrier, "parties": SLOTS, "log": log}
    jobs = [kq.create(name, data) for _ in range(SLOTS)]
    done = [wait_job(kq, job.id) for job in jobs]
    assert [job.state for job in done] == ["success"] * SLOTS, [job.last_error for job in done]
    assert {job.result for job in done} == {worker_pid(dense, name)}  # one process ran them all
    seen = events(kq, log)
    starts = [at for what, _, _, at in seen if what == "start"]
    ends = [at for what, _, _, at in seen if what == "end"]
    assert len(starts) == len(ends) == SLOTS
    assert max(starts) < min(ends)  # every job had started before the first one ended


def test_more_parties_than_slots_never_meet(dense, kq, redis_url, namespace):
    # The control for the test above: with one more party than slots, the jobs running wait for
    # one that cannot start until a slot is free, so the first of them to give up fails (the last
    # one then meets those still waiting).
    barrier = side_key(namespace, "barrier")
    data = {"redis": redis_url, "key": barrier, "parties": SLOTS + 1, "timeout": 0.5}
    jobs = [kq.create("dense.async", data) for _ in range(SLOTS + 1)]
    done = [wait_job(kq, job.id) for job in jobs]
    failed = [job for job in done if job.state == "fail"]
    assert failed and "barrier not reached" in failed[0].last_error


def test_the_title_shows_the_slots_in_use(dense, kq):
    jobs = [kq.create("dense.async", {"sleep": 1.0}) for _ in range(3)]
    [number] = worker_numbers("dense.async")
    wait_until(lambda: dense.worker_titles().get(number, "").endswith(f"[dense.async 3/{SLOTS} jobs]"),
               message="the title with 3 slots in use")
    for job in jobs:
        assert wait_job(kq, job.id).state == "success"
    wait_until(lambda: dense.worker_titles().get(number, "").endswith("[idle]"), message="idle again")


def test_a_worker_with_a_free_slot_is_handed_new_jobs_while_its_others_run(dense, kq, namespace):
    keys = Keys(namespace)
    busy = [kq.create("dense.sync", {"sleep": 3.0}) for _ in range(2)]
    wait_until(lambda: all(kq.get(job.id).state == "processing" for job in busy), message="busy")
    for _ in range(5):
        # Six slots free: the worker registers for hand-offs as an idle one does.
        wait_until(lambda: kq.redis.zcard(keys.idle("dense.sync")) == 1, message="registered")
        job = kq.create("dense.sync", {"sleep": 0.01})
        assert kq.get(job.id).state in ("processing", "success")  # claimed by its create
        assert wait_job(kq, job.id).state == "success"
    assert [kq.get(job.id).state for job in busy] == ["processing", "processing"]


def test_a_queued_job_wakes_a_worker_whose_slots_are_partly_busy(dense, kq):
    # A delayed job is queued (with a wake token) when due, not handed over: the worker's feed
    # takes the token and claims it at once, not at its next poll.
    busy = kq.create("dense.async", {"sleep": 3.0})
    wait_until(lambda: kq.get(busy.id).state == "processing", message="busy")
    job = kq.create("dense.async", None, {"delay": 0.3})
    done = wait_job(kq, job.id)
    assert 0 <= done.runs[0]["start"] - done.create_time - 300 < 300, (done.create_time, done.runs)
    assert kq.get(busy.id).state == "processing"


def test_an_idle_dense_worker_stops_at_once(dense):
    dense.send(signal.SIGTERM)
    assert dense.wait_exit(5) == 0


def test_an_async_job_past_its_deadline_is_cancelled_and_ghosted_while_the_others_finish(
        dense, kq, redis_url, namespace):
    log = side_key(namespace, "log")
    pid = worker_pid(dense, "dense.async")
    late = kq.create("dense.async", {"redis": redis_url, "log": log, "sleep": 30},
                     {"process_timeout": 0.5, "ghost_retry": False})
    others = [kq.create("dense.async", {"redis": redis_url, "log": log, "sleep": 1.0}) for _ in range(5)]
    timed_out = wait_job(kq, late.id)
    assert timed_out.state == "fail" and timed_out.last_error == TIMED_OUT
    assert [run["state"] for run in timed_out.runs] == ["ghost"]
    assert ("cancelled", late.id) in [(what, job_id) for what, job_id, _, _ in events(kq, log)]  # it saw it
    for job in others:
        finished = wait_job(kq, job.id)
        assert finished.state == "success" and finished.result == pid
    assert worker_pid(dense, "dense.async") == pid  # not killed
    assert "killing" not in dense.log()


def test_a_cancelled_job_is_retried_under_its_ghost_policy(dense, kq):
    job = kq.create("dense.async", {"sleep": 30}, {"process_timeout": 0.3, "ghost_retry": True,
                                                  "ghost_count": 1, "ghost_interval": 0})
    done = wait_job(kq, job.id, timeout=15)
    assert done.state == "fail" and [run["state"] for run in done.runs] == ["ghost", "ghost"]


def test_a_thread_job_past_its_deadline_gets_its_worker_killed_and_every_job_it_ran_ghosted(
        dense, kq, redis_url, namespace):
    pid = worker_pid(dense, "dense.sync")
    options = {"ghost_retry": False}
    late = kq.create("dense.sync", {"sleep": 30}, {**options, "process_timeout": 0.5})
    others = [kq.create("dense.sync", {"sleep": 30}, options) for _ in range(3)]
    timed_out = wait_job(kq, late.id)
    assert timed_out.state == "fail" and timed_out.last_error == TIMED_OUT
    for job in others:
        lost = wait_job(kq, job.id)
        assert lost.state == "fail" and lost.last_error == f"worker killed: job {late.id} passed its deadline"
    wait_until(lambda: worker_pid(dense, "dense.sync") != pid, message="a fresh worker")


def test_a_graceful_stop_lets_the_jobs_in_flight_finish_and_gives_back_the_rest(
        start_supervisor, kq, redis_url, namespace):
    sup = start_supervisor(DENSE, workers=handlers_dense.WORKERS)
    log = side_key(namespace, "log")
    data = {"redis": redis_url, "log": log, "sleep": 1.0}
    running = {name: [kq.create(name, data) for _ in range(SLOTS)] for name in ("dense.async", "dense.sync")}
    wait_until(lambda: sum(1 for what, *_ in events(kq, log) if what == "start") == 2 * SLOTS,
               message="every slot busy")
    waiting = [kq.create(name, data) for name in ("dense.async", "dense.sync") for _ in range(4)]
    sup.send(signal.SIGTERM)
    assert sup.wait_exit(15) == 0
    for name, jobs in running.items():
        for job in jobs:
            done = kq.get(job.id)
            assert done.state == "success" and len(done.runs) == 1, (name, done.to_dict())
    for job in waiting:  # never started: waiting in their queue, no run
        left = kq.get(job.id)
        assert left.state in ("new", "queued") and not left.runs, left.to_dict()
    assert "rejected" not in sup.log()


def test_dense_workers_recycle_by_job_count(start_supervisor, kq):
    start_supervisor(DENSE, workers=handlers_dense.WORKERS, args=["--max-jobs-per-worker", "5"])
    jobs = kq.create_many([("dense.async", {"sleep": 0.05})] * 20)
    pids = Counter(wait_job(kq, job.id).result for job in jobs)
    assert max(pids.values()) <= 5 and len(pids) >= 4, pids


def test_dense_workers_recycle_by_memory(start_supervisor, kq):
    # Every Python worker is above 1 MiB RSS: each retires once the jobs it started have ended.
    start_supervisor(DENSE, workers=handlers_dense.WORKERS, args=["--max-memory-per-worker", "1M"])
    pids = [wait_job(kq, kq.create("dense.sync", {"sleep": 0.01}).id).result for _ in range(3)]
    assert len(set(pids)) == 3, pids


def test_one_job_per_worker_runs_one_job_at_a_time(dense, kq, redis_url, namespace):
    barrier = side_key(namespace, "barrier")
    data = {"redis": redis_url, "key": barrier, "parties": 2, "timeout": 0.3}
    first, second = (kq.create("one.sync", data) for _ in range(2))
    assert wait_job(kq, first.id).state == "fail"  # the second could not start alongside it
    assert wait_job(kq, second.id).state == "success"


def test_a_dense_worker_killed_with_jobs_in_flight_loses_none_and_reruns_only_those(
        dense, kq, redis_url, namespace):
    log = side_key(namespace, "log")
    pid = worker_pid(dense, "dense.async")
    options = {"ghost_interval": 0}
    running = [kq.create("dense.async", {"redis": redis_url, "log": log, "sleep": 1.0}, options)
               for _ in range(SLOTS)]
    wait_until(lambda: sum(1 for what, *_ in events(kq, log) if what == "start") == SLOTS,
               message="every slot busy")
    waiting = [kq.create("dense.async", {"redis": redis_url, "log": log, "sleep": 0.01}, options)
               for _ in range(4)]
    os.kill(pid, signal.SIGKILL)
    for job in running:  # each ghosted once by the master, then run again
        done = wait_job(kq, job.id, timeout=15)
        assert done.state == "success" and [run["state"] for run in done.runs] == ["ghost", "success"]
    for job in waiting:  # never started before the kill: run once
        done = wait_job(kq, job.id, timeout=15)
        assert done.state == "success" and [run["state"] for run in done.runs] == ["success"]


def test_an_async_job_that_blocks_the_loop_past_its_deadline_gets_its_worker_killed(dense, kq):
    pid = worker_pid(dense, "dense.async")
    options = {"ghost_retry": False}
    late = kq.create("dense.async", {"block": 30}, {**options, "process_timeout": 0.5})
    other = kq.create("dense.async", {"sleep": 30}, options)
    assert wait_job(kq, late.id).last_error == TIMED_OUT  # the cancellation could not land
    assert wait_job(kq, other.id).last_error == f"worker killed: job {late.id} passed its deadline"
    wait_until(lambda: worker_pid(dense, "dense.async") != pid, message="a fresh worker")


def test_one_jobs_failure_does_not_disturb_the_others(dense, kq, redis_url, namespace):
    barrier = side_key(namespace, "barrier")
    data = {"redis": redis_url, "key": barrier, "parties": 4}
    jobs = [kq.create(name, {**data, "raise": "no"} if i == 0 else data)
            for name in ("dense.async", "dense.sync") for i in range(4)]
    done = [wait_job(kq, job.id) for job in jobs]
    assert [job.state for job in done] == ["fail", "success", "success", "success"] * 2
    assert done[0].last_error == done[4].last_error == "ValueError: no"


def test_callback_and_promise_handlers_in_dense_workers(dense, kq, redis_url, namespace):
    ok = [kq.create("dense.callback", {"sleep": 0.2}) for _ in range(2)]
    failed = kq.create("dense.callback", {"err": "bad"})
    promised = [kq.create("dense.promise", {"sleep": 0.2}) for _ in range(2)]
    assert [wait_job(kq, job.id).state for job in ok] == ["success", "success"]
    assert wait_job(kq, failed.id).last_error == "bad"
    assert [wait_job(kq, job.id).result for job in promised] == [{"promised": job.id} for job in promised]
    # A promise is a task: cancelled at its deadline, not left to the master.
    log = side_key(namespace, "log")
    late = kq.create("dense.promise", {"redis": redis_url, "log": log, "sleep": 30},
                     {"process_timeout": 0.3, "ghost_retry": False})
    assert wait_job(kq, late.id).last_error == TIMED_OUT
    assert ("cancelled", late.id) in [(what, job_id) for what, job_id, _, _ in events(kq, log)]
    assert "killing" not in dense.log()


def test_a_whole_supervisor_killed_with_dense_workers_full_loses_no_job(start_supervisor, kq, redis_url,
                                                                        namespace):
    first = start_supervisor(DENSE, workers=handlers_dense.WORKERS)
    workers = [w.pid for w in first.workers().values()]
    log = side_key(namespace, "log")
    options = {"ghost_interval": 0, "process_timeout": 2}
    done_before = [kq.create("dense.async", {"sleep": 0.01}, options) for _ in range(5)]
    for job in done_before:
        assert wait_job(kq, job.id).state == "success"
    running = [kq.create(name, {"redis": redis_url, "log": log, "sleep": 1.0}, options)
               for name in ("dense.async", "dense.sync") for _ in range(SLOTS)]
    wait_until(lambda: sum(1 for what, *_ in events(kq, log) if what == "start") == 2 * SLOTS,
               message="every slot busy")
    os.kill(first.pid, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
    wait_until(lambda: not any(_alive(pid) for pid in workers), message="the workers died with their master")
    start_supervisor(DENSE, workers=handlers_dense.WORKERS)
    for job in running:  # their leases expire; the new supervisor's reaper ghosts them and they run again
        done = wait_job(kq, job.id, timeout=20)
        assert done.state == "success" and [run["state"] for run in done.runs] == ["ghost", "success"], \
            done.to_dict()
        assert done.runs[0]["error"].startswith("lease expired")
    for job in done_before:  # finished before the kill: not run again
        assert [run["state"] for run in kq.get(job.id).runs] == ["success"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie until reaped is gone for our purpose
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
