"""RQ: Queue.enqueue / enqueue_many; `rq worker` (fork per job) or SimpleWorker; Job.latest_result."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rq import Queue

try:  # `rq worker-pool`, the CLI's way to run several workers (rq >= 1.14)
    import rq.worker_pool  # noqa: F401
    HAS_POOL = True
except ImportError:
    HAS_POOL = False

from . import rq_jobs
from .base import Adapter, module_cmd, spawn


class RQAdapter(Adapter):
    name = "rq"
    label = "RQ"
    package = "rq"
    variants = {"fork": "rq worker (default Worker: a fork per job)", "simple": "rq worker -w SimpleWorker"}
    io_variants = ({"worker-pool 16": "rq worker-pool -n 16 (a fork per job)"} if HAS_POOL
                   else {"16 workers": "16 rq worker processes (a fork per job)"})
    bulk_label = "Queue.enqueue_many"
    notes = "enqueue-to-result: Job.latest_result(timeout) (XREAD on the result stream)"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.queue = Queue("bench", connection=self.redis)

    def enqueue_one(self, count: int) -> None:
        enqueue, fn = self.queue.enqueue, rq_jobs.noop
        for i in range(count):
            enqueue(fn, i)

    def enqueue_bulk(self, count: int) -> None:  # type: ignore[override]
        prepare, fn = Queue.prepare_data, rq_jobs.noop
        self.queue.enqueue_many([prepare(fn, (i,)) for i in range(count)])

    def queued(self) -> int:
        return int(self.queue.count)

    def roundtrip(self, t0: float) -> None:
        job = self.queue.enqueue(rq_jobs.lat, t0)
        result = job.latest_result(timeout=10)
        if result is None or result.return_value != 1:
            raise RuntimeError(f"RQ job {job.id}: no result ({result!r})")

    def start_workers(self, n: int, variant: str, logdir: Path, **kw: Any) -> list:
        cmd = module_cmd("rq.cli", "worker", "-u", self.url, "--logging_level", "WARNING",
                         "--disable-job-desc-logging", "bench")
        if variant == "simple":
            cmd += ["-w", "rq.worker.SimpleWorker"]
        return [spawn(cmd, logdir / f"rq-{variant}-{i}.log") for i in range(n)]

    def start_io_workers(self, variant: str, logdir: Path) -> list:
        if not HAS_POOL:
            return self.start_workers(16, "fork", logdir)
        cmd = module_cmd("rq.cli", "worker-pool", "-u", self.url, "-l", "WARNING", "-n", "16", "bench")
        return [spawn(cmd, logdir / "rq-worker-pool.log")]
