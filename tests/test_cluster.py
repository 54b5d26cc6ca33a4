"""What only a Redis Cluster has, against the session's real cluster (tests/topology.py): one
supervisor serving namespaces that live on three different masters (a reaper for each), a URL of
the wrong kind failing at once, the redis+cluster:// URL taken by every entry point, and hotjob
notifications that stay on the namespace's shard. The rest of the library runs on the cluster in
make test's cluster pass (KICKQ_TEST_TOPOLOGY=cluster)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kickq
from kickq import aio
from kickq.keys import Keys
from kickq.scripts import Scripts
from tests.helpers import new_namespace, raw_client, redis_now, wait_until
from tests.supervisor.conftest import Supervisor, wait_job
from tests.topology import Cluster, ClusterNode

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[1]
HOT = {"hotjob": True, "hotjob_timeout": 15}
#: A wrong URL must fail well within this, though redis_timeout is longer: it is found at once.
AT_ONCE = 3.0
SLOW_TIMEOUT = 10  # the redis_timeout of those tests


@pytest.fixture(autouse=True)
def fresh_config() -> Iterator[None]:
    kickq.reset()
    yield
    kickq.reset()


def clean_env(**extra: str) -> dict[str, str]:
    """This process' environment without KICKQ_* (the test says what each command gets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICKQ_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO), **extra)
    return env


Launch = Callable[..., Supervisor]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """launch(module, *flags) -> a kickq-supervisor subprocess (destroyed, with its children, at the end)."""
    started: list[Supervisor] = []

    def start(module: Path, *flags: str) -> Supervisor:
        log_path = tmp_path / f"supervisor-{len(started) + 1}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "kickq_supervisor", "--kill-grace", "0.2", *flags,
                                     str(module)], cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sup = Supervisor(proc, log_path, "", "")
        started.append(sup)
        return sup

    yield start
    left = {sup.pid: sup.destroy() for sup in started}
    print("\n".join(f"--- supervisor {s.pid} ---\n{s.log()[-5000:]}" for s in started))
    assert not any(left.values()), f"supervisors left processes behind: {left}"


def wait_serving(sup: Supervisor, workers: int, reapers: int) -> None:
    wait_until(lambda: sup.proc.poll() is not None or (len(sup.workers()) == workers
                                                       and len(sup.reapers()) == reapers),
               timeout=30, interval=0.05, message=f"{workers} workers and {reapers} reapers")
    assert sup.proc.poll() is None, sup.log()[-3000:]


def one_namespace_per_master(cluster: Cluster, prefix: str = "kc") -> list[str]:
    masters = cluster.masters()
    namespaces = [cluster.namespace_on(m, prefix) for m in masters]
    assert len({cluster.owner_of(ns).node_id for ns in namespaces}) == len(masters) >= 3
    return namespaces


def keys_on(cluster: Cluster, node: ClusterNode, namespace: str) -> list[str]:
    return list(cluster.client(node).scan_iter(match="{" + namespace + "}:*", count=1000))


def lost_run(kq: kickq.Kickq, url: str, ns: str) -> str:
    """A job claimed an hour ago by a worker that vanished: only a reaper recovers it (nobody
    serves "lost")."""
    job = kq.create("lost")
    with raw_client(url, ns) as r:
        claimed = Scripts(r).claim(Keys(ns), ["lost"], now=redis_now(r) - 3_600_000, claimer="gone")
    assert claimed is not None and claimed[0] == job.id
    return job.id


# --- one supervisor, three masters ------------------------------------------------------------------

THREE_MASTERS = '''
import kickq

def handler_of(ns):
    def handler(job, data):
        return {{"namespace": ns, "data": data}}
    return handler

for name, ns in {registrations!r}:
    kickq.Kickq(redis_url={url!r}, redis_namespace=ns).process([name], {{"concurrent_jobs": 1}},
                                                              handler_of(ns))
'''


