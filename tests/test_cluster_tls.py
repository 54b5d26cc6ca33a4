"""rediss+cluster://: kickq on a Redis Cluster that speaks TLS only (tests/topology.py with
tls=...: client port, cluster bus and replication over TLS; a test CA from make_certs). The
library, kickq.aio, a real kickq-supervisor and the kickq command all verify the nodes against
the CA, given as redis_options={"ssl_ca_certs": ...} or in the URL's query (the kickq command
has no other way); a wrong CA and a plain URL fail with RedisUnavailable within redis_timeout."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kickq
from kickq import aio, cluster as kickq_cluster
from tests.conftest import TEST_CLUSTER_URL_ENV
from tests.helpers import make_certs, ping, redis_server_binary, wait_until
from tests.supervisor.conftest import Supervisor
from tests.topology import Cluster, redis_cli_binary, start_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[1]
HOT = {"hotjob": True, "hotjob_timeout": 15}
#: The redis_timeout of the failing cases: each must end within it (and a little scheduling).
FAIL_TIMEOUT = 2.0
MARGIN = 1.0


@dataclass(frozen=True)
class TlsCluster:
    cluster: Cluster
    certs: dict[str, Path]

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def ca(self) -> dict[str, str]:
        """The client options that trust the test CA."""
        return {"ssl_ca_certs": str(self.certs["ca.crt"])}

    def url_with_ca(self) -> str:
        return f"{self.url}?ssl_ca_certs={self.certs['ca.crt']}"


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    """3 masters, no replicas, TLS only; shared by the module (nothing here changes its topology)."""
    if os.environ.get(TEST_CLUSTER_URL_ENV):
        pytest.skip(f"{TEST_CLUSTER_URL_ENV} is set: this session starts no cluster of its own")
    if redis_server_binary() is None or redis_cli_binary() is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server, redis-cli and openssl")
    root = tmp_path_factory.mktemp("cluster-tls")
    certs = make_certs(root / "certs")
    cluster = start_cluster(root / "nodes", masters=3, replicas_per_master=0, refuse=pytest.skip, tls=certs)
    try:
        yield TlsCluster(cluster, certs)
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def fresh_config() -> Iterator[None]:
    kickq.reset()
    yield
    kickq.reset()


def test_the_url_is_rediss_cluster_and_every_node_port_is_tls_only(tls_cluster):
    assert tls_cluster.url.startswith("rediss+cluster://")
    for node in tls_cluster.cluster.nodes:
        assert ping(node.host, node.port, tls_ca=tls_cluster.certs["ca.crt"])
        assert not ping(node.host, node.port)


def test_jobs_on_every_master_over_tls(tls_cluster):
    cluster = tls_cluster.cluster
    for master in cluster.masters():
        ns = cluster.namespace_on(master, "kt")
        with kickq.Kickq(redis_url=tls_cluster.url, redis_namespace=ns, redis_options=tls_cluster.ca) as kq:
            one = kq.create("tls", {"n": 0})
            many = kq.create_many([("tls", {"n": 1}), ("tls", {"n": 2}, {"delay": 60})])
            assert [kq.get(j.id).data for j in (one, *many)] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert kq.get(many[1].id).state == "delayed"
            assert kq.delete(one.id) is True
            with pytest.raises(kickq.JobNotFound):
                kq.get(one.id)
        # The CA in the URL's query instead: the same jobs, from another client.
        with kickq.Kickq(redis_url=tls_cluster.url_with_ca(), redis_namespace=ns) as kq:
            assert kq.get(many[0].id).data == {"n": 1}
        # Every key of the namespace is on its master (read with the harness' TLS client).
        assert list(cluster.client(master).scan_iter(match="{" + ns + "}:*", count=1000))
        assert all(not list(cluster.client(m).scan_iter(match="{" + ns + "}:*", count=1000))
                   for m in cluster.masters() if m is not master)


def test_tls_from_the_options_or_the_query_of_a_redis_cluster_url(tls_cluster):
    """ssl=True (as redis-py's Redis and RedisCluster take it), in redis_options or the query."""
    ns = tls_cluster.cluster.namespace_on(tls_cluster.cluster.masters()[0], "kt")
    plain_scheme = tls_cluster.url.replace("rediss+cluster://", "redis+cluster://")
    for settings in ({"redis_url": plain_scheme, "redis_options": {"ssl": True, **tls_cluster.ca}},
                     {"redis_url": f"{plain_scheme}?ssl=true&ssl_ca_certs={tls_cluster.certs['ca.crt']}"}):
        with kickq.Kickq(redis_namespace=ns, **settings) as kq:
            assert kq.get(kq.create("tls", "ssl").id).data == "ssl"


def test_tls_options_reach_the_slot_map_and_only_tls_connections():
    """No Redis: what kickq.cluster makes of the URL and the options."""
    ca = "/etc/kickq/ca.crt"
    nodes, node_url = kickq_cluster.parse_cluster_url(f"rediss+cluster://a:1,b:2?ssl_ca_certs={ca}")
    assert (nodes, node_url) == ([("a", 1), ("b", 2)], f"rediss://a:1/0?ssl_ca_certs={ca}")
    for url, options in ((f"rediss+cluster://a:1?ssl_ca_certs={ca}", {}),
                         ("rediss+cluster://a:1", {"ssl_ca_certs": ca}),
                         ("redis+cluster://a:1", {"ssl": True, "ssl_ca_certs": ca})):
        kwargs = kickq_cluster.pool_kwargs(url, "ns", options, asyncio=False)
        assert kwargs["connection_class"] is kickq_cluster.RoutedSSLConnection
        assert kwargs["ssl_ca_certs"] == ca and "ssl" not in kwargs
        discovery = kickq_cluster.discovery_for(url, kickq_cluster._discovery_options(options))
        assert discovery._kwargs["ssl"] is True and discovery._kwargs["ssl_ca_certs"] == ca
    # A plain URL: the connections take no ssl_* (redis-py's plain Connection refuses them).
    kwargs = kickq_cluster.pool_kwargs("redis+cluster://a:1", "ns", {"ssl_ca_certs": ca}, asyncio=True)
    assert kwargs["connection_class"] is kickq_cluster.AsyncRoutedConnection
    assert not any(k.startswith("ssl") for k in kwargs)


HANDLERS = '''
import kickq

kickq.config(redis_options={ca!r})

def echo(job, data):
    return {{"echo": data}}

kickq.Kickq().process(["tls"], {{"concurrent_jobs": 1}}, echo)
'''


@pytest.fixture
def supervisor(tls_cluster, tmp_path) -> Iterator[tuple[Supervisor, str]]:
    """A real kickq-supervisor --redis-url rediss+cluster://... on a namespace of the second master;
    its module gives the CA by kickq.config(redis_options=...)."""
    ns = tls_cluster.cluster.namespace_on(tls_cluster.cluster.masters()[1], "kt")
    module = tmp_path / "tls_handlers.py"
    module.write_text(HANDLERS.format(ca=tls_cluster.ca))
    log_path = tmp_path / "supervisor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICKQ_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kickq_supervisor", "--kill-grace", "0.2",
                                 "--reaper-interval", "0.2", "--redis-url", tls_cluster.url,
                                 "--redis-namespace", ns, str(module)],
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sup = Supervisor(proc, log_path, ns, tls_cluster.url)
    try:
        wait_until(lambda: proc.poll() is not None or (len(sup.workers()) == 1 and len(sup.reapers()) == 1),
                   timeout=30, interval=0.05, message="1 worker and 1 reaper")
        assert proc.poll() is None, sup.log()[-3000:]
        yield sup, ns
    finally:
        left = sup.destroy()
        print(f"--- supervisor {sup.pid} ---\n{sup.log()[-5000:]}")
        assert not left, f"the supervisor left processes behind: {left}"


