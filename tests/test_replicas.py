"""Writes that replicas confirm (wait_replicas, kickq.acks): a real master with one replica
(tests/replica_pair.py), frozen (SIGSTOP) where a test needs the replica to confirm nothing.

WAITAOF (wait_aof=True) needs Redis 7.2; this machine's Redis is 7.0.15, so its success path is not
tested here: only the ConfigError a 7.0 server gets, and the checks of kickq.acks on INFO replies.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import kickq
import kickq.aio
from kickq import acks, scripts
from kickq.connection import parse_version
from kickq.job import queue_reads, read_fields
from kickq.keys import Keys
from kickq_supervisor.channel import Channel
from kickq_supervisor.ghoster import Ghoster
from kickq_supervisor.worker import WorkerIO
from kickq_supervisor.worker_core import FinishMany, Lost, Settle, WaitForWork
from tests.helpers import new_namespace, poll_until, start_redis, stop_redis, wait_until
from tests.replica_pair import ReplicaPair

TIMEOUT = 0.3  # wait_replicas_timeout of the tests that expect a shortfall
LATE = 1.5  # a shortfall is raised within TIMEOUT + this (a loaded 2-core machine)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaPair]:
    started = ReplicaPair.start(tmp_path_factory.mktemp("replicas"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(autouse=True)
def clean_config() -> Iterator[None]:
    kickq.reset()
    yield
    kickq.reset()


@pytest.fixture
def ns() -> str:
    return new_namespace()


@pytest.fixture
def on_pair(pair: ReplicaPair, ns: str) -> Iterator[dict[str, Any]]:
    """kickq configured for the pair's master, this test's namespace, and wait_replicas=1."""
    kickq.reset()
    settings = {"redis_url": pair.master_url, "redis_namespace": ns, "wait_replicas": 1}
    kickq.config(**settings)
    try:
        yield settings
    finally:
        kickq.reset()


@pytest.fixture
def kq(on_pair: dict[str, Any]) -> Iterator[kickq.Kickq]:
    client = kickq.Kickq()
    _ = client.redis  # connected: its first write below is a job
    try:
        yield client
    finally:
        client.close()


def job_fields(client: redis.Redis, ns: str, job_id: str) -> dict[str, str]:
    """A job's fields as `client`'s server holds them (empty: no such job there)."""
    pipe = client.pipeline(transaction=False)
    queue_reads(pipe, Keys(ns), [job_id])
    return dict(read_fields(pipe.execute())[0])


# --- each call, confirmed -------------------------------------------------------------------------

@pytest.mark.replicas
def test_each_call_returns_with_its_write_on_the_replica(pair, kq, ns):
    job = kq.create("mail", {"to": "a"})
    assert job_fields(pair.replica, ns, job.id)["state"] == "new"  # read from the replica at once
    many = kq.create_many([("mail", i) for i in range(5)])
    assert [job_fields(pair.replica, ns, j.id).get("data") for j in many] == [str(i) for i in range(5)]
    assert kq.delete(job.id) is True
    assert job_fields(pair.replica, ns, job.id) == {}
    assert kq.schedule("tick", every=60) == "tick"
    pending = kq.schedules()[0]["pending_job_id"]
    assert pair.replica.hexists(Keys(ns).schedules, "tick")
    assert job_fields(pair.replica, ns, pending)["state"] == "delayed"
    assert kq.unschedule("tick") is True
    assert not pair.replica.hexists(Keys(ns).schedules, "tick")
    assert job_fields(pair.replica, ns, pending) == {}


@pytest.mark.replicas
def test_a_create_waits_while_the_replica_is_frozen_and_returns_once_it_has_the_job(pair, ns):
    kickq.reset()
    kickq.config(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=1, wait_replicas_timeout=4.0)
    done: list[Any] = []
    with kickq.Kickq() as kq:
        kq.create("warm")  # connected, scripts loaded
        with pair.frozen():
            thread = threading.Thread(target=lambda: done.append(kq.create("mail")))
            thread.start()
            time.sleep(0.5)  # the pace of the case: the create is held this long by the frozen replica
            assert done == [] and thread.is_alive()
            assert pair.master.exists(Keys(ns).id)  # written on the master, waiting for the replica
        thread.join(timeout=10)
        assert len(done) == 1
        assert job_fields(pair.replica, ns, done[0].id)["state"] == "new"
    kickq.reset()


@pytest.mark.replicas
def test_one_wait_per_call_and_per_batch_and_none_without_wait_replicas(pair, kq, ns):
    kq.create("warm")
    before = pair.waits()
    jobs = kq.create_many([("mail", i) for i in range(2500)])  # three create calls in one MULTI
    assert len(jobs) == 2500 and pair.waits() == before + 1
    kq.create("mail")
    assert pair.waits() == before + 2
    with kickq.Kickq(wait_replicas=0) as plain:
        plain.create("mail")
        plain.create_many([("mail",)] * 10)
        plain.delete(jobs[0].id)
        plain.unschedule(plain.schedule("tick", every=60))
    assert pair.waits() == before + 2


@pytest.mark.replicas
def test_a_client_override_and_kickq_config_both_set_it(pair, ns):
    kickq.reset()
    kickq.config(redis_url=pair.master_url, redis_namespace=ns)
    try:
        with kickq.Kickq(wait_replicas=1) as overridden, kickq.Kickq() as plain:
            before = pair.waits()
            overridden.create("a")
            plain.create("a")
            assert pair.waits() == before + 1
            kickq.config(wait_replicas=1)  # read at each call
            plain.create("a")
            assert pair.waits() == before + 2
    finally:
        kickq.reset()


# --- shortfalls ----------------------------------------------------------------------------------------

@pytest.mark.replicas
def test_a_frozen_replica_makes_each_call_raise_replication_timeout_naming_its_jobs(pair, ns):
    kickq.reset()
    kickq.config(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=1,
                 wait_replicas_timeout=TIMEOUT)
    with kickq.Kickq() as kq:
        kept = kq.create("mail")
        kq.schedule("tick", every=60)
        with pair.frozen():
            def shortfall(call: Any) -> kickq.ReplicationTimeout:
                started = time.monotonic()
                with pytest.raises(kickq.ReplicationTimeout) as caught:
                    call()
                assert TIMEOUT <= time.monotonic() - started < TIMEOUT + LATE
                assert (caught.value.wanted, caught.value.confirmed) == (1, 0)
                assert "0 of 1 replicas" in str(caught.value)
                return caught.value

            one = shortfall(lambda: kq.create("mail", {"n": 1}))
            assert len(one.job_ids) == 1 and one.what == "create"
            assert isinstance(one, TimeoutError) and isinstance(one, kickq.KickqError)
            # On the master: the write happened, it is only unconfirmed.
            assert kq.get(one.job_ids[0]).data == {"n": 1}
            many = shortfall(lambda: kq.create_many([("mail",), ("mail",), ("mail",)]))
            assert len(many.job_ids) == 3 and many.what == "create_many"
            assert [kq.get(i).state for i in many.job_ids] == ["new"] * 3
            assert shortfall(lambda: kq.delete(kept.id)).job_ids == [kept.id]
            scheduled = shortfall(lambda: kq.schedule("other", every=60))
            pending = {entry["id"]: entry["pending_job_id"] for entry in kq.schedules()}
            assert scheduled.job_ids == [pending["other"]]
            assert shortfall(lambda: kq.unschedule("tick")).job_ids == []
        # Thawed: the replica has caught up with all of it.
        for job_id in [*one.job_ids, *many.job_ids]:
            assert job_fields(pair.replica, ns, job_id)["state"] == "new"
        assert job_fields(pair.replica, ns, kept.id) == {}
        kq.create("mail")  # confirmed again
    kickq.reset()


@pytest.mark.replicas
def test_fewer_replicas_than_wanted_is_a_shortfall(pair, ns):
    with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=2,
                     wait_replicas_timeout=TIMEOUT) as kq:
        with pytest.raises(kickq.ReplicationTimeout) as caught:
            kq.create("mail")
    assert (caught.value.wanted, caught.value.confirmed) == (2, 1)


def test_no_replica_at_all_is_a_shortfall(redis_server):
    """The session's server has no replica."""
    ns = new_namespace()
    with kickq.Kickq(redis_url=redis_server.url, redis_namespace=ns, wait_replicas=1,
                     wait_replicas_timeout=TIMEOUT) as kq:
        with pytest.raises(kickq.ReplicationTimeout) as caught:
            kq.create("mail")
        assert kq.get(caught.value.job_ids[0]).state == "new"
    assert caught.value.confirmed == 0


