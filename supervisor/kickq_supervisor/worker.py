"""A worker process: claim jobs, run their handler, save the outcomes.

Idle, it registers as idle and blocks on its inbox and the wake tokens: a job created meanwhile is
claimed for it by the create and arrives in the inbox (no claim round trip); a token means a job
to claim. Busy, it sends each outcome the moment the
handler returns (finish_many, on its own connection: channel.py) without waiting for the reply,
and claims its next jobs ahead, in batches (up to `prefetch`, fewer when jobs are slow: a batch
is about PREFETCH_WINDOW of work), in the same call that saves a run. So a busy worker waits on
Redis about once per batch, and a finished run is never held back.

It tells the master through a pipe when a run starts ("S id token start timeout name") and when
the handler has returned ("F id outcome seconds [payload as a JSON string]"), so that the master,
which never waits on Redis, enforces process_timeout from outside, and saves an outcome the worker
died before sending (abandon.lua). When the next job is sure to start at once (it is in hand, and
nothing may give it back), its S goes in the same write as the last job's F: one write per job.
Signals: TERM kills (default action, also for the job's own children through the process group);
USR1 asks for a graceful stop after the current job.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import deque
from typing import Any, Mapping, NamedTuple

import redis

from kickq import scripts
from kickq.config import JOB_OPTION_DEFAULTS
from kickq.connection import connect
from kickq.job import Job
from kickq.keys import Keys
from kickq.registry import Registration

from .channel import Channel
from .osapi import current_rss, die_with_parent, release_free_heap, set_title
from .runner import Outcome, Runner

log = logging.getLogger("kickq.worker")
# redis-py turns "-OOM ..." into OutOfMemoryError and drops the prefix from the text.
_OUT_OF_MEMORY = redis.exceptions.OutOfMemoryError

Claimed = tuple[str, int, dict[str, str]]

#: A batch holds about this much work (by the recent run times), so prefetched jobs wait little.
PREFETCH_WINDOW = 0.05
#: A prefetched job that waited longer than this is given back instead of started: its lease
#: (process_timeout + 1 s from the claim) must outlast its run by a margin the master can use.
MAX_PREFETCH_WAIT = 0.25
#: Outcomes up to this size go to the master too, so it can save one the worker died before
#: sending; a bigger one is ghosted if that happens, as it was before batches.
RETAINED_PAYLOAD = 512
#: A start told to the master ahead (with the last job's end) is told again if the job starts this
#: much later (the worker waited on Redis in between): the master's deadline runs from the start.
ANNOUNCED_STALE = 0.005


class Ready(NamedTuple):
    job_id: str
    token: int
    fields: dict[str, str]
    # monotonic: for a job claimed ahead, when the call that claimed it was sent (Redis claimed it
    # after that), so its wait is never counted short; for a hand-off, when BLPOP returned it
    claimed_at: float
    prefetched: bool  # claimed ahead (a batch, a hand-off): Redis learns its start from a start mark


class Done(NamedTuple):
    job_id: str
    token: int
    outcome: str  # success | fail
    payload: str
    run_ms: int
    ended_at: float  # monotonic
    urgent: bool  # a hotjob (a waiter wants the answer now), or an outcome the master does not hold

    def run(self, now: float) -> scripts.RunOutcome:
        return (self.job_id, self.token, self.outcome, self.payload, self.run_ms,
                int((now - self.ended_at) * 1000))


class Call(NamedTuple):
    """A call sent on the channel whose reply is not read yet."""
    runs: list[Done]  # the outcomes it saves
    claims: bool  # it claims jobs
    kind: str  # "finish_many <journal runs it ends> <registers as idle: 0|1>", "journal", "expire"
    # monotonic, when it was sent. Redis claimed its jobs after that, so a claimed job's wait is
    # counted from here: a reply read late (behind a slow job) does not make its jobs look fresh.
    sent_at: float


class _Stop(Exception):
    """Raised by the USR1 handler to leave an idle blocking wait at once."""


class Worker:
    def __init__(self, number: int, registration: Registration, settings: Mapping[str, Any],
                 notify_fd: int, *, max_jobs: int = 0, max_memory: int = 0, claimer: str = "",
                 prefetch: int = 16) -> None:
        self.number = number
        self.names = list(registration.names)
        self.runner = Runner(registration.handler)
        self.settings = dict(settings)
        self.keys = Keys(settings["redis_namespace"])
        self.notify_fd = notify_fd
        self.max_jobs = max_jobs
        self.max_memory = max_memory
        self.claimer = claimer or uuid.uuid4().hex
        self.prefetch = max(1, prefetch)
        self.ready: deque[Ready] = deque()
        # per call sent, until its reply is read
        self.inflight: list[Call] = []
        self.journaled = 0  # runs in the journal since the last finish_many
        self.journal_fresh = True  # nothing pushed to it since the last finish_many: it has no TTL
        self.marked: set[str] = set()  # jobs claimed ahead whose start marker has been sent
        # The job whose start the master was told of ahead, and when: it is the next one to run.
        self.announced: tuple[str, float] | None = None
        # Jobs whose runs went to the journal and may not be ended yet (a lost-claim recovery must
        # not take them for jobs to run), in the order sent; and whether a claim's reply was lost.
        self.journal_ids: list[str] = []
        self.claims_lost = False
        self.unsaved: list[Done] = []  # runs to send again (their call failed)
        self.give_back: list[tuple[str, int]] = []
        self.last_busy = 0.0
        self.run_seconds = 0.0  # moving average of recent runs, for the batch size
        self.jobs_done = 0
        self.stopping = False
        self.idle = False
        self.parent = os.getppid()
        self.blpop_timeout = max(0.05, min(1.0, float(settings["redis_timeout"]) / 2))
        # How long an idle registration lasts: renewed at every BLPOP timeout, so it lapses only
        # when the worker is gone or stuck (a job handed over then waits for abandon or recovery).
        self.idle_ms = int((self.blpop_timeout + 0.5) * 1000)
        self.registered = False  # as idle, by the last claim or finish_many (every one ends it)
        self._title_busy: tuple[str, str, float] | None = None
        self._title_wake = threading.Event()
        self.client: Any = None
        self.scripts: scripts.Scripts | None = None
        self.channel: Channel | None = None

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
        self.channel = Channel(self.client)
        try:
            # A job announced to the master runs even if a stop was asked meanwhile: it is current.
            while (not self.stopping or self.announced) and os.getppid() == self.parent:
                if not self.ready:
                    self._refill()
                if not self.ready:
                    self._set_idle_title()
                    claimed = self._next_job()
                    if claimed is not None:
                        # a claim ahead (a hand-off) has no run_start; a claim to start at once has
                        self.ready.append(Ready(*claimed, time.monotonic(), "run_start" not in claimed[2]))
                    continue
                if not self._run_next():
                    break
        except _Stop:
            pass
        self._leave()
        return 0

    def _run_next(self) -> bool:
        """Run the first job in hand (or give it back) and save its outcome. False: retire now."""
        job = self.ready.popleft()
        announced = self.announced is not None and self.announced[0] == job.job_id
        if not announced and _waited_too_long(job):
            self._give_back_ready(job)
            return True
        if job.prefetched and not self._mark_start(job):
            return True
        done, finished = self._work(job)
        last = self._should_retire()
        upcoming = None if last else self._starts_next()
        if upcoming is not None:
            now = time.monotonic()
            self.announced = (upcoming.job_id, now)
            finished += "\n" + self._start_line(upcoming, now)
        self._notify(finished)
        self._save(done, claim=not last)
        return not last

    def _save(self, done: Done, *, claim: bool) -> None:
        """Send the run's outcome at once, without waiting for the reply. When few jobs are left, a
        finish_many ends it and claims the next batch (its reply is read when they run out);
        otherwise it goes to the journal, which the next finish_many applies."""
        refilling = any(call.claims for call in self.inflight)
        low = len(self.ready) <= self._batch_size() // 2
        # A waiter wants this outcome and nothing else is in hand: it goes alone, so the script
        # that publishes it is short; the next claim follows once its reply is read (_refill).
        alone = done.urgent and not self.ready
        want = self._batch_size() if claim and low and not refilling and not alone else 0
        # The next job's start marker rides along (see _mark_start): no write of its own.
        upcoming = self.ready[0] if self.ready else None
        marks = [self._start_marker(upcoming)] \
            if upcoming is not None and upcoming.prefetched and upcoming.job_id not in self.marked else []
        if want or done.urgent or self.unsaved:
            if marks:
                self._push_journal(marks, [])
            self._send(self.unsaved + [done], want)
        else:
            self._journal(done, marks)

    def _start_marker(self, job: Ready) -> str:
        self.marked.add(job.job_id)
        return scripts.journal_entry(job.job_id, job.token, "start", "", 0, time.monotonic() * 1000)

    def _mark_start(self, job: Ready) -> bool:
        """Before a job claimed ahead starts, say so in the journal, so that if the whole supervisor
        is lost its run is ghosted rather than given back as never started (recover reads the
        journal). A job that must not run twice (ghost_retry false) waits until Redis has the mark;
        if Redis cannot be reached, it is given back instead of started. False: not to be run."""
        sent = job.job_id in self.marked or self._push_journal([self._start_marker(job)], [])
        self.marked.discard(job.job_id)
        if not _must_not_run_twice(job):
            return True
        assert self.channel is not None
        try:
            if sent and self.inflight:
                self._settled(self.channel.settle())  # the mark's RPUSH among them
            if sent and not self.inflight:
                return True
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._lost_connection(exc, [], False)
        self.give_back.append((job.job_id, job.token))
        return False

    def _send(self, runs: list[Done], want: int) -> None:
        """finish_many without waiting: the journal, these runs, the give-backs, `want` claims."""
        assert self.channel is not None
        now = time.monotonic()
        # Holding nothing else, the worker is idle if no job comes back: it registers for hand-offs.
        idle_ms = self.idle_ms if want and not self.ready else 0
        call = scripts.finish_many_args(self.keys, self.claimer, [d.run(now) for d in runs],
                                        self.give_back, want, self.names, mono_ms=now * 1000,
                                        idle_ms=idle_ms)
        try:
            self.channel.send("finish_many", call)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._lost_connection(exc, runs, want > 0)
            return
        self.inflight.append(Call(runs, want > 0, f"finish_many {len(self.journal_ids)} {int(idle_ms > 0)}",
                                  now))
        self.unsaved, self.give_back = [], []
        self.journaled = 0
        self.journal_fresh = True

    def _journal(self, done: Done, marks: list[str]) -> None:
        entry = scripts.journal_entry(done.job_id, done.token, done.outcome, done.payload, done.run_ms,
                                      done.ended_at * 1000)
        if self._push_journal([entry, *marks], [done]):
            self.journal_ids.append(done.job_id)
            self.journaled += 1

    def _push_journal(self, entries: list[str], runs: list[Done]) -> bool:
        """RPUSH to the journal without waiting (with its TTL when it is fresh), in one write."""
        assert self.channel is not None
        key = self.keys.journal(self.claimer)
        # a fresh journal gets a TTL: bounded, should its worker and supervisor vanish
        commands: list[tuple[Any, ...]] = [("RPUSH", key, *entries)]
        if self.journal_fresh:
            commands.append(("EXPIRE", key, 86400))
        try:
            self.channel.send_commands(*commands)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._lost_connection(exc, runs, False)
            return False
        sent_at = time.monotonic()
        self.inflight.append(Call(runs, False, "journal", sent_at))
        if self.journal_fresh:
            self.inflight.append(Call([], False, "expire", sent_at))
            self.journal_fresh = False
        return True

    def _refill(self) -> None:
        """Out of jobs: read the replies of the calls in flight (a claim among them), then, if
        still out, claim at once when the worker was busy a moment ago (jobs are likely waiting:
        no BLPOP first), and send what must be sent again."""
        assert self.channel is not None
        try:
            claimed_nothing = False
            if self.inflight:
                claimed_nothing = any(call.claims for call in self.inflight)
                self._settled(self.channel.settle())
            if self.claims_lost:
                # Only with nothing in flight: a claim whose reply is still to be read is not lost.
                self._recover_claims()
            # A claim that just came back empty says the queues are empty: BLPOP rather than ask again.
            busy = time.monotonic() - self.last_busy < 0.05 and self.jobs_done > 0 and not claimed_nothing
            may_claim = busy and not self.stopping and not self._last_job_before_retiring()
            if not self.ready and (may_claim or self.unsaved or self.give_back or self.journaled):
                self._send(self.unsaved, self._batch_size() if may_claim else 0)
                if self.inflight:
                    self._settled(self.channel.settle())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._lost_connection(exc, [], False)

    def _settled(self, replies: list[Any]) -> None:
        """Take the replies of the calls in flight, in order: log rejected saves, keep claimed jobs,
        keep the runs of a call Redis refused for now (OOM, loading) to send again."""
        calls, self.inflight = self.inflight[:len(replies)], self.inflight[len(replies):]
        for reply, (runs, _, kind, sent_at) in zip(replies, calls, strict=True):
            if isinstance(reply, redis.exceptions.ResponseError):
                transient = isinstance(reply, (_OUT_OF_MEMORY, redis.exceptions.BusyLoadingError)) \
                    or str(reply).startswith(("OOM", "BUSY"))
                if transient:
                    log.warning("worker %d: saving %d runs refused (%s); retrying", self.number,
                                len(runs), reply)
                    self.unsaved += runs
                    self._backoff(reply)
                else:  # not transient: leave the runs to lease recovery rather than retry forever
                    log.error("worker %d: cannot save %d runs: %s", self.number, len(runs), reply)
                continue
            self._delay = 0.05
            if not kind.startswith("finish_many"):
                continue  # journaled: in Redis now, ended by the next finish_many
            _, journal_ended, registering = kind.split()
            del self.journal_ids[:int(journal_ended)]
            statuses, claimed, rejected = scripts.parse_finish_many(reply)
            self.registered = registering == "1" and not claimed
            lines = [(d.job_id, d.token, status, state)
                     for d, (status, state) in zip(runs, statuses, strict=True)]
            for job_id, token, status, state in lines + rejected:
                if status != "ok":
                    log.warning("worker %d: finish of job %s attempt %s rejected (%s, job is %s): a "
                                "newer attempt owns it or it was deleted", self.number, job_id, token,
                                status, state or "gone")
            self.ready.extend(Ready(job_id, token, fields, sent_at, True)
                              for job_id, token, fields in claimed)

    def _lost_connection(self, exc: Exception, runs: list[Done], claimed: bool) -> None:
        """The connection failed with calls in flight: they may or may not have run. Their runs
        are sent again (token-checked: a repeat is harmless) with the next call; what a lost
        claim took is found through the claim record."""
        assert self.channel is not None
        self.channel.reset()
        self.registered = False
        self.journal_fresh = True  # whether the TTL got there is not known: set it again
        self.marked.clear()  # nor whether a start mark did: the next job's is sent again
        claimed = claimed or any(call.claims for call in self.inflight)
        self.unsaved = [d for call in self.inflight for d in call.runs] + self.unsaved + runs
        self.inflight = []
        self.claims_lost = self.claims_lost or claimed
        self._backoff(exc)

    def _leave(self) -> None:
        """Settle what ran and give back what did not start (the master's abandon is the fallback)."""
        assert self.channel is not None
        try:
            for attempt in range(4):  # a claim settled here brings jobs in: they are given back too
                if self.ready:
                    self._give_back_ready(self.ready.popleft())
                # The first call also ends an idle registration and takes what its inbox holds.
                if attempt == 0 or self.unsaved or self.give_back or self.journaled:
                    self._send(self.unsaved, 0)
                if not self.inflight:
                    break
                self._settled(self.channel.settle())
        except (redis.exceptions.RedisError, _Stop) as exc:
            log.warning("worker %d: leaving (%s): the master settles what is left", self.number, exc)
        finally:
            self.channel.reset()

    def _give_back_ready(self, first: Ready) -> None:
        self.give_back += [(first.job_id, first.token)] + [(j.job_id, j.token) for j in self.ready]
        self.ready.clear()
        self.marked.clear()

    def _batch_size(self) -> int:
        if self.prefetch <= 1 or self.run_seconds <= 0:
            return 1
        return max(1, min(self.prefetch, int(PREFETCH_WINDOW / self.run_seconds)))

    def _should_retire(self) -> bool:
        if self.stopping:
            return True
        if self.max_jobs and self.jobs_done >= self.max_jobs:
            log.info("worker %d retiring after %d jobs (max_jobs_per_worker)", self.number, self.jobs_done)
            return True
        if self.max_memory:
            rss = current_rss()
            if rss > self.max_memory:
                log.info("worker %d retiring: RSS %d bytes > max_memory_per_worker", self.number, rss)
                return True
        return False

    def _last_job_before_retiring(self) -> bool:
        """Checked before finishing a job: if this is the last one, do not claim another."""
        if self.stopping or (self.max_jobs and self.jobs_done >= self.max_jobs):
            return True
        return bool(self.max_memory and current_rss() > self.max_memory)

    def _next_job(self) -> Claimed | None:
        """Block until a job is handed over or a wake token arrives (or a second passes); claim
        after a token or a timeout (registering as idle again when there is nothing)."""
        assert self.client is not None and self.scripts is not None
        inbox = self.keys.inbox(self.claimer)
        try:
            if not self.registered:  # claim (and register) before blocking, or hand-offs miss us
                claimed = self._claim()
                if claimed is not None:
                    return claimed
            self.idle = True
            try:
                if self.stopping:
                    raise _Stop()
                got = self.client.blpop([inbox] + [self.keys.wake(n) for n in self.names],
                                        timeout=self.blpop_timeout)
            finally:
                self.idle = False
            self.registered = False  # a hand-off ended it; the claim below renews it
            if got is None:  # idle for a whole wait: off the hot path, the heap can shrink
                release_free_heap()
            if got is not None and got[0] == inbox:
                handed = scripts.parse_handoff(got[1])
                if handed is not None:
                    self._delay = 0.05
                    return handed
            # Claim even after a timeout: a job whose token was lost is found by this poll.
            claimed = self._claim()
            self._delay = 0.05
            return claimed
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.registered = False
            self._backoff(exc)
            self.claims_lost = True  # the claim may have run: _refill looks at the claim record
            return None
        except redis.exceptions.ResponseError as exc:  # e.g. OOM at maxmemory: wait, don't die
            self.registered = False
            self._backoff(exc)
            return None

    def _claim(self) -> Claimed | None:
        """One job, or None and the worker is registered as idle (hand-offs come to its inbox)."""
        assert self.scripts is not None
        claimed = self.scripts.claim(self.keys, self.names, claimer=self.claimer, idle_ms=self.idle_ms)
        self.registered = claimed is None
        return claimed

    def _starts_next(self) -> Ready | None:
        """The job the loop starts right after this one's save, if nothing can stop it: in hand, not
        waiting too long to be given back, not waiting for Redis to have its start mark."""
        if not self.ready or self.stopping:
            return None
        job = self.ready[0]
        if _waited_too_long(job) or (job.prefetched and _must_not_run_twice(job)):
            return None
        return job

    @staticmethod
    def _start_line(job: Ready, started: float, opts: Mapping[str, Any] | None = None) -> str:
        timeout = _process_timeout(_options(job.fields) if opts is None else opts)
        # The job name goes last: it may contain spaces (the master splits at most 5 times).
        return f"S {job.job_id} {job.token} {started:.6f} {timeout} {job.fields.get('name', '')}"

    def _work(self, job: Ready) -> tuple[Done, str]:
        """Run the job; its outcome, and the F line for the master (the caller sends it)."""
        job_id, token, fields = job.job_id, job.token, job.fields
        started = time.monotonic()
        opts = _options(fields)
        announced, self.announced = self.announced, None
        if announced is None or announced[0] != job_id or started - announced[1] > ANNOUNCED_STALE:
            self._notify(self._start_line(job, started, opts))
        self._title_busy = (fields.get("name", "?"), job_id, started)
        self._title_wake.set()
        outcome = self._run(job_id, fields)
        ended = time.monotonic()
        hot = opts.get("hotjob") is True
        ran = ended - started
        kind = "success" if outcome.success else "fail"
        body = (outcome.result_json if outcome.success else outcome.error) or ""
        retained = len(body) <= RETAINED_PAYLOAD
        # Sent before the outcome leaves for Redis: the master then always knows at least what the
        # journal does, so it never ghosts a run whose outcome the journal holds.
        finished = f"F {job_id} {kind} {ran:.6f}" + (" " + json.dumps(body) if retained else "")
        self.jobs_done += 1
        self.last_busy = ended
        self.run_seconds = ran if self.run_seconds <= 0 else 0.8 * self.run_seconds + 0.2 * ran
        return Done(job_id, token, kind, body, int(round(ran * 1000)), ended, hot or not retained), finished

    def _run(self, job_id: str, fields: Mapping[str, str]) -> Outcome:
        if "run_start" not in fields:  # prefetched: its run starts now, as the handler sees it
            fields = {**fields, "run_start": str(int(time.time() * 1000))}
        try:
            job = Job.from_fields(job_id, fields)
        except Exception as exc:  # hostile or corrupt record: fail this job only
            return Outcome(False, error=f"cannot decode job {job_id}: {exc}")
        return self.runner.run(job, job.data)

    def _recover_claims(self) -> None:
        """After a lost reply that carried claims: take the jobs of our claim record that are still
        ours and that we do not hold already (to run, or ran and not yet ended), as jobs to run.
        Called with nothing in flight (a reply still to be read would bring its jobs again)."""
        assert self.client is not None and not self.inflight
        held = ({j.job_id for j in self.ready} | {d.job_id for d in self.unsaved} | set(self.journal_ids)
                | {d.job_id for call in self.inflight for d in call.runs})
        stamp = time.monotonic()
        try:
            # In one step: no more hand-offs, and what the inbox held (the record names those jobs
            # too) is dropped, so that neither BLPOP nor this brings a job a second time.
            pipe = self.client.pipeline(transaction=True)
            for name in self.names:
                pipe.zrem(self.keys.idle(name), self.claimer)
            pipe.delete(self.keys.idler(self.claimer), self.keys.inbox(self.claimer))
            pipe.get(self.keys.claim(self.claimer))
            pipe.time()
            record, (seconds, micros) = pipe.execute()[-2:]
            redis_ms = seconds * 1000 + micros // 1000
            self.registered = False
            for job_id, token in scripts.parse_claim_record(record):
                if job_id in held:
                    continue
                fields = self.client.hgetall(self.keys.job(job_id))
                if fields.get("state") == "processing" and fields.get("attempt") == token \
                        and fields.get("owner") in (None, self.claimer):
                    # Claimed who knows how long ago (the reply was lost): its wait counts from the
                    # claim, by Redis' clock (update_time), as if the reply had come at once.
                    claimed_at = stamp - _age_seconds(fields.get("update_time"), redis_ms)
                    self.ready.append(Ready(job_id, int(token), fields, claimed_at,
                                            "run_start" not in fields))
            self.claims_lost = False
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self._backoff(exc)

    _delay = 0.05

    def _backoff(self, exc: Exception) -> None:
        log.warning("worker %d: Redis unavailable (%s); retrying in %.2fs", self.number, exc, self._delay)
        self.idle = True
        try:
            time.sleep(self._delay * random.uniform(0.5, 1.5))  # jitter: workers do not retry in step
        finally:
            self.idle = False
        self._delay = min(self._delay * 2, 2.0)


def _age_seconds(stamp_ms: str | None, now_ms: int) -> float:
    """Seconds from a time Redis stamped (ms) to `now_ms`; unknown counts as too old to start."""
    try:
        return max(0.0, (now_ms - int(stamp_ms or "")) / 1000)
    except ValueError:
        return float("inf")


def _waited_too_long(job: Ready) -> bool:
    """A job claimed ahead that waited so long it is given back instead of started."""
    return job.prefetched and time.monotonic() - job.claimed_at > MAX_PREFETCH_WAIT


def _must_not_run_twice(job: Ready) -> bool:
    """ghost_retry false: a job claimed ahead starts only once Redis has its start mark."""
    return _options(job.fields).get("ghost_retry", True) is False


def _options(fields: Mapping[str, str]) -> Mapping[str, Any]:
    """The job's stored options (those that differ from the defaults); {} if they do not decode.
    Read-only: jobs with the same stored options share one decoded copy."""
    return _decoded_options(fields.get("opts") or "")


@functools.lru_cache(maxsize=256)
def _decoded_options(stored: str) -> Mapping[str, Any]:
    # Asked several times per job (its start, its deadline, its hotjob flag): decoded once.
    try:
        opts = json.loads(stored or "{}")
    except ValueError:
        return {}
    return opts if isinstance(opts, dict) else {}


def _process_timeout(opts: Mapping[str, Any]) -> float:
    default = float(JOB_OPTION_DEFAULTS["process_timeout"])
    try:
        return float(opts.get("process_timeout", default))
    except (ValueError, TypeError):
        return default
