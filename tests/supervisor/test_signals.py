"""Signals to the master: TERM/INT graceful, a second INT or QUIT quick, HUP reloads handler code."""
from __future__ import annotations

import signal
import textwrap

import pytest

from kickq.keys import Keys
from tests.helpers import side_key, wait_until
from tests.supervisor.conftest import alive, session_processes, wait_job

QUICK_STOP = "supervisor stopped quickly (second INT) while the job ran"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_graceful_stop_lets_the_running_job_finish(supervisor, kq, redis_url, sig, namespace):
    release = side_key(namespace, "release")
    running = kq.create("slow", {"redis": redis_url, "release": release})
    busy = supervisor.wait_running(running.id)
    waiting = kq.create("slow", {"redis": redis_url, "release": release})

    supervisor.send(sig)
    # Idle workers and the reaper leave; the busy worker stays to finish its job.
    wait_until(lambda: [p.pid for p in supervisor.children()] == [busy.pid], timeout=5.0,
               message="only the busy worker is left")
    assert supervisor.proc.poll() is None
    kq.redis.rpush(release, "go")

    assert supervisor.wait_exit(timeout=10) == 0
    assert kq.get(running.id).state == "success"
    assert kq.get(waiting.id).state == "new"  # claiming stopped with the signal
    assert kq.redis.zcard(Keys(supervisor.namespace).processing) == 0
    assert session_processes(supervisor.pid) == []  # every worker exited before the master


def test_graceful_stop_still_kills_a_job_past_its_timeout(supervisor, kq):
    job = kq.create("chaos", {"do": "hang"}, {"process_timeout": 0.5, "ghost_interval": 3600})
    supervisor.wait_running(job.id)
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait_exit(timeout=10) == 0
    done = kq.get(job.id)
    assert (done.state, done.last_error) == ("ghost", "processing timed out")


def test_second_int_stops_quickly_and_leaves_the_job_to_the_ghost_path(supervisor, kq):
    job = kq.create("chaos", {"do": "hang"}, {"process_timeout": 30, "ghost_interval": 3600})
    busy = supervisor.wait_running(job.id)
    supervisor.send(signal.SIGINT)
    wait_until(lambda: [p.pid for p in supervisor.children()] == [busy.pid], timeout=5.0,
               message="graceful stop under way")
    supervisor.send(signal.SIGINT)
    assert supervisor.wait_exit(timeout=5) != 0
    assert not alive(busy)
    done = kq.get(job.id)
    assert (done.state, done.last_error) == ("ghost", QUICK_STOP)


def test_quit_stops_quickly(supervisor, kq):
    job = kq.create("chaos", {"do": "hang"}, {"process_timeout": 30, "ghost_interval": 3600})
    supervisor.wait_running(job.id)
    supervisor.send(signal.SIGQUIT)
    assert supervisor.wait_exit(timeout=5) != 0
    assert kq.get(job.id).state == "ghost"
    assert session_processes(supervisor.pid) == []


HUP_MODULE = """
import os
import time

import kickq

VERSION = {version!r}


def handler(job, data):
    time.sleep((data or {{}}).get("sleep", 0))
    return {{"version": VERSION, "pid": os.getpid()}}


kickq.Kickq().process(["hup"], {{"concurrent_jobs": 2}}, handler)
"""


def write_module(path, version):
    path.write_text(textwrap.dedent(HUP_MODULE.format(version=version)))


def test_hup_replaces_the_workers_with_fresh_handler_code(start_supervisor, kq, tmp_path):
    module = tmp_path / "hup_handlers.py"
    write_module(module, "one")
    sup = start_supervisor(module, workers=2)
    assert wait_job(kq, kq.create("hup").id).result["version"] == "one"
    old = {p.pid for p in sup.workers().values()} | {p.pid for p in sup.reapers()}

    in_flight = kq.create("hup", {"sleep": 0.5})
    sup.wait_running(in_flight.id)
    write_module(module, "two, edited on disk")
    sup.send(signal.SIGHUP)

    assert wait_job(kq, in_flight.id).result["version"] == "one"  # finished by the old code
    wait_until(lambda: sup.ready(2) and not old & {p.pid for p in sup.workers().values()}, timeout=15.0,
               message="two new idle workers")
    assert sup.proc.poll() is None  # the same master pid (re-exec), still running
    assert not old & {p.pid for p in sup.reapers()}
    results = [wait_job(kq, job.id).result for job in kq.create_many([("hup",)] * 4)]
    assert {r["version"] for r in results} == {"two, edited on disk"}
    assert {r["pid"] for r in results} <= {p.pid for p in sup.workers().values()}


def test_hup_is_ignored_when_the_handlers_no_longer_import(start_supervisor, kq, tmp_path):
    module = tmp_path / "hup_handlers.py"
    write_module(module, "one")
    sup = start_supervisor(module, workers=2)
    before = {p.pid for p in sup.workers().values()}
    module.write_text("raise ImportError('half-deployed release')\n")
    sup.send(signal.SIGHUP)
    wait_until(lambda: "HUP ignored: the handlers no longer import" in sup.log(), timeout=15.0,
               message="the failed import is logged")
    assert "half-deployed release" in sup.log()
    assert {p.pid for p in sup.workers().values()} == before
    assert wait_job(kq, kq.create("hup").id).result["version"] == "one"