@pytest.mark.replicas
def test_a_hotjob_create_that_falls_short_abandons_its_waiter_generation(pair, ns):
    with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=1,
                     wait_replicas_timeout=TIMEOUT) as kq:
        with pair.frozen():
            with pytest.raises(kickq.ReplicationTimeout):
                kq.create("mail", None, {"hotjob": True})
        waiter = kq._waiters[ns]
        assert waiter._creating == 0  # nothing left expecting that create's completion
        job = kq.create("mail", None, {"hotjob": True, "hotjob_timeout": 0.2})
        with pytest.raises(kickq.HotjobTimeout):  # no worker: the promise is live and times out
            job.hotjob_promise.result(timeout=5)


# --- nothing written by bad input; errors as the plain path raises them ----------------------------------

@pytest.mark.replicas
def test_bad_input_writes_nothing_and_sends_no_wait(pair, kq, ns):
    before = pair.waits()
    with pytest.raises(TypeError):
        kq.create_many([("mail",), "not an item"])
    with pytest.raises(kickq.ConfigError):
        kq.create_many([("mail",), ("mail", None, {"retry_count": -1})])
    with pytest.raises(kickq.InvalidPayload):
        kq.create("mail", {1, 2})
    with pytest.raises(kickq.ConfigError):
        kq.schedule("tick", cron="not a cron")
    assert pair.namespace_keys(pair.master, ns) == [f"{{{ns}}}:meta"]  # written at connect, nothing since
    assert pair.waits() == before


