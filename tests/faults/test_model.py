"""Case 11: a Hypothesis state machine of the Lua transitions against a reference model.

Rules call the scripts through kickq.scripts.Scripts with `now` moved by argument: create (queued or
delayed, with option presets), claim (names in priority order), finish (success / fail / ghost, with
the current or a superseded token, optionally claiming the next job), promote, recover, purge (with
small limits too), delete, requeue (admin), and advancing the clock. The model is plain Python: jobs,
FIFO queues, the three sorted sets. After every step the whole namespace must equal the model (every
job's state, attempt, runs, result, errors, times; every structure with its order and scores; the
state counts), and the harness's invariants must hold (one structure per job, leases, no orphans).
"""

from __future__ import annotations

import json
import math
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
    precondition,
    rule,
    run_state_machine_as_test,
)

from kickq.config import JOB_OPTION_DEFAULTS
from kickq.job import Job, queue_reads, read_fields
from kickq.keys import Keys
from kickq.scripts import LEASE_GRACE_MS, Scripts, create_args
from tests.faults.harness import Case, Checker, snapshot, sizes
from tests.structures import assert_consistent

T0 = 1_700_000_000_000
NAMES = ("a", "b")
RECOVER_ERROR = "lease expired: its worker or supervisor was lost"
PRESETS: list[dict[str, Any] | None] = [
    None,
    {"retry": True, "retry_count": 1, "retry_interval": 0.5},
    {"retry": True, "retry_count": 2, "retry_interval": [0.25, 1.5]},
    {"process_timeout": 0.5, "ghost_interval": 1, "ghost_count": 2, "purge_timeout": 2},
    {"ghost_retry": False, "purge_timeout": 0},
    {"process_timeout": 1.5, "ghost_count": 0, "retry": True, "retry_count": 0},
]


def ms(seconds: float) -> int:
    return math.floor(seconds * 1000 + 0.5)  # as ms() in lua/_lib.lua


@dataclass
class MJob:
    id: str
    name: str
    opts: dict[str, Any]
    state: str
    create_time: int
    update_time: int
    attempt: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    scheduled_for: int | None = None
    result: Any = None
    last_error: str | None = None
    finish_time: int | None = None
    total_process_time: int | None = None

    @property
    def token(self) -> str:
        """Its current run's attempt token (run_token in lua/_lib_claim.lua)."""
        return f"{self.attempt}:{self.create_time}"


