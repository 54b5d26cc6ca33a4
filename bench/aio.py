"""Time kickq.aio beside the sync client: enqueue, and the hotjob round trip, on a private redis-server.

    .venv/bin/python -m bench.aio [--jobs 10000] [--hotjobs 2000] [--runs 3]
                                  [--worker sim|supervisor] [--redis-url redis://...]

Enqueue: --jobs jobs created one by one (sync; async awaited in turn; async gathered in batches,
which kickq.aio sends as one script call per loop iteration) and with create_many. Hotjob round
trip: from calling create to the final Job, one at a time and 100 in flight, with a worker that
finishes each job at once: `sim` is a separate process looping the claim / finish scripts (no
handler, no GIL shared with the producer), `supervisor` a real kickq-supervisor with an echo
handler. Each enqueue run uses a fresh namespace; each measure shows its run of median time (with
that run's latencies) in a Markdown table. Run it from the repository root (it reuses
tests/helpers.py to start Redis).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

import kickq
import kickq.aio
from kickq.keys import Keys
from kickq.scripts import Scripts

NAME = "bench"
HOT = {"hotjob": True, "hotjob_timeout": 60}
HANDLERS = f'''
import kickq

kickq.Kickq().process({NAME!r}, {{"concurrent_jobs": 2}}, lambda job, data: data)
'''


# --- workers ------------------------------------------------------------------------------------------

def simulated_worker(url: str, namespace: str, stop: Any) -> None:
    """The claim / finish loop of a worker, without a handler, in its own process."""
    client = redis.Redis.from_url(url, decode_responses=True)
    keys, scripts = Keys(namespace), Scripts(client)
    while not stop.is_set():
        got = scripts.claim(keys, [NAME])
        if got is None:
            client.blpop([keys.wake(NAME)], timeout=0.1)
            continue
        job_id, token, fields = got
        scripts.finish(keys, job_id, token, "success", fields.get("data") or "")


class Worker:
    def __init__(self, kind: str, url: str, namespace: str, workdir: str) -> None:
        self.kind = kind
        if kind == "sim":
            ctx = multiprocessing.get_context("spawn")
            self.stop = ctx.Event()
            self.proc: Any = ctx.Process(target=simulated_worker, args=(url, namespace, self.stop),
                                         daemon=True)
            self.proc.start()
        else:
            handlers = Path(workdir) / "bench_handlers.py"
            handlers.write_text(HANDLERS)
            self.log = open(Path(workdir) / f"supervisor-{namespace}.log", "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kickq_supervisor", "--redis-url", url, "--redis-namespace", namespace,
                 "--log-level", "WARNING", str(handlers)],
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def close(self) -> None:
        if self.kind == "sim":
            self.stop.set()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=5)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


# --- measures -------------------------------------------------------------------------------------------

class Row:
    def __init__(self, label: str, jobs: int, seconds: float, latencies: list[float] | None = None) -> None:
        self.label, self.jobs, self.seconds, self.latencies = label, jobs, seconds, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def sync_enqueue(url: str, namespace: str, jobs: int) -> float:
    with kickq.Kickq(redis_url=url, redis_namespace=namespace) as client:
        client.redis.ping()
        started = time.perf_counter()
        for i in range(jobs):
            client.create(NAME, {"i": i})
        return time.perf_counter() - started


async def async_enqueue(url: str, namespace: str, jobs: int, batch: int | None, many: bool = False) -> float:
    async with kickq.aio.Kickq(redis_url=url, redis_namespace=namespace) as client:
        await (await client.connection()).ping()
        started = time.perf_counter()
        if many:
            await client.create_many([(NAME, {"i": i}) for i in range(jobs)])
        elif batch is None:
            for i in range(jobs):
                await client.create(NAME, {"i": i})
        else:
            for start in range(0, jobs, batch):
                ids = range(start, min(jobs, start + batch))
                await asyncio.gather(*(client.create(NAME, {"i": i}) for i in ids))
        return time.perf_counter() - started


def sync_round_trips(url: str, namespace: str, jobs: int) -> tuple[float, list[float]]:
    latencies = []
    with kickq.Kickq(redis_url=url, redis_namespace=namespace) as client:
        client.redis.ping()
        started = time.perf_counter()
        for i in range(jobs):
            t0 = time.perf_counter()
            job = client.create(NAME, {"i": i}, HOT)
            assert job is not None and job.hotjob_promise is not None
            final = job.hotjob_promise.result()
            latencies.append(time.perf_counter() - t0)
            assert final.state == "success"
        return time.perf_counter() - started, latencies


async def async_round_trips(url: str, namespace: str, jobs: int, in_flight: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with kickq.aio.Kickq(redis_url=url, redis_namespace=namespace) as client:
        await (await client.connection()).ping()

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            job = await client.create(NAME, {"i": i}, HOT)
            final = await job.hotjob_promise
            latencies.append(time.perf_counter() - t0)
            assert final.state == "success" and final.result == {"i": i}

        started = time.perf_counter()
        for start in range(0, jobs, in_flight):
            await asyncio.gather(*(one(i) for i in range(start, min(jobs, start + in_flight))))
        return time.perf_counter() - started, latencies


def fresh() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def cleanup(url: str, namespace: str) -> None:
    with redis.Redis.from_url(url, decode_responses=True) as check:
        keys = list(check.scan_iter(match="{" + namespace + "}:*", count=10_000))
        for start in range(0, len(keys), 1000):
            check.delete(*keys[start:start + 1000])


def median_run(runs: list[Row]) -> Row:
    """The run of median time (its latencies with it)."""
    return sorted(runs, key=lambda row: row.seconds)[len(runs) // 2]


def bench(url: str, jobs: int, hotjobs: int, worker_kind: str, workdir: str, runs: int) -> list[Row]:
    rows = []
    def aenqueue(batch: int | None, many: bool = False) -> Any:
        return lambda ns: asyncio.run(async_enqueue(url, ns, jobs, batch, many))

    enqueues: list[tuple[str, Any]] = [
        ("sync create, one by one", lambda ns: sync_enqueue(url, ns, jobs)),
        ("async create, awaited one by one", aenqueue(None)),
        ("async create, gather in batches of 100", aenqueue(100)),
        ("async create, gather in batches of 1000", aenqueue(1000)),
        ("async create_many", aenqueue(None, many=True)),
    ]
    for label, run in enqueues:
        results = []
        for _ in range(runs):
            namespace = fresh()
            seconds = run(namespace)
            with redis.Redis.from_url(url, decode_responses=True) as check:
                queued = check.llen(Keys(namespace).queue(NAME))
            if queued != jobs:
                raise RuntimeError(f"{label}: expected {jobs} queued jobs, found {queued}")
            cleanup(url, namespace)
            results.append(Row(f"enqueue: {label}", jobs, seconds))
        rows.append(median_run(results))
    def around(in_flight: int) -> Any:
        return lambda ns, n: asyncio.run(async_round_trips(url, ns, n, in_flight))

    trips: list[tuple[str, Any]] = [
        ("sync hotjob, one at a time", lambda ns, n: sync_round_trips(url, ns, n)),
        ("async hotjob, one at a time", around(1)),
        ("async hotjob, 100 in flight (gather)", around(100)),
    ]
    for label, run in trips:
        namespace = fresh()
        worker = Worker(worker_kind, url, namespace, workdir)
        results = []
        try:
            run(namespace, 100)  # not timed: waits for the worker to be up, warms it
            for _ in range(runs):
                seconds, latencies = run(namespace, hotjobs)
                results.append(Row(f"hotjob round trip: {label}", hotjobs, seconds, latencies))
        finally:
            worker.close()
        cleanup(url, namespace)
        rows.append(median_run(results))
    return rows


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| measure | jobs | time (s) | jobs/s | p50 (ms) | p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        p50 = f"{percentile(row.latencies, 0.5) * 1000:.2f}" if row.latencies else ""
        p99 = f"{percentile(row.latencies, 0.99) * 1000:.2f}" if row.latencies else ""
        lines.append(f"| {row.label} | {row.jobs:,} | {row.seconds:.3f} | {row.jobs / row.seconds:,.0f} "
                     f"| {p50} | {p99} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per enqueue measure")
    parser.add_argument("--hotjobs", type=int, default=2_000, help="hotjobs per round-trip measure")
    parser.add_argument("--runs", type=int, default=3, help="runs per measure; the median one is shown")
    parser.add_argument("--worker", choices=["sim", "supervisor"], default="sim")
    parser.add_argument("--redis-url", help="use this server instead of starting a private one")
    args = parser.parse_args(argv)

    proc = None
    url = args.redis_url
    workdir = tempfile.mkdtemp(prefix="kickq-bench-")
    if url is None:
        from tests.helpers import start_redis, stop_redis
        proc, port = start_redis(workdir)
        url = f"redis://127.0.0.1:{port}/0"
    try:
        with redis.Redis.from_url(url) as probe:
            version = probe.info("server")["redis_version"]
        worker = ("a simulated worker (claim/finish loop in another process)" if args.worker == "sim"
                  else "a real kickq-supervisor, 2 worker processes, echo handler")
        header = (f"redis-server {version}, Python {sys.version.split()[0]}, redis-py {redis.__version__}, "
                  f"{os.cpu_count()} CPUs; hotjobs finished by {worker}; "
                  "latency = from the create() call to the final Job")
        header += f"; median of {args.runs} runs"
        print(table(bench(url, args.jobs, args.hotjobs, args.worker, workdir, args.runs), header))
    finally:
        kickq.reset()
        if proc is not None:
            stop_redis(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
