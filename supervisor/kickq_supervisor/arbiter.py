"""The master: owns the worker processes and the reapers, and enforces every job's deadline.

Modelled on gunicorn's arbiter: signal handlers only queue the signal and wake the loop; the loop
dispatches `handle_<sig>`, reads the workers' pipes, reaps dead children, kills workers whose job
passed its deadline, and refills the pool. All process operations and the clock go through `ops`
and Redis work goes through `lost_job`, so every decision is unit-tested with fakes. The master
never blocks on Redis: a job it must ghost is handed to `lost_job`, which runs it elsewhere.
"""
from __future__ import annotations

import logging
import os
import select
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from kickq.logformat import job_extra

from . import messages
from .osapi import describe_exit

log = logging.getLogger("kickq.master")

TIMED_OUT = "processing timed out"
BLAST = "worker killed: job {} passed its deadline"  # the other jobs of a dense worker killed at a deadline
QUICK_STOP = "supervisor stopped quickly (second INT) while the job ran"
OUTCOME_LOST = "worker died while saving the outcome"
POLL_INTERVAL = 0.01  # how often the master reads the workers' pipes while any worker runs
CRASH_WINDOW = 1.0  # a worker that dies younger than this counts towards crash-loop backoff
MAX_BACKOFF = 10.0


class Ops(Protocol):
    def monotonic(self) -> float: ...
    def kill_group(self, pid: int, sig: int) -> None: ...
    def kill(self, pid: int, sig: int) -> None: ...
    def reap(self) -> list[tuple[int, int]]: ...


@dataclass
class Run:
    job_id: str
    token: str
    deadline: float
    handler_returned: bool = False
    name: str = ""  # the job name, for metrics
    retained: bool = False  # its outcome came with the F message (in Slot.unsaved)
    started: float = 0.0  # time.monotonic(), from the S message (a claim ahead has no start in Redis)


@dataclass
class Slot:
    """One worker process of the pool, running up to `jobs` jobs at once (jobs_per_worker)."""
    number: int  # 1-based, shown in titles and logs
    spec: int  # index of the registration it serves
    jobs: int = 1
    pid: int | None = None
    fd: int | None = None
    # The runs the worker told of (S), by job id, in start order: those still in a handler, and the
    # last ones whose handler returned (kept until the next start, for the outcome they may still save).
    runs: dict[str, Run] = field(default_factory=dict)
    term_at: float | None = None
    kill_sent: bool = False
    kill_reason: str = ""
    kill_job: str = ""  # the job whose deadline got the worker killed
    spawned_at: float = 0.0
    claimer: str = ""  # the worker's claim record id (see claim in lua/_lib_claim.lua)
    failures: int = 0  # consecutive early deaths
    respawn_at: float = 0.0
    buffer: bytes = b""
    # Runs the worker reported finished, with their outcome, that it may not have saved yet (it
    # saves in batches): job id -> (token, outcome, payload, seconds, reported at). The most recent
    # UNSAVED_KEPT only: a worker saves them within a batch, and saving twice is token-checked.
    unsaved: dict[str, tuple[str, str, str, float, float]] = field(default_factory=dict)

    def running(self) -> list[Run]:
        """The runs in a handler now."""
        return [run for run in self.runs.values() if not run.handler_returned]

    def deadline(self, grace: float) -> tuple[float, Run] | None:
        """When the master kills this worker for a deadline, and for which run: at the deadline for a
        one-job worker; a dense worker cancels an async job itself at its deadline, so the master
        waits `grace` more (a thread, or a loop that blocks, cannot be cancelled)."""
        running = self.running()
        if not running:
            return None
        run = min(running, key=lambda r: r.deadline)
        return run.deadline + (grace if self.jobs > 1 else 0.0), run


UNSAVED_KEPT = 64


@dataclass
class ReaperProc:
    """One reaper process the master keeps running: one per Redis the supervisor serves, each
    restarted on its own (with its own crash-loop backoff) when it dies."""
    spawn: Callable[[], int]  # starts it: returns its pid
    pid: int | None = None
    failures: int = 0  # consecutive early deaths
    respawn_at: float = 0.0
    spawned_at: float = 0.0


