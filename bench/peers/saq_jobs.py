"""SAQ queue, functions and settings (`saq bench.peers.saq_jobs.settings`)."""
import os

from saq import Queue

from bench.peers import body

queue = Queue.from_url(os.environ["BENCH_REDIS_URL"], name="bench")


async def noop(ctx, *, i=None):
    return await body.run_async()


async def lat(ctx, *, t0):
    return await body.run_async(t0)


# jobs in flight per process: SAQ's default 10, the sleep case 8 (BENCH_SAQ_CONCURRENCY)
settings = {"queue": queue, "functions": [noop, lat],
            "concurrency": int(os.environ.get("BENCH_SAQ_CONCURRENCY", "10"))}