def test_one_supervisor_serves_namespaces_on_three_masters_with_a_reaper_each(redis_cluster, launch,
                                                                            tmp_path):
    cluster = redis_cluster
    namespaces = one_namespace_per_master(cluster)
    registrations = list(zip("abc", namespaces, strict=True))
    module = tmp_path / "three_masters.py"
    module.write_text(THREE_MASTERS.format(registrations=registrations, url=cluster.url))
    sup = launch(module, "--reaper-interval", "0.2")
    wait_serving(sup, workers=3, reapers=3)
    log = sup.log()
    for ns in namespaces:  # one reaper per namespace: each is one slot, on its own master
        assert f"for {ns} on {cluster.url}" in log, log

    clients = {ns: kickq.Kickq(redis_url=cluster.url, redis_namespace=ns) for ns in namespaces}
    try:
        created = {}
        for name, ns in registrations:
            kq = clients[ns]
            created[ns] = (kq.create(name, {"plain": ns}), kq.create(name, {"delayed": ns}, {"delay": 0.3}),
                           kq.create(name, {"hot": ns}, HOT), lost_run(kq, cluster.url, ns))
        for ns in namespaces:
            kq = clients[ns]
            plain, delayed, hot, lost = created[ns]
            assert delayed.state == "delayed"
            assert hot.hotjob_promise.result(timeout=15).result == {"namespace": ns, "data": {"hot": ns}}
            for job, data in ((plain, {"plain": ns}), (delayed, {"delayed": ns})):
                done = wait_job(kq, job.id, timeout=15)
                assert (done.state, done.result) == ("success", {"namespace": ns, "data": data})
            recovered = wait_job(kq, lost, states=("ghost", "fail"), timeout=15)
            assert "lease expired" in (recovered.last_error or "")
            # Everything of the namespace is on its master, nothing on the others.
            owner = cluster.owner_of(ns)
            assert Keys(ns).job(plain.id) in keys_on(cluster, owner, ns)
            assert all(not keys_on(cluster, m, ns) for m in cluster.masters() if m is not owner)
    finally:
        for kq in clients.values():
            kq.close()


# --- a URL of the wrong kind --------------------------------------------------------------------------

def test_a_cluster_url_at_a_single_server_fails_at_once(redis_server):
    url = f"redis+cluster://{redis_server.host}:{redis_server.port}"
    ns = new_namespace()
    with kickq.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=SLOW_TIMEOUT) as kq:
        started = time.monotonic()
        with pytest.raises(kickq.RedisModeError, match="is not a Redis Cluster"):
            kq.create("a")
        assert time.monotonic() - started < AT_ONCE

    async def main() -> None:
        async with aio.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=SLOW_TIMEOUT) as akq:
            with pytest.raises(kickq.RedisModeError, match="is not a Redis Cluster"):
                await akq.create("a")

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < AT_ONCE
    with raw_client(redis_server.url, ns) as r:
        assert not list(r.scan_iter(match="{" + ns + "}:*"))


def test_a_plain_url_at_a_cluster_node_fails_at_once_whichever_node_holds_the_namespace(redis_cluster):
    cluster = redis_cluster
    namespaces = one_namespace_per_master(cluster)
    masters = cluster.masters()
    for node in [*masters, cluster.replica_of(masters[0])]:
        url = f"redis://{node.host}:{node.port}/0"
        for ns in namespaces:
            with kickq.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=SLOW_TIMEOUT) as kq:
                started = time.monotonic()
                with pytest.raises(kickq.RedisModeError, match=r"is a Redis Cluster node: use redis\+cluster://"):
                    kq.create("a")
                assert time.monotonic() - started < AT_ONCE, (node, ns)

    async def main() -> None:
        node = cluster.owner_of(namespaces[1])
        url = f"redis://{node.host}:{node.port}/0"
        async with aio.Kickq(redis_url=url, redis_namespace=namespaces[0], redis_timeout=SLOW_TIMEOUT) as akq:
            with pytest.raises(kickq.RedisModeError, match="is a Redis Cluster node"):
                await akq.create("a")

    asyncio.run(main())
    for ns in namespaces:
        assert not keys_on(cluster, cluster.owner_of(ns), ns)


