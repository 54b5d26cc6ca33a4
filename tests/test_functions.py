"""The scripts as a Redis function library (Redis 7) and the EVALSHA fallback: loaded when Redis
lacks them, the same replies either way, no state carried from one call to the next."""
from __future__ import annotations

import asyncio

import pytest
import redis

import kickq
from kickq import scripts
from kickq.keys import Keys
from kickq_supervisor.channel import Channel
from tests.helpers import start_redis, stop_redis, with_credentials


def _library_loaded(r) -> bool:
    return bool(r.function_list(library=scripts.LIBRARY_NAME))


def test_the_first_call_loads_the_library_and_runs_as_a_function(kq, r):
    r.function_flush()
    kq.create("a")
    assert _library_loaded(r)
    assert r.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0) >= 1


def test_no_tally_outlives_its_call(kq, r):
    # A library's top level runs once: were the tallies not reset per call, each create would add
    # the counts of all creates before it again.
    for _ in range(5):
        kq.create("a")
    job = kq.create("b", {"x": 1})
    assert r.hgetall(Keys(kq.settings()["redis_namespace"]).counts) == {"new:a": "5", "new:b": "1"}
    assert kq.get(job.id).data == {"x": 1}


def test_calls_after_function_flush_load_the_library_again(kq, r):
    kq.create("a")
    r.function_flush()
    assert kq.create("a", {"x": 1}).data == {"x": 1}  # through the lane
    r.function_flush()
    scr = scripts.Scripts(kq.redis)  # through the pool
    keys = Keys(kq.settings()["redis_namespace"])
    assert scr.claim(keys, ["a"])[0] == "1"
    assert _library_loaded(r)


def _claimed_by_w1_then_flushed(kq, r) -> tuple[Keys, tuple]:
    """A job created and claimed by worker "w1"; then Redis loses kickq's functions."""
    kq.create("a")
    keys = Keys(kq.settings()["redis_namespace"])
    claimed = scripts.Scripts(kq.redis).claim(keys, ["a"], claimer="w1")
    assert claimed is not None
    r.function_flush()
    return keys, claimed


def _finished_by_channel(client, keys: Keys, claimed: tuple) -> list:
    """End w1's run of `claimed` as a worker does (finish_many on its Channel): (status, state)s."""
    channel = Channel(client)
    try:
        channel.send("finish_many", scripts.finish_many_args(
            keys, "w1", [(claimed[0], claimed[1], "success", "", 1, 0)]))
        [reply] = channel.settle()
    finally:
        channel.reset()
    return scripts.parse_finish_many(reply)[0]


def test_the_workers_channel_loads_the_library_again_for_a_call_in_flight(kq, r):
    keys, claimed = _claimed_by_w1_then_flushed(kq, r)
    assert _finished_by_channel(kq.redis, keys, claimed) == [("ok", "success")]
    assert kq.get(claimed[0]).state == "success"


def test_library_functions_cover_every_script():
    assert set(scripts.FUNCTIONS) == set(scripts.NAMES)
    for name, function in scripts.FUNCTIONS.items():
        assert f"function_name = '{function}'," in scripts.LIBRARY, name
    # only what adds jobs is refused at maxmemory; everything else lets work in flight drain
    assert scripts.LIBRARY.count("flags = {'allow-oom'}") == len(scripts.NAMES) - len(scripts.ADDS_JOBS)


@pytest.fixture
def redis_without_functions(tmp_path):
    """A Redis 7 whose FCALL and FUNCTION are renamed away: to kickq it looks like Redis 6."""
    proc, port = start_redis(tmp_path, "--rename-command", "FCALL", "", "--rename-command", "FUNCTION", "")
    try:
        yield port
    finally:
        stop_redis(proc)


def test_without_functions_every_call_falls_back_to_evalsha(redis_without_functions):
    url = f"redis://127.0.0.1:{redis_without_functions}/0"
    r = redis.Redis.from_url(url, decode_responses=True)
    kq = kickq.Kickq(redis_url=url, redis_namespace="nofn")
    try:
        job = kq.create("a", {"x": 1})
        assert kq.get(job.id).data == {"x": 1}
        keys = Keys("nofn")
        claimed = scripts.Scripts(r).claim(keys, ["a"], claimer="w1")
        assert claimed is not None and claimed[0] == job.id
        assert _finished_by_channel(r, keys, claimed) == [("ok", "success")]
        r.script_flush()
        assert kq.create("a").id == "2"  # NOSCRIPT: loaded again
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] >= 4
        assert "cmdstat_fcall" not in r.info("commandstats")
    finally:
        kq.close()
        r.close()


def test_at_maxmemory_a_missing_library_falls_back_to_scripts(kq, r):
    """Redis refuses FUNCTION LOAD at maxmemory (SCRIPT LOAD it takes): jobs in flight still finish."""
    keys, claimed = _claimed_by_w1_then_flushed(kq, r)
    before = r.config_get("maxmemory")["maxmemory"]
    r.config_set("maxmemory", 1)  # every write that may grow memory is refused from here
    try:
        scr = scripts.Scripts(kq.redis)
        status = scr.finish(keys, claimed[0], claimed[1], "success", claimer="w1")
        with pytest.raises(kickq.KickqError, match="out of memory"):
            kq.create("a")
    finally:
        r.config_set("maxmemory", before)
    assert status[:2] == ("ok", "success")
    assert not _library_loaded(r)
    assert kq.create("a").state == "new"  # memory back: loaded and called as a function again
    assert _library_loaded(r)