@dataclass
class Arbiter:
    """Decisions only. `spawn_worker(slot) -> (pid, read fd)`, `spawn_reapers`: one `() -> pid`
    per reaper to keep running, `lost_job(slot, job_id, token, error)` ghosts a job
    (token-checked, so a repeat is harmless), `start_reload_check()` starts checking, without
    blocking, that the handler modules still import, and returns something whose `poll()` gives
    None (still checking) or the answer."""

    slot_specs: Sequence[int]  # per worker process: the index of the registration it serves
    ops: Ops
    spawn_worker: Callable[[Slot], tuple[int, int | None]]
    spawn_reapers: Sequence[Callable[[], int]]
    lost_job: Callable[[Slot, str, str, str], None]
    kill_grace: float = 0.3
    start_reload_check: Callable[[], Any] | None = None
    lost_claim: Callable[[Slot, str], None] | None = None  # settle what the slot's worker held
    reload_check: Any = None
    close_fd: Callable[[int], None] = os.close
    drain: Callable[[Slot], None] | None = None  # read what a dead worker still had in its pipe
    # observe(kind, slot, **fields): what the metrics count ("run", "ghost", "restart",
    # "reaper_restart"). It must not block: the metrics thread does the work (see metrics.py).
    observe: Callable[..., None] | None = None
    spec_jobs: Sequence[int] = ()  # jobs_per_worker of each registration (default 1)
    # heartbeat(arbiter), after each tick: the health checks' snapshot (health.py). Must not block.
    heartbeat: Callable[[Arbiter], None] | None = None
    slots: list[Slot] = field(default_factory=list)
    reapers: list[ReaperProc] = field(default_factory=list)
    # Process groups of workers that died of the TERM before their KILL was due: the rest of the
    # group (the job's own children, which may ignore TERM) still gets the KILL, at this time.
    pending_kills: dict[int, float] = field(default_factory=dict)
    stopping: bool = False  # graceful: no new workers, workers finish their job and exit
    quick: bool = False
    reload_requested: bool = False
    exit_code: int | None = None

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [Slot(number=i + 1, spec=spec, jobs=self.spec_jobs[spec] if self.spec_jobs else 1)
                          for i, spec in enumerate(self.slot_specs)]
        if not self.reapers:
            self.reapers = [ReaperProc(spawn) for spawn in self.spawn_reapers]

    # --- signals: dispatched from the loop, never from the handler ---------------------------------

    def handle_term(self) -> None:
        self.begin_graceful_stop("TERM")

    def handle_int(self) -> None:
        if self.stopping:
            self.quick_stop()
        else:
            self.begin_graceful_stop("INT")

    def handle_quit(self) -> None:
        self.quick_stop()

    def handle_hup(self) -> None:
        if self.stopping or self.reload_check is not None:
            return
        if self.start_reload_check is None:
            self.reload()
            return
        log.info("HUP: checking that the handler modules still import")
        self.reload_check = self.start_reload_check()

    def poll_reload_check(self) -> None:
        if self.reload_check is None:
            return
        answer = self.reload_check.poll()
        if answer is None:
            return
        self.reload_check = None
        if answer and not self.stopping:
            self.reload()
        elif not answer:
            log.error("HUP ignored: the handlers no longer import; still running the old code")

    def reload(self) -> None:
        log.info("HUP: replacing the workers with freshly imported handler code")
        self.reload_requested = True
        self.begin_graceful_stop("HUP")

    def handle_chld(self) -> None:
        """Only wakes the loop, which reaps every tick anyway."""

    def begin_graceful_stop(self, why: str) -> None:
        if self.stopping:
            return
        log.info("%s: stopping gracefully; running jobs may finish within their process_timeout", why)
        self.stopping = True
        for slot in self.slots:
            if slot.pid is not None:
                self.ops.kill(slot.pid, signal.SIGUSR1)
        self._stop_reapers()

    def quick_stop(self) -> None:
        log.warning("quick stop: killing every worker; their jobs are ghosted")
        self.stopping = self.quick = True
        self.reload_requested = False
        for slot in self.slots:
            if slot.pid is not None:
                if slot.running() and not slot.kill_reason:
                    slot.kill_reason = QUICK_STOP
                self.ops.kill_group(slot.pid, signal.SIGKILL)
                slot.kill_sent = True
        self._stop_reapers()

    def _stop_reapers(self) -> None:
        for reaper in self.reapers:
            if reaper.pid is not None:
                self.ops.kill_group(reaper.pid, signal.SIGTERM)

    # --- what workers tell us ------------------------------------------------------------------------

    def on_data(self, slot: Slot, data: bytes) -> None:
        slot.buffer += data
        *lines, slot.buffer = slot.buffer.split(b"\n")
        for line in lines:
            self.on_message(slot, line.decode("utf-8", "replace"))

    def on_message(self, slot: Slot, line: str) -> None:
        message = messages.decode(line)
        if isinstance(message, messages.Started):
            for job_id in [r.job_id for r in slot.runs.values() if r.handler_returned]:
                del slot.runs[job_id]  # its outcome, if retained, waits in slot.unsaved
            slot.runs[message.job_id] = Run(message.job_id, message.token, message.started + message.timeout,
                                            name=message.name, started=message.started)
        elif isinstance(message, messages.Finished) and message.job_id in slot.runs:
            run = slot.runs[message.job_id]
            run.handler_returned = True
            if message.outcome is None or message.seconds is None:
                return
            if message.outcome == "ghost":  # a dense worker cancelled the job at its deadline
                self._observe("ghost", slot, name=run.name, reason="timeout")
            else:
                self._observe("run", slot, name=run.name, outcome=message.outcome, seconds=message.seconds)
            if message.payload is None:
                # Its outcome was too big for the pipe and leaves in the worker's next call. Should the
                # worker die before Redis has it, the run is ghosted, not taken for one that never began:
                # by then the next job's start may have replaced it as the slot's run.
                unsaved = (run.token, "ghost", OUTCOME_LOST, message.seconds, self.ops.monotonic())
            else:
                run.retained = True
                unsaved = (run.token, message.outcome, message.payload, message.seconds, self.ops.monotonic())
            slot.unsaved[message.job_id] = unsaved
            if len(slot.unsaved) > UNSAVED_KEPT:
                del slot.unsaved[next(iter(slot.unsaved))]

    def _observe(self, kind: str, slot: Slot | None, **fields: object) -> None:
        if self.observe is not None:
            try:
                self.observe(kind, slot, **fields)
            except Exception:  # metrics must never take the master down
                log.exception("metrics: cannot record %s", kind)

    # --- children that ended ---------------------------------------------------------------------------

    def on_exit(self, pid: int, status: int) -> None:
        now = self.ops.monotonic()
        reaper = next((r for r in self.reapers if r.pid == pid), None)
        if reaper is not None:
            reaper.pid = None
            if not self.stopping:
                young = now - reaper.spawned_at < CRASH_WINDOW
                reaper.failures = reaper.failures + 1 if young else 0
                reaper.respawn_at = now + _backoff(reaper.failures)
                log.warning("reaper (pid %d) %s; restarting", pid, describe_exit(status))
                self._observe("reaper_restart", None)
            return
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None:
            return  # a grandchild re-parented to us, or an already-forgotten child
        if self.drain is not None and slot.fd is not None:
            self.drain(slot)
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        exit_text = describe_exit(status, hint=False)
        told = False
        for run in slot.runs.values():
            if not run.handler_returned:
                error, reason = self._why_lost(slot, run, exit_text)
            elif not run.retained and not clean:
                # Its outcome was too big to come with the F message, and the worker died saving it.
                error, reason = f"{OUTCOME_LOST}: {exit_text}", "worker_died"
            else:
                continue
            log.warning("worker %d (pid %d) %s during job %s: %s", slot.number, pid,
                        describe_exit(status), run.job_id, error, extra=job_extra(run.job_id, run.name))
            told = True
            self.lost_job(slot, run.job_id, run.token, error)
            self._observe("ghost", slot, name=run.name, reason=reason)
        if not clean and not told:
            log.warning("worker %d (pid %d) %s", slot.number, pid, describe_exit(status))
        if self.lost_claim is not None:
            # Whatever it held and had not settled: outcomes it reported but may not have saved
            # are saved, claimed jobs it never started go back to their queue (all token-checked,
            # so after a clean exit, which settles everything itself, this changes nothing).
            self.lost_claim(slot, "worker died right after claiming the job: " + exit_text)
        # Only a worker that dies young *between* jobs is crash-looping; deaths during a job are
        # the job's doing, and its ghost_count already bounds how often it can do that.
        young = now - slot.spawned_at < CRASH_WINDOW and not clean and not slot.runs
        slot.failures = slot.failures + 1 if young else 0
        slot.respawn_at = now + _backoff(slot.failures)
        if not self.stopping:
            why = "timeout" if slot.kill_reason == TIMED_OUT else ("retired" if clean else "crash")
            self._observe("restart", slot, reason=why)
        if slot.term_at is not None and not slot.kill_sent:
            self.pending_kills[pid] = slot.term_at + self.kill_grace
        if slot.fd is not None:
            self.close_fd(slot.fd)
        slot.pid = slot.fd = slot.term_at = None
        slot.kill_sent, slot.kill_reason, slot.kill_job, slot.buffer = False, "", "", b""
        slot.runs, slot.unsaved = {}, {}

    @staticmethod
    def _why_lost(slot: Slot, run: Run, exit_text: str) -> tuple[str, str]:
        """The ghost's error and the metrics reason of a run its worker's end cut short."""
        if slot.kill_reason == TIMED_OUT:
            if run.job_id == slot.kill_job:
                return TIMED_OUT, "timeout"
            return BLAST.format(slot.kill_job), "worker_killed"
        if slot.kill_reason == QUICK_STOP:
            return QUICK_STOP, "quick_stop"
        return slot.kill_reason or f"worker died: {exit_text}", "worker_died"

    # --- deadlines --------------------------------------------------------------------------------------

    def enforce_deadlines(self) -> None:
        now = self.ops.monotonic()
        for pgid, kill_at in list(self.pending_kills.items()):
            if now >= kill_at:
                self.ops.kill_group(pgid, signal.SIGKILL)
                del self.pending_kills[pgid]
        for slot in self.slots:
            if slot.pid is None:
                continue
            due = slot.deadline(self.kill_grace) if slot.term_at is None else None
            if due is not None and now >= due[0]:
                run = due[1]
                others = len(slot.running()) - 1
                log.warning("worker %d (pid %d): job %s passed its process_timeout by %.3fs; killing it%s",
                            slot.number, slot.pid, run.job_id, now - run.deadline,
                            f" and the {others} other job(s) it runs (ghosted)" if others else "",
                            extra=job_extra(run.job_id, run.name))
                slot.kill_reason, slot.kill_job = TIMED_OUT, run.job_id
                slot.term_at = now
                self.ops.kill_group(slot.pid, signal.SIGTERM)
            if slot.term_at is not None and not slot.kill_sent and now >= slot.term_at + self.kill_grace:
                self.ops.kill_group(slot.pid, signal.SIGKILL)
                slot.kill_sent = True

    def next_wakeup(self, cap: float = 1.0) -> float:
        """Seconds until the next deadline, kill escalation or respawn (at most `cap`)."""
        now = self.ops.monotonic()
        times = []
        for slot in self.slots:
            if slot.pid is None:
                if not self.stopping:
                    times.append(slot.respawn_at)
                continue
            due = slot.deadline(self.kill_grace) if slot.term_at is None else None
            if due is not None:
                times.append(due[0])
            if slot.term_at is not None and not slot.kill_sent:
                times.append(slot.term_at + self.kill_grace)
        if not self.stopping:
            times.extend(r.respawn_at for r in self.reapers if r.pid is None)
        times.extend(self.pending_kills.values())
        if not times:
            return cap
        return max(0.0, min(cap, min(times) - now))

    # --- keeping the pool full -------------------------------------------------------------------------

    def manage(self) -> None:
        if self.stopping:
            if all(s.pid is None for s in self.slots) and all(r.pid is None for r in self.reapers):
                for pgid in self.pending_kills:  # do not leave them behind
                    self.ops.kill_group(pgid, signal.SIGKILL)
                self.pending_kills.clear()
                self.exit_code = 1 if self.quick else 0
            return
        now = self.ops.monotonic()
        for slot in self.slots:
            if slot.pid is None and now >= slot.respawn_at:
                slot.pid, slot.fd = self.spawn_worker(slot)
                slot.spawned_at = now
        for reaper in self.reapers:
            if reaper.pid is None and now >= reaper.respawn_at:
                reaper.pid = reaper.spawn()
                reaper.spawned_at = now

    def reap(self) -> None:
        for pid, status in self.ops.reap():
            self.on_exit(pid, status)

    def tick(self) -> None:
        self.poll_reload_check()
        self.reap()
        self.enforce_deadlines()
        self.manage()
        if self.heartbeat is not None:
            try:
                self.heartbeat(self)
            except Exception:  # health checks must never take the master down
                log.exception("health: cannot update the snapshot")


