"""What every adapter provides, and the process helpers they share.

An adapter is made with the Redis URL in the producer (the driver process) and offers:

- ``enqueue_one(count)``: enqueue ``count`` no-op jobs, one API call per job, each call finished
  before the next (asyncio peers: awaited one after the other in one coroutine);
- ``enqueue_bulk(count)``: the same through the queue's bulk API, or ``None`` where it has none
  (``bulk_label`` says which API);
- ``queued()``: how many jobs wait in the queue (a check that the enqueue really happened);
- ``start_workers(n, variant, logdir)``: start n worker processes (``variants`` lists the kinds of
  worker a peer has) and return the root processes; each root leads its own process group;
- ``wait_done(n, procs, timeout)``: wait until ``n`` no-op jobs ran (body.done_count);
- ``start_io_workers(variant, logdir)``: the sleep case's workers, 16 jobs in flight in the peer's
  documented setup for I/O-bound jobs (``io_variants`` lists them);
- ``roundtrip(t0)``: the latency probe: enqueue one job carrying ``t0`` and wait for its result
  through the queue's own result API;
- ``memory_probe(count)``: Redis used_memory per queued no-op job.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import redis

from . import body

REPO = Path(__file__).resolve().parents[2]
FILL_CHUNK = 10_000


class BenchError(RuntimeError):
    pass


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start cmd in its own process group (same session as the driver), output to log."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env or worker_env(), start_new_session=True)


def module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def tree(procs: list[subprocess.Popen]) -> list[Any]:
    """psutil.Process objects of the roots and all their descendants, alive now."""
    import psutil
    found: dict[int, Any] = {}
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop(procs: list[subprocess.Popen], grace: float = 2.0) -> None:
    """TERM each root's process group, KILL whatever of the tree is left after grace, reap."""
    import psutil
    members = tree(procs)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _, alive = psutil.wait_procs(members, timeout=grace)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    killed = alive + tree(procs)
    for member in killed:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(killed, timeout=5)  # SIGKILL is not instant: gone before anyone looks again
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def tree_memory(procs: list[subprocess.Popen]) -> dict[str, Any]:
    """PSS and RSS (bytes) of the whole tree of each root, with one line per process."""
    import psutil
    total_pss = total_rss = 0
    detail = []
    for member in tree(procs):
        try:
            info = member.memory_full_info()
            name = " ".join(member.cmdline())[:80] or member.name()
        except psutil.NoSuchProcess:
            continue
        total_pss += info.pss
        total_rss += info.rss
        detail.append({"pid": member.pid, "cmd": name, "pss": info.pss, "rss": info.rss})
    return {"pss": total_pss, "rss": total_rss, "processes": len(detail), "detail": detail}


def log_tail(logdir: Path, lines: int = 30) -> str:
    out = []
    for log in sorted(logdir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        if text:
            out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)[-6000:]


def wait_done(name: str, n: int, procs: list[subprocess.Popen], timeout: float,
              logdir: Path | None = None, marks: tuple[int, ...] = ()) -> dict[str, Any]:
    """Poll the completions (body.done_count: a file's size, no Redis command) every 2 ms until they
    reach n; perf_counter times of the first completion seen and of the last, and for each count in
    marks the (count seen, time) of the first poll that reached it."""
    deadline = time.perf_counter() + timeout
    first = None
    first_count = 0
    polls = 0
    reached: list[tuple[int, float]] = []
    while True:
        done = body.done_count()
        now = time.perf_counter()
        if done and first is None:
            first = now
            first_count = done
        while len(reached) < len(marks) and done >= marks[len(reached)]:
            reached.append((done, now))
        if done >= n:
            return {"first": first if first is not None else now, "first_count": first_count,
                    "last": now, "done": done, "marks": reached}
        polls += 1
        if polls % 50 == 0:
            if all(p.poll() is not None for p in procs):
                tail = log_tail(logdir) if logdir else ""
                last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
                raise BenchError(f"{name}: every worker exited after {done} of {n} jobs"
                                 + (f"; last log line: {last.strip()}" if last else "") + "\n" + tail)
        if now > deadline:
            raise BenchError(f"{name}: only {done} of {n} jobs done after {timeout:.0f} s\n"
                             + (log_tail(logdir) if logdir else ""))
        time.sleep(0.002)


class Adapter:
    name = ""
    label = ""
    package = ""  # distribution whose version is reported
    variants: dict[str, str] = {"default": ""}  # worker kind -> how its workers are started
    io_variants: dict[str, str] = {}  # the sleep case: setup -> how its workers are started
    bulk_label: str | None = None
    notes = ""  # settings that differ from the peer's defaults, shown under the tables

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(url)

    # --- producer side ----------------------------------------------------------------------------
    def enqueue_one(self, count: int) -> None:
        raise NotImplementedError

    enqueue_bulk: Callable[[int], None] | None = None

    def queued(self) -> int:
        raise NotImplementedError

    def roundtrip(self, t0: float) -> None:
        raise NotImplementedError

    def fill(self, count: int) -> None:
        """Put count no-op jobs in the queue as fast as the peer allows (bulk in chunks, else one by one)."""
        bulk = self.enqueue_bulk
        for start in range(0, count, FILL_CHUNK):
            size = min(FILL_CHUNK, count - start)
            if bulk is not None:
                bulk(size)
            else:
                self.enqueue_one(size)

    def memory_probe(self, count: int) -> dict[str, Any]:
        before = int(self.redis.info("memory")["used_memory"])
        started = time.perf_counter()
        self.fill(count)
        elapsed = time.perf_counter() - started
        queued = self.queued()
        after = int(self.redis.info("memory")["used_memory"])
        if queued < count:
            raise BenchError(f"{self.name}: {queued} jobs queued after enqueueing {count}")
        return {"count": count, "used_memory_before": before, "used_memory_after": after,
                "bytes_per_job": (after - before) / count, "fill_seconds": elapsed,
                "keys": int(self.redis.dbsize())}

    # --- workers ----------------------------------------------------------------------------------
    def start_workers(self, n: int, variant: str, logdir: Path, **kw: Any) -> list[subprocess.Popen]:
        raise NotImplementedError

    def start_io_workers(self, variant: str, logdir: Path) -> list[subprocess.Popen]:
        raise NotImplementedError

    def wait_done(self, n: int, procs: list[subprocess.Popen], timeout: float,
                  logdir: Path | None = None, marks: tuple[int, ...] = ()) -> dict[str, Any]:
        return wait_done(self.name, n, procs, timeout, logdir, marks)

    def close(self) -> None:
        self.redis.close()


class AsyncAdapter(Adapter):
    """For asyncio queues: one event loop in the producer, every call run to completion on it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        import asyncio
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        super().close()
        self.loop.close()
