"""A worker process: the I/O around a WorkerCore (worker_core.py), which makes every decision.

The loop performs the core's commands on Redis (the worker's Channel for the calls that need not
wait for their reply, the client for a claim and the blocking wait), on the master's pipe and on the
handler, and sends each result back into the core. It does nothing else.

Signals: TERM kills (default action, also for the job's own children through the process group);
USR1 asks for a graceful stop after the current job. The handler only notes the request (and leaves
a blocking wait at once); the loop hands it to the core before its next command.

A dense worker (jobs_per_worker > 1, `DenseIO`) runs its jobs in `runner.Slots` and waits on one
queue of events: runs that ended (put by the threads that end them) and work that arrived (put by
its `Feed`, a thread that BLPOPs the inbox and the wake tokens on a connection of its own while the
core wants work). A stop puts a mark on that queue.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import uuid
from typing import Any, Callable, Mapping

import redis

from kickq import acks, scripts
from kickq.connection import checkout, connect
from kickq.errors import KickqError
from kickq.job import Job
from kickq.keys import Keys
from kickq.logformat import set_role
from kickq.registry import Registration

from . import messages
from .channel import Channel
from .osapi import current_rss, die_with_parent, release_free_heap, set_title
from .runner import Outcome, Runner, Slots
from .worker_core import (
    Arrived,
    AwaitEnd,
    Cancel,
    ClaimOne,
    ClaimRecord,
    Command,
    Ended,
    FinishMany,
    HeldJob,
    Interrupted,
    JournalPush,
    Lost,
    Pause,
    ReadClaimRecord,
    Refused,
    ReturnToken,
    Settle,
    ShowIdle,
    ShrinkHeap,
    Start,
    TakeArrived,
    Tell,
    WaitForEvent,
    WaitForWork,
    Woke,
    WorkerCore,
)

log = logging.getLogger("kickq.worker")

_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class _Stop(Exception):
    """Raised by the USR1 handler to leave a blocking wait at once."""


class StopRequest:
    """USR1's handler and what it found: it only notes the request, and cuts short a blocking wait
    (the wait returns Interrupted). Also whether the master is gone (checked after each run and each
    wait; PR_SET_PDEATHSIG kills a worker whose master dies, where Linux has it). The loop hands both
    to the core."""

    def __init__(self, parent: int | None = None) -> None:
        self.requested = False
        self.interruptible = False  # in a blocking wait that a stop may cut short
        self.parent = parent  # the master's pid (None: not watched)
        self.orphaned = False
        self.wake: Callable[[], None] | None = None  # a dense worker's: marks its event queue

    def check_parent(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            self.orphaned = True

    def on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self.wake is not None:
            self.wake()
        if self.interruptible:
            raise _Stop()


class Titles:
    """The process title: idle, or the job running and for how long (a thread keeps it fresh while
    the main thread is in the handler)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self._busy: tuple[str, str, float] | None = None
        self._wake = threading.Event()

    def start(self) -> None:
        self.idle()
        threading.Thread(target=self._refresh, name="kickq-title", daemon=True).start()

    def busy(self, name: str, job_id: str) -> None:
        self._busy = (name, job_id, time.monotonic())
        self._wake.set()

    def idle(self) -> None:
        self._busy = None
        set_title(f"kickq-supervisor: worker {self.number} [idle]")

    def slots(self, name: str, used: int, total: int) -> None:
        """A dense worker: how many of its slots run jobs."""
        if used == 0:
            self.idle()
        else:
            set_title(f"kickq-supervisor: worker {self.number} [{name} {used}/{total} jobs]")

    def _refresh(self) -> None:
        while True:
            busy = self._busy
            if busy is None:
                self._wake.wait()
                self._wake.clear()
                continue
            name, job_id, started = busy
            set_title(f"kickq-supervisor: worker {self.number} [{name} #{job_id} "
                      f"{time.monotonic() - started:.1f}s]")
            time.sleep(0.5)


