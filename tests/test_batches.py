"""Batches: finish_many (save runs, give back, prefetch), abandon (a worker went) and the recovery of
prefetched jobs, with time moved by argument and the one-structure invariant after every call."""
from __future__ import annotations

import json

import pytest

from kickq.scripts import LEASE_GRACE_MS, journal_entry, parse_claim_record, run_token
from tests.test_scripts import T0, Machine, token


@pytest.fixture
def m(r, namespace):
    return Machine(r, namespace)


def batch(m, claimer="w1", runs=(), give_back=(), claim=0, names=("a",), now=T0):
    statuses, claimed, m.rejected = m.s.finish_many(m.keys, claimer, runs, give_back, claim, names, now=now)
    m.check()
    return statuses, claimed


def test_a_batch_claim_takes_up_to_n_jobs_in_order_with_leases_and_records_them(m):
    ids = [m.create("a", opts={"process_timeout": 2}) for _ in range(5)]
    statuses, claimed = batch(m, claim=3, now=T0 + 5)
    assert statuses == [] and [c[0] for c in claimed] == ids[:3]
    for job_id, got_token, fields in claimed:
        assert got_token == token(1) == run_token(fields)
        assert fields["state"] == "processing" and fields["owner"] == "w1"
        assert "run_start" not in fields  # its start is the worker's to tell
        assert m.r.zscore(m.keys.processing, job_id) == T0 + 5 + 2000 + LEASE_GRACE_MS
    assert parse_claim_record(m.r.get(m.keys.claim("w1"))) == [(i, token(1)) for i in ids[:3]]
    assert m.r.llen(m.keys.wake("a")) == m.r.llen(m.keys.queue("a")) == 2


def test_a_batch_claim_follows_the_priority_order_and_stops_when_queues_are_empty(m):
    b1, a1, b2 = m.create("b"), m.create("a"), m.create("b")
    _, claimed = batch(m, claim=10, names=("a", "b"))
    assert [c[0] for c in claimed] == [a1, b1, b2]
    _, claimed = batch(m, claim=10, names=("a", "b"))
    assert claimed == []


def test_finishing_a_batch_saves_each_run_with_the_workers_times(m):
    ids = [m.create("a") for _ in range(3)]
    _, claimed = batch(m, claim=3, now=T0)
    runs = [(job_id, token, "success", f'{{"n": {i}}}', 4, 30 - 10 * i)
            for i, (job_id, token, _) in enumerate(claimed)]
    runs[2] = (ids[2], claimed[2][1], "fail", "boom", 4, 10)
    statuses, claimed = batch(m, runs=runs, now=T0 + 100)
    assert statuses == [("ok", "success"), ("ok", "success"), ("ok", "fail")] and claimed == []
    for i, job_id in enumerate(ids[:2]):
        job = m.job(job_id)
        ended = T0 + 100 - (30 - 10 * i)
        assert (job.state, job.result, job.finish_time) == ("success", {"n": i}, ended)
        assert job.runs == [{"count": 1, "start": ended - 4, "time": 4, "state": "success", "error": None}]
    failed = m.job(ids[2])
    assert failed.state == "fail" and failed.runs[0]["error"] == "boom"
    assert m.r.zcard(m.keys.processing) == 0


def test_a_batch_finish_is_checked_per_run_against_token_and_owner(m):
    first, second = m.create("a"), m.create("a")
    _, [(_, first_token, _), (_, second_token, _)] = batch(m, claimer="w1", claim=2)
    before = m.hash(second)
    statuses, _ = batch(m, claimer="w2", runs=[(first, first_token, "success", "", 1, 0)])
    assert statuses == [("stale", "processing")] and m.state(first) == "processing"
    assert second_token != token(7)
    runs = [(first, first_token, "success", "", 1, 0), (second, token(7), "success", "", 1, 0),
            ("999", token(1), "success", "", 1, 0)]
    statuses, _ = batch(m, claimer="w1", runs=runs)
    assert statuses == [("ok", "success"), ("stale", "processing"), ("missing", "")]
    assert m.hash(second) == before


def test_a_finish_of_a_run_saved_already_is_stale(m):
    job_id = m.create("a")
    _, [(_, token, _)] = batch(m, claim=1)
    run = (job_id, token, "success", "", 3, 0)
    assert batch(m, runs=[run], now=T0 + 10)[0] == [("ok", "success")]
    saved = m.hash(job_id)
    assert batch(m, runs=[run], now=T0 + 20)[0] == [("stale", "success")]
    assert m.hash(job_id) == saved


