"""Huey: task(i) one by one (no bulk API); huey_consumer -w n -k process; Result.get(blocking=True)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import huey_jobs
from .base import Adapter, module_cmd, spawn


class HueyAdapter(Adapter):
    name = "huey"
    label = "Huey"
    package = "huey"
    variants = {"default": "huey_consumer -w n -k process -q"}
    io_variants = {"16 threads": "huey_consumer -w 16 -k thread -q (one process)"}
    bulk_label = None
    notes = "RedisHuey(notify_result=True) so a result waiter blocks on Redis instead of polling"

    def enqueue_one(self, count: int) -> None:
        task = huey_jobs.noop
        for i in range(count):
            task(i)

    def queued(self) -> int:
        return int(huey_jobs.huey.pending_count())

    def roundtrip(self, t0: float) -> None:
        if huey_jobs.lat(t0).get(blocking=True, timeout=10) != 1:
            raise RuntimeError("Huey latency task returned something else")

    def start_workers(self, n: int, variant: str, logdir: Path, **kw: Any) -> list:
        cmd = module_cmd("huey.bin.huey_consumer", "bench.peers.huey_jobs.huey",
                         "-w", str(n), "-k", "process", "-q")
        return [spawn(cmd, logdir / "huey.log")]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        cmd = module_cmd("huey.bin.huey_consumer", "bench.peers.huey_jobs.huey",
                         "-w", "16", "-k", "thread", "-q")
        return [spawn(cmd, logdir / "huey.log")]
