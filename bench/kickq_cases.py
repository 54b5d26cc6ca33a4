"""kickq-only cases, run by bench.driver in the bench interpreter.

deadline: reuses bench/supervisor.py (deadline_trials): jobs that never return, with a short
    process_timeout; ms from the deadline to the worker reaped and to the job failed in Redis.
orphan: two supervisors serve "orphan" (one worker each). A job (process_timeout P, ghost_retry on,
    ghost_interval 0) is claimed by one of them; that whole supervisor (master, worker, reaper) is
    SIGKILLed at once; the time runs from the kill to the job's second run starting in the other
    supervisor's worker (the job body logs each run's pid and start time).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run(case: str, ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    if case == "deadline":
        return deadline(ad, args)
    if case == "orphan":
        return orphan(ad, args)
    raise ValueError(case)


def _pcts(values: list[float]) -> dict[str, float]:
    from bench.driver import percentile
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}


def deadline(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from bench import supervisor as sup_bench  # written alongside; used only when it is there
        trials_fn = sup_bench.deadline_trials
        handlers = sup_bench.HANDLERS
    except (ImportError, AttributeError) as exc:
        return {"skipped": f"bench/supervisor.py has no deadline_trials yet ({exc})"}
    import textwrap
    workdir = Path(tempfile.mkdtemp(prefix="deadline-", dir=args.workdir))
    module = workdir / "bench_handlers.py"
    module.write_text(textwrap.dedent(handlers))
    to_fail, to_death = trials_fn(ad.url, module, workdir, args.count, args.process_timeout)
    if not to_fail:
        raise RuntimeError("no deadline trial finished")
    out = {"process_timeout": args.process_timeout, "trials": args.count, "to_fail": _pcts(to_fail)}
    if to_death:
        out["to_death"] = _pcts(to_death)
    return out


def _workers_up(roots: list[Any]) -> bool:
    from bench.peers.base import tree
    for root in roots:
        members = tree([root])
        if not any("worker" in " ".join(m.cmdline()) for m in members if m.pid != root.pid):
            return False
    return True


def orphan(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from bench.peers.base import stop, tree
    from bench.peers.body import ORPHAN as ORPHAN_LOG
    logdir = Path(args.workdir)
    timeout = args.process_timeout
    trials = []
    for _ in range(args.count):
        ad.redis.flushdb()
        roots = ad.start_workers(1, "default", logdir, supervisors=2, mode="orphan")
        try:
            deadline = time.monotonic() + 30
            while not _workers_up(roots):
                if time.monotonic() > deadline or any(r.poll() is not None for r in roots):
                    raise RuntimeError("the two orphan supervisors did not come up")
                time.sleep(0.01)
            time.sleep(0.3)  # let both workers reach their blocking wait
            job = ad.client.create("orphan", None, {"process_timeout": timeout, "ghost_retry": True,
                                                    "ghost_count": 1, "ghost_interval": 0})
            first = _wait_runs(ad, ORPHAN_LOG, 1, 10)
            pid, started = first[0]
            victim = next(r for r in roots if pid in {m.pid for m in tree([r])})
            members = [psutil.Process(victim.pid)] + [m for m in tree([victim]) if m.pid != victim.pid]
            killed_at = time.time()
            for member in members:
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass
            runs = _wait_runs(ad, ORPHAN_LOG, 2, timeout + 30)
            rerun_pid, rerun_at = runs[1]
            survivor = next(r for r in roots if r is not victim)
            if rerun_pid not in {m.pid for m in tree([survivor])}:
                raise RuntimeError(f"the second run (pid {rerun_pid}) is not in the surviving supervisor")
            state = ad.client.get(job.id)
            # The lost run is ghosted when Redis knew it started, or given back to its queue when it
            # was claimed ahead (a hand-off to an idle worker: see docs/design.md, section 6).
            lost = (f'ghosted as "{state.runs[0].get("error")}"' if len(state.runs) > 1
                    else "given back to its queue (event released, not counted as a run)")
            trials.append({"kill_to_rerun": rerun_at - killed_at, "claim_to_kill": killed_at - started,
                           "claim_to_rerun": rerun_at - started, "lost_run": lost})
        finally:
            stop(roots)
    kill_to_rerun = [t["kill_to_rerun"] * 1000 for t in trials]
    return {"process_timeout": timeout, "trials": trials, "kill_to_rerun_ms": _pcts(kill_to_rerun),
            "claim_to_rerun_ms": _pcts([t["claim_to_rerun"] * 1000 for t in trials])}


def _wait_runs(ad: Any, key: str, count: int, timeout: float) -> list[tuple[int, float]]:
    deadline = time.monotonic() + timeout
    while True:
        items = ad.redis.lrange(key, 0, -1)
        if len(items) >= count:
            return [(int(pid), float(at)) for pid, at in (i.decode().split() for i in items)]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(items)} runs of the orphan job logged after {timeout:.0f} s, "
                               f"expected {count}")
        time.sleep(0.001)
