"""Faults of worker processes: a SIGKILL storm (case 1), runaway and poison jobs (case 3), a graceful
SIGTERM with jobs in flight (case 12). Real kickq-supervisor processes on a private redis-server."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import psutil
import pytest

import kickq
from kickq.keys import Keys
from tests.faults.harness import (
    Case,
    Monitor,
    handler_module,
    outcomes,
    pid_alive,
    purge_and_find_strays,
    read_pid,
    sizes,
    wait_settled,
)
from tests.helpers import wait_until
from tests.supervisor.conftest import WORKER_TITLE, session_processes, title_of

STORM_WORKERS = 4


def busy_workers(sup):
    """{number: process} of the workers whose title shows a job."""
    out = {}
    for number, proc in sup.workers().items():
        match = WORKER_TITLE.match(title_of(proc))
        if match and match.group(2) != "idle":
            out[number] = proc
    return out


def zombies(sup):
    try:
        return [p.pid for p in sup.master().children() if p.status() == psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def storm(sup, r, queue, rng, every=0.2, workers=STORM_WORKERS):
    """SIGKILL a random busy worker every `every` seconds while `queue` holds jobs; after each kill,
    wait for the pool (`workers` processes) to be full again. Returns (kills, seconds each restore took)."""
    kills, restores = 0, []
    while r.llen(queue) > 0:
        next_kill = time.monotonic() + every
        busy = busy_workers(sup)
        if busy:
            number, victim = rng.choice(sorted(busy.items()))
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            kills += 1

            def restored(number=number, old=victim.pid):
                now = sup.workers()
                return len(now) == workers and now.get(number) and now[number].pid != old

            wait_until(restored, timeout=5.0, interval=0.005, message=f"worker {number} replaced")
            restores.append(time.monotonic() - killed)
        time.sleep(max(0.0, next_kill - time.monotonic()))  # the storm's cadence: part of the fault
    return kills, restores


def storm_runs(out, ghost_count):
    """What a kill storm left in the jobs' runs: (ghost runs, their errors counted by kind, jobs that
    failed without using up ghost_count, jobs whose runs are not 1 + their ghost runs or that ran
    more often than they have runs)."""
    ghost_runs = {ref: [run for run in job.runs if run["state"] == "ghost"] for ref, job in out.final.items()}
    bad_fails = [ref for ref, job in out.final.items()
                 if job.state == "fail" and len(ghost_runs[ref]) <= ghost_count]
    bad_attempts = [ref for ref, job in out.final.items()
                    if len(job.runs) != 1 + len(ghost_runs[ref])
                    or len(out.by_ref.get(ref, [])) > len(job.runs)]
    errors = Counter(run["error"].split(":")[0] for runs in ghost_runs.values() for run in runs)
    return sum(len(runs) for runs in ghost_runs.values()), errors, bad_fails, bad_attempts


# --- case 1 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jobs", sizes(3_000, 10_000))
def test_case01_worker_sigkill_storm(jobs, redis_procs, ledger, start_supervisor, namespace, tmp_path):
    case = Case(
        "1",
        "worker SIGKILL storm",
        f"{jobs} jobs, {STORM_WORKERS} workers, a busy worker SIGKILLed every 200 ms",
    )
    rp = redis_procs()
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["work"], STORM_WORKERS)])
    sup = start_supervisor(
        module, args=["--reaper-interval", "0.2"], workers=STORM_WORKERS, url=rp.url, ns=namespace
    )
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    ghost_count = 3
    opts = {"ghost_interval": 0, "ghost_count": ghost_count, "process_timeout": 2}
    refs = [f"s{i}" for i in range(jobs)]
    rng = random.Random(7)
    with Monitor(rp.url, namespace, interval=1.0) as monitor:
        started = time.monotonic()
        created = []
        for start in range(0, jobs, 1000):
            created += kq.create_many(
                [("work", {"ref": ref, "ms": 2}, opts) for ref in refs[start : start + 1000]]
            )
        acked = {ref: job.id for ref, job in zip(refs, created, strict=True)}
        kills, restores = storm(sup, r, Keys(namespace).queue("work"), rng)
        settle = wait_settled(r, namespace, list(acked.values()), timeout=60)
        elapsed = time.monotonic() - started
        monitor.check_now("final: ")
    out = outcomes(r, namespace, ledger, acked)
    states = Counter(job.state for job in out.final.values())
    total_ghosts, ghost_errors, bad_fails, bad_attempts = storm_runs(out, ghost_count)
    left_zombies = zombies(sup)
    strays = purge_and_find_strays(r, namespace, ["work"])

    case.note(out.line())
    case.note(
        f"kills={kills} ghost runs={total_ghosts} ({dict(ghost_errors)}) final states={dict(states)} "
        f"run {elapsed:.1f}s (settled {settle:.1f}s after the storm), "
        f"{monitor.checker.snapshots} invariant snapshots"
    )
    case.check("lost = 0", not out.lost, len(out.lost))
    case.check(
        "stranded = 0 and unexpected = 0",
        not out.stranded and not out.unexpected,
        f"{len(out.stranded)}, {len(out.unexpected)}",
    )
    case.check(f"success + fail = {jobs}", states["success"] + states["fail"] == jobs, dict(states))
    case.check(
        f"fail only for jobs killed more than ghost_count={ghost_count} times", not bad_fails, bad_fails[:5]
    )
    case.check("duplicated executions <= kills", out.extra <= kills, f"{out.extra} <= {kills}")
    case.check(
        "attempts = 1 + kills that hit the job (runs = 1 + ghost runs; executions <= runs); "
        "ghost runs <= kills",
        not bad_attempts and total_ghosts <= kills,
        f"{len(bad_attempts)} mismatches, {total_ghosts} ghost runs",
    )
    case.check(
        "pool size restored within 1 s of each kill",
        kills > 0 and max(restores) <= 1.0,
        f"max {max(restores, default=0):.3f}s over {kills} kills",
    )
    case.check("no zombie children of the master", not left_zombies, left_zombies)
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.check("no stray keys after purge", not strays, strays)
    case.done()


DENSE_WORKERS, JOBS_PER_WORKER = 2, 8


@pytest.mark.parametrize("jobs", sizes(2_000, 8_000))
def test_case01c_sigkill_storm_over_dense_workers(
    jobs, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    """Dense workers (jobs_per_worker 8, async jobs): a kill ghosts every job in flight in the killed
    worker, and only those; nothing is lost or stranded."""
    case = Case(
        "1c",
        "worker SIGKILL storm over dense workers",
        f"{jobs} jobs of 20 ms (asyncio.sleep), {DENSE_WORKERS} workers x {JOBS_PER_WORKER} jobs at once, "
        "a busy worker SIGKILLed every 300 ms",
    )
    rp = redis_procs()
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["work"], DENSE_WORKERS, JOBS_PER_WORKER)],
                            handler="work_async")
    sup = start_supervisor(
        module, args=["--reaper-interval", "0.2"], workers=DENSE_WORKERS, url=rp.url, ns=namespace
    )
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    ghost_count = 3
    opts = {"ghost_interval": 0, "ghost_count": ghost_count, "process_timeout": 2}
    refs = [f"d{i}" for i in range(jobs)]
    rng = random.Random(11)
    with Monitor(rp.url, namespace, interval=1.0) as monitor:
        started = time.monotonic()
        created = []
        for start in range(0, jobs, 1000):
            created += kq.create_many(
                [("work", {"ref": ref, "ms": 20}, opts) for ref in refs[start : start + 1000]]
            )
        acked = {ref: job.id for ref, job in zip(refs, created, strict=True)}
        kills, restores = storm(sup, r, Keys(namespace).queue("work"), rng, every=0.3, workers=DENSE_WORKERS)
        settle = wait_settled(r, namespace, list(acked.values()), timeout=60)
        elapsed = time.monotonic() - started
        monitor.check_now("final: ")
    out = outcomes(r, namespace, ledger, acked)
    states = Counter(job.state for job in out.final.values())
    total_ghosts, ghost_errors, bad_fails, bad_attempts = storm_runs(out, ghost_count)
    left_zombies = zombies(sup)
    strays = purge_and_find_strays(r, namespace, ["work"])

    case.note(out.line())
    case.note(
        f"kills={kills} ghost runs={total_ghosts} ({dict(ghost_errors)}; "
        f"{total_ghosts / max(kills, 1):.1f} per kill) final states={dict(states)} "
        f"run {elapsed:.1f}s (settled {settle:.1f}s after the storm), "
        f"{monitor.checker.snapshots} invariant snapshots"
    )
    case.check("lost = 0", not out.lost, len(out.lost))
    case.check(
        "stranded = 0 and unexpected = 0",
        not out.stranded and not out.unexpected,
        f"{len(out.stranded)}, {len(out.unexpected)}",
    )
    case.check(f"success + fail = {jobs}", states["success"] + states["fail"] == jobs, dict(states))
    case.check(
        f"fail only for jobs killed more than ghost_count={ghost_count} times", not bad_fails, bad_fails[:5]
    )
    case.check(
        "a kill ghosts at most the jobs in flight in its worker: ghost runs <= kills x jobs_per_worker",
        total_ghosts <= kills * JOBS_PER_WORKER,
        f"{total_ghosts} <= {kills} x {JOBS_PER_WORKER}",
    )
    case.check(
        "extra executions <= ghost runs (runs = 1 + ghost runs; executions <= runs)",
        not bad_attempts and out.extra <= total_ghosts,
        f"{len(bad_attempts)} mismatches, {out.extra} extra <= {total_ghosts}",
    )
    case.check(
        "pool size restored within 1 s of each kill",
        kills > 0 and max(restores) <= 1.0,
        f"max {max(restores, default=0):.3f}s over {kills} kills",
    )
    case.check("no zombie children of the master", not left_zombies, left_zombies)
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.check("no stray keys after purge", not strays, strays)
    case.done()


@pytest.mark.parametrize("jobs", sizes(2_000, 4_000))
def test_case01b_every_killed_run_is_ghosted_by_its_master(
    jobs, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    """docs/supervisor.md: a worker killed mid-job, or after the handler returned, or between claiming
    and telling the master, has its run ghosted by the master in < 1 s; only a lost master leaves runs
    to lease recovery."""
    case = Case(
        "1b",
        "worker SIGKILL storm: every killed run ghosted by its master",
        f"{jobs} jobs, {STORM_WORKERS} workers, a busy worker SIGKILLed every 50 ms, process_timeout 30 s",
    )
    rp = redis_procs()
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["work"], STORM_WORKERS)])
    sup = start_supervisor(
        module, args=["--reaper-interval", "0.2"], workers=STORM_WORKERS, url=rp.url, ns=namespace
    )
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    opts = {"ghost_interval": 0, "ghost_count": 5, "process_timeout": 30}
    kq.create_many([("work", {"ref": f"s{i}", "ms": 1}, opts) for i in range(jobs)])
    kills, _ = storm(sup, r, Keys(namespace).queue("work"), random.Random(11), every=0.05)
    # Once the storm is over, the last jobs take milliseconds and a run ended by a kill is ghosted
    # (and re-run) within a second; a run left to lease recovery stays processing for 31 s.
    processing = Keys(namespace).processing
    try:
        wait_until(lambda: r.zcard(processing) == 0, timeout=3.0, interval=0.02)
    except AssertionError:
        pass
    waiting = r.zrange(processing, 0, -1)
    case.note(
        f"kills={kills}; runs still processing 3 s after the storm (left for their 31 s lease): "
        f"{len(waiting)}"
    )
    case.check(
        "every killed run is ghosted by its master: nothing left processing 3 s after the storm",
        kills > 0 and not waiting,
        len(waiting),
    )
    case.done()


# --- case 3 ---------------------------------------------------------------------------------------------

RUNAWAYS = ("hang", "ignore_term", "busy_c", "fork")


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case03_runaway_and_poison_jobs(size, redis_procs, ledger, start_supervisor, namespace, tmp_path):
    timeout, grace, ghost_count = 1.0, 0.3, 2
    bound = timeout + grace + 0.5
    case = Case("3", "runaway and poison jobs", f"process_timeout {timeout}s, kill grace {grace}s")
    rp = redis_procs()
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["runaway"], len(RUNAWAYS)), (["poison"], 1)])
    workers = len(RUNAWAYS) + 1
    sup = start_supervisor(
        module, args=["--reaper-interval", "0.2"], workers=workers, url=rp.url, ns=namespace, kill_grace=grace
    )
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    with Monitor(rp.url, namespace, interval=0.5) as monitor:
        jobs, files = {}, {}
        for kind in RUNAWAYS:
            f = files[kind] = {
                "pidfile": str(tmp_path / f"{kind}.pid"),
                "ready": str(tmp_path / f"{kind}.ready"),
                "grandchildren": str(tmp_path / f"{kind}.gc"),
            }
            jobs[kind] = kq.create(
                "runaway",
                {"do": kind, "ref": kind, **f},
                {"process_timeout": timeout, "ghost_interval": 3600},
            )
        poison = kq.create(
            "poison",
            {"do": "poison", "ref": "poison"},
            {"ghost_count": ghost_count, "ghost_interval": 0, "process_timeout": 30},
        )
        pids = {kind: read_pid(tmp_path / f"{kind}.pid") for kind in RUNAWAYS}
        read_pid(tmp_path / "ignore_term.ready")
        grandchildren = [read_pid(tmp_path / "fork.gc"), read_pid(tmp_path / "fork.gc.2")]

        def ghosted():
            got = {kind: kq.get(job.id) for kind, job in jobs.items()}
            return got if all(j.state != "processing" for j in got.values()) else None

        done = wait_until(ghosted, timeout=timeout + 10, interval=0.02, message="every runaway ghosted")
        after_ghost = time.monotonic()
        wait_until(
            lambda: not any(pid_alive(p) for p in [*pids.values(), *grandchildren]),
            timeout=2.0,
            interval=0.01,
            message="the runaways' processes and grandchildren are gone",
        )
        gone_after = time.monotonic() - after_ghost
        sup.wait_ready(workers, timeout=10)
        nxt = kq.create_many([("runaway", {"ref": f"next{i}"}) for i in range(100)])
        wait_settled(r, namespace, [j.id for j in nxt] + [poison.id], timeout=30, idle=False)
        final_poison = kq.get(poison.id)
        next_states = Counter(kq.get(j.id).state for j in nxt)
        monitor.check_now("final: ")
    execs = Counter(e.ref for e in ledger.read())
    for kind, job in done.items():
        [run] = job.runs
        case.note(f"{kind}: {job.state} after {run['time'] / 1000:.3f}s, error {run['error']!r}")
    case.note(
        f"poison: {final_poison.state} after runs {[(x['state'], x['error']) for x in final_poison.runs]}"
    )
    case.note(
        f"worker and grandchildren gone {gone_after:.3f}s after the last ghost; next jobs {dict(next_states)}"
    )
    case.check(
        f"each runaway ghosted 'processing timed out' after timeout ({timeout}s) <= run time <= "
        f"timeout + grace + 0.5 s ({bound}s)",
        all(
            j.state == "ghost"
            and j.last_error == "processing timed out"
            and timeout * 1000 <= j.runs[0]["time"] <= bound * 1000
            for j in done.values()
        ),
        {k: j.runs[0]["time"] for k, j in done.items()},
    )
    case.check(
        "each runaway executed exactly once (not re-run: ghost_interval 1 h)",
        all(execs[k] == 1 for k in RUNAWAYS),
        {k: execs[k] for k in RUNAWAYS},
    )
    case.check(
        "workers and grandchildren gone within 1 s of the ghost", gone_after <= 1.0, f"{gone_after:.3f}s"
    )
    case.check(
        "the next 100 jobs succeed on the replaced workers",
        next_states == {"success": 100},
        dict(next_states),
    )
    case.check(
        f"poison job: fail after ghost_count + 1 = {ghost_count + 1} runs, each 'worker died: killed "
        "by SIGKILL', executed that many times",
        final_poison.state == "fail"
        and len(final_poison.runs) == ghost_count + 1
        and all(
            x["state"] == "ghost" and x["error"] == "worker died: killed by SIGKILL"
            for x in final_poison.runs
        )
        and execs["poison"] == ghost_count + 1,
        f"{final_poison.state}, {len(final_poison.runs)} runs, {execs['poison']} executions",
    )
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.done()


# --- case 12 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case12_graceful_sigterm_with_jobs_in_flight(
    size, redis_procs, ledger, start_supervisor, namespace, tmp_path
):
    long_timeout, grace = 1.5, 0.3
    case = Case(
        "12",
        "graceful SIGTERM with jobs in flight",
        f"4 workers: 2 short (0.8 s), 2 past their process_timeout ({long_timeout}s), 6 waiting",
    )
    rp = redis_procs()
    r = rp.client()
    module = handler_module(tmp_path, ledger.path, [(["term"], 4)])
    sup = start_supervisor(
        module, args=["--reaper-interval", "0.2"], workers=4, url=rp.url, ns=namespace, kill_grace=grace
    )
    kq = kickq.Kickq(redis_url=rp.url, redis_namespace=namespace)
    with Monitor(rp.url, namespace, interval=0.3) as monitor:
        short = kq.create_many([("term", {"ref": f"short{i}", "ms": 800}) for i in range(2)])
        long = kq.create_many(
            [
                (
                    "term",
                    {"ref": f"long{i}", "do": "hang"},
                    {"process_timeout": long_timeout, "ghost_interval": 3600},
                )
                for i in range(2)
            ]
        )
        wait_until(lambda: ledger.count() == 4, timeout=10, message="all four jobs running")
        waiting = kq.create_many([("term", {"ref": f"wait{i}"}) for i in range(6)])
        children = sup.children()
        sup.send(signal.SIGTERM)
        signalled = time.monotonic()
        code = sup.wait_exit(timeout=long_timeout + grace + 10)
        took = time.monotonic() - signalled
        monitor.check_now("final: ")
    states = {job.id: kq.get(job.id) for job in short + long + waiting}
    left = session_processes(sup.pid)
    case.note(
        f"exit code {code} after {took:.2f}s; states short={[states[j.id].state for j in short]} "
        f"long={[states[j.id].state for j in long]} waiting={[states[j.id].state for j in waiting]}"
    )
    bound = long_timeout + grace + 1.0
    case.check(
        f"exit code 0 within the longest process_timeout + grace + 1 s ({bound}s)",
        code == 0 and took <= bound,
        f"{code}, {took:.2f}s",
    )
    case.check("the short jobs finish: success", all(states[j.id].state == "success" for j in short))
    case.check(
        "the jobs past their timeout are killed and ghosted 'processing timed out'",
        all((states[j.id].state, states[j.id].last_error) == ("ghost", "processing timed out") for j in long),
    )
    case.check(
        "waiting jobs are not claimed after the signal (still new)",
        all(states[j.id].state == "new" for j in waiting),
    )
    case.check(
        "nothing left processing",
        r.zcard(Keys(namespace).processing) == 0,
        r.zcard(Keys(namespace).processing),
    )
    case.check("4 executions in the ledger, one per job in flight", ledger.count() == 4, ledger.count())
    case.check(
        "no process of the supervisor left", not left and not any(c.is_running() for c in children), left
    )
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.done()
