"""connection.Lane: the Kickq client's single script calls on a connection per thread, taken from
redis-py's pool, packed by hiredis where it is installed. Same behaviour as redis-py's
execute_command: reloads after SCRIPT FLUSH (FUNCTION FLUSH: test_functions.py), reconnects a
connection the server closed, a forked child's own connection, redis-py's replies and error
classes, no automatic retry; a thread's connection goes back to the pool when the thread ends."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import kickq
from kickq.connection import Lane, hiredis_packs
from kickq.errors import RedisUnavailable
from tests.helpers import wait_until

try:
    import hiredis  # noqa: F401 - packs the commands when installed (an extra: tox runs without it)
    HIREDIS = True
except ImportError:
    HIREDIS = False


def script_clients(r: redis.Redis, before: set[int]) -> set[int]:
    """Ids of the connections opened after `before` whose last command was a script call."""
    return {c["id"] for c in r.client_list() if c["cmd"] in ("fcall", "evalsha") and c["id"] not in before}


def client_ids(r: redis.Redis) -> set[int]:
    return {c["id"] for c in r.client_list()}


def test_creates_one_by_one_reuse_one_connection(kq, r):
    kq.create("a")  # may load the scripts first, on another connection of the pool
    before = client_ids(r)
    for _ in range(20):
        kq.create("a")
    assert client_ids(r) == before


def test_a_threads_connection_goes_back_to_the_pool_when_the_thread_ends(kq, r):
    before = client_ids(r)
    kq.create("a")
    for _ in range(3):
        thread = threading.Thread(target=kq.create, args=("a",))
        thread.start()
        thread.join()
    assert kq.create("a").id == "5"
    # The main thread's, and one that each thread in turn took from the pool and gave back.
    assert len(client_ids(r) - before) == 2


def test_create_after_script_flush(kq, r):
    kq.create("a")
    r.script_flush()
    assert kq.create("a", {"x": 1}).data == {"x": 1}
    assert kq.get("2").data == {"x": 1}


def test_create_after_the_server_closed_the_connection(kq, r):
    before = client_ids(r)
    kq.create("a")
    [conn] = script_clients(r, before)
    assert r.client_kill_filter(_id=conn) == 1
    job = kq.create("a")  # not RedisUnavailable: the closed connection is opened again
    assert kq.get(job.id).state == "new"
    assert conn not in client_ids(r)


def test_creates_from_several_threads_at_once(kq, r):
    before = client_ids(r)
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
    kq.close()
    assert wait_until(lambda: not script_clients(r, before), timeout=5)


def test_a_forked_child_opens_its_own_connection(kq, r):
    before = client_ids(r)
    kq.create("a")
    [parent_conn] = script_clients(r, before)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            created = kq.create("a").id
            own = script_clients(r, before | {parent_conn})  # r: a connection of the child's too
            code = 0 if created == "2" and len(own) == 1 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert kq.create("a").id == "3"  # the parent's connection still works: the child left it alone
    assert parent_conn in script_clients(r, before)


def test_a_ping_goes_first_once_the_health_check_is_due(kq_config, r):
    # redis-py's health check: a connection idle for longer than health_check_interval is PINGed
    # before its next command, so that a silently dead one fails there and is opened again.
    def pings():
        return r.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
    with kickq.Kickq(redis_options={"health_check_interval": 0.2}) as kq:
        kq.create("a")
        count = pings()
        kq.create("a")
        assert pings() == count  # not due
        idle_since = time.monotonic()
        wait_until(lambda: time.monotonic() - idle_since > 0.25, timeout=5)
        assert kq.create("a").id == "3"
        assert pings() == count + 1


def redis_is_busy(url: str) -> bool:
    """Whether Redis answers no PING within 50 ms (it runs a long script)."""
    probe = redis.Redis.from_url(url, socket_timeout=0.05, socket_connect_timeout=0.05,
                                 retry=Retry(NoBackoff(), 0))
    try:
        probe.ping()
        return False
    except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError):
        return True
    finally:
        probe.close()


def test_a_create_whose_reply_is_late_is_not_sent_again(kq_config, namespace):
    # Redis runs another client's script for 1.5 s, the create times out after 1 s and is applied
    # once the script is over. A retry after that timeout (its reconnect would be answered at
    # 1.5 s, within its own second) would apply it a second time.
    url = kq_config["redis_url"]
    slow = redis.Redis.from_url(url, socket_timeout=10)
    script = ("local t = redis.call('TIME'); local stop = t[1] * 1e6 + t[2] + 1500000 "
              "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop")
    with kickq.Kickq(redis_timeout=1) as kq:
        assert kq.create("a").id == "1"
        busy = threading.Thread(target=slow.eval, args=(script, 0))
        busy.start()
        try:
            wait_until(lambda: redis_is_busy(url), timeout=5)
            with pytest.raises(RedisUnavailable, match="Timeout"):
                kq.create("a")
        finally:
            busy.join()
            slow.close()
        assert kq.create("a").id == "3"  # the late create was job 2, and the only one


def test_a_server_that_never_answers_costs_one_timeout_per_call():
    # A frozen Redis (SIGSTOP) still completes TCP handshakes: each call must fail after one
    # redis_timeout, not after a connect and a reconnect.
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
        client.close()
    finally:
        frozen.close()


@pytest.mark.parametrize("by_hiredis", [
    pytest.param(True, marks=pytest.mark.skipif(not HIREDIS, reason="hiredis is not installed")),
    False], ids=["hiredis-packer", "redis-py-packer"])
def test_replies_and_errors_are_redis_pys(r, by_hiredis):
    client = redis.Redis(connection_pool=r.connection_pool)
    lane = Lane(client)
    assert lane._by_hiredis == HIREDIS
    lane._by_hiredis = by_hiredis
    assert lane.execute(("ECHO", "zé")) == "zé"  # decoded as the client decodes
    assert lane.execute(("EVAL", "return {1, 'a', {2}}", 0)) == [1, "a", [2]]
    assert lane.execute(("ECHO", 1.5)) == "1.5"
    big = "x" * 200_000  # more than one read
    assert lane.execute(("ECHO", big)) == big
    with pytest.raises(redis.exceptions.NoScriptError):
        lane.execute(("EVALSHA", "0" * 40, 0))
    with pytest.raises(redis.exceptions.ResponseError, match="boom"):
        lane.execute(("EVAL", "return redis.error_reply('boom')", 0))
    assert lane.execute(("PING",)) in (True, "PONG")  # the connection is still in step
    built = []
    assert lane.execute(("ECHO", "b"), meanwhile=lambda: built.append(1)) == "b" and built == [1]
    with pytest.raises(ZeroDivisionError):
        lane.execute(("ECHO", "c"), meanwhile=lambda: 1 / 0)
    assert lane.execute(("ECHO", "d")) == "d"  # not "c": that reply went with its connection


def test_text_is_written_as_redis_py_writes_it_in_another_encoding(redis_url):
    # hiredis writes text as UTF-8: for a client with another encoding, redis-py packs. (redis-py
    # 5.0 itself writes UTF-8 there when hiredis is installed; redis-py 8 writes Latin-1.)
    client = redis.Redis.from_url(redis_url, decode_responses=True, encoding="latin-1")
    try:
        assert not hiredis_packs(client)
        assert Lane(client).execute(("ECHO", "zé")) == client.echo("zé")
        assert hiredis_packs(redis.Redis.from_url(redis_url, encoding="UTF8")) == HIREDIS
    finally:
        client.close()


def test_an_error_reply_that_redis_py_classes_as_a_connection_error_is_raised(r):
    # LOADING (Redis reading its data after a restart) is a BusyLoadingError, not a ResponseError.
    lane = Lane(redis.Redis(connection_pool=r.connection_pool))
    with pytest.raises(redis.exceptions.BusyLoadingError):
        lane.execute(("EVAL", "return redis.error_reply('LOADING Redis is loading the dataset')", 0))
    assert lane.execute(("ECHO", "after")) == "after"
