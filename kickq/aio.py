"""`kickq.aio.Kickq`: the client for asyncio applications (FastAPI, aiohttp, Starlette, ...).

Same constructor and config as `kickq.Kickq`, and the same storage: validation and encoding are
`kickq.client.prepare()`, keys are `Keys`, every transition is one of `scripts.SOURCES` run as the
sync client runs it (the FCALL of kickq's function library, else EVALSHA: `AsyncScripts`) with the
argument builders and reply parsers of kickq.scripts, and errors are translated by
`connection.redis_errors`. A job made by either client can be read, deleted and awaited by the other.

    async with Kickq() as kq:
        job = await kq.create("email", {"to": "a@example.com"}, {"hotjob": True})
        final = await job.hotjob_promise          # the finished Job, or HotjobTimeout

Beside create / create_many / get / delete: `wait(id)` for a hotjob made elsewhere, `stats()`,
`events()` (an async iterator), `connection()`, `close()`. See docs/aio.md.

One client belongs to one event loop at a time (redis.asyncio's connections do); after that loop
has stopped, the next call starts afresh in the current one (the old connections could not be
closed from there: `await close()` before a loop ends). In a process forked from the one it was
used in, it starts afresh too, and leaves what it had from the parent alone (`_leave_to_parent`).

Creates issued in the same loop iteration (`asyncio.gather(*(kq.create(...) ...))`) are sent as
one create script call (at most 1000 jobs; more go in one MULTI), exactly as `create_many` sends
them: one round trip, and atomic. With `wait_replicas` (kickq.acks), one WAIT follows the batch; on a
shortfall each caller gets a ReplicationTimeout naming its own jobs.

Cancellation, exactly:
- `create()` / `create_many()`: cancelled before its jobs are committed to a script call (while
  connecting, while subscribing for hotjob results, or queued for the current loop iteration's
  batch), nothing is written. Once committed, the call runs to its end whatever happens to the
  caller: the jobs exist (all of them, it is one atomic script) and the cancelled caller simply
  never sees them (their ids are logged at INFO on "kickq.aio"). Either way, never part of a batch.
  The one case left open is the event loop being torn down (or the connection lost) while the
  command is on the wire: like any lost reply, it may or may not have been applied, never partly.
- `delete()`: once called (after connecting) it runs to its end, shielded from the caller's
  cancellation.
- Awaiting `job.hotjob_promise` (or `wait()`): cancelling the awaiting task cancels that future
  only: the waiting stops, nothing is written, the job goes on, other waiters are unaffected.
  Several tasks awaiting the *same* promise share its cancellation, as with any asyncio Future:
  `await asyncio.shield(job.hotjob_promise)` in each of them avoids it.
- `close()` lets committed creates finish, then cancels pending hotjob promises.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from . import acks, observe, payload, scripts
from .aio_hotjob import AsyncHotjobWaiter, aclose_client
from .backoff import Backoff
from .client import (_CREATE_CHUNK, Prepared, events_maxlen_command, item_triples, prepare, resolve,
                     schedule_entry, schedule_record, schedule_ticks)
from .config import current, merge_settings, normalise_job_options, on_reset, validate_settings, version
from .connection import (async_server_info, check_mode, check_version, client_identity, client_options,
                         describe, make_client, redis_errors)
from .errors import JobNotFound, KickqError, ReplicationTimeout
from .hotjob import recheck_message
from .job import Job, queue_reads, read_fields
from .keys import Keys, validate_name

__all__ = ["Kickq", "AsyncScripts", "connect", "load"]

log = logging.getLogger("kickq.aio")

#: Jobs per create script call; larger batches are several calls in one MULTI (as create_many).
CREATE_CHUNK = _CREATE_CHUNK
_clients: "weakref.WeakSet[Kickq]" = weakref.WeakSet()
_closing: set["asyncio.Task[None]"] = set()
_inherited: list["_State"] = []  # see _leave_to_parent


def connect(settings: Mapping[str, Any], **overrides: Any) -> aioredis.Redis:
    """A redis.asyncio client made exactly like `kickq.connection.connect()`: no automatic
    retries, redis_timeout for connect and replies, decoded replies, then redis_options."""
    client: aioredis.Redis = make_client(aioredis.Redis, settings,
                                         client_options(settings, AsyncRetry(NoBackoff(), 0), **overrides))
    return client


def _ident(settings: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    return client_identity(settings)


async def load(client: Any, failed: BaseException | None = None) -> bool | None:
    """`kickq.scripts.load()` on a redis.asyncio client: the same commands, the same answer."""
    functions: bool | None = False
    if scripts.tries_library(failed):
        try:
            await client.execute_command(*scripts.LOAD_LIBRARY)
            return True
        except redis.exceptions.ResponseError as exc:
            functions = scripts.library_refused(exc)
            if functions:
                return True
    for call in scripts.LOAD_SCRIPTS:
        await client.execute_command(*call)
    return functions


class AsyncScripts:
    """The async twin of `kickq.scripts.Scripts`, on a redis.asyncio client: a plain call is the
    FCALL of kickq's function library where Redis has it, else EVALSHA (`scripts.command()`), and
    a call that finds the scripts missing (`scripts.is_unloaded()`) loads them (`load()`) and runs
    again, as the sync client does; so both behave alike at maxmemory, where the functions' flags
    decide what runs. In a pipeline a script runs by EVALSHA, as in the sync client: redis.asyncio
    loads the scripts a pipeline needs before sending it, whereas an FCALL that found no library
    would fail inside the MULTI while the calls around it ran."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.pool = client.connection_pool  # where its writes go (kickq.acks.where)
        self._scripts = {name: client.register_script(text) for name, text in scripts.SOURCES.items()}
        self.functions: bool | None = True  # what load() said last (see scripts.command())

    async def run(self, name: str, keys_and_args: tuple[list[str], list[Any]], client: Any = None) -> Any:
        keys, args = keys_and_args
        if client is not None:
            return await self._scripts[name](keys=keys, args=args, client=client)
        try:
            return await self._client.execute_command(*scripts.command(name, keys, args, self.functions))
        except redis.exceptions.ResponseError as exc:
            if not scripts.is_unloaded(exc):
                raise
            failed = exc
        self.functions = await load(self._client, failed)
        return await self._client.execute_command(*scripts.command(name, keys, args, self.functions,
                                                                   retry=True))

    async def delete(self, keys: Keys, job_id: str) -> bool:
        return bool(await self.run("delete", scripts.delete_args(keys, job_id)))

    async def run_acked(self, calls: Sequence[acks.Call], wanted: acks.Acks) -> tuple[list[Any], Any]:
        """kickq.acks.run() on the redis.asyncio client: `calls` then the WAIT in one pipeline
        (one connection): (their replies, the WAIT's reply, for acks.confirm)."""
        failed: BaseException | None = None
        while True:
            if failed is not None:
                self.functions = await load(self._client, failed)
            async with self._client.pipeline(transaction=False) as pipe:
                for command in acks.commands(calls, wanted, self.functions, retry=failed is not None):
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
            results, last = acks.parse(replies, len(calls))
            if results is not None:
                return results, last
            if failed is not None:  # missing again right after loading them
                raise last
            failed = last


