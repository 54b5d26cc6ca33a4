"""A worker's decisions, with no I/O: what to claim, when to give back, what to journal, when a job
claimed ahead is too old to start, what to tell the master.

`WorkerCore.steps()` is a generator. It yields typed commands (`FinishMany`, `JournalPush`, `Settle`,
`Start`, ...) and receives the result of each one; the process loop around it (worker.py) performs
them on Redis, the pipe and the handler, and does nothing else. Time comes from an injected clock and
memory from an injected reading, so tests drive the core command by command with fakes: no fork, no
Redis.

How a worker uses Redis (the scripts are in kickq/lua):
- Idle, it claims one job (registering as idle when there is none: a job created meanwhile is claimed
  for it by the create and handed over in its inbox), then blocks on its inbox and the wake tokens.
- Busy, it sends each outcome the moment the handler returns, on its own connection, without waiting
  for the reply: to its journal (a plain RPUSH), or in a finish_many that also claims the next jobs
  ahead, in batches (up to `prefetch`, fewer when jobs are slow: a batch is about PREFETCH_WINDOW of
  work). The next finish_many ends what the journal holds. So a busy worker waits on Redis about once
  per batch, and a finished run is never held back.
- A job claimed ahead has no start in Redis: before it starts, a start mark goes to the journal (with
  the last job's outcome, in the same write), so that a lost run of it is ghosted, not given back as
  never started. A job that must not run twice (ghost_retry false) waits until Redis has the mark.

Where a finished run's outcome is, until Redis has ended the run: in hand (`unsaved`: to send), in a
call in flight (`Call.runs`), or in the journal (`Journal.ids`: pushed, ended by the next
finish_many). The master holds short outcomes too (the F message), to save them should the worker die.

The core tracks its running jobs by id (`running`). With one slot (jobs_per_worker 1) it starts one
at a time; `Start` may come back before the run ends (its end then comes by `AwaitEnd`); the process
loop runs the handler within `Start`, which then brings its end back at once.

With several slots (a dense worker, jobs_per_worker > 1) the core keeps up to `slots` runs going:
`Start` comes back at once, and the core waits for the next event (`WaitForEvent`: runs that ended,
work that arrived, up to a timeout). It starts jobs from its hand while a slot is free, claims for
the free slots and about PREFETCH_WINDOW of work ahead for the whole worker, registers for hand-offs
while a slot is free and nothing is in hand (the process loop then takes inbox entries and wake
tokens for it), and cancels a run at its process_timeout (an async job: its run ends as a ghost,
"processing timed out"; a thread job cannot be cancelled, the master kills the worker). Each run's
end is saved as with one slot: the F message first, then the journal or a finish_many.
"""
from __future__ import annotations

import functools
import json
import logging
from collections import deque
from typing import Any, Callable, Generator, Iterable, Mapping, NamedTuple, Union

import redis

from kickq import scripts
from kickq.backoff import Backoff, Outage
from kickq.config import JOB_OPTION_DEFAULTS
from kickq.keys import Keys
from kickq.logformat import job_extra

from .messages import Finished, Message, Started
from .runner import Outcome

log = logging.getLogger("kickq.worker")

#: A batch holds about this much work (by the recent run times), so prefetched jobs wait little.
PREFETCH_WINDOW = 0.05
#: A prefetched job that waited longer than this is given back instead of started: its lease
#: (process_timeout + 1 s from the claim) must outlast its run by a margin the master can use.
MAX_PREFETCH_WAIT = 0.25
#: Outcomes up to this size go to the master too, so it can save one the worker died before
#: sending; a bigger one is ghosted if that happens.
RETAINED_PAYLOAD = 512
#: A start told to the master ahead (with the last job's end) is told again if the job starts this
#: much later (the worker waited on Redis in between): the master's deadline runs from the start.
ANNOUNCED_STALE = 0.005
#: A run ended less than this ago: jobs are likely waiting, so an empty hand claims at once.
BUSY_WINDOW = 0.05
#: Why a dense worker ends a run it cancelled at the job's process_timeout (the master's words too).
TIMED_OUT = "processing timed out"
#: A journal's TTL, set at its first push after each finish_many: bounded, should its worker and
#: supervisor vanish (abandon and recover empty it otherwise).
JOURNAL_TTL = 86400


# --- what the core holds ----------------------------------------------------------------------------

class HeldJob(NamedTuple):
    """A job claimed for this worker and not started."""
    job_id: str
    token: str  # attempt token (scripts.run_token)
    fields: dict[str, str]
    # clock time: for a job claimed ahead, when the call that claimed it was sent (Redis claimed it
    # after that), so its wait is never counted short; for a hand-off, when it was taken
    claimed_at: float
    prefetched: bool  # claimed ahead (a batch, a hand-off): Redis learns its start from a start mark


class Running(NamedTuple):
    job: HeldJob
    started: float  # clock time
    hotjob: bool


class FinishedRun(NamedTuple):
    """A run's outcome, until Redis has ended the run."""
    job_id: str
    token: str
    outcome: str  # success | fail | ghost (a dense worker cancelled it at its deadline)
    payload: str
    run_ms: int
    ended_at: float  # clock time
    urgent: bool  # a hotjob (a waiter wants the answer now), or an outcome the master does not hold
    name: str = ""  # the job name, for the logs

    def as_args(self, now: float) -> scripts.RunOutcome:
        return (self.job_id, self.token, self.outcome, self.payload, self.run_ms,
                int((now - self.ended_at) * 1000))


