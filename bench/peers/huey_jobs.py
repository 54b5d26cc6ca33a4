"""Huey instance and tasks (`huey_consumer bench.peers.huey_jobs.huey`). RedisHuey, blocking dequeue."""
import os

from huey import RedisHuey

from bench.peers import body

# notify_result: a waiter BLPOPs for the result instead of polling with backoff (huey's own option).
huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], notify_result=True)


@huey.task()
def noop(i=None):
    return body.run()


@huey.task()
def lat(t0):
    return body.run(t0)
