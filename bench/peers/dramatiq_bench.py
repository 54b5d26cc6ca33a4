"""Dramatiq: actor.send / group(...).run(); n processes with 1 thread each; Message.get_result(block)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dramatiq import group

from . import dramatiq_jobs
from .base import Adapter, module_cmd, spawn


class DramatiqAdapter(Adapter):
    name = "dramatiq"
    label = "Dramatiq"
    package = "dramatiq"
    variants = {"default": "dramatiq -p n -t 1"}
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
        cmd = module_cmd("dramatiq", "bench.peers.dramatiq_jobs", "-p", str(n), "-t", "1", "-Q", "bench")
        return [spawn(cmd, logdir / "dramatiq.log")]