class Model:
    def __init__(self) -> None:
        self.jobs: dict[str, MJob] = {}
        self.queues: dict[str, list[str]] = {n: [] for n in NAMES}
        self.delayed: dict[str, int] = {}
        self.processing: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.next_id = 1

    # --- helpers -------------------------------------------------------------------------------------
    def _enqueue(self, job: MJob, now: int) -> None:
        job.state, job.update_time, job.scheduled_for = "queued", now, None
        self.queues[job.name].append(job.id)

    def _schedule(self, job: MJob, state: str, due: int, now: int) -> None:
        job.state, job.scheduled_for, job.update_time = state, due, now
        self.delayed[job.id] = due

    def _finalise(self, job: MJob, state: str, now: int) -> None:
        purge_at = now + ms(job.opts["purge_timeout"])
        job.state, job.finish_time, job.update_time = state, now, now
        job.total_process_time = sum(run["time"] for run in job.runs if isinstance(run["time"], int))
        job.scheduled_for = purge_at
        self.finished[job.id] = purge_at

    def _remove(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        if job.state in ("new", "queued"):
            self.queues[job.name].remove(job_id)
        for zset in (self.delayed, self.processing, self.finished):
            zset.pop(job_id, None)

    @staticmethod
    def _due(zset: dict[str, int], now: int, limit: int) -> list[str]:
        # ZRANGEBYSCORE: by score, then by member as a byte string
        return sorted((i for i, s in zset.items() if s <= now), key=lambda i: (zset[i], i))[:limit]

    # --- transitions -----------------------------------------------------------------------------------
    def create(self, name: str, opts: dict[str, Any] | None, delay: int | None, now: int) -> str:
        job_id = str(self.next_id)
        self.next_id += 1
        job = MJob(job_id, name, {**JOB_OPTION_DEFAULTS, **(opts or {})}, "new", now, now)
        self.jobs[job_id] = job
        if delay is None:
            self.queues[name].append(job_id)
        else:
            self._schedule(job, "delayed", now + delay, now)
        return job_id

    def claim(self, names: list[str], now: int) -> tuple[str, str] | None:
        for name in names:
            if self.queues[name]:
                job = self.jobs[self.queues[name].pop(0)]
                job.attempt += 1
                job.state, job.update_time = "processing", now
                job.runs.append(
                    {
                        "count": len(job.runs) + 1,
                        "start": now,
                        "time": None,
                        "state": "processing",
                        "error": None,
                    }
                )
                self.processing[job.id] = now + ms(job.opts["process_timeout"]) + LEASE_GRACE_MS
                return job.id, job.token
        return None

    def end_run(self, job: MJob, now: int, outcome: str, payload: str) -> str:
        del self.processing[job.id]
        run = job.runs[-1]
        run.update(time=now - run["start"], state=outcome, error=None if outcome == "success" else payload)
        if outcome == "success":
            if payload:
                job.result = json.loads(payload)
            self._finalise(job, "success", now)
        elif outcome == "fail":
            job.last_error = payload
            failed = sum(1 for r in job.runs if r["state"] == "fail")
            if job.opts["retry"] and failed <= job.opts["retry_count"]:
                interval = job.opts["retry_interval"]
                if isinstance(interval, list):
                    interval = interval[min(failed, len(interval)) - 1]
                self._schedule(job, "retry", now + ms(interval), now)
            else:
                self._finalise(job, "fail", now)
        else:
            job.last_error = payload
            ghosts = sum(1 for r in job.runs if r["state"] == "ghost")
            if job.opts["ghost_retry"] and ghosts <= job.opts["ghost_count"]:
                self._schedule(job, "ghost", now + ms(job.opts["ghost_interval"]), now)
            else:
                self._finalise(job, "fail", now)
        return job.state

    def finish(self, job_id: str, token: str, outcome: str, payload: str, now: int) -> tuple[str, str]:
        job = self.jobs.get(job_id)
        if job is None:
            return "missing", ""
        if job.state != "processing" or job.token != token:
            return "stale", job.state
        return "ok", self.end_run(job, now, outcome, payload)

    def promote(self, now: int, limit: int) -> int:
        ids = self._due(self.delayed, now, limit)
        for job_id in ids:
            del self.delayed[job_id]
            self._enqueue(self.jobs[job_id], now)
        return len(ids)

    def recover(self, now: int, limit: int) -> int:
        ids = self._due(self.processing, now, limit)
        for job_id in ids:
            self.end_run(self.jobs[job_id], now, "ghost", RECOVER_ERROR)
        return len(ids)

    def purge(self, now: int, limit: int) -> int:
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


class LuaMachine(RuleBasedStateMachine):
    """The scripts against the model. `r` (a redis-py client) is set on the class by the test."""

    r: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.ns = f"kt-sm-{uuid.uuid4().hex[:8]}"
        self.keys = Keys(self.ns)
        self.s = Scripts(self.r)
        self.model = Model()
        self.now = T0
        self.tokens: dict[str, list[str]] = {}  # every attempt token handed out, per job
        self.checker = Checker()
        self.steps = 0

    def teardown(self) -> None:
        keys = list(self.r.scan_iter(match="{" + self.ns + "}:*", count=1000))
        if keys:
            self.r.delete(*keys)

    def _pick(self, pool: list[str], index: int) -> str | None:
        return pool[index % len(pool)] if pool else None

    # --- rules ---------------------------------------------------------------------------------------
    @rule(
        name=st.sampled_from(NAMES),
        preset=st.integers(0, len(PRESETS) - 1),
        delay=st.sampled_from([None, None, 0, 300, 1000, 2500]),
    )
    def create(self, name: str, preset: int, delay: int | None) -> None:
        opts = PRESETS[preset]
        reply = self.s.run(
            "create", create_args(self.keys, [(name, "", json.dumps(opts) if opts else "", delay)], self.now)
        )
        assert str(reply[0]) == self.model.create(name, opts, delay, self.now)

    @rule(names=st.permutations(NAMES).flatmap(lambda p: st.sampled_from([p[:1], p[:2]])))
    def claim(self, names: list[str]) -> None:
        got = self.s.claim(self.keys, list(names), now=self.now)
        expected = self.model.claim(list(names), self.now)
        assert (got[0], got[1]) == expected if got else expected is None, (got, expected)
        if got:
            self.tokens.setdefault(got[0], []).append(got[1])
        for name in names:  # a plain claim leaves each looked-at queue with one wake token per job
            assert self.r.llen(self.keys.wake(name)) == self.r.llen(self.keys.queue(name))

    @precondition(lambda self: self.tokens)
    @rule(
        index=st.integers(0, 10_000),
        superseded=st.booleans(),
        outcome=st.sampled_from(["success", "fail", "ghost"]),
        payload=st.sampled_from(["", '"ok"', '{"n": 1}', "boom"]),
        chain=st.booleans(),
    )
    def finish(self, index: int, superseded: bool, outcome: str, payload: str, chain: bool) -> None:
        job_id = self._pick(sorted(self.tokens), index)
        issued = self.tokens[job_id]
        token = issued[-2] if superseded and len(issued) > 1 else issued[-1]
        if outcome == "success" and payload == "boom":
            payload = '"boom"'  # a result is JSON
        names = list(NAMES) if chain else []
        status, state, nxt = self.s.finish(
            self.keys, job_id, token, outcome, payload, claim_names=names, now=self.now
        )
        assert (status, state) == self.model.finish(job_id, token, outcome, payload, self.now)
        expected_next = self.model.claim(names, self.now) if chain else None
        assert (nxt[0], nxt[1]) == expected_next if nxt else expected_next is None, (nxt, expected_next)
        if nxt:
            self.tokens.setdefault(nxt[0], []).append(nxt[1])

    @rule(limit=st.sampled_from([500, 500, 1, 2]))
    def promote(self, limit: int) -> None:
        count, _, _ = self.s.promote(self.keys, now=self.now, limit=limit)
        assert count == self.model.promote(self.now, limit)

    @rule(limit=st.sampled_from([500, 500, 1]))
    def recover(self, limit: int) -> None:
        count, _ = self.s.recover(self.keys, now=self.now, limit=limit)
        assert count == self.model.recover(self.now, limit)

    @rule(limit=st.sampled_from([500, 500, 1]))
    def purge(self, limit: int) -> None:
        count, _ = self.s.purge(self.keys, now=self.now, limit=limit)
        assert count == self.model.purge(self.now, limit)

    @rule(job=st.integers(1, 40))
    def delete(self, job: int) -> None:
        assert self.s.delete(self.keys, str(job)) == self.model.delete(str(job))

    @rule(job=st.integers(1, 40))
    def requeue(self, job: int) -> None:
        status, _ = self.s.run("requeue", (self.keys.script_keys, [self.keys.prefix, self.now, str(job)]))
        assert status == self.model.requeue(str(job), self.now)
        if status == "ok":  # the one transition out of a terminal state: the admin's `kickq retry`
            self.checker.terminal.pop(str(job), None)

    @rule(step=st.sampled_from([0, 1, 250, 500, 1000, 1500, 2500, 10_000]))
    def advance(self, step: int) -> None:
        self.now += step

    # --- after every step ------------------------------------------------------------------------------
    @invariant()
    def matches_the_model(self) -> None:
        self.steps += 1
        assert_consistent(self.r, self.ns)
        snap = snapshot(self.r, self.ns)
        assert not self.checker.observe(snap), self.checker.found
        m, k = self.model, self.keys
        pipe = self.r.pipeline(transaction=False)
        ids = sorted(set(m.jobs) | set(snap.jobs), key=int)
        queue_reads(pipe, k, ids)
        for name in NAMES:
            pipe.lrange(k.queue(name), 0, -1)
        for zset in (k.delayed, k.processing, k.finished):
            pipe.zrange(zset, 0, -1, withscores=True)
        pipe.hgetall(k.counts)
        replies = pipe.execute()
        hashes, rest = read_fields(replies[: 2 * len(ids)]), replies[2 * len(ids) :]
        for job_id, fields in zip(ids, hashes, strict=True):
            mj = m.jobs.get(job_id)
            assert bool(fields) == (mj is not None), (
                f"job {job_id}: in Redis {bool(fields)}, in the model {mj}"
            )
            if mj is None:
                continue
            job = Job.from_fields(job_id, fields)
            got = (
                job.state,
                int(fields.get("attempt", 0)),
                job.runs,
                job.result,
                job.last_error,
                job.scheduled_for,
                job.finish_time,
                job.total_process_time,
                job.create_time,
                job.update_time,
                job.name,
            )
            want = (
                mj.state,
                mj.attempt,
                mj.runs,
                mj.result,
                mj.last_error,
                mj.scheduled_for,
                mj.finish_time,
                mj.total_process_time,
                mj.create_time,
                mj.update_time,
                mj.name,
            )
            assert got == want, f"job {job_id}:\n redis {got}\n model {want}"
        queues, zsets, counts = rest[: len(NAMES)], rest[len(NAMES) : -1], rest[-1]
        assert list(queues) == [m.queues[n] for n in NAMES]
        for got_z, want_z in zip(zsets, (m.delayed, m.processing, m.finished), strict=True):
            assert got_z == sorted(((i, float(s)) for i, s in want_z.items()), key=lambda x: (x[1], x[0]))
        want_counts = Counter(f"{j.state}:{j.name}" for j in m.jobs.values())
        assert {f: int(v) for f, v in counts.items()} == dict(want_counts)


@pytest.mark.parametrize("size", sizes((40, 25), (500, 40)))
def test_case11_lua_transitions_against_a_reference_model(size, r):
    examples, steps = size
    case = Case(
        "11",
        "Hypothesis state machine of the Lua transitions against a reference model",
        f"{examples} examples x up to {steps} steps",
    )
    LuaMachine.r = r
    counted: list[int] = []
    original = LuaMachine.teardown

    def teardown(self: LuaMachine) -> None:
        counted.append(self.steps)
        original(self)

    LuaMachine.teardown = teardown  # type: ignore[method-assign]
    failure: BaseException | None = None
    try:
        run_state_machine_as_test(
            LuaMachine,
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
        LuaMachine.teardown = original  # type: ignore[method-assign]
    case.note(f"{len(counted)} examples, {sum(counted)} steps checked against the model")
    case.check(
        "after every step Redis equals the model (states, attempts, runs, results, errors, times, "
        "structure order and scores, counts) and the invariants hold",
        failure is None,
        "no counterexample" if failure is None else repr(failure)[:2000],
    )
    case.done()
