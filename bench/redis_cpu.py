"""Redis CPU per job: the server's INFO cpu read before and after a measured phase.

INFO cpu gives the redis-server process' getrusage(RUSAGE_SELF) (every thread: the main thread and
the background I/O threads) as used_cpu_sys / used_cpu_user, in seconds with 6 decimals, and since
Redis 6.0 the main thread's alone (RUSAGE_THREAD) as used_cpu_sys_main_thread /
used_cpu_user_main_thread. The *_children fields (a fork for a save) are left out: the bench's
servers never save. bench/README.md ("Redis CPU per job") says what the figure covers.

Imported by the driver in every queue's interpreter (arq's too) and by the tests: nothing here
needs more than a client with an ``info(section)`` method.
"""
from __future__ import annotations

from typing import Any, Mapping

PROCESS = ("used_cpu_sys", "used_cpu_user")
MAIN_THREAD = ("used_cpu_sys_main_thread", "used_cpu_user_main_thread")


def sample(client: Any) -> dict[str, float]:
    """The CPU fields of one INFO cpu (seconds), those this server has."""
    info = client.info("cpu")
    return {key: float(info[key]) for key in PROCESS + MAIN_THREAD if key in info}


def per_job(before: Mapping[str, float], after: Mapping[str, float], jobs: int) -> dict[str, float]:
    """What Redis spent between two samples, per job: µs of the whole process (sys + user), of
    each of the two, and of the main thread when both samples have it; the seconds beside them."""
    if jobs <= 0:
        raise ValueError(f"jobs must be positive, got {jobs}")
    missing = [key for key in PROCESS if key not in before or key not in after]
    if missing:
        raise KeyError(f"INFO cpu without {', '.join(missing)}")
    sys_s = after["used_cpu_sys"] - before["used_cpu_sys"]
    user_s = after["used_cpu_user"] - before["used_cpu_user"]
    out = {"seconds": sys_s + user_s, "us_per_job": (sys_s + user_s) * 1e6 / jobs,
           "sys_us_per_job": sys_s * 1e6 / jobs, "user_us_per_job": user_s * 1e6 / jobs, "jobs": jobs}
    if all(key in before and key in after for key in MAIN_THREAD):
        main = sum(after[key] - before[key] for key in MAIN_THREAD)
        out["main_thread_seconds"] = main
        out["main_thread_us_per_job"] = main * 1e6 / jobs
    return out


class Meter:
    """Samples one server's INFO cpu at start() and stop(); per_job(jobs) after both."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def start(self) -> None:
        self.before = sample(self.client)

    def stop(self) -> None:
        self.after = sample(self.client)

    def per_job(self, jobs: int) -> dict[str, float]:
        if self.before is None or self.after is None:
            raise RuntimeError("Meter.per_job before start() and stop()")
        return per_job(self.before, self.after, jobs)
