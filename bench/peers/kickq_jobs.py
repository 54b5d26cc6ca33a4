"""kickq handlers for the bench: `python -m kickq_supervisor ... bench.peers.kickq_jobs`.

BENCH_KICKQ_MODE picks what this supervisor serves, so it forks only the workers a case needs:
"bench" (default): the name "bench" with concurrent_jobs = BENCH_KICKQ_WORKERS (2);
"orphan": the name "orphan" with one worker (the orphan-recovery case);
"dense-async" / "dense-sync": the name "bench" with BENCH_KICKQ_WORKERS worker processes sharing 16
jobs in flight (jobs_per_worker 16 / workers), an async handler (asyncio.sleep in the sleep case) or a
sync one (time.sleep).
BENCH_PROFILE_DIR (optional): each worker profiles itself with cProfile from its first job on and
dumps its stats there (worker-<pid>.prof) at most once a second.
"""
from __future__ import annotations

import os
import time

import kickq
from bench.peers import body

_profile: list = []  # [pid, profiler, last dump]


def _profiling() -> None:
    where = os.environ.get("BENCH_PROFILE_DIR")
    if not where:
        return
    if not _profile or _profile[0] != os.getpid():
        import cProfile
        prof = cProfile.Profile()
        _profile[:] = [os.getpid(), prof, time.monotonic()]
        prof.enable()
    elif time.monotonic() - _profile[2] > 1.0:
        prof = _profile[1]
        prof.disable()
        prof.dump_stats(os.path.join(where, f"worker-{os.getpid()}.prof"))
        _profile[2] = time.monotonic()
        prof.enable()


def bench(job, data):
    _profiling()
    return body.run(data.get("t0") if data else None)


async def bench_async(job, data):
    return await body.run_async(data.get("t0") if data else None)


def orphan(job, data):
    """Logs each run ("pid time"); the first run then hangs until its supervisor is killed."""
    runs = body.client().rpush(body.ORPHAN, f"{os.getpid()} {time.time()!r}")
    if runs == 1:
        time.sleep(3600)
    return None


MODE = os.environ.get("BENCH_KICKQ_MODE", "bench")
if MODE == "orphan":
    kickq.Kickq().process("orphan", {"concurrent_jobs": 1}, orphan)
elif MODE in ("dense-async", "dense-sync"):
    processes = int(os.environ.get("BENCH_KICKQ_WORKERS", "2"))
    kickq.Kickq().process("bench", {"concurrent_jobs": processes, "jobs_per_worker": 16 // processes},
                          bench_async if MODE == "dense-async" else bench)
else:
    workers = int(os.environ.get("BENCH_KICKQ_WORKERS", "2"))
    kickq.Kickq().process("bench", {"concurrent_jobs": workers}, bench)
