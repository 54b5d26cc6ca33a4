"""Faults of Redis itself: restarts with and without the AOF (case 5), a 30 s freeze (case 6), and
maxmemory with noeviction (case 9). Real supervisors and producers on a private redis-server."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

import kickq
from kickq.keys import Keys
from tests.faults.harness import (
    Case,
    Producer,
    Monitor,
    cpu_seconds,
    handler_module,
    jobs_of,
    outcomes,
    purge_and_find_strays,
    sizes,
    supervisor_pids,
    wait_settled,
)
from tests.helpers import wait_until

AOF = ("--appendonly", "yes", "--appendfsync", "everysec")


# --- case 5 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", sizes(3.0, 6.0))
def test_case05a_redis_restart_with_aof_under_load(
    seconds, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    down = 2.0
    case = Case(
        "5a",
        "Redis SIGKILLed and restarted with AOF (appendfsync everysec) under load",
        f"300 creates/s for {seconds / 2:g}s, Redis down {down}s, {seconds / 2:g}s more; 2 workers",
    )
    rp = redis_procs(*AOF)
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["work"], 2)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=rp.url, ns=namespace)
    pids = supervisor_pids(sup)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace, redis_timeout=1)
    producer = Producer(
        kq, "work", rate=300, data={"ms": 2}, opts={"process_timeout": 5, "ghost_interval": 0}
    )
    with Monitor(rp.url, namespace, interval=0.5) as monitor:
        producer.start()
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started >= seconds / 2, timeout=seconds, interval=0.01)
        in_flight = r.zcard(Keys(namespace).processing)
        rp.kill()
        time.sleep(down)  # Redis stays down: the fault
        rp.restart()
        restarted = time.monotonic()
        acked_before_restart = set(producer.acked)
        wait_until(lambda: time.monotonic() - restarted >= seconds / 2, timeout=seconds, interval=0.01)
        producer.stop()
        after = [ref for ref in producer.acked if ref not in acked_before_restart]
        first_new = min(after, key=lambda ref: int(ref[1:]))
        wait_until(
            lambda: r.hget(Keys(namespace).job(producer.acked[first_new]), "state") == "success",
            timeout=30,
            interval=0.01,
            message="a job created after the restart completes",
        )
        resumed = time.monotonic() - restarted
        wait_settled(r, namespace, list(producer.acked.values()), timeout=60)
        settled = time.monotonic() - restarted
        monitor.check_now("final: ")
    out = outcomes(r, namespace, ledger, producer.acked, producer.failed)
    states = Counter(job.state for job in out.final.values() if job)
    log = sup.log()
    alive_now = supervisor_pids(sup)
    strays = purge_and_find_strays(r, namespace, ["work"])
    case.note(out.line())
    case.note(
        f"in flight at the kill: {in_flight}; producer errors {dict(producer.errors)}; final states "
        f"{dict(states)}; first new job done {resumed:.2f}s and everything {settled:.2f}s after the "
        f"restart; {monitor.checker.snapshots} snapshots ({monitor.skipped} skipped while down)"
    )
    case.check(
        "no acknowledged job lost (lost = 0, stranded = 0), every one succeeds",
        not out.lost and not out.stranded and states == {"success": len(producer.acked)},
        f"{len(out.lost)}, {len(out.stranded)}, {dict(states)}",
    )
    case.check(
        "unexpected = 0; an indeterminate create runs at most once",
        not out.unexpected and not any(ref in out.duplicated for ref in producer.failed),
        f"{len(out.unexpected)}, {out.indeterminate_executed} of {len(producer.failed)} ran",
    )
    case.check(
        "duplicated executions <= jobs in flight at the kill",
        out.extra <= max(in_flight, 2),
        f"{out.extra} <= {max(in_flight, 2)}",
    )
    case.check(
        "scripts reloaded by themselves: no NOSCRIPT or missing-function error anywhere, no job failed",
        "NOSCRIPT" not in log and "Function not found" not in log and not states.get("fail"),
    )
    case.check(
        "work resumes by itself: a new job completes within 5 s of the restart, the backlog within 15 s",
        resumed <= 5 and settled <= 15,
        f"{resumed:.2f}s, {settled:.2f}s",
    )
    case.check(
        "no supervisor process exited or was replaced", alive_now == pids, f"{len(pids - alive_now)} gone"
    )
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.check("no stray keys after purge", not strays, strays)
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case05b_redis_restart_without_persistence(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    case = Case(
        "5b",
        "Redis SIGKILLed and restarted without persistence (data lost)",
        "2 workers busy + 1 long job in flight; 50 new jobs after the restart",
    )
    rp = redis_procs()
    r = rp.client()
    keys = Keys(namespace)
    module = handler_module(tmp_path, ledger.path, [(["work"], 2), (["long"], 1)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=3, url=rp.url, ns=namespace)
    pids = supervisor_pids(sup)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace, redis_timeout=1)
    producer = Producer(kq, "work", rate=300, prefix="before", data={"ms": 5})
    release = tmp_path / "release"
    with Monitor(rp.url, namespace, interval=0.3) as monitor:
        producer.start()
        wait_until(lambda: len(producer.acked) >= 300, timeout=20, interval=0.01)
        producer.stop()  # ids start again from 1 after the loss: keep the old ones out of that range
        long = kq.create(
            "long", {"ref": "long", "do": "wait_file", "release": str(release)}, {"process_timeout": 60}
        )
        wait_until(
            lambda: any(e.ref == "long" for e in ledger.read()), timeout=10, message="long job running"
        )
        in_flight = {
            job_id: r.hget(keys.job(job_id), "attempt") for job_id in r.zrange(keys.processing, 0, -1)
        }
        monitor.pause()
        rp.kill()
        time.sleep(1.0)  # Redis stays down: the fault
        rp.restart()  # no AOF: an empty server
        restarted = time.monotonic()
        monitor.resume(forget=True)  # ids start again: earlier observations no longer apply
        reported = (
            wait_until(
                lambda: "lost the data of namespace" in sup.log(),
                timeout=10,
                interval=0.02,
                message="the data loss is reported",
            )
            and time.monotonic() - restarted
        )
        new = kq.create_many([("work", {"ref": f"after{i}", "ms": 5}) for i in range(50)])
        release.touch()  # the long job, still running from before the loss, now ends
        late = f"finish of job {long.id} (token 1:{long.create_time}) rejected (missing, job is gone)"
        wait_until(lambda: late in sup.log(), timeout=10, message="the late finish is rejected")
        wait_settled(r, namespace, [job.id for job in new], timeout=30)
        resumed = time.monotonic() - restarted
        monitor.check_now("final: ")
    new_jobs = jobs_of(r, namespace, [job.id for job in new])
    now_there = jobs_of(r, namespace, list(producer.acked.values()))
    survived = sum(
        1
        for ref, job_id in producer.acked.items()
        if now_there[job_id] and (now_there[job_id].data or {}).get("ref") == ref
    )
    leftovers = [
        job_id for job_id in [long.id, *in_flight] if r.exists(keys.job(job_id)) and int(job_id) > len(new)
    ]
    log = sup.log()
    strays = purge_and_find_strays(r, namespace, ["work", "long"])
    case.note(
        f"acknowledged before the loss: {len(producer.acked)} "
        f"({len(producer.acked) - survived} gone with the data); "
        f"in flight at the loss: {len(in_flight)}; reported {reported:.2f}s after the restart; "
        f"{len(new)} new jobs done {resumed:.2f}s after the restart"
    )
    case.check(
        "the data loss is detected and reported (supervisor log, ERROR) within 5 s of the restart",
        reported <= 5,
        f"{reported:.2f}s",
    )
    case.check(
        "late finishes of runs from before the loss are rejected ('missing') and write nothing",
        late in log and not leftovers,
        leftovers,
    )
    case.check(
        "nothing half-written afterwards: invariants hold in every snapshot after the restart",
        not monitor.found,
        monitor.found[:5],
    )
    case.check(
        "work resumes by itself: the 50 new jobs succeed",
        all(job and job.state == "success" for job in new_jobs.values()),
        Counter(job.state if job else None for job in new_jobs.values()),
    )
    case.check("no supervisor process exited or was replaced", supervisor_pids(sup) == pids)
    case.check("no stray keys after purge", not strays, strays)
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case05c_a_late_finish_from_before_a_data_loss_is_not_taken_for_a_new_job(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    case = Case("5c", "late finish across a data loss, onto a job that reused the id")
    rp = redis_procs()
    module = handler_module(tmp_path, ledger.path, [(["reuse"], 2)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=rp.url, ns=namespace)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    old_release, new_release = tmp_path / "old", tmp_path / "new"
    old = kq.create(
        "reuse", {"ref": "old", "do": "wait_file", "release": str(old_release)}, {"process_timeout": 60}
    )
    wait_until(lambda: any(e.ref == "old" for e in ledger.read()), timeout=10, message="old job running")
    rp.kill()
    rp.restart()  # no AOF: an empty server
    new = kq.create(
        "reuse", {"ref": "new", "do": "wait_file", "release": str(new_release)}, {"process_timeout": 60}
    )
    executions = wait_until(
        lambda: {e.ref: e for e in ledger.read()} if any(e.ref == "new" for e in ledger.read()) else None,
        timeout=15,
        message="the new job running",
    )
    old_release.touch()  # the run from before the loss finishes now
    rejected = f"finish of job {old.id} (token 1:{old.create_time}) rejected"
    wait_until(
        lambda: rejected in sup.log() or kq.get(new.id).state != "processing",
        timeout=10,
        interval=0.02,
        message="the old run's finish was processed",
    )
    during = kq.get(new.id)
    new_release.touch()
    done = wait_until(lambda: (job := kq.get(new.id)).state in ("success", "fail") and job, timeout=15)
    case.note(
        f"old job id {old.id}, new job id {new.id}; while the new run was still going the new job was "
        f"{during.state} with result {during.result}"
    )
    case.check("the new job reused the old id (the premise)", old.id == new.id)
    case.check(
        "the old run's late finish is rejected: the new job is still processing until its own run ends",
        during.state == "processing",
        f"{during.state} {during.result}",
    )
    case.check(
        "the new job's outcome comes from its own run",
        done.state == "success" and done.result["pid"] == executions["new"].pid,
        f"result {done.result}, new run by pid {executions['new'].pid}, old run by pid "
        f"{executions['old'].pid}",
    )
    case.done()


# --- case 6 ---------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples the namespace's success count (kept by the scripts in `counts`) every 0.1 s."""

    def __init__(self, url: str, ns: str, name: str) -> None:
        super().__init__(name="sampler", daemon=True)
        self.client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        self.key, self.field = Keys(ns).counts, f"success:{name}"
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            try:
                self.samples.append((time.monotonic(), int(self.client.hget(self.key, self.field) or 0)))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.client.close()

    def count_at(self, t: float) -> int:
        """The last count sampled at or before `t`."""
        return max((c for at, c in self.samples if at <= t), default=0)

    def rate(self, start: float, end: float) -> float:
        return (self.count_at(end) - self.count_at(start)) / (end - start)