@pytest.mark.parametrize("malformed", [
    "redis+cluster://",
    "redis+cluster://{host}",  # no port
    "redis+cluster://{host}:0",
    "redis+cluster://{host}:{port},",  # an empty node
    "redis+cluster://{host}:{port}/1",  # a cluster has database 0 only
    "redis+cluster://{host}:{port}?socket_timeout=soon",
])
def test_a_malformed_cluster_url_is_a_config_error_before_anything_is_written(redis_cluster, malformed):
    cluster = redis_cluster
    host, port = cluster.startup[0]
    bad = malformed.format(host=host, port=port)
    ns = cluster.namespace_on(cluster.masters()[0], "kc")
    kickq.config(redis_url=cluster.url, redis_namespace=ns)
    with pytest.raises(kickq.ConfigError, match="redis_url"):
        kickq.config(redis_url=bad)
    assert kickq.config()["redis_url"] == cluster.url  # the config is unchanged
    with pytest.raises(kickq.ConfigError, match="redis_url"):
        kickq.Kickq(redis_url=bad)
    with pytest.raises(kickq.ConfigError, match="redis_url"):
        aio.Kickq(redis_url=bad)
    assert not keys_on(cluster, cluster.owner_of(ns), ns)


# --- one URL for every entry point ------------------------------------------------------------------

ONE_NAME = textwrap.dedent('''
    import kickq

    def work(job, data):
        return {"worked": data}

    kickq.Kickq().process("work", work)
''')


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kickq.cli", *args], cwd=REPO, env=clean_env(**(env or {})),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_the_cluster_url_works_in_every_entry_point(redis_cluster, launch, tmp_path, monkeypatch):
    cluster = redis_cluster
    url = cluster.url
    ns = cluster.namespace_on(cluster.masters()[1], "kc")
    module = tmp_path / "one_name.py"
    module.write_text(ONE_NAME)
    sup = launch(module, "--redis-url", url, "--redis-namespace", ns)  # kickq-supervisor --redis-url
    wait_serving(sup, workers=1, reapers=1)

    # The library, by KICKQ_REDIS_URL.
    monkeypatch.setenv("KICKQ_REDIS_URL", url)
    kickq.config(redis_namespace=ns)
    with kickq.Kickq() as kq:
        assert kq.create("work", "env", HOT).hotjob_promise.result(timeout=15).result == {"worked": "env"}

    # The kickq command, by --redis-url and by KICKQ_REDIS_URL.
    by_flag = run_cli("--redis-url", url, "--redis-namespace", ns, "create", "work", "--data", '"flag"',
                      "--hotjob", "--timeout", "15")
    assert by_flag.returncode == 0, by_flag.stderr
    job_id, _, final = by_flag.stdout.partition("\n")  # its id, then the final job
    assert json.loads(final)["result"] == {"worked": "flag"}
    by_env = run_cli("--redis-namespace", ns, "show", job_id, env={"KICKQ_REDIS_URL": url})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["state"] == "success"

    # kickq.aio.
    async def main() -> Any:
        async with aio.Kickq(redis_url=url, redis_namespace=ns) as akq:
            job = await akq.create("work", "aio", HOT)
            return (await job.hotjob_promise).result

    assert asyncio.run(main()) == {"worked": "aio"}


# --- notifications stay on the shard ------------------------------------------------------------------

