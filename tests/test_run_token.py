"""A run's attempt token names one run of one job: its attempt number and the job's create time.

After a failover that lost creates, the new master hands the same ids out again and their attempts
start at 1 again. A worker that ran a lost job may still hold its outcome (unconfirmed) when it
claims the new job of the same id with the same attempt number. Here the loss is the new master's
view, made exact: every key of the namespace is gone (the create, its claim and the id counter),
then the id is created again, later. Every way a run of the lost job can reach Redis (a finished
run, the journal, a start mark, a give-back, a ghost, abandon's reported runs, the claim record)
must leave the new job alone, whoever claimed it; the new job's own run still ends it.
"""
from __future__ import annotations

import pytest
import redis

from kickq.scripts import finish_args, journal_entry, parse_claim_record, parse_finish, run_token
from kickq_supervisor.worker_core import (ClaimOne, ClaimRecord, FinishMany, Lost, Pause, ReadClaimRecord,
                                         ShowIdle)
from tests.supervisor.test_worker_core import Steps
from tests.test_scripts import T0, Machine

LATER = T0 + 6_000  # the new master's create: a failover takes seconds


@pytest.fixture
def m(r, namespace):
    return Machine(r, namespace)


def lose_everything(m: Machine) -> None:
    """What a replica promoted before the create reached it holds of the namespace: nothing."""
    doomed = list(m.r.scan_iter(match=m.keys.prefix + "*", count=1000))
    if doomed:
        m.r.delete(*doomed)


def reused(m: Machine, claimer: str = "w1") -> tuple[str, str, str]:
    """Job 1 created and claimed ahead by `claimer`, lost, created again and claimed ahead by the
    same worker: (id, the lost run's token, the new run's token)."""
    first = m.create("a", now=T0)
    [(lost_id, lost_token, _)] = m.s.finish_many(m.keys, claimer, claim=1, claim_names=["a"], now=T0 + 5)[1]
    lose_everything(m)
    again = m.create("a", now=LATER)
    [(new_id, new_token, fields)] = m.s.finish_many(m.keys, claimer, claim=1, claim_names=["a"],
                                                    now=LATER + 5)[1]
    assert first == lost_id == again == new_id  # the same id ...
    assert m.job(new_id).attempt == 1  # ... and the same attempt number
    assert (lost_token, new_token) == (f"1:{T0}", f"1:{LATER}") and new_token == run_token(fields)
    return new_id, lost_token, new_token


def test_a_finished_run_of_the_lost_job_is_rejected_and_the_new_run_saves(m):
    job_id, lost, new = reused(m)
    before = m.hash(job_id)
    phantom = (job_id, lost, "success", '"phantom"', 3, 0)
    statuses = m.s.finish_many(m.keys, "w1", [phantom], now=LATER + 50)[0]
    m.check()
    assert statuses == [("stale", "processing")] and m.hash(job_id) == before
    statuses = m.s.finish_many(m.keys, "w1", [(job_id, new, "success", '"ran"', 3, 0)], now=LATER + 60)[0]
    m.check()
    assert statuses == [("ok", "success")] and m.job(job_id).result == "ran"


def test_a_journaled_run_or_start_mark_of_the_lost_job_is_rejected(m):
    job_id, lost, new = reused(m)
    journal = m.keys.journal("w1")
    m.r.rpush(journal, journal_entry(job_id, lost, "start", "", 0, 5000.0),
              journal_entry(job_id, lost, "success", '"phantom"', 3, 5001.0))
    _, _, rejected = m.s.finish_many(m.keys, "w1", now=LATER + 50, mono_ms=5010.0)
    m.check()
    assert rejected == [(job_id, lost, "stale", "processing")]
    fields = m.hash(job_id)
    assert fields["state"] == "processing" and "run_start" not in fields and "runs" not in fields
    m.r.rpush(journal, journal_entry(job_id, new, "success", '"ran"', 3, 5020.0))
    m.s.finish_many(m.keys, "w1", now=LATER + 70, mono_ms=5030.0)
    m.check()
    assert m.job(job_id).state == "success" and m.job(job_id).result == "ran"


def test_a_give_back_or_a_ghost_of_the_lost_run_leaves_the_new_one_alone(m):
    job_id, lost, new = reused(m)
    before = m.hash(job_id)
    m.s.finish_many(m.keys, "w1", give_back=[(job_id, lost)], now=LATER + 50)
    m.check()
    ghost = parse_finish(m.s.run("finish", finish_args(m.keys, job_id, lost, "ghost", "processing timed out",
                                                       claimer="w1", now=LATER + 60)))
    m.check()
    assert ghost[0] == "stale" and m.hash(job_id) == before
    assert parse_claim_record(m.r.get(m.keys.claim("w1"))) == [(job_id, new)]


def test_abandon_saves_no_reported_run_of_the_lost_job(m):
    job_id, lost, _ = reused(m)
    saved, given_back, ghosted = m.s.abandon(m.keys, "w1", "worker died",
                                             [(job_id, lost, "success", '"phantom"', 3, 1)], now=LATER + 50)
    m.check()
    # The new job never started: it goes back to its queue to run, with no run saved.
    assert (saved, given_back, ghosted) == (0, 1, 0)
    fields = m.hash(job_id)
    assert fields["state"] == "queued" and "runs" not in fields and "result" not in fields


def test_a_plain_claim_gives_the_token_of_its_own_job_too(m):
    m.create("a", now=T0)
    lost_id, lost, _ = m.claim("a", now=T0 + 5)
    lose_everything(m)
    m.create("a", now=LATER)
    job_id, new, fields = m.claim("a", now=LATER + 5)
    assert job_id == lost_id and (lost, new) == (f"1:{T0}", f"1:{LATER}") and new == run_token(fields)
    assert m.finish(job_id, lost, "success", now=LATER + 10)[0] == "stale"
    assert m.finish(job_id, new, "success", now=LATER + 10)[:2] == ("ok", "success")


# --- the worker's side: after a lost reply, its claim record names the new job ----------------------

def test_a_worker_holding_a_lost_jobs_outcome_still_runs_the_new_job_its_claim_record_names():
    def fields(created: int, **more: str) -> dict[str, str]:
        return {"name": "w", "state": "processing", "attempt": "1", "owner": "me",
                "create_time": str(created), "update_time": str(created + 5), **more}

    s = Steps()
    s.step(ShowIdle)
    s.step(ClaimOne, ("1", f"1:{T0}", fields(T0, run_start=str(T0 + 5))))
    s.run_job()
    while not isinstance(s.command, FinishMany):
        s.answer(None)  # the pipe
    # The save that also claims ahead is lost with the old master: its outcome stays in hand.
    s.step(FinishMany, Lost(redis.exceptions.ConnectionError("failover")))
    s.step(Pause)
    read = s.expect(ReadClaimRecord)
    assert read.held == frozenset({("1", f"1:{T0}")})
    # The new master's record names job 1 again: another job (a later create), claimed for this worker.
    s.answer(ClaimRecord([("1", f"1:{LATER}", fields(LATER))], LATER + 10))
    assert s.run_job() == "1" and [j.token for j in s.core.hand] == []
    while not isinstance(s.command, FinishMany):
        s.answer(None)
    resend = s.expect(FinishMany)
    # Both outcomes go, each with its own token: Redis rejects the lost one's (tests above).
    assert [(d.job_id, d.token) for d in resend.runs] == [("1", f"1:{T0}"), ("1", f"1:{LATER}")]
