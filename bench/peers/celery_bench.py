"""Celery: apply_async / group(...).apply_async; one prefork worker with -c n; AsyncResult.get."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import group

from . import celery_jobs
from .base import Adapter, module_cmd, spawn


class CeleryAdapter(Adapter):
    name = "celery"
    label = "Celery"
    package = "celery"
    variants = {"default": "celery worker -P prefork -c n"}
    io_variants = {"prefork 16": "celery worker -P prefork -c 16",
                   "threads 16": "celery worker -P threads -c 16"}
    bulk_label = "group(...).apply_async()"
    notes = ("worker --without-heartbeat --without-gossip --without-mingle; the no-op task has "
             "ignore_result=True, the latency task stores its result in the Redis backend")

    def enqueue_one(self, count: int) -> None:
        send = celery_jobs.noop.apply_async
        for i in range(count):
            send((i,))

    def enqueue_bulk(self, count: int) -> None:  # type: ignore[override]
        sig = celery_jobs.noop.s
        group(sig(i) for i in range(count)).apply_async()

    def queued(self) -> int:
        return int(self.redis.llen("celery"))

    def roundtrip(self, t0: float) -> None:
        if celery_jobs.lat.delay(t0).get(timeout=10) != 1:
            raise RuntimeError("Celery latency task returned something else")

    def start_workers(self, n: int, variant: str, logdir: Path, pool: str = "prefork", **kw: Any) -> list:
        cmd = module_cmd("celery", "-A", "bench.peers.celery_jobs", "worker", "-P", pool, "-c", str(n),
                         "-l", "WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle")
        return [spawn(cmd, logdir / "celery.log")]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        return self.start_workers(16, variant, logdir, pool=variant.split()[0])