@pytest.mark.parametrize("denied", [["-fcall", "-function"], ["-fcall"]], ids=["no-functions", "no-fcall"])
def test_an_acl_user_without_functions_runs_the_scripts_by_evalsha(r, every_server, redis_url, namespace,
                                                                   denied):
    user, password = f"nofn-{namespace}", "acl-pw"
    pattern = "{" + namespace + "}:*"
    for server in every_server:
        server.acl_setuser(user, enabled=True, passwords=["+" + password], keys=[pattern], channels=[pattern],
                           commands=["+@all", *denied])
    kq = kickq.Kickq(redis_url=with_credentials(redis_url, user, password), redis_namespace=namespace)
    try:
        r.function_flush()
        evalsha = r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        job = kq.create("a", {"x": 1})
        assert kq.create("a").id == "2"
        assert kq.get(job.id).data == {"x": 1}
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] == evalsha + 2
    finally:
        kq.close()
        for server in every_server:
            server.acl_deluser(user)


# --- the asyncio client: the same choice of FCALL or EVALSHA, and the same reloading ----------------

def _fcalls(r) -> int:
    return r.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)


def test_the_asyncio_client_calls_the_library_and_loads_it_again_after_function_flush(kq_config, r):
    from kickq import aio

    async def main() -> tuple[str, str]:
        async with aio.Kickq() as akq:
            first = await akq.create("a", {"x": 1})
            r.function_flush()
            second = await akq.create("a", {"x": 2})  # "function not found": loaded, called again
            return first.id, second.id

    r.function_flush()
    fcalls = _fcalls(r)
    assert asyncio.run(main()) == ("1", "2")
    assert _library_loaded(r)
    assert _fcalls(r) >= fcalls + 2


def test_at_maxmemory_the_asyncio_client_finishes_and_deletes_as_the_sync_one(kq_config, r):
    """Functions that move or remove jobs carry 'allow-oom': at maxmemory a finish or a delete
    still runs, from either client, and a create is refused by both."""
    from kickq import aio

    keys = Keys(kq_config["redis_namespace"])
    sync_kq = kickq.Kickq()
    try:
        for _ in range(4):
            sync_kq.create("a")
        claimed = [scripts.Scripts(sync_kq.redis).claim(keys, ["a"], claimer="w1") for _ in range(2)]
        assert _library_loaded(r)
        before = r.config_get("maxmemory")["maxmemory"]

        async def through_aio() -> tuple[tuple, bool]:
            async with aio.Kickq() as akq:
                scr = aio.AsyncScripts(await akq.connection())  # connected before maxmemory
                r.config_set("maxmemory", 1)  # every write that may grow memory is refused from here
                fcalls.append(_fcalls(r))
                finished = scripts.parse_finish(await scr.run("finish", scripts.finish_args(
                    keys, claimed[1][0], claimed[1][1], "success", claimer="w1")))
                deleted = await akq.delete("4")
                with pytest.raises(kickq.KickqError, match="out of memory"):
                    await akq.create("a")
                fcalls.append(_fcalls(r))
                return finished[:2], deleted

        fcalls: list[int] = []
        try:
            aio_finished, aio_deleted = asyncio.run(through_aio())
            sync_finished = scripts.Scripts(sync_kq.redis).finish(keys, claimed[0][0], claimed[0][1],
                                                                  "success", claimer="w1")[:2]
            sync_deleted = sync_kq.delete("3")
            with pytest.raises(kickq.KickqError, match="out of memory"):
                sync_kq.create("a")
        finally:
            r.config_set("maxmemory", before)
        assert sync_finished == aio_finished == ("ok", "success")
        assert sync_deleted is aio_deleted is True
        assert fcalls[1] >= fcalls[0] + 2  # the finish and the delete, as functions
    finally:
        sync_kq.close()


def test_without_functions_the_asyncio_client_falls_back_to_evalsha(redis_without_functions):
    from kickq import aio

    url = f"redis://127.0.0.1:{redis_without_functions}/0"
    r = redis.Redis.from_url(url, decode_responses=True)

    async def main() -> list[str]:
        async with aio.Kickq(redis_url=url, redis_namespace="nofn") as akq:
            ids = [(await akq.create("a", {"x": 1})).id]
            r.script_flush()
            ids.append((await akq.create("a")).id)  # NOSCRIPT: loaded again
            assert await akq.delete(ids[0])
            return ids

    try:
        assert asyncio.run(main()) == ["1", "2"]
        assert r.info("commandstats")["cmdstat_evalsha"]["calls"] >= 3
        assert "cmdstat_fcall" not in r.info("commandstats")
    finally:
        r.close()
