"""A worker process: claim a job, run its handler, finish it (and claim the next in the same step).

It tells the master through a pipe when a run starts ("S id token start timeout") and when the
handler has returned ("F id"), so that the master, which never waits on Redis, can enforce the
job's process_timeout from outside. Signals: TERM kills (default action, also for the job's own
children through the process group); USR1 asks for a graceful stop after the current job.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
import uuid
from typing import Any, Mapping

import psutil
import redis

from kickq import scripts
from kickq.connection import connect
from kickq.job import Job
from kickq.keys import Keys
from kickq.registry import Registration

from .osapi import die_with_parent, set_title
from .runner import Outcome, Runner

log = logging.getLogger("kickq.worker")
# redis-py turns "-OOM ..." into OutOfMemoryError and drops the prefix from the text.
_OUT_OF_MEMORY = redis.exceptions.OutOfMemoryError

Claimed = tuple[str, int, dict[str, str]]


class _Stop(Exception):
    """Raised by the USR1 handler to leave an idle blocking wait at once."""


class Worker:
    def __init__(self, number: int, registration: Registration, settings: Mapping[str, Any],
                 notify_fd: int, *, max_jobs: int = 0, max_memory: int = 0, claimer: str = "") -> None:
        self.number = number
        self.names = list(registration.names)
        self.runner = Runner(registration.handler)
        self.settings = dict(settings)
        self.keys = Keys(settings["redis_namespace"])
        self.notify_fd = notify_fd
        self.max_jobs = max_jobs
        self.max_memory = max_memory
        self.claimer = claimer or uuid.uuid4().hex
        self.jobs_done = 0
        self.stopping = False
        self.idle = False
        self.parent = os.getppid()
        self.blpop_timeout = max(0.05, min(1.0, float(settings["redis_timeout"]) / 2))
        self._title_busy: tuple[str, str, float] | None = None
        self._title_wake = threading.Event()
        self.client: Any = None
        self.scripts: scripts.Scripts | None = None

    # --- process setup -------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        die_with_parent()

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self.idle:
            raise _Stop()

    def _titles(self) -> None:
        """Keep the title's elapsed time fresh while a job runs (the main thread is in the handler)."""
        while True:
            busy = self._title_busy
            if busy is None:
                self._title_wake.wait()
                self._title_wake.clear()
                continue
            name, job_id, started = busy
            set_title(f"kickq-supervisor: worker {self.number} [{name} #{job_id} "
                      f"{time.monotonic() - started:.1f}s]")
            time.sleep(0.5)

    def _set_idle_title(self) -> None:
        self._title_busy = None
        set_title(f"kickq-supervisor: worker {self.number} [idle]")

    def _notify(self, message: str) -> None:
        try:
            os.write(self.notify_fd, message.encode() + b"\n")
        except OSError:  # the master is gone; die_with_parent ends us
            pass

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self._set_idle_title()
        threading.Thread(target=self._titles, name="kickq-title", daemon=True).start()
        self.client = connect(self.settings)
        self.scripts = scripts.Scripts(self.client)
        claimed: Claimed | None = None
        try:
            while not self.stopping and os.getppid() == self.parent:
                if claimed is None:
                    claimed = self._next_job()
                    continue
                claimed = self._work(claimed)
                if self._should_retire():
                    break
        except _Stop:
            pass
        return 0

    def _should_retire(self) -> bool:
        if self.stopping:
            return True
        if self.max_jobs and self.jobs_done >= self.max_jobs:
            log.info("worker %d retiring after %d jobs (max_jobs_per_worker)", self.number, self.jobs_done)
            return True
        if self.max_memory:
            rss = psutil.Process().memory_info().rss
            if rss > self.max_memory:
                log.info("worker %d retiring: RSS %d bytes > max_memory_per_worker", self.number, rss)
                return True
        return False

    def _last_job_before_retiring(self) -> bool:
        """Checked before finishing a job: if this is the last one, do not claim another."""
        if self.stopping or (self.max_jobs and self.jobs_done >= self.max_jobs):
            return True
        return bool(self.max_memory and psutil.Process().memory_info().rss > self.max_memory)

    def _next_job(self) -> Claimed | None:
        """Block until a wake token arrives (or a second passes), then claim."""
        assert self.client is not None and self.scripts is not None
        try:
            self.idle = True
            try:
                if self.stopping:
                    raise _Stop()
                self.client.blpop([self.keys.wake(n) for n in self.names], timeout=self.blpop_timeout)
            finally:
                self.idle = False
            # Claim even after a timeout: a job whose token was lost is found by this poll.
            claimed = self.scripts.claim(self.keys, self.names, claimer=self.claimer)
            self._delay = 0.05
            return claimed
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._backoff(exc)
            return self._recover_claim(None)
        except redis.exceptions.ResponseError as exc:  # e.g. OOM at maxmemory: wait, don't die
            self._backoff(exc)
            return None

    def _work(self, claimed: Claimed) -> Claimed | None:
        job_id, token, fields = claimed
        started = time.monotonic()
        opts_timeout = _process_timeout(fields)
        # The job name goes last: it may contain spaces (the master splits at most 5 times).
        self._notify(f"S {job_id} {token} {started:.6f} {opts_timeout} {fields.get('name', '')}")
        self._title_busy = (fields.get("name", "?"), job_id, started)
        self._title_wake.set()
        outcome = self._run(job_id, fields)
        ran = time.monotonic() - started
        self._notify(f"F {job_id} {'success' if outcome.success else 'fail'} {ran:.6f}")
        self.jobs_done += 1
        last = self._last_job_before_retiring()
        nxt = self._finish(job_id, token, outcome, claim_next=not last)
        if nxt is None:
            self._set_idle_title()
        return nxt

    def _run(self, job_id: str, fields: Mapping[str, str]) -> Outcome:
        try:
            job = Job.from_fields(job_id, fields)
        except Exception as exc:  # hostile or corrupt record: fail this job only
            return Outcome(False, error=f"cannot decode job {job_id}: {exc}")
        return self.runner.run(job, job.data)

    def _finish(self, job_id: str, token: int, outcome: Outcome, *, claim_next: bool) -> Claimed | None:
        assert self.scripts is not None
        kind = "success" if outcome.success else "fail"
        body = outcome.result_json if outcome.success else outcome.error
        names = self.names if claim_next else ()
        delay = 0.05
        ambiguous = False
        while True:
            try:
                status, state, nxt = self.scripts.finish(self.keys, job_id, token, kind, body,
                                                         claim_names=() if ambiguous else names,
                                                         claimer=self.claimer)
                break
            except redis.exceptions.ResponseError as exc:
                transient = isinstance(exc, (_OUT_OF_MEMORY, redis.exceptions.BusyLoadingError)) \
                    or str(exc).startswith(("OOM", "BUSY"))
                if not transient:
                    # Not transient: leave the run to lease recovery rather than retry forever.
                    log.error("worker %d: cannot finish job %s: %s", self.number, job_id, exc)
                    return None
                log.warning("worker %d: finishing job %s refused (%s); retrying", self.number, job_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                # The script may have run with its reply lost: retry the finish alone (the token
                # makes a repeat harmless), then look up whether the lost reply carried a claim.
                ambiguous = True
                log.warning("worker %d: finishing job %s failed (%s); retrying", self.number, job_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        if status != "ok" and ambiguous:
            log.info("worker %d: job %s had been finished by the call whose reply was lost",
                     self.number, job_id)
        elif status != "ok":
            log.warning("worker %d: finish of job %s attempt %s rejected (%s, job is %s): a newer "
                        "attempt owns it or it was deleted", self.number, job_id, token, status,
                        state or "gone")
        if ambiguous and claim_next:
            return self._recover_claim(job_id)
        return nxt

    def _recover_claim(self, finished_id: str | None) -> Claimed | None:
        """After a lost reply: the job our last claim took, if it is still ours and not yet run."""
        assert self.client is not None
        try:
            record = self.client.get(self.keys.claim(self.claimer))
            if not record:
                return None
            job_id, token = record.split()
            if job_id == finished_id:
                return None
            fields = self.client.hgetall(self.keys.job(job_id))
            if fields.get("state") == "processing" and fields.get("attempt") == token:
                return job_id, int(token), fields
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._backoff(exc)
        return None

    _delay = 0.05

    def _backoff(self, exc: Exception) -> None:
        log.warning("worker %d: Redis unavailable (%s); retrying in %.2fs", self.number, exc, self._delay)
        self.idle = True
        try:
            time.sleep(self._delay * random.uniform(0.5, 1.5))  # jitter: workers do not retry in step
        finally:
            self.idle = False
        self._delay = min(self._delay * 2, 2.0)


def _process_timeout(fields: Mapping[str, str]) -> float:
    import json

    from kickq.config import JOB_OPTION_DEFAULTS
    try:
        opts = json.loads(fields.get("opts") or "{}")
        return float(opts.get("process_timeout", JOB_OPTION_DEFAULTS["process_timeout"]))
    except (ValueError, TypeError, AttributeError):
        return float(JOB_OPTION_DEFAULTS["process_timeout"])
