"""Time creates one by one with and without wait_replicas (docs/replicas.md).

    .venv/bin/python -m bench.replicas --redis-url redis://127.0.0.1:6379/0 [--jobs 20000] [--runs 3]
        [--wait-replicas N]

Against the Redis given (a master with replicas for --wait-replicas > 0): --runs runs of --jobs
`create("bench", {"i": i})` calls from one thread, each in a fresh namespace (deleted after), timed
after a first create. Prints creates/s and the client's CPU time per create (time.process_time) per run,
and the median.
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

import kickq


def run_once(url: str, jobs: int, wait_replicas: int | None) -> tuple[float, float]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    extra = {} if wait_replicas is None else {"wait_replicas": wait_replicas}
    with kickq.Kickq(redis_url=url, redis_namespace=namespace, **extra) as client:
        client.create("warm")  # connected, scripts loaded
        started, cpu_started = time.perf_counter(), time.process_time()
        for i in range(jobs):
            client.create("bench", {"i": i})
        rate = jobs / (time.perf_counter() - started)
        cpu_us = (time.process_time() - cpu_started) / jobs * 1e6
        check = client.redis
        keys = list(check.scan_iter(match="{" + namespace + "}:*", count=10_000))
        for start in range(0, len(keys), 1000):
            check.delete(*keys[start:start + 1000])
    return rate, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wait-replicas", type=int, default=None,
                        help="left out: the option is not passed at all")
    args = parser.parse_args()
    results = [run_once(args.redis_url, args.jobs, args.wait_replicas) for _ in range(args.runs)]
    rates = [rate for rate, _ in results]
    print(f"wait_replicas {args.wait_replicas if args.wait_replicas is not None else '(not passed)'}: "
          f"creates/s {' '.join(f'{r:.0f}' for r in rates)} (median {statistics.median(rates):.0f}); "
          f"client CPU per create {' '.join(f'{c:.1f}' for _, c in results)} µs")


if __name__ == "__main__":
    main()
