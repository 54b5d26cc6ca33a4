"""Dramatiq: actor.send / group(...).run(); n processes, each with Dramatiq's default 8 worker threads
(as its users run it) or with one thread; Message.get_result(block)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dramatiq import group

from . import dramatiq_jobs
from .base import Adapter, module_cmd, spawn

# variant -> the --threads option it adds (none: the CLI's default, 8 threads per process)
THREADS = {"8 threads": [], "1 thread": ["-t", "1"]}


class DramatiqAdapter(Adapter):
    name = "dramatiq"
    label = "Dramatiq"
    package = "dramatiq"
    variants = {"8 threads": "dramatiq -p n (its default: 8 threads per process)",
                "1 thread": "dramatiq -p n -t 1"}
    io_variants = {"2 × 8 threads": "dramatiq -p 2 -t 8"}
    bulk_label = "group(...).run()"
    notes = "Results middleware with the Redis backend (the latency actor stores results)"

    def enqueue_one(self, count: int) -> None:
        send = dramatiq_jobs.noop.send
        for i in range(count):
            send(i)

    def enqueue_bulk(self, count: int) -> None:  # type: ignore[override]
        message = dramatiq_jobs.noop.message
        group([message(i) for i in range(count)]).run()

    def queued(self) -> int:
        return int(self.redis.hlen("dramatiq:bench.msgs"))

    def roundtrip(self, t0: float) -> None:
        if dramatiq_jobs.lat.send(t0).get_result(block=True, timeout=10_000) != 1:
            raise RuntimeError("Dramatiq latency actor returned something else")

    def start_workers(self, n: int, variant: str, logdir: Path, **kw: Any) -> list:
        cmd = module_cmd("dramatiq", "bench.peers.dramatiq_jobs", "-p", str(n), *THREADS[variant],
                         "-Q", "bench")
        return [spawn(cmd, logdir / f"dramatiq-{variant.replace(' ', '-')}.log")]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        cmd = module_cmd("dramatiq", "bench.peers.dramatiq_jobs", "-p", "2", "-t", "8", "-Q", "bench")
        return [spawn(cmd, logdir / "dramatiq-io.log")]
