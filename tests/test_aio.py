"""kickq.aio against a real redis-server: each point of its contract, and the sync client on the
other side. Plain `asyncio.run` in sync tests. A "worker" is the test calling the claim / finish
scripts, inline or from a thread; one test runs a real kickq-supervisor."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import redis
import redis.asyncio as aioredis

import kickq
from kickq import aio
from kickq.aio import AsyncScripts, Kickq
from kickq.aio_hotjob import AsyncHotjobWaiter
from kickq.connection import connect as sync_connect
from kickq.hotjob import HotjobWaiter
from kickq.keys import Keys
from kickq.scripts import Scripts
from tests.helpers import free_port, raw_async_client, raw_client, subscribers, wait_until
from tests.structures import (assert_consistent, assert_gone, assert_one_structure, job_exists, snapshot,
                              stored)

HOT = {"hotjob": True, "hotjob_timeout": 10}


def arun(main: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    """Run `main()` in a fresh event loop; a hang fails the test after `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(main(), timeout))


async def until(predicate: Callable[[], Any], timeout: float = 5.0, message: str = "") -> Any:
    """Poll `predicate` (letting the loop run) until it is truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        await asyncio.sleep(0.005)


def script_paused(r: redis.Redis) -> bool:
    """A script call held on the server by CLIENT PAUSE WRITE (such a client is flagged blocked)."""
    return any("b" in c["flags"] and c["cmd"].startswith(("fcall", "eval")) for c in r.client_list())


class Worker:
    """Plays a supervisor's worker with the real scripts (Redis' clock), inline."""

    def __init__(self, r: redis.Redis, ns: str) -> None:
        self.r, self.ns, self.keys, self.scripts = r, ns, Keys(ns), Scripts(r)

    def run(self, outcome: str = "success", payload: str = '"done"', names: tuple[str, ...] = ("a",)) -> str:
        got = self.scripts.claim(self.keys, names)
        assert got is not None, f"nothing to claim in {names}"
        status, state, _ = self.scripts.finish(self.keys, got[0], got[1], outcome, payload)
        assert status == "ok"
        return got[0]


class ThreadWorker:
    """A worker thread looping claim / finish until stopped; idles on the wake tokens."""

    def __init__(self, redis_url: str, ns: str, names: tuple[str, ...] = ("a",)) -> None:
        self.r = raw_client(redis_url, ns)
        self.keys, self.names, self.scripts = Keys(ns), names, Scripts(self.r)
        self.finished = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-worker", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            got = self.scripts.claim(self.keys, self.names)
            if got is None:
                self.r.blpop([self.keys.wake(n) for n in self.names], timeout=0.05)
                continue
            job_id, token, fields = got
            self.scripts.finish(self.keys, job_id, token, "success", json.dumps({"ok": fields.get("data")}))
            self.finished += 1

    def __enter__(self) -> "ThreadWorker":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.r.close()


@pytest.fixture
def worker(r, namespace):
    return Worker(r, namespace)


@pytest.fixture
def sync_kq(kq_config):
    client = kickq.Kickq()
    try:
        yield client
    finally:
        client.close()


# --- create, get, delete ------------------------------------------------------------------------------

def test_create_get_delete(kq_config, r, namespace, sync_kq):
    async def main():
        async with Kickq() as kq:
            job = await kq.create("a", {"x": [1, "é", None]})
            assert isinstance(job, kickq.Job)
            assert (job.id, job.name, job.state, job.data) == ("1", "a", "new", {"x": [1, "é", None]})
            assert job.hotjob_promise is None
            got = await kq.get(job.id)
            assert got.to_dict() == job.to_dict() == sync_kq.get("1").to_dict()
            assert (await kq.get(1)).id == "1"
            delayed = await kq.create("b", None, {"delay": 0, "retryCount": 5})
            assert (delayed.state, delayed.retry_count) == ("delayed", 5)
            assert_consistent(r, namespace)
            assert await kq.delete(job.id) is True
            assert await kq.delete(job.id) is False
            assert_gone(r, namespace, "1")
            with pytest.raises(kickq.JobNotFound) as info:
                await kq.get("1")
            assert info.value.job_id == "1"
            assert await kq.delete("404") is False

    arun(main)


def test_create_many_is_atomic_and_checked_first(kq_config, r, namespace):
    async def main():
        async with Kickq() as kq:
            jobs = await kq.create_many([("a",), ("b", {"x": 1}), ("c", None, {"delay": 0}),
                                         ["d", [1], {"hotjob": True, "hotjob_timeout": 5}]])
            assert [(j.id, j.name, j.state) for j in jobs] == [
                ("1", "a", "new"), ("2", "b", "new"), ("3", "c", "delayed"), ("4", "d", "new")]
            assert [j.hotjob_promise is not None for j in jobs] == [False, False, False, True]
            assert await kq.create_many([]) == []
            before = snapshot(r, namespace)
            for bad, error in [([("a",), ("b", None, {"retry_count": -1})], kickq.ConfigError),
                               ([("a",), "b"], TypeError), ([("a",), ("",)], ValueError),
                               ([("a", {1, 2})], kickq.InvalidPayload)]:
                with pytest.raises(error):
                    await kq.create_many(bad)
            assert snapshot(r, namespace) == before
            big = await kq.create_many([("e", i) for i in range(2500)])  # several scripts in one MULTI
            assert [j.id for j in big] == [str(i) for i in range(5, 2505)]
            assert r.llen(Keys(namespace).queue("e")) == 2500
            assert_consistent(r, namespace)

    arun(main)


@pytest.mark.parametrize("args, error", [
    ((1,), TypeError), (("",), ValueError), (("a\n",), ValueError), (("a" * 257,), ValueError),
    (("a", None, {"nope": 1}), kickq.ConfigError), (("a", None, {"hotjob_timeout": 0}), kickq.ConfigError),
    (("a", None, "opts"), kickq.ConfigError), (("a", {1, 2}), kickq.InvalidPayload),
    (("a", float("nan")), kickq.InvalidPayload), (("a", "x" * 2000), kickq.PayloadTooLarge),
    (("a", "f\udcff.txt"), kickq.InvalidPayload), (("a", "f\udcff" * 2000), kickq.InvalidPayload),
])
def test_bad_input_raises_the_sync_errors_and_writes_nothing(kq_config, r, namespace, sync_kq, args, error):
    kickq.config(max_payload_bytes=1000)

    async def main():
        async with Kickq() as kq:
            with pytest.raises(error) as async_info:
                await kq.create(*args)
        return async_info.value

    async_error = arun(main)
    with pytest.raises(error) as sync_info:
        sync_kq.create(*args)
    assert str(async_error) == str(sync_info.value)  # the same validation, not a copy of it
    assert snapshot(r, namespace) == {}


def test_constructor_overrides_and_config_cascade(kq_config, r, namespace):
    kickq.config(job_flags={"a": {"retry": True}})

    async def main():
        with pytest.raises(kickq.ConfigError):
            Kickq(nope=1)
        async with Kickq(hotjob_timeout=2, retryCount=7) as kq:
            job = await kq.create("a")
            assert (job.retry, job.retry_count, job.hotjob_timeout) == (True, 7, 2)
        other = Kickq(redis_namespace=namespace + "-x")
        try:
            await other.create("a")
        finally:
            await other.close()
        assert job_exists(r, namespace, "1")
        with raw_client(kq_config["redis_url"], namespace + "-x") as other_r:  # on a cluster: its own master
            assert job_exists(other_r, namespace + "-x", "1")
            other_r.delete(*other_r.keys("{" + namespace + "-x}:*"))

    arun(main)


def test_creates_in_one_loop_iteration_are_one_script_call(kq_config, r, namespace, monkeypatch):
    calls = []
    original = AsyncScripts.run

    async def counting(self, name, keys_and_args, client=None):
        calls.append((name, keys_and_args[1][2] if name == "create" else None))
        return await original(self, name, keys_and_args, client)

    monkeypatch.setattr(AsyncScripts, "run", counting)

    async def main():
        async with Kickq() as kq:
            await kq.connection()
            jobs = await asyncio.gather(*(kq.create("a", i) for i in range(300)),
                                        kq.create_many([("b", i) for i in range(10)]))
            assert [j.id for j in jobs[:300]] == [str(i) for i in range(1, 301)]  # in call order
            assert [j.data for j in jobs[:300]] == list(range(300))
            assert [j.id for j in jobs[300]] == [str(i) for i in range(301, 311)]
            assert calls == [("create", 310)]
            calls.clear()
            await asyncio.gather(*(kq.create("a") for _ in range(1500)))  # more than one chunk
            assert sum(n for _, n in calls) == 1500 and all(n <= aio.CREATE_CHUNK for _, n in calls)
            assert_consistent(r, namespace)

    arun(main)


def test_one_failing_create_does_not_fail_its_batch_neighbours(kq_config, r, namespace):
    async def main():
        async with Kickq() as kq:
            await kq.connection()
            results = await asyncio.gather(kq.create("a", 1), kq.create("a", {1}), kq.create("a", 3),
                                           return_exceptions=True)
            assert isinstance(results[1], kickq.InvalidPayload)
            assert [results[0].id, results[2].id] == ["1", "2"]

    arun(main)


def test_stats_and_events_match_the_sync_client(kq_config, r, namespace, sync_kq, worker):
    kickq.config(redis_timeout=0.5)  # events() blocks for redis_timeout / 2 between checks of `timeout`

    async def main():
        async with Kickq() as kq:
            await kq.create_many([("a",), ("a",), ("b", None, {"delay": 60})])
            worker.run("success", '"x"')
            stats = await kq.stats()
            assert stats["names"]["a"]["states"]["success"] == 1
            assert stats["names"]["b"]["states"]["delayed"] == 1
            assert stats["total"]["window"]["created"] == 3
            assert stats == sync_kq.stats()
            assert (await kq.stats("a")) == sync_kq.stats("a")
            with pytest.raises(ValueError):
                await kq.stats("")
            kept = [e async for e in kq.events(since="0", timeout=0.2)]
            assert kept == list(sync_kq.events(since="0", timeout=0.2))
            assert [e["event"] for e in kept if e["id"] == "1"][0] == "create"
            only_b = [e async for e in kq.events("b", since="0", timeout=0.2)]
            assert {e["name"] for e in only_b} == {"b"}

            async def first_new_event():
                async for event in kq.events():
                    return event

            listening = asyncio.ensure_future(first_new_event())
            await until(lambda: any(c["cmd"] == "xread" and "b" in c["flags"] for c in r.client_list()),
                        message="events() blocks on the stream")
            created = await kq.create("c")
            event = await listening
            assert (event["id"], event["name"], event["event"]) == (created.id, "c", "create")

    arun(main)


# --- the sync client on the other side --------------------------------------------------------------

def test_sync_created_job_is_read_deleted_and_awaited_by_async(kq_config, r, namespace, sync_kq, worker):
    first = sync_kq.create("a", {"from": "sync"}, HOT)
    second = sync_kq.create("a", None, HOT)
    third = sync_kq.create("b", None, HOT)
    plain = sync_kq.create("c")

    async def main():
        async with Kickq() as kq:
            assert (await kq.get(first.id)).to_dict() == first.to_dict()
            waiting = asyncio.ensure_future(kq.wait(first.id))
            # Whether the worker finishes before or after wait() has subscribed and re-read the job,
            # the outcome is the same; this just makes the message path the likely one.
            await until(lambda: namespace in kq._state.waiters
                        and kq._state.waiters[namespace].pending_count())
            worker.run("success", '"from the async side"')
            final = await waiting
            assert (final.id, final.state, final.data) == (first.id, "success", {"from": "sync"})
            assert final.result == "from the async side"
            # Already finished before anyone waits: answered from Redis at once.
            worker.run("success", '"earlier"')
            assert (await kq.wait(second.id)).result == "earlier"
            # Deleted by the async client: the sync creator's promise and an async waiter both learn it.
            async_waiter = asyncio.ensure_future(kq.wait(third.id))
            await until(lambda: kq._state.waiters[namespace].pending_count())
            assert await kq.delete(third.id) is True
            with pytest.raises(kickq.JobNotFound):
                await async_waiter
            with pytest.raises(kickq.JobNotFound):
                await kq.wait(third.id)
            with pytest.raises(kickq.KickqError, match="not a hotjob"):
                await kq.wait(plain.id)
            with pytest.raises(kickq.HotjobTimeout):
                await kq.wait(sync_kq.create("a", None, HOT).id, timeout=0.2)
            with pytest.raises(kickq.ConfigError):
                await kq.wait(first.id, timeout=-1)

    arun(main)
    assert first.hotjob_promise.result(timeout=5).result == "from the async side"
    with pytest.raises(kickq.JobNotFound):
        third.hotjob_promise.result(timeout=5)


def test_async_created_job_is_read_deleted_and_awaited_by_sync(kq_config, r, namespace, sync_kq, worker):
    async def main():
        async with Kickq() as kq:
            done = await kq.create("a", {"from": "async"}, HOT)
            gone = await kq.create("b", None, HOT)
            assert sync_kq.get(done.id).to_dict() == done.to_dict()
            # The sync waiter machinery (kickq.hotjob) awaits a job it did not create: an old
            # generation makes watch() re-read the job from Redis, as after a reconnect.
            waiter = HotjobWaiter(lambda: sync_connect(sync_kq.settings()), Keys(namespace), 5)
            try:
                generation = waiter.ensure_subscribed()
                sync_future = waiter.watch(done.id, 5, time.monotonic(), generation - 1, sync_kq.redis)
                worker.run("success", '"both"')
                assert (await done.hotjob_promise).result == "both"
                assert (await asyncio.wrap_future(sync_future)).to_dict() == (await kq.get(done.id)).to_dict()
            finally:
                waiter.close()
            assert sync_kq.delete(gone.id) is True
            with pytest.raises(kickq.JobNotFound):
                await gone.hotjob_promise
            with pytest.raises(kickq.JobNotFound):
                sync_kq.get(gone.id)

    arun(main)


# --- hotjobs ------------------------------------------------------------------------------------------

def test_hotjob_promise_is_a_future_of_the_final_job(kq_config, r, namespace, worker):
    async def main():
        async with Kickq() as kq:
            assert (await kq.create("a")).hotjob_promise is None
            job = await kq.create("a", {"in": 1}, HOT)
            assert isinstance(job.hotjob_promise, asyncio.Future) and not job.hotjob_promise.done()
            assert (await kq.get(job.id)).hotjob_promise is None
            worker.run("success", json.dumps({"out": 2}))  # claims the plain job "1" first
            worker.run("success", json.dumps({"out": 2}))
            final = await job.hotjob_promise
            assert (final.id, final.state, final.complete, final.success) == (job.id, "success", True, True)
            assert final.result == {"out": 2} and final.data == {"in": 1}
            assert final.to_dict() == (await kq.get(job.id)).to_dict()

    arun(main)


def test_completion_before_anyone_awaits_is_not_missed(kq_config, worker):
    async def main():
        async with Kickq() as kq:
            job = await kq.create("a", None, HOT)
            worker.run("success", '"early"')
            await until(job.hotjob_promise.done, message="future settled without an awaiter")
            assert (await job.hotjob_promise).result == "early"

    arun(main)


def test_completion_between_the_create_reply_and_the_watch_is_kept(kq_config, worker, monkeypatch):
    """The worker finishes the job before the creator has even made its future."""
    original = AsyncScripts.run
    seen = {}

    async def run(self, name, keys_and_args, client=None):
        reply = await original(self, name, keys_and_args, client)
        if name == "create":
            job_id = str(reply[0])
            worker.run("success", '"very early"')
            waiter = seen["kq"]._state.waiters[worker.ns]
            await until(lambda: job_id in waiter._early, message="early completion kept")
        return reply

    monkeypatch.setattr(AsyncScripts, "run", run)

    async def main():
        async with Kickq() as kq:
            seen["kq"] = kq
            job = await kq.create("a", None, HOT)
            assert job.hotjob_promise.done()
            assert (await job.hotjob_promise).result == "very early"
            assert kq._state.waiters[worker.ns]._early == {}  # dropped once no create is in progress

    arun(main)


def test_hotjob_fail_resolves_with_state_fail(kq_config, worker):
    async def main():
        async with Kickq() as kq:
            job = await kq.create("a", None, HOT)
            worker.run("fail", "broken")
            final = await job.hotjob_promise  # a result, not an exception
            assert (final.state, final.complete, final.success) == ("fail", True, False)
            assert final.last_error == "broken"

    arun(main)


def test_hotjob_timeout_leaves_the_job_alone(kq_config, r, namespace):
    async def main():
        async with Kickq() as kq:
            loop = asyncio.get_running_loop()
            started = loop.time()
            job = await kq.create("a", None, {"hotjob": True, "hotjob_timeout": 0.3})
            with pytest.raises(kickq.HotjobTimeout) as info:
                await job.hotjob_promise
            assert 0.25 <= loop.time() - started <= 3
            assert isinstance(info.value, TimeoutError) and isinstance(info.value, kickq.KickqError)
            assert (info.value.job_id, info.value.timeout) == (job.id, 0.3)
            assert assert_one_structure(r, namespace, job.id) == "new"
            # An unawaited promise that times out is not logged as "exception never retrieved".
            unawaited = await kq.create("a", None, {"hotjob": True, "hotjob_timeout": 0.05})
            await until(unawaited.hotjob_promise.done)
            await until(lambda: kq._state.waiters[namespace].pending_count() == 0)

    arun(main)


def test_delete_while_awaited_gives_job_not_found(kq_config):
    async def main():
        async with Kickq() as kq:
            job = await kq.create("a", None, HOT)
            assert await kq.delete(job.id) is True
            with pytest.raises(kickq.JobNotFound):
                await job.hotjob_promise

    arun(main)


def test_pending_jobs_are_rechecked_after_a_reconnect(kq_config, r, namespace, worker):
    async def main():
        async with Kickq() as kq:
            first = await kq.create("a", None, HOT)
            second = await kq.create("b", None, HOT)
            waiter = kq._state.waiters[namespace]
            generation = waiter.generation
            # Both steps are synchronous: the listener cannot resubscribe in between, so the message
            # is published to nobody and only the recheck after the reconnect can settle the job.
            assert r.client_kill_filter(_type="pubsub") >= 1
            worker.run("success", '"while disconnected"')
            assert (await first.hotjob_promise).result == "while disconnected"
            assert waiter.generation > generation
            await until(lambda: subscribers(r, Keys(namespace).done) == 1, message="resubscribed")
            worker.run("success", '"later"', names=("b",))
            assert (await second.hotjob_promise).result == "later"

    arun(main)


def test_a_watch_from_an_older_generation_rechecks_its_job(kq_config, namespace, sync_kq, worker):
    """What create does when the subscription was renewed while its job was being created."""
    job = sync_kq.create("a", None, HOT)
    worker.run("success", '"missed"')  # published before the async side ever subscribed

    async def main():
        async with Kickq() as kq:
            waiter = kq._waiter(kq._bind(), kq.settings())
            await waiter.ensure_subscribed()
            loop = asyncio.get_running_loop()
            current = waiter.watch(job.id, 0.5, loop.time() + 0.5, waiter.generation, await kq.connection())
            older = waiter.watch(job.id, 5, loop.time() + 5, waiter.generation - 1, await kq.connection())
            assert (await older).result == "missed"
            assert current.done() and (await current).result == "missed"  # both waiters of the id

    arun(main)


def test_watches_from_an_older_generation_are_rechecked_together(kq_config, namespace, sync_kq, worker):
    """A batch of creates made while the subscription was renewed rereads its jobs in one go: with
    a pool of 2 connections (a third is an error), 300 of them all settle; one recheck each would
    need 300 connections at once."""
    jobs = [sync_kq.create("a", None, HOT) for _ in range(300)]
    for _ in jobs:
        worker.run("success", '"missed"')  # published before the async side ever subscribed

    async def main():
        async with Kickq() as kq:
            waiter = kq._waiter(kq._bind(), kq.settings())
            await waiter.ensure_subscribed()
            loop = asyncio.get_running_loop()
            # A pool of two connections: a third is an error.
            client = raw_async_client(kq.settings()["redis_url"], namespace, max_connections=2)
            try:
                older = [waiter.watch(job.id, 5, loop.time() + 5, waiter.generation - 1, client)
                         for job in jobs]
                assert [j.result for j in await asyncio.gather(*older)] == ["missed"] * 300
            finally:
                await client.aclose() if hasattr(client, "aclose") else await client.close()

    arun(main)


def test_unit_early_buffer_and_timers(kq_config):
    async def main():
        waiter = AsyncHotjobWaiter(lambda: None, Keys("unit"), 1)
        fields = {"name": "a", "state": "success", "result": '"r"'}
        waiter.deliver("7", {"id": "7", "job": fields})
        assert waiter._early == {}  # no create in progress: nobody can be waiting for it
        generation = waiter.begin()
        waiter.deliver("7", {"id": "7", "job": fields})
        future = waiter.watch("7", 1, None, generation, None)
        assert future.done() and future.result().result == "r"
        waiter.end()
        loop = asyncio.get_running_loop()
        timed = waiter.watch("8", 0.01, loop.time() + 0.01, generation, None)
        cancelled = waiter.watch("9", 5, loop.time() + 5, generation, None)
        cancelled.cancel()
        with pytest.raises(kickq.HotjobTimeout):
            await timed
        await until(lambda: waiter.pending_count() == 0)
        deleted = waiter.watch("10", 5, loop.time() + 5, generation, None)
        twice = waiter.watch("10", 5, loop.time() + 5, generation, None)
        waiter.deliver("10", {"id": "10", "deleted": True})
        for f in (deleted, twice):
            with pytest.raises(kickq.JobNotFound):
                await f
        await waiter.close()

    arun(main)


def threads_but_the_loops_executor() -> int:
    """Live threads, not counting the event loop's default executor: a Cluster client reads the
    slot map there (blocking I/O), once per namespace (kickq.cluster)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("asyncio_"))


def test_many_hotjobs_share_one_pubsub_connection_and_no_threads(kq_config, r, namespace, worker):
    async def main():
        threads = threads_but_the_loops_executor()
        async with Kickq() as kq:
            jobs = await asyncio.gather(*(kq.create("a", i, HOT) for i in range(200)))
            jobs += await kq.create_many([("a", i, HOT) for i in range(200, 400)])
            assert subscribers(r, Keys(namespace).done) == 1
            assert len(asyncio.all_tasks()) <= 4  # main (and wait_for's), the listener, one batch at most
            assert threads_but_the_loops_executor() == threads
            for _ in jobs:
                worker.run("success", "1")
            finals = await asyncio.gather(*(j.hotjob_promise for j in jobs))
            assert [f.id for f in finals] == [j.id for j in jobs] and {f.state for f in finals} == {"success"}
            assert threads_but_the_loops_executor() == threads

    arun(main)


def test_gather_of_1000_hotjobs_under_a_running_worker(kq_config, redis_url, r, namespace):
    async def main():
        async with Kickq() as kq:
            with ThreadWorker(redis_url, namespace) as thread_worker:
                jobs = await asyncio.gather(*(kq.create("a", i, HOT) for i in range(1000)))
                finals = await asyncio.gather(*(j.hotjob_promise for j in jobs))
            assert [f.result for f in finals] == [{"ok": str(i)} for i in range(1000)]
            assert thread_worker.finished == 1000
            await until(lambda: kq._state.waiters[namespace].pending_count() == 0)
            assert_consistent(r, namespace)

    arun(main, timeout=60)


def test_hotjobs_follow_a_change_of_namespace(kq_config, namespace):
    """On a cluster the second namespace may live on another master: the client moves there, and
    the first namespace's hotjob is still watched."""
    url = kq_config["redis_url"]

    async def main():
        async with Kickq() as kq:
            first = await kq.create("a", None, HOT)
            kickq.config(redis_namespace=namespace + "-b")
            second = await kq.create("a", None, HOT)
            for ns, job in ((namespace, first), (namespace + "-b", second)):
                with raw_client(url, ns) as raw:
                    assert Worker(raw, ns).run("success", f'"{ns}"') == job.id
            assert (await first.hotjob_promise).result == namespace
            assert (await second.hotjob_promise).result == namespace + "-b"

    arun(main)


# --- cancellation -------------------------------------------------------------------------------------

def test_cancelling_a_hotjob_wait_stops_waiting_and_leaves_the_job(kq_config, r, namespace, worker):
    async def main():
        async with Kickq() as kq:
            job = await kq.create("a", None, HOT)
            other = await kq.create("a", None, HOT)
            waiter = kq._state.waiters[namespace]

            async def handler():
                return await job.hotjob_promise

            task = asyncio.ensure_future(handler())
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert job.hotjob_promise.cancelled()
            await until(lambda: waiter.pending_count() == 1)  # only `other` is still watched
            assert assert_one_structure(r, namespace, job.id) == "new"
            assert stored(r, namespace, job.id)["state"] == "new"
            # The shared listener goes on: the other waiter still gets its result, and the job
            # whose wait was cancelled still runs and finishes normally.
            worker.run("success", '"ran anyway"')
            worker.run("success", '"other"')
            assert (await other.hotjob_promise).result == "other"
            assert (await kq.get(job.id)).result == "ran anyway"
            # Shielded, one awaiter's cancellation does not cancel the promise for the others.
            third = await kq.create("a", None, HOT)
            a = asyncio.ensure_future(asyncio.shield(third.hotjob_promise))
            b = asyncio.ensure_future(asyncio.shield(third.hotjob_promise))
            await asyncio.sleep(0)
            a.cancel()
            worker.run("success", '"b"')
            assert (await b).result == "b"
            assert a.cancelled()

    arun(main)


def test_cancelling_a_gather_of_waits_forgets_them_all(kq_config, r, namespace):
    async def main():
        async with Kickq() as kq:
            jobs = await asyncio.gather(*(kq.create("a", None, HOT) for _ in range(50)))
            gathered = asyncio.gather(*(j.hotjob_promise for j in jobs))
            await asyncio.sleep(0)
            gathered.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gathered
            await until(lambda: kq._state.waiters[namespace].pending_count() == 0)
            assert {stored(r, namespace, j.id)["state"] for j in jobs} == {"new"}
            assert_consistent(r, namespace)

    arun(main)


@pytest.mark.parametrize("hot", [False, True])
def test_cancelling_a_create_before_it_is_sent_writes_nothing(kq_config, r, namespace, hot):
    async def main():
        async with Kickq() as kq:
            await kq.connection()
            before = snapshot(r, namespace)  # the namespace's meta hash, written on connect
            state = kq._state
            task = asyncio.ensure_future(kq.create("a", None, HOT if hot else None))
            await asyncio.sleep(0)  # the task runs up to its first real wait and no further
            # Nothing committed yet: queued in an open batch, or still subscribing.
            assert len(state.batches) == (0 if hot else 1)
            assert not any(batch.started for batch in state.batches.values())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: not state.batches and not state.inflight)
            assert snapshot(r, namespace) == before
            assert (await kq.create("a")).id == "1"  # and the client goes on

    arun(main)


def test_cancelling_a_create_after_it_is_sent_creates_the_job_fully(kq_config, r, namespace):
    if tuple(int(x) for x in r.info("server")["redis_version"].split(".")[:2]) < (6, 2):
        pytest.skip("CLIENT PAUSE WRITE needs Redis 6.2")

    async def main():
        async with Kickq() as kq:
            await kq.connection()
            state = kq._state
            r.client_pause(5000, all=False)  # write commands (scripts included) wait on the server
            try:
                tasks = [asyncio.ensure_future(kq.create("a", i, HOT)) for i in range(3)]
                await until(lambda: state.inflight, message="create committed")
                await until(lambda: script_paused(r), message="the create script waits on the server")
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with pytest.raises(asyncio.CancelledError):
                        await task
                assert not r.exists(Keys(namespace).job("1"))  # still held by the pause
            finally:
                r.client_unpause()
            await until(lambda: not state.inflight, message="the shielded create ran to its end")
            assert [stored(r, namespace, str(i))["data"] for i in (1, 2, 3)] == ["0", "1", "2"]
            assert_consistent(r, namespace)
            assert state.waiters[namespace].pending_count() == 0  # nobody holds those promises
            job = await kq.create("a")  # the connection was not torn down, the ids go on
            assert job.id == "4"

    arun(main)


def test_cancelling_a_delete_still_deletes(kq_config, r, namespace):
    if tuple(int(x) for x in r.info("server")["redis_version"].split(".")[:2]) < (6, 2):
        pytest.skip("CLIENT PAUSE WRITE needs Redis 6.2")

    async def main():
        async with Kickq() as kq:
            job = await kq.create("a")
            r.client_pause(5000, all=False)
            try:
                task = asyncio.ensure_future(kq.delete(job.id))
                await until(lambda: script_paused(r), message="the delete script waits on the server")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                r.client_unpause()
            await until(lambda: not kq._state.inflight)
            assert_gone(r, namespace, job.id)

    arun(main)


# --- connections, close, loops ------------------------------------------------------------------------

def test_connection_options_match_the_sync_client(kq_config):
    kickq.config(redis_timeout=3, redis_options={"client_name": "kickq-test"})

    async def main():
        async with Kickq() as kq:
            client = await kq.connection()
            assert isinstance(client, aioredis.Redis)
            kwargs = client.connection_pool.connection_kwargs
            sync_kwargs = sync_connect(kq.settings()).connection_pool.connection_kwargs
            for key in ("decode_responses", "encoding_errors", "socket_timeout", "socket_connect_timeout",
                        "health_check_interval", "client_name", "host", "port"):
                assert kwargs[key] == sync_kwargs[key], key
            assert (kwargs["socket_timeout"], kwargs["decode_responses"], kwargs["encoding_errors"]) == (
                3.0, True, "replace")
            assert kwargs["retry"]._retries == 0 == sync_kwargs["retry"]._retries  # get_retries(): redis-py 6
            assert await client.client_getname() == "kickq-test"

    arun(main)


def test_an_old_server_is_refused_before_anything_is_written(kq_config, r, namespace, monkeypatch):
    async def old_info(self, *args, **kwargs):
        return {"redis_version": "5.0.14"}

    monkeypatch.setattr(aioredis.Redis, "info", old_info)

    async def main():
        kq = Kickq()
        with pytest.raises(kickq.RedisVersionError, match="6.0.0"):
            await kq.create("a")
        await kq.close()

    arun(main)
    assert snapshot(r, namespace) == {}


def test_wrong_port_gives_redis_unavailable_without_the_password(kq_config):
    port = free_port()
    kickq.config(redis_timeout=1, redis_url=f"redis://someone:s3cret-pw@127.0.0.1:{port}/0")

    async def main():
        async with Kickq() as kq:
            started = time.monotonic()
            with pytest.raises(kickq.RedisUnavailable) as info:
                await kq.create("a")
            assert time.monotonic() - started < 2
            return info.value

    error = arun(main)
    assert isinstance(error, ConnectionError) and isinstance(error, kickq.KickqError)
    assert "s3cret-pw" not in "".join(traceback.format_exception(error)) and str(port) in str(error)


def test_a_server_that_never_answers_is_bounded_by_redis_timeout(kq_config):
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        kickq.config(redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", redis_timeout=0.5)

        async def main():
            async with Kickq() as kq:
                started = time.monotonic()
                with pytest.raises(kickq.RedisUnavailable):
                    await kq.get("1")
                assert time.monotonic() - started < 0.5 + 1.5

        arun(main)


def test_close_cancels_pending_promises_and_the_client_is_reusable(kq_config, r, namespace):
    async def main():
        kq = Kickq()
        job = await kq.create("a", None, HOT)
        started = time.monotonic()
        await kq.close()
        assert time.monotonic() - started < 1.5
        assert job.hotjob_promise.cancelled()
        await until(lambda: subscribers(r, Keys(namespace).done) == 0, message="listener closed")
        assert (await kq.create("a")).id == "2"  # usable again
        await kq.close()
        await kq.close()  # twice is fine

    arun(main)


def test_one_client_across_successive_event_loops(kq_config):
    kq = Kickq()

    async def first():
        return (await kq.create("a", None, HOT)).id  # not closed: its connection dies with the loop

    async def second():
        job = await kq.create("a", None, HOT)
        await kq.close()
        with warnings.catch_warnings():  # the first loop's unclosed connection, as redis.asyncio warns
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        return job.id

    assert (arun(first), arun(second)) == ("1", "2")


def test_a_client_used_by_another_running_loop_is_refused(kq_config):
    kq = Kickq()
    ready, release = threading.Event(), threading.Event()

    def other_thread():
        async def hold():
            await kq.create("a")
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
            await kq.close()

        asyncio.run(hold())

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert ready.wait(10)

        async def main():
            with pytest.raises(kickq.KickqError, match="one client per event loop"):
                await kq.get("1")

        arun(main)
    finally:
        release.set()
        thread.join(10)


def test_reset_closes_the_async_connections(kq_config, r):
    async def main():
        idle = len(r.client_list())
        kq = Kickq()
        await kq.create("a", None, HOT)
        assert len(r.client_list()) >= idle + 2  # the client's connection, the listener's pub/sub
        kickq.reset()
        await until(lambda: len(r.client_list()) == idle, message="kickq.aio's connections closed")

    arun(main)


# --- a real supervisor ----------------------------------------------------------------------------------

HANDLERS = '''
import kickq

kq = kickq.Kickq()


def echo(job, data):
    return {"echo": data, "id": job.id}


kq.process("aio-echo", {"concurrent_jobs": 2}, echo)
'''


@pytest.fixture
def supervisor(tmp_path: Path, redis_url: str, namespace: str):
    try:
        import kickq_supervisor  # noqa: F401
    except ImportError:
        pytest.skip("kickq_supervisor is not installed")
    handlers = tmp_path / "handlers.py"
    handlers.write_text(HANDLERS)
    log = open(tmp_path / "supervisor.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kickq_supervisor", "--redis-url", redis_url,
                             "--redis-namespace", namespace, "--log-level", "WARNING", str(handlers)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_hotjobs_under_a_real_supervisor(kq_config, r, namespace, supervisor, tmp_path):
    async def main():
        async with Kickq() as kq:
            opts = {"hotjob": True, "hotjob_timeout": 30}
            jobs = await asyncio.gather(*(kq.create("aio-echo", {"n": i}, opts) for i in range(1000)))
            finals = await asyncio.gather(*(j.hotjob_promise for j in jobs))
            return jobs, finals

    try:
        jobs, finals = arun(main, timeout=45)
    except BaseException:
        print((tmp_path / "supervisor.log").read_text(errors="replace")[-3000:])
        raise
    assert supervisor.poll() is None
    assert [f.result for f in finals] == [{"echo": {"n": i}, "id": j.id} for i, j in enumerate(jobs)]
    assert {f.state for f in finals} == {"success"}
    wait_until(lambda: r.zcard(Keys(namespace).finished) == 1000, timeout=5)



def test_async_schedules_share_the_sync_machinery(kq_config):
    import kickq
    from kickq.aio import Kickq as AsyncKickq

    async def main():
        async with AsyncKickq() as akq:
            assert await akq.schedule("beat", every=5) == "beat"
            assert await akq.schedule("nightly", cron="0 3 * * *", timezone="Europe/Paris") == "nightly"
            with pytest.raises(ValueError):
                await akq.schedule("bad", cron="nope")
            listed = await akq.schedules()
            return listed, await akq.unschedule("beat"), await akq.unschedule("beat")

    listed, first, second = asyncio.run(main())
    assert [s["id"] for s in listed] == ["beat", "nightly"]
    assert (first, second) == (True, False)
    sync = kickq.Kickq()
    [nightly] = sync.schedules()
    assert nightly["cron"] == "0 3 * * *" and nightly["pending_job_id"] is not None
    assert sync.get(nightly["pending_job_id"]).scheduled_for == nightly["next_run"]


def test_a_default_asyncio_client_does_not_reset_an_explicit_events_maxlen(kq_config, namespace):
    """The asyncio client writes its events_maxlen as the sync client does: an explicit setting wins,
    the default never overwrites another client's."""
    kickq.Kickq(events_maxlen=7).create("a")

    async def main() -> None:
        async with Kickq() as client:
            await client.create("a")

    arun(main)
    r = kickq.Kickq().redis
    assert r.hget("{" + namespace + "}:meta", "events_maxlen") == "7"