# --- per-loop state ---------------------------------------------------------------------------------

class _Group:
    """One create()/create_many() call inside a batch."""
    __slots__ = ("prepared", "future")

    def __init__(self, prepared: list[Prepared], future: "asyncio.Future[list[Job]]") -> None:
        self.prepared, self.future = prepared, future


class _Batch:
    """Creates of one loop iteration for one Redis and namespace: one script call (or one MULTI),
    followed by one WAIT when `acks` (wait_replicas > 0)."""
    __slots__ = ("key", "settings", "client", "scripts", "keys", "acks", "waiter", "groups", "size",
                 "started")

    def __init__(self, key: tuple[Any, ...], settings: Mapping[str, Any], client: Any, scr: AsyncScripts,
                 keys: Keys, wanted: acks.Acks | None) -> None:
        self.key, self.settings, self.client, self.scripts, self.keys = key, settings, client, scr, keys
        self.acks = wanted
        self.waiter: AsyncHotjobWaiter | None = None
        self.groups: list[_Group] = []
        self.size = 0
        self.started = False


class _State:
    """Everything bound to one event loop: the connection, the hotjob waiters, the batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pid = os.getpid()  # a process forked from this one has a copy it must not use
        self.lock = asyncio.Lock()
        self.redis: Any = None
        self.ident: tuple[tuple[str, ...], str] | None = None
        self.scripts: AsyncScripts | None = None
        self.info: Mapping[str, Any] = {}  # INFO when `redis` connected
        self.waiters: dict[str, AsyncHotjobWaiter] = {}
        self.batches: dict[tuple[Any, ...], _Batch] = {}  # open: still taking creates
        self.inflight: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.fast_settings: Mapping[str, Any] | None = None  # the settings `redis` was last checked for

    def track(self, task: "asyncio.Task[Any]") -> "asyncio.Task[Any]":
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return task

    async def release(self, waiters_too: bool = True) -> None:
        """Wait for the batches already queued and every committed command, then close the
        waiters (cancelling their promises; not with `waiters_too` False) and the connection."""
        self.fast_settings = None
        while self.inflight:
            await asyncio.wait(set(self.inflight))
        if waiters_too:
            waiters, self.waiters = list(self.waiters.values()), {}
            for waiter in waiters:
                await waiter.close()
        client, self.redis, self.scripts, self.ident = self.redis, None, None, None
        if client is not None:
            await aclose_client(client)

    async def aclose(self) -> None:
        self.closed = True
        await self.release()


def _close_batch(state: _State, batch: _Batch) -> None:
    """No more creates join `batch` (its task is already scheduled)."""
    if state.batches.get(batch.key) is batch:
        del state.batches[batch.key]


async def _run_batch(state: _State, batch: _Batch) -> None:
    # The first step of this task, at the loop iteration after the batch was opened: the commit.
    # From here on its surviving groups are created whatever their callers do.
    batch.started = True
    _close_batch(state, batch)
    groups = [g for g in batch.groups if not g.future.done()]  # callers cancelled before the commit
    if not groups:
        return
    items = [p for g in groups for p in g.prepared]
    waiter = batch.waiter if any(p.opts["hotjob"] for p in items) else None
    generation = waiter.begin() if waiter is not None else 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    shortfall: ReplicationTimeout | None = None
    try:
        try:
            with redis_errors(batch.settings):
                if batch.acks is not None:
                    results, waited = await batch.scripts.run_acked(acks.create_calls(
                        batch.keys, [p.script_item() for p in items], CREATE_CHUNK), batch.acks)
                    created = [pair for reply in results for pair in scripts.parse_create(reply)]
                    try:
                        ids = [job_id for job_id, _ in created]
                        pool = batch.client.connection_pool
                        await acks.confirm_async(batch.acks, waited, "create", ids, pool)
                    except ReplicationTimeout as exc:
                        shortfall = exc  # each caller is told of its own jobs, below
                elif len(items) <= CREATE_CHUNK:
                    reply = await batch.scripts.run("create", scripts.create_args(
                        batch.keys, [p.script_item() for p in items]))
                    created = scripts.parse_create(reply)
                else:
                    async with batch.client.pipeline(transaction=True) as pipe:
                        for start in range(0, len(items), CREATE_CHUNK):
                            chunk = [p.script_item() for p in items[start:start + CREATE_CHUNK]]
                            args = scripts.create_args(batch.keys, chunk)
                            await batch.scripts.run("create", args, client=pipe)
                        replies = await pipe.execute()
                    created = [pair for reply in replies for pair in scripts.parse_create(reply)]
        except asyncio.CancelledError:  # the loop is being torn down: the outcome is unknown
            for group in groups:
                group.future.cancel()
            raise
        except Exception as exc:
            for group in groups:
                if not group.future.done():
                    group.future.set_exception(exc)
            return
        pairs = iter(created)
        for group in groups:
            alive = not group.future.done()
            jobs = []
            for p in group.prepared:
                job_id, create_time = next(pairs)
                promise = None
                if alive and p.opts["hotjob"] and shortfall is None:
                    assert waiter is not None
                    timeout = float(p.opts["hotjob_timeout"])
                    promise = waiter.watch(job_id, timeout, started + timeout, generation, batch.client)
                jobs.append(Job.created(job_id, p.name, create_time, p.delay_ms, p.stored, p.data, promise))
            if alive and shortfall is not None:
                group.future.set_exception(ReplicationTimeout(
                    "create" if len(jobs) == 1 else "create_many", [j.id for j in jobs], shortfall.wanted,
                    shortfall.confirmed, shortfall.timeout, shortfall.local_fsync))
            elif alive:
                group.future.set_result(jobs)
            else:
                log.info("create cancelled by its caller after it was sent: created job(s) %s",
                         ", ".join(j.id for j in jobs))
    finally:
        if waiter is not None:
            waiter.end()


# --- the client -------------------------------------------------------------------------------------

class Kickq:
    """An asyncio client. `Kickq(**overrides)` takes any global config key; the global config is
    read at each call, so `kickq.config()` changes made later apply too."""

    def __init__(self, **overrides: Any) -> None:
        self._overrides = validate_settings(overrides)
        self._state: _State | None = None
        # (config version, settings, resolved options by job name), as the sync client caches them
        self._settings_cache: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        _clients.add(self)

    # --- plumbing ----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The effective config: global, then this client's overrides. Cached until config()
        changes; treat it as read-only."""
        cached = self._settings_cache
        if cached is None or cached[0] != version():
            cached = self._settings_cache = (version(), merge_settings(current(), self._overrides), {})
        return cached[1]

    def _prepare(self, settings: Mapping[str, Any], name: Any, data: Any, opts: Any) -> Prepared:
        """prepare(), with resolve() of the common case (no per-job opts) cached per job name."""
        cached = self._settings_cache
        if opts or cached is None or cached[1] is not settings or not isinstance(name, str):
            return prepare(settings, name, data, opts)
        by_name = cached[2]
        hit = by_name.get(name)
        if hit is None:
            hit = by_name[name] = resolve(settings, name, None)
            if len(by_name) > 10_000:
                by_name.clear()
        return prepare(settings, name, data, opts, hit)

    def keys(self, settings: Mapping[str, Any] | None = None) -> Keys:
        return Keys((settings or self.settings())["redis_namespace"])

    def _bind(self) -> _State:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is not None and state.pid != os.getpid():
            _leave_to_parent(state)
            state = None
        if state is not None and state.loop is not loop:
            if state.loop.is_running():
                raise KickqError("this kickq.aio.Kickq is in use by another running event loop: "
                                 "use one client per event loop")
            state = None  # its loop has stopped: its connections cannot be used (or awaited) any more
        if state is None:
            state = self._state = _State(loop)
        return state

    async def _connection(self, settings: Mapping[str, Any]) -> tuple[_State, Any, AsyncScripts]:
        state = self._bind()
        if state.fast_settings is settings and state.scripts is not None:
            return state, state.redis, state.scripts
        ident = _ident(settings)
        if state.redis is None or state.ident != ident:
            async with state.lock:
                if state.redis is not None and state.ident != ident:
                    # The connection settings changed: retire the old ones. Only the namespace, on a
                    # Cluster (another master): the hotjob waiters, one per namespace, stay.
                    await state.release(waiters_too=state.ident is None or state.ident[0] != ident[0])
                if state.redis is None:
                    client = connect(settings)
                    try:
                        with redis_errors(settings):
                            info = await async_server_info(client)
                            check_version(info)
                            check_mode(info, settings)
                            await client.execute_command(*events_maxlen_command(settings))
                    except BaseException:
                        await aclose_client(client)
                        raise
                    if state.closed:
                        await aclose_client(client)
                        raise KickqError("this kickq.aio.Kickq was closed while connecting")
                    state.redis, state.ident, state.scripts = client, ident, AsyncScripts(client)
                    state.info = info
        assert state.scripts is not None
        state.fast_settings = settings
        return state, state.redis, state.scripts

    async def connection(self) -> aioredis.Redis:
        """The underlying redis.asyncio client (decode_responses=True)."""
        client: aioredis.Redis = (await self._connection(self.settings()))[1]
        return client

    def _waiter(self, state: _State, settings: Mapping[str, Any]) -> AsyncHotjobWaiter:
        namespace = settings["redis_namespace"]
        waiter = state.waiters.get(namespace)
        if waiter is None:
            waiter = state.waiters[namespace] = AsyncHotjobWaiter(
                lambda: connect(settings), Keys(namespace), float(settings["redis_timeout"]))
        return waiter

    async def close(self) -> None:
        """Close connections: creates already sent complete first; pending hotjob promises are
        cancelled. The client can be used again."""
        state, self._state = self._state, None
        if state is None:
            return
        if state.pid != os.getpid():
            _leave_to_parent(state)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if state.loop is running:
            await state.aclose()
        elif state.loop.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(state.aclose(), state.loop))
        # else: its loop has stopped; nothing of it can be awaited any more

    async def __aenter__(self) -> "Kickq":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _detach(self) -> None:
        """kickq.reset(): close this client's connections without awaiting (reset is sync)."""
        state, self._state = self._state, None
        if state is not None and state.pid != os.getpid():
            _leave_to_parent(state)
            return
        if state is None or state.loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if state.loop is running:
            _spawn_closing(state)
        elif state.loop.is_running():
            state.loop.call_soon_threadsafe(_spawn_closing, state)

    # --- create ------------------------------------------------------------------------------------

    async def create(self, name: str, data: Any = None, opts: Mapping[str, Any] | None = None) -> Job:
        """Create a job. A numeric `delay` (0 included) makes it `delayed`, else `new`. With
        `hotjob`, `job.hotjob_promise` is an asyncio Future of the finished Job."""
        return (await self._create([(name, data, opts)]))[0]

    async def create_many(self, items: Iterable[Sequence[Any]]) -> list[Job]:
        """Create many jobs in one round trip: items are (name,), (name, data) or (name, data, opts).

        Every item is checked first: one bad item raises and nothing is written. The batch is
        written atomically."""
        triples = item_triples(items)
        return await self._create(triples) if triples else []

    async def _create(self, triples: Sequence[tuple[Any, Any, Any]]) -> list[Job]:
        settings = self.settings()
        prepared = [self._prepare(settings, name, data, opts) for name, data, opts in triples]
        state, client, scr = await self._connection(settings)
        waiter = None
        if any(p.opts["hotjob"] for p in prepared):
            waiter = self._waiter(state, settings)
            await waiter.ensure_subscribed()  # subscribed before the create: no completion is missed
        if state.closed:
            raise KickqError("this kickq.aio.Kickq was closed while the create was starting")
        wanted = _acks(state, settings) if settings["wait_replicas"] or settings["wait_aof"] else None
        group = _Group(prepared, state.loop.create_future())
        key = (state.ident, settings["redis_namespace"], wanted)
        batch = state.batches.get(key)
        if batch is not None and batch.size and batch.size + len(prepared) > CREATE_CHUNK:
            _close_batch(state, batch)  # full: start another
            batch = None
        if batch is None:
            batch = state.batches[key] = _Batch(key, settings, client, scr, Keys(settings["redis_namespace"]),
                                                wanted)
            # Its first step runs at the next loop iteration: after every create of this one.
            state.track(state.loop.create_task(_run_batch(state, batch)))
        if waiter is not None:
            batch.waiter = waiter
        batch.groups.append(group)
        batch.size += len(prepared)
        # Cancelling this await cancels group.future: before the commit the group is dropped,
        # after it the jobs are created anyway (see the module docstring).
        return await group.future

    # --- read, delete, wait --------------------------------------------------------------------------

    async def get(self, job_id: str | int) -> Job:
        settings = self.settings()
        _, client, _ = await self._connection(settings)
        job_id = str(job_id)
        with redis_errors(settings):
            fields = await _read_job(client, Keys(settings["redis_namespace"]), job_id)
        if not fields:
            raise JobNotFound(job_id)
        return Job.from_fields(job_id, fields)

    async def delete(self, job_id: str | int) -> bool:
        """Remove the job from every structure. True if it existed. A worker still running it
        cannot bring it back: its finish is rejected. Hotjob waiters get JobNotFound."""
        settings = self.settings()
        state, _, scr = await self._connection(settings)
        keys = Keys(settings["redis_namespace"])
        job_id = str(job_id)
        wanted = _acks(state, settings) if settings["wait_replicas"] or settings["wait_aof"] else None

        async def delete() -> bool:
            with redis_errors(settings):
                if wanted is not None:
                    return bool(await _acked_call(scr, wanted, "delete", scripts.delete_args(keys, job_id),
                                                  lambda reply: [job_id]))
                return await scr.delete(keys, job_id)

        task = state.track(state.loop.create_task(delete()))
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def wait(self, job_id: str | int, timeout: float | None = None) -> Job:
        """The finished Job of an existing hotjob, whoever created it (a sync client, another
        process): at once if it already finished; JobNotFound if it is or gets deleted;
        HotjobTimeout after `timeout` seconds from now (default: the job's hotjob_timeout).
        Only hotjobs announce their completion: waiting for another job raises KickqError."""
        if timeout is not None:
            timeout = normalise_job_options({"hotjob_timeout": timeout}, allow_callable=False,
                                                    where="wait()")["hotjob_timeout"]
        settings = self.settings()
        state, client, _ = await self._connection(settings)
        job_id = str(job_id)
        waiter = self._waiter(state, settings)
        await waiter.ensure_subscribed()
        future = waiter.watch(job_id, None, None, waiter.generation, client)
        try:
            with redis_errors(settings):
                fields = await _read_job(client, Keys(settings["redis_namespace"]), job_id)
            message = recheck_message(job_id, fields)
            if message is not None:
                waiter.deliver(job_id, message, keep_early=False)
            elif not future.done():
                job = Job.from_fields(job_id, fields)
                if not job.hotjob:
                    raise KickqError(f"job {job_id} is not a hotjob: its completion is not announced "
                                     "(read it with get())")
                waiter.arm(job_id, future, float(job.hotjob_timeout if timeout is None else timeout))
            return await future
        finally:
            if not future.done():
                future.cancel()


    # --- schedules ---------------------------------------------------------------------------------

    async def schedule(self, name: str, cron: str | None = None, every: float | None = None,
                       data: Any = None, opts: Mapping[str, Any] | None = None,
                       schedule_id: str | None = None, timezone: str = "UTC", catch_up: str = "one") -> str:
        """As kickq.Kickq.schedule(): create or replace a schedule; returns its id."""
        settings = self.settings()
        sid, record = schedule_record(settings, name, cron, every, data, opts, schedule_id, timezone,
                                      catch_up)
        state, client, scr = await self._connection(settings)
        keys = Keys(settings["redis_namespace"])
        wanted = _acks(state, settings) if settings["wait_replicas"] or settings["wait_aof"] else None
        with redis_errors(settings):
            ticks = schedule_ticks(record, await client.time() if cron is not None else None)
            call = scripts.schedule_args(keys, sid, payload.encode(record), ticks)
            if wanted is not None:
                await _acked_call(scr, wanted, "schedule", call, lambda reply: [str(reply[0])])
            else:
                await scr.run("schedule", call)
        return sid

    async def unschedule(self, schedule_id: str) -> bool:
        """Remove a schedule and its pending tick job. True if it existed."""
        settings = self.settings()
        call = scripts.unschedule_args(Keys(settings["redis_namespace"]), validate_name(schedule_id))
        state, _, scr = await self._connection(settings)
        wanted = _acks(state, settings) if settings["wait_replicas"] or settings["wait_aof"] else None
        with redis_errors(settings):
            if wanted is not None:
                return bool(await _acked_call(scr, wanted, "unschedule", call, lambda reply: []))
            return bool(await scr.run("unschedule", call))

    async def schedules(self) -> list[dict[str, Any]]:
        """As kickq.Kickq.schedules()."""
        settings = self.settings()
        _, client, _ = await self._connection(settings)
        with redis_errors(settings):
            raw = await client.hgetall(Keys(settings["redis_namespace"]).schedules)
        return [schedule_entry(sid, text) for sid, text in sorted(raw.items())]

    # --- seeing inside ------------------------------------------------------------------------------

    async def stats(self, name: str | None = None) -> dict[str, Any]:
        """Counts by state and a recent window of activity, per job name and in total: the shape of
        `kickq.Kickq.stats()`, from the same reads (kickq.observe)."""
        settings = self.settings()
        _, client, _ = await self._connection(settings)
        keys = Keys(settings["redis_namespace"])
        if name is not None:
            validate_name(name)
        window = float(settings["stats_window"])
        with redis_errors(settings):
            seconds, micros = await client.time()
            buckets = observe.window_buckets(seconds * 1000 + micros // 1000, window)
            async with client.pipeline(transaction=False) as pipe:
                observe.queue_commands(pipe, keys, buckets)
                replies = await pipe.execute()
        return observe.build_stats(replies, window, only=name)

    async def events(self, names: str | Iterable[str] | None = None, since: str = "$",
                     timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """`async for event in kq.events():` transitions as they happen, as `kickq.Kickq.events()`
        yields them (id, name, event, state, time, stream_id). `since` is a stream id, "0" for
        everything kept, or "$" for new ones only. Survives reconnects (it resumes after the last id
        it yielded). With `timeout`, stops after that many seconds without an event."""
        wanted_names = {names} if isinstance(names, str) else (set(names) if names is not None else None)
        settings = self.settings()
        keys = Keys(settings["redis_namespace"])
        block_ms = int(max(0.05, min(1.0, float(settings["redis_timeout"]) / 2)) * 1000)
        last = since
        idle_since = time.monotonic()
        backoff = Backoff()
        while True:
            reply: Any = None
            try:
                _, client, _ = await self._connection(settings)
                if last == "$":  # pin "$" to an id, so that a reconnect cannot skip anything
                    newest = await client.xrevrange(keys.events, count=1)
                    last = newest[0][0] if newest else "0-0"
                reply = await client.xread({keys.events: last}, count=500, block=block_ms)
                backoff.reset()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                await asyncio.sleep(backoff.next_delay())
            events, newest = observe.read_events(reply, wanted_names)
            last = newest or last
            if events:
                idle_since = time.monotonic()
            for event in events:
                yield event
            if timeout is not None and time.monotonic() - idle_since > timeout:
                return


def _acks(state: _State, settings: Mapping[str, Any]) -> acks.Acks:
    """What a write waits for (settings with wait_replicas > 0), checked against the server
    before anything is written."""
    wanted = acks.wanted(settings)
    assert wanted is not None
    acks.check_server(wanted, state.info, describe(settings))
    return wanted


async def _acked_call(scr: AsyncScripts, wanted: acks.Acks, name: str,
                      keys_and_args: tuple[list[str], list[Any]], job_ids: Callable[[Any], list[str]]) -> Any:
    """One script call confirmed by wait_replicas replicas: its reply; `job_ids(reply)` are the
    jobs a ReplicationTimeout names."""
    (reply,), waited = await scr.run_acked([(name, keys_and_args)], wanted)
    await acks.confirm_async(wanted, waited, name, job_ids(reply), scr.pool)
    return reply


async def _read_job(client: aioredis.Redis, keys: Keys, job_id: str) -> Mapping[str, str]:
    """The job's fields (empty: no such job), from its packed entry or its hash (job.queue_reads)."""
    async with client.pipeline(transaction=False) as pipe:
        queue_reads(pipe, keys, [job_id])
        return read_fields(await pipe.execute())[0]


def _retrieve(task: "asyncio.Task[Any]") -> None:
    """Mark a shielded task's exception as seen: its caller may have been cancelled."""
    if not task.cancelled():
        task.exception()


def _leave_to_parent(state: _State) -> None:
    """In a process forked from the one that made `state`: its loop runs there, not here, and its
    sockets are the parent's. Kept, never closed or collected: closing a connection would also
    unregister its socket from the loop's epoll, which the parent shares, and cut the parent off."""
    _inherited.append(state)


def _spawn_closing(state: _State) -> None:
    task = state.loop.create_task(state.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _reset_all() -> None:
    for client in list(_clients):
        client._detach()


on_reset(_reset_all)
