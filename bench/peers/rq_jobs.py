"""RQ job functions (imported by `rq worker` by dotted path)."""
from bench.peers import body


def noop(i=None):
    return body.run()


def lat(t0):
    return body.run(t0)
