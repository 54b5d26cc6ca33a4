"""Celery app and tasks (`celery -A bench.peers.celery_jobs worker`). Broker and backend: Redis."""
import os

from celery import Celery

from bench.peers import body

URL = os.environ["BENCH_REDIS_URL"]
app = Celery("bench", broker=URL, backend=URL)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="bench.noop", ignore_result=True)
def noop(i=None):
    return body.run()


@app.task(name="bench.lat")
def lat(t0):
    return body.run(t0)
