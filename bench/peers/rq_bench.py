"""RQ: Queue.enqueue / enqueue_many; `rq worker` (fork per job) or SimpleWorker; Job.latest_result."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rq import Queue

from . import rq_jobs
from .base import Adapter, module_cmd, spawn


class RQAdapter(Adapter):
    name = "rq"
    label = "RQ"
    package = "rq"
    variants = {"fork": "rq worker (default Worker: a fork per job)", "simple": "rq worker -w SimpleWorker"}
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
