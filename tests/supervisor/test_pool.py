"""The pool: concurrent_jobs worker processes per registration, no starvation across registrations,
FIFO per name with list order as priority, and workers replaced after N jobs or past an RSS limit."""
from __future__ import annotations

import os

from tests.helpers import side_key, wait_until
from tests.supervisor import handlers
from tests.supervisor.conftest import wait_job


def test_each_registration_gets_its_concurrent_jobs_worker_processes(supervisor):
    workers = supervisor.workers()
    assert sorted(workers) == list(range(1, handlers.WORKERS + 1))
    pids = {p.pid for p in workers.values()}
    assert len(pids) == handlers.WORKERS
    for proc in workers.values():  # forked by the master, each in its own process group
        assert proc.ppid() == supervisor.pid
        assert os.getpgid(proc.pid) == proc.pid
    # "pool" is registered with the camelCase alias concurrentJobs=3.
    assert supervisor.log().count("serving pool\n") == 3


def test_concurrent_jobs_run_at_once_in_distinct_processes(supervisor, kq, redis_url, namespace):
    # A barrier of three: it only opens if the three "pool" jobs run at the same time.
    barrier = side_key(namespace, "barrier")
    jobs = [kq.create("pool", {"redis": redis_url, "key": barrier, "parties": 3}) for _ in range(3)]
    done = [wait_job(kq, job.id) for job in jobs]
    assert [job.state for job in done] == ["success"] * 3, [job.last_error for job in done]
    pool_pids = {supervisor.workers()[n].pid for n in handlers.worker_numbers("pool")}
    assert {job.result for job in done} == pool_pids


def test_barrier_of_more_than_concurrent_jobs_never_opens(supervisor, kq, redis_url, namespace):
    # The control for the test above: four parties with three workers cannot meet.
    barrier = side_key(namespace, "barrier")
    jobs = [kq.create("pool", {"redis": redis_url, "key": barrier, "parties": 4, "timeout": 0.5})
            for _ in range(3)]
    done = [wait_job(kq, job.id) for job in jobs]
    assert {job.state for job in done} == {"fail"}
    assert "barrier not reached" in done[0].last_error


def test_a_slow_job_type_does_not_starve_another_registration(supervisor, kq, redis_url, namespace):
    release = side_key(namespace, "release")
    slow = [kq.create("slow", {"redis": redis_url, "release": release}) for _ in range(3)]
    wait_job(kq, slow[0].id, "processing")
    fast = [kq.create("fast") for _ in range(5)]
    for job in fast:
        assert wait_job(kq, job.id).result == "fast done"
    # The slow registration's only worker is still busy with its first job; the rest wait.
    assert [kq.get(job.id).state for job in slow] == ["processing", "new", "new"]
    kq.redis.rpush(release, *["go"] * 3)
    assert [wait_job(kq, job.id).state for job in slow] == ["success"] * 3


def test_fifo_per_name_and_list_order_is_priority(supervisor, kq, redis_url, namespace):
    r = kq.redis
    release, started, order = (side_key(namespace, label) for label in ("release", "started", "order"))
    base = {"redis": redis_url, "order": order}
    # Hold the registration's only worker so the others pile up behind it.
    blocker = kq.create("prio.low", {**base, "seq": 0, "release": release, "started": started})
    wait_until(lambda: r.llen(started) == 1, message="blocker started")
    created = []
    for seq, name in enumerate(["prio.low", "prio.high", "prio.low", "prio.high", "prio.high",
                                "prio.low"], start=1):
        created.append(kq.create(name, {**base, "seq": seq}))
    r.rpush(release, "go")
    for job in [blocker, *created]:
        assert wait_job(kq, job.id).state == "success"
    assert r.lrange(order, 0, -1) == [
        "prio.low:0",  # already running
        "prio.high:2", "prio.high:4", "prio.high:5",  # the first name first, FIFO within it
        "prio.low:1", "prio.low:3", "prio.low:6",
    ]


def test_max_jobs_per_worker_replaces_the_worker(start_supervisor, kq):
    sup = start_supervisor(args=["--max-jobs-per-worker", "2"])
    jobs = kq.create_many([("pid",)] * 5)
    pids = [wait_job(kq, job.id).result for job in jobs]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids
    assert len(set(pids)) == 3
    # The pool is full again, with a fresh worker for "pid".
    sup.wait_ready(handlers.WORKERS)
    [number] = handlers.worker_numbers("pid")
    assert sup.workers()[number].pid not in pids[:4]


def test_max_memory_per_worker_replaces_the_worker(start_supervisor, kq):
    # Every Python worker is above 1 MiB RSS, so each one retires after a single job.
    start_supervisor(args=["--max-memory-per-worker", "1M"])
    pids = [wait_job(kq, kq.create("pid").id).result for _ in range(3)]
    assert len(set(pids)) == 3, pids


def test_workers_freeze_what_they_inherit_from_the_master(supervisor, kq):
    # What the master held at the fork is out of the worker's garbage collections: a full
    # collection would otherwise write into every inherited object and copy its page (about
    # 6 MiB per worker, measured in bench/README.md).
    frozen = wait_job(kq, kq.create("fast", {"report": "gc"}).id).result
    assert frozen > 10_000


def test_current_rss_reads_this_process_resident_size():
    import psutil

    from kickq_supervisor.osapi import current_rss
    before = current_rss()
    assert abs(before - psutil.Process().memory_info().rss) < 4 * 2**20
    block = bytearray(64 * 2**20)  # zero-filled: every page is touched
    assert current_rss() - before > 48 * 2**20
    del block


def test_release_free_heap_gives_freed_heap_back():
    # A child inherits every resident page of the master, free ones too: start-up leaves freed
    # blocks in the middle of the C heap (glibc keeps them resident), release_free_heap() (called
    # by the master before each fork) returns them to the system. Run in a fresh interpreter so
    # this test process' heap does not matter.
    import platform
    import subprocess
    import sys

    import pytest
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    code = (
        "from kickq_supervisor.osapi import current_rss, release_free_heap\n"
        "blocks = [bytes(4000) + bytes([i % 256]) for i in range(20000)]\n"  # C heap, not pymalloc
        "keep = blocks[-1]\n"  # the heap's top stays in use: only a trim can give the rest back
        "del blocks\n"
        "before = current_rss()\n"
        "release_free_heap()\n"
        "print(before - current_rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_TRIM_THRESHOLD_": str(2**30)})
    assert int(out.stdout) > 40 * 2**20, out.stdout
