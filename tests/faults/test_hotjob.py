"""Case 8: hotjob races. Completion before the wait starts, a waiter across Redis restarts (with and
without persistence), a job deleted or purged while waited on, and the precision of hotjob_timeout.
Jobs are run by in-process workers (the claim and finish scripts), so each race can be placed exactly."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

import kickq
from kickq.keys import Keys
from kickq.scripts import Scripts, finish_args, sweep_args
from tests.faults.harness import Case, handler_module, sizes

AOF = ("--appendonly", "yes", "--appendfsync", "everysec")


def complete(url: str, ns: str, name: str, result: object, timeout: float = 10.0) -> str:
    """Claim the next job of `name` and finish it with `result`, retrying while Redis comes back."""
    keys = Keys(ns)
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2)
            scr = Scripts(r)
            job_id, token, _ = scr.claim(keys, [name])
            status, _, _ = scr.finish(keys, job_id, token, "success", json.dumps(result))
            assert status == "ok"
            r.close()
            return job_id
        except (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
        ):
            assert time.monotonic() < deadline, "Redis did not come back"
            time.sleep(0.01)  # retry pace while Redis starts


def outcome(future, timeout: float):
    """('result', value) / ('error', exception type name), and when it settled (monotonic)."""
    try:
        return ("result", future.result(timeout=timeout).result), time.monotonic()
    except Exception as exc:  # noqa: BLE001
        return ("error", type(exc).__name__), time.monotonic()


HOT = {"hotjob": True, "hotjob_timeout": 20}


@pytest.mark.parametrize("jobs", sizes(600, 3_000))
def test_case08a_completion_before_the_wait_starts(
    jobs, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    case = Case(
        "8a",
        "hotjob: completion racing the create (before anyone waits)",
        f"{jobs} hotjobs: a third created one by one in each of 2 threads, a third in batches of 50 "
        "(create_many); a supervisor's 2 workers return at once",
    )
    rp = redis_procs()
    module = handler_module(tmp_path, ledger.path, [(["hot"], 2)])
    start_supervisor(module, workers=2, url=rp.url, ns=namespace)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    third = jobs // 3
    created: dict[int, object] = {}
    early = [0]

    def one_by_one(refs):
        for ref in refs:
            job = kq.create("hot", {"ref": ref, "do": "echo"}, HOT)
            early[0] += job.hotjob_promise.done()
            created[ref] = job

    started = time.monotonic()
    threads = [threading.Thread(target=one_by_one, args=(range(k * third, (k + 1) * third),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for start in range(2 * third, jobs, 50):
        batch = kq.create_many(
            [("hot", {"ref": ref, "do": "echo"}, HOT) for ref in range(start, min(start + 50, jobs))]
        )
        for job in batch:
            early[0] += job.hotjob_promise.done()
            created[int(job.data["ref"])] = job
    for t in threads:
        t.join()
    results = {ref: outcome(job.hotjob_promise, 20)[0] for ref, job in created.items()}
    took = time.monotonic() - started
    wrong = [(ref, res) for ref, res in results.items() if res != ("result", ref)]
    case.note(
        f"{early[0]} of {jobs} were already settled when their create returned (completion first); "
        f"all resolved in {took:.2f}s"
    )
    case.check(
        f"all {jobs} waiters resolve with their own job's result: 0 timeouts, 0 wrong results",
        len(results) == jobs and not wrong,
        wrong[:5],
    )
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case08b_waiter_across_a_redis_restart(size, redis_procs, namespace):
    case = Case(
        "8b",
        "hotjob: waiter across a Redis restart (AOF)",
        "job 1 completed right after the restart (its message is likely sent before the waiter "
        "resubscribed), job 2 completed later",
    )
    rp = redis_procs(*AOF)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    first = kq.create("hot", {"ref": 1}, HOT)
    second = kq.create("hot", {"ref": 2}, HOT)
    rp.kill()
    time.sleep(1.0)  # Redis stays down: the fault
    rp.restart()
    complete(rp.url, namespace, "hot", "one")
    completed_first = time.monotonic()
    (res1, at1) = outcome(first.hotjob_promise, 20)
    complete(rp.url, namespace, "hot", "two")
    completed_second = time.monotonic()
    (res2, at2) = outcome(second.hotjob_promise, 20)
    case.note(
        f"job 1 resolved {at1 - completed_first:.3f}s after its completion, "
        f"job 2 {at2 - completed_second:.3f}s"
    )
    case.check(
        "job 1's waiter gets the right result within 5 s of the completion",
        res1 == ("result", "one") and at1 - completed_first <= 5,
        res1,
    )
    case.check(
        "job 2's waiter gets the right result within 1 s of the completion",
        res2 == ("result", "two") and at2 - completed_second <= 1,
        res2,
    )
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case08c_job_deleted_or_purged_while_waited_on(size, redis_procs, namespace):
    case = Case("8c", "hotjob: the job deleted, or completed and purged unheard, while waited on")
    rp = redis_procs()
    r = rp.client()
    keys, scr = Keys(namespace), Scripts(r)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    deleted = kq.create("hot", {"ref": "deleted"}, HOT)
    kq.delete(deleted.id)
    gone = time.monotonic()
    res_deleted, at_deleted = outcome(deleted.hotjob_promise, 20)

    purged = kq.create("hot", {"ref": "purged"}, HOT)
    job_id, token, _ = scr.claim(keys, ["hot"])
    seconds, _ = r.time()
    far = (int(seconds) + 86400 * 365) * 1000
    # In one transaction: cut the waiter's subscription, complete the job (the message goes nowhere),
    # and purge it, so that when the waiter resubscribes there is nothing left to read.
    pipe = r.pipeline(transaction=True)
    pipe.client_kill_filter(_type="pubsub")
    scr.run("finish", finish_args(keys, job_id, token, "success", '"unheard"'), client=pipe)
    scr.run("purge", sweep_args(keys, 100, far), client=pipe)
    killed, (status, _, _), (count, _) = pipe.execute()
    purged_at = time.monotonic()
    res_purged, at_purged = outcome(purged.hotjob_promise, 20)
    case.note(
        f"deleted: {res_deleted} after {at_deleted - gone:.3f}s; completed and purged unheard "
        f"({killed} subscriber cut, finish {status}, {count} purged): {res_purged} after "
        f"{at_purged - purged_at:.3f}s"
    )
    case.check(
        "a deleted job's waiter gets JobNotFound within 1 s",
        res_deleted == ("error", "JobNotFound") and at_deleted - gone <= 1,
        res_deleted,
    )
    case.check(
        "a job completed and purged while the waiter was cut off: JobNotFound within 3 s of its "
        "resubscription (not a HotjobTimeout after 20 s)",
        killed == 1 and res_purged == ("error", "JobNotFound") and at_purged - purged_at <= 3,
        res_purged,
    )
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case08d_timeout_precision(size, redis_procs, namespace):
    case = Case(
        "8d", "hotjob: timeout precision", "20 waiters with hotjob_timeout 0.5-1.0 s; nobody runs the jobs"
    )
    rp = redis_procs()
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    timeouts = [0.5 + i * 0.025 for i in range(20)]
    jobs, started = [], []
    for i, t in enumerate(timeouts):
        started.append(time.monotonic())
        jobs.append(kq.create("slow", {"ref": i}, {"hotjob": True, "hotjob_timeout": t}))
    late = []
    for job, t, began in zip(jobs, timeouts, started, strict=True):
        res, at = outcome(job.hotjob_promise, 10)
        late.append((res, at - began - t))
    job_id = complete(rp.url, namespace, "slow", "done anyway")
    final = kq.get(job_id)
    worst = max(x for _, x in late)
    earliest = min(x for _, x in late)
    case.note(f"raised between {earliest * 1000:.0f} and {worst * 1000:.0f} ms after hotjob_timeout")
    case.check(
        "every waiter raises HotjobTimeout between its timeout and 0.3 s after it",
        all(res == ("error", "HotjobTimeout") and 0 <= x <= 0.3 for res, x in late),
        f"{earliest:.3f}..{worst:.3f}s",
    )
    case.check(
        "the job itself is unaffected: it still succeeds afterwards",
        final.state == "success" and final.result == "done anyway",
    )
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case08e_waiter_across_a_restart_without_persistence(size, redis_procs, namespace):
    case = Case("8e", "hotjob: waiter across a Redis restart without persistence (the job is lost)")
    rp = redis_procs()
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    job = kq.create("hot", {"ref": "lost"}, HOT)
    rp.kill()
    time.sleep(1.0)  # Redis stays down: the fault
    rp.restart()
    restarted = time.monotonic()
    res, at = outcome(job.hotjob_promise, 30)
    case.note(f"{res} {at - restarted:.3f}s after the restart")
    case.check(
        "the waiter learns the job is gone (JobNotFound) within 5 s of the restart, not at its 20 s timeout",
        res == ("error", "JobNotFound") and at - restarted <= 5,
        res,
    )
    case.done()
