"""Faults of whole supervisors: SIGKILL of a supervisor while another runs (case 2), and a stale owner
frozen past its lease (case 4). Real kickq-supervisor processes on a private redis-server."""

from __future__ import annotations

import os
import signal
import time

import pytest

import kickq
from kickq.keys import Keys
from tests.faults.harness import (
    Case,
    Monitor,
    handler_module,
    outcomes,
    purge_and_find_strays,
    sizes,
    wait_settled,
)
from tests.faults.test_workers import busy_workers
from tests.helpers import wait_until
from tests.supervisor.conftest import reap_orphans, session_processes

LEASE_GRACE = 1.0  # kickq.scripts.LEASE_GRACE_MS


def redis_ms(r) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


# --- case 2 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds", sizes(2, 5))
def test_case02_whole_supervisor_sigkill_while_another_runs(
    rounds, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    timeout = 1.0
    per_supervisor = 2
    case = Case(
        "2",
        "whole-supervisor SIGKILL while a second supervisor runs",
        f"{rounds} kills of supervisor A ({per_supervisor} workers), B keeps running; "
        f"process_timeout {timeout}s",
    )
    rp = redis_procs()
    r = rp.client()
    keys = Keys(namespace)
    module = handler_module(tmp_path, ledger.path, [(["work"], per_supervisor)])
    args = ["--reaper-interval", "0.2"]
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    opts = {"process_timeout": timeout, "ghost_interval": 0, "ghost_count": 5}
    acked: dict[str, str] = {}

    def top_up() -> None:
        if r.llen(keys.queue("work")) < 300:
            refs = [f"j{len(acked) + i}" for i in range(600)]
            jobs = kq.create_many([("work", {"ref": ref, "ms": 10}, opts) for ref in refs])
            acked.update({ref: job.id for ref, job in zip(refs, jobs, strict=True)})

    top_up()
    start_supervisor(module, args=args, workers=per_supervisor, url=rp.url, ns=namespace, wait=False)
    recoveries, orphan_counts, gone_after = [], [], []
    with Monitor(rp.url, namespace, interval=1.0) as monitor:
        for _ in range(rounds):
            top_up()
            a = start_supervisor(module, args=args, url=rp.url, ns=namespace, wait=False)
            wait_until(
                lambda a=a: len(busy_workers(a)) == per_supervisor,
                timeout=20,
                interval=0.02,
                message="supervisor A's workers are running jobs",
            )
            os.kill(a.pid, signal.SIGKILL)  # `kill -9` of the supervisor: its children must follow it
            killed, killed_ms = time.monotonic(), redis_ms(r)
            a.proc.wait(timeout=5)

            def a_gone(a=a) -> bool:
                reap_orphans(a.pid, keep=a.pid)
                return not session_processes(a.pid)

            wait_until(a_gone, timeout=5, interval=0.005, message="supervisor A's processes are gone")
            gone_after.append(time.monotonic() - killed)
            # Jobs claimed before the kill and still processing now are A's: B's take 10 ms.
            wait_until(lambda killed=killed: time.monotonic() - killed >= 0.3, timeout=1, interval=0.01)
            cutoff = killed_ms + (timeout + LEASE_GRACE) * 1000
            orphans = {
                job_id: r.hget(keys.job(job_id), "attempt")
                for job_id, lease in r.zrange(keys.processing, 0, -1, withscores=True)
                if lease <= cutoff
            }
            orphan_counts.append(len(orphans))

            def recovered(orphans=orphans) -> bool:
                pipe = r.pipeline(transaction=False)
                for job_id in orphans:
                    pipe.hmget(keys.job(job_id), "state", "attempt")
                return all(
                    not (state == "processing" and attempt == orphans[job_id])
                    for job_id, (state, attempt) in zip(orphans, pipe.execute(), strict=True)
                )

            wait_until(recovered, timeout=timeout + 10, interval=0.01, message="A's jobs recovered")
            recoveries.append(time.monotonic() - killed)
        settle = wait_settled(r, namespace, list(acked.values()), timeout=120)
        monitor.check_now("final: ")
    out = outcomes(r, namespace, ledger, acked)
    errors = {run["error"] for job in out.final.values() for run in job.runs if run["state"] == "ghost"}
    strays = purge_and_find_strays(r, namespace, ["work"])
    kills = rounds
    bound = timeout + 2.0
    case.note(out.line())
    case.note(
        f"orphans per kill {orphan_counts}; recovered after {[round(x, 2) for x in recoveries]} s; "
        f"A's processes gone after {[round(x, 3) for x in gone_after]} s; ghost errors {sorted(errors)}; "
        f"settled {settle:.1f}s after the last kill"
    )
    case.check(
        "lost = 0, stranded = 0, unexpected = 0",
        not (out.lost or out.stranded or out.unexpected),
        f"{len(out.lost)}, {len(out.stranded)}, {len(out.unexpected)}",
    )
    case.check("every job succeeds", all(job.state == "success" for job in out.final.values()))
    case.check(
        f"A's in-flight jobs recovered within process_timeout + 2 s ({bound}s) of each kill",
        max(recoveries) <= bound and sum(orphan_counts) > 0,
        f"max {max(recoveries):.2f}s, {sum(orphan_counts)} jobs",
    )
    case.check(
        "no orphaned child process: all of A's processes gone within 1 s of each kill",
        max(gone_after) <= 1.0,
        f"max {max(gone_after):.3f}s",
    )
    case.check(
        f"duplicated executions <= kills x workers per supervisor ({kills * per_supervisor})",
        out.extra <= kills * per_supervisor,
        out.extra,
    )
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.check("no stray keys after purge", not strays, strays)
    case.done()


# --- case 4 ---------------------------------------------------------------------------------------------


def freeze(sup, sig) -> list[int]:
    """SIGSTOP / SIGCONT every process of a supervisor's session (a paused host or VM)."""
    pids = [p.pid for p in session_processes(sup.pid)]
    for pid in pids:
        os.kill(pid, sig)
    return pids


@pytest.mark.parametrize("reps", sizes(1, 3))
def test_case04_stale_owner_frozen_past_its_lease(
    reps, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    timeout = 1.0
    case = Case(
        "4",
        "stale owner: supervisor A frozen (SIGSTOP) past its lease, resumed after B re-ran its jobs",
        f"{reps} repetition(s) x 2 jobs, process_timeout {timeout}s, lease {timeout + LEASE_GRACE}s",
    )
    rp = redis_procs()
    r = rp.client()
    keys = Keys(namespace)
    module = handler_module(tmp_path, ledger.path, [(["stale"], 2)])
    args = ["--reaper-interval", "0.2"]
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    with Monitor(rp.url, namespace, interval=0.3) as monitor:
        for rep in range(reps):
            a = start_supervisor(module, args=args, workers=2, url=rp.url, ns=namespace)
            release = tmp_path / f"release-{rep}"
            jobs = kq.create_many(
                [
                    (
                        "stale",
                        {"ref": f"x{rep}-{i}", "do": "first_waits", "release": str(release)},
                        {"process_timeout": timeout, "ghost_interval": 0},
                    )
                    for i in range(2)
                ]
            )
            a_workers = {p.pid for p in a.workers().values()}
            wait_until(
                lambda rep=rep, a_workers=a_workers: (
                    {e.pid for e in ledger.read() if e.ref.startswith(f"x{rep}-")} == a_workers
                ),
                timeout=10,
                message="both jobs running on A",
            )
            frozen = freeze(a, signal.SIGSTOP)
            b = start_supervisor(module, args=args, workers=2, url=rp.url, ns=namespace)
            done = [
                wait_until(
                    lambda j=j: (job := kq.get(j.id)).state == "success" and job,
                    timeout=15,
                    interval=0.02,
                    message=f"job {j.id} re-run by B",
                )
                for j in jobs
            ]
            release.touch()  # attempt 1 may now return, as soon as it runs again
            workers = [pid for pid in frozen if pid in a_workers]
            for pid in workers:  # the workers first: their finish must reach Redis before A's master runs
                os.kill(pid, signal.SIGCONT)
            rejected = [f"finish of job {j.id} (token 1:{j.create_time}) rejected (stale, job is success)"
                        for j in jobs]
            wait_until(
                lambda a=a, rejected=rejected: all(line in a.log() for line in rejected),
                timeout=10,
                message="A's late finishes are rejected",
            )
            b_workers = {p.pid for p in b.workers().values()}
            b.send(signal.SIGTERM)  # B's part is done; from now on only A can run jobs
            assert b.wait_exit(timeout=10) == 0
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            # A probe job, run by A after it resumed: once it is done, A's master has read everything
            # its workers told it during the freeze (and acted on it).
            probe = kq.create("stale", {"ref": f"probe{rep}"})
            wait_until(
                lambda probe=probe: kq.get(probe.id).state == "success", timeout=10, message="A runs new jobs"
            )
            after = [kq.get(j.id) for j in jobs]
            stream = r.xrange(keys.events, "-", "+")
            outcomes_per_job = {
                j.id: sum(1 for _, f in stream if f["id"] == j.id and f["event"] in ("success", "fail"))
                for j in jobs
            }
            for j, d, x in zip(jobs, done, after, strict=True):
                execs = [e for e in ledger.read() if e.ref == d.data["ref"]]
                runs = [(run["state"], (run["error"] or "")[:13], run["time"]) for run in d.runs]
                who = [(e.attempt, "A" if e.pid in a_workers else "B") for e in execs]
                case.note(f"rep {rep} job {j.id}: runs {runs}, executions (attempt, by) {who}")
                case.check(
                    f"rep {rep} job {j.id}: recovered only after its lease, re-run by B: runs = [ghost "
                    "'lease expired' (>= lease), success]",
                    [run["state"] for run in d.runs] == ["ghost", "success"]
                    and d.runs[0]["error"].startswith("lease expired")
                    and d.runs[0]["time"] >= (timeout + LEASE_GRACE) * 1000
                    and d.result["pid"] in b_workers
                    and d.result["attempt"] == 2,
                    f"{d.runs[0]['time']} ms",
                )
                case.check(
                    f"rep {rep} job {j.id}: A's late finish rejected, exactly one outcome recorded "
                    "(state, result and runs unchanged; one terminal event)",
                    x == d and outcomes_per_job[j.id] == 1,
                    outcomes_per_job[j.id],
                )
                case.check(
                    f"rep {rep} job {j.id}: executed twice, once by A (attempt 1) and once by B (attempt 2)",
                    sorted((e.attempt, e.pid in a_workers) for e in execs) == [(1, True), (2, False)],
                )
            try:
                a.wait_ready(2, timeout=10)
                carries_on = True
            except AssertionError:
                carries_on = False
            case.check(
                f"rep {rep}: A carries on after the freeze (runs new jobs; master, 2 workers, reaper up)",
                carries_on,
            )
            a.send(signal.SIGTERM)
            assert a.wait_exit(timeout=10) == 0
        monitor.check_now("final: ")
    case.check(
        "invariants hold in every snapshot (terminal states never change)",
        not monitor.found,
        monitor.found[:5],
    )
    case.check(
        "no stray keys after purge", not (strays := purge_and_find_strays(r, namespace, ["stale"])), strays
    )
    case.done()


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case04b_master_resumed_past_a_deadline_reads_its_workers_first(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    """Only the master is paused (SIGSTOP: a debugger, a stopped job-control group, a paused container
    with the workers elsewhere); meanwhile worker 1 finishes job 1 within its process_timeout and
    chains into job 2 (10 s timeout), and worker 2 crashes (SIGCHLD for the paused master). When the
    master resumes after job 1's deadline, nothing may be killed: job 1 finished in time and job 2
    is well within its own. (Found failing before 1a1519a, whose master reads every pipe after each
    sleep: its select() had returned no fds after an EINTR past its timeout, and the master killed
    worker 1 on job 1's deadline, ghosting job 2 'processing timed out' after 0.5 s.)"""
    case = Case("4b", "stale view: only the master paused past a run's deadline, resumed")
    rp = redis_procs()
    module = handler_module(tmp_path, ledger.path, [(["chain"], 1), (["crash"], 1)])
    sup = start_supervisor(module, args=["--reaper-interval", "0.2"], workers=2, url=rp.url, ns=namespace)
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    first, second = kq.create_many(
        [
            ("chain", {"ref": "j1", "ms": 300}, {"process_timeout": 0.6}),
            ("chain", {"ref": "j2", "ms": 1500}, {"process_timeout": 10}),
        ]
    )
    wait_until(lambda: any(e.ref == "j1" for e in ledger.read()), timeout=10, message="job 1 running")
    started = time.monotonic()
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        crash = kq.create("crash", {"ref": "crash", "do": "poison"}, {"ghost_retry": False})
        wait_until(
            lambda: {"j2", "crash"} <= {e.ref for e in ledger.read()},
            timeout=10,
            message="job 2 chained on worker 1, worker 2 crashed",
        )
        # Keep the master paused past job 1's deadline: this wait is the fault itself.
        time.sleep(max(0.0, started + 0.8 - time.monotonic()))
    finally:
        os.kill(sup.pid, signal.SIGCONT)
    wait_until(
        lambda: kq.get(second.id).state in ("success", "ghost", "fail"), timeout=15, message="job 2 done"
    )
    jobs = {name: kq.get(job.id) for name, job in (("job 1", first), ("job 2", second), ("crash", crash))}
    for name, job in jobs.items():
        case.note(f"{name}: {job.state} {[(run['state'], run['error'], run['time']) for run in job.runs]}")
    case.check(
        "job 1 (finished within its timeout while the master was paused) succeeds, one run",
        jobs["job 1"].state == "success" and len(jobs["job 1"].runs) == 1,
    )
    case.check(
        "job 2 (chained, well within its 10 s timeout) is not killed: success after one run",
        jobs["job 2"].state == "success" and len(jobs["job 2"].runs) == 1,
        [(run["state"], run["error"]) for run in jobs["job 2"].runs],
    )
    case.check("no 'passed its process_timeout' kill logged", "passed its process_timeout" not in sup.log())
    case.done()