@pytest.mark.replicas
def test_a_wait_timeout_not_below_redis_timeout_is_a_config_error_before_any_write(pair, ns):
    for bad in ({"wait_replicas_timeout": 5.0}, {"wait_replicas_timeout": 2.0, "redis_timeout": 1}):
        with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=1, **bad) as kq:
            for call in (lambda: kq.create("mail"), lambda: kq.create_many([("mail",)] * 3),
                         lambda: kq.delete("1"), lambda: kq.schedule("tick", every=60),
                         lambda: kq.unschedule("tick")):
                with pytest.raises(kickq.ConfigError, match="must be below redis_timeout"):
                    call()
    assert pair.namespace_keys(pair.master, ns) == [f"{{{ns}}}:meta"]


@pytest.mark.replicas
@pytest.mark.parametrize("replicas", [1, 0])  # wait_aof alone waits for the master's own fsync
def test_wait_aof_on_redis_7_0_is_a_config_error_before_any_write(pair, ns, replicas):
    # WAITAOF came with Redis 7.2: its success path cannot be tested on this machine's 7.0.15.
    version = pair.master.info("server")["redis_version"]
    if parse_version(version) >= acks.WAITAOF_VERSION:
        pytest.skip(f"Redis {version} has WAITAOF")
    before = pair.waits()
    with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=replicas,
                     wait_aof=True) as kq:
        with pytest.raises(kickq.ConfigError, match=r"wait_aof needs Redis >= 7\.2 \(WAITAOF\).*7\.0"):
            kq.create("mail")
        with pytest.raises(kickq.ConfigError, match="WAITAOF"):
            kq.delete("1")
    assert pair.namespace_keys(pair.master, ns) == [f"{{{ns}}}:meta"]
    assert pair.waits() == before


