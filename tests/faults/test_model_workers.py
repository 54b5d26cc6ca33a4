"""Case 11b: the workers' protocol, model-checked: a Hypothesis state machine of supervisors, their
workers and the reaper, driving the Lua scripts as they do, against a plain-Python reference model.

Three workers (two in supervisor A, one in B), each with a claimer id, hold what a real one holds:
jobs claimed ahead (a finish_many batch, a hand-off) or claimed to start at once (claim.lua), the job
it runs, outcomes its handler gave that have not left it yet, jobs to give back; its master holds
what the worker told it (the S and F messages: the run it saw start, the outcomes it retained).
Each step is one of (STEPS, drawn among those that can happen): a create (each job handed off to
an idle worker, queued or delayed); time passing (idle registrations lapse, leases expire), then the
reaper's recover or promote; purge, delete, requeue; a worker's claim with its claimer (an idle
registration when it finds nothing; after its BLPOP took a wake token or timed out), its BLPOP
taking a hand-off from its inbox, a start mark RPUSHed alone, the start of a job (its S to the
master, before or after its mark), a job claimed ahead put aside to give back, its handler returning
(F to the master, with the outcome or without: too big), an outcome RPUSHed to the journal (the next
job's mark riding along or not), finish_many (the runs in hand, give-backs, 0-3 claims, an idle
registration when it gets none); a death: a worker retiring (its last finish_many, then its
master's abandon), a worker killed (the master ghosts the run it saw start and has no outcome for,
token-checked, then abandons with the outcomes it retained; the worker's last command, a journal
push or a finish_many, may reach Redis after that), a whole supervisor killed (nothing settles for
its workers), or everything killed and the reaper recovering every lease.

After every step Redis must equal the model: every job's stored fields (state, attempt, runs,
run_start, owner, at_once, lost, result, errors, times), every structure with its order and scores,
the wake tokens, the counts, and each claimer's claim record, journal, inbox and idle registrations;
the harness's invariants must hold (one structure per job, leases, no orphans, terminal states kept).
And the delivery guarantee is checked against what really happened to each attempt (a claim): it
ends at most once; a run whose handler may have begun is never given back uncounted; an outcome
that reached the journal, or that the master retained, is the one recorded, never a ghost; a job
claimed ahead whose start the master never heard of is never ghosted by abandon, and by recover only
when its start mark had reached Redis or it was lost more than MAX_LOST_PREFETCHED times; once
everything has died and the reaper has recovered every lease, nothing is processing, no inbox holds
a job, and every run that began has ended.

Left out: a worker's death in the moment between its S for the next job (sent with the last job's F)
and the finish_many that carries the last job's outcome when that was too big for the F message. Its
master ghosts only the run in progress, so abandon gives the last job back although it ran (a known
gap of the supervisor, docs/reliability.md): here a worker sends such an outcome before its next S.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from kickq.config import JOB_OPTION_DEFAULTS
from kickq.job import queue_reads, read_fields
from kickq.keys import Keys
from kickq.scripts import (
    LEASE_GRACE_MS,
    Scripts,
    create_args,
    journal_entry,
    parse_claim_record,
    parse_handoff,
    run_token,
)
from tests.faults.harness import Case, Checker, snapshot, sizes
from tests.structures import assert_consistent
from tests.test_scripts import Machine

T0 = 1_700_000_000_000
NAMES = ("a", "b")
WORKER_NAMES = (("a", "b"), ("b",), ("b", "a"))  # each worker's registration, in priority order
SUPERVISOR_OF = (0, 0, 1)  # workers 0 and 1 are supervisor A's, worker 2 is B's
IDLE_MS = 1500  # a registration's life: the worker's BLPOP timeout + 0.5 s
MAX_LOST_PREFETCHED = 2  # recover.lua
RECOVER_ERROR = "lease expired: its worker or supervisor was lost"
KILLED = "worker died: killed by SIGKILL"
ABANDONED = "worker died right after claiming the job: killed by SIGKILL"
PRESETS: list[dict[str, Any] | None] = [
    None,
    {"retry": True, "retry_count": 1, "retry_interval": 0.5},
    {"process_timeout": 0.5, "ghost_interval": 1, "ghost_count": 2, "purge_timeout": 2},
    {"ghost_retry": False, "purge_timeout": 0},
    {"process_timeout": 1.5, "ghost_count": 0, "retry": True, "retry_count": 0},
]


def ms(seconds: float) -> int:
    return math.floor(seconds * 1000 + 0.5)  # as ms() in lua/_lib.lua


def ago_ms(ago: float) -> int:
    return math.floor(min(max(ago, 0), 60000) + 0.5)  # as finish_one and mark_started clamp it


Attempt = tuple[str, str]  # (job id, attempt token): one claim of a job


@dataclass
class MJob:
    """A job as its record in Redis holds it (None: the field is absent)."""

    id: str
    name: str
    stored_opts: str
    opts: dict[str, Any]
    state: str
    create_time: int
    packed: bool = False  # created straight into its queue, never claimed: an entry of P.."newjobs"
    update_time: int | None = None
    attempt: int | None = None
    runs: list[dict[str, Any]] | None = None
    run_start: int | None = None
    owner: str | None = None
    at_once: str | None = None  # claimed to start at once by a claimer: abandon ghosts it
    lost: int | None = None
    scheduled_for: int | None = None
    result: str | None = None
    last_error: str | None = None
    finish_time: int | None = None
    total_process_time: int | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "create_time": str(self.create_time), "state": self.state}
        if self.stored_opts:
            out["opts"] = self.stored_opts
        for key in ("update_time", "attempt", "run_start", "owner", "at_once", "lost", "scheduled_for",
                    "result", "last_error", "finish_time", "total_process_time"):
            value = getattr(self, key)
            if value is not None:
                out[key] = str(value)
        if self.runs is not None:
            out["runs"] = self.runs
        return out

    @property
    def token(self) -> str | None:
        """Its current attempt token (run_token in lua/_lib_claim.lua); None: never claimed."""
        return None if self.attempt is None else f"{self.attempt}:{self.create_time}"


@dataclass
class End:
    """How an attempt ended, and which transition ended it."""

    how: str  # success | fail | ghost | released | deleted
    by: str
    lost: int  # the job's lost count then (recover's give-backs of a job whose start was not known)


class Model:
    """What the scripts do, in plain Python, with the per-claimer keys of the hand-off and batches."""

    def __init__(self) -> None:
        self.jobs: dict[str, MJob] = {}
        self.queues: dict[str, list[str]] = {n: [] for n in NAMES}
        self.wake: dict[str, int] = {n: 0 for n in NAMES}
        self.delayed: dict[str, int] = {}
        self.processing: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.records: dict[str, list[tuple[str, str]]] = {}  # P.."claim:"..claimer
        self.journals: dict[str, list[list[Any]]] = {}  # P.."done:"..claimer, decoded
        self.inboxes: dict[str, list[tuple[str, str]]] = {}  # P.."inbox:"..claimer: (id, token)
        self.idle: dict[str, dict[str, int]] = {n: {} for n in NAMES}  # name -> claimer -> expiry
        self.idlers: dict[str, list[str]] = {}  # P.."idler:"..claimer
        self.next_id = 1
        self.by = ""  # the transition running
        self.claims: list[tuple[Attempt, bool]] = []  # new attempts since last read: prefetched?
        self.ends: dict[Attempt, End] = {}
        self.new_ends: list[Attempt] = []
        self.older_handed = 0  # hand-offs of a job that waited in the queue, not of the new one

    # --- helpers ---------------------------------------------------------------------------------
    def _ended(self, job: MJob, how: str) -> None:
        assert job.token is not None, f"job {job.id} ends an attempt it never had"
        attempt = (job.id, job.token)
        assert attempt not in self.ends, f"attempt {attempt} ends twice: {self.ends[attempt]}, then {how}"
        self.ends[attempt] = End(how, self.by, job.lost or 0)
        self.new_ends.append(attempt)

    def _reconcile(self, names: list[str]) -> None:
        for name in names:
            self.wake[name] = len(self.queues[name])

    def _push_queued(self, job: MJob, front: bool = False) -> None:
        self.queues[job.name].insert(0, job.id) if front else self.queues[job.name].append(job.id)
        self.wake[job.name] += 1

    def _enqueue(self, job: MJob, now: int) -> None:
        job.state, job.update_time, job.scheduled_for = "queued", now, None
        self._push_queued(job)

    def _schedule(self, job: MJob, state: str, due: int, now: int) -> None:
        job.state, job.scheduled_for, job.update_time = state, due, now
        self.delayed[job.id] = due

    def _finalise(self, job: MJob, state: str, now: int) -> None:
        purge_at = now + ms(job.opts["purge_timeout"])
        job.state, job.finish_time, job.update_time = state, now, now
        job.total_process_time = sum(run["time"] for run in job.runs or [])
        job.scheduled_for = purge_at
        self.finished[job.id] = purge_at

    def _remove(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        if job.state in ("new", "queued"):
            self.queues[job.name].remove(job_id)
        if job.state == "processing":
            self.by, by = "delete", self.by
            self._ended(job, "deleted")
            self.by = by
        for zset in (self.delayed, self.processing, self.finished):
            zset.pop(job_id, None)

    @staticmethod
    def _due(zset: dict[str, int], now: int, limit: int) -> list[str]:
        # ZRANGEBYSCORE: by score, then by member as a byte string
        return sorted((i for i, s in zset.items() if s <= now), key=lambda i: (zset[i], i))[:limit]

    def owns(self, job_id: str, token: Any, claimer: str) -> tuple[str | None, bool]:
        """owns() in _lib.lua: the job's state, and whether `claimer` may end this attempt."""
        job = self.jobs.get(job_id)
        if job is None:
            return None, False
        if job.packed:
            return "new", False
        mine = (job.state == "processing" and job.token is not None and job.token == str(token)
                and not (claimer and job.owner and job.owner != claimer))
        return job.state, mine

    # --- runs -------------------------------------------------------------------------------------
    def claim_job(self, job_id: str, now: int, claimer: str, prefetched: bool) -> tuple[str, str] | None:
        job = self.jobs[job_id]
        if job.state not in ("new", "queued"):
            return None
        job.packed = False
        job.attempt = (job.attempt or 0) + 1
        job.state, job.update_time = "processing", now
        if prefetched:
            job.owner = claimer
        else:
            job.run_start = now
            if claimer:
                job.owner, job.at_once = claimer, "1"
        self.processing[job_id] = now + ms(job.opts["process_timeout"]) + LEASE_GRACE_MS
        token = job.token
        assert token is not None
        if claimer and not prefetched:
            self.records[claimer] = [(job_id, token)]
        self.claims.append(((job_id, token), prefetched))
        return job_id, token

    def claim(self, names: list[str], now: int, claimer: str, chained: bool = False,
              prefetched: bool = False) -> tuple[str, str] | None:
        for name in names:
            queue = self.queues[name]
            while queue:
                got = self.claim_job(queue.pop(0), now, claimer, prefetched)
                if got:
                    if chained:
                        self.wake[name] = max(0, self.wake[name] - 1)
                    else:
                        self._reconcile(names)
                    return got
        if not chained:
            self._reconcile(names)
        return None

    def end_run(self, job_id: str, now: int, outcome: str, payload: str, run_ms: int | None) -> str:
        job = self.jobs[job_id]
        del self.processing[job_id]
        runs = job.runs or []
        if run_ms is not None:
            start = now - run_ms
        else:
            start = job.run_start if job.run_start is not None else now
        runs.append({"count": len(runs) + 1, "start": start, "time": now - start, "state": outcome,
                     "error": None if outcome == "success" else payload})
        job.runs, job.run_start, job.owner, job.at_once = runs, None, None, None
        self._ended(job, outcome)
        if outcome == "success":
            if payload:
                job.result = payload
            self._finalise(job, "success", now)
        elif outcome == "fail":
            job.last_error = payload
            failed = sum(1 for r in runs if r["state"] == "fail")
            if job.opts["retry"] and failed <= job.opts["retry_count"]:
                interval = job.opts["retry_interval"]
                if isinstance(interval, list):
                    interval = interval[min(failed, len(interval)) - 1]
                self._schedule(job, "retry", now + ms(interval), now)
            else:
                self._finalise(job, "fail", now)
        else:
            job.last_error = payload
            ghosts = sum(1 for r in runs if r["state"] == "ghost")
            if job.opts["ghost_retry"] and ghosts <= job.opts["ghost_count"]:
                self._schedule(job, "ghost", now + ms(job.opts["ghost_interval"]), now)
            else:
                self._finalise(job, "fail", now)
        return job.state

    def release(self, job_id: str, now: int) -> None:
        job = self.jobs[job_id]
        del self.processing[job_id]
        self._ended(job, "released")
        job.state, job.update_time, job.run_start, job.owner, job.at_once = "queued", now, None, None, None
        self._push_queued(job, front=True)

    def finish_one(self, now: int, claimer: str, job_id: str, token: Any, outcome: str, payload: str,
                   run_ms: float | None, ago: float) -> tuple[str, str]:
        state, mine = self.owns(job_id, token, claimer)
        if state is None:
            return "missing", ""
        if not mine:
            return "stale", state
        ended = now - ago_ms(ago)
        return "ok", self.end_run(job_id, ended, outcome, payload,
                                  None if run_ms is None else math.floor(run_ms + 0.5))

    def mark_started(self, claimer: str, job_id: str, token: str, now: int, ago: float | None) -> None:
        _, mine = self.owns(job_id, token, claimer)
        job = self.jobs.get(job_id)
        if not mine or job is None or job.run_start is not None:
            return
        if ago is not None:
            job.run_start = now - ago_ms(ago)
        else:
            job.run_start = job.update_time if job.update_time is not None else now

    def apply_journal(self, claimer: str, now: int, mono_now: float | None, marks: bool,
                      ending: set[tuple[str, str]] | None = None
                      ) -> tuple[list[tuple[str, str, str, str]], set[tuple[str, str]]]:
        entries = self.journals.pop(claimer, [])
        ended = ending if ending is not None else set()
        ended.update((str(e[0]), str(e[1])) for e in entries if e[2] != "start")
        rejected = []
        for e in entries:
            job_id, token = str(e[0]), str(e[1])
            ago = mono_now - e[5] if mono_now is not None and e[5] is not None else None
            if e[2] == "start":
                if marks and (job_id, token) not in ended:
                    self.mark_started(claimer, job_id, token, now, ago)
            else:
                status, state = self.finish_one(now, claimer, job_id, token, e[2], e[3] or "", e[4], ago or 0)
                if status != "ok":
                    rejected.append((job_id, token, status, state))
        return rejected, ended

    # --- per-claimer keys -------------------------------------------------------------------------
    def record_claims(self, claimer: str, pairs: list[tuple[str, str]],
                      ended: set[tuple[str, str]] | None = None) -> None:
        held = [p for p in self.records.get(claimer, [])
                if not (ended and p in ended) and self.owns(p[0], p[1], claimer)[1]]
        held += pairs
        if held:
            self.records[claimer] = held
        else:
            self.records.pop(claimer, None)

    def unidle(self, claimer: str) -> None:
        for name in self.idlers.pop(claimer, []):
            self.idle[name].pop(claimer, None)

    def register_idle(self, claimer: str, names: list[str], now: int, ttl_ms: int) -> None:
        self.record_claims(claimer, [])
        for name in names:
            self.idle[name][claimer] = now + ttl_ms
        self.idlers[claimer] = list(names)

    def take_inbox(self, claimer: str, limit: int) -> list[tuple[str, str]]:
        box = self.inboxes.get(claimer, [])
        taken = []
        while len(taken) < limit and box:
            job_id, token = box.pop(0)
            if self.owns(job_id, token, claimer)[1]:
                taken.append((job_id, token))
        if not box:
            self.inboxes.pop(claimer, None)
        return taken

    def release_inbox(self, claimer: str, now: int) -> int:
        released = 0
        for job_id, token in reversed(self.inboxes.pop(claimer, [])):
            if self.owns(job_id, token, claimer)[1]:
                self.release(job_id, now)
                released += 1
        return released

    def hand_off(self, job: MJob, now: int) -> None:
        registered = self.idle[job.name]
        for lapsed in [c for c, expiry in registered.items() if expiry < now]:
            del registered[lapsed]
        if not registered:
            self._push_queued(job)
            return
        claimer = min(registered, key=lambda c: (registered[c], c))
        self.unidle(claimer)
        if not self.queues[job.name]:
            got = self.claim_job(job.id, now, claimer, True)
        else:
            self._push_queued(job)
            got = self.claim([job.name], now, claimer, prefetched=True)
            self.older_handed += 1
        assert got is not None
        self.record_claims(claimer, [got])
        self.inboxes.setdefault(claimer, []).append(got)

    # --- the scripts --------------------------------------------------------------------------------
    def create(self, name: str, opts: dict[str, Any] | None, delay: int | None, now: int) -> str:
        self.by = "create"
        job_id = str(self.next_id)
        self.next_id += 1
        job = MJob(job_id, name, json.dumps(opts) if opts else "", {**JOB_OPTION_DEFAULTS, **(opts or {})},
                   "new", now)
        self.jobs[job_id] = job
        if delay is None:
            job.packed = True
            self.hand_off(job, now)
        else:
            job.state, job.scheduled_for = "delayed", now + delay
            self.delayed[job_id] = now + delay
        return job_id

    def claim_script(self, claimer: str, idle_ms: int, names: list[str], now: int) -> tuple[str, str] | None:
        self.by = "claim"
        if claimer:
            self.unidle(claimer)
            handed = self.take_inbox(claimer, 1)
            if handed:
                self._reconcile(names)
                return handed[0]
        got = self.claim(names, now, claimer)
        if not got and claimer and idle_ms > 0:
            self.register_idle(claimer, names, now, idle_ms)
        return got

    def finish_many(self, claimer: str, now: int, mono_now: float, runs: list[tuple[Any, ...]],
                    give_back: list[tuple[str, str]], wanted: int, idle_ms: int, names: list[str]
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str, str, str]]]:
        self.by = "finish_many"
        self.unidle(claimer)
        ending = {(str(r[0]), str(r[1])) for r in runs}
        rejected, ended = self.apply_journal(claimer, now, mono_now, True, ending)
        statuses = [self.finish_one(now, claimer, *r) for r in runs]
        for job_id, token in reversed(give_back):
            if self.owns(job_id, token, claimer)[1]:
                self.release(job_id, now)
        claimed = self.take_inbox(claimer, 100)
        record = []
        for _ in range(len(claimed), wanted):
            got = self.claim(names, now, claimer, chained=True, prefetched=True)
            if not got:
                break
            claimed.append(got)
            record.append(got)
        if record:
            self.record_claims(claimer, record, ended)
        if wanted > 0 and not claimed and idle_ms > 0:
            self.register_idle(claimer, names, now, idle_ms)
        return statuses, claimed, rejected

    def finish(self, job_id: str, token: str, outcome: str, payload: str, claimer: str, run_ms: int | None,
               now: int) -> tuple[str, str]:
        self.by = "master"
        return self.finish_one(now, claimer, job_id, token, outcome, payload, run_ms, 0)

    def abandon(self, claimer: str, error: str, runs: list[tuple[Any, ...]], mono_now: float,
                now: int) -> tuple[int, int, int]:
        self.by = "abandon"
        self.unidle(claimer)
        self.apply_journal(claimer, now, mono_now, False)
        saved = sum(1 for r in runs if self.finish_one(now, claimer, *r)[0] == "ok")
        given_back, ghosted = self.release_inbox(claimer, now), 0
        for job_id, token in reversed(self.records.get(claimer, [])):
            if self.owns(job_id, token, claimer)[1]:
                if self.jobs[job_id].at_once is None:
                    self.release(job_id, now)
                    given_back += 1
                else:
                    self.end_run(job_id, now, "ghost", error, None)
                    ghosted += 1
        return saved, given_back, ghosted

    def recover(self, now: int, limit: int) -> int:
        self.by = "recover"
        ids = self._due(self.processing, now, limit)
        for job_id in ids:
            job = self.jobs.get(job_id)
            owner = job.owner if job else None
            if owner:
                self.apply_journal(owner, now, None, True)
                self.unidle(owner)
                self.release_inbox(owner, now)
            if job_id not in self.processing:
                continue
            assert job is not None
            if job.run_start is None:
                job.lost = (job.lost or 0) + 1
                if job.lost <= MAX_LOST_PREFETCHED:
                    self.release(job_id, now)
                    continue
            self.end_run(job_id, now, "ghost", RECOVER_ERROR, None)
        return len(ids)

    def promote(self, now: int, limit: int) -> int:
        self.by = "promote"
        ids = self._due(self.delayed, now, limit)
        for job_id in ids:
            del self.delayed[job_id]
            self._enqueue(self.jobs[job_id], now)
        return len(ids)

    def purge(self, now: int, limit: int) -> int:
        self.by = "purge"
        ids = self._due(self.finished, now, limit)
        for job_id in ids:
            self._remove(job_id)
        return len(ids)

    def delete(self, job_id: str) -> bool:
        if job_id not in self.jobs:
            return False
        self._remove(job_id)
        return True

    def requeue(self, job_id: str, now: int) -> str:
        job = self.jobs.get(job_id)
        if job is None:
            return "missing"
        if job.state != "fail":
            return "not_failed"
        del self.finished[job_id]
        job.finish_time = job.total_process_time = None
        self._enqueue(job, now)
        return "ok"