def test_giving_back_puts_jobs_at_the_front_of_their_queue_and_keeps_their_attempt(m):
    ids = [m.create("a") for _ in range(4)]
    _, claimed = batch(m, claim=3)
    give_back = [(job_id, got_token) for job_id, got_token, _ in claimed[1:]]
    statuses, again = batch(m, runs=[(ids[0], claimed[0][1], "success", "", 1, 0)], give_back=give_back,
                            claim=2, now=T0 + 5)
    assert statuses == [("ok", "success")]
    # given back to the front, in their order, then claimed again with a new attempt
    assert [(c[0], c[1]) for c in again] == [(ids[1], token(2)), (ids[2], token(2))]
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [ids[3]]
    processing = {"count": 1, "start": T0 + 5, "time": None, "state": "processing", "error": None}
    assert m.job(ids[1]).runs == [processing]


def test_giving_back_a_job_that_is_not_ours_changes_nothing(m):
    job_id = m.create("a")
    _, [(_, got_token, _)] = batch(m, claimer="w1", claim=1)
    assert got_token == token(1)
    before = m.hash(job_id)
    batch(m, claimer="w2", give_back=[(job_id, got_token)])
    batch(m, claimer="w1", give_back=[(job_id, token(2))])
    assert m.hash(job_id) == before


def test_abandon_saves_reported_outcomes_gives_back_the_unstarted_and_ghosts_a_chained_claim(m):
    ran, unstarted, other = m.create("a"), m.create("a"), m.create("a")
    _, claimed = batch(m, claim=2)
    ran_run = (ran, claimed[0][1], "success", '"ok"', 5, 2)
    saved, given_back, ghosted = m.s.abandon(m.keys, "w1", "worker died", [ran_run], now=T0 + 50)
    m.check()
    assert (saved, given_back, ghosted) == (1, 1, 0)
    assert m.job(ran).result == "ok" and m.state(unstarted) == "queued"
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [unstarted, other]
    # a claim made to start at once (finish's chained claim) that the master never heard of: ghost
    m.s.claim(m.keys, ["a"], now=T0 + 60, claimer="w1")
    assert m.s.abandon(m.keys, "w1", "worker died right after claiming", now=T0 + 70) == (0, 0, 1)
    m.check()
    assert m.state(unstarted) == "ghost"
    # a repeat changes nothing
    assert m.s.abandon(m.keys, "w1", "again", [ran_run], now=T0 + 80) == (0, 0, 0)


def test_recover_gives_back_a_lost_prefetched_job_twice_then_ghosts_it(m):
    job_id = m.create("a", opts={"process_timeout": 1})
    lease = 1000 + LEASE_GRACE_MS
    now = T0
    for loss in (1, 2):
        _, [(got, _, _)] = batch(m, claimer=f"s{loss}", claim=1, now=now)
        assert got == job_id
        m.recover(now + lease)
        assert m.state(job_id) == "queued" and m.hash(job_id)["lost"] == str(loss)
        assert m.r.lindex(m.keys.queue("a"), 0) == job_id
        now += lease + 1
    batch(m, claimer="s3", claim=1, now=now)
    m.recover(now + lease)
    assert m.state(job_id) == "ghost"


def test_recover_still_ghosts_a_run_that_started_at_its_claim(m):
    job_id = m.create("a", opts={"process_timeout": 1})
    m.claim("a", now=T0)
    m.recover(T0 + 1000 + LEASE_GRACE_MS)
    assert m.state(job_id) == "ghost"


def test_finish_many_needs_a_claimer(m):
    with pytest.raises(ValueError):
        m.s.finish_many(m.keys, "", [], [], 1, ["a"])


# --- the journal: runs a worker finished, pushed with a plain RPUSH, ended by the next call -----------

def journal(m, claimer, job_id, token, outcome="success", payload="", run_ms=3, ended_mono_ms=1000.0):
    m.r.rpush(m.keys.journal(claimer), journal_entry(job_id, token, outcome, payload, run_ms, ended_mono_ms))


def test_finish_many_applies_the_journal_first_with_the_ages_of_its_runs(m):
    a, b, c = m.create("a"), m.create("a"), m.create("a")
    _, [(_, a_token, _), (_, b_token, _)] = batch(m, claim=2)
    journal(m, "w1", a, a_token, payload='{"x":1}', run_ms=4, ended_mono_ms=5000.0)
    journal(m, "w1", b, b_token, outcome="fail", payload="boom", run_ms=2, ended_mono_ms=5030.0)
    statuses, again = m.s.finish_many(m.keys, "w1", [], [], 1, ["a"], now=T0 + 100, mono_ms=5040.0)[:2]
    m.check()
    assert statuses == [] and [g[0] for g in again] == [c]
    job_a = m.job(a)
    assert (job_a.state, job_a.result, job_a.finish_time) == ("success", {"x": 1}, T0 + 100 - 40)
    assert job_a.runs[0]["start"] == T0 + 100 - 40 - 4
    assert m.job(b).state == "fail" and m.job(b).finish_time == T0 + 90
    assert not m.r.exists(m.keys.journal("w1"))


