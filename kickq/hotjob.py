"""Waiting for hotjobs: one subscriber thread and one timer thread per client, however many wait.

Every hotjob's final state is published on the namespace's `done` channel with the whole job
(see finalise in lua/_lib_run.lua). The waiter subscribes *before* the job is created, so a completion
cannot slip past; a completion that arrives before the creator registered its future is kept for
a while in `_early`; after a reconnect every pending job is re-read from Redis, because messages
sent while disconnected are gone. redis-py may itself connect the subscription again and subscribe
it anew: a subscribe confirmation after the first tells so, and the waiter starts over as after any
loss. Deadlines are kept by the timer thread, so no future outlives its hotjob_timeout whatever
the subscriber is doing. redis-py is used through its public API only: the subscription is read
with PubSub.get_message(timeout), which waits at most POLL_SECONDS and which nothing else can cut
short.

A thread that blocks in a promise's result() reads the subscription itself while it waits (one
such thread at a time): its answer then wakes it straight from the socket, instead of waking the
subscriber thread, which would wake it in turn. The subscriber thread steps aside for it after the
next message it delivers or when its wait ends, and reads again when it is done; an answer that
comes before then is relayed by the subscriber thread. 300 hotjobs 5 ms apart through a supervisor
of 2 workers, each timed in the producer (2026-12-07, a 2-core AMD EPYC VM, 6 runs): 93-95% read
by the waiting thread, 0.070-0.080 ms (medians) from the message read to result() returning; the
others relayed, 0.11-0.23 ms. Measured and left out: cutting the subscriber thread's wait short
through a socket pair polled with the connection's socket (a private attribute of redis-py), so
that every answer is read by its waiting thread: over 16 alternated pairs of such runs the round
trip's p50 was 1.90-2.86 ms with it, 1.87-2.93 ms without (medians 2.49 and 2.47): within one run's
spread of the next. It made close() return in about 1 ms instead of about POLL_SECONDS.

A process forked from one whose waiter ran (gunicorn --preload, a multiprocessing pool) has none
of its threads and holds copies of its locks (held, if another thread held them at the fork) and
of its sockets. An at-fork hook, or else the first call that sees another pid, gives the child's
waiter new ones; hotjobs pending at the fork stay pending there, re-read from Redis once the
child's own subscriber has subscribed.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Mapping, NamedTuple

import redis

from .cluster import left_behind
from .connection import NOTIFICATION_TYPES, SUBSCRIBED_TYPES, UNSUBSCRIBED_TYPES, subscribe_notifications
from .backoff import Outage
from .errors import HotjobTimeout, JobNotFound, RedisUnavailable
from .job import TERMINAL_STATES, Job, queue_reads, read_fields
from .keys import Keys

log = logging.getLogger("kickq.hotjob")

EARLY_KEEP_SECONDS = 60.0
#: How long the subscriber blocks for a message before it checks whether it should stop: the bound
#: on how long close() (and kickq.reset()) waits for it, and on how long a thread in result()
#: waits for it to step aside.
POLL_SECONDS = 0.1
#: The timer thread wakes at least this often while it has nothing earlier to do, so that a new
#: deadline later than its next wake-up needs no wake-up of its own: a create then costs no thread
#: switch (hotjob_timeout is typically seconds; a shorter one still wakes the timer at once).
TIMER_BEAT = 1.0


# --- pure helpers, shared with the asyncio waiter (kickq/aio_hotjob.py) ---------------------------

def parse_message(data: str) -> tuple[str, dict[str, Any]]:
    """A `done` channel message: (job id, body); body is {"id", "job": {hash}} or {"id", "deleted": true}."""
    body = json.loads(data)
    return str(body["id"]), body


def final_job(job_id: str, message: dict[str, Any]) -> Job:
    """The Job a waiter resolves to; JobNotFound when the message says the job was deleted."""
    if message.get("deleted") or message.get("job") is None:
        raise JobNotFound(job_id)
    return Job.from_fields(job_id, message["job"])


def recheck_message(job_id: str, fields: Mapping[str, str]) -> dict[str, Any] | None:
    """What the `done` channel would have said about a job read from Redis (its HGETALL), or None
    while it still runs: after a reconnect, when messages may have been missed. `fields` as
    job.read_fields gives them."""
    if not fields:
        return {"id": job_id, "deleted": True}
    if fields.get("state") in TERMINAL_STATES:
        return {"id": job_id, "job": fields}
    return None


class HotjobPromise(Future[Job]):
    """The future of a hotjob's final Job. result() and exception() wait as any Future's do, but
    while they wait the calling thread reads the subscription itself (see the module's docstring)."""

    def __init__(self, waiter: "HotjobWaiter", deadline: float) -> None:
        super().__init__()
        self._hotjob_waiter = waiter
        self._deadline = deadline  # monotonic: the timer fails the future with HotjobTimeout then

    def result(self, timeout: float | None = None) -> Job:
        return super().result(self._lead(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._lead(timeout))

    def _lead(self, timeout: float | None) -> float | None:
        """Read the subscription until this future is done or `timeout` passes (when no other
        thread is reading for itself); the time left of `timeout`."""
        if self.done():
            return timeout
        started = time.monotonic()
        until = self._deadline if timeout is None else min(self._deadline, started + timeout)
        self._hotjob_waiter.lead(self, until)
        return None if timeout is None else max(0.0, timeout - (time.monotonic() - started))


#: Every waiter, to be made afresh in a forked child (see HotjobWaiter._forked).
_waiters: "weakref.WeakSet[HotjobWaiter]" = weakref.WeakSet()
#: Held while a waiter starts afresh in a process forked without the at-fork hook.
_forks = threading.Lock()


def _after_fork_in_child() -> None:
    global _forks
    _forks = threading.Lock()  # another thread may have held it at the fork
    for waiter in list(_waiters):
        waiter._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Subscription(NamedTuple):
    pubsub: Any  # redis.client.PubSub, its subscribe confirmed

    def read(self, deliver: Callable[[str, dict[str, Any]], None], seconds: float,
             until_done: Future[Job] | None = None) -> None:
        """Wait up to `seconds` for a message, then deliver it and every one that can be read
        without waiting, or those up to `until_done`'s."""
        if left_behind(self.pubsub):  # Sentinel named another master: completions are published there
            raise redis.exceptions.ConnectionError("the master changed")
        # Each get_message() first sends redis-py's health-check PING when one is due, without
        # which a silently dead connection would go unnoticed while idle.
        message = self.pubsub.get_message(timeout=seconds)
        while message is not None:
            kind = message.get("type")
            if kind in NOTIFICATION_TYPES:
                deliver(*parse_message(message["data"]))
                if until_done is not None and until_done.done():
                    return
            elif kind in SUBSCRIBED_TYPES:
                # redis-py connected again on its own and subscribed anew (PubSub.on_connect): what
                # was published in between is lost to us.
                raise redis.exceptions.ConnectionError("the subscription's connection was replaced")
            elif kind in UNSUBSCRIBED_TYPES:
                # The server ended it: on a cluster, the namespace's slot moved to another node.
                raise redis.exceptions.ConnectionError("the server ended the subscription")
            message = self.pubsub.get_message(timeout=0)


class HotjobWaiter:
    def __init__(self, connect: Callable[[], redis.Redis], keys: Keys, timeout: float) -> None:
        self._connect = connect
        self._keys = keys
        self._timeout = timeout
        self._pending: dict[str, tuple[Future[Job], float]] = {}
        self._early: dict[str, tuple[float, dict[str, Any]]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._generation = 0  # bumped at every (re)subscription
        self._stopping = threading.Event()
        self._start_afresh()
        _waiters.add(self)

    def _start_afresh(self) -> None:
        """The threads' side of the waiter, made here and made again in a process forked from
        this one (see _forked)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._deadline_changed = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._creating = 0  # creates between ensure_subscribed() and watch()/abandon()
        self._timer_wakes_at = 0.0  # monotonic: when the timer thread next looks at the deadlines
        # Reading the subscription: the subscriber thread, or a thread waiting in result() (the
        # leader) while the subscriber thread waits on _lead_over. Taken before _lock, never after.
        self._reading = threading.Lock()
        # The live subscription, set and cleared holding _reading. A thread whose read of it fails
        # clears it before letting go, so no one reads it again; the subscriber thread then
        # subscribes anew and re-reads the pending jobs.
        self._subscription: _Subscription | None = None
        self._leading = False  # a thread in lead() reads, or waits to
        self._leader_reads = False  # it reads
        self._lead_over = threading.Condition(self._lock)

    def _forked(self) -> None:
        """In a child process, right after the fork: only the forking thread came along. The
        subscriber and timer threads are gone, a lock another thread held stays held, and the
        subscription's socket is the parent's (reading it would take the parent's messages).
        So everything the threads use is made anew, as at the start; the jobs pending at the fork
        stay pending: the new subscriber re-reads them from Redis, the new timer fails them at
        their deadline. The parent's subscription is left to it (redis-py closes a connection made
        by another process without shutting it down)."""
        stopping = self._stopping.is_set()
        self._stopping = threading.Event()
        if stopping:
            self._stopping.set()
        self._early.clear()  # kept for creates of threads that are not in this process
        self._start_afresh()

    def _in_this_process(self) -> None:
        """Start afresh if this process was forked without the at-fork hook running (a fork made
        outside Python, e.g. by uWSGI without py-call-osafterfork)."""
        if self._pid != os.getpid():
            with _forks:
                if self._pid != os.getpid():
                    self._forked()

    # --- used by the creating thread --------------------------------------------------------------

    def ensure_subscribed(self) -> int:
        """Block until the subscription is live; returns its generation, to be given to watch()."""
        self._in_this_process()
        self._start_threads()
        if not self._subscribed.wait(self._timeout):
            raise RedisUnavailable("could not subscribe for hotjob results within redis_timeout")
        with self._lock:
            self._creating += 1
            return self._generation

    def _start_threads(self) -> None:
        with self._lock:
            if not self._threads and not self._stopping.is_set():
                for target, name in ((self._listen, "kickq-hotjob-listener"),
                                     (self._expire, "kickq-hotjob-timer")):
                    thread = threading.Thread(target=target, name=name, daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def abandon(self) -> None:
        """The create that ensure_subscribed() prepared for did not happen."""
        with self._lock:
            self._creating = max(0, self._creating - 1)
            if not self._creating:
                self._early.clear()

    def watch(self, job_id: str, timeout: float, started: float, generation: int,
              client: redis.Redis) -> HotjobPromise:
        """A future for `job_id`, failing with HotjobTimeout at `started + timeout` (monotonic)."""
        deadline = started + timeout
        future = HotjobPromise(self, deadline)
        with self._lock:
            self._creating = max(0, self._creating - 1)
            resubscribed = generation != self._generation
            early = self._early.pop(job_id, None)
            if not self._creating:
                self._early.clear()
            if early is None:
                self._pending[job_id] = (future, timeout)
                heapq.heappush(self._deadlines, (deadline, job_id))
                if deadline < self._timer_wakes_at:
                    self._deadline_changed.notify()
        if early is not None:
            self._settle(future, job_id, early[1])
        elif resubscribed:
            # The subscription was lost while the job was being created: its message may be gone.
            self._recheck(client, [job_id])
        return future

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def lead(self, future: Future[Job], until: float) -> None:
        """Called by a thread about to wait for `future`: read the subscription in this thread
        until the future is done or `until` (monotonic) passes, if no other thread does so for
        itself. Any other message read meanwhile settles its own future here."""
        self._in_this_process()
        if not self._threads:  # a promise of the parent process, waited for in a forked child
            self._start_threads()
        with self._lock:
            if self._leading or self._stopping.is_set() or not self._subscribed.is_set():
                return
            self._leading = True
        try:
            # The subscriber thread, if it is reading, lets go once it has delivered the next
            # message (maybe this future's) or when its wait of at most POLL_SECONDS ends.
            if not self._reading.acquire(timeout=max(0.0, until - time.monotonic())):
                return
            self._leader_reads = True
            try:
                subscription = self._subscription
                while subscription is not None and not (future.done() or self._stopping.is_set()):
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    subscription.read(self._deliver, min(left, POLL_SECONDS), future)
            except Exception as exc:  # the subscriber thread subscribes again and re-reads
                log.debug("hotjob waiter lost the subscription (%s)", exc)
                self._subscription = None
            finally:
                self._leader_reads = False
                self._reading.release()
        finally:
            with self._lock:
                self._leading = False
                # The subscriber thread looks again within POLL_SECONDS by itself; it is woken
                # at once only when other messages are awaited (a wake-up costs the caller).
                if self._pending or self._creating or self._subscription is None:
                    self._lead_over.notify_all()

    def close(self) -> None:
        """Cancel the pending futures, stop both threads and close the subscription. The subscriber
        thread (and a thread reading in result()) sees the stop when its wait for a message ends:
        within POLL_SECONDS, as no public call of redis-py cuts that wait short."""
        self._in_this_process()
        self._stopping.set()
        with self._lock:
            self._deadline_changed.notify()
            self._lead_over.notify_all()
            pending = list(self._pending.items())
            self._pending.clear()
        for _job_id, (future, _) in pending:
            if not future.done():
                future.cancel()
        for thread in self._threads:
            thread.join(timeout=2)

    # --- outcomes ----------------------------------------------------------------------------------

    @staticmethod
    def _settle(future: Future[Job], job_id: str, message: dict[str, Any]) -> None:
        if future.done():
            return
        try:
            future.set_result(final_job(job_id, message))
        except Exception as exc:  # JobNotFound; a corrupt record must fail only this waiter
            future.set_exception(exc)

    def _deliver(self, job_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            entry = self._pending.pop(job_id, None)
            if entry is None:
                if self._creating:  # maybe a job whose creator has not called watch() yet
                    now = time.monotonic()
                    self._early[job_id] = (now, message)
                    if len(self._early) > 10000:
                        self._early = {k: v for k, v in self._early.items()
                                       if now - v[0] < EARLY_KEEP_SECONDS}
                return
        self._settle(entry[0], job_id, message)

    # --- the timer thread ----------------------------------------------------------------------------

    def _expire(self) -> None:
        while not self._stopping.is_set():
            expired = []
            with self._lock:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, job_id = heapq.heappop(self._deadlines)
                    entry = self._pending.pop(job_id, None)
                    if entry:
                        expired.append((job_id, entry))
                # Checked again under the lock: close() sets the stop, then notifies under it, so a
                # stop set since the loop's check would otherwise be slept through (TIMER_BEAT).
                if not expired and not self._stopping.is_set():
                    wait = min(self._deadlines[0][0] - now, TIMER_BEAT) if self._deadlines else TIMER_BEAT
                    self._timer_wakes_at = now + wait
                    self._deadline_changed.wait(wait)
            # Settled outside the lock: a done callback runs here, and may call into this waiter
            # (the result() of another promise takes the lock).
            for job_id, (future, timeout) in expired:
                if not future.done():
                    future.set_exception(HotjobTimeout(job_id, timeout))

    # --- the subscriber thread -----------------------------------------------------------------------

    def _listen(self) -> None:
        outage = Outage(log, "hotjob subscriber")
        while not self._stopping.is_set():
            pubsub = None
            subscription: _Subscription | None = None
            try:
                client = self._connect()
                pubsub = client.pubsub()
                subscribe_notifications(client, pubsub, self._keys.done)
                # The confirmation must be read before anyone relies on the subscription.
                confirmed = None
                while confirmed is None or confirmed.get("type") not in SUBSCRIBED_TYPES:
                    confirmed = pubsub.get_message(timeout=self._timeout)
                    if confirmed is None:
                        raise redis.exceptions.TimeoutError("no subscribe confirmation")
                subscription = _Subscription(pubsub)
                with self._reading:
                    self._subscription = subscription
                with self._lock:
                    self._generation += 1
                    ids = list(self._pending)
                self._recheck(client, ids)
                self._subscribed.set()
                outage.ok()
                while not self._stopping.is_set():
                    with self._lock:
                        while self._leading and not self._stopping.is_set():
                            self._lead_over.wait(POLL_SECONDS)
                    with self._reading:
                        if self._subscription is not subscription:
                            raise redis.exceptions.ConnectionError("lost while another thread read it")
                        if not self._leading:
                            try:
                                subscription.read(self._deliver, POLL_SECONDS)
                            except Exception:
                                self._subscription = None  # before letting go: no one reads it again
                                raise
            except Exception as exc:  # never let the only subscriber thread die
                self._subscribed.clear()
                self._stopping.wait(outage.failed(exc))
            finally:
                with self._reading:
                    self._subscription = None
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _recheck(self, client: redis.Redis, ids: list[str]) -> None:
        """Settle each of `ids` that finished (or vanished) while we could not hear about it."""
        if not ids:
            return
        pipe = client.pipeline(transaction=False)
        queue_reads(pipe, self._keys, ids)
        for job_id, fields in zip(ids, read_fields(pipe.execute()), strict=True):
            message = recheck_message(job_id, fields)
            if message is not None:
                self._deliver(job_id, message)
