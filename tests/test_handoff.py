"""Hand-off to idle workers: a worker that finds nothing registers as idle, and a create claims its
new job for that worker and puts the claim in the worker's inbox (hand_off in lua/_lib_handoff.lua).
Time moved by argument; the one-structure invariant checked after every call."""
from __future__ import annotations

import json

import pytest

from kickq.scripts import LEASE_GRACE_MS, journal_entry, parse_claim_record, parse_handoff, run_token
from tests.test_scripts import T0, Machine, token

IDLE_MS = 3000


@pytest.fixture
def m(r, namespace):
    return Machine(r, namespace)


def wait_idle(m, claimer="w1", names=("a",), now=T0):
    """The worker's claim finds nothing and registers it as idle."""
    assert m.s.claim(m.keys, names, now=now, claimer=claimer, idle_ms=IDLE_MS) is None
    m.check()


def inbox(m, claimer="w1"):
    return [parse_handoff(raw) for raw in m.r.lrange(m.keys.inbox(claimer), 0, -1)]


def test_an_empty_claim_registers_the_worker_under_each_of_its_names(m):
    wait_idle(m, names=("a", "b"))
    for name in ("a", "b"):
        assert m.r.zrange(m.keys.idle(name), 0, -1, withscores=True) == [("w1", T0 + IDLE_MS)]
        assert m.r.pttl(m.keys.idle(name)) > 0
    assert json.loads(m.r.get(m.keys.idler("w1"))) == ["a", "b"]
    # without idle_ms (or without a claimer) nobody is registered
    assert m.s.claim(m.keys, ["c"], now=T0, claimer="w2") is None
    assert m.s.claim(m.keys, ["c"], now=T0, idle_ms=IDLE_MS) is None
    assert not m.r.exists(m.keys.idle("c"))


def test_a_create_claims_its_job_for_an_idle_worker_and_hands_it_over(m):
    wait_idle(m, names=("a", "b"))
    job_id = m.create("b", opts={"process_timeout": 2}, data={"x": 1}, now=T0 + 10)
    fields = m.hash(job_id)
    assert fields["state"] == "processing" and fields["owner"] == "w1" and fields["attempt"] == "1"
    assert "run_start" not in fields  # claimed ahead, as a batch is: its start is the worker's to tell
    assert m.r.zscore(m.keys.processing, job_id) == T0 + 10 + 2000 + LEASE_GRACE_MS
    assert inbox(m) == [(job_id, token(1, T0 + 10), fields)] and run_token(fields) == token(1, T0 + 10)
    assert parse_claim_record(m.r.get(m.keys.claim("w1"))) == [(job_id, token(1, T0 + 10))]
    assert m.r.llen(m.keys.queue("b")) == m.r.llen(m.keys.wake("b")) == 0
    # handed one job, the worker is no longer idle under any of its names
    assert m.r.zcard(m.keys.idle("a")) == m.r.zcard(m.keys.idle("b")) == 0
    assert not m.r.exists(m.keys.idler("w1"))
    second = m.create("a", now=T0 + 11)
    assert m.state(second) == "new" and m.r.llen(m.keys.wake("a")) == 1


def test_each_idle_worker_takes_one_job_and_the_rest_wait_in_the_queue(m):
    wait_idle(m, "w1")
    wait_idle(m, "w2")
    ids = m.create_many([("a", None, None, None)] * 3, now=T0 + 1)
    assert [m.state(i) for i in ids] == ["processing", "processing", "new"]
    assert {inbox(m, "w1")[0][0], inbox(m, "w2")[0][0]} == set(ids[:2])
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [ids[2]] and m.r.llen(m.keys.wake("a")) == 1


def test_a_delayed_job_is_not_handed_over_when_created(m):
    wait_idle(m)
    job_id = m.create("a", delay_ms=500, now=T0 + 1)
    assert m.state(job_id) == "delayed" and inbox(m) == [] and m.r.zcard(m.keys.idle("a")) == 1


def test_a_new_job_for_an_idle_worker_never_enters_its_queue(m):
    wait_idle(m)
    m.r.config_resetstat()
    job_id = m.create("a", now=T0 + 1)
    assert inbox(m)[0][0] == job_id and m.state(job_id) == "processing"
    calls = {k[len("cmdstat_"):]: v["calls"] for k, v in m.r.info("commandstats").items()}
    assert "lpop" not in calls and "llen" in calls  # no queue entry nor token to take back
    assert not m.r.exists(m.keys.queue("a")) and not m.r.exists(m.keys.wake("a"))


def test_an_idle_worker_is_handed_the_oldest_waiting_job_not_the_new_one(m):
    older = m.create("a", delay_ms=0, now=T0)
    wait_idle(m, now=T0)  # nothing waiting yet: it registers
    assert m.promote(now=T0 + 1)[0] == 1  # the delayed job is queued; promote hands nothing over
    assert m.state(older) == "queued" and inbox(m) == []
    newer = m.create("a", now=T0 + 2)
    assert [job_id for job_id, _, _ in inbox(m)] == [older]
    assert m.state(newer) == "new" and m.r.lrange(m.keys.queue("a"), 0, -1) == [newer]
    assert m.r.llen(m.keys.wake("a")) == 1


