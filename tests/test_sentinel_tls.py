"""rediss+sentinel://: kickq on a Redis Sentinel setup that speaks TLS only (tests/sentinel_topology.py
with tls=...: data nodes, replication, the sentinels' links to the nodes and to each other over TLS; a
test CA from make_certs). The library, kickq.aio, a real kickq-supervisor and the kickq command verify
the sentinels and the master against the CA, given in the URL's query or as redis_options; a wrong CA
and a plain URL fail with RedisUnavailable within redis_timeout, saying why; a killed master is followed.

One setup serves the module; the last test kills its master."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kickq
from kickq import aio
from kickq.keys import Keys
from tests.helpers import make_certs, ping, redis_server_binary
from tests.sentinel_topology import START_TIMEOUT, Node, SentinelFactory, SentinelSetup
from tests.test_cluster import ONE_NAME, run_cli, wait_serving
from tests.test_cluster import launch as launch  # noqa: F401 - a fixture, used by name

pytestmark = [pytest.mark.sentinel, pytest.mark.timeout(START_TIMEOUT + 90)]

HOT = {"hotjob": True, "hotjob_timeout": 15}
#: The redis_timeout of the failing cases: each must end within it (and a little scheduling).
FAIL_TIMEOUT = 2.0
MARGIN = 1.0
#: A failure's message names the cause in a line, not in redis-py's repr of every sentinel client.
SHORT_MESSAGE = 800


@dataclass(frozen=True)
class TlsSentinel:
    setup: SentinelSetup
    certs: dict[str, Path]

    @property
    def url(self) -> str:
        return self.setup.url

    @property
    def ca(self) -> dict[str, str]:
        """The client options that trust the test CA."""
        return {"ssl_ca_certs": str(self.certs["ca.crt"])}

    def url_with_ca(self, ca: str = "ca.crt") -> str:
        return f"{self.url}?ssl_ca_certs={self.certs[ca]}"

    def on_master(self, ns: str, job_id: str, node: Node | None = None) -> bool:
        """The job is on `node` (default: the master the sentinels name), read by the harness' TLS
        client: a new job's record, or the hash of one claimed since."""
        r = self.setup.client(node or self.setup.master())
        return bool(r.hexists(Keys(ns).new_jobs, job_id) or r.exists(Keys(ns).job(job_id)))


@pytest.fixture(scope="module")
def tls_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSentinel]:
    if redis_server_binary() is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    root = tmp_path_factory.mktemp("sentinel-tls")
    certs = make_certs(root / "certs")
    factory = SentinelFactory(root / "setups")
    try:
        setup = factory(tls=certs)
        print(f"TLS setup started in {setup.startup_seconds:.2f}s {setup.startup_phases}")
        yield TlsSentinel(setup, certs)
    finally:
        factory.stop_all()


@pytest.fixture(autouse=True)
def fresh_config() -> Iterator[None]:
    kickq.reset()
    yield
    kickq.reset()


def test_the_url_is_rediss_sentinel_and_every_port_is_tls_only(tls_sentinel: TlsSentinel) -> None:
    setup = tls_sentinel.setup
    assert setup.url.startswith("rediss+sentinel://")
    for node in setup.data_nodes + setup.sentinels:
        assert ping(node.host, node.port, tls_ca=tls_sentinel.certs["ca.crt"]), node
        assert not ping(node.host, node.port), node
    # The sentinels reached the replicas and each other (over TLS: no node has another port).
    for sentinel in setup.sentinels:
        assert setup.sentinel_master(sentinel)["num-slaves"] == "2"
        assert sorted(s["port"] for s in setup.sentinel_sentinels(sentinel)) == sorted(
            str(s.port) for s in setup.sentinels if s is not sentinel)


def test_jobs_over_tls_with_the_ca_in_the_query_or_the_options(tls_sentinel: TlsSentinel) -> None:
    ns = "kst-lib"
    with kickq.Kickq(redis_url=tls_sentinel.url_with_ca(), redis_namespace=ns) as kq:
        one = kq.create("tls", {"n": 0})
        many = kq.create_many([("tls", {"n": 1}), ("tls", {"n": 2}, {"delay": 60})])
        assert [kq.get(j.id).data for j in (one, *many)] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert kq.get(many[1].id).state == "delayed"
    assert tls_sentinel.on_master(ns, one.id)
    with kickq.Kickq(redis_url=tls_sentinel.url, redis_namespace=ns, redis_options=tls_sentinel.ca) as kq:
        assert kq.get(many[0].id).data == {"n": 1}
        assert kq.delete(one.id) is True
    assert not tls_sentinel.on_master(ns, one.id)
    # ssl=True on a redis+sentinel:// URL (as redis-py's Redis takes it), in the options or the query.
    plain_scheme = tls_sentinel.url.replace("rediss+sentinel://", "redis+sentinel://")
    ca = tls_sentinel.certs["ca.crt"]
    for settings in ({"redis_url": plain_scheme, "redis_options": {"ssl": True, **tls_sentinel.ca}},
                     {"redis_url": f"{plain_scheme}?ssl=true&ssl_ca_certs={ca}"}):
        with kickq.Kickq(redis_namespace=ns, **settings) as kq:
            assert kq.get(kq.create("tls", "ssl").id).data == "ssl"


def test_the_asyncio_client_over_tls(tls_sentinel: TlsSentinel) -> None:
    async def main() -> list[Any]:
        settings = {"redis_url": tls_sentinel.url, "redis_namespace": "kst-aio",
                    "redis_options": tls_sentinel.ca}
        async with aio.Kickq(**settings) as akq:
            job = await akq.create("tls", {"aio": 1})
            many = await akq.create_many([("tls", {"aio": 2})])
            return [(await akq.get(j.id)).data for j in (job, *many)]

    assert asyncio.run(main()) == [{"aio": 1}, {"aio": 2}]


