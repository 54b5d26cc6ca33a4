"""kickq's shards case, run by bench.driver: a drain on a 3-master Redis Cluster (bench/cluster.py).

The runner starts the cluster and passes its redis+cluster:// URL. Each run flushes every master,
picks one namespace per master (its slot, CLUSTER KEYSLOT "{ns}", owned by that master) and checks
each is served there, then drains ``--jobs`` no-op jobs:

- ``1ns-1sup``: one namespace (on the first master), one kickq-supervisor;
- ``1ns-3sup``: one namespace, three supervisors (as many workers as below, one master's Redis);
- ``3ns-3sup``: the jobs split over three namespaces, one per master, one supervisor each.

Each supervisor runs ``--workers`` workers. Timed as the drain case (from starting the supervisors
to the last completion), with INFO cpu read on every master before and after. A kickq whose client
cannot open the cluster URL gives a "not supported by this kickq" skip, with the layout checked
up to that point.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import cluster, redis_cpu

VARIANTS = {"1ns-1sup": (1, 1), "1ns-3sup": (1, 3), "3ns-3sup": (3, 3)}  # (namespaces, supervisors)
FILL_CHUNK = 1000


def layout(url: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every master (address, id, slots, and its namespace with that namespace's slot), each checked
    to serve its namespace's keys; with a plain client on each master."""
    import redis
    nodes = cluster.parse_url(url)
    seed = redis.Redis(host=nodes[0][0], port=nodes[0][1], socket_timeout=10)
    try:
        masters = cluster.masters_of(seed)

        def keyslot(namespace: str) -> int:
            return int(seed.execute_command("CLUSTER", "KEYSLOT", "{" + namespace + "}"))
        picked = cluster.pick_namespaces(keyslot, masters)
    finally:
        seed.close()
    clients = []
    for master, (namespace, slot) in zip(masters, picked, strict=True):
        host, _, port = master["address"].rpartition(":")
        client = redis.Redis(host=host, port=int(port), socket_timeout=10)
        cluster.check_namespace(client, namespace)  # a MOVED here would raise
        master.update(namespace=namespace, slot=slot, checked=True)
        clients.append(client)
    return masters, clients


def kickq_client(url: str, namespace: str) -> Any:
    import kickq
    client = kickq.Kickq(redis_url=url, redis_namespace=namespace)
    client.redis.ping()
    return client


def shares(jobs: int, parts: int) -> list[int]:
    return [jobs // parts + (1 if i < jobs % parts else 0) for i in range(parts)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kickq.keys import Keys

    from bench.peers.base import module_cmd, spawn, stop, wait_done, worker_env
    n_namespaces, n_supervisors = VARIANTS[args.variant]
    masters, clients = layout(args.url)
    facts = {"masters": [{k: m[k] for k in ("address", "id", "slots", "namespace", "slot")} for m in masters]}
    try:
        for client in clients:
            client.flushall()
        used = masters[:n_namespaces]
        try:
            producers = [kickq_client(args.url, m["namespace"]) for m in used]
        except Exception as exc:  # noqa: BLE001 - the point of this case until kickq takes the URL
            return {"skipped": f"not supported by this kickq: {type(exc).__name__}: {exc}".splitlines()[0],
                    "cluster": facts}
        fill_started = time.perf_counter()
        counts = shares(args.jobs, n_namespaces)
        for producer, count in zip(producers, counts, strict=True):
            for start in range(0, count, FILL_CHUNK):
                chunk = range(start, min(count, start + FILL_CHUNK))
                producer.create_many([("bench", {"i": i}) for i in chunk])
            producer.close()
        fill_seconds = time.perf_counter() - fill_started
        for master, client, count in zip(used, clients[:n_namespaces], counts, strict=True):
            queued = int(client.llen(Keys(master["namespace"]).queue("bench")))
            if queued != count:
                raise RuntimeError(f"{queued} jobs queued on {master['address']} for {master['namespace']}, "
                                   f"expected {count}")
        meters = [redis_cpu.Meter(client) for client in clients]
        for meter in meters:
            meter.start()
        started = time.perf_counter()
        env = worker_env({"BENCH_KICKQ_WORKERS": str(args.workers), "BENCH_KICKQ_MODE": "bench"})
        logdir = Path(args.workdir)
        roots = []
        for i in range(n_supervisors):
            namespace = used[i % n_namespaces]["namespace"]
            cmd = module_cmd("kickq_supervisor", "--redis-url", args.url, "--redis-namespace", namespace,
                             "--log-level", "WARNING", "bench.peers.kickq_jobs")
            roots.append(spawn(cmd, logdir / f"kickq-supervisor-{i}.log", env))
        try:
            times = wait_done("kickq", args.jobs, roots, args.timeout, logdir)
            for meter in meters:
                meter.stop()
        finally:
            stop(roots)
        elapsed = times["last"] - started
        per_master = {}
        for i, meter in enumerate(meters):
            own = counts[i] if i < n_namespaces else 0
            per_master[f"master{i + 1}"] = {
                "jobs": own, "redis_cpu": meter.per_job(args.jobs),
                **({"redis_cpu_own_jobs": meter.per_job(own)} if own else {})}
        before = {k: sum(m.before[k] for m in meters if m.before) for k in meters[0].before or {}}
        after = {k: sum(m.after[k] for m in meters if m.after) for k in meters[0].after or {}}
        return {"seconds": elapsed, "rate": args.jobs / elapsed, "fill_seconds": fill_seconds,
                "first_completion": times["first"] - started,
                "steady_rate": (args.jobs - times["first_count"]) / max(1e-9, times["last"] - times["first"]),
                "namespaces": n_namespaces, "supervisors": n_supervisors, "workers_each": args.workers,
                "redis_cpu": redis_cpu.per_job(before, after, args.jobs), "masters": per_master,
                "cluster": facts}
    finally:
        for client in clients:
            client.close()
