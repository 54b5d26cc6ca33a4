"""connection.Lane: the Kickq client's single script calls on a connection per thread, outside the
pool. Same behaviour as the pool's: reloads after SCRIPT FLUSH (FUNCTION FLUSH: test_functions.py),
reconnects a connection the server closed, one connection per thread and per process, all closed by
Kickq.close(); the same replies and errors on its hiredis wire as through redis-py."""
from __future__ import annotations

import os
import threading

import pytest

from tests.helpers import wait_until

try:
    import hiredis  # noqa: F401 - the Lane's wire needs it (an extra: tox runs without it)
    HIREDIS = True
except ImportError:
    HIREDIS = False
needs_hiredis = pytest.mark.skipif(not HIREDIS, reason="the Lane's wire needs hiredis")


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


@pytest.mark.parametrize("lean", [True, False], ids=["hiredis-wire", "redis-py"])
def test_replies_and_errors_are_redis_pys_on_either_path(r, lean):
    import redis

    from kickq.connection import Lane
    client = redis.Redis(connection_pool=r.connection_pool)
    lane = Lane(client, lean=lean)
    try:
        assert lane.execute(("ECHO", "zé")) == "zé"  # decoded as the client decodes
        assert lane.execute(("EVAL", "return {1, 'a', {2}}", 0)) == [1, "a", [2]]
        big = "x" * 200_000  # more than one read
        assert lane.execute(("ECHO", big)) == big
        with pytest.raises(redis.exceptions.NoScriptError):
            lane.execute(("EVALSHA", "0" * 40, 0))
        with pytest.raises(redis.exceptions.ResponseError, match="boom"):
            lane.execute(("EVAL", "return redis.error_reply('boom')", 0))
        assert lane.execute(("PING",)) in (True, "PONG")  # the connection is still in step
        conn = lane._connection()
        assert (lane._wire(conn) is not None) == (lean and HIREDIS)  # tox runs without hiredis
        built = []
        assert lane.execute(("ECHO", "b"), meanwhile=lambda: built.append(1)) == "b" and built == [1]
        with pytest.raises(ZeroDivisionError):
            lane.execute(("ECHO", "c"), meanwhile=lambda: 1 / 0)
        assert lane.execute(("ECHO", "d")) == "d"  # not "c": that reply went with its connection
    finally:
        lane.close()


@needs_hiredis
def test_the_wire_reconnects_after_the_server_closed_its_connection(kq, r, lane_clients):
    kq.create("a")
    [lane] = lane_clients(r)
    assert kq._lane is not None and kq._lane._wire(kq._lane._connection()) is not None
    r.client_kill_filter(_id=lane)
    assert kq.create("a").id == "2"


@needs_hiredis
def test_the_wire_pings_when_the_health_check_is_due(kq, r):
    kq.create("a")
    lane = kq._lane
    assert lane is not None
    conn = lane._connection()
    assert conn.health_check_interval and lane._wire(conn) is not None
    pings = r.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
    kq.create("a")
    assert r.info("commandstats").get("cmdstat_ping", {}).get("calls", 0) == pings  # not due
    conn.next_health_check = 0  # as if the last reply were older than health_check_interval
    assert kq.create("a").id == "3"
    assert r.info("commandstats")["cmdstat_ping"]["calls"] == pings + 1
    assert conn.next_health_check > 0


def test_an_error_reply_that_redis_py_classes_as_a_connection_error_is_raised(r):
    # LOADING (Redis reading its data after a restart) is a BusyLoadingError, not a ResponseError.
    import redis

    from kickq.connection import Lane
    lane = Lane(redis.Redis(connection_pool=r.connection_pool))
    try:
        with pytest.raises(redis.exceptions.BusyLoadingError):
            lane.execute(("EVAL", "return redis.error_reply('LOADING Redis is loading the dataset')", 0))
        assert lane.execute(("ECHO", "after")) == "after"
    finally:
        lane.close()
