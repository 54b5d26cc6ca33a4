"""A supervisor whose registrations use two Redis servers runs a reaper for each: delayed jobs are
promoted and expired leases recovered on both."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import kickq
from kickq.keys import Keys
from kickq.scripts import Scripts
from tests.helpers import raw_client, redis_now, start_redis, stop_redis, wait_until
from tests.supervisor.conftest import wait_job

MODULE = '''
import kickq

def handler(job, data):
    return "done"

kickq.Kickq(redis_url={url_a!r}, redis_namespace={ns!r}).process(["a"], {{"concurrent_jobs": 1}}, handler)
kickq.Kickq(redis_url={url_b!r}, redis_namespace={ns!r}).process(["b"], {{"concurrent_jobs": 1}}, handler)
'''


@pytest.fixture
def second_redis(tmp_path: Path) -> Iterator[str]:
    proc, port = start_redis(tmp_path / "second-redis")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(proc)


def lost_run(client: kickq.Kickq, r: redis.Redis, ns: str) -> str:
    """A job claimed by a worker that vanished long ago: its lease has expired (nobody serves "lost")."""
    job = client.create("lost")
    claimed = Scripts(r).claim(Keys(ns), ["lost"], now=redis_now(r) - 3_600_000, claimer="gone")
    assert claimed is not None and claimed[0] == job.id
    return job.id


def test_every_redis_of_the_registrations_gets_its_own_reaper(start_supervisor, redis_url, second_redis,
                                                             namespace, tmp_path):
    module = tmp_path / "two_servers.py"
    module.write_text(MODULE.format(url_a=redis_url, url_b=second_redis, ns=namespace))
    sup = start_supervisor(module, url=None, ns=None, wait=False)
    wait_until(lambda: sup.proc.poll() is not None or len(sup.workers()) == 2, timeout=20,
               message="two workers")
    assert sup.proc.poll() is None, sup.log()[-3000:]
    clients = [kickq.Kickq(redis_url=url, redis_namespace=namespace) for url in (redis_url, second_redis)]
    raws = [raw_client(url, namespace) for url in (redis_url, second_redis)]
    try:
        delayed = [client.create(name, None, {"delay": 0.2})
                   for client, name in zip(clients, "ab", strict=True)]
        lost = [lost_run(client, r, namespace) for client, r in zip(clients, raws, strict=True)]
        for client, job in zip(clients, delayed, strict=True):
            assert wait_job(client, job.id, timeout=15).state == "success"  # promoted, then run
        for client, job_id in zip(clients, lost, strict=True):
            recovered = wait_job(client, job_id, states=("ghost", "fail"), timeout=15)
            assert "lease expired" in (recovered.last_error or "")
        assert len(sup.reapers()) == 2
        log = sup.log()
        assert f"for {namespace} on {redis_url}" in log and f"for {namespace} on {second_redis}" in log
    finally:
        for client in clients:
            client.close()
        for r in raws:
            r.close()
