"""Checks of the test infrastructure itself (conftest.py, helpers.py)."""
from __future__ import annotations

import re

import pytest

from tests.helpers import (
    free_port,
    new_namespace,
    ping,
    redis_server_binary,
    start_redis,
    stop_redis,
    wait_until,
)

_seen_namespaces: list[str] = []


def test_redis_server_answers_ping(redis_server, r):
    assert r.ping() is True
    assert ping(redis_server.host, redis_server.port)
    assert redis_server.url.startswith("redis://")
    assert str(redis_server.port) in redis_server.url


@pytest.mark.parametrize("i", range(2))
def test_namespace_unique_per_test(namespace, i):
    assert re.fullmatch(r"kt-[0-9a-f]{8}", namespace)
    assert namespace not in _seen_namespaces
    _seen_namespaces.append(namespace)
    assert namespace != new_namespace()


def test_wait_until():
    calls = []

    def predicate():
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert wait_until(predicate, timeout=5) == 3
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, timeout=0.05, message="never true")


def test_start_redis_private_server(tmp_path):
    pytest.importorskip("redis")
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary")
    proc, port = start_redis(tmp_path, "--appendonly", "yes")
    try:
        assert ping("127.0.0.1", port)
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("save") == {"save": ""}
        client.close()
    finally:
        stop_redis(proc)
    assert proc.returncode is not None
    assert isinstance(free_port(), int)
