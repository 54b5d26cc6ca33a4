"""arq: enqueue_job one by one (no bulk API); n `arq` worker processes; Job.result(poll_delay)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings

from .arq_jobs import POLL_DELAY
from .base import AsyncAdapter, module_cmd, spawn, worker_env


class ArqAdapter(AsyncAdapter):
    name = "arq"
    label = "arq"
    package = "arq"
    variants = {"default": "n arq worker processes (max_jobs 10 each)"}
    io_variants = {"2 × 8": "2 arq worker processes, max_jobs 8 each"}
    bulk_label = None
    notes = (f"worker poll_delay {POLL_DELAY:g} s (default 0.5 s); Job.result(poll_delay=0.001); "
             "its own interpreter (arq needs redis-py < 6)")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.pool = self.run(create_pool(RedisSettings.from_dsn(url)))

    def enqueue_one(self, count: int) -> None:
        async def go() -> None:
            enqueue = self.pool.enqueue_job
            for i in range(count):
                await enqueue("noop", i)
        self.run(go())

    def queued(self) -> int:
        return int(self.redis.zcard("arq:queue"))

    def roundtrip(self, t0: float) -> None:
        async def go() -> Any:
            job = await self.pool.enqueue_job("lat", t0)
            return await job.result(timeout=10, poll_delay=0.001)
        if self.run(go()) != 1:
            raise RuntimeError("arq latency job returned something else")

    def start_workers(self, n: int, variant: str, logdir: Path, **kw: Any) -> list:
        cmd = module_cmd("arq", "--custom-log-dict", "bench.peers.arq_jobs.LOG_CONFIG",
                         "bench.peers.arq_jobs.WorkerSettings")
        return [spawn(cmd, logdir / f"arq-{i}.log") for i in range(n)]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        cmd = module_cmd("arq", "--custom-log-dict", "bench.peers.arq_jobs.LOG_CONFIG",
                         "bench.peers.arq_jobs.WorkerSettings")
        env = worker_env({"BENCH_ARQ_MAX_JOBS": "8"})
        return [spawn(cmd, logdir / f"arq-{i}.log", env) for i in range(2)]

    def close(self) -> None:
        self.run(self.pool.aclose())
        super().close()