def test_a_real_supervisor_the_library_aio_and_the_kickq_command_over_tls(
        tls_sentinel: TlsSentinel, launch, tmp_path: Path) -> None:
    """kickq-supervisor and the kickq command read no redis_options: the CA is in the URL's query."""
    url, ns = tls_sentinel.url_with_ca(), "kst-sup"
    module = tmp_path / "one_name.py"
    module.write_text(ONE_NAME)
    sup = launch(module, "--reaper-interval", "0.2", "--redis-url", url, "--redis-namespace", ns)
    wait_serving(sup, workers=1, reapers=1)

    with kickq.Kickq(redis_url=url, redis_namespace=ns) as kq:
        job = kq.create("work", "lib", HOT)
        assert job.hotjob_promise.result(timeout=15).result == {"worked": "lib"}
    master = tls_sentinel.setup.client(tls_sentinel.setup.master())
    assert master.hget(Keys(ns).job(job.id), "state") == "success"

    async def main() -> Any:
        async with aio.Kickq(redis_url=tls_sentinel.url, redis_namespace=ns,
                             redis_options=tls_sentinel.ca) as akq:
            job = await akq.create("work", "aio", HOT)
            return (await asyncio.wait_for(job.hotjob_promise, 15)).result

    assert asyncio.run(main()) == {"worked": "aio"}

    by_flag = run_cli("--redis-url", url, "--redis-namespace", ns, "create", "work", "--data", '"cli"',
                      "--hotjob", "--timeout", "15")
    assert by_flag.returncode == 0, by_flag.stderr
    job_id, _, final = by_flag.stdout.partition("\n")  # its id, then the final job
    assert json.loads(final)["result"] == {"worked": "cli"}
    by_env = run_cli("--redis-namespace", ns, "show", job_id, env={"KICKQ_REDIS_URL": url})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["state"] == "success"
    assert "Traceback" not in sup.log()


def failure_of(settings: dict[str, Any], use_aio: bool = False) -> tuple[BaseException, float]:
    """What creating a job with `settings` raises, and after how long."""
    settings = {"redis_namespace": "kst-fail", "redis_timeout": FAIL_TIMEOUT, **settings}
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


def assert_says_which_sentinel(exc: BaseException, setup: SentinelSetup) -> None:
    message = str(exc)
    assert any(f"sentinel {s.host}:{s.port}: " in message for s in setup.sentinels), message
    assert len(message) < SHORT_MESSAGE, message


@pytest.mark.parametrize("use_aio", [False, True], ids=["sync", "aio"])
@pytest.mark.parametrize("where", ["options", "query"])
def test_a_certificate_from_another_ca_is_refused_within_redis_timeout(
        tls_sentinel: TlsSentinel, use_aio: bool, where: str) -> None:
    other_ca = {"ssl_ca_certs": str(tls_sentinel.certs["other.crt"])}
    settings = ({"redis_url": tls_sentinel.url, "redis_options": other_ca} if where == "options"
                else {"redis_url": tls_sentinel.url_with_ca("other.crt")})
    exc, took = failure_of(settings, use_aio)
    print(f"{where} {'aio' if use_aio else 'sync'}: {type(exc).__name__} after {took:.2f}s: {exc}")
    assert isinstance(exc, kickq.RedisUnavailable), repr(exc)
    assert "certificate verify failed" in str(exc).lower(), str(exc)
    assert_says_which_sentinel(exc, tls_sentinel.setup)
    assert took <= FAIL_TIMEOUT + MARGIN, took


@pytest.mark.parametrize("with_ca", [False, True], ids=["no-options", "the-ca-in-options"])
def test_a_plain_sentinel_url_at_the_tls_setup_fails_within_redis_timeout(
        tls_sentinel: TlsSentinel, with_ca: bool) -> None:
    """The CA among the options of a plain URL is ignored (as redis-py's Redis does), not a TypeError:
    the sentinels' TLS ports drop a plain connection."""
    plain = tls_sentinel.url.replace("rediss+sentinel://", "redis+sentinel://")
    exc, took = failure_of({"redis_url": plain, "redis_options": tls_sentinel.ca if with_ca else {}})
    print(f"{type(exc).__name__} after {took:.2f}s: {exc}")
    assert isinstance(exc, kickq.RedisUnavailable), repr(exc)
    assert "names a master" in str(exc), str(exc)
    assert_says_which_sentinel(exc, tls_sentinel.setup)
    assert took <= FAIL_TIMEOUT + MARGIN, took


def test_a_killed_master_is_followed_over_tls(tls_sentinel: TlsSentinel) -> None:
    """Last in the module: it changes the shared setup's master (the killed one stays down)."""
    setup = tls_sentinel.setup
    ns = "kst-kill"
    with kickq.Kickq(redis_url=tls_sentinel.url_with_ca(), redis_namespace=ns, redis_timeout=10) as kq:
        before = kq.create("tls", "before")  # the client's connections are open to the old master
        old = setup.master()
        assert tls_sentinel.on_master(ns, before.id, old)
        new = setup.kill_master()
        print(f"failover over TLS: {setup.failovers[-1]}")
        assert new is not old and not old.running()
        started = time.monotonic()
        after = kq.create("tls", "after")
        took = time.monotonic() - started
        print(f"the first create after the setup settled took {took:.2f}s")
        assert tls_sentinel.on_master(ns, after.id, new)
        assert kq.get(after.id).data == "after"
