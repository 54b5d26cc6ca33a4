"""One small adapter per queue (``<name>_bench.py``) and its importable job module (``<name>_jobs.py``).

Every adapter has the interface of :class:`bench.peers.base.Adapter`; every job module runs the same
body, :mod:`bench.peers.body`. Worker processes import the job modules, so they run with the
repository root on PYTHONPATH and the Redis URL in BENCH_REDIS_URL.
"""

# name -> module under bench.peers, in the order of the tables.
PEERS = {
    "kickq": "kickq_bench",
    "rq": "rq_bench",
    "celery": "celery_bench",
    "dramatiq": "dramatiq_bench",
    "huey": "huey_bench",
    "arq": "arq_bench",
    "saq": "saq_bench",
}