def test_registering_as_idle_drops_the_ended_jobs_from_the_claim_record(m):
    ids = m.create_many([("a", None, None, None)] * 3, now=T0)
    _, claimed, _ = m.s.finish_many(m.keys, "w1", claim=3, claim_names=["a"], now=T0 + 1)
    assert len(parse_claim_record(m.r.get(m.keys.claim("w1")))) == 3
    runs = [(job_id, got_token, "success", "", 1, 0) for job_id, got_token, _ in claimed]
    m.s.finish_many(m.keys, "w1", runs, claim=4, claim_names=["a"], now=T0 + 2, idle_ms=IDLE_MS)
    m.check()
    assert [m.state(i) for i in ids] == ["success"] * 3
    assert not m.r.exists(m.keys.claim("w1"))  # nothing held: a hand-off has nothing to look over
    job_id = m.create("a", now=T0 + 3)
    [(_, handed_token, _)] = inbox(m)
    assert parse_claim_record(m.r.get(m.keys.claim("w1"))) == [(job_id, handed_token)] == [
        (job_id, token(1, T0 + 3))]


def test_a_lapsed_registration_is_not_used_and_is_dropped(m):
    wait_idle(m, now=T0)
    job_id = m.create("a", now=T0 + IDLE_MS + 1)
    assert m.state(job_id) == "new" and inbox(m) == []
    assert m.r.zcard(m.keys.idle("a")) == 0


def test_the_workers_claim_takes_a_job_handed_over_first_and_ends_its_registration(m):
    wait_idle(m, names=("a", "b"))
    handed = m.create("a", now=T0 + 1)
    queued = m.create("b", now=T0 + 2)
    # it woke on b's token before looking at its inbox: it gets the handed job, b keeps its token
    m.r.lpop(m.keys.wake("b"))
    job_id, got_token, fields = m.s.claim(m.keys, ["a", "b"], now=T0 + 3, claimer="w1", idle_ms=IDLE_MS)
    m.check()
    assert (job_id, got_token, fields["state"]) == (handed, token(1, T0 + 1), "processing")
    assert m.r.llen(m.keys.inbox("w1")) == 0 and m.r.llen(m.keys.wake("b")) == 1
    assert m.r.zcard(m.keys.idle("a")) == 0
    # the next claim is an ordinary one
    assert m.s.claim(m.keys, ["a", "b"], now=T0 + 4, claimer="w1", idle_ms=IDLE_MS)[0] == queued


def test_a_handed_over_job_deleted_before_the_worker_took_it_is_skipped(m):
    wait_idle(m)
    job_id = m.create("a", now=T0 + 1)
    m.delete(job_id)
    assert m.s.claim(m.keys, ["a"], now=T0 + 2, claimer="w1", idle_ms=IDLE_MS) is None
    m.check()
    assert m.r.llen(m.keys.inbox("w1")) == 0 and m.r.zcard(m.keys.idle("a")) == 1


def test_finish_many_returns_what_was_handed_over_and_registers_only_when_it_got_nothing(m):
    wait_idle(m)
    handed = m.create("a", now=T0 + 1)
    _, claimed, _ = m.s.finish_many(m.keys, "w1", claim=4, claim_names=["a"], now=T0 + 2, idle_ms=IDLE_MS)
    m.check()
    assert [c[0] for c in claimed] == [handed] and m.r.zcard(m.keys.idle("a")) == 0
    run = (handed, claimed[0][1], "success", "", 1, 0)
    statuses, claimed, _ = m.s.finish_many(m.keys, "w1", [run], claim=4, claim_names=["a"], now=T0 + 3,
                                           idle_ms=IDLE_MS)
    m.check()
    assert statuses == [("ok", "success")] and claimed == []
    assert m.r.zscore(m.keys.idle("a"), "w1") == T0 + 3 + IDLE_MS
    # a call that claims nothing does not register; any call ends a registration
    m.s.finish_many(m.keys, "w1", now=T0 + 4, idle_ms=IDLE_MS)
    assert m.r.zcard(m.keys.idle("a")) == 0


def test_a_claim_under_another_name_still_takes_the_handed_job_and_registers_nothing(m):
    wait_idle(m)
    handed = m.create("a", now=T0 + 1)
    assert m.r.exists(m.keys.inbox("w1"))
    # another name, empty
    m.s.run("claim", (m.keys.script_keys, [m.keys.prefix, T0 + 2, "w1", IDLE_MS, "zzz"]))
    m.check()
    # that claim took the handed job from the inbox, so the inbox is empty and nothing registered
    assert m.r.zcard(m.keys.idle("zzz")) == 0 and m.state(handed) == "processing"