def job_to_run(held: HeldJob) -> Job | Outcome:
    """The Job a handler gets for a held job, or the failed outcome of a record that cannot be
    decoded (hostile or corrupt: it fails this job only)."""
    fields = held.fields
    if "run_start" not in fields:  # claimed ahead: its run starts now, as the handler sees it
        fields = {**fields, "run_start": str(int(time.time() * 1000))}
    try:
        return Job.from_fields(held.job_id, fields)
    except Exception as exc:
        return Outcome(False, error=f"cannot decode job {held.job_id}: {exc}")


class WorkerIO:
    """Performs the core's commands: Redis (`client` for a claim and the blocking wait, a Channel on
    its own connection for the calls that need not wait), the master's pipe, the handler."""

    def __init__(self, client: redis.Redis, keys: Keys, names: list[str], claimer: str, runner: Runner,
                 notify_fd: int, *, titles: Titles | None = None, stop: StopRequest | None = None,
                 wanted: acks.Acks | None = None) -> None:
        self.client: Any = client  # decoded replies (connect() sets decode_responses)
        self.scripts = scripts.Scripts(client)
        self.channel = Channel(client, wanted)  # `wanted`: the replicas that confirm its saves
        self.keys = keys
        self.names = names
        self.claimer = claimer
        self.runner = runner
        self.notify_fd = notify_fd
        self.titles = titles
        self.stop = stop or StopRequest()
        # what performs each kind of command (drive() looks them up itself: a call less per command)
        self.handlers: dict[type, Callable[[Any], Any]] = {
            FinishMany: self._finish_many, JournalPush: self._push, Settle: self._settle, Tell: self._tell,
            Start: self._start, AwaitEnd: self._await_end, ClaimOne: self._claim_one,
            WaitForWork: self._wait_for_work, ShrinkHeap: self._shrink_heap,
            ReadClaimRecord: self._read_claim_record, Pause: self._pause, ShowIdle: self._show_idle,
        }

    def perform(self, command: Command) -> Any:
        """Do what `command` says; its result for the core."""
        return self.handlers[type(command)](command)

    def close(self) -> None:
        self.channel.reset()

    def _finish_many(self, call: FinishMany) -> Lost | None:
        try:
            self.channel.send("finish_many", call.keys_and_args)
        except _UNAVAILABLE as exc:
            return Lost(exc)
        return None

    def _push(self, call: JournalPush) -> Lost | None:
        try:
            self.channel.send_commands(*call.commands)
        except _UNAVAILABLE as exc:
            return Lost(exc)
        return None

    def _settle(self, command: Settle) -> list[Any] | Lost:
        try:
            return self.channel.settle()
        except _UNAVAILABLE as exc:
            return Lost(exc)
        except KickqError as exc:
            # Fewer replicas than wait_replicas confirmed (ReplicationTimeout): the saves count as
            # lost, as after a lost connection. The core sends their runs again (token-checked) and
            # takes back its claims from the claim record.
            return Lost(exc)

    def _tell(self, command: Tell) -> None:
        try:
            os.write(self.notify_fd, messages.encode_lines(command.messages))
        except OSError:  # the master is gone; die_with_parent ends us
            pass

    def _start(self, command: Start) -> Ended:
        """Run the handler to its end (one job at a time): its end is the answer."""
        job = command.job
        if self.titles is not None:
            self.titles.busy(job.fields.get("name", "?"), job.job_id)
        ended = Ended(job.job_id, self._run(job))
        self.stop.check_parent()
        return ended

    def _await_end(self, command: AwaitEnd) -> Ended:
        raise RuntimeError("no run in progress: Start runs each handler to its end")

    def _run(self, held: HeldJob) -> Outcome:
        job = job_to_run(held)
        if isinstance(job, Outcome):
            return job
        return self.runner.run(job, job.data)

    def _claim_one(self, command: ClaimOne) -> Any:
        try:
            return self.scripts.claim(self.keys, self.names, claimer=self.claimer, idle_ms=command.idle_ms)
        except _UNAVAILABLE as exc:
            return Lost(exc)
        except redis.exceptions.ResponseError as exc:
            return Refused(exc)

    def _wait_for_work(self, command: WaitForWork) -> Woke | Lost | Refused | Interrupted:
        inbox = self.keys.inbox(self.claimer)
        self.stop.interruptible = True
        try:
            if self.stop.requested:
                return Interrupted()
            got = self.client.blpop([inbox] + [self.keys.wake(n) for n in self.names],
                                    timeout=command.timeout)
        except _Stop:
            return Interrupted()
        except _UNAVAILABLE as exc:
            return Lost(exc)
        except redis.exceptions.ResponseError as exc:
            return Refused(exc)
        finally:
            self.stop.interruptible = False
            self.stop.check_parent()
        if got is None:
            return Woke(None, True)
        return Woke(got[1] if got[0] == inbox else None, False)

    def _shrink_heap(self, command: ShrinkHeap) -> None:
        release_free_heap()

    def _read_claim_record(self, command: ReadClaimRecord) -> ClaimRecord | Lost:
        try:
            # In one step: no more hand-offs, and what the inbox held (the record names those jobs
            # too) is dropped, so that neither the wait nor this brings a job a second time.
            pipe = self.client.pipeline(transaction=True)
            for name in self.names:
                pipe.zrem(self.keys.idle(name), self.claimer)
            pipe.delete(self.keys.idler(self.claimer), self.keys.inbox(self.claimer))
            pipe.get(self.keys.claim(self.claimer))
            pipe.time()
            record, (seconds, micros) = pipe.execute()[-2:]
            jobs = [(job_id, token, self.client.hgetall(self.keys.job(job_id)))
                    for job_id, token in scripts.parse_claim_record(record)
                    if (job_id, token) not in command.held]
        except _UNAVAILABLE as exc:
            return Lost(exc)
        return ClaimRecord(jobs, seconds * 1000 + micros // 1000)

    def _pause(self, command: Pause) -> Interrupted | None:
        self.stop.interruptible = True
        try:
            time.sleep(command.seconds)
        except _Stop:
            return Interrupted()
        finally:
            self.stop.interruptible = False
            self.stop.check_parent()
        return None

    def _show_idle(self, command: ShowIdle) -> None:
        if self.titles is not None:
            self.titles.idle()


_WOKEN = object()  # on a dense worker's event queue: a stop was asked


class Feed:
    """Takes work for a dense worker while its core wants some: a thread that BLPOPs the worker's
    inbox and the wake tokens of its names on a connection of its own, and puts what it takes on
    the worker's event queue (Arrived). It stops after each arrival until armed again; a wake token
    it takes when no longer armed goes back to its list."""

    def __init__(self, client: Any, keys: Keys, names: list[str], claimer: str, events: Any,
                 timeout: float) -> None:
        self.client = client
        self.inbox = keys.inbox(claimer)
        self.wakes = {keys.wake(name): name for name in names}
        self.lists = [self.inbox, *self.wakes]
        self.events = events
        self.timeout = timeout
        self.armed = threading.Event()
        self.closing = False
        self.conn: Any = None
        self.conn_id: int | None = None
        self.blocking = False  # in a BLPOP (then conn_id can unblock it)
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kickq-feed", daemon=True)
            self._thread.start()
        self.armed.set()

    def disarm(self) -> None:
        self.armed.clear()

    def stop(self) -> None:
        """No more BLPOP: the one in progress is cut short (CLIENT UNBLOCK) and waited for."""
        self.closing = True
        self.armed.set()
        thread = self._thread
        if thread is None:
            return
        if self.blocking and self.conn_id is not None:
            try:
                self.client.client_unblock(self.conn_id)
            except redis.exceptions.RedisError:
                pass  # it ends at its own timeout
        thread.join(self.timeout + 2.0)

    def _run(self) -> None:
        pause = 0.05
        while True:
            self.armed.wait()
            if self.closing:
                break
            try:
                got = self._blpop()
            except (redis.exceptions.RedisError, OSError) as exc:
                self._drop()
                if self.closing:
                    break
                log.debug("feed: %s; retrying in %.2fs", exc, pause)
                time.sleep(pause)
                pause = min(1.0, pause * 2)
                continue
            pause = 0.05
            if got is None:
                continue
            key, value = got
            if key == self.inbox:
                self.armed.clear()  # before the put: the core arms again once it has the event
                self.events.put(Arrived(handoff=value))
            elif self.armed.is_set() and not self.closing:
                self.armed.clear()
                self.events.put(Arrived(wake=self.wakes.get(key, key)))
            else:
                try:
                    self.client.rpush(key, value)
                except redis.exceptions.RedisError:
                    pass  # the next plain claim mends the tokens
        self._drop()

    def _blpop(self) -> Any:
        if self.conn is None:
            self.conn = checkout(self.client.connection_pool)
            self.conn.send_command("CLIENT", "ID")
            try:
                self.conn_id = int(self.conn.read_response())
            except redis.exceptions.ResponseError:  # not allowed (an ACL): a stop waits for the timeout
                self.conn_id = None
        self.blocking = True
        try:
            if self.closing:
                return None
            self.conn.send_command("BLPOP", *self.lists, self.timeout)
            return self.conn.read_response()
        finally:
            self.blocking = False

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.disconnect()
                self.client.connection_pool.release(self.conn)
            except Exception:  # a pool reset in between; the connection is closed anyway
                pass
            self.conn = self.conn_id = None


class DenseIO(WorkerIO):
    """Performs a dense worker's commands: runs go to `Slots`, waits are on one event queue."""

    def __init__(self, client: redis.Redis, keys: Keys, names: list[str], claimer: str,
                 handler: Callable[..., Any], notify_fd: int, *, slots: int, wait_timeout: float,
                 titles: Titles | None = None, stop: StopRequest | None = None,
                 wanted: acks.Acks | None = None) -> None:
        super().__init__(client, keys, names, claimer, Runner(handler), notify_fd, titles=titles, stop=stop,
                         wanted=wanted)
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()  # put() may be called from a signal handler
        self.slots = Slots(handler, slots, self._ended)
        self.total = slots
        self.feed = Feed(client, keys, names, claimer, self.events, wait_timeout)
        self.used = 0  # runs going, for the title
        self.title_name = names[0] if names else "?"
        self.stop.wake = self.wake
        self.handlers.update({
            Start: self._start, WaitForEvent: self._wait_for_event, WaitForWork: self._wait_for_work,
            Cancel: self._cancel, ReturnToken: self._return_token, TakeArrived: self._take_arrived,
        })

    def wake(self) -> None:
        self.events.put(_WOKEN)

    def _ended(self, job_id: str, outcome: Outcome) -> None:
        self.events.put(Ended(job_id, outcome))

    def close(self) -> None:
        self.feed.stop()
        self.slots.close()
        super().close()

    def _start(self, command: Start) -> None:  # type: ignore[override]
        held = command.job
        job = job_to_run(held)
        if isinstance(job, Outcome):
            self._ended(held.job_id, job)
            return None
        self.used += 1
        if self.titles is not None:
            self.titles.slots(self.title_name, self.used, self.total)
        self.slots.start(held.job_id, job, job.data)
        return None

    def _wait_for_event(self, command: WaitForEvent) -> list[Any] | Interrupted:
        if command.want_work:
            self.feed.arm()
        else:
            self.feed.disarm()
        try:
            first = self.events.get(timeout=command.timeout) if command.timeout > 0 \
                else self.events.get_nowait()
        except queue.Empty:
            self.stop.check_parent()
            return []
        if first is _WOKEN:
            return Interrupted()
        got = [first]
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if event is not _WOKEN:  # the stop is noted (StopRequest.requested) all the same
                got.append(event)
        ended = sum(1 for event in got if isinstance(event, Ended))
        if ended:
            self.used -= ended
            if self.titles is not None:
                self.titles.slots(self.title_name, self.used, self.total)
        self.stop.check_parent()
        return got

    def _wait_for_work(self, command: WaitForWork) -> Woke | Lost | Refused | Interrupted:
        """Nothing runs: wait for a hand-off or a wake token, taken by the feed."""
        if self.stop.requested:
            return Interrupted()
        self.feed.arm()
        try:
            event = self.events.get(timeout=command.timeout)
        except queue.Empty:
            return Woke(None, True)
        finally:
            self.stop.check_parent()
        if event is _WOKEN:
            return Interrupted()
        if isinstance(event, Arrived):
            return Woke(event.handoff, False)
        self.events.put(event)  # not expected with nothing running: kept for the next wait
        return Woke(None, False)

    def _cancel(self, command: Cancel) -> bool:
        return self.slots.cancel(command.job_id)

    def _return_token(self, command: ReturnToken) -> None:
        try:
            self.client.rpush(self.keys.wake(command.name), "1")
        except redis.exceptions.RedisError:
            pass  # the next plain claim mends the tokens

    def _take_arrived(self, command: TakeArrived) -> list[str]:
        self.feed.stop()
        handed: list[str] = []
        kept: list[Any] = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, Arrived):
                if event.handoff is not None:
                    handed.append(event.handoff)
                if event.wake is not None:
                    self._return_token(ReturnToken(event.wake))
            elif event is not _WOKEN:
                kept.append(event)
        for event in kept:
            self.events.put(event)
        return handed