def test_the_server_checks_and_the_commands_of_wait_aof():
    """kickq.acks on INFO and WAITAOF replies as Redis 7.2 gives them (not runnable here: 7.0)."""
    wanted = acks.Acks(2, 0.5, True)
    assert wanted.command() == ("WAITAOF", 1, 2, 500)
    assert acks.wanted({"wait_replicas": 0, "wait_aof": True, "wait_replicas_timeout": 1.0,
                        "redis_timeout": 5}) == acks.Acks(0, 1.0, True)
    assert acks.wanted({"wait_replicas": 0, "wait_aof": False, "wait_replicas_timeout": 1.0,
                        "redis_timeout": 5}) is None
    assert acks.Acks(1, 1.0, False).command() == ("WAIT", 1, 1000)
    acks.check_server(wanted, {"redis_version": "7.2.4", "aof_enabled": "1"}, "here")
    acks.check_server(acks.Acks(1, 1.0, False), {"redis_version": "6.0.0", "aof_enabled": "0"}, "here")
    with pytest.raises(kickq.ConfigError, match="appendonly"):
        acks.check_server(wanted, {"redis_version": "7.2.4", "aof_enabled": "0"}, "here")
    with pytest.raises(kickq.ConfigError, match="7.2"):
        acks.check_server(wanted, {"redis_version": "7.0.15"}, "here")
    acks.confirm(wanted, [1, 2], "create", ["1"])
    with pytest.raises(kickq.ReplicationTimeout, match="own AOF fsync not confirmed") as caught:
        acks.confirm(wanted, [0, 2], "create", ["1"])
    assert caught.value.local_fsync is False
    with pytest.raises(kickq.ReplicationTimeout, match="1 of 2 replicas"):
        acks.confirm(wanted, [1, 1], "create", ["1"])
    refusal = redis.exceptions.ResponseError(
        "WAITAOF cannot be used when numlocal is set but appendonly is disabled.")
    with pytest.raises(kickq.ConfigError, match="the write was made on the master"):
        acks.confirm(wanted, refusal, "create", ["1"])


@pytest.mark.replicas
def test_an_error_inside_the_transaction_is_raised_as_the_plain_create_raises_it(pair, ns):
    with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns) as kq:
        kq.create("warm")
        pair.master.delete(Keys(ns).id)
        pair.master.hset(Keys(ns).id, "not", "a counter")  # the create script's INCR fails
        errors = []
        for wait in (0, 1):
            with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=wait) as each:
                # One script call alone; then three in one MULTI, where the error is inside EXEC.
                for call in (lambda: each.create("mail"), lambda: each.create_many([("mail",)] * 2500)):
                    with pytest.raises(redis.exceptions.ResponseError) as caught:
                        call()
                    errors.append(str(caught.value))
        assert len(errors) == 4 and all("WRONGTYPE" in text for text in errors), errors


@pytest.mark.replicas
def test_a_create_refused_at_maxmemory_writes_nothing_as_the_plain_create(pair, ns):
    """Refused when queued (the create function has no allow-oom flag): EXEC aborts, nothing runs."""
    with kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns) as kq:
        kq.create("warm")
        written = pair.namespace_keys(pair.master, ns)
        before = pair.waits()
        clients = [kickq.Kickq(redis_url=pair.master_url, redis_namespace=ns, wait_replicas=wait)
                   for wait in (0, 1)]
        for each in clients:
            _ = each.redis  # connected before maxmemory (connecting writes)
        pair.master.config_set("maxmemory", "1")
        try:
            for each in clients:
                with pytest.raises(kickq.KickqError, match="out of memory"):
                    each.create("mail")
                with pytest.raises(kickq.KickqError, match="out of memory"):
                    each.create_many([("mail",)] * 2500)
        finally:
            pair.master.config_set("maxmemory", "0")
            for each in clients:
                each.close()
        assert pair.namespace_keys(pair.master, ns) == written
        assert kq.get("1").name == "warm" and pair.master.get(Keys(ns).id) == "1"
        assert pair.waits() - before == 2  # the WAITs that followed the refused writes


