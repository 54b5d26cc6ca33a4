"""The reaper with several supervisors on one namespace: nothing promoted twice; purging."""
from __future__ import annotations

import pytest

import kickq
from kickq.keys import Keys
from tests.helpers import side_key, wait_until
from tests.supervisor.conftest import wait_job


@pytest.mark.slow
def test_several_reapers_promote_each_job_once(start_supervisor, kq, redis_url, namespace):
    for _ in range(3):
        start_supervisor(args=["--reaper-interval", "0.05"])
    counts = side_key(namespace, "counts")
    data = {"redis": redis_url, "counts": counts}
    jobs = kq.create_many([("count", data, {"delay": 0.2 + (i % 10) * 0.03}) for i in range(150)])
    jobs += kq.create_many([("count", data, {"delay": 0})] * 50)
    done = [wait_job(kq, job.id, timeout=30) for job in jobs]
    assert {job.state for job in done} == {"success"}
    assert {len(job.runs) for job in done} == {1}
    assert kq.redis.hgetall(counts) == {job.id: "1" for job in jobs}


def test_finished_jobs_are_purged_after_purge_timeout(supervisor, kq):
    job = kq.create("pid", None, {"purge_timeout": 0.3})
    done = wait_job(kq, job.id)
    assert done.scheduled_for == done.finish_time + 300
    wait_until(lambda: kq.redis.zscore(Keys(supervisor.namespace).finished, job.id) is None, timeout=5.0,
               message="purged from the finished set")
    with pytest.raises(kickq.JobNotFound):
        kq.get(job.id)
    # A job with the default purge_timeout stays.
    kept = wait_job(kq, kq.create("pid").id)
    assert kq.get(kept.id).state == "success"
