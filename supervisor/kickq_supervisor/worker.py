"""A worker process: the I/O around a WorkerCore (worker_core.py), which makes every decision.

The loop performs the core's commands on Redis (the worker's Channel for the calls that need not
wait for their reply, the client for a claim and the blocking wait), on the master's pipe and on the
handler, and sends each result back into the core. It does nothing else.

Signals: TERM kills (default action, also for the job's own children through the process group);
USR1 asks for a graceful stop after the current job. The handler only notes the request (and leaves
a blocking wait at once); the loop hands it to the core before its next command.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from typing import Any, Callable, Mapping

import redis

from kickq import acks, scripts
from kickq.connection import connect
from kickq.errors import KickqError
from kickq.job import Job
from kickq.keys import Keys
from kickq.registry import Registration

from . import messages
from .channel import Channel
from .osapi import current_rss, die_with_parent, release_free_heap, set_title
from .runner import Outcome, Runner
from .worker_core import (
    AwaitEnd,
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
    Settle,
    ShowIdle,
    ShrinkHeap,
    Start,
    Tell,
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

    def check_parent(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            self.orphaned = True

    def on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True
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
        fields = held.fields
        if "run_start" not in fields:  # claimed ahead: its run starts now, as the handler sees it
            fields = {**fields, "run_start": str(int(time.time() * 1000))}
        try:
            job = Job.from_fields(held.job_id, fields)
        except Exception as exc:  # hostile or corrupt record: fail this job only
            return Outcome(False, error=f"cannot decode job {held.job_id}: {exc}")
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
        self.core = WorkerCore(number, registration.names, self.keys, self.claimer, clock=time.monotonic,
                               memory=current_rss, prefetch=prefetch, wait_timeout=wait_timeout,
                               max_jobs=max_jobs, max_memory=max_memory)
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
        self._install_signals()
        self.titles.start()
        io = WorkerIO(connect(self.settings), self.keys, list(self.registration.names), self.claimer,
                      Runner(self.registration.handler), self.notify_fd, titles=self.titles, stop=self.stop,
                      wanted=self.acks)
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