@pytest.mark.replicas
def test_scripts_lost_by_redis_are_loaded_again_and_the_write_confirmed(pair, kq, ns):
    kq.create("warm")
    pair.master.execute_command("FUNCTION", "FLUSH")
    pair.master.script_flush()
    job = kq.create("mail")
    assert job_fields(pair.replica, ns, job.id)["state"] == "new"
    pair.master.execute_command("FUNCTION", "FLUSH")
    assert kq.delete(job.id) is True


@pytest.mark.cluster
def test_on_a_cluster_the_namespaces_master_waits_for_its_replica(redis_cluster):
    """Through the routed client (kickq.cluster): the WAIT goes to the namespace's master, on the
    connection of its write."""
    cluster = redis_cluster
    master = cluster.masters()[0]
    ns = cluster.namespace_on(master, "kt")
    node = cluster.replica_of(master)
    replica = redis.Redis(host=node.host, port=node.port, decode_responses=True, max_connections=1)
    replica.execute_command("READONLY")  # reads of the master's slots, on its one connection
    try:
        with kickq.Kickq(redis_url=cluster.url, redis_namespace=ns, wait_replicas=1) as kq:
            job = kq.create("mail")
            assert job_fields(replica, ns, job.id)["state"] == "new"
            many = kq.create_many([("mail",)] * 3)
            assert all(job_fields(replica, ns, j.id)["state"] == "new" for j in many)
            assert kq.delete(job.id) is True and job_fields(replica, ns, job.id) == {}
        with kickq.Kickq(redis_url=cluster.url, redis_namespace=ns, wait_replicas=2,
                         wait_replicas_timeout=TIMEOUT) as kq:
            with pytest.raises(kickq.ReplicationTimeout) as caught:
                kq.create("mail")
            assert (caught.value.wanted, caught.value.confirmed) == (2, 1)
    finally:
        replica.close()


# --- asyncio ----------------------------------------------------------------------------------------

@pytest.mark.replicas
def test_asyncio_calls_confirm_with_one_wait_per_batch(pair, on_pair, ns):
    async def main() -> None:
        async with kickq.aio.Kickq() as kq:
            await kq.create("warm")
            before = pair.waits()
            jobs = await asyncio.gather(*(kq.create("mail", i) for i in range(20)))  # one batch
            assert pair.waits() == before + 1
            assert [job_fields(pair.replica, ns, j.id)["data"] for j in jobs] == [str(i) for i in range(20)]
            many = await kq.create_many([("mail",)] * 2500)
            assert pair.waits() == before + 2 and job_fields(pair.replica, ns, many[-1].id)
            assert await kq.delete(jobs[0].id) is True
            assert job_fields(pair.replica, ns, jobs[0].id) == {}
            await kq.schedule("tick", every=60)
            assert pair.replica.hexists(Keys(ns).schedules, "tick")
            assert await kq.unschedule("tick") is True
            assert not pair.replica.hexists(Keys(ns).schedules, "tick")
            assert pair.waits() == before + 5

    asyncio.run(main())


@pytest.mark.replicas
def test_asyncio_shortfall_tells_each_caller_of_its_own_jobs(pair, on_pair, ns):
    async def main() -> None:
        async with kickq.aio.Kickq(wait_replicas_timeout=TIMEOUT) as kq:
            kept = await kq.create("warm")
            with pair.frozen():
                started = time.monotonic()
                results = await asyncio.gather(kq.create("a"), kq.create_many([("b",), ("c",)]),
                                               return_exceptions=True)
                assert TIMEOUT <= time.monotonic() - started < TIMEOUT + LATE
                assert all(isinstance(r, kickq.ReplicationTimeout) for r in results)
                first, second = results
                assert (first.what, len(first.job_ids)) == ("create", 1)
                assert (second.what, len(second.job_ids)) == ("create_many", 2)
                assert not set(first.job_ids) & set(second.job_ids)
                assert [(await kq.get(i)).name for i in first.job_ids + second.job_ids] == ["a", "b", "c"]
                with pytest.raises(kickq.ReplicationTimeout) as caught:
                    await kq.delete(kept.id)
                assert caught.value.job_ids == [kept.id]
                with pytest.raises(kickq.ReplicationTimeout) as caught:
                    await kq.schedule("tick", every=60)
                assert caught.value.job_ids == [(await kq.schedules())[0]["pending_job_id"]]
                with pytest.raises(kickq.ReplicationTimeout):
                    await kq.unschedule("tick")
        async with kickq.aio.Kickq(wait_replicas_timeout=5.0) as kq:
            with pytest.raises(kickq.ConfigError, match="below redis_timeout"):
                await kq.create("a")
        async with kickq.aio.Kickq(wait_aof=True) as kq:  # Redis 7.0 here: no WAITAOF
            with pytest.raises(kickq.ConfigError, match="WAITAOF"):
                await kq.create("a")

    asyncio.run(main())


