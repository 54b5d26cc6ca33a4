"""connection.Lane: the Kickq client's single script calls on a connection per thread, outside the
pool. Same behaviour as the pool's: reloads after SCRIPT FLUSH, reconnects a connection the server
closed, one connection per thread and per process, all closed by Kickq.close()."""
from __future__ import annotations

import os
import threading

import pytest

from tests.helpers import wait_until


@pytest.fixture
def lane_clients(r):
    """Client ids of the connections opened during the test that ran a create (a script call) last."""
    before = {c["id"] for c in r.client_list()}
    return lambda r: {c["id"] for c in r.client_list()
                      if c["cmd"] in ("fcall", "evalsha") and c["id"] not in before}


def test_creates_use_one_connection_outside_the_pool(kq, r, lane_clients):
    kq.create("a")
    pool = kq.redis.connection_pool
    in_pool = len(pool._available_connections) + len(pool._in_use_connections)
    for _ in range(20):
        kq.create("a")
    assert len(pool._available_connections) + len(pool._in_use_connections) == in_pool
    assert len(lane_clients(r)) == 1


def test_create_after_script_flush(kq, r):
    kq.create("a")
    r.script_flush()
    assert kq.create("a", {"x": 1}).data == {"x": 1}
    assert kq.get("2").data == {"x": 1}


def test_create_after_the_server_closed_the_connection(kq, r, lane_clients):
    kq.create("a")
    [lane] = lane_clients(r)
    assert r.client_kill_filter(_id=lane) == 1
    job = kq.create("a")  # not RedisUnavailable: the closed connection is opened again
    assert kq.get(job.id).state == "new"
    assert lane not in lane_clients(r)


def test_each_thread_has_its_own_connection(kq, r, lane_clients):
    kq.create("a")
    ids = []
    barrier = threading.Barrier(3)

    def create():
        barrier.wait()
        ids.append(kq.create("a").id)
    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids, key=int) == ["2", "3", "4"]
    lane = kq._lane  # held, so that only close() can end its connections
    assert lane is not None
    kq.close()
    assert wait_until(lambda: not lane_clients(r), timeout=5)


def test_a_forked_child_opens_its_own_connection(kq, r, lane_clients):
    kq.create("a")
    [parent_lane] = lane_clients(r)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if kq.create("a").id == "2" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert kq.create("a").id == "3"  # the parent's connection still works: the child left it alone
    assert parent_lane in lane_clients(r)


def test_a_server_that_never_answers_costs_one_timeout_per_call():
    # A frozen Redis (SIGSTOP) still completes TCP handshakes: each call must fail after one
    # redis_timeout, not after a connect and a reconnect.
    import socket
    import time

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from kickq.connection import Lane
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)  # never accepts, never answers
    try:
        client = redis.Redis(host="127.0.0.1", port=frozen.getsockname()[1], socket_timeout=0.4,
                             socket_connect_timeout=0.4, retry=Retry(NoBackoff(), 0))
        lane = Lane(client)
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
                lane.execute(("EVAL", "return 1", 0))
            assert time.monotonic() - began < 0.75
        lane.close()
    finally:
        frozen.close()