def test_a_hotjob_and_a_delayed_job_through_a_real_supervisor(tls_cluster, supervisor):
    sup, ns = supervisor
    with kickq.Kickq(redis_url=tls_cluster.url, redis_namespace=ns, redis_options=tls_cluster.ca) as kq:
        hot = kq.create("tls", "hot", HOT)
        delayed = kq.create("tls", "delayed", {"delay": 0.2})  # queued by the namespace's reaper
        assert hot.hotjob_promise.result(timeout=15).result == {"echo": "hot"}

        def done() -> kickq.Job | None:
            job = kq.get(delayed.id)
            return job if job.state in ("success", "fail") else None

        finished = wait_until(done, timeout=15, interval=0.02, message="the delayed job runs")
        assert (finished.state, finished.result) == ("success", {"echo": "delayed"})
    assert "Traceback" not in sup.log()


def test_asyncio_client_over_tls(tls_cluster):
    ns = tls_cluster.cluster.namespace_on(tls_cluster.cluster.masters()[2], "kt")

    async def main() -> list[Any]:
        settings = {"redis_url": tls_cluster.url, "redis_namespace": ns, "redis_options": tls_cluster.ca}
        async with aio.Kickq(**settings) as akq:
            job = await akq.create("tls", {"aio": 1})
            many = await akq.create_many([("tls", {"aio": 2})])
            return [(await akq.get(j.id)).data for j in (job, *many)]

    assert asyncio.run(main()) == [{"aio": 1}, {"aio": 2}]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICKQ_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "kickq.cli", *args], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_the_kickq_command_takes_the_ca_from_the_url_query(tls_cluster):
    """The kickq command reads no redis_options: the CA goes in the URL's query, which kickq hands
    to both the slot-map client and the namespace's connections."""
    ns = tls_cluster.cluster.namespace_on(tls_cluster.cluster.masters()[0], "kt")
    with kickq.Kickq(redis_url=tls_cluster.url, redis_namespace=ns, redis_options=tls_cluster.ca) as kq:
        kq.create_many([("tls", None), ("tls", None), ("other", None)])
    stats = run_cli("--redis-url", tls_cluster.url_with_ca(), "--redis-namespace", ns, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    names = json.loads(stats.stdout)["names"]
    assert names["tls"]["states"]["new"] == 2 and names["other"]["states"]["new"] == 1


def failure_of(settings: dict[str, Any], ns: str, use_aio: bool = False) -> tuple[BaseException, float]:
    """What creating a job with `settings` raises, and after how long."""
    settings = {"redis_namespace": ns, "redis_timeout": FAIL_TIMEOUT, **settings}
    started = time.monotonic()
    try:
        if use_aio:
            async def main() -> None:
                async with aio.Kickq(**settings) as akq:
                    await akq.create("tls", "must not exist")

            asyncio.run(main())
        else:
            with kickq.Kickq(**settings) as kq:
                kq.create("tls", "must not exist")
    except Exception as exc:  # noqa: BLE001 - the test checks which
        return exc, time.monotonic() - started
    raise AssertionError(f"a job was created with {settings}")


def test_a_certificate_from_another_ca_is_refused_within_redis_timeout(tls_cluster):
    ns = tls_cluster.cluster.namespace_on(tls_cluster.cluster.masters()[0], "kt")
    other_ca = {"ssl_ca_certs": str(tls_cluster.certs["other.crt"])}
    for use_aio in (False, True):
        exc, took = failure_of({"redis_url": tls_cluster.url, "redis_options": other_ca}, ns, use_aio)
        assert isinstance(exc, kickq.RedisUnavailable), repr(exc)
        assert "certificate verify failed" in str(exc).lower(), str(exc)
        assert took <= FAIL_TIMEOUT + MARGIN, (use_aio, took)


@pytest.mark.parametrize("with_ca", [False, True], ids=["no-options", "the-ca-in-options"])
def test_a_plain_cluster_url_at_the_tls_ports_fails_within_redis_timeout(tls_cluster, with_ca):
    """The CA among the options of a plain URL is ignored (as redis-py's Redis does), not a TypeError."""
    ns = tls_cluster.cluster.namespace_on(tls_cluster.cluster.masters()[0], "kt")
    plain = tls_cluster.url.replace("rediss+cluster://", "redis+cluster://")
    options = tls_cluster.ca if with_ca else {}
    exc, took = failure_of({"redis_url": plain, "redis_options": options}, ns)
    assert isinstance(exc, kickq.RedisUnavailable), repr(exc)
    assert "cannot read the slot map" in str(exc), str(exc)
    assert took <= FAIL_TIMEOUT + MARGIN, took