def test_a_journal_run_that_is_not_the_workers_any_more_is_reported_and_changes_nothing(m):
    a = m.create("a")
    _, [(_, a_token, _)] = batch(m, claim=1)
    m.s.recover(m.keys, now=T0 + 12_000)  # the lease expired: given back (it had no journal yet)
    m.check()
    before = m.hash(a)
    journal(m, "w1", a, a_token)
    batch(m, now=T0 + 13_000)
    assert m.rejected == [(a, a_token, "stale", "queued")]
    assert m.hash(a) == before


def test_abandon_applies_the_journal_of_the_worker_that_went(m):
    a, b = m.create("a"), m.create("a")
    _, [(_, a_token, _), _] = batch(m, claim=2)
    journal(m, "w1", a, a_token, payload='"done"')
    assert m.s.abandon(m.keys, "w1", "worker died", now=T0 + 50) == (0, 1, 0)
    m.check()
    assert m.job(a).result == "done" and m.state(b) == "queued"


def test_recover_saves_a_lost_workers_journal_before_it_recovers_what_is_left(m):
    a, b = m.create("a", opts={"process_timeout": 1}), m.create("a", opts={"process_timeout": 1})
    _, [(_, a_token, _), _] = batch(m, claimer="gone", claim=2)
    journal(m, "gone", a, a_token, payload='"saved"')
    m.recover(T0 + 1000 + LEASE_GRACE_MS)
    assert m.job(a).state == "success" and m.job(a).result == "saved"
    assert m.state(b) == "queued"  # prefetched, never started: back to its queue
    assert not m.r.exists(m.keys.journal("gone"))


def test_the_claim_record_keeps_the_jobs_of_earlier_batches_still_held(m):
    ids = [m.create("a") for _ in range(5)]
    _, first_batch = batch(m, claim=2)  # ids 0, 1
    _, second_batch = batch(m, runs=[(ids[0], first_batch[0][1], "success", "", 1, 0)],
                            claim=2)  # the next batch before the first is done
    held = [(job_id, got_token) for job_id, got_token, _ in first_batch[1:] + second_batch]
    assert held == [(i, token(1)) for i in ids[1:4]]
    assert parse_claim_record(m.r.get(m.keys.claim("w1"))) == held
    # a worker that dies now has all three unstarted jobs given back, in their order
    assert m.s.abandon(m.keys, "w1", "worker died", now=T0 + 10) == (0, 3, 0)
    m.check()
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == ids[1:]


def test_times_stay_whole_milliseconds_with_fractional_ages(m):
    a = m.create("a")
    _, [(_, a_token, _)] = batch(m, claim=1)
    journal(m, "w1", a, a_token, run_ms=3, ended_mono_ms=1000.123)
    m.s.finish_many(m.keys, "w1", [], [], 0, ["a"], now=T0 + 50, mono_ms=1010.987)
    fields = m.hash(a)
    for field in ("finish_time", "update_time", "scheduled_for", "total_process_time"):
        assert fields[field].isdigit(), (field, fields[field])
    assert fields["finish_time"] == str(T0 + 50 - 11)
    assert float(m.r.zscore(m.keys.finished, a)).is_integer()


@pytest.mark.parametrize("entry", [
    ("12345", token(1), "success", "", 1, 1481421.118),
    ("1", token(7), "start", "", 0, 5000.0),
    ("12", token(2), "fail", 'ValueError: "x"\n\u00e9\u2028', 3, 12.3456789),
    ("12", token(2), "success", '{"a": [1, 2.5e-07]}', 3, 1e9 + 0.1),
    ("a b", token(1), "success", "", 1, 1.0),  # not a plain word: json.dumps writes it
    ("\u0661\u0662", token(1), "success", "", 1, 1.0),  # digits, but not ASCII ones
    ("12", token(1), 'succ"ess', "", 1, 1.0),
    ("12", token(1), "success", "", 1.7, 2.0004),
])
def test_a_journal_entry_is_what_json_dumps_writes(entry):
    job_id, token, outcome, payload, run_ms, ended = entry
    expected = json.dumps([job_id, str(token), outcome, payload, int(run_ms), round(ended, 3)])
    assert journal_entry(*entry) == expected
