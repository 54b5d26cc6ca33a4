"""Shared fixtures.

The session starts its own redis-server on a free port of 127.0.0.1 (no
persistence, data dir in a temp dir). Set KICKQ_TEST_REDIS_URL to use an
existing server instead (then nothing is started; every test still gets its
own key namespace). Set KICKQ_REDIS_SERVER to pick the redis-server binary.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.helpers import new_namespace, redis_server_binary, start_redis, stop_redis

TEST_REDIS_URL_ENV = "KICKQ_TEST_REDIS_URL"


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int
    url: str
    # None when using an external server (KICKQ_TEST_REDIS_URL).
    process: subprocess.Popen | None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    external = os.environ.get(TEST_REDIS_URL_ENV)
    if external:
        parsed = urlparse(external)
        yield RedisServer(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 6379,
            url=external,
            process=None,
        )
        return

    if redis_server_binary() is None:
        pytest.exit(
            "kickq tests need Redis: no `redis-server` binary on PATH and "
            f"{TEST_REDIS_URL_ENV} is not set. Install redis-server "
            "(apt-get install redis-server) or point "
            f"{TEST_REDIS_URL_ENV} at a server (e.g. redis://127.0.0.1:6379/0).",
            returncode=3,
        )

    host = "127.0.0.1"
    proc, port = start_redis(tmp_path_factory.mktemp("redis"), host=host)
    try:
        yield RedisServer(host=host, port=port, url=f"redis://{host}:{port}/0", process=proc)
    finally:
        stop_redis(proc)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A unique key namespace per test, like ``kt-1a2b3c4d``."""
    return new_namespace()


@pytest.fixture
def kq_config(redis_url: str, namespace: str) -> Iterator[dict[str, Any]]:
    """Configure kickq for this test's server and namespace; reset afterwards.

    Yields the keyword arguments that were passed to kickq.config().
    """
    import kickq  # lazily: keep collection working while kickq is in flux

    settings: dict[str, Any] = {"redis_url": redis_url, "redis_namespace": namespace}
    kickq.reset()
    kickq.config(**settings)
    try:
        yield settings
    finally:
        kickq.reset()


@pytest.fixture
def r(redis_url: str) -> Iterator[Any]:
    """A redis-py client (decode_responses=True) on the test server."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def kq(kq_config):
    """A kickq.Kickq client on this test's server and namespace, closed afterwards."""
    import kickq

    client = kickq.Kickq()
    try:
        yield client
    finally:
        client.close()
