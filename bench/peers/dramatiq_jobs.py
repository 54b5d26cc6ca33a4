"""Dramatiq broker and actors (`dramatiq bench.peers.dramatiq_jobs`). Redis broker and results."""
import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from bench.peers import body

URL = os.environ["BENCH_REDIS_URL"]
broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench")
def noop(i=None):
    return body.run()


@dramatiq.actor(queue_name="bench", store_results=True)
def lat(t0):
    return body.run(t0)
