"""kickq: create / create_many; kickq-supervisor(s) with concurrent_jobs n; the hotjob round trip."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import kickq
from kickq.keys import Keys

from .base import Adapter, module_cmd, spawn, worker_env

NAMESPACE = "bench"  # the supervisors get it by flag; kickq_jobs is imported by workers only


class KickqAdapter(Adapter):
    name = "kickq"
    label = "kickq"
    package = "kickq"
    variants = {"default": "kickq-supervisor, one registration with concurrent_jobs n"}
    io_variants = {
        "16 processes": "kickq-supervisor, concurrent_jobs 16, sync handler (time.sleep)",
        "dense async": "kickq-supervisor, concurrent_jobs 2, jobs_per_worker 8, async handler "
                       "(asyncio.sleep)",
        "dense sync": "kickq-supervisor, concurrent_jobs 2, jobs_per_worker 8, sync handler (time.sleep)",
        "dense async 1 × 16": "kickq-supervisor, concurrent_jobs 1, jobs_per_worker 16, async handler "
                              "(asyncio.sleep)",
    }
    bulk_label = "create_many"
    notes = "kickq-supervisor --log-level WARNING; hotjob round trip for enqueue-to-result"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.client = kickq.Kickq(redis_url=url, redis_namespace=NAMESPACE)
        self.client.redis.ping()  # connect and load scripts outside the timed part
        self.keys = Keys(NAMESPACE)

    def enqueue_one(self, count: int) -> None:
        create = self.client.create
        for i in range(count):
            create("bench", {"i": i})

    def enqueue_bulk(self, count: int) -> None:  # type: ignore[override]
        self.client.create_many([("bench", {"i": i}) for i in range(count)])

    def queued(self) -> int:
        return int(self.redis.llen(self.keys.queue("bench")))

    def roundtrip(self, t0: float) -> None:
        job = self.client.create("bench", {"t0": t0}, {"hotjob": True, "hotjob_timeout": 10})
        done = job.hotjob_promise.result(timeout=15)
        if done.result != 1:
            raise RuntimeError(f"hotjob {job.id} came back {done.state} {done.result!r}")

    def start_workers(self, n: int, variant: str, logdir: Path, supervisors: int = 1,
                      mode: str = "bench", extra_env: dict[str, str] | None = None, **kw: Any) -> list:
        env = worker_env({"BENCH_KICKQ_WORKERS": str(n), "BENCH_KICKQ_MODE": mode, **(extra_env or {})})
        cmd = module_cmd("kickq_supervisor", "--redis-url", self.url, "--redis-namespace", NAMESPACE,
                         "--log-level", "WARNING", "bench.peers.kickq_jobs")
        return [spawn(cmd, logdir / f"kickq-supervisor-{i}.log", env) for i in range(supervisors)]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        mode, workers = {"16 processes": ("bench", 16), "dense async": ("dense-async", 2),
                         "dense sync": ("dense-sync", 2), "dense async 1 × 16": ("dense-async", 1)}[variant]
        return self.start_workers(workers, variant, logdir, mode=mode)

    def close(self) -> None:
        self.client.close()
        super().close()