# --- the supervisor: its worker's Channel, WorkerIO, its Ghoster ---------------------------------------

@pytest.mark.replicas
def test_the_channel_sends_one_wait_per_settle_and_raises_a_shortfall_after_reading_every_reply(pair, kq, ns):
    keys = Keys(ns)
    channel = Channel(kq.redis, acks.Acks(1, TIMEOUT, False))
    try:
        before = pair.waits()
        for n in range(3):
            channel.send_commands(("RPUSH", keys.journal("w1"), f"entry {n}"))
        channel.send("claim", scripts.claim_args(keys, ["mail"], claimer="w1"))
        assert channel.settle()[:3] == [1, 2, 3]
        assert pair.waits() == before + 1
        assert pair.replica.llen(keys.journal("w1")) == 3
        conn = channel.conn
        with pair.frozen():
            channel.send_commands(("RPUSH", keys.journal("w1"), "entry 3"),
                                  ("RPUSH", keys.journal("w1"), "entry 4"))
            with pytest.raises(kickq.ReplicationTimeout, match="0 of 1 replicas"):
                channel.settle()
            assert channel.sent == [] and channel.conn is conn  # every reply read; the connection kept
            assert pair.master.llen(keys.journal("w1")) == 5
        assert pair.waits() == before + 2
        assert channel.settle() == []  # nothing in flight: no WAIT
        assert pair.waits() == before + 2
    finally:
        channel.reset()


@pytest.mark.replicas
def test_the_channel_makes_a_call_again_after_redis_lost_its_scripts_and_confirms_it(pair, kq, ns):
    keys = Keys(ns)
    job = kq.create("mail")
    channel = Channel(kq.redis, acks.Acks(1, 1.0, False))
    try:
        pair.master.execute_command("FUNCTION", "FLUSH")
        pair.master.script_flush()
        before = pair.waits()
        channel.send("claim", scripts.claim_args(keys, ["mail"], claimer="w1"))
        [claimed] = channel.settle()  # made again on another connection, with a WAIT of its own there
        assert scripts.parse_claim(claimed)[0] == job.id
        assert pair.waits() == before + 2
        assert job_fields(pair.replica, ns, job.id)["state"] == "processing"
    finally:
        channel.reset()


def confirmed_worker(kq: kickq.Kickq, ns: str, ran: list[str], timeout: float) -> Any:
    """tests.supervisor.test_worker_io's Live worker "w1" of job name "w", its saves confirmed by one
    replica within `timeout`."""
    from tests.supervisor.test_worker_io import Live

    live = Live(kq, ran)
    live.io.close()
    live.io = WorkerIO(kq.redis, Keys(ns), ["w"], "w1", live.io.runner, live.write_fd,
                       wanted=acks.Acks(1, timeout, False))
    return live


