"""SAQ: enqueue one by one, or gathered as Queue.map does; n `saq` processes; Queue.listen for results."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from saq import Queue
from saq.job import TERMINAL_STATUSES

from .base import AsyncAdapter, module_cmd, spawn, worker_env

GATHER = 1000  # enqueues in flight at once in the bulk case


class SaqAdapter(AsyncAdapter):
    name = "saq"
    label = "SAQ"
    package = "saq"
    variants = {"default": "n saq processes (concurrency 10 each)"}
    io_variants = {"2 × 8": "2 saq processes, concurrency 8 each"}
    bulk_label = f"asyncio.gather(enqueue), {GATHER} at a time (as Queue.map enqueues)"
    notes = ("enqueue-to-result: Queue.listen (pub/sub) subscribed before the enqueue, then Queue.job; "
             "not Queue.apply (a 0.5 s poll) nor Job.refresh(until_complete), which can miss a job that "
             "finishes between its read and its subscribe")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.queue = Queue.from_url(url, name="bench")
        self.run(self.queue.connect())

    def enqueue_one(self, count: int) -> None:
        async def go() -> None:
            enqueue = self.queue.enqueue
            for i in range(count):
                await enqueue("noop", i=i)
        self.run(go())

    def enqueue_bulk(self, count: int) -> None:  # type: ignore[override]
        async def go() -> None:
            enqueue = self.queue.enqueue
            for start in range(0, count, GATHER):
                stop = min(count, start + GATHER)
                await asyncio.gather(*(enqueue("noop", i=i) for i in range(start, stop)))
        self.run(go())

    def queued(self) -> int:
        return int(self.run(self.queue.count("queued")))

    def roundtrip(self, t0: float) -> None:
        # What Job.refresh(until_complete) does, in the order that cannot miss the completion:
        # refresh() reads the job and only then subscribes, so a job finished in between is
        # only noticed at its timeout. Here the listener is subscribed before the enqueue.
        async def go() -> Any:
            key = uuid.uuid4().hex
            listener = asyncio.ensure_future(self.queue.listen(
                [key], lambda _key, status: status in TERMINAL_STATUSES, timeout=10))
            for _ in range(3):
                await asyncio.sleep(0)  # let it subscribe
            await self.queue.enqueue("lat", key=key, t0=t0)
            await listener
            job = await self.queue.job(key)
            return job.result if job else None
        if self.run(go()) != 1:
            raise RuntimeError("SAQ latency job returned something else")

    def start_workers(self, n: int, variant: str, logdir: Path, **kw: Any) -> list:
        cmd = module_cmd("saq", "bench.peers.saq_jobs.settings")
        return [spawn(cmd, logdir / f"saq-{i}.log") for i in range(n)]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        cmd = module_cmd("saq", "bench.peers.saq_jobs.settings")
        env = worker_env({"BENCH_SAQ_CONCURRENCY": "8"})
        return [spawn(cmd, logdir / f"saq-{i}.log", env) for i in range(2)]

    def close(self) -> None:
        self.run(self.queue.disconnect())
        super().close()
