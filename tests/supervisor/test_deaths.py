"""Runaway and dying jobs: the timeout kills the worker's whole process group, any other death is
ghosted at once with the signal or exit code, and ghost / retry options decide what happens next."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import kickq
from kickq.keys import Keys
from tests.helpers import side_key, subscribers, wait_until
from tests.supervisor import handlers
from tests.supervisor.conftest import alive, wait_job

TIMED_OUT = "processing timed out"
NEVER = 3600  # an interval long enough that nothing is re-run during a test


def opts(**kw):
    return {"ghost_interval": NEVER, **kw}


def pushed_pid(r, list_key, timeout=10.0):
    return int(wait_until(lambda: r.lindex(list_key, 0), timeout=timeout, message=f"a pid in {list_key}"))


def test_timeout_kills_the_whole_process_group_and_ghosts_the_run(supervisor, kq, redis_url, namespace):
    r = kq.redis
    worker_key, grandchild_key = side_key(namespace, "worker"), side_key(namespace, "grandchild")
    data = {"do": "fork", "redis": redis_url, "key": worker_key, "grandchild": grandchild_key}
    job = kq.create("chaos", data, opts(process_timeout=0.5))
    worker = psutil.Process(pushed_pid(r, worker_key))
    grandchild = psutil.Process(pushed_pid(r, grandchild_key))
    assert grandchild.ppid() == worker.pid and alive(grandchild)

    done = wait_job(kq, job.id, "ghost")
    assert done.last_error == TIMED_OUT
    [run] = done.runs
    assert (run["state"], run["error"]) == ("ghost", TIMED_OUT)
    assert 500 <= run["time"] < 3000, run  # never before the deadline
    # ghost_interval decides when it runs again.
    assert done.scheduled_for - (run["start"] + run["time"]) == NEVER * 1000

    wait_until(lambda: not alive(worker) and not alive(grandchild), timeout=2.0,
               message="the worker and its grandchild are gone")
    assert f"(pid {worker.pid}) killed by SIGTERM during job {job.id}: {TIMED_OUT}" in supervisor.log()
    supervisor.wait_ready(handlers.WORKERS)  # replaced
    assert worker.pid not in {p.pid for p in supervisor.workers().values()}


def test_a_grandchild_that_ignores_term_is_killed_too(supervisor, kq, redis_url, namespace):
    r = kq.redis
    worker_key, grandchild_key = side_key(namespace, "worker"), side_key(namespace, "grandchild")
    data = {"do": "fork_stubborn", "redis": redis_url, "key": worker_key, "grandchild": grandchild_key}
    job = kq.create("chaos", data, opts(process_timeout=0.5))
    worker = psutil.Process(pushed_pid(r, worker_key))
    grandchild = psutil.Process(pushed_pid(r, grandchild_key))
    assert os.getpgid(grandchild.pid) == worker.pid
    assert wait_job(kq, job.id, "ghost").last_error == TIMED_OUT
    # The worker dies of the TERM at once; its grandchild ignores it and must get the KILL.
    wait_until(lambda: not alive(worker) and not alive(grandchild), timeout=3.0,
               message="the worker and its TERM-proof grandchild are gone")


def test_a_handler_that_ignores_term_is_killed_after_the_grace(supervisor, kq, redis_url, namespace):
    r = kq.redis
    worker_key, ready = side_key(namespace, "worker"), side_key(namespace, "ready")
    job = kq.create("chaos", {"do": "ignore_term", "redis": redis_url, "key": worker_key, "ready": ready},
                    opts(process_timeout=0.3))
    pid = pushed_pid(r, worker_key)
    wait_until(lambda: r.llen(ready), message="the handler ignores SIGTERM")
    done = wait_job(kq, job.id, "ghost")
    assert done.last_error == TIMED_OUT
    # TERM at the deadline did nothing; KILL came after --kill-grace 0.2.
    assert done.runs[0]["time"] >= 300 + 200, done.runs
    wait_until(lambda: f"(pid {pid}) killed by SIGKILL" in supervisor.log(), timeout=2.0,
               message="the master saw the worker die by SIGKILL")
    assert not psutil.pid_exists(pid) or not alive(psutil.Process(pid))


def test_ghost_count_exhausted_means_fail(supervisor, kq):
    job = kq.create("chaos", {"do": "hang"},
                    {"process_timeout": 0.3, "ghost_count": 1, "ghost_interval": 0.3})
    done = wait_job(kq, job.id, "fail")
    assert done.last_error == TIMED_OUT
    assert [(run["state"], run["error"]) for run in done.runs] == [("ghost", TIMED_OUT)] * 2
    first, second = done.runs
    assert second["start"] >= first["start"] + first["time"] + 300  # re-run after ghost_interval


def test_a_ghost_rerun_can_succeed(supervisor, kq):
    job = kq.create("chaos", {"do": "hang_first"}, {"process_timeout": 0.3, "ghost_interval": 0})
    done = wait_job(kq, job.id)
    assert (done.state, done.result) == ("success", "run 2")
    assert [run["state"] for run in done.runs] == ["ghost", "success"]
    assert done.last_error == TIMED_OUT  # the error of the ghosted run is kept


@pytest.mark.parametrize("options", [{"ghost_retry": False}, {"ghost_count": 0}])
def test_no_ghost_retry_means_fail_at_once(supervisor, kq, options):
    job = kq.create("chaos", {"do": "hang"}, {"process_timeout": 0.3, "ghost_interval": 0, **options})
    done = wait_job(kq, job.id, "fail")
    assert [(run["state"], run["error"]) for run in done.runs] == [("ghost", TIMED_OUT)]


def test_sigkill_of_a_worker_mid_job_is_ghosted_at_once(supervisor, kq):
    job = kq.create("chaos", {"do": "hang"}, opts(process_timeout=30))
    worker = supervisor.wait_running(job.id)
    assert worker.ppid() == supervisor.pid
    number = next(n for n, p in supervisor.workers().items() if p.pid == worker.pid)

    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    done = wait_job(kq, job.id, "ghost", timeout=1.0)  # not after the 30 s process_timeout
    assert time.monotonic() - killed < 1.0
    assert done.last_error.startswith("worker died: killed by SIGKILL"), done.last_error
    assert done.runs[0]["error"] == done.last_error

    supervisor.wait_ready(handlers.WORKERS)  # the pool is full again
    assert supervisor.workers()[number].pid != worker.pid
    assert wait_job(kq, kq.create("chaos", {"do": "return", "value": 1}).id).result == 1


@pytest.mark.parametrize("data, error", [
    ({"do": "exit", "code": 5}, "worker died: exited with code 5"),
    ({"do": "exit", "code": 0}, "worker died: exited with code 0"),
    ({"do": "signal", "signal": int(signal.SIGSEGV)}, "worker died: killed by SIGSEGV"),
], ids=["os._exit(5)", "os._exit(0)", "SIGSEGV"])
def test_a_worker_dying_by_itself_is_ghosted_with_the_cause(supervisor, kq, data, error):
    job = kq.create("chaos", data, opts(process_timeout=30))
    done = wait_job(kq, job.id, "ghost", timeout=2.0)
    assert done.last_error == error
    assert [(run["state"], run["error"]) for run in done.runs] == [("ghost", error)]
    assert supervisor.proc.poll() is None  # the master carries on
    supervisor.wait_ready(handlers.WORKERS)
    assert wait_job(kq, kq.create("chaos", {"do": "return", "value": "after"}).id).result == "after"


def test_retry_until_retry_count_then_fail(supervisor, kq):
    job = kq.create("chaos", {"do": "fail_until", "fails": 99},
                    {"retry": True, "retry_count": 2, "retry_interval": 0.2})
    wait_job(kq, job.id, "retry")
    done = wait_job(kq, job.id, "fail")
    errors = [f"RuntimeError: failure {n}" for n in (1, 2, 3)]
    assert [(run["state"], run["error"]) for run in done.runs] == [("fail", e) for e in errors]
    assert [run["count"] for run in done.runs] == [1, 2, 3]
    assert done.last_error == errors[-1]
    for before, after in zip(done.runs[:-1], done.runs[1:], strict=True):
        assert after["start"] >= before["start"] + before["time"] + 200  # retry_interval
    assert done.finish_time is not None and done.complete and not done.success


def test_a_callable_retry_interval_from_the_config(supervisor, kq):
    # Expanded at create into one interval per retry, so the worker needs no code to know it.
    kickq.config(job_flags={"chaos": {"retry": True, "retry_count": 2,
                                      "retry_interval": lambda attempt: [0.1, 1.0][attempt - 1]}})
    job = kq.create("chaos", {"do": "fail_until", "fails": 99})
    assert job.retry_interval == [0.1, 1.0]
    done = wait_job(kq, job.id, "fail")
    assert [run["state"] for run in done.runs] == ["fail"] * 3
    first, second, third = done.runs
    assert 100 <= second["start"] - (first["start"] + first["time"]) < 1000
    assert third["start"] - (second["start"] + second["time"]) >= 1000


def test_retry_then_success(supervisor, kq):
    job = kq.create("chaos", {"do": "fail_until", "fails": 1},
                    {"retry": True, "retry_count": 3, "retry_interval": 0.1})
    done = wait_job(kq, job.id)
    assert (done.state, done.result) == ("success", "run 2")
    assert [run["state"] for run in done.runs] == ["fail", "success"]
    assert done.last_error == "RuntimeError: failure 1"


@pytest.mark.parametrize("reaper_interval", ["1", "5"])
def test_a_delayed_job_starts_soon_after_its_due_time(start_supervisor, kq, reaper_interval):
    # With a 5 s reaper interval, only the producer's wake-up on pub/sub makes the reaper come early.
    sup = start_supervisor(args=["--reaper-interval", reaper_interval])
    channel = Keys(sup.namespace).reaper
    wait_until(lambda: subscribers(kq.redis, channel) == 1, message="the reaper listens")
    job = kq.create("pid", None, {"delay": 0.4})
    assert job.state == "delayed"
    done = wait_job(kq, job.id)
    start = done.runs[0]["start"]
    assert 0 <= start - done.create_time - 400 < 500, (done.create_time, start)


def test_a_late_finish_from_a_superseded_attempt_is_rejected(supervisor, kq, redis_url, namespace):
    r = kq.redis
    release, worker_key = side_key(namespace, "release"), side_key(namespace, "worker")
    job = kq.create("chaos", {"do": "block_first", "redis": redis_url, "release": release, "key": worker_key},
                    {"process_timeout": 30, "ghost_interval": 0})
    first_worker = pushed_pid(r, worker_key)
    # Its lease runs out (as if its supervisor had vanished): the reaper recovers the job and the
    # other "chaos" worker runs attempt 2, while attempt 1 is still running.
    r.zadd(Keys(supervisor.namespace).processing, {job.id: 1})
    done = wait_job(kq, job.id)
    assert (done.state, done.result) == ("success", "attempt 2")
    assert [run["state"] for run in done.runs] == ["ghost", "success"]
    assert done.runs[0]["error"].startswith("lease expired")
    assert int(r.lindex(worker_key, 1)) != first_worker

    r.rpush(release, "go")  # attempt 1 now answers "first attempt"
    rejected = f"finish of job {job.id} (token 1:{done.create_time}) rejected (stale, job is success)"
    wait_until(lambda: rejected in supervisor.log(), message="the late finish is logged as rejected")
    assert kq.get(job.id) == done  # one outcome, untouched
    assert alive(psutil.Process(first_worker))  # and the worker that answered late carries on