def test_hotjob_notifications_stay_on_the_namespace_s_shard(redis_cluster):
    cluster = redis_cluster
    masters = cluster.masters()
    if int(cluster.client(masters[0]).info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("sharded pub/sub (SSUBSCRIBE/SPUBLISH) needs Redis 7")
    master = masters[2]
    others = [m for m in masters if m is not master]
    ns = cluster.namespace_on(master, "kc")
    channel = Keys(ns).done

    def shard_subscribers(node: ClusterNode) -> int:
        return int(cluster.client(node).execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])

    def plain_subscribers(node: ClusterNode) -> int:
        return int(cluster.client(node).execute_command("PUBSUB", "NUMSUB", channel)[1])

    def publishes(node: ClusterNode) -> int:
        return int(cluster.client(node).info("commandstats").get("cmdstat_spublish", {}).get("calls", 0))

    def check_on_the_shard_only() -> None:
        assert shard_subscribers(master) == 1
        assert [shard_subscribers(m) for m in others] == [0] * len(others)
        # Classic pub/sub, which a cluster sends to every node, is not used.
        assert [plain_subscribers(n) for n in cluster.running_nodes()] == [0] * len(cluster.running_nodes())

    with kickq.Kickq(redis_url=cluster.url, redis_namespace=ns) as kq:
        job = kq.create("a", None, HOT)
        wait_until(lambda: shard_subscribers(master) == 1, timeout=5, message="the waiter subscribed")
        check_on_the_shard_only()
        published = {m.node_id: publishes(m) for m in masters}
        with raw_client(cluster.url, ns) as r:
            scr, keys = Scripts(r), Keys(ns)
            job_id, token, _ = scr.claim(keys, ["a"])
            assert job_id == job.id
            scr.finish(keys, job_id, token, "success", '"done"')
        assert job.hotjob_promise.result(timeout=10).result == "done"
        check_on_the_shard_only()
        assert publishes(master) > published[master.node_id]
        assert [publishes(m) for m in others] == [published[m.node_id] for m in others]


@pytest.mark.parametrize("client", ["sync", "asyncio"])
def test_a_call_made_while_the_slot_is_half_migrated_waits_for_the_move_and_runs_once(redis_cluster, client):
    """No script runs while a namespace's keys are split between two nodes (the route guard): a
    create and a get made then wait (TRYAGAIN / ASK are retried) and run once, on the new master,
    when the move is over. Nothing is written on either node meanwhile."""
    source = redis_cluster.masters()[0]
    target = redis_cluster.masters()[1]
    ns = redis_cluster.namespace_on(source, "kt")
    url = redis_cluster.url
    kq = kickq.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=10)
    first = kq.create_many([("a", {"i": i}) for i in range(30)])
    keys = Keys(ns)
    move = redis_cluster.begin_move(redis_cluster.slot_of(ns), target)
    try:
        move.migrate_batch(3)  # some of the namespace's keys on each node: the slot is split
        on_source, on_target = move.count_on(source), move.count_on(target)
        assert on_source and on_target
        results: dict[str, Any] = {}

        def call() -> None:
            started = time.monotonic()
            if client == "sync":
                job = kq.create("a", {"during": True})
                results["got"] = kq.get(first[0].id).state
            else:
                async def both() -> Any:
                    akq = aio.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=10)
                    try:
                        made = await akq.create("a", {"during": True})
                        results["got"] = (await akq.get(first[0].id)).state
                        return made
                    finally:
                        await akq.close()
                job = asyncio.run(both())
            results["job"], results["took"] = job, time.monotonic() - started

        import threading
        caller = threading.Thread(target=call)
        caller.start()
        held = 0.8
        caller.join(held)  # the move is held this long: the call must still be waiting
        assert caller.is_alive(), f"the call returned while the slot was split: {results}"
        assert (move.count_on(source), move.count_on(target)) == (on_source, on_target), "a key was written"
    finally:
        move.finish()
    caller.join(15)
    assert not caller.is_alive()
    assert results["took"] >= held and results["got"] == "new"
    job = results["job"]
    r = raw_client(url, ns)
    assert r.hexists(keys.new_jobs, job.id) and int(r.get(keys.id)) == 31  # created once, after the move
    assert redis_cluster.owner_of(ns).node_id == target.node_id
    assert move.count_on(source) == 0