@pytest.mark.replicas
def test_a_worker_counts_an_unconfirmed_settle_as_lost_and_runs_each_job_once(pair, kq, ns):
    ran: list[str] = []
    live = confirmed_worker(kq, ns, ran, TIMEOUT)
    try:
        jobs = [kq.create("w") for _ in range(9)]
        live.until(lambda command: isinstance(command, Settle) and len(ran) == 5)
        in_flight = list(live.core.inflight)
        assert any(isinstance(call, FinishMany) and call.want for call in in_flight)  # a claim ahead
        before = pair.waits()
        with pair.frozen():
            result = live.io.perform(live.command)
            assert isinstance(result, Lost) and isinstance(result.error, kickq.ReplicationTimeout)
        assert pair.waits() == before + 1
        live.feed(result)
        # The saves it carried are sent again; the jobs the lost claim took come back from the claim
        # record; each job runs once.
        saved = live.until(lambda command: isinstance(command, FinishMany))
        assert {d.job_id for call in in_flight for d in call.runs} <= {d.job_id for d in saved.runs}
        live.finish()
        assert sorted(ran, key=int) == [j.id for j in jobs]
        assert [kq.get(j.id).state for j in jobs] == ["success"] * 9
        assert all(job_fields(pair.replica, ns, j.id)["state"] == "success" for j in jobs)
    finally:
        live.close()


@pytest.mark.replicas
def test_a_confirmed_worker_sends_one_wait_per_settle(pair, kq, ns):
    ran: list[str] = []
    live = confirmed_worker(kq, ns, ran, 1.0)
    try:
        jobs = [kq.create("w") for _ in range(9)]
        settles = 0
        before = pair.waits()
        while not isinstance(live.command, WaitForWork):
            if isinstance(live.command, Settle) and live.core.inflight:
                settles += 1
            live.perform()
        assert settles > 1 and pair.waits() - before == settles
        live.finish()
        assert sorted(ran, key=int) == [j.id for j in jobs]
    finally:
        live.close()


@pytest.mark.replicas
def test_the_masters_saves_wait_and_a_shortfall_is_logged_and_left(pair, kq, ns, caplog):
    keys = Keys(ns)
    job = kq.create("w")
    claimed = kq._connection(kq.settings())[1].claim(keys, ["w"], claimer="w1")
    assert claimed is not None and claimed[0] == job.id
    ghoster = Ghoster({**kq.settings(), "wait_replicas_timeout": TIMEOUT})
    try:
        before = pair.waits()
        with pair.frozen():
            ghoster.submit(ns, job.id, str(claimed[1]), "worker died (test)", claimer="w1")
            wait_until(lambda: "0 of 1 replicas confirmed" in caplog.text, timeout=10, message=caplog.text)
            assert kq.get(job.id).state != "processing"  # saved on the master
        assert pair.waits() == before + 1
        second = kq.create("w")
        assert kq._connection(kq.settings())[1].claim(keys, ["w"], claimer="w2") is not None
        before = pair.waits()
        ghoster.submit_claimed(ns, "w2", "worker died (test)", [])
        ghoster.flush(timeout=10)
        assert pair.waits() == before + 1
        state = kq.get(second.id).state
        assert state != "processing" and job_fields(pair.replica, ns, second.id)["state"] == state
    finally:
        ghoster.pending.put(None)
        ghoster.thread.join(timeout=5)


def test_the_worker_and_ghoster_refuse_a_wait_not_below_redis_timeout(redis_server):
    settings = {**kickq.config(), "redis_url": redis_server.url, "wait_replicas": 1,
                "wait_replicas_timeout": 5}
    with pytest.raises(kickq.ConfigError, match="below redis_timeout"):
        Ghoster(settings)
    assert acks.wanted({**settings, "wait_replicas": 0}) is None


# --- the fence: a replica promoted while the old master still takes writes ------------------------------

def role_of(*replicas: tuple[str, int]) -> list[Any]:
    """A master's ROLE reply listing `replicas`."""
    return ["master", 100, [[host, str(port), "100"] for host, port in replicas]]