class FinishMany(NamedTuple):
    """Send a finish_many call without waiting for its reply: it ends `runs` and the journal, gives
    back, claims `want` jobs ahead. Back: None, or Lost."""
    keys_and_args: tuple[list[str], list[Any]]
    runs: list[FinishedRun]
    give_back: list[tuple[str, str]]
    want: int
    idle_ms: int  # registers as idle for that long when it claims nothing (0: not)
    journal_ends: int  # how many of Journal.ids it ends (those pushed before it)
    sent_at: float  # clock time; Redis claimed its jobs after that

    @property
    def replies(self) -> int:
        return 1


class JournalPush(NamedTuple):
    """Send an RPUSH of journal entries (outcomes, start marks), with the journal's TTL when it is
    fresh, without waiting for the reply. Back: None, or Lost."""
    commands: tuple[tuple[Any, ...], ...]
    runs: list[FinishedRun]  # the outcomes among the entries
    marks: tuple[str, ...]  # the jobs whose start marks are among them

    @property
    def replies(self) -> int:
        return len(self.commands)


Call = Union[FinishMany, JournalPush]


# --- commands the core yields, and what the process loop sends back ---------------------------------

class Settle(NamedTuple):
    """Read the replies of every call sent, in order (an error reply is the exception object).
    Back: the list of replies, or Lost."""


class Tell(NamedTuple):
    """Write these messages to the master, in one write. Back: None."""
    messages: tuple[Message, ...]


class Start(NamedTuple):
    """Start the handler on `job`. Back: None while it runs (its end comes by AwaitEnd), or Ended
    when the handler ran to its end right there (one run at a time: no AwaitEnd round)."""
    job: HeldJob


class AwaitEnd(NamedTuple):
    """Wait until a started run ends. Back: Ended."""


class ClaimOne(NamedTuple):
    """Run the claim script for one job, registering as idle for `idle_ms` if there is none.
    Back: the claim (id, token, fields) or None; Lost; or Refused."""
    idle_ms: int


class WaitForWork(NamedTuple):
    """Block on the inbox and the wake tokens for up to `timeout` seconds.
    Back: Woke, Lost, Refused, or Interrupted (a stop was asked)."""
    timeout: float


class ShrinkHeap(NamedTuple):
    """Give the C heap's free pages back: idle for a whole wait, off the hot path. Back: None."""


class ReadClaimRecord(NamedTuple):
    """End any idle registration, drop the inbox, and read the claim record with the fields of the
    jobs it names that are not in `held` (id, token pairs). Back: ClaimRecord, or Lost."""
    held: frozenset[tuple[str, str]]


class Pause(NamedTuple):
    """Sleep `seconds` (a backoff). Back: None, or Interrupted."""
    seconds: float


class ShowIdle(NamedTuple):
    """Nothing in hand: the process title says idle. Back: None."""


class WaitForEvent(NamedTuple):
    """A dense worker with runs going: wait up to `timeout` seconds for runs to end or work to arrive.
    `want_work`: a slot is free and nothing is in hand, so hand-offs and wake tokens are taken for
    the worker meanwhile. Back: the list of what happened (Ended, Arrived; empty: timed out), or
    Interrupted (a stop was asked)."""
    timeout: float
    want_work: bool


class Cancel(NamedTuple):
    """Cancel a run that passed its deadline. Back: True when it ends by the cancellation (an async
    job: its end comes as any end), False when it cannot be cancelled (a thread)."""
    job_id: str


class ReturnToken(NamedTuple):
    """Put back a wake token of `name` that was taken for the worker and not used up. Back: None."""
    name: str


class TakeArrived(NamedTuple):
    """Leaving: take no more work for the worker. Back: the hand-offs taken for it meanwhile (inbox
    entries, a list)."""


Command = Union[FinishMany, JournalPush, Settle, Tell, Start, AwaitEnd, ClaimOne, WaitForWork, ShrinkHeap,
                ReadClaimRecord, Pause, ShowIdle, WaitForEvent, Cancel, ReturnToken, TakeArrived]


class Lost(NamedTuple):
    """The connection failed: what was in flight may or may not have run."""
    error: Exception


class Refused(NamedTuple):
    """Redis refused the command (an error reply: OOM at maxmemory, ...)."""
    error: Exception


class Interrupted(NamedTuple):
    """A stop was asked during a blocking wait."""


class Woke(NamedTuple):
    """WaitForWork's answer: `handoff` is the inbox entry taken, if any; `timed_out` when nothing came."""
    handoff: str | None
    timed_out: bool


class Ended(NamedTuple):
    job_id: str
    outcome: Outcome


class Arrived(NamedTuple):
    """Work for a dense worker: an inbox entry (a hand-off), or the name whose wake token was taken."""
    handoff: str | None = None
    wake: str | None = None


class ClaimRecord(NamedTuple):
    """The jobs the claim record names (id, token, their fields; {} when gone), and Redis' clock."""
    jobs: list[tuple[str, str, dict[str, str]]]
    redis_ms: int


# --- the core ------------------------------------------------------------------------------------------

class _Interrupted(Exception):
    """A stop interrupted a blocking wait: the worker leaves at once."""