def _backoff(failures: int) -> float:
    return 0.0 if failures == 0 else min(MAX_BACKOFF, 0.1 * 2 ** (failures - 1))


class MasterLoop:
    """The I/O around an Arbiter: signals, the workers' pipes, and sleeping until something happens."""

    SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
               signal.SIGHUP: "hup", signal.SIGCHLD: "chld"}

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        arbiter.drain = self.drain
        self.queue: list[str] = []
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        for sig in self.SIGNALS:
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        # Only queue it: the loop does the work, outside the handler.
        if len(self.queue) < 16:
            self.queue.append(self.SIGNALS[signal.Signals(signum)])

    def dispatch_signals(self) -> None:
        while self.queue:
            getattr(self.arbiter, "handle_" + self.queue.pop(0))()

    def sleep(self, timeout: float) -> None:
        """Sleep until a signal arrives or `timeout` passes, then read every worker's pipe.

        The pipes are read on a fixed beat, not waited on: a worker's message then costs it one
        write and wakes nobody, instead of one master wake-up per message (two per job)."""
        busy = any(slot.pid is not None for slot in self.arbiter.slots)
        try:
            select.select([self.wake_r], [], [], min(timeout, POLL_INTERVAL) if busy else timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        for slot in self.arbiter.slots:
            if slot.fd is not None:
                self.drain(slot)

    def drain(self, slot: Slot) -> None:
        assert slot.fd is not None
        while True:
            try:
                data = os.read(slot.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            self.arbiter.on_data(slot, data)

    def run(self) -> int:
        self.install_signals()
        arbiter = self.arbiter
        while True:
            self.dispatch_signals()
            arbiter.tick()
            if arbiter.exit_code is not None:
                return arbiter.exit_code
            self.sleep(arbiter.next_wakeup())