@pytest.mark.parametrize("frozen_for", sizes(7.0, 30.0))
def test_case06_redis_frozen(frozen_for, redis_procs, ledger, start_supervisor, namespace, tmp_path):
    timeout = 5  # redis_timeout: the documented bound of a producer call
    case = Case(
        "6",
        f"Redis frozen (SIGSTOP) for {frozen_for:g} s, then SIGCONT",
        f"50 creates/s, 2 workers, redis_timeout {timeout}s, process_timeout 5 s",
    )
    rp = redis_procs()
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["work"], 2)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=rp.url, ns=namespace)
    procs = [sup.master(), *sup.children()]
    pids = supervisor_pids(sup)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace, redis_timeout=timeout)
    producer = Producer(kq, "work", rate=50, data={"ms": 5}, opts={"process_timeout": 5, "ghost_interval": 0})
    sampler = Sampler(rp.url, namespace, "work")
    with Monitor(rp.url, namespace, interval=0.5) as monitor:
        sampler.start()
        producer.start()
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started >= 2.5, timeout=10, interval=0.01)
        in_flight = r.zcard(Keys(namespace).processing)
        cpu_before = cpu_seconds(procs)
        rp.freeze()
        frozen = time.monotonic()
        time.sleep(frozen_for)  # Redis frozen: the fault
        busy = (cpu_seconds(procs) - cpu_before) / (time.monotonic() - frozen)
        rp.thaw()
        thawed = time.monotonic()
        wait_until(lambda: time.monotonic() - thawed >= 6.5, timeout=20, interval=0.01)
        producer.stop()
        sampler.stop()
        wait_settled(r, namespace, list(producer.acked.values()), timeout=60)
        monitor.check_now("final: ")
    out = outcomes(r, namespace, ledger, producer.acked, producer.failed)
    before_rate = sampler.rate(frozen - 2, frozen)
    # throughput is back at the end of the first 1 s window after SIGCONT with >= half the old rate
    recovered_at = next(
        (
            end
            for end in (thawed + 0.1 * i for i in range(10, 60))
            if sampler.rate(end - 1, end) >= before_rate / 2
        ),
        None,
    )
    during = [(took, ok) for at, took, ok in producer.calls if frozen <= at and at + took <= thawed]
    straddling = [(took, ok) for at, took, ok in producer.calls if at < thawed < at + took]
    slowest = max((took for took, _ in during + straddling), default=0.0)
    alive_now = supervisor_pids(sup)
    case.note(out.line())
    case.note(
        f"in flight at the freeze: {in_flight}; producer calls during the freeze: {len(during)} "
        f"(acknowledged {sum(ok for _, ok in during)}), slowest {slowest:.2f}s; supervisor CPU during "
        f"the freeze {busy:.1%} of a core; {before_rate:.0f} jobs/s before, back to >= half "
        f"{(recovered_at - thawed) if recovered_at else float('nan'):.2f}s after SIGCONT"
    )
    case.check(
        "no supervisor process died or was replaced", alive_now == pids and all(p.is_running() for p in procs)
    )
    case.check(
        "nothing spins while Redis is frozen: supervisor processes use < 5 % of a core",
        busy < 0.05,
        f"{busy:.1%}",
    )
    case.check(
        f"every producer call during the freeze fails with RedisUnavailable within redis_timeout + 1 s "
        f"({timeout + 1}s); none hangs",
        during
        and not any(ok for _, ok in during)
        and set(producer.errors) == {"RedisUnavailable"}
        and slowest <= timeout + 1,
        f"{len(during)} calls, errors {dict(producer.errors)}, slowest {slowest:.2f}s",
    )
    case.check(
        "throughput recovers within 5 s of SIGCONT",
        recovered_at is not None and recovered_at - thawed <= 5,
        f"{(recovered_at - thawed) if recovered_at else None}",
    )
    case.check(
        "lost = 0, stranded = 0, unexpected = 0",
        not (out.lost or out.stranded or out.unexpected),
        f"{len(out.lost)}, {len(out.stranded)}, {len(out.unexpected)}",
    )
    case.check(
        "an indeterminate create (its reply lost in the freeze) runs at most once",
        not any(ref in out.duplicated for ref in producer.failed),
        f"{out.indeterminate_executed} of {len(producer.failed)} ran",
    )
    case.check(
        "duplicated executions <= jobs in flight at the freeze",
        out.extra <= max(in_flight, 2),
        f"{out.extra} <= {max(in_flight, 2)}",
    )
    case.check(
        "stale completions are fenced: invariants hold in every snapshot",
        not monitor.found,
        monitor.found[:5],
    )
    case.done()