class Pace:
    """How fast this worker's jobs run: it sizes the batches claimed ahead."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = max(1, prefetch)
        self.run_seconds = 0.0  # moving average of recent runs
        self.jobs_done = 0
        self.last_busy = 0.0  # clock time the last run ended

    def ran(self, seconds: float, ended: float) -> None:
        self.jobs_done += 1
        self.last_busy = ended
        self.run_seconds = seconds if self.run_seconds <= 0 else 0.8 * self.run_seconds + 0.2 * seconds

    def batch_size(self) -> int:
        if self.prefetch <= 1 or self.run_seconds <= 0:
            return 1
        return max(1, min(self.prefetch, int(PREFETCH_WINDOW / self.run_seconds)))

    def ahead(self, slots: int) -> int:
        """A dense worker: the jobs to claim ahead of its free slots, about PREFETCH_WINDOW of work at
        the rate its `slots` runs go (0 until a run has ended)."""
        if self.prefetch <= 1 or self.run_seconds <= 0:
            return 0
        return min(self.prefetch, int(PREFETCH_WINDOW * slots / self.run_seconds))

    def busy(self, now: float) -> bool:
        return self.jobs_done > 0 and now - self.last_busy < BUSY_WINDOW


class Journal:
    """What the worker pushed to its journal (P.."done:"..claimer) since its last finish_many."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.fresh = True  # nothing pushed since the last finish_many: the next push sets the TTL
        self.pending = 0  # runs pushed since the last finish_many (the next one ends them)
        self.ids: list[tuple[str, str]] = []  # runs pushed (id, token) that may not be ended yet, in order
        self.marked: set[str] = set()  # jobs claimed ahead whose start mark was pushed

    def push(self, entries: list[str], runs: list[FinishedRun], marks: tuple[str, ...]) -> JournalPush:
        commands: tuple[tuple[Any, ...], ...] = (("RPUSH", self.key, *entries),)
        if self.fresh:
            commands += (("EXPIRE", self.key, JOURNAL_TTL),)
        return JournalPush(commands, runs, marks)

    def pushed(self, call: JournalPush) -> None:
        self.fresh = False
        self.marked.update(call.marks)

    def ended(self) -> None:
        """A finish_many was sent: it ends everything pushed before it."""
        self.pending = 0
        self.fresh = True

    def lost(self) -> None:
        """The connection failed: whether the TTL and the marks got there is not known."""
        self.fresh = True
        self.marked.clear()