# --- the processes ------------------------------------------------------------------------------------


@dataclass
class Held:
    """A job in a worker's hands, not started yet."""

    id: str
    token: str
    prefetched: bool  # claimed ahead (a batch, a hand-off): no run_start until its start mark
    marked: bool = False  # its start mark went to the journal


@dataclass
class Done:
    """An outcome the handler gave, not yet sent to Redis."""

    id: str
    token: str
    outcome: str
    payload: str
    run_ms: int
    ended_at: int
    urgent: bool  # too big for the F message: it goes by finish_many, never by the journal


@dataclass
class Seen:
    """The master's view of its worker's current run, from the S and F messages."""

    id: str
    token: str
    started: int
    returned: bool = False
    retained: bool = False


@dataclass
class Worker:
    slot: int
    names: tuple[str, ...]
    claimer: str
    ready: list[Held] = field(default_factory=list)
    running: Held | None = None
    started: int = 0
    unsent: list[Done] = field(default_factory=list)
    give_back: list[tuple[str, str]] = field(default_factory=list)
    journaled: int = 0  # outcomes journaled since its last finish_many (which ends their runs)
    seen: Seen | None = None  # the master's
    unsaved: dict[str, tuple[str, str, str, int, int]] = field(default_factory=dict)  # the master's

    def idle(self) -> bool:
        return not (self.ready or self.running or self.unsent or self.give_back or self.journaled)


