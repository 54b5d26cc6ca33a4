"""An idle supervisor's workers are registered for hand-offs: a create claims its job for one of
them (the job is processing when create returns), and a worker that is gone is never handed one."""
from __future__ import annotations

import signal

from kickq.keys import Keys
from tests.helpers import wait_until
from tests.supervisor.handlers import worker_numbers


def registered(kq, keys, name):
    return set(kq.redis.zrange(keys.idle(name), 0, -1))


def test_a_job_for_an_idle_worker_is_claimed_by_its_create(start_supervisor, kq, namespace):
    start_supervisor()
    keys = Keys(namespace)
    for _ in range(10):
        wait_until(lambda: len(registered(kq, keys, "fast")) == 1, timeout=10, interval=0.01,
                   message="the idle worker registered")
        job = kq.create("fast", None)
        # without the hand-off no worker could have claimed it yet: create returns first
        assert kq.get(job.id).state in ("processing", "success")
        done = wait_until(lambda job_id=job.id: (got := kq.get(job_id)).state == "success" and got,
                          timeout=10, interval=0.01)
        assert done.result == "fast done"


def test_a_worker_that_is_gone_is_not_handed_jobs(start_supervisor, kq, namespace):
    sup = start_supervisor()
    keys = Keys(namespace)
    wait_until(lambda: len(registered(kq, keys, "pid")) == 1, timeout=10, interval=0.01)
    before = registered(kq, keys, "pid")
    [number] = worker_numbers("pid")
    sup.workers()[number].send_signal(signal.SIGKILL)
    # the master's abandon ends the dead worker's registration; its replacement registers anew
    wait_until(lambda: (got := registered(kq, keys, "pid")) and not got & before, timeout=10,
               interval=0.01, message="only the replacement registered")
    job = kq.create("pid", None)
    wait_until(lambda: kq.get(job.id).state == "success", timeout=10, interval=0.01)
    assert kq.get(job.id).result == sup.workers()[number].pid
    # a supervisor that stops leaves no registration and no inbox behind
    sup.send(signal.SIGTERM)
    assert sup.wait_exit(20) == 0
    assert kq.redis.zcard(keys.idle("pid")) == 0
    assert not list(kq.redis.scan_iter(match=keys.prefix + "inbox:*"))
    late = kq.create("pid", None)
    assert kq.get(late.id).state == "new"
