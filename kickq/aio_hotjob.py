"""Waiting for hotjobs in asyncio: one listener task and one pub/sub connection per client (and
namespace), however many wait; deadlines are `loop.call_at` timers, so no thread and no task per
waiter.

The protocol is the sync waiter's (kickq/hotjob.py), with its pure helpers: every hotjob's final
state is published on the namespace's `done` channel with the whole job; the creator subscribes
*before* the create; a message that arrives between the create's reply and the creator's watch()
is kept in `_early` while a create is in progress (begin()/end()); after every (re)subscription all
pending jobs are re-read from Redis, and so is a job whose create overlapped a resubscription.

Cancellation: each waiter has its own Future. Cancelling it (which is what cancelling a task that
awaits it does) only forgets that Future and its timer: the listener, the other waiters and the
job itself are untouched.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Callable

from .connection import (NOTIFICATION_TYPES, SUBSCRIBED_TYPES, UNSUBSCRIBED_TYPES,
                         async_subscribe_notifications)
from .backoff import Outage
from .cluster import async_left_behind
from .errors import HotjobTimeout, KickqError, RedisUnavailable
from .hotjob import EARLY_KEEP_SECONDS, final_job, parse_message, recheck_message
from .job import Job, queue_reads, read_fields
from .keys import Keys

log = logging.getLogger("kickq.aio.hotjob")

#: The longest the listener blocks on its socket: each read also sends redis-py's health-check PING
#: when one is due, so a dead pub/sub connection is found even when no message comes.
POLL_SECONDS = 1.0
#: HGETALLs per pipeline when pending jobs are re-read after a reconnect.
RECHECK_CHUNK = 1000
EARLY_LIMIT = 10000


async def aclose_client(client: Any) -> None:
    """Close a redis.asyncio client or PubSub (aclose() since redis-py 5.0.1, close() before)."""
    closer = getattr(client, "aclose", None) or client.close
    await closer()


class _Watch:
    __slots__ = ("job_id", "future", "timeout", "timer")

    def __init__(self, job_id: str, future: asyncio.Future[Job], timeout: float | None) -> None:
        self.job_id, self.future, self.timeout = job_id, future, timeout
        self.timer: asyncio.TimerHandle | None = None


class AsyncHotjobWaiter:
    """Bound to the running event loop it was made in; `connect()` makes a redis.asyncio client."""

    def __init__(self, connect: Callable[[], Any], keys: Keys, timeout: float) -> None:
        self._connect = connect
        self._keys = keys
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, list[_Watch]] = {}
        self._early: dict[str, tuple[float, dict[str, Any]]] = {}
        self._creating = 0  # creates between begin() and end()
        self._to_recheck: list[str] = []  # watched under a renewed subscription: read them again
        self._generation = 0  # bumped at every (re)subscription
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._last_error: BaseException | None = None
        self._closed = False

    # --- used by the client ------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    async def ensure_subscribed(self) -> None:
        """Return once the subscription is live (at once when it is); RedisUnavailable after
        redis_timeout. Cancelling this wait changes nothing."""
        if self._closed:
            raise KickqError("this client was closed while a hotjob create was starting")
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._listen(), name="kickq-hotjob-listener")
        if self._subscribed.is_set():
            return
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that coincides
        # with the inner wait's end, and this wait must stay cancellable.
        subscribed = self._loop.create_task(self._subscribed.wait())
        try:
            await asyncio.wait([subscribed], timeout=self._timeout)
        finally:
            subscribed.cancel()
        if not self._subscribed.is_set():
            cause = f": {self._last_error}" if self._last_error else ""
            raise RedisUnavailable("could not subscribe for hotjob results within "
                                   f"redis_timeout{cause}") from None

    def begin(self) -> int:
        """A create is about to be sent: keep early completions until end(). Returns the generation
        to give to watch()."""
        self._creating += 1
        return self._generation

    def end(self) -> None:
        self._creating = max(0, self._creating - 1)
        if not self._creating:
            self._early.clear()

    def watch(self, job_id: str, timeout: float | None, deadline: float | None, generation: int,
              client: Any) -> asyncio.Future[Job]:
        """A future for `job_id`, failing with HotjobTimeout at `deadline` (loop.time()); without a
        deadline, see arm(). `generation` is what begin() returned."""
        future: asyncio.Future[Job] = self._loop.create_future()
        early = self._early.pop(job_id, None)
        if early is not None:
            self._settle([future], job_id, early[1])
            return future
        watch = _Watch(job_id, future, timeout)
        self._pending.setdefault(job_id, []).append(watch)
        future.add_done_callback(functools.partial(self._forget, watch))
        if deadline is not None:
            watch.timer = self._loop.call_at(deadline, self._expire, watch)
        if generation != self._generation:
            # The subscription was renewed while the job was being created: its message may be gone.
            # One recheck for all the jobs watched in this loop iteration (a batch of creates), so
            # that a thousand of them take one pooled connection, not a thousand.
            if not self._to_recheck:
                self._loop.call_soon(self._recheck_watched, client)
            self._to_recheck.append(job_id)
        return future

    def _recheck_watched(self, client: Any) -> None:
        ids, self._to_recheck = self._to_recheck, []
        self._spawn(self._recheck(client, ids))

    def arm(self, job_id: str, future: asyncio.Future[Job], timeout: float) -> None:
        """Start, from now, the HotjobTimeout clock of a watch() made without a deadline."""
        for watch in self._pending.get(job_id, ()):
            if watch.future is future and watch.timer is None and not future.done():
                watch.timeout = timeout
                watch.timer = self._loop.call_later(timeout, self._expire, watch)

    def deliver(self, job_id: str, message: dict[str, Any], *, keep_early: bool = True) -> None:
        """Settle every waiter of `job_id` with a `done` message (or what recheck_message made)."""
        watches = self._pending.pop(job_id, None)
        if watches is None:
            if keep_early and self._creating:  # maybe a job whose creator has not called watch() yet
                now = time.monotonic()
                self._early[job_id] = (now, message)
                if len(self._early) > EARLY_LIMIT:
                    self._early = {k: v for k, v in self._early.items() if now - v[0] < EARLY_KEEP_SECONDS}
            return
        self._settle([w.future for w in watches], job_id, message)

    def pending_count(self) -> int:
        return sum(len(watches) for watches in self._pending.values())

    async def close(self) -> None:
        """Stop the listener; pending futures are cancelled (as the sync client does)."""
        self._closed = True
        tasks = [t for t in (self._task, *self._background) if t is not None and not t.done()]
        while tasks:
            # Cancel again until done: a cancellation that lands as an inner wait_for completes is
            # swallowed before Python 3.12 (redis-py connects through one).
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)
            tasks = [t for t in tasks if not t.done()]
        pending = [w for watches in self._pending.values() for w in watches]
        self._pending.clear()
        self._early.clear()
        for watch in pending:
            watch.future.cancel()

    # --- outcomes ----------------------------------------------------------------------------------

    @staticmethod
    def _settle(futures: list[asyncio.Future[Job]], job_id: str, message: dict[str, Any]) -> None:
        futures = [f for f in futures if not f.done()]
        if not futures:
            return
        try:
            job = final_job(job_id, message)
        except Exception as exc:  # JobNotFound; a corrupt record fails only these waiters
            for future in futures:
                future.set_exception(exc)
            return
        for future in futures:
            future.set_result(job)

    def _forget(self, watch: _Watch, future: asyncio.Future[Job]) -> None:
        """Done callback of every watched future: settled, timed out or cancelled by its awaiter."""
        if watch.timer is not None:
            watch.timer.cancel()
        watches = self._pending.get(watch.job_id)
        if watches is not None and watch in watches:
            watches.remove(watch)
            if not watches:
                del self._pending[watch.job_id]
        if not future.cancelled():
            # Nobody has to await a promise: an unawaited HotjobTimeout is not an error to log.
            future.exception()

    def _expire(self, watch: _Watch) -> None:
        if not watch.future.done():
            watch.future.set_exception(HotjobTimeout(watch.job_id, watch.timeout or 0.0))

    # --- the listener task -------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(self._guarded(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _guarded(self, coro: Any) -> None:
        try:
            await coro
        except Exception as exc:  # the listener re-reads every pending job when it reconnects
            log.warning("hotjob recheck failed (%s); the listener will retry after reconnecting", exc)

    async def _listen(self) -> None:
        outage = Outage(log, "hotjob listener")
        while not self._closed:
            generation = self._generation
            error: BaseException = ConnectionError("the subscription ended")
            try:
                await self._session()
            except Exception as exc:  # never let the only listener die
                self._last_error = error = exc
            if self._closed:
                return
            if self._generation != generation:  # it had subscribed: a fresh loss, retry soon
                outage.ok()
            await asyncio.sleep(outage.failed(error))

    async def _session(self) -> None:
        """One subscription, from connect to its loss (an exception)."""
        client = pubsub = None
        try:
            client = self._connect()
            pubsub = client.pubsub()
            await async_subscribe_notifications(client, pubsub, self._keys.done)
            await self._confirmed(pubsub)
            self._generation += 1
            await self._recheck(client, list(self._pending))
            self._subscribed.set()
            self._last_error = None
            while not self._closed:
                if await async_left_behind(pubsub):  # Sentinel named another master
                    raise ConnectionError("the master changed")
                message = await pubsub.get_message(timeout=POLL_SECONDS)
                if message and message.get("type") in UNSUBSCRIBED_TYPES:
                    # The server ended it: on a cluster, the namespace's slot moved to another node.
                    raise ConnectionError("the server ended the subscription")
                if message and message.get("type") in NOTIFICATION_TYPES:
                    try:
                        job_id, body = parse_message(message["data"])
                    except (ValueError, KeyError, TypeError) as exc:
                        log.warning("ignoring a malformed message on %s: %s", self._keys.done, exc)
                        continue
                    self.deliver(job_id, body)
        finally:
            self._subscribed.clear()
            for closable in (pubsub, client):
                if closable is not None:
                    try:
                        await aclose_client(closable)
                    except Exception:
                        pass

    async def _confirmed(self, pubsub: Any) -> None:
        """Read the subscribe confirmation: only then is the subscription live on the server."""
        deadline = self._loop.time() + self._timeout
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError("no subscribe confirmation within redis_timeout")
            message = await pubsub.get_message(timeout=remaining)
            if message is not None and message.get("type") in SUBSCRIBED_TYPES:
                return

    async def _recheck(self, client: Any, ids: list[str]) -> None:
        """Settle each of `ids` that finished (or vanished) while we could not hear about it."""
        for start in range(0, len(ids), RECHECK_CHUNK):
            chunk = ids[start:start + RECHECK_CHUNK]
            async with client.pipeline(transaction=False) as pipe:
                queue_reads(pipe, self._keys, chunk)
                replies = await pipe.execute()
            for job_id, fields in zip(chunk, read_fields(replies), strict=True):
                message = recheck_message(job_id, fields)
                if message is not None:
                    self.deliver(job_id, message, keep_early=False)
