"""Redis Sentinel (kickq.sentinel) against a real setup of 1 master, 2 replicas and 3 sentinels
(tests/sentinel_topology.py): the redis+sentinel:// URL in every entry point, wrong URLs failing at
once, clients, hotjob waiters and the asyncio client following a planned failover within seconds,
and the data-loss marker after a failover to a replica that lacked the data. The faults under
load (a killed master, planned failovers, no master for 20 s) are case 14 in tests/faults."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import kickq
from kickq import aio
from kickq.connection import connect
from kickq.keys import Keys
from kickq.scripts import Scripts
from kickq.sentinel import RECHECK_INTERVAL, parse_sentinel_url
from tests.helpers import wait_until
from tests.sentinel_topology import START_TIMEOUT, SentinelFactory, SentinelSetup
from tests.test_cluster import ONE_NAME, REPO, clean_env, run_cli, wait_serving
from tests.test_cluster import launch as launch  # noqa: F401 - a fixture, used by name

pytestmark = [pytest.mark.sentinel, pytest.mark.timeout(START_TIMEOUT + 90)]

HOT = {"hotjob": True, "hotjob_timeout": 15}
#: A wrong URL must fail well within this, though redis_timeout is longer: it is found at once.
AT_ONCE = 3.0


@pytest.fixture(autouse=True)
def fresh_config() -> Iterator[None]:
    kickq.reset()
    yield
    kickq.reset()


@pytest.fixture(scope="module")
def shared_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """One setup for the tests that leave its topology as it is."""
    factory = SentinelFactory(tmp_path_factory.mktemp("sentinel"))
    try:
        yield factory()
    finally:
        factory.stop_all()


# --- the URL ------------------------------------------------------------------------------------------

def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    parsed = parse_sentinel_url("redis+sentinel://u:p%40ss@h1:26379,[::1]:26380/my-service/3?socket_keepalive=1")
    assert parsed.sentinels == [("h1", 26379), ("::1", 26380)]
    assert (parsed.service, parsed.db) == ("my-service", 3)
    assert parsed.node_url == "redis://u:p%40ss@h1:26379/3?socket_keepalive=1"
    assert parse_sentinel_url("rediss+sentinel://h:1/kq").node_url == "rediss://h:1/0"


@pytest.mark.parametrize("url", [
    "redis+sentinel://h:26379",  # no service
    "redis+sentinel://h:26379/",
    "redis+sentinel://h/kq",  # no port
    "redis+sentinel://h:0/kq",
    "redis+sentinel://h:26379,/kq",
    "redis+sentinel://h:26379/kq/one",  # the database is a number
    "redis+sentinel://h:26379/kq?socket_timeout=soon",  # an option redis-py cannot read
])
def test_a_malformed_sentinel_url_is_a_config_error_before_anything_is_written(url: str) -> None:
    with pytest.raises(kickq.ConfigError):
        kickq.config(redis_url=url)
    with pytest.raises(kickq.ConfigError):
        kickq.Kickq(redis_url=url)
    assert kickq.config()["redis_url"] is None


# --- against the setup ----------------------------------------------------------------------------------

def test_the_sentinel_url_works_in_every_entry_point(shared_setup: SentinelSetup, launch, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, ns = shared_setup.url, "ks-entry"
    module = tmp_path / "one_name.py"
    module.write_text(ONE_NAME)
    sup = launch(module, "--redis-url", url, "--redis-namespace", ns)  # kickq-supervisor --redis-url
    wait_serving(sup, workers=1, reapers=1)

    # The library, by KICKQ_REDIS_URL; the job is on the master the sentinels name.
    monkeypatch.setenv("KICKQ_REDIS_URL", url)
    kickq.config(redis_namespace=ns)
    with kickq.Kickq() as kq:
        job = kq.create("work", "env", HOT)
        assert job.hotjob_promise.result(timeout=15).result == {"worked": "env"}
        assert shared_setup.client(shared_setup.master()).hget(Keys(ns).job(job.id), "state") == "success"

    # The kickq command, by --redis-url and by KICKQ_REDIS_URL.
    by_flag = run_cli("--redis-url", url, "--redis-namespace", ns, "create", "work", "--data", '"flag"',
                      "--hotjob", "--timeout", "15")
    assert by_flag.returncode == 0, by_flag.stderr
    job_id, _, final = by_flag.stdout.partition("\n")
    assert json.loads(final)["result"] == {"worked": "flag"}
    by_env = run_cli("--redis-namespace", ns, "show", job_id, env={"KICKQ_REDIS_URL": url})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["state"] == "success"

    async def main() -> Any:
        async with aio.Kickq(redis_url=url, redis_namespace=ns) as akq:
            job = await akq.create("work", "aio", HOT)
            return (await job.hotjob_promise).result

    assert asyncio.run(main()) == {"worked": "aio"}


def test_a_sentinel_url_with_a_database_writes_there(shared_setup: SentinelSetup) -> None:
    with kickq.Kickq(redis_url=shared_setup.url + "/5", redis_namespace="ks-db") as kq:
        job = kq.create("work")
    master = shared_setup.master()
    with kickq.Kickq(redis_url=f"redis://{master.host}:{master.port}/5", redis_namespace="ks-db") as db5:
        assert db5.get(job.id).name == "work"
    with kickq.Kickq(redis_url=f"redis://{master.host}:{master.port}/0", redis_namespace="ks-db") as db0:
        with pytest.raises(kickq.JobNotFound):
            db0.get(job.id)


def fails_at_once(call: Any) -> BaseException:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        took = time.monotonic() - started
        assert took < AT_ONCE, f"{type(exc).__name__} after {took:.1f}s"
        return exc
    raise AssertionError("no error")


def test_wrong_urls_fail_at_once_with_a_message_that_says_what_to_use(shared_setup: SentinelSetup) -> None:
    setup = shared_setup
    sentinels = setup.url.partition("://")[2].partition("/")[0]

    # A service no sentinel monitors: a typo, not an outage.
    err = fails_at_once(lambda: kickq.Kickq(redis_url=f"redis+sentinel://{sentinels}/nope",
                                            redis_timeout=10).create("a"))
    assert isinstance(err, kickq.ConfigError) and "'nope'" in str(err) and "kq" in str(err), err

    # A sentinel URL that names a data node, and a plain URL at a sentinel.
    master = setup.master()
    err = fails_at_once(lambda: kickq.Kickq(redis_url=f"redis+sentinel://{master.host}:{master.port}/kq",
                                            redis_timeout=10).create("a"))
    assert isinstance(err, kickq.RedisModeError) and "not a Redis Sentinel" in str(err), err
    first = sentinels.split(",")[0]
    err = fails_at_once(lambda: kickq.Kickq(redis_url=f"redis://{first}", redis_timeout=10).create("a"))
    assert isinstance(err, kickq.RedisModeError) and f"redis+sentinel://{first}" in str(err), err

    async def aio_plain_url_at_a_sentinel() -> None:
        async with aio.Kickq(redis_url=f"redis://{first}", redis_timeout=10) as akq:
            await akq.create("a")

    err = fails_at_once(lambda: asyncio.run(aio_plain_url_at_a_sentinel()))
    assert isinstance(err, kickq.RedisModeError), err
    assert not setup.client(master).exists(Keys("kickq").job("1"))  # nothing written anywhere


def finish_by_hand(r: redis.Redis, ns: str, job_id: str, result: str) -> None:
    """Claim and finish `job_id` on the node of `r`, as a worker would (its script publishes the
    hotjob's completion there)."""
    scr = Scripts(r)
    claimed = scr.claim(Keys(ns), ["hot"], claimer="by-hand")
    assert claimed is not None and claimed[0] == job_id, claimed
    status, _, _ = scr.finish(Keys(ns), job_id, claimed[1], "success", json.dumps(result))
    assert status == "ok"


@pytest.mark.timeout(START_TIMEOUT + 120)
def test_clients_and_hotjob_waiters_follow_a_planned_failover_within_seconds(
        make_sentinel: SentinelFactory) -> None:
    """After SENTINEL FAILOVER the old master accepts writes for about 10 s more (until Sentinel
    reconfigures it): clients must leave it once the sentinels name the new one, not when it stops
    accepting writes."""
    setup = make_sentinel()
    ns = "ks-move"
    kq = kickq.Kickq(redis_url=setup.url, redis_namespace=ns)
    old = setup.master()
    before = kq.create("hot", None, HOT)  # the waiter subscribes on the old master

    sentinel = setup.sentinels[0]
    setup.admin(sentinel).execute_command("SENTINEL", "FAILOVER", setup.service)
    named = wait_until(lambda: (m := setup.named_master()) is not None and m is not old and m, timeout=30,
                       interval=0.02, message="every sentinel names the new master")
    switched = time.monotonic()

    on_new_master = kickq.Kickq(redis_url=f"redis://{named.host}:{named.port}", redis_namespace=ns)

    def created_on_new_master() -> bool:
        job = kq.create("work")
        try:
            return on_new_master.get(job.id).name == "work"
        except kickq.JobNotFound:
            return False

    wait_until(created_on_new_master, timeout=10, interval=0.05, message="a create lands on the new master")
    moved = time.monotonic() - switched
    old_writable = setup.role(old)[0] == "master"
    print(f"creates on the new master {moved:.2f}s after every sentinel named it "
          f"(old master still a master then: {old_writable})")
    assert moved <= RECHECK_INTERVAL + 1.5

    # The hotjob created before the switch is finished on the new master (whose data has it): the
    # waiter, subscribed on the old one, must have moved to hear it.
    finish_by_hand(setup.client(named), ns, before.id, "done")
    assert before.hotjob_promise.result(timeout=10).result == "done"

    async def aio_follows() -> Any:
        async with aio.Kickq(redis_url=setup.url, redis_namespace=ns) as akq:
            job = await akq.create("hot", None, HOT)
            finish_by_hand(setup.client(named), ns, job.id, "aio done")
            return (await asyncio.wait_for(job.hotjob_promise, 10)).result

    assert asyncio.run(aio_follows()) == "aio done"
    kq.close()
    on_new_master.close()


@pytest.mark.timeout(START_TIMEOUT + 120)
def test_a_failover_to_a_replica_without_the_data_is_reported_as_data_loss(
        make_sentinel: SentinelFactory, caplog: pytest.LogCaptureFixture) -> None:
    """The master drops its replicas, which are frozen so that they cannot come back, marks the
    namespace and is killed: Sentinel promotes a replica that never got the mark. The reaper's
    loss marker (its epoch) tells, as after a restart without persistence."""
    from kickq_supervisor.reaper import EPOCH_FIELD, Reaper

    setup = make_sentinel()
    ns = "ks-loss"
    settings = kickq.Kickq(redis_url=setup.url, redis_namespace=ns, redis_timeout=5).settings()
    reaper = Reaper(settings, [ns])
    reaper.client = connect(settings)
    reaper.scripts = Scripts(reaper.client)
    old, replicas = setup.master(), setup.replicas()
    for node in replicas:
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)  # they cannot connect to the master again...
    setup.admin(old).execute_command("CLIENT", "KILL", "TYPE", "replica")  # ...once it drops them
    reaper.tick(Keys(ns))  # marks the namespace, and remembers the mark
    assert setup.client(old).hget(Keys(ns).meta, EPOCH_FIELD)
    assert old.process is not None
    old.process.kill()
    old.process.wait(timeout=10)
    for node in replicas:
        node.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    new = wait_until(lambda: (m := setup.named_master()) not in (None, old) and setup.role(m)[0] == "master"
                     and m, timeout=30, interval=0.05, message="a replica is promoted")
    assert not setup.client(new).hget(Keys(ns).meta, EPOCH_FIELD)  # it never got the mark

    def ticked() -> bool:
        try:
            reaper.tick(Keys(ns))
            return True
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    with caplog.at_level(logging.ERROR, logger="kickq.reaper"):
        wait_until(ticked, timeout=30, interval=0.1, message="the reaper reaches the new master")
    assert any("lost the data of namespace ks-loss" in r.getMessage() for r in caplog.records), caplog.text
    reaper.client.close()


def test_the_supervisor_refuses_to_start_on_a_service_no_sentinel_monitors(shared_setup: SentinelSetup,
                                                                           tmp_path: Path) -> None:
    module = tmp_path / "one_name.py"
    module.write_text(ONE_NAME)
    url = shared_setup.url.rpartition("/")[0] + "/nope"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--redis-url", url, str(module)],
                          cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
    assert "monitors a service 'nope' (they monitor: kq)" in done.stderr
    assert time.monotonic() - started < 10  # no worker started and retrying