def test_abandon_gives_back_what_the_dead_worker_did_not_start(m):
    wait_idle(m, "w1")
    taken = m.create("a", opts={"ghost_retry": False}, now=T0 + 1)
    assert parse_handoff(m.r.lpop(m.keys.inbox("w1")))[0] == taken  # the worker took it...
    m.s.finish_many(m.keys, "w1", claim=1, claim_names=["a"], now=T0 + 2, idle_ms=IDLE_MS)
    untaken = m.create("a", now=T0 + 3)  # ...went idle again, and this one reached its inbox only
    assert inbox(m)[0][0] == untaken
    # the master ghosts (token-checked) a run it heard start before it abandons the rest; it heard
    # of none here: both go back to the front of the queue, in their order
    saved, given_back, ghosted = m.s.abandon(m.keys, "w1", "worker died", now=T0 + 4)
    m.check()
    assert (saved, given_back, ghosted) == (0, 2, 0)
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [taken, untaken] and m.r.llen(m.keys.wake("a")) == 2
    assert m.hash(untaken)["attempt"] == "1"  # a late finish of that claim stays stale
    assert not m.r.exists(m.keys.inbox("w1")) and m.r.zcard(m.keys.idle("a")) == 0


def test_recover_gives_a_lost_workers_untaken_job_back_to_its_queue(m):
    wait_idle(m, "w1")
    job_id = m.create("a", opts={"process_timeout": 1, "ghost_retry": False}, now=T0 + 1)
    m.recover(now=T0 + 1 + 1000 + LEASE_GRACE_MS + 1)
    # still in the inbox: provably never started, even a job that must not run twice goes back
    assert m.state(job_id) == "queued" and m.job(job_id).runs == []
    assert not m.r.exists(m.keys.inbox("w1"))
    # and a worker of a live supervisor then claims it as usual
    assert m.s.claim(m.keys, ["a"], now=T0 + 5000, claimer="w2")[0] == job_id


def test_recover_ghosts_a_taken_job_whose_start_was_marked_and_gives_back_one_that_was_not(m):
    """Taken from the inbox (or popped by a BLPOP served to a worker whose host had died), a job is
    known to have started only by the mark its worker journals before running it."""
    wait_idle(m, "w1")
    marked = m.create("a", opts={"process_timeout": 1}, now=T0 + 1)
    _, marked_token, _ = parse_handoff(m.r.lpop(m.keys.inbox("w1")))
    m.r.rpush(m.keys.journal("w1"), journal_entry(marked, marked_token, "start", "", 0, 5000.0))
    wait_idle(m, "w2")
    unmarked = m.create("a", opts={"process_timeout": 1, "ghost_retry": False}, now=T0 + 2)
    m.r.lpop(m.keys.inbox("w2"))
    m.recover(now=T0 + 2 + 1000 + LEASE_GRACE_MS + 1)
    job = m.job(marked)
    assert job.state == "ghost" and job.runs[0]["error"].startswith("lease expired")
    assert job.runs[0]["start"] == T0 + 1  # the worker's clock is not known here: its claim time
    assert job.runs[0]["time"] == 1000 + LEASE_GRACE_MS + 2  # from its claim to the recovery
    assert m.state(unmarked) == "queued" and m.job(unmarked).runs == []  # never started: not lost


def test_a_start_mark_is_token_checked_and_its_time_comes_from_the_workers_clock(m):
    wait_idle(m, "w1")
    job_id = m.create("a", now=T0 + 1)
    _, handed_token, _ = parse_handoff(m.r.lpop(m.keys.inbox("w1")))
    assert handed_token == token(1, T0 + 1)
    stale = token(7, T0 + 1)
    m.r.rpush(m.keys.journal("w1"), journal_entry(job_id, stale, "start", "", 0, 5000.0))  # stale token
    not_the_owner = journal_entry(job_id, handed_token, "start", "", 0, 5000.0)
    m.r.rpush(m.keys.journal("w2"), not_the_owner)
    m.s.finish_many(m.keys, "w2", now=T0 + 50, mono_ms=5020.0)
    m.s.finish_many(m.keys, "w1", now=T0 + 50, mono_ms=5020.0)
    m.check()
    assert "run_start" not in m.hash(job_id)
    m.r.rpush(m.keys.journal("w1"), journal_entry(job_id, handed_token, "start", "", 0, 5000.0))
    m.s.finish_many(m.keys, "w1", now=T0 + 50, mono_ms=5020.0)
    m.check()
    assert m.hash(job_id)["run_start"] == str(T0 + 30)  # 20 ms before now, by the worker's clock
    # the run's end then takes its own measured time, and the mark is gone with the run
    m.r.rpush(m.keys.journal("w1"), journal_entry(job_id, handed_token, "success", "", 12, 5040.0))
    m.s.finish_many(m.keys, "w1", now=T0 + 70, mono_ms=5040.0)
    job = m.job(job_id)
    assert job.state == "success" and job.runs[0]["start"] == T0 + 58 and "run_start" not in m.hash(job_id)