class WorkerCore:
    def __init__(self, number: int, names: Iterable[str], keys: Keys, claimer: str, *,
                 clock: Callable[[], float], memory: Callable[[], int] = lambda: 0,
                 prefetch: int = 16, wait_timeout: float = 1.0, max_jobs: int = 0, max_memory: int = 0,
                 backoff: Backoff | None = None, slots: int = 1) -> None:
        self.number = number  # for logs
        self.slots = max(1, slots)  # runs at once (jobs_per_worker)
        self.names = list(names)
        self.keys = keys
        self.claimer = claimer
        self.clock = clock
        self.memory = memory  # RSS in bytes
        self.wait_timeout = wait_timeout
        # How long an idle registration lasts: renewed at every wait that times out, so it lapses only
        # when the worker is gone or stuck (a job handed over then waits for abandon or recovery).
        self.idle_ms = int((wait_timeout + 0.5) * 1000)
        self.max_jobs = max_jobs
        self.max_memory = max_memory
        self.backoff = backoff or Backoff(jitter=0.5)  # workers that lost Redis together retry apart
        self.outage = Outage(log, f"worker {number}", self.backoff, clock=clock)
        self.pace = Pace(prefetch)
        self.journal = Journal(keys.journal(claimer))
        self.hand: deque[HeldJob] = deque()
        self.running: dict[str, Running] = {}
        self.inflight: list[Call] = []  # sent, their replies not read yet, in order
        self.unsaved: list[FinishedRun] = []  # outcomes to send (again: their call failed)
        self.give_back: list[tuple[str, str]] = []  # claimed jobs to give back with the next call
        # The job whose start the master was told of ahead, and when: it is the next one to run.
        self.announced: tuple[str, float] | None = None
        self.registered = False  # as idle, by the last claim or finish_many (every call ends it)
        self.claims_lost = False  # a claim's reply was lost: the claim record says what it took
        self.stopping = False
        self.orphaned = False
        # a dense worker's (slots > 1)
        self.retiring = False  # past max_jobs or max_memory: no new job, the running ones finish
        self.dry = False  # the last claim got fewer jobs than it asked: claim ahead no more for now
        self.registered_at = 0.0  # clock time of the claim that registered as idle
        self.cancelled: set[str] = set()  # runs cancelled at their deadline: they end as ghosts
        self.left_to_master: set[str] = set()  # runs past their deadline that cannot be cancelled
        self.deadlines: dict[str, float] = {}  # running job id -> its deadline (clock time)

    # --- from outside ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """A graceful stop: no new job; a job already announced to the master still runs."""
        self.stopping = True

    def parent_gone(self) -> None:
        self.stopping = self.orphaned = True

    # --- the loop ----------------------------------------------------------------------------------------

    def steps(self) -> Generator[Command, Any, None]:
        if self.slots > 1:
            yield from self._dense_steps()
            return
        try:
            # A job announced to the master runs even if a stop was asked meanwhile: it is current.
            while (not self.stopping or self.announced) and not self.orphaned:
                if not self.hand:
                    yield from self._refill()
                if not self.hand:
                    yield ShowIdle()
                    claimed = yield from self._next_job()
                    if claimed is not None:
                        # a claim ahead (a hand-off) has no run_start; a claim to start at once has
                        job_id, token, fields = claimed
                        prefetched = "run_start" not in fields
                        self.hand.append(HeldJob(job_id, token, fields, self.clock(), prefetched))
                    continue
                if not (yield from self._run_next()):
                    break
        except _Interrupted:
            pass
        yield from self._leave()

    def _run_next(self) -> Generator[Command, Any, bool]:
        """Run the first job in hand (or give it back) and save its outcome. False: retire now."""
        job = self.hand.popleft()
        announced, self.announced = self.announced, None
        if (announced is None or announced[0] != job.job_id) and self._waited_too_long(job):
            self._give_back_held(job)
            return True
        if job.prefetched and not (yield from self._mark_start(job)):
            return True
        started = self.clock()
        if announced is None or announced[0] != job.job_id or started - announced[1] > ANNOUNCED_STALE:
            yield Tell((self._started(job, started),))
        run = Running(job, started, _options(job.fields).get("hotjob") is True)
        self.running[job.job_id] = run
        ended = yield Start(job)
        if ended is None:
            ended = yield AwaitEnd()
        done, finished = self._ended(self.running.pop(ended.job_id, run), ended.outcome)
        last = self._should_retire()
        upcoming = None if last else self._starts_next()
        told: tuple[Message, ...] = (finished,)
        if upcoming is not None:
            now = self.clock()
            self.announced = (upcoming.job_id, now)
            told += (self._started(upcoming, now),)
        yield Tell(told)
        yield from self._save(done, claim=not last)
        return not last

    def _ended(self, run: Running, outcome: Outcome,
               ghost: str | None = None) -> tuple[FinishedRun, Finished]:
        """The run's outcome to save, and the F message (sent before the outcome leaves for Redis:
        the master then always knows at least what the journal does, so it never ghosts a run whose
        outcome the journal holds). `ghost`: the run ends as a ghost, for that reason, whatever
        the handler did."""
        ended = self.clock()
        ran = ended - run.started
        if ghost is not None:
            kind, body = "ghost", ghost
        else:
            kind = "success" if outcome.success else "fail"
            body = (outcome.result_json if outcome.success else outcome.error) or ""
        retained = len(body) <= RETAINED_PAYLOAD
        self.pace.ran(ran, ended)
        job = run.job
        done = FinishedRun(job.job_id, job.token, kind, body, int(round(ran * 1000)), ended,
                           run.hotjob or not retained, job.fields.get("name", ""))
        return done, Finished(job.job_id, kind, ran, body if retained else None)

    @staticmethod
    def _started(job: HeldJob, started: float) -> Started:
        return Started(job.job_id, job.token, started, _process_timeout(_options(job.fields)),
                       job.fields.get("name", ""))

    # --- saving outcomes ---------------------------------------------------------------------------------

    def _save(self, done: FinishedRun, *, claim: bool) -> Generator[Command, Any, None]:
        """Send the run's outcome at once, without waiting for the reply. When few jobs are left, a
        finish_many ends it and claims the next batch (its reply is read when they run out);
        otherwise it goes to the journal, which the next finish_many applies."""
        batch = self.pace.batch_size()
        refilling = any(call.want for call in self.inflight if isinstance(call, FinishMany))
        low = len(self.hand) <= batch // 2
        # A waiter wants this outcome and nothing else is in hand: it goes alone, so the script
        # that publishes it is short; the next claim follows once its reply is read (_refill).
        alone = done.urgent and not self.hand
        want = batch if claim and low and not refilling and not alone else 0
        # The next job's start mark rides along (see _mark_start): no write of its own. None for a job
        # that will not start: this one is the last (the worker retires and gives back what it holds),
        # or the next waited too long (given back): a mark Redis has would make a lost run of it a ghost.
        upcoming = self.hand[0] if self.hand and claim else None
        to_mark = upcoming if upcoming is not None and upcoming.prefetched \
            and upcoming.job_id not in self.journal.marked and not self._waited_too_long(upcoming) else None
        marks = [self._start_mark(to_mark)] if to_mark is not None else []
        marked = (to_mark.job_id,) if to_mark is not None else ()
        if want or done.urgent or self.unsaved:
            if marks:
                yield from self._push_journal(marks, [], marked)
            yield from self._send(self.unsaved + [done], want)
        else:
            entry = scripts.journal_entry(done.job_id, done.token, done.outcome, done.payload, done.run_ms,
                                          done.ended_at * 1000)
            if (yield from self._push_journal([entry, *marks], [done], marked)):
                self.journal.ids.append((done.job_id, done.token))
                self.journal.pending += 1

    def _start_mark(self, job: HeldJob) -> str:
        return scripts.journal_entry(job.job_id, job.token, "start", "", 0, self.clock() * 1000)

    def _mark_start(self, job: HeldJob) -> Generator[Command, Any, bool]:
        """Before a job claimed ahead starts, say so in the journal, so that if the whole supervisor
        is lost its run is ghosted rather than given back as never started (recover reads the
        journal). A job that must not run twice (ghost_retry false) waits until Redis has the mark;
        if Redis cannot be reached, it is given back instead of started. False: not to be run."""
        if job.job_id not in self.journal.marked:
            yield from self._push_journal([self._start_mark(job)], [], (job.job_id,))
        if _must_not_run_twice(job):
            if job.job_id in self.journal.marked and self.inflight:
                yield from self._settle()  # the mark's RPUSH among them
            # Sent, and not refused nor lost since: Redis has it.
            confirmed = job.job_id in self.journal.marked and not self.inflight
            self.journal.marked.discard(job.job_id)
            if not confirmed:
                self.give_back.append((job.job_id, job.token))
            return confirmed
        self.journal.marked.discard(job.job_id)
        return True

    def _send(self, runs: list[FinishedRun], want: int,
              idle: bool | None = None) -> Generator[Command, Any, None]:
        """finish_many without waiting: the journal, these runs, the give-backs, `want` claims.
        `idle`: whether to register for hand-offs should it claim nothing (None: when the hand is empty)."""
        now = self.clock()
        # Holding nothing else, the worker is idle if no job comes back: it registers for hand-offs.
        idle_ms = self.idle_ms if want and (not self.hand if idle is None else idle) else 0
        args = scripts.finish_many_args(self.keys, self.claimer, [d.as_args(now) for d in runs],
                                        self.give_back, want, self.names, mono_ms=now * 1000, idle_ms=idle_ms)
        call = FinishMany(args, runs, self.give_back, want, idle_ms, len(self.journal.ids), now)
        failed = yield call
        if failed is not None:
            yield from self._lost_connection(failed.error, runs, want > 0)
            return
        self.inflight.append(call)
        self.unsaved, self.give_back = [], []
        self.journal.ended()

    def _push_journal(self, entries: list[str], runs: list[FinishedRun],
                      marks: tuple[str, ...]) -> Generator[Command, Any, bool]:
        """RPUSH to the journal without waiting (with its TTL when it is fresh), in one write."""
        call = self.journal.push(entries, runs, marks)
        failed = yield call
        if failed is not None:
            yield from self._lost_connection(failed.error, runs, False)
            return False
        self.inflight.append(call)
        self.journal.pushed(call)
        return True

    # --- replies -------------------------------------------------------------------------------------------

    def _settle(self) -> Generator[Command, Any, bool]:
        """Read the replies of the calls in flight. False: the connection was lost meanwhile."""
        replies = yield Settle()
        if isinstance(replies, Lost):
            yield from self._lost_connection(replies.error, [], False)
            return False
        yield from self._take_replies(replies)
        return True

    def _take_replies(self, replies: list[Any]) -> Generator[Command, Any, None]:
        """The replies of the calls in flight, in order: log rejected saves, keep claimed jobs, keep
        the runs of a call Redis refused for now (OOM, loading) to send again."""
        refused: Exception | None = None
        at = 0
        calls, self.inflight = self.inflight, []
        for call in calls:
            reply = replies[at]
            at += call.replies
            if isinstance(reply, redis.exceptions.ResponseError):
                if _transient(reply):
                    log.warning("worker %d: saving %d runs refused (%s); retrying", self.number,
                                len(call.runs), reply)
                    self.unsaved += call.runs
                    refused = reply
                else:  # not transient: leave the runs to lease recovery rather than retry forever
                    log.error("worker %d: cannot save %d runs: %s", self.number, len(call.runs), reply)
                if isinstance(call, JournalPush):
                    self.journal.marked.difference_update(call.marks)  # Redis has not got them
                continue
            if isinstance(call, FinishMany):
                self._finished_many(call, reply)
        if refused is not None:
            yield from self._pause(refused)
        else:
            self.outage.ok()

    def _finished_many(self, call: FinishMany, reply: Any) -> None:
        del self.journal.ids[:call.journal_ends]
        statuses, claimed, rejected = scripts.parse_finish_many(reply)
        self.registered = call.idle_ms > 0 and not claimed
        lines = [(d.job_id, d.token, status, state)
                 for d, (status, state) in zip(call.runs, statuses, strict=True)]
        names = {d.job_id: d.name for d in call.runs}  # a run applied from the journal has none here
        for job_id, token, status, state in lines + rejected:
            if status != "ok":
                log.warning("worker %d: finish of job %s (token %s) rejected (%s, job is %s): a "
                            "newer attempt owns it or it was deleted", self.number, job_id, token,
                            status, state or "gone", extra=job_extra(job_id, names.get(job_id)))
        self.hand.extend(HeldJob(job_id, token, fields, call.sent_at, True)
                         for job_id, token, fields in claimed)

    def _lost_connection(self, error: Exception, runs: list[FinishedRun],
                         claimed: bool) -> Generator[Command, Any, None]:
        """The connection failed with calls in flight: they may or may not have run. Their runs
        are sent again (token-checked: a repeat is harmless) with the next call; what a lost
        claim took is found through the claim record."""
        self.registered = False
        self.journal.lost()
        claimed = claimed or any(call.want for call in self.inflight if isinstance(call, FinishMany))
        # Each once: `runs` may hold the unsaved runs already (a call that sent them again).
        in_flight = [d for call in self.inflight for d in call.runs]
        self.unsaved = list(dict.fromkeys(in_flight + self.unsaved + runs))
        self.inflight = []
        self.claims_lost = self.claims_lost or claimed
        yield from self._pause(error)

    def _pause(self, error: Exception) -> Generator[Command, Any, None]:
        delay = self.outage.failed(error)
        if isinstance((yield Pause(delay)), Interrupted):
            raise _Interrupted()

    # --- out of jobs -----------------------------------------------------------------------------------

    def _refill(self) -> Generator[Command, Any, None]:
        """Out of jobs: read the replies of the calls in flight (a claim among them), then, if
        still out, claim at once when the worker was busy a moment ago (jobs are likely waiting:
        no blocking wait first), and send what must be sent again."""
        claimed_nothing = False
        if self.inflight:
            claimed_nothing = any(call.want for call in self.inflight if isinstance(call, FinishMany))
            if not (yield from self._settle()):
                claimed_nothing = False  # its claims may have run: the claim record says
        if self.claims_lost:
            # Only with nothing in flight: a claim whose reply is still to be read is not lost.
            yield from self._recover_claims()
        # A claim that just came back empty says the queues are empty: wait rather than ask again.
        busy = self.pace.busy(self.clock()) and not claimed_nothing
        may_claim = busy and not self.stopping and not self._last_job_before_retiring()
        if not self.hand and (may_claim or self.unsaved or self.give_back or self.journal.pending):
            yield from self._send(self.unsaved, self.pace.batch_size() if may_claim else 0)
            if self.inflight:
                yield from self._settle()

    def _next_job(self) -> Generator[Command, Any, tuple[str, str, dict[str, str]] | None]:
        """Block until a job is handed over or a wake token arrives (or a wait times out); claim
        after a token or a timeout (registering as idle again when there is nothing)."""
        if not self.registered:  # claim (and register) before blocking, or hand-offs miss us
            got = yield ClaimOne(self.idle_ms)
            if isinstance(got, (Lost, Refused)):
                yield from self._claim_failed(got)
                return None
            self.registered = got is None
            if got is not None:
                return got  # type: ignore[no-any-return]
        if self.stopping:
            raise _Interrupted()
        woke = yield WaitForWork(self.wait_timeout)
        if isinstance(woke, Interrupted):
            raise _Interrupted()
        if isinstance(woke, (Lost, Refused)):
            yield from self._claim_failed(woke)
            return None
        self.registered = False  # a hand-off ended it; the claim below renews it
        if woke.timed_out:
            yield ShrinkHeap()
        if woke.handoff is not None:
            handed = scripts.parse_handoff(woke.handoff)
            if handed is not None:
                self.outage.ok()
                return handed
        # Claim even after a timeout: a job whose token was lost is found by this poll.
        got = yield ClaimOne(self.idle_ms)
        if isinstance(got, (Lost, Refused)):
            yield from self._claim_failed(got)
            return None
        self.registered = got is None
        self.outage.ok()
        return got  # type: ignore[no-any-return]

    def _claim_failed(self, failure: Lost | Refused) -> Generator[Command, Any, None]:
        self.registered = False
        if isinstance(failure, Lost):
            self.claims_lost = True  # the claim may have run: _refill looks at the claim record
        yield from self._pause(failure.error)  # e.g. OOM at maxmemory: wait, don't die

    def _recover_claims(self) -> Generator[Command, Any, None]:
        """After a lost reply that carried claims: take the jobs of our claim record that are still
        ours and that we do not hold already (to run, or ran and not yet ended), as jobs to run.
        Called with nothing in flight (a reply still to be read would bring its jobs again)."""
        # By (id, token): after a failover that lost creates, a job of the record may reuse the id
        # of a lost one whose outcome is still held; that is another job, to run.
        jobs = [*self.hand, *(run.job for run in self.running.values())]
        held = frozenset([(j.job_id, j.token) for j in jobs] + [(d.job_id, d.token) for d in self.unsaved]
                         + self.journal.ids)
        stamp = self.clock()
        record = yield ReadClaimRecord(held)
        if isinstance(record, Lost):
            yield from self._pause(record.error)
            return
        self.registered = False
        for job_id, token, fields in record.jobs:
            if (job_id, token) in held:
                continue
            if fields.get("state") == "processing" and scripts.run_token(fields) == token \
                    and fields.get("owner") in (None, self.claimer):
                # Claimed who knows how long ago (the reply was lost): its wait counts from the
                # claim, by Redis' clock (update_time), as if the reply had come at once.
                claimed_at = stamp - _age_seconds(fields.get("update_time"), record.redis_ms)
                self.hand.append(HeldJob(job_id, token, fields, claimed_at, "run_start" not in fields))
        self.claims_lost = False

    # --- leaving -----------------------------------------------------------------------------------------

    def _leave(self) -> Generator[Command, Any, None]:
        """Settle what ran and give back what did not start (the master's abandon is the fallback)."""
        try:
            for attempt in range(4):  # a claim settled here brings jobs in: they are given back too
                if self.hand:
                    self._give_back_held(self.hand.popleft())
                # The first call also ends an idle registration and takes what its inbox holds.
                if attempt == 0 or self.unsaved or self.give_back or self.journal.pending:
                    yield from self._send(self.unsaved, 0)
                if not self.inflight:
                    break
                if not (yield from self._settle()):
                    break
        except _Interrupted as exc:
            log.warning("worker %d: leaving (%s): the master settles what is left", self.number, exc)

    def _give_back_held(self, first: HeldJob) -> None:
        self.give_back += [(first.job_id, first.token)] + [(j.job_id, j.token) for j in self.hand]
        self.hand.clear()
        self.journal.marked.clear()

    # --- a dense worker (slots > 1) ------------------------------------------------------------------

    def _dense_steps(self) -> Generator[Command, Any, None]:
        """Up to `slots` runs at once: start what the hand holds while a slot is free, claim for the
        free slots (and ahead), wait for the next event; once a stop or a limit is reached, claim
        nothing more, let the runs finish, give back the hand and leave."""
        while True:
            try:
                if (yield from self._dense_round()):
                    break
            except _Interrupted:
                self.stopping = True  # a stop cut a wait short: the runs still finish
        yield from self._dense_leave()

    def _leaving(self) -> bool:
        return self.stopping or self.orphaned or self.retiring

    def _dense_round(self) -> Generator[Command, Any, bool]:
        """One round of the dense loop. True: nothing runs and the worker leaves."""
        if self._leaving() and not self.running:
            return True
        if self.claims_lost:  # with nothing in flight: a reply still to be read brings its jobs
            if not self.inflight or (yield from self._settle()):
                yield from self._recover_claims()
        yield from self._expire_deadlines()
        self._expire_hand()
        if self._leaving() and (self.hand or self.registered):
            # Nothing more starts here: what is in hand goes back now, not once the runs end, and
            # no hand-off comes any more.
            self.give_back += [(j.job_id, j.token) for j in self.hand]
            self.hand.clear()
            yield from self._send_now([])
        if not self._leaving():
            yield from self._fill()
        if not self.running:
            if not self._leaving() and not self.hand:
                yield from self._dense_idle()
            return False
        if self._needs_claim():
            yield from self._claim()
            if self.hand:
                return False
        elif self.give_back or self.unsaved:
            yield from self._send_now([])
        events = yield WaitForEvent(self._event_timeout(), self._wants_work())
        if isinstance(events, Interrupted):
            self.stopping = True
            return False
        yield from self._on_events(events)
        return False

    def _free(self) -> int:
        """Slots free for jobs not in hand yet."""
        return self.slots - len(self.running) - len(self.hand)

    def _wants_work(self) -> bool:
        return not self._leaving() and self._free() > 0

    def _fill(self) -> Generator[Command, Any, None]:
        """Start jobs from the hand while a slot is free (a job that waited too long is given back):
        their start marks in one write, their starts told to the master in one write."""
        starting: list[HeldJob] = []
        job: HeldJob | None = None
        try:
            while self.hand and len(self.running) + len(starting) < self.slots and not self.retiring:
                job = self.hand.popleft()
                if self._waited_too_long(job):
                    self.give_back.append((job.job_id, job.token))
                    continue
                # A job that must not run twice starts once Redis has its mark; given back if not.
                if job.prefetched and _must_not_run_twice(job) and not (yield from self._mark_start(job)):
                    continue
                starting.append(job)
                job = None
                if self.max_jobs and self.pace.jobs_done + len(self.running) + len(starting) >= self.max_jobs:
                    log.info("worker %d retiring after %d jobs (max_jobs_per_worker)", self.number,
                             self.max_jobs)
                    self.retiring = True
            marks = [j for j in starting if j.prefetched and not _must_not_run_twice(j)]
            if marks:
                yield from self._push_journal([self._start_mark(j) for j in marks], [], ())
        except _Interrupted:
            # A stop cut a backoff short before these started: they go back.
            self.stopping = True
            held = starting + ([job] if job is not None else [])
            self.give_back += [(j.job_id, j.token) for j in held]
            return
        if not starting:
            return
        now = self.clock()
        yield Tell(tuple(self._started(j, now) for j in starting))
        ended = []
        for job in starting:
            self.running[job.job_id] = Running(job, now, _options(job.fields).get("hotjob") is True)
            self.deadlines[job.job_id] = now + _process_timeout(_options(job.fields))
            result = yield Start(job)
            if result is not None:  # the handler ran to its end right there
                ended.append(result)
        if ended:
            yield from self._on_events(ended)

    def _expire_hand(self) -> None:
        """Give back the jobs in hand that waited too long for a slot."""
        if self.hand and any(self._waited_too_long(j) for j in self.hand):
            kept: deque[HeldJob] = deque()
            for j in self.hand:
                if self._waited_too_long(j):
                    self.give_back.append((j.job_id, j.token))
                else:
                    kept.append(j)
            self.hand = kept

    def _expire_deadlines(self) -> Generator[Command, Any, None]:
        """Cancel the runs past their process_timeout; one that cannot be cancelled (a thread) is
        left to the master, which kills the worker at the deadline and its kill grace."""
        if not self.deadlines:
            return
        now = self.clock()
        for job_id, deadline in list(self.deadlines.items()):
            if deadline > now or job_id in self.cancelled or job_id in self.left_to_master:
                continue
            run = self.running.get(job_id)
            about = job_extra(job_id, run.job.fields.get("name") if run is not None else None)
            if (yield Cancel(job_id)):
                log.warning("worker %d: job %s passed its process_timeout: cancelled", self.number, job_id,
                            extra=about)
                self.cancelled.add(job_id)
            else:
                log.warning("worker %d: job %s passed its process_timeout and cannot be cancelled "
                            "(a thread): the master kills the worker", self.number, job_id, extra=about)
                self.left_to_master.add(job_id)

    def _event_timeout(self) -> float:
        """How long to wait for an event: until the next deadline, the renewal of the idle
        registration, or a job in hand waiting too long; at most wait_timeout."""
        now = self.clock()
        until = now + self.wait_timeout
        for job_id, deadline in self.deadlines.items():
            if deadline < until and job_id not in self.cancelled and job_id not in self.left_to_master:
                until = deadline
        for job in self.hand:
            if job.prefetched:
                until = min(until, job.claimed_at + MAX_PREFETCH_WAIT)
        if self.registered and self._free() > 0 and not self._leaving():
            until = min(until, self.registered_at + self.wait_timeout)
        return max(0.0, until - now)

    def _dense_want(self) -> int:
        """Jobs to claim: the free slots, and about PREFETCH_WINDOW of work ahead (within max_jobs)."""
        want = self._free() + self.pace.ahead(self.slots)
        if self.max_jobs:
            want = min(want, self.max_jobs - self.pace.jobs_done - len(self.running) - len(self.hand))
        return max(0, want)

    def _needs_claim(self) -> bool:
        """A free slot and no idle registration (or one to renew); or every slot busy, few jobs in
        hand and the last claim got all it asked."""
        if self._leaving():
            return False
        if self._free() > 0:
            return not self.registered or self.clock() - self.registered_at >= self.wait_timeout
        ahead = self.pace.ahead(self.slots)
        return not self.dry and ahead > 0 and len(self.hand) <= ahead // 2 and self._dense_want() > 0

    def _claim(self, runs: list[FinishedRun] = ()) -> Generator[Command, Any, tuple[int, int]]:  # type: ignore[assignment]
        """Claim (with the outcomes to send) and read the reply at once: free slots wait for it.
        Registers for hand-offs should nothing come while a slot is free. Back: (wanted, got)."""
        want = self._dense_want()
        free = self._free() > 0
        before = len(self.hand)
        sent, self.unsaved = self.unsaved + list(runs), []
        yield from self._send(sent, want, idle=free)
        self.registered = False  # the call ends any registration; its reply says if it made one
        if self.inflight:
            yield from self._settle()
        got = len(self.hand) - before
        self.dry = got < want
        if self.registered:
            self.registered_at = self.clock()
        return want, got

    def _send_now(self, runs: list[FinishedRun]) -> Generator[Command, Any, None]:
        """A finish_many that claims nothing: these outcomes, those to send again, the give-backs."""
        sent, self.unsaved = self.unsaved + runs, []
        yield from self._send(sent, 0, idle=False)
        self.registered = False  # the call ends the idle registration

    def _on_events(self, events: list[Any]) -> Generator[Command, Any, None]:
        """Runs that ended (the F messages in one write, then their outcomes saved) and work that
        arrived (a hand-off to start, a wake token: claim now)."""
        dones: list[FinishedRun] = []
        told: list[Message] = []
        woke: str | None = None
        for event in events:
            if isinstance(event, Ended):
                run = self.running.pop(event.job_id, None)
                if run is None:
                    continue
                self.deadlines.pop(event.job_id, None)
                self.left_to_master.discard(event.job_id)
                ghost = TIMED_OUT if event.job_id in self.cancelled else None
                self.cancelled.discard(event.job_id)
                done, finished = self._ended(run, event.outcome, ghost)
                dones.append(done)
                told.append(finished)
            elif isinstance(event, Arrived):
                self.dry = False
                if event.handoff is not None:
                    self.registered = False  # the hand-off ended the registration
                    handed = scripts.parse_handoff(event.handoff)
                    if handed is not None:
                        job_id, token, fields = handed
                        self.hand.append(HeldJob(job_id, token, fields, self.clock(), True))
                if event.wake is not None:
                    woke = event.wake
        if told:
            yield Tell(tuple(told))
            if not self.retiring and self.max_memory and self.memory() > self.max_memory:
                log.info("worker %d retiring: RSS %d bytes > max_memory_per_worker", self.number,
                         self.memory())
                self.retiring = True
        if woke is not None and not self._leaving():
            # Claimed at once, the token's job among them; a claim also takes a token per job, so
            # the one taken here goes back when the claim got all it asked (more may be waiting).
            self.registered = False
            want, got = yield from self._claim(dones)
            if not want or got >= want:
                yield ReturnToken(woke)
            return
        if woke is not None:
            yield ReturnToken(woke)
        if not dones:
            return
        # The journal only while jobs are in hand: a claim that ends it follows soon (after they
        # start: they need not wait for its reply). Registered (no claim until the renewal) or
        # leaving (none at all), the outcomes go in a call now.
        if not self._leaving() and not self.hand and (self.registered or self._needs_claim()):
            yield from self._claim(dones)
        elif self._leaving() or self.unsaved or self.give_back or any(d.urgent for d in dones):
            yield from self._send_now(dones)
        else:
            entries = [scripts.journal_entry(d.job_id, d.token, d.outcome, d.payload, d.run_ms,
                                             d.ended_at * 1000) for d in dones]
            if (yield from self._push_journal(entries, dones, ())):
                self.journal.ids += [(d.job_id, d.token) for d in dones]
                self.journal.pending += len(dones)

    def _dense_idle(self) -> Generator[Command, Any, None]:
        """Nothing runs and nothing is in hand: claim at once if runs ended a moment ago, else as a
        one-job worker does (claim one, then block on the inbox and the wake tokens)."""
        claimed_nothing = False
        if self.inflight:
            claimed_nothing = any(call.want for call in self.inflight if isinstance(call, FinishMany))
            if not (yield from self._settle()):
                return
        if self.claims_lost or self.hand:
            return  # the next round reads the claim record, or starts what came
        if self.pace.busy(self.clock()) and not claimed_nothing and not self.dry:
            yield from self._claim()
            if self.hand:
                return
        elif self.unsaved or self.give_back or self.journal.pending:
            yield from self._send_now([])
            if self.inflight:
                yield from self._settle()
            if self.hand:
                return
        yield ShowIdle()
        claimed = yield from self._next_job()
        if claimed is not None:
            job_id, token, fields = claimed
            self.hand.append(HeldJob(job_id, token, fields, self.clock(), "run_start" not in fields))
            self.dry = False

    def _dense_leave(self) -> Generator[Command, Any, None]:
        """No work is taken for the worker any more; what was taken goes back with the hand."""
        try:
            handed = yield TakeArrived()
        except _Interrupted:
            handed = []
        for raw in handed or ():
            got = scripts.parse_handoff(raw)
            if got is not None:
                self.hand.append(HeldJob(got[0], got[1], got[2], self.clock(), True))
        yield from self._leave()

    # --- small decisions -------------------------------------------------------------------------------

    def _should_retire(self) -> bool:
        if self.stopping:
            return True
        if self.max_jobs and self.pace.jobs_done >= self.max_jobs:
            log.info("worker %d retiring after %d jobs (max_jobs_per_worker)", self.number,
                     self.pace.jobs_done)
            return True
        if self.max_memory:
            rss = self.memory()
            if rss > self.max_memory:
                log.info("worker %d retiring: RSS %d bytes > max_memory_per_worker", self.number, rss)
                return True
        return False

    def _last_job_before_retiring(self) -> bool:
        """Checked before claiming: if the worker retires after its current job, claim no other."""
        if self.stopping or (self.max_jobs and self.pace.jobs_done >= self.max_jobs):
            return True
        return bool(self.max_memory and self.memory() > self.max_memory)

    def _starts_next(self) -> HeldJob | None:
        """The job the loop starts right after this one's save, if nothing can stop it: in hand, not
        waiting too long to be given back, not waiting for Redis to have its start mark."""
        if not self.hand or self.stopping:
            return None
        job = self.hand[0]
        if self._waited_too_long(job) or (job.prefetched and _must_not_run_twice(job)):
            return None
        return job

    def _waited_too_long(self, job: HeldJob) -> bool:
        """A job claimed ahead that waited so long it is given back instead of started."""
        return job.prefetched and self.clock() - job.claimed_at > MAX_PREFETCH_WAIT


def _transient(reply: Exception) -> bool:
    """Refused for now (OOM at maxmemory, loading, a busy script): the call is made again."""
    return isinstance(reply, redis.exceptions.BusyLoadingError) or scripts.is_out_of_memory(reply) \
        or str(reply).startswith("BUSY")


def _age_seconds(stamp_ms: str | None, now_ms: int) -> float:
    """Seconds from a time Redis stamped (ms) to `now_ms`; unknown counts as too old to start."""
    try:
        return max(0.0, (now_ms - int(stamp_ms or "")) / 1000)
    except ValueError:
        return float("inf")


def _must_not_run_twice(job: HeldJob) -> bool:
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