def test_a_missing_replica_that_says_master_stops_confirmations_and_a_gone_one_does_not():
    now = [0.0]
    roles = {("10.0.0.2", 6379): "master", ("10.0.0.3", 6379): None}
    asked: list[tuple[str, int]] = []

    def probe(address: tuple[str, int], options: Any) -> str | None:
        asked.append(address)
        return roles[address]

    fence = acks.Fence(probe=probe, clock=lambda: now[0])
    master = acks.Master(("10.0.0.1", 6379), {})
    a, b = ("10.0.0.2", 6379), ("10.0.0.3", 6379)
    assert fence.promoted(master, role_of(a, b)) is None  # learns the replicas
    assert fence.promoted(master, role_of(a, b)) is None and asked == []
    # b is gone (unreachable): only missing, nothing stopped; asked once, then forgotten.
    assert fence.promoted(master, role_of(a)) is None and asked == [b]
    assert fence.promoted(master, role_of(a)) is None and asked == [b]
    # a left and says master (REPLICAOF NO ONE): confirmations stop; its answer stands for a while.
    assert not fence.suspects(master, role_of(a)) and fence.suspects(master, role_of())
    assert fence.promoted(master, role_of()) == a and asked == [b, a]
    now[0] += acks.VERDICT_SECONDS / 2
    assert fence.promoted(master, role_of()) == a and asked == [b, a]
    now[0] += acks.VERDICT_SECONDS
    assert fence.promoted(master, role_of()) == a and asked == [b, a, a]  # asked again
    # A replica detached for good stops mattering after SUSPECT_SECONDS.
    now[0] += acks.SUSPECT_SECONDS
    assert fence.promoted(master, role_of()) is None
    # Replicas listed longer ago than KNOWN_SECONDS do not count: a node that is master again after
    # a switch back had the old master (a master until Sentinel demotes it) among them.
    again = acks.Master(("10.0.0.9", 6379), {})
    assert fence.promoted(again, role_of(a, b)) is None
    now[0] += acks.KNOWN_SECONDS + 1
    probes = len(asked)
    assert not fence.suspects(again, role_of(b))
    assert fence.promoted(again, role_of(b)) is None and len(asked) == probes  # a is not even asked
    # No fence without a master's address, or when ROLE was refused (ACL).
    assert fence.promoted(None, role_of()) is None
    assert fence.promoted(master, redis.exceptions.NoPermissionError("NOPERM")) is None and fence.refused


@pytest.mark.replicas
def test_a_write_a_replica_confirms_while_another_replica_was_promoted_raises(tmp_path, ns):
    """The window of a planned Sentinel switch, made by hand: a master with replicas a and b; a is
    made a master (REPLICAOF NO ONE, as Sentinel does first); b still follows the old master and
    confirms its writes, which it would drop on moving to a. Such a write is not confirmed."""
    master, master_port = start_redis(tmp_path / "m", host="127.0.0.1")
    a, a_port = start_redis(tmp_path / "a", "--replicaof", "127.0.0.1", str(master_port), host="127.0.0.1")
    b, b_port = start_redis(tmp_path / "b", "--replicaof", "127.0.0.1", str(master_port), host="127.0.0.1")
    m = redis.Redis(port=master_port, decode_responses=True)
    try:
        poll_until(lambda: len(m.execute_command("ROLE")[2]) == 2, 30, "both replicas connected",
                   lambda: "", AssertionError)
        with kickq.Kickq(redis_url=f"redis://127.0.0.1:{master_port}", redis_namespace=ns,
                         wait_replicas=1) as kq:
            kq.create("mail")  # confirmed; the fence learns both replicas
            redis.Redis(port=a_port).execute_command("REPLICAOF", "NO", "ONE")
            poll_until(lambda: len(m.execute_command("ROLE")[2]) == 1, 10, "a left the master",
                       lambda: "", AssertionError)
            promoted = f"127.0.0.1:{a_port} has been promoted"
            with pytest.raises(kickq.ReplicationTimeout, match=promoted) as caught:
                kq.create("mail")
            assert caught.value.promoted == f"127.0.0.1:{a_port}" and caught.value.job_ids == ["2"]
            assert m.wait(1, 1000) == 1  # b did confirm it
    finally:
        m.close()
        for proc in (b, a, master):
            stop_redis(proc)
