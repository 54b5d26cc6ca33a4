"""Shared fixtures.

The session starts its own redis-server on a free port of 127.0.0.1 (no
persistence, data dir in a temp dir). Set KICKQ_TEST_REDIS_URL to use an
existing server instead (then nothing is started; every test still gets its
own key namespace). Set KICKQ_REDIS_SERVER to pick the redis-server binary.
Tests that ask for ``redis_cluster`` get a Redis Cluster (tests/topology.py),
started on first use; KICKQ_TEST_CLUSTER_URL points them at an existing one.
``make_sentinel`` starts a private Redis Sentinel setup (tests/sentinel_topology.py).

KICKQ_TEST_TOPOLOGY=cluster runs the session against that cluster instead of the
single server: ``redis_url`` is the cluster's ``redis+cluster://`` URL, each test's
``namespace`` lives on the next master in turn, and ``r`` is a client pinned to the
master of that namespace (see ``raw_client``). Tests marked ``single_server`` are
skipped then (they need "the" server: restarting it, its whole-server settings...).
"""
from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytest

from tests.helpers import new_namespace, raw_client, redis_server_binary, start_redis, stop_redis

if TYPE_CHECKING:
    from tests.sentinel_topology import SentinelFactory
    from tests.topology import Cluster, ClusterFactory

TEST_REDIS_URL_ENV = "KICKQ_TEST_REDIS_URL"
TOPOLOGY_ENV = "KICKQ_TEST_TOPOLOGY"
TOPOLOGIES = ("single", "cluster")


def topology() -> str:
    """The topology the session's tests run against: "single" (default) or "cluster"."""
    value = os.environ.get(TOPOLOGY_ENV, "single").strip().lower() or "single"
    if value not in TOPOLOGIES:
        raise pytest.UsageError(f"{TOPOLOGY_ENV}={value!r}: expected one of {', '.join(TOPOLOGIES)}")
    return value


ON_CLUSTER = topology() == "cluster"


def pytest_report_header(config: pytest.Config) -> str:
    return f"kickq test topology: {topology()} ({TOPOLOGY_ENV})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ON_CLUSTER:
        return
    for item in items:
        marker = item.get_closest_marker("single_server")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"needs a single server: {reason}"))


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
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL the test's kickq clients use: the session server's, or (topology cluster) the
    session cluster's ``redis+cluster://`` URL."""
    if ON_CLUSTER:
        return request.getfixturevalue("redis_cluster").url  # type: ignore[no-any-return]
    return request.getfixturevalue("redis_server").url  # type: ignore[no-any-return]


_namespace_turn = itertools.count()


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A unique key namespace per test, like ``kt-1a2b3c4d``; on the cluster topology, one whose
    slot the next master in turn holds (so a session spreads its tests over every master)."""
    if ON_CLUSTER:
        cluster = request.getfixturevalue("redis_cluster")
        masters = cluster.masters()
        return cluster.namespace_on(masters[next(_namespace_turn) % len(masters)], "kt")  # type: ignore[no-any-return]
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
def r(redis_url: str, namespace: str) -> Iterator[Any]:
    """A redis-py client (decode_responses=True) on the test server; on a cluster, pinned to the
    master of the test's namespace (raw_client)."""
    client = raw_client(redis_url, namespace)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def every_server(request: pytest.FixtureRequest, r: Any) -> list[Any]:
    """A client on each server of the topology, for what every server must hold alike (an ACL
    user): ``[r]`` on a single server; every node of the cluster (replicas too: a client may read
    the slot map from any node)."""
    if ON_CLUSTER:
        cluster = request.getfixturevalue("redis_cluster")
        return [cluster.client(n) for n in cluster.running_nodes()]
    return [r]


@pytest.fixture
def kq(kq_config):
    """A kickq.Kickq client on this test's server and namespace, closed afterwards."""
    import kickq

    client = kickq.Kickq()
    try:
        yield client
    finally:
        client.close()


# --- Redis Cluster (tests/topology.py) --------------------------------------

TEST_CLUSTER_URL_ENV = "KICKQ_TEST_CLUSTER_URL"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster of 3 masters with a replica each, shared by the session.

    Started the first time a test asks for it (about 4 s on a 2-core machine), so a
    session without cluster tests starts nothing. Set KICKQ_TEST_CLUSTER_URL to
    ``redis+cluster://host:port,host:port`` to use an existing cluster instead: then
    nothing is started, and a test that moves a slot or kills a node is skipped.

    Tests that change the topology leave it whole for the tests after them: a slot
    move always ends (SlotMove finishes on exit), and a test that kills a master
    restarts it before it ends (it comes back as the replica of the node that took
    its slots, so which nodes are masters changes; ask ``masters()``/``owner_of()``,
    never remember ports). A test that needs another shape uses ``make_cluster``.
    """
    from tests.topology import Cluster, redis_cli_binary, start_cluster

    external = os.environ.get(TEST_CLUSTER_URL_ENV)
    if external:
        cluster = Cluster.attach(external, refuse=pytest.skip)
    else:
        if redis_server_binary() is None or redis_cli_binary() is None:
            missing = (
                "Redis Cluster tests need redis-server and redis-cli (apt-get install redis-server) "
                f"or {TEST_CLUSTER_URL_ENV}"
            )
            if ON_CLUSTER:  # every test would be skipped: a pass that tested nothing
                pytest.exit(f"{TOPOLOGY_ENV}=cluster: {missing}", returncode=3)
            pytest.skip(missing)
        cluster = start_cluster(tmp_path_factory.mktemp("cluster"), refuse=pytest.skip)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """A factory of private clusters for one test: ``make_cluster(masters=3,
    replicas_per_master=1, node_timeout_ms=2000, tls=None)`` (``tls``: make_certs' files for a
    TLS-only cluster); all are stopped when the test ends.
    Skips when KICKQ_TEST_CLUSTER_URL is set (this session starts no Redis then)."""
    from tests.topology import ClusterFactory, redis_cli_binary

    if os.environ.get(TEST_CLUSTER_URL_ENV):
        pytest.skip(f"{TEST_CLUSTER_URL_ENV} is set: this session starts no cluster of its own")
    if redis_server_binary() is None or redis_cli_binary() is None:
        pytest.skip("Redis Cluster tests need redis-server and redis-cli (apt-get install redis-server)")
    factory = ClusterFactory(tmp_path, refuse=pytest.skip)
    try:
        yield factory
    finally:
        factory.stop_all()


# --- Redis Sentinel (tests/sentinel_topology.py) ----------------------------


@pytest.fixture
def make_sentinel(tmp_path: Path) -> Iterator[SentinelFactory]:
    """A factory of private Sentinel setups for one test: ``make_sentinel(replicas=2,
    sentinels=3, service="kq", down_after_ms=1000, failover_timeout_ms=3000)`` starts a
    master, its replicas and the sentinels (about 3 s on a 2-core machine); all are
    stopped when the test ends."""
    from tests.sentinel_topology import SentinelFactory

    if redis_server_binary() is None:
        pytest.skip("Redis Sentinel tests need redis-server (apt-get install redis-server)")
    factory = SentinelFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
