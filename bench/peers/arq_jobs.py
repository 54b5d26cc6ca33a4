"""arq functions and WorkerSettings (`arq bench.peers.arq_jobs.WorkerSettings`)."""
import os

from arq.connections import RedisSettings

from bench.peers import body

# arq polls its queue (a sorted set) every poll_delay (default 0.5 s); the bench uses a fast poll.
POLL_DELAY = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.005"))

# The CLI logs every job at INFO; the other peers run at WARNING, so does arq.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}


async def noop(ctx, i=None):
    return await body.run_async()


async def lat(ctx, t0):
    return await body.run_async(t0)


class WorkerSettings:
    functions = [noop, lat]
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])
    poll_delay = POLL_DELAY
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "10"))  # arq's default 10; the sleep case 8
