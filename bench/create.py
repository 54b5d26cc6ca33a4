"""Time creating jobs one by one and with create_many against a private redis-server.

    .venv/bin/python -m bench.create [--jobs 10000] [--runs 3] [--redis-url redis://...]

Starts its own redis-server on a free port (unless --redis-url is given), creates --jobs jobs per
method per run, each run in a fresh namespace, and prints a Markdown table with the median of the
runs. Run it from the repository root (it reuses tests/helpers.py to start Redis).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import redis

import kickq
from kickq.keys import Keys


def one_by_one(client: kickq.Kickq, jobs: int) -> None:
    for i in range(jobs):
        client.create("bench", {"i": i})


def many(client: kickq.Kickq, jobs: int) -> None:
    client.create_many([("bench", {"i": i}) for i in range(jobs)])


METHODS: list[tuple[str, Callable[[kickq.Kickq, int], None]]] = [
    ("create, one by one", one_by_one),
    ("create_many", many),
]


def run_once(url: str, method: Callable[[kickq.Kickq, int], None], jobs: int) -> float:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with kickq.Kickq(redis_url=url, redis_namespace=namespace) as client:
        client.redis.ping()  # connect and check the version outside the timed part
        started = time.perf_counter()
        method(client, jobs)
        elapsed = time.perf_counter() - started
        check = client.redis
        queued = check.llen(Keys(namespace).queue("bench"))
        if queued != jobs:
            raise RuntimeError(f"expected {jobs} queued jobs, found {queued}")
        keys = list(check.scan_iter(match="{" + namespace + "}:*", count=10_000))
        for start in range(0, len(keys), 1000):
            check.delete(*keys[start:start + 1000])
    return elapsed


def bench(url: str, jobs: int, runs: int) -> list[tuple[str, list[float]]]:
    results = []
    for label, method in METHODS:
        times = [run_once(url, method, jobs) for _ in range(runs)]
        results.append((label, times))
    return results


def table(results: list[tuple[str, list[float]]], jobs: int, server: str) -> str:
    lines = [
        f"{jobs:,} jobs per run, median of {len(results[0][1])} runs; {server}",
        "",
        "| method | median time (s) | jobs/s | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for label, times in results:
        median = statistics.median(times)
        lines.append(f"| {label} | {median:.3f} | {jobs / median:,.0f} | "
                     f"{', '.join(f'{t:.3f}' for t in times)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis-url", help="use this server instead of starting a private one")
    args = parser.parse_args(argv)

    proc = None
    url = args.redis_url
    if url is None:
        from tests.helpers import start_redis, stop_redis
        workdir = tempfile.mkdtemp(prefix="kickq-bench-")
        proc, port = start_redis(workdir)
        url = f"redis://127.0.0.1:{port}/0"
    try:
        with redis.Redis.from_url(url) as probe:
            version = probe.info("server")["redis_version"]
        server = f"redis-server {version}, Python {sys.version.split()[0]}, redis-py {redis.__version__}"
        print(table(bench(url, args.jobs, args.runs), args.jobs, server))
    finally:
        kickq.reset()
        if proc is not None:
            stop_redis(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