class Worker:
    """A worker process: its signals, its title, its core and the loop that performs the core's
    commands."""

    def __init__(self, number: int, registration: Registration, settings: Mapping[str, Any],
                 notify_fd: int, *, max_jobs: int = 0, max_memory: int = 0, claimer: str = "",
                 prefetch: int = 16) -> None:
        self.number = number
        self.registration = registration
        self.settings = dict(settings)
        self.keys = Keys(settings["redis_namespace"])
        self.notify_fd = notify_fd
        self.claimer = claimer or uuid.uuid4().hex
        self.acks = acks.wanted(self.settings)
        wait_timeout = max(0.05, min(1.0, float(settings["redis_timeout"]) / 2))
        self.slots = registration.jobs_per_worker
        self.wait_timeout = wait_timeout
        self.core = WorkerCore(number, registration.names, self.keys, self.claimer, clock=time.monotonic,
                               memory=current_rss, prefetch=prefetch, wait_timeout=wait_timeout,
                               max_jobs=max_jobs, max_memory=max_memory, slots=self.slots)
        self.stop = StopRequest(parent=os.getppid())
        self.titles = Titles(number)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, self.stop.on_signal)
        die_with_parent()

    def run(self) -> int:
        set_role(f"worker {self.number}")
        self._install_signals()
        self.titles.start()
        io: WorkerIO
        if self.slots > 1:
            io = DenseIO(connect(self.settings), self.keys, list(self.registration.names), self.claimer,
                         self.registration.handler, self.notify_fd, slots=self.slots,
                         wait_timeout=self.wait_timeout, titles=self.titles, stop=self.stop, wanted=self.acks)
        else:
            io = WorkerIO(connect(self.settings), self.keys, list(self.registration.names), self.claimer,
                          Runner(self.registration.handler), self.notify_fd, titles=self.titles,
                          stop=self.stop, wanted=self.acks)
        try:
            drive(self.core, io.handlers, self.stop)
        finally:
            io.close()
        return 0


def drive(core: WorkerCore, handlers: Mapping[type, Callable[[Any], Any]], stop: StopRequest) -> None:
    """Run the core to its end: each command performed by the handler of its kind, its result sent
    back. Before each command, a stop asked meanwhile, or the master gone, goes to the core."""
    steps = core.steps()
    result: Any = None
    while True:
        if stop.requested and not core.stopping:
            core.request_stop()
        if stop.orphaned and not core.orphaned:
            core.parent_gone()
        try:
            command = steps.send(result)
        except StopIteration:
            return
        result = handlers[type(command)](command)
