"""Whole-supervisor loss and a Redis outage, against real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import kickq
from kickq.scripts import run_token
from tests.helpers import ping, redis_server_binary, side_key, start_redis, stop_redis, wait_until
from tests.supervisor import handlers
from tests.supervisor.conftest import alive, wait_job

LEASE_GRACE = 1.0  # kickq.scripts.LEASE_GRACE_MS


@pytest.mark.slow
def test_a_lost_supervisor_s_job_is_recovered_by_another_supervisor(start_supervisor, kq):
    first = start_supervisor()
    timeout = 1.0
    job = kq.create("chaos", {"do": "hang_first"}, {"process_timeout": timeout, "ghost_interval": 0})
    first.wait_running(job.id)
    children = first.children()

    os.killpg(first.pid, signal.SIGKILL)  # the whole supervisor, as if its host had died
    killed = time.monotonic()
    first.proc.wait(timeout=5)
    wait_until(lambda: not any(alive(p) for p in children), timeout=5.0, message="its workers died with it")
    assert kq.get(job.id).state == "processing"  # nobody was left to ghost it

    start_supervisor()
    done = wait_job(kq, job.id, timeout=timeout + LEASE_GRACE + 10)
    assert time.monotonic() - killed < timeout + LEASE_GRACE + 5
    assert (done.state, done.result) == ("success", "run 2")
    first_run, second_run = done.runs
    assert first_run["state"] == "ghost"
    assert first_run["error"].startswith("lease expired")
    assert first_run["time"] >= (timeout + LEASE_GRACE) * 1000  # not before its lease ran out
    assert second_run["state"] == "success"


@pytest.mark.slow
def test_a_job_handed_to_a_dead_supervisors_idle_worker_goes_back_to_its_queue(start_supervisor, kq,
                                                                              namespace):
    """Its host died with a worker registered idle: a create in the next moments may hand the job
    to it. Nobody took it from the inbox, so after its lease it is given back, not ghosted."""
    first = start_supervisor()
    keys = kickq.keys.Keys(namespace)
    wait_until(lambda: kq.redis.zcard(keys.idle("pid")) == 1, timeout=10, interval=0.01)
    # The create waits until every process of it is gone, as when its host dies: its workers have
    # process groups of their own and outlive the master by a moment (until their parent-death
    # signal), in which the worker could still take the job and mark its start.
    assert first.destroy() == [], "every process of the supervisor died"
    killed = time.monotonic()
    timeout = 1.0
    job = kq.create("pid", None, {"process_timeout": timeout})
    assert kq.get(job.id).state == "processing"  # handed to the dead worker: its registration lives on

    second = start_supervisor()
    done = wait_job(kq, job.id, timeout=timeout + LEASE_GRACE + 10)
    assert time.monotonic() - killed < timeout + LEASE_GRACE + 5
    assert done.state == "success" and done.result in [p.pid for p in second.workers().values()]
    assert len(done.runs) == 1  # the run that never began is not counted
    events = [e["event"] for e in kq.events(since="0", timeout=0.2) if e["id"] == job.id]
    assert events == ["create", "processing", "released", "processing", "success"]
    assert not list(kq.redis.scan_iter(match=keys.prefix + "inbox:*"))  # recover emptied it


@pytest.mark.slow
def test_a_job_that_must_not_run_twice_is_not_rerun_after_its_supervisor_is_lost(start_supervisor, kq,
                                                                                 namespace, redis_url):
    """ghost_retry=False, handed to an idle worker (a claim ahead): the worker starts it only once
    Redis has its start mark, so the lost run is ghosted (the job fails) and never run again."""
    first = start_supervisor()
    keys = kickq.keys.Keys(namespace)
    wait_until(lambda: kq.redis.zcard(keys.idle("chaos")) >= 1, timeout=10, interval=0.01)
    pids = side_key(namespace, "pids")
    job = kq.create("chaos", {"do": "hang", "key": pids, "redis": redis_url},
                    {"process_timeout": 1.0, "ghost_retry": False})
    first.wait_running(job.id)
    wait_until(lambda: kq.redis.llen(pids) == 1, timeout=10, interval=0.01, message="the handler ran")
    fields = kq.redis.hgetall(keys.job(job.id))
    journal = [json.loads(e)[:3] for e in kq.redis.lrange(keys.journal(fields["owner"]), 0, -1)]
    run = f"1:{fields['create_time']}"  # attempt 1 (scripts.run_token)
    assert run == run_token(fields)
    assert journal == [[job.id, run, "start"]]  # the start mark was in Redis before the run began
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait(timeout=5)

    start_supervisor()
    done = wait_job(kq, job.id, timeout=1.0 + LEASE_GRACE + 10)
    assert done.state == "fail" and [run["state"] for run in done.runs] == ["ghost"]
    assert done.runs[0]["error"].startswith("lease expired")
    assert kq.redis.llen(pids) == 1  # and a failed job is never claimed again


def start_redis_on(port, workdir):
    """Start redis-server again on the same port and data dir (AOF), as after a restart."""
    log = open(workdir / f"redis-{port}.log", "ab")
    proc = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(workdir),
                             "--daemonize", "no"], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, cwd=workdir)
    log.close()
    wait_until(lambda: proc.poll() is not None or ping("127.0.0.1", port), timeout=10.0,
               message="redis-server back up")
    assert proc.poll() is None, f"redis-server could not start again on port {port}"
    return proc


def cpu_seconds(procs):
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


@pytest.mark.slow
def test_redis_outage(start_supervisor, tmp_path, namespace):
    workdir = tmp_path / "redis"
    server, port = start_redis(workdir, "--appendonly", "yes", "--appendfsync", "always")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        sup = start_supervisor(url=url)
        with kickq.Kickq(redis_url=url, redis_namespace=namespace, redis_timeout=2) as kq:
            assert wait_job(kq, kq.create("style.sync", {"value": 1}).id).state == "success"
            in_flight = kq.create("chaos", {"do": "sleep", "seconds": 1.0}, {"process_timeout": 30})
            sup.wait_running(in_flight.id)
            procs = [sup.master(), *sup.children()]
            pids = {p.pid for p in procs}

            stop_redis(server)
            # Producers get a clear error, within a bounded time.
            started = time.monotonic()
            with pytest.raises(kickq.RedisUnavailable, match="unavailable"):
                kq.create("style.sync", {"value": 2})
            assert time.monotonic() - started < 5

            # Everybody stays up, and nobody spins while Redis is away.
            before, t0 = cpu_seconds(procs), time.monotonic()
            time.sleep(2.0)  # a measurement window, not a wait for a result
            busy = (cpu_seconds(procs) - before) / (time.monotonic() - t0)
            assert busy < 0.5, f"{busy:.0%} of a CPU used by {len(procs)} processes during the outage"
            assert all(alive(p) for p in procs)
            assert {p.pid for p in [sup.master(), *sup.children()]} == pids  # nothing restarted

            server = start_redis_on(port, workdir)
            # The job whose handler returned during the outage is finished once Redis is back...
            assert wait_job(kq, in_flight.id, timeout=15).state == "success"
            # ...and new jobs flow again, through the same processes.
            assert wait_job(kq, kq.create("style.sync", {"value": 3}).id, timeout=15).result["echo"] == 3
            assert wait_job(kq, kq.create("pid", None, {"delay": 0.1}).id, timeout=15).state == "success"
            assert {p.pid for p in [sup.master(), *sup.children()]} == pids
            assert len(sup.workers()) == handlers.WORKERS
    finally:
        stop_redis(server)



ONE_WORKER_MODULE = """
import kickq


def noop(job, data):
    return None


kickq.Kickq().process("one", noop)
"""


def children_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


@pytest.mark.slow
def test_a_worker_forked_just_before_the_master_dies_does_not_outlive_it(start_supervisor, kq, tmp_path):
    # With --max-jobs-per-worker 1 a job makes the master fork a replacement worker; the master is
    # SIGKILLed the moment that child appears, before it could have set up its own death signal.
    module = tmp_path / "one_handler.py"
    module.write_text(ONE_WORKER_MODULE)
    for trial in range(8):
        sup = start_supervisor(module, args=["--max-jobs-per-worker", "1"], workers=1)
        before = children_of(sup.pid)
        kq.create("one")
        deadline = time.monotonic() + 10
        while not children_of(sup.pid) - before:
            assert time.monotonic() < deadline, "no replacement worker was forked"
        os.killpg(sup.pid, signal.SIGKILL)
        assert sup.destroy() == [], f"trial {trial}: a process outlived the master"