@dataclass
class Truth:
    """What really happened to one attempt, outside Redis."""

    prefetched: bool
    announced: bool = False  # S reached the master
    marked: bool = False  # its start mark was RPUSHed
    began: bool = False  # the handler may have begun (announced, and marked if claimed ahead)
    outcome: str | None = None  # the handler returned this
    journaled: bool = False  # that outcome was RPUSHed to the journal
    retained: bool = False  # the master holds that outcome (F message)


class WorkersMachine(RuleBasedStateMachine):
    """Supervisors, workers and the reaper against the model. `r` is set on the class by the test."""

    r: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.ns = f"kt-smw-{uuid.uuid4().hex[:8]}"
        self.keys = Keys(self.ns)
        self.s = Scripts(self.r)
        self.model = Model()
        self.now = T0
        self.generation = 0
        self.claimers: list[str] = []
        self.workers = [self._spawn(slot) for slot in range(len(WORKER_NAMES))]
        self.truth: dict[Attempt, Truth] = {}
        self.checker = Checker()
        self.steps = 0
        self.seen: Counter[str] = Counter()  # what the example went through, for the case's notes

    def teardown(self) -> None:
        keys = list(self.r.scan_iter(match="{" + self.ns + "}:*", count=1000))
        if keys:
            self.r.delete(*keys)

    def _spawn(self, slot: int) -> Worker:
        self.generation += 1
        claimer = f"w{slot}g{self.generation}"
        self.claimers.append(claimer)
        return Worker(slot, WORKER_NAMES[slot], claimer)

    def _attempt(self, job_id: str, token: str) -> Truth | None:
        return self.truth.get((job_id, token))

    # --- one step: what happens next, drawn among what can happen ------------------------------------
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """One thing happens, drawn (by the weights of STEPS) among those that can happen now. One
        rule rather than one per kind: Hypothesis' swarm testing switches each rule off in about half
        the examples, which starves a run of a job (claim, start, handler, save) of its steps."""
        possible = [what for what in STEPS if self._can(what)]
        what = data.draw(st.sampled_from(possible), label="step")
        if what in WORKER_STEPS:
            pool = [w.slot for w in self.workers if WORKER_STEPS[what](self, w)]
            w = self.workers[data.draw(st.sampled_from(pool), label="worker")]
            getattr(self, "_" + re.sub(r"\W", "_", what))(w, data)
        else:
            getattr(self, "_" + what)(data)

    def _can(self, what: str) -> bool:
        if what in WORKER_STEPS:
            return any(WORKER_STEPS[what](self, w) for w in self.workers)
        if what == "create":  # a few jobs waiting or running at a time: the workers keep up
            return sum(j.state in ("new", "queued", "processing") for j in self.model.jobs.values()) < 6
        if what == "housekeeping":
            return bool(self.model.finished)
        if what == "death":
            return bool(self.model.processing)
        return True

    # --- producers, admin, time -----------------------------------------------------------------------
    def _create(self, data: st.DataObject) -> None:
        """A producer's create of one job or a batch (each handed to an idle worker, queued or delayed)."""
        jobs = data.draw(st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, len(PRESETS) - 1),
                                            st.sampled_from([None, None, None, 0, 1000])),
                                  min_size=1, max_size=3), label="jobs (name, preset, delay)")
        items = [(name, "", json.dumps(PRESETS[preset]) if PRESETS[preset] else "", delay)
                 for name, preset, delay in jobs]
        handed = sum(len(box) for box in self.model.inboxes.values())
        reply = self.s.run("create", create_args(self.keys, items, self.now))
        expected = [self.model.create(name, PRESETS[preset], delay, self.now) for name, preset, delay in jobs]
        assert [str(job_id) for job_id in reply[::2]] == expected
        self.seen["create"] += len(jobs)
        self.seen["hand-off"] += sum(len(box) for box in self.model.inboxes.values()) - handed
        self.seen["hand-off of an older waiting job"] += self.model.older_handed
        self.model.older_handed = 0

    def _housekeeping(self, data: st.DataObject) -> None:
        """The reaper's purge; the admin's delete and requeue (`kickq retry`)."""
        action = data.draw(st.sampled_from(["purge", "delete", "requeue"]), label="housekeeping")
        if action == "purge":
            count, _ = self.s.purge(self.keys, now=self.now, limit=500)
            assert count == self.model.purge(self.now, 500)
            return
        job = str(data.draw(st.integers(1, self.model.next_id), label="job"))
        if action == "delete":
            assert self.s.delete(self.keys, job) == self.model.delete(job)
        else:
            status, _ = self.s.run("requeue", (self.keys.script_keys, [self.keys.prefix, self.now, job]))
            assert status == self.model.requeue(job, self.now)
            if status == "ok":  # the one transition out of a terminal state
                self.checker.terminal.pop(job, None)

    def _time(self, data: st.DataObject) -> None:
        """Time passes (idle registrations lapse, leases expire, delays fall due), then the reaper
        recovers expired leases (all, or one) or promotes due jobs."""
        self.now += data.draw(st.sampled_from([0, 1, 250, 1000, 1500, 2500, 12_000, 1_800_000]), label="ms")
        reaper = data.draw(st.sampled_from(["recover", "recover", "recover one", "promote", None]),
                           label="reaper")
        if reaper == "promote":
            count, _, _ = self.s.promote(self.keys, now=self.now, limit=500)
            assert count == self.model.promote(self.now, 500)
        elif reaper is not None:
            limit = 1 if reaper == "recover one" else 500
            ends = len(self.model.ends)
            count, _ = self.s.recover(self.keys, now=self.now, limit=limit)
            assert count == self.model.recover(self.now, limit)
            self.seen["recovered"] += count
            ended = list(self.model.ends.values())[ends:]
            self.seen["outcome saved from a dead worker's journal"] += sum(
                1 for e in ended if e.by == "recover" and e.how in ("success", "fail"))

    # --- a worker's steps (WORKER_STEPS says when each can happen) -------------------------------------
    def _claims(self, w: Worker) -> bool:
        """An idle worker claims when not registered as idle, when its BLPOP returns a wake token, or
        when it times out (its registration then lapsed: it renews it by this claim)."""
        if not w.idle():
            return False
        names = self.model.idlers.get(w.claimer)
        if names is None or any(self.model.wake[n] for n in w.names):
            return True
        return any(self.model.idle[n].get(w.claimer, self.now) < self.now for n in names)

    def _claim(self, w: Worker, data: st.DataObject) -> None:
        """The worker's claim with its claimer, after its BLPOP took a wake token (or not)."""
        woke_on = data.draw(st.sampled_from([None, *range(len(w.names))]), label="woke on a token of")
        if woke_on is not None and not self.model.inboxes.get(w.claimer):
            name = w.names[woke_on]
            if self.model.wake[name]:
                assert self.r.lpop(self.keys.wake(name)) == "1"
                self.model.wake[name] -= 1
        got = self.s.claim(self.keys, w.names, now=self.now, claimer=w.claimer, idle_ms=IDLE_MS)
        expected = self.model.claim_script(w.claimer, IDLE_MS, list(w.names), self.now)
        assert (got[0], got[1]) == expected if got else expected is None, (got, expected)
        if got:
            w.ready.append(Held(got[0], got[1], "run_start" not in got[2]))
        self.seen["idle registration" if got is None else "claim"] += 1

    def _takes_handoff(self, w: Worker) -> bool:
        return w.idle() and bool(self.model.inboxes.get(w.claimer))

    def _take_hand_off(self, w: Worker, data: st.DataObject) -> None:
        """The idle worker's BLPOP returns what its inbox holds (a plain LPOP, unchecked)."""
        raw = self.r.lpop(self.keys.inbox(w.claimer))
        expected = self.model.inboxes[w.claimer].pop(0)
        if not self.model.inboxes[w.claimer]:
            del self.model.inboxes[w.claimer]
        handed = parse_handoff(raw)
        assert handed is not None and (handed[0], handed[1]) == expected
        w.ready.append(Held(handed[0], handed[1], "run_start" not in handed[2]))
        self.seen["hand-off taken"] += 1

    def _to_mark(self, w: Worker) -> Held | None:
        """The job claimed ahead whose start mark the worker sends next: the one it runs, or its next."""
        for held in ([w.running] if w.running else []) + w.ready[:1]:
            if held.prefetched and not held.marked:
                return held
        return None

    def _mark_entry(self, w: Worker, held: Held) -> str:
        held.marked = True
        truth = self._attempt(held.id, held.token)
        if truth is not None:
            truth.marked = True
            truth.began = truth.began or (w.running is held and truth.announced)
        self.model.journals.setdefault(w.claimer, []).append(
            [held.id, str(held.token), "start", "", 0, self.now])
        self.seen["start mark"] += 1
        return journal_entry(held.id, held.token, "start", "", 0, self.now)

    def _push(self, w: Worker, entries: list[str]) -> None:
        key = self.keys.journal(w.claimer)
        self.r.pipeline(transaction=False).rpush(key, *entries).expire(key, 86400).execute()

    def _mark(self, w: Worker, data: st.DataObject) -> None:
        """A start mark RPUSHed alone (the worker is about to start the job, or just did: S first)."""
        held = self._to_mark(w)
        assert held is not None
        self._push(w, [self._mark_entry(w, held)])

    def _starts(self, w: Worker) -> bool:
        """A worker holds a job to start, and no outcome too big for its F message: that one goes by
        finish_many before the next job starts."""
        return bool(w.ready) and not w.running and not any(d.urgent for d in w.unsent)

    def _start(self, w: Worker, data: st.DataObject) -> None:
        """The next job starts: its S to the master, after its start mark (claimed ahead) or before
        it (a start announced with the last job's F, its mark riding with that job's outcome)."""
        held = w.ready.pop(0)
        if data.draw(st.booleans(), label="mark first") and held.prefetched and not held.marked:
            self._push(w, [self._mark_entry(w, held)])
        w.running, w.started = held, self.now
        w.seen = Seen(held.id, held.token, self.now)
        truth = self._attempt(held.id, held.token)
        if truth is not None:
            truth.announced = True
            truth.began = not held.prefetched or held.marked
        self.seen["start"] += 1

    def _gives_back(self, w: Worker) -> bool:
        return self._starts(w) and w.ready[0].prefetched

    def _give_back(self, w: Worker, data: st.DataObject) -> None:
        """The next job, claimed ahead, waited too long: put aside, given back by the next finish_many."""
        held = w.ready.pop(0)
        w.give_back.append((held.id, held.token))
        self.seen["put aside to give back"] += 1

    @staticmethod
    def _runs_handler(w: Worker) -> bool:
        """A job claimed ahead runs its handler only once its start mark is sent."""
        return w.running is not None and (w.running.marked or not w.running.prefetched)

    def _handler_returns(self, w: Worker, data: st.DataObject) -> None:
        """F to the master (with the outcome, unless too big), the outcome in the worker's hands."""
        held = w.running
        assert held is not None and w.seen is not None
        outcome = data.draw(st.sampled_from(["success", "success", "fail"]), label="outcome")
        payload = "boom" if outcome == "fail" else data.draw(st.sampled_from(["", '"ok"', '{"n": 1}']),
                                                             label="result")
        big = data.draw(st.sampled_from([False, False, True]), label="too big for the F message")
        run_ms = self.now - w.started
        w.seen.returned, w.seen.retained = True, not big
        if not big:
            w.unsaved[held.id] = (held.token, outcome, payload, run_ms, self.now)
        w.unsent.append(Done(held.id, held.token, outcome, payload, run_ms, self.now, big))
        w.running = None
        truth = self._attempt(held.id, held.token)
        if truth is not None:
            truth.outcome, truth.retained = outcome, not big
        self.seen["handler returned"] += 1

    @staticmethod
    def _journaling(w: Worker) -> Done | None:
        return next((d for d in w.unsent if not d.urgent), None)

    def _journal(self, w: Worker, data: st.DataObject | None) -> None:
        """An outcome RPUSHed to the journal, the next job's start mark riding along (or not)."""
        done = self._journaling(w)
        assert done is not None
        w.unsent.remove(done)
        self.model.journals.setdefault(w.claimer, []).append(
            [done.id, str(done.token), done.outcome, done.payload, done.run_ms, done.ended_at])
        entries = [journal_entry(done.id, done.token, done.outcome, done.payload, done.run_ms, done.ended_at)]
        held = self._to_mark(w) if data is None or data.draw(st.booleans(), label="with a mark") else None
        if held is not None:
            entries.append(self._mark_entry(w, held))
        self._push(w, entries)
        w.journaled += 1
        truth = self._attempt(done.id, done.token)
        if truth is not None:
            truth.journaled = True
        self.seen["journaled outcome"] += 1

    @staticmethod
    def _sends(w: Worker) -> bool:
        """Between runs, a worker calls finish_many to send what it holds (and claim its next jobs)."""
        return not w.running and bool(w.unsent or w.give_back or w.journaled)

    def _finish_many(self, w: Worker, data: st.DataObject) -> None:
        """finish_many: the journal, the outcomes in hand, the give-backs, claims ahead."""
        wanted = data.draw(st.sampled_from([0, 1, 3]), label="claims")
        with_mark = data.draw(st.booleans(), label="a mark first")
        w.ready += [Held(job_id, token, True) for job_id, token in self._send(w, wanted, with_mark)]

    def _send(self, w: Worker, wanted: int, with_mark: bool) -> list[tuple[str, str]]:
        held = self._to_mark(w) if with_mark else None
        if held is not None:
            self._push(w, [self._mark_entry(w, held)])
        runs = [(d.id, d.token, d.outcome, d.payload, d.run_ms, self.now - d.ended_at) for d in w.unsent]
        idle_ms = IDLE_MS if wanted and not w.ready and not w.running else 0
        statuses, claimed, rejected = self.s.finish_many(
            self.keys, w.claimer, runs, w.give_back, wanted, w.names, now=self.now, mono_ms=self.now,
            idle_ms=idle_ms)
        m_statuses, m_claimed, m_rejected = self.model.finish_many(
            w.claimer, self.now, self.now, runs, list(w.give_back), wanted, idle_ms, list(w.names))
        assert statuses == m_statuses
        assert [(c[0], c[1]) for c in claimed] == m_claimed
        assert rejected == m_rejected
        self.seen["late finish rejected"] += sum(status != "ok" for status, _ in statuses) + len(rejected)
        if wanted and not claimed and idle_ms:
            self.seen["idle registration"] += 1
        self.seen["finish_many"] += 1
        w.unsent, w.give_back, w.journaled = [], [], 0
        return [(c[0], c[1]) for c in claimed]

    # --- deaths -----------------------------------------------------------------------------------------
    def _death(self, data: st.DataObject) -> None:
        """A worker retires or is killed, a whole supervisor is killed, or everything is."""
        how = data.draw(st.sampled_from(["retire", "kill", "kill", "kill, late journal",
                                         "kill, late finish_many", "supervisor", "supervisor", "everything"]),
                        label="death")
        w = self.workers[data.draw(st.integers(0, len(self.workers) - 1), label="worker")]
        if how == "retire" and not w.running:
            self._retire(w)
        elif how.startswith("kill"):
            self._kill(w, how)
        elif how == "supervisor":
            self._kill_supervisor(SUPERVISOR_OF[w.slot])
        elif how == "everything":
            self._everything_dies()
        self.seen[how] += 1

    def _retire(self, w: Worker) -> None:
        """The worker leaves cleanly (max_jobs, a stop): it gives back what it did not start and saves
        the rest; its master then abandons what may be left (nothing: all token-checked)."""
        for _ in range(4):
            w.give_back += [(h.id, h.token) for h in w.ready]
            w.ready = [Held(job_id, token, True) for job_id, token in self._send(w, 0, False)]
            if not w.ready:
                break
        assert not w.ready
        self._abandon(w)
        self.workers[w.slot] = self._spawn(w.slot)

    def _abandon(self, w: Worker) -> None:
        runs = [(job_id, token, outcome, payload, run_ms, self.now - at)
                for job_id, (token, outcome, payload, run_ms, at) in w.unsaved.items()]
        got = self.s.abandon(self.keys, w.claimer, ABANDONED, runs, now=self.now, mono_ms=self.now)
        assert got == self.model.abandon(w.claimer, ABANDONED, runs, self.now, self.now)

    def _kill(self, w: Worker, how: str) -> None:
        """A worker dies (SIGKILL, its deadline): its master ghosts the run it saw start and had no
        outcome for (token-checked), then abandons. The worker's last command (sent, not yet run)
        may reach Redis after that."""
        seen = w.seen
        if seen is not None and (not seen.returned or not seen.retained):
            status, state, _ = self.s.finish(self.keys, seen.id, seen.token, "ghost", KILLED,
                                             now=self.now, claimer=w.claimer, run_ms=self.now - seen.started)
            assert (status, state) == self.model.finish(seen.id, seen.token, "ghost", KILLED, w.claimer,
                                                        self.now - seen.started, self.now)
        self._abandon(w)
        if how == "kill, late journal" and self._journaling(w):
            self._journal(w, None)
            self.seen["late journal push run"] += 1
        elif how == "kill, late finish_many" and self._sends(w):
            self._send(w, 2, True)
            self.seen["late finish_many run"] += 1
        self.workers[w.slot] = self._spawn(w.slot)

    def _kill_supervisor(self, supervisor: int) -> None:
        """A whole supervisor dies (its host): nothing settles for its workers; leases expire."""
        for w in self.workers:
            if SUPERVISOR_OF[w.slot] == supervisor:
                self.workers[w.slot] = self._spawn(w.slot)

    def _everything_dies(self) -> None:
        """Every supervisor dies, the reaper recovers every lease: nothing may stay processing or in
        an inbox, and every run that began has ended."""
        self._kill_supervisor(0)
        self._kill_supervisor(1)
        self.now += 60_000
        while True:
            count, _ = self.s.recover(self.keys, now=self.now, limit=500)
            assert count == self.model.recover(self.now, 500)
            if not count:
                break
        assert self.r.zcard(self.keys.processing) == 0
        assert not any(self.r.exists(self.keys.inbox(c)) for c in self.claimers)
        for attempt, truth in self.truth.items():
            assert not truth.began or attempt in self.model.ends, f"attempt {attempt} began and never ended"

    # --- after every step ------------------------------------------------------------------------------
    def _check_ends(self) -> None:
        for attempt, prefetched in self.model.claims:
            self.truth[attempt] = Truth(prefetched)
        self.model.claims.clear()
        for attempt in self.model.new_ends:
            end, truth = self.model.ends[attempt], self.truth[attempt]
            what = f"attempt {attempt} {truth} ended {end}"
            if end.how == "released":
                assert not truth.began, f"a run that began was given back uncounted: {what}"
            elif end.how == "ghost":
                assert not truth.journaled, f"a journaled outcome was lost to a ghost: {what}"
                assert not (truth.retained and end.by in ("master", "abandon")), (
                    f"an outcome the master retained was lost to a ghost: {what}")
                if truth.prefetched and not truth.announced:
                    assert end.by == "recover", f"a job claimed ahead that never started was ghosted: {what}"
                    assert truth.marked or end.lost > MAX_LOST_PREFETCHED, (
                        f"a job claimed ahead whose start Redis could not know was ghosted: {what}")
            elif end.how in ("success", "fail"):
                assert end.how == truth.outcome, f"an outcome the handler did not give was recorded: {what}"
        self.model.new_ends.clear()

    @invariant()
    def matches_the_model(self) -> None:
        self.steps += 1
        self._check_ends()
        assert_consistent(self.r, self.ns)
        snap = snapshot(self.r, self.ns)
        assert not self.checker.observe(snap), self.checker.found
        m, k = self.model, self.keys
        pipe = self.r.pipeline(transaction=False)
        ids = sorted(set(m.jobs) | set(snap.jobs), key=int)
        queue_reads(pipe, k, ids)
        for name in NAMES:
            pipe.lrange(k.queue(name), 0, -1)
            pipe.llen(k.wake(name))
            pipe.zrange(k.idle(name), 0, -1, withscores=True)
        for zset in (k.delayed, k.processing, k.finished):
            pipe.zrange(zset, 0, -1, withscores=True)
        pipe.hgetall(k.counts)
        for claimer in self.claimers:
            pipe.get(k.claim(claimer))
            pipe.lrange(k.journal(claimer), 0, -1)
            pipe.lrange(k.inbox(claimer), 0, -1)
            pipe.get(k.idler(claimer))
        replies = pipe.execute()
        hashes, rest = read_fields(replies[: 2 * len(ids)]), replies[2 * len(ids):]
        for job_id, fields in zip(ids, hashes, strict=True):
            mj = m.jobs.get(job_id)
            assert bool(fields) == (mj is not None), f"job {job_id}: Redis {dict(fields)}, the model {mj}"
            if mj is None:
                continue
            got = dict(fields)
            if "runs" in got:
                got["runs"] = json.loads(got["runs"])
            assert got == mj.fields(), f"job {job_id}:\n redis {got}\n model {mj.fields()}"
        for name in NAMES:
            queue, wake, idle, rest = rest[0], rest[1], rest[2], rest[3:]
            assert queue == m.queues[name], f"queue {name}"
            assert wake == m.wake[name], f"wake tokens of {name}: {wake}, model {m.wake[name]}"
            want_idle = sorted(((c, float(t)) for c, t in m.idle[name].items()), key=lambda x: (x[1], x[0]))
            assert idle == want_idle, f"idle registrations of {name}"
        zsets, rest = rest[:3], rest[3:]
        for got_z, want_z in zip(zsets, (m.delayed, m.processing, m.finished), strict=True):
            assert got_z == sorted(((i, float(s)) for i, s in want_z.items()), key=lambda x: (x[1], x[0]))
        counts, rest = rest[0], rest[1:]
        want_counts = Counter(f"{j.state}:{j.name}" for j in m.jobs.values())
        assert {f: int(v) for f, v in counts.items()} == dict(want_counts)
        for i, claimer in enumerate(self.claimers):
            record, journal, inbox, idler = rest[4 * i: 4 * i + 4]
            assert parse_claim_record(record) == m.records.get(claimer, []), f"claim record of {claimer}"
            assert [json.loads(e) for e in journal] == m.journals.get(claimer, []), f"journal of {claimer}"
            entries = [parse_handoff(e) for e in inbox]
            assert [(e[0], e[1]) for e in entries if e] == m.inboxes.get(claimer, []), f"inbox of {claimer}"
            assert (json.loads(idler) if idler else None) == m.idlers.get(claimer), f"idler {claimer}"