# --- case 9 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case09_redis_at_maxmemory(size, redis_procs, ledger, start_supervisor, namespace, tmp_path):
    case = Case(
        "9", "Redis at maxmemory (noeviction)", "8 MB; 1 KB jobs until refused; 2 workers holding jobs"
    )
    rp = redis_procs("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    r = rp.client()
    keys = Keys(namespace)
    module = handler_module(tmp_path, ledger.path, [(["hold"], 2)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=rp.url, ns=namespace)
    pids = supervisor_pids(sup)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    release = tmp_path / "release"
    with Monitor(rp.url, namespace, interval=0.5) as monitor:
        held = kq.create_many(
            [("hold", {"ref": f"h{i}", "do": "wait_file", "release": str(release)}) for i in range(6)]
        )
        wait_until(lambda: ledger.count() == 2, timeout=10, message="two jobs held by the workers")
        fillers = []
        refused = None
        for batch in (200, 1):  # fill fast, then one by one up to the limit
            while True:
                try:
                    fillers += kq.create_many([("fill", "x" * 1000)] * batch)
                except Exception as exc:  # noqa: BLE001 - what it is, is the point
                    refused = exc
                    break
        ids_before = r.get(keys.id)
        try:
            kq.create_many([("fill", "y" * 1000)] * 50)
            batch_refused = None
        except Exception as exc:  # noqa: BLE001
            batch_refused = exc
        ids_after = r.get(keys.id)
        nothing_written = ids_after == ids_before
        used, limit = int(r.info("memory")["used_memory"]), int(r.config_get("maxmemory")["maxmemory"])
        release.touch()  # the held jobs end, and the waiting ones are claimed and run, at maxmemory
        wait_settled(r, namespace, [job.id for job in held], timeout=20, idle=False)
        held_states = Counter(kq.get(job.id).state for job in held)
        for job in fillers[: len(fillers) // 3]:
            kq.delete(job.id)
        after = kq.create("fill", "z" * 1000)
        monitor.check_now("final: ")
    case.note(
        f"{len(fillers)} filler jobs created before the refusal; used_memory {used} of {limit}; "
        f"refusal: {type(refused).__name__}: {refused}"
    )
    case.check(
        "a clear error on create: kickq.KickqError saying out of memory (not a raw redis-py error)",
        type(refused) is kickq.KickqError and "out of memory" in str(refused),
        f"{type(refused).__module__}.{type(refused).__name__}",
    )
    case.check(
        "a batch at maxmemory is refused whole: the same error, no job written",
        type(batch_refused) is kickq.KickqError and nothing_written,
        f"{type(batch_refused).__name__}, id counter {ids_before} -> {ids_after}",
    )
    case.check("no half-made jobs: invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.check(
        "workers keep finishing and claiming at maxmemory: all 6 held jobs succeed",
        held_states == {"success": 6},
        dict(held_states),
    )
    case.check("create works again once memory is freed, without a restart", after.state == "new")
    case.check("no supervisor process died or was replaced at maxmemory", supervisor_pids(sup) == pids)
    case.done()
