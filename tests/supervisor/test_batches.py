"""A busy worker claims ahead in batches (--prefetch) and gives back a prefetched job that waited too
long behind a slow one: every job still runs exactly once."""
from __future__ import annotations

from kickq.keys import Keys
from tests.helpers import side_key, wait_until


def run_with_a_slow_job_in_the_middle(kq, redis_url, namespace):
    counts = side_key(namespace, "counts")
    items = [("count", {"redis": redis_url, "counts": counts}) for _ in range(60)]
    items.insert(40, ("count", {"redis": redis_url, "counts": counts, "sleep": 0.6}))
    jobs = kq.create_many(items)
    wait_until(lambda: all(kq.get(j.id).state == "success" for j in jobs), timeout=20, interval=0.05,
               message="every job done")
    executions = kq.redis.hgetall(counts)
    assert sorted(executions) == sorted(j.id for j in jobs) and set(executions.values()) == {"1"}
    keys = Keys(namespace)
    attempts = [int(kq.redis.hget(keys.job(j.id), "attempt")) for j in jobs]
    released = [e for e in kq.events(since="0", timeout=0.2) if e["event"] == "released"]
    return attempts, released


def test_prefetched_jobs_behind_a_slow_one_are_given_back_and_run_once(start_supervisor, kq, redis_url,
                                                                        namespace):
    start_supervisor()
    attempts, released = run_with_a_slow_job_in_the_middle(kq, redis_url, namespace)
    # claimed in the slow job's batch, they waited over 0.25 s: given back, claimed again
    assert released and max(attempts) == 2
    assert {e["id"] for e in released} == {str(i + 1) for i, a in enumerate(attempts) if a == 2}


def test_prefetch_1_claims_one_job_at_a_time(start_supervisor, kq, redis_url, namespace):
    start_supervisor(args=["--prefetch", "1"])
    attempts, released = run_with_a_slow_job_in_the_middle(kq, redis_url, namespace)
    assert released == [] and set(attempts) == {1}