#: What can happen next, each name as often as it should weigh (applicable ones only are drawn).
STEPS = (["create"] * 3 + ["time"] * 3 + ["housekeeping"] + ["death"] * 2
         + ["claim"] * 2 + ["take hand-off"] * 2 + ["mark", "give back"]
         + ["start", "handler returns", "finish_many"] * 3 + ["journal"] * 2)
#: A worker's steps, and when a worker can take each.
WORKER_STEPS = {
    "claim": WorkersMachine._claims,
    "take hand-off": WorkersMachine._takes_handoff,
    "mark": lambda self, w: self._to_mark(w) is not None,
    "start": WorkersMachine._starts,
    "give back": WorkersMachine._gives_back,
    "handler returns": lambda self, w: self._runs_handler(w),
    "journal": lambda self, w: self._journaling(w) is not None,
    "finish_many": lambda self, w: self._sends(w),
}

@pytest.mark.timeout(900)  # full size: 1.5-2 min on 2 busy cores; a failure then shrinks for up to 5 min
@pytest.mark.parametrize("size", sizes((60, 40), (600, 50)))
def test_case11b_workers_supervisors_and_reaper_against_a_reference_model(size, r):
    examples, steps = size
    case = Case(
        "11b",
        "Hypothesis state machine of workers, supervisors and the reaper against a reference model",
        f"{examples} examples x up to {steps} steps",
    )
    WorkersMachine.r = r
    counted: list[int] = []
    seen: Counter[str] = Counter()
    original = WorkersMachine.teardown

    def teardown(self: WorkersMachine) -> None:
        counted.append(self.steps)
        seen.update(self.seen)
        original(self)

    WorkersMachine.teardown = teardown  # type: ignore[method-assign]
    failure: BaseException | None = None
    try:
        run_state_machine_as_test(
            WorkersMachine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    except Exception as exc:  # noqa: BLE001 - reported below, with Hypothesis' falsifying example above
        failure = exc
    finally:
        WorkersMachine.teardown = original  # type: ignore[method-assign]
    case.note(f"{len(counted)} examples, {sum(counted)} steps checked against the model")
    case.note("went through: " + ", ".join(f"{what} {n}" for what, n in sorted(seen.items())))
    case.check(
        "after every step Redis equals the model (jobs, structures, wake tokens, counts, claim records, "
        "journals, inboxes, idle registrations) and the delivery guarantee holds for every attempt",
        failure is None,
        "no counterexample" if failure is None else repr(failure)[:2000],
    )
    case.done()


# --- what the model found, each pinned by the sequence it reduced to ------------------------------------


def test_abandon_gives_back_a_job_claimed_ahead_whose_start_mark_a_finish_many_applied(r, namespace):
    """A worker ends a run and, low on jobs, journals the next job's start mark and sends finish_many
    (the outcome, more claims), which applies the mark; it is killed before that job starts (before
    its S). Its master heard no start, so abandon gives the job back: ghosting it would count a run
    that never began (and fail outright a job with ghost_retry off, which never ran)."""
    m = Machine(r, namespace)
    first, upcoming = m.create("a"), m.create("a", opts={"ghost_retry": False})
    _, claimed, _ = m.s.finish_many(m.keys, "w1", claim=2, claim_names=["a"], now=T0, mono_ms=1000.0)
    assert [c[0] for c in claimed] == [first, upcoming]
    [(_, first_token, _), (_, upcoming_token, _)] = claimed
    m.r.rpush(m.keys.journal("w1"), journal_entry(upcoming, upcoming_token, "start", "", 0, 1015.0))
    statuses, _, _ = m.s.finish_many(m.keys, "w1", [(first, first_token, "success", "", 5, 0)], claim=1,
                                     claim_names=["a"], now=T0 + 20, mono_ms=1020.0)
    assert statuses == [("ok", "success")]
    assert m.hash(upcoming)["run_start"] == str(T0 + 15)  # the mark, applied
    # the master holds the first run's outcome (its F message) and saw no other start
    retained = (first, first_token, "success", "", 5, 10)
    assert m.s.abandon(m.keys, "w1", ABANDONED, [retained], now=T0 + 30) == (0, 1, 0)
    m.check()
    assert m.state(upcoming) == "queued" and m.job(upcoming).runs == []
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [upcoming]
    # a job claimed to start at once that the master never heard of is still ghosted
    _, token, _ = m.s.claim(m.keys, ["a"], now=T0 + 40, claimer="w1")
    assert m.s.abandon(m.keys, "w1", ABANDONED, now=T0 + 50) == (0, 0, 1)
    assert m.state(upcoming) == "fail" and run_token(m.hash(upcoming)) == token
