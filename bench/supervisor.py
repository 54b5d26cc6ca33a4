"""Measure kickq-supervisor: no-op throughput with 2 workers, and how exactly a deadline is enforced.

    .venv/bin/python -m bench.supervisor [--jobs 20000] [--runs 3] [--trials 50] [--timeout 0.3]

Starts its own redis-server on a free port and its own supervisors (stopped at the end, whatever
happens). (a) Throughput: --jobs no-op jobs are created with create_many, then a supervisor with one
registration of concurrent_jobs=2 is started; the time runs from starting it to the last completion
(ZCARD of the namespace's finished set), so it includes the supervisor's start-up. Median of --runs.
(b) Deadline precision: --trials jobs that sleep forever with process_timeout --timeout, one at a
time. The deadline is the run's start (Redis clock, ms) + the timeout; the job is failed (ghost_retry
off) by the master's ghoster, whose write sets update_time (Redis clock). The worker's death is
when the master reaped it (its log line, wall clock of the same host). Run from the repository root.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import redis

import kickq
from kickq.keys import Keys

HANDLERS = """
import time

import kickq


def noop(job, data):
    return None


def forever(job, data):
    while True:
        time.sleep(3600)


kickq.Kickq().process("noop", {"concurrent_jobs": 2}, noop)
kickq.Kickq().process("forever", {"concurrent_jobs": 1}, forever)
"""

REAPED = re.compile(r"^(\S+ \S+) WARNING \[\d+\] kickq\.master: worker \d+ \(pid \d+\) killed by \S+ "
                    r"(?:\(out of memory\?\) )?during job (\d+): processing timed out$", re.MULTILINE)


class Supervisor:
    def __init__(self, url: str, namespace: str, module: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kickq_supervisor", "--redis-url", url, "--redis-namespace", namespace,
                 "--log-level", "WARNING", "--kill-grace", "0.2", str(module)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # the master and anything left in its group; workers die with the master (PDEATHSIG)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"supervisor exited with code {self.proc.returncode}:\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")


def clear(client: redis.Redis, namespace: str) -> None:
    keys = list(client.scan_iter(match="{" + namespace + "}:*", count=10_000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])


def throughput_once(url: str, module: Path, workdir: Path, jobs: int) -> float:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    finished = Keys(namespace).finished
    with kickq.Kickq(redis_url=url, redis_namespace=namespace) as client:
        for start in range(0, jobs, 5000):
            client.create_many([("noop",)] * min(5000, jobs - start))
        r = client.redis
        started = time.perf_counter()
        sup = Supervisor(url, namespace, module, workdir / f"throughput-{namespace}.log")
        try:
            while r.zcard(finished) < jobs:
                sup.alive()
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
        finally:
            sup.stop()
        failed = sum(1 for state in r.sort(finished, by="nosort", get="{" + namespace + "}:job:*->state")
                     if state != "success")
        if failed:
            raise RuntimeError(f"{failed} of {jobs} no-op jobs did not succeed")
        clear(r, namespace)
    return elapsed


def log_time(text: str) -> float:
    """Epoch seconds of a log timestamp like '2026-11-28 05:02:46,484' (local time)."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def deadline_trials(url: str, module: Path, workdir: Path, trials: int,
                    timeout: float) -> tuple[list[float], list[float]]:
    """(deadline -> job failed, deadline -> worker reaped) in ms, one pair per trial."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    log = workdir / f"deadline-{namespace}.log"
    sup = Supervisor(url, namespace, module, log)
    to_fail: list[float] = []
    deadlines: dict[str, float] = {}
    try:
        with kickq.Kickq(redis_url=url, redis_namespace=namespace) as client:
            for _ in range(trials):
                job = client.create("forever", None, {"process_timeout": timeout, "ghost_retry": False})
                limit = time.monotonic() + timeout + 30
                while True:
                    sup.alive()
                    done = client.get(job.id)
                    if done.state == "fail":
                        break
                    if time.monotonic() > limit:
                        raise RuntimeError(f"job {job.id} still {done.state} long after its deadline")
                    time.sleep(0.001)
                if done.last_error != "processing timed out":
                    raise RuntimeError(f"job {job.id} failed with {done.last_error!r}")
                deadline = done.runs[-1]["start"] + timeout * 1000
                deadlines[job.id] = deadline
                to_fail.append(done.update_time - deadline)
            clear(client.redis, namespace)
    finally:
        sup.stop()
    reaped = {job_id: log_time(stamp) * 1000 for stamp, job_id in REAPED.findall(log.read_text())}
    to_death = [reaped[job_id] - deadline for job_id, deadline in deadlines.items() if job_id in reaped]
    return to_fail, to_death


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))  # nearest rank
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=0.3, help="process_timeout of the trials (s)")
    args = parser.parse_args(argv)

    from tests.helpers import start_redis, stop_redis
    workdir = Path(tempfile.mkdtemp(prefix="kickq-bench-supervisor-"))
    module = workdir / "bench_handlers.py"
    module.write_text(textwrap.dedent(HANDLERS))
    proc, port = start_redis(workdir)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with redis.Redis.from_url(url) as probe:
            version = probe.info("server")["redis_version"]
        times = [throughput_once(url, module, workdir, args.jobs) for _ in range(args.runs)]
        to_fail, to_death = deadline_trials(url, module, workdir, args.trials, args.timeout)
    finally:
        kickq.reset()
        stop_redis(proc)

    median = statistics.median(times)
    print(f"redis-server {version}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"kickq-supervisor --kill-grace 0.2\n")
    print(f"(a) {args.jobs:,} no-op jobs, one registration with concurrent_jobs=2, from supervisor start "
          f"to the last completion; median of {args.runs} runs\n")
    print("| median time (s) | jobs/s | runs (s) |")
    print("|---:|---:|---|")
    print(f"| {median:.2f} | {args.jobs / median:,.0f} | {', '.join(f'{t:.2f}' for t in times)} |\n")
    print(f"(b) deadline precision: {args.trials} jobs that never return, "
          f"process_timeout {args.timeout:g} s; ms after the deadline (run start + process_timeout)\n")
    print("| from the deadline to | p50 (ms) | p99 (ms) | max (ms) | n |")
    print("|---|---:|---:|---:|---:|")
    for label, values in (("the worker reaped by the master (log)", to_death),
                          ("the job failed in Redis (update_time)", to_fail)):
        if values:
            print(f"| {label} | {percentile(values, 50):.0f} | {percentile(values, 99):.0f} | "
                  f"{max(values):.0f} | {len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
