"""The Lua state machine, driven through kickq.scripts.Scripts with time moved by the `now` argument.

After every step the namespace is checked: each job in exactly the one structure its state says.
"""
from __future__ import annotations

import json
import os
import random
import re

import pytest

from kickq import layout, scripts
from kickq.connection import subscribe_notifications
from kickq.job import Job
from kickq.keys import Keys
from kickq.scripts import (_LIB, _LUA_DIR, LEASE_GRACE_MS, LIB_FILES, NAMES, Scripts, _read, create_args,
                           finish_args, parse_create)
from tests.structures import (assert_consistent, assert_gone, assert_one_structure, bookkeeping,
                              namespace_keys, stored, structures_of)

T0 = 1_700_000_000_000  # epoch ms; every test moves time by argument from here


def token(attempt, created=T0):
    """The attempt token of a job created at `created` (epoch ms), at its `attempt`-th claim."""
    return f"{attempt}:{created}"


class Machine:
    """The scripts on one namespace, with the invariants checked after every call."""

    def __init__(self, r, ns):
        self.r, self.ns = r, ns
        self.keys = Keys(ns)
        self.s = Scripts(r)

    def check(self):
        assert_consistent(self.r, self.ns)

    def create(self, name="a", opts=None, delay_ms=None, data=None, now=T0):
        return self.create_many([(name, opts, delay_ms, data)], now=now)[0]

    def create_many(self, items, now=T0):
        script_items = [(name, "" if data is None else json.dumps(data), json.dumps(opts) if opts else "",
                         delay_ms) for name, opts, delay_ms, data in items]
        created = parse_create(self.s.run("create", create_args(self.keys, script_items, now)))
        self.check()
        return [job_id for job_id, _ in created]

    def claim(self, *names, now=T0):
        got = self.s.claim(self.keys, names, now=now)
        self.check()
        for name in names:  # claim reconciles the wake tokens of every name it looked at
            assert self.r.llen(self.keys.wake(name)) == self.r.llen(self.keys.queue(name))
        return got

    def finish(self, job_id, token, outcome, payload="", claim_names=(), now=T0):
        result = self.s.finish(self.keys, job_id, token, outcome, payload, claim_names=claim_names, now=now)
        self.check()
        return result

    def promote(self, now, limit=500):
        result = self.s.promote(self.keys, now=now, limit=limit)
        self.check()
        return result

    def recover(self, now, limit=500):
        result = self.s.recover(self.keys, now=now, limit=limit)
        self.check()
        return result

    def purge(self, now, limit=500):
        result = self.s.purge(self.keys, now=now, limit=limit)
        self.check()
        return result

    def delete(self, job_id):
        result = self.s.delete(self.keys, job_id)
        self.check()
        return result

    def hash(self, job_id):
        """The job's fields: its packed new-job entry, else its hash."""
        return stored(self.r, self.ns, job_id)

    def job(self, job_id):
        fields = self.hash(job_id)
        assert fields, f"job {job_id} is gone"
        return Job.from_fields(job_id, fields)

    def state(self, job_id):
        return self.hash(job_id).get("state")

    def run_once(self, job_id, outcome, start, took=10, payload="", names=("a",)):
        """Claim `job_id` at `start`, finish it `took` ms later; returns the new state."""
        got = self.claim(*names, now=start)
        assert got is not None and got[0] == job_id
        status, new_state, _ = self.finish(job_id, got[1], outcome, payload, now=start + took)
        assert status == "ok"
        return new_state


@pytest.fixture
def m(r, namespace):
    return Machine(r, namespace)


# --- create ------------------------------------------------------------------------------------------

def test_create_new_goes_to_its_queue_with_a_wake_token(m):
    job_id = m.create("a", data={"x": 1})
    assert job_id == "1"
    assert structures_of(m.r, m.ns, job_id) == ["queue:a"]
    assert m.r.llen(m.keys.wake("a")) == 1
    job = m.job(job_id)
    assert (job.state, job.name, job.data, job.create_time, job.update_time) == ("new", "a", {"x": 1}, T0, T0)
    assert job.scheduled_for is None and job.runs == []
    assert m.r.sismember(m.keys.names, "a")


def test_a_new_job_is_packed_without_a_key_until_its_first_claim(m):
    # Awkward content: newlines inside JSON strings (escaped by JSON), a name with spaces, colons and
    # non-ASCII letters, stored options.
    data = {"text": "line 1\nline 2", "empty": ""}
    job_id = m.create("mail: señor ✓", opts={"process_timeout": 7}, data=data)
    empty_id = m.create("mail: señor ✓")
    assert not m.r.exists(m.keys.job(job_id)) and not m.r.exists(m.keys.job(empty_id))
    keys_before = m.r.dbsize()
    m.create_many([("mail: señor ✓", None, None, {"i": i}) for i in range(20)])
    assert m.r.dbsize() == keys_before  # no key per job
    assert m.r.hlen(m.keys.new_jobs) == 22
    packed = m.job(job_id)
    assert (packed.state, packed.name, packed.data, packed.process_timeout, packed.create_time) == (
        "new", "mail: señor ✓", data, 7, T0)
    assert m.job(empty_id).data is None
    got = m.claim("mail: señor ✓", now=T0 + 5)
    assert got[:2] == (job_id, token(1))
    assert not m.r.hexists(m.keys.new_jobs, job_id) and m.r.hexists(m.keys.new_jobs, empty_id)
    fields = m.r.hgetall(m.keys.job(job_id))
    assert got[2] == fields and got[1] == scripts.run_token(fields)
    assert {k: fields[k] for k in ("state", "attempt", "update_time", "run_start")} == {
        "state": "processing", "attempt": "1", "update_time": str(T0 + 5), "run_start": str(T0 + 5)}
    claimed = m.job(job_id)
    assert (claimed.name, claimed.data, claimed.process_timeout, claimed.create_time) == (
        "mail: señor ✓", data, 7, T0)
    assert m.r.zscore(m.keys.processing, job_id) == T0 + 5 + 7000 + LEASE_GRACE_MS


def test_a_packed_new_job_answers_every_script_as_a_new_job(m):
    job_id = m.create("a")
    assert m.finish(job_id, token(1), "success") == ("stale", "new", None)  # never claimed: not its run
    assert m.s.run("requeue", ([m.keys.id], [m.keys.prefix, T0, job_id])) == ["not_failed", "new"]
    assert m.r.hexists(m.keys.new_jobs, job_id)  # neither wrote anything
    assert m.delete(job_id) == 1
    assert not m.r.hexists(m.keys.new_jobs, job_id) and not m.r.exists(m.keys.job(job_id))
    assert m.r.llen(m.keys.queue("a")) == 0
    assert m.delete(job_id) == 0


def test_create_delayed_goes_to_the_delayed_zset(m):
    pubsub = m.r.pubsub(ignore_subscribe_messages=True)
    subscribe_notifications(m.r, pubsub, m.keys.reaper)  # SSUBSCRIBE on Redis 7 (the scripts SPUBLISH)
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    job_id = m.create("a", delay_ms=5000)
    assert structures_of(m.r, m.ns, job_id) == ["delayed"]
    assert m.r.zscore(m.keys.delayed, job_id) == T0 + 5000
    assert m.job(job_id).state == "delayed"
    assert m.job(job_id).scheduled_for == T0 + 5000
    assert m.r.llen(m.keys.wake("a")) == 0
    # A sleeping reaper is told about the earlier due time; a later one does not wake it again.
    message = pubsub.get_message(timeout=1)
    assert message is not None and message["data"] == str(T0 + 5000)
    m.create("a", delay_ms=9000)
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_create_delay_zero_is_delayed_and_due_at_once(m):
    job_id = m.create("a", delay_ms=0)
    assert m.state(job_id) == "delayed"
    assert m.promote(now=T0)[0] == 1
    assert m.state(job_id) == "queued"


def test_create_batch_gives_consecutive_ids(m):
    items = [("a", None, None, None), ("b", None, 10, [1]), ("a", {"retry": True}, None, "x")]
    assert m.create_many(items) == ["1", "2", "3"]
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == ["1", "3"]
    assert m.job("3").retry is True and m.job("1").retry is False


def test_create_without_now_uses_redis_time(m):
    job_id = m.create("a", now=None)
    seconds, micros = m.r.time()
    redis_now = seconds * 1000 + micros // 1000
    assert 0 <= redis_now - m.job(job_id).create_time < 2000


# --- claim --------------------------------------------------------------------------------------------

def test_claim_is_fifo_per_name(m):
    ids = [m.create("a") for _ in range(4)]
    claimed = [m.claim("a")[0] for _ in ids]
    assert claimed == ids
    assert m.claim("a") is None


def test_claim_follows_the_priority_order_of_names(m):
    b1, a1, b2, c1, a2 = m.create("b"), m.create("a"), m.create("b"), m.create("c"), m.create("a")
    order = [m.claim("a", "b")[0] for _ in range(4)]
    assert order == [a1, a2, b1, b2]
    assert m.claim("a", "b") is None
    assert m.claim("b", "c")[0] == c1


def test_claim_sets_lease_token_and_a_processing_run(m):
    job_id = m.create("a", opts={"process_timeout": 2.5})
    got_id, got_token, fields = m.claim("a", now=T0 + 7)
    assert got_id == job_id and got_token == token(1) == scripts.run_token(fields)
    assert m.r.zscore(m.keys.processing, job_id) == T0 + 7 + 2500 + LEASE_GRACE_MS
    assert fields["state"] == "processing"
    job = Job.from_fields(job_id, fields)
    assert job.runs == [{"count": 1, "start": T0 + 7, "time": None, "state": "processing", "error": None}]
    assert job.update_time == T0 + 7


def test_claim_lease_uses_the_default_process_timeout(m):
    job_id = m.create("a")
    m.claim("a", now=T0)
    assert m.r.zscore(m.keys.processing, job_id) == T0 + 10 * 1000 + LEASE_GRACE_MS


@pytest.mark.parametrize("seconds", [0.2, 1.001, 4.35, 0.007])
def test_fractional_seconds_become_whole_milliseconds_like_in_python(m, seconds):
    job_id = m.create("a", opts={"process_timeout": seconds, "purge_timeout": seconds})
    _, got_token, _ = m.claim("a", now=T0)
    assert m.r.zscore(m.keys.processing, job_id) == T0 + round(seconds * 1000) + LEASE_GRACE_MS
    m.finish(job_id, got_token, "success", now=T0 + 1)
    assert m.r.zscore(m.keys.finished, job_id) == T0 + 1 + round(seconds * 1000)


def test_claim_records_the_claimers_last_claim(m):
    first, second = m.create("a"), m.create("a")
    _, token, _ = m.s.claim(m.keys, ["a"], now=T0, claimer="w1")
    assert m.r.get(m.keys.claim("w1")) == f"{first} {token}"
    assert 0 < m.r.ttl(m.keys.claim("w1")) <= 86400
    _, _, (next_id, next_token, _) = m.s.finish(m.keys, first, token, "success", claim_names=["a"],
                                                claimer="w1", now=T0 + 1)
    assert m.r.get(m.keys.claim("w1")) == f"{second} {next_token}" and next_id == second
    m.create("a")
    m.claim("a")  # no claimer: nothing recorded
    assert m.r.keys(m.keys.prefix + "claim:*") == [m.keys.claim("w1")]
    m.check()


def test_claim_never_takes_a_delayed_job(m):
    m.create("a", delay_ms=100)
    assert m.claim("a", now=T0 + 10_000) is None  # due, but not promoted yet


def test_attempt_token_grows_with_every_claim(m):
    job_id = m.create("a", opts={"retry": True, "retry_interval": 0})
    tokens = []
    for i in range(3):
        got = m.claim("a", now=T0 + i * 100)
        tokens.append(got[1])
        m.finish(job_id, got[1], "fail", "x", now=T0 + i * 100 + 1)
        m.promote(now=T0 + i * 100 + 1)
    assert tokens == [token(1), token(2), token(3)]


# --- finish: success and fail -----------------------------------------------------------------------

def test_finish_success_records_result_and_schedules_the_purge(m):
    job_id = m.create("a", opts={"purge_timeout": 60})
    _, token, _ = m.claim("a", now=T0)
    assert m.finish(job_id, token, "success", json.dumps({"ok": 1}), now=T0 + 250) == ("ok", "success", None)
    job = m.job(job_id)
    assert (job.state, job.complete, job.success, job.result) == ("success", True, True, {"ok": 1})
    assert (job.finish_time, job.total_process_time, job.last_error) == (T0 + 250, 250, None)
    assert job.runs == [{"count": 1, "start": T0, "time": 250, "state": "success", "error": None}]
    assert m.r.zscore(m.keys.finished, job_id) == T0 + 250 + 60_000
    assert job.scheduled_for == T0 + 250 + 60_000


def test_finish_fail_without_retry_is_final(m):
    job_id = m.create("a")
    assert m.run_once(job_id, "fail", T0, payload="boom") == "fail"
    job = m.job(job_id)
    assert (job.complete, job.success, job.last_error, job.result) == (True, False, "boom", None)
    assert [run["state"] for run in job.runs] == ["fail"]
    assert job.runs[0]["error"] == "boom"


def drive(m, job_id, outcomes, step=100_000, name="a"):
    """Run the job once per outcome, promoting it in between; returns the state after each run."""
    states = []
    now = T0
    for outcome in outcomes:
        payload = "" if outcome == "success" else "boom"
        state = m.run_once(job_id, outcome, now, payload=payload, names=(name,))
        states.append(state)
        if state in ("success", "fail"):
            break
        due = int(m.job(job_id).scheduled_for)
        assert m.promote(now=due - 1)[0] == 0
        assert m.promote(now=due)[0] == 1
        now = max(now + step, due)
    return states


def test_retry_count_default_three_means_at_most_four_runs(m):
    job_id = m.create("a", opts={"retry": True, "retry_interval": 1})
    states = drive(m, job_id, ["fail"] * 10)
    assert states == ["retry", "retry", "retry", "fail"]
    job = m.job(job_id)
    assert [run["count"] for run in job.runs] == [1, 2, 3, 4]
    assert [run["state"] for run in job.runs] == ["fail"] * 4
    assert job.total_process_time == 40
    assert m.claim("a", now=T0 + 10**9) is None


@pytest.mark.parametrize("count, runs", [(0, 1), (1, 2), (5, 6)])
def test_retry_count_is_re_runs_after_failed_runs(m, count, runs):
    job_id = m.create("a", opts={"retry": True, "retry_count": count, "retry_interval": 0})
    states = drive(m, job_id, ["fail"] * 10)
    assert len(states) == runs and states[-1] == "fail"


def test_retry_then_success(m):
    job_id = m.create("a", opts={"retry": True, "retry_interval": 0})
    assert drive(m, job_id, ["fail", "fail", "success"]) == ["retry", "retry", "success"]
    assert m.job(job_id).success is True
    assert m.job(job_id).last_error == "boom"  # the last failed run's error stays on record
    assert [run["state"] for run in m.job(job_id).runs] == ["fail", "fail", "success"]


def test_retry_interval_list_is_used_per_attempt(m):
    job_id = m.create("a", opts={"retry": True, "retry_interval": [1, 2.5, 4]})
    now = T0
    delays = []
    for _ in range(3):
        assert m.run_once(job_id, "fail", now, took=10) == "retry"
        due = m.job(job_id).scheduled_for
        delays.append(due - (now + 10))
        assert m.promote(now=due - 1)[0] == 0
        assert m.promote(now=due)[0] == 1
        now = due
    assert delays == [1000, 2500, 4000]
    assert m.run_once(job_id, "fail", now) == "fail"


def test_retry_interval_list_shorter_than_retries_repeats_its_last(m):
    job_id = m.create("a", opts={"retry": True, "retry_count": 3, "retry_interval": [1, 2]})
    now, delays = T0, []
    for _ in range(3):
        m.run_once(job_id, "fail", now, took=0)
        due = m.job(job_id).scheduled_for
        delays.append(due - now)
        m.promote(now=due)
        now = due
    assert delays == [1000, 2000, 2000]


def test_retry_interval_number(m):
    job_id = m.create("a", opts={"retry": True, "retry_interval": 30})
    m.run_once(job_id, "fail", T0, took=5)
    assert m.job(job_id).state == "retry"
    assert m.r.zscore(m.keys.delayed, job_id) == T0 + 5 + 30_000


# --- ghosts -------------------------------------------------------------------------------------------

def test_ghost_count_default_one_means_two_ghost_runs_then_fail(m):
    job_id = m.create("a")
    m.run_once(job_id, "ghost", T0, payload="timed out")
    assert m.state(job_id) == "ghost"
    assert m.r.zscore(m.keys.delayed, job_id) == T0 + 10 + 1800 * 1000
    m.delete(job_id)
    job_id2 = m.create("b")
    assert drive(m, job_id2, ["ghost"] * 5, name="b") == ["ghost", "fail"]
    job = m.job(job_id2)
    assert [run["state"] for run in job.runs] == ["ghost", "ghost"]
    assert job.complete and not job.success


@pytest.mark.parametrize("opts, runs", [({"ghost_count": 0}, 1), ({"ghost_count": 2}, 3),
                                        ({"ghost_retry": False, "ghost_count": 5}, 1)])
def test_ghost_counting(m, opts, runs):
    job_id = m.create("a", opts={**opts, "ghost_interval": 1})
    states = drive(m, job_id, ["ghost"] * 10)
    assert len(states) == runs and states[-1] == "fail"


def test_ghost_runs_and_failed_runs_are_counted_apart(m):
    job_id = m.create("a", opts={"retry": True, "retry_count": 1, "retry_interval": 0, "ghost_interval": 0})
    assert drive(m, job_id, ["ghost", "fail", "fail", "fail"]) == ["ghost", "retry", "fail"]
    assert [run["state"] for run in m.job(job_id).runs] == ["ghost", "fail", "fail"]


# --- stale attempts, deleted jobs -------------------------------------------------------------------

def test_stale_token_is_rejected_and_changes_nothing(m):
    job_id = m.create("a", opts={"ghost_interval": 0})
    _, old, _ = m.claim("a", now=T0)
    lease = m.r.zscore(m.keys.processing, job_id)
    assert m.recover(now=lease) == (1, -1)  # the lease expired: ghost
    m.promote(now=lease)
    _, new, _ = m.claim("a", now=lease + 1)
    assert (old, new) == (token(1), token(2))
    before = m.hash(job_id)
    assert m.finish(job_id, old, "success", '"late"', now=lease + 2) == ("stale", "processing", None)
    assert m.hash(job_id) == before
    assert m.finish(job_id, new, "success", '"on time"', now=lease + 3)[:2] == ("ok", "success")
    done = m.hash(job_id)
    # The outcome is recorded once: a repeated finish (same token) is stale too.
    assert m.finish(job_id, new, "fail", "again", now=lease + 4) == ("stale", "success", None)
    assert m.finish(job_id, old, "ghost", "again", now=lease + 5) == ("stale", "success", None)
    assert m.hash(job_id) == done
    assert m.job(job_id).result == "on time"
    assert [run["state"] for run in m.job(job_id).runs] == ["ghost", "success"]


def test_finish_of_a_job_that_is_not_processing_is_stale(m):
    job_id = m.create("a")
    assert m.finish(job_id, token(1), "success") == ("stale", "new", None)
    assert m.job(job_id).state == "new"
    assert m.finish(job_id, "", "success") == ("stale", "new", None)


def test_finish_after_delete_is_missing_and_does_not_recreate_the_job(m):
    job_id = m.create("a")
    _, token, _ = m.claim("a")
    assert m.delete(job_id) is True
    for outcome in ("success", "fail", "ghost"):
        assert m.finish(job_id, token, outcome, '"x"', now=T0 + 5) == ("missing", "", None)
    assert_gone(m.r, m.ns, job_id)
    assert m.recover(now=T0 + 10**9) == (0, -1)
    assert_gone(m.r, m.ns, job_id)


def test_finish_after_purge_is_missing(m):
    job_id = m.create("a", opts={"purge_timeout": 0})
    _, token, _ = m.claim("a")
    m.finish(job_id, token, "success", now=T0 + 1)
    assert m.purge(now=T0 + 1)[0] == 1
    assert m.finish(job_id, token, "success", now=T0 + 2) == ("missing", "", None)
    assert_gone(m.r, m.ns, job_id)


def test_finish_rejects_an_unknown_outcome():
    with pytest.raises(ValueError):
        finish_args(Keys("x"), "1", token(1), "maybe")


# --- finish and claim the next job in one call ---------------------------------------------------

def test_finish_with_claim_names_claims_the_next_job(m):
    first, second = m.create("a"), m.create("a")
    _, first_token, _ = m.claim("a", now=T0)
    status, state, nxt = m.finish(first, first_token, "success", claim_names=["a"], now=T0 + 5)
    assert (status, state) == ("ok", "success")
    next_id, next_token, fields = nxt
    assert (next_id, next_token, fields["state"]) == (second, token(1), "processing")
    assert m.r.zscore(m.keys.processing, second) == T0 + 5 + 10_000 + LEASE_GRACE_MS
    assert m.r.llen(m.keys.wake("a")) == 0
    assert m.finish(second, next_token, "success", claim_names=["a"], now=T0 + 6) == ("ok", "success", None)


def test_stale_finish_still_claims_the_next_job(m):
    first, second = m.create("a"), m.create("b")
    m.claim("a")
    status, state, nxt = m.finish(first, token(99), "success", claim_names=["b"])
    assert (status, state, nxt[0]) == ("stale", "processing", second)


# --- promote ------------------------------------------------------------------------------------------

def test_promote_only_when_due(m):
    job_id = m.create("a", delay_ms=5000)
    later = m.create("a", delay_ms=9000)
    assert m.promote(now=T0 + 4999) == (0, T0 + 5000, T0 + 4999)
    assert m.state(job_id) == "delayed"
    assert m.promote(now=T0 + 5000) == (1, T0 + 9000, T0 + 5000)
    assert m.state(job_id) == "queued" and m.state(later) == "delayed"
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [job_id]
    assert m.r.llen(m.keys.wake("a")) == 1
    assert m.job(job_id).scheduled_for is None
    assert m.promote(now=T0 + 10_000) == (1, -1, T0 + 10_000)


def test_promote_respects_its_limit(m):
    for _ in range(3):
        m.create("a", delay_ms=0)
    assert m.promote(now=T0, limit=2)[0] == 2
    assert m.promote(now=T0, limit=2)[0] == 1
    assert m.r.llen(m.keys.queue("a")) == 3


# --- recover ------------------------------------------------------------------------------------------

def test_recover_only_after_the_lease_expired(m):
    job_id = m.create("a")
    m.claim("a", now=T0)
    lease = T0 + 10_000 + LEASE_GRACE_MS
    assert m.recover(now=lease - 1) == (0, lease)
    assert m.state(job_id) == "processing"
    assert m.recover(now=lease) == (1, -1)
    job = m.job(job_id)
    assert job.state == "ghost"
    assert job.runs[-1]["state"] == "ghost" and job.runs[-1]["time"] == lease - T0
    assert "lease expired" in job.runs[-1]["error"] and job.last_error == job.runs[-1]["error"]
    assert m.r.zscore(m.keys.delayed, job_id) == lease + 1800 * 1000


def test_recover_fails_a_job_out_of_ghost_runs(m):
    job_id = m.create("a", opts={"ghost_retry": False})
    m.claim("a", now=T0)
    assert m.recover(now=T0 + 10**6)[0] == 1
    assert m.state(job_id) == "fail"
    assert structures_of(m.r, m.ns, job_id) == ["finished"]


# --- purge --------------------------------------------------------------------------------------------

def test_purge_only_after_purge_timeout_and_leaves_no_keys_for_the_job(m):
    job_id = m.create("a", opts={"purge_timeout": 60})
    keep = m.create("a")
    keys_before = set(namespace_keys(m.r, m.ns))
    m.run_once(job_id, "success", T0, took=0)
    assert m.purge(now=T0 + 59_999) == (0, T0 + 60_000)
    assert m.state(job_id) == "success"
    assert m.purge(now=T0 + 60_000) == (1, -1)
    assert_gone(m.r, m.ns, job_id)
    assert m.state(keep) == "new"  # waiting jobs are never purged
    leftover = {k for k in set(namespace_keys(m.r, m.ns)) - keys_before if not bookkeeping(k, m.ns)}
    assert leftover <= {m.keys.processing, m.keys.finished}  # (empty zsets do not exist)
    assert not any(key.endswith(":" + job_id) for key in namespace_keys(m.r, m.ns))


def test_purge_handles_failed_jobs_too(m):
    job_id = m.create("a", opts={"purge_timeout": 1})
    m.run_once(job_id, "fail", T0, took=0)
    assert m.purge(now=T0 + 1000) == (1, -1)
    assert_gone(m.r, m.ns, job_id)


# --- delete in every state ----------------------------------------------------------------------------

def test_delete_in_every_state(m):
    ids = {
        "new": m.create("a"),
        "delayed": m.create("a", delay_ms=10**6),
        "processing": m.create("b"),
        "success": m.create("c"),
        "retry": m.create("d", opts={"retry": True}),
    }
    m.claim("b")
    m.run_once(ids["success"], "success", T0, names=("c",))
    m.run_once(ids["retry"], "fail", T0, names=("d",))
    for state, job_id in ids.items():
        assert m.state(job_id) == state
        assert m.delete(job_id) is True
        assert_gone(m.r, m.ns, job_id)
        assert m.delete(job_id) is False


# --- wake tokens -------------------------------------------------------------------------------------

def test_wake_tokens_equal_queue_length_after_claims(m):
    for _ in range(3):
        m.create("a")
    assert m.r.llen(m.keys.wake("a")) == 3
    m.claim("a")
    assert m.r.llen(m.keys.wake("a")) == 2
    m.delete("3")  # a token is left behind for a moment ...
    assert m.r.llen(m.keys.wake("a")) == 2 and m.r.llen(m.keys.queue("a")) == 1
    m.claim("a")  # ... and mended at the next claim
    assert not m.r.exists(m.keys.wake("a"))


def test_claim_reconciles_lost_and_extra_wake_tokens(m):
    for _ in range(4):
        m.create("a")
    m.r.delete(m.keys.wake("a"))  # tokens lost with a dying worker
    m.claim("a")
    assert m.r.llen(m.keys.wake("a")) == 3
    m.r.rpush(m.keys.wake("a"), *["1"] * 5)
    m.create("b")
    m.claim("b", "a")  # reconciles every name it looked at, even one it did not claim from
    assert m.r.llen(m.keys.wake("a")) == 3
    assert m.claim("nothing") is None


# --- invariants under a random walk -------------------------------------------------------------------

def test_random_walk_keeps_every_job_in_exactly_one_structure(m):
    rng = random.Random(20240607)
    now = T0
    tokens: dict[str, str] = {}
    names = ["a", "b", "job name"]
    for _ in range(500):
        now += rng.randint(0, 3000)
        op = rng.choice(["create", "create", "claim", "claim", "finish", "finish", "promote", "recover",
                         "purge", "delete"])
        if op == "create":
            opts = rng.choice([None, {"retry": True, "retry_interval": 0.5, "retry_count": 1},
                               {"ghost_interval": 1, "process_timeout": 0.5}, {"purge_timeout": 2}])
            m.create(rng.choice(names), opts=opts, delay_ms=rng.choice([None, None, 0, 1500]), now=now)
        elif op == "claim":
            got = m.claim(*rng.sample(names, rng.randint(1, 3)), now=now)
            if got:
                tokens[got[0]] = got[1]
        elif op == "finish" and tokens:
            job_id = rng.choice(sorted(tokens))
            attempt, created = tokens[job_id].split(":")
            run = f"{int(attempt) - rng.choice([0, 0, 0, 1])}:{created}"  # sometimes a superseded attempt
            m.finish(job_id, run, rng.choice(["success", "fail", "ghost"]), "x", now=now,
                     claim_names=rng.choice([(), ("a",)]))
        elif op == "promote":
            m.promote(now=now)
        elif op == "recover":
            m.recover(now=now)
        elif op == "purge":
            m.purge(now=now)
        elif op == "delete":
            m.delete(str(rng.randint(1, 40)))
    states = {m.state(str(i)) for i in range(1, 60)} - {None}
    assert len(states) >= 4  # the walk really went through the machine
    for i in range(1, 60):
        if m.state(str(i)):
            assert_one_structure(m.r, m.ns, str(i))


# --- the scripts themselves ----------------------------------------------------------------------------

def _lua(name):
    return _read(name)


def _header_and_body(name):
    text = _lua(name)
    header = re.match(r"--\[\[(.*?)\]\]", text, re.S)
    assert header, f"{name}.lua does not start with a --[[ ... ]] header"
    return header.group(1), text[header.end():]


def _documented_and_used(doc, body, table):
    """(indices the header describes one by one, the starts of ranges it describes as "T[n..]",
    indices the body reads one by one, the starts of the ranges it reads to the end) of KEYS or ARGV."""
    documented = {int(n) for n in re.findall(rf"^\s*{table}\[(\d+)\]", doc, re.M)}
    open_ended = {int(n) for n in re.findall(rf"^\s*{table}\[(\d+)\s*\.\.", doc, re.M)}
    used = {int(n) for n in re.findall(rf"\b{table}\[(\d+)\]", body)}
    read_on = {int(n) for n in re.findall(rf"for i = (\d+), #{table}\b", body)}
    read_on |= {int(n) for n in re.findall(rf"unpack\({table}, (\d+)\)", body)}
    return documented, open_ended, used, read_on


@pytest.mark.parametrize("name", NAMES)
def test_each_script_header_names_its_keys_and_argv(name):
    doc, body = _header_and_body(name)
    assert "Returns" in doc
    documented, open_ended, used, read_on = _documented_and_used(doc, body, "ARGV")
    assert 1 in documented and 1 in used, f"{name}.lua: ARGV[1] (the prefix P) is not described and read"
    for index in used - documented:
        assert any(index >= start for start in open_ended), (
            f"{name}.lua uses ARGV[{index}] without describing it in its header")
    assert documented <= used, f"{name}.lua describes ARGV {sorted(documented - used)} it never reads"
    assert open_ended == read_on, (
        f"{name}.lua describes ARGV ranges from {sorted(open_ended)} but reads ranges from {sorted(read_on)}")
    # Indices computed at run time (groups after a count) are described in prose: without a range
    # to the end, the header describes groups exactly when the body reads ARGV by a computed index
    # or hands ARGV to a helper.
    computed = not open_ended and bool(re.search(r"ARGV\[(?!\d+\])", body)
                                           or re.search(r"[(,]\s*ARGV\s*[,)]", body))
    groups = re.search(r"^\s*ARGV\[.*(groups of|per job)", doc, re.M)
    assert computed == bool(groups), (
        f"{name}.lua: " + ("reads ARGV by computed indices its header does not describe as groups" if computed
                           else "header describes groups of ARGV the body never reads"))
    keys, keys_open, keys_used, keys_read_on = _documented_and_used(doc, body, "KEYS")
    assert keys == {1, 2} and not keys_open, f"{name}.lua header must describe KEYS[1] and KEYS[2] only"
    assert re.search(r'^\s*KEYS\[1\]\s+P\.\."id"\s+\(routing only', doc, re.M), (
        f'{name}.lua: KEYS[1] is P.."id", for routing only (every key derives from P)')
    assert re.search(r'^\s*KEYS\[2\]\s+P\.\."route-guard"\s+\(never exists', doc, re.M), (
        f'{name}.lua: KEYS[2] is P.."route-guard", which never exists (layout.SCRIPT_KEYS)')
    assert not keys_used and not keys_read_on, f"{name}.lua reads KEYS {sorted(keys_used)}"
    assert "KEYS[" not in body, f"{name}.lua reads KEYS: every key derives from the prefix ARGV[1]"


def test_every_script_call_declares_the_layout_script_keys():
    keys = Keys("ns")
    assert keys.script_keys == ["{ns}:" + key for key in layout.SCRIPT_KEYS]
    assert keys.script_keys == ["{ns}:id", "{ns}:route-guard"]
    for call in (scripts.create_args(keys, [("a", "", "", None)]), scripts.claim_args(keys, ["a"]),
                 scripts.sweep_args(keys, 10), scripts.delete_args(keys, "1"),
                 scripts.finish_many_args(keys, "c"), scripts.abandon_args(keys, "c", "e")):
        assert call[0] == keys.script_keys


def test_lib_header_describes_the_structures():
    header = re.match(r"--\[\[(.*?)\]\]", _lua("_lib_core"), re.S).group(1)
    for word in ("queue:", "delayed", "processing", "finished", "KEYS[1]", "ARGV[1]"):
        assert word in header


# --- the shared helpers' files, and the layout (kickq/layout.py) the Lua is held to ------------------

def _code_only(text):
    """Lua text without its comments and string literals (whose words name nothing)."""
    return re.sub(r"--\[\[.*?\]\]|--[^\n]*|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"", " ", text, flags=re.S)


def _named_keys(text):
    """The keys a text names as P.."<key>" (a header) or P .. '<key>' (code): family keys (those
    followed by a last part) end in ':'; any other is a single key."""
    found = set()
    for key, part in re.findall(r"""P ?\.\. ?["']([^"']*)["']( ?\.\.)?""", text):
        assert key.endswith(":") == bool(part), f"P .. {key!r} {'with' if part else 'without'} a last part"
        found.add(key)
    return found


def _without_comments(text):
    return re.sub(r"--\[\[.*?\]\]|--[^\n]*", " ", text, flags=re.S)


def _all_lua():
    return {name: _lua(name) for name in (*LIB_FILES, *NAMES)}


def test_the_lib_files_are_the_ones_read():
    on_disk = {f[:-4] for f in os.listdir(_LUA_DIR) if f.endswith(".lua")}
    assert {f for f in on_disk if f.startswith("_")} == set(LIB_FILES)
    assert on_disk - set(LIB_FILES) == set(NAMES)


@pytest.mark.parametrize("name", LIB_FILES)
def test_each_lib_file_header_names_what_it_holds_and_the_keys_it_builds(name):
    doc, body = _header_and_body(name)
    assert doc.startswith(f" {name}.lua: "), f"{name}.lua's header does not start with its name and content"
    assert "Keys:" in doc, f"{name}.lua's header has no 'Keys:' part"
    described, built = _named_keys(doc.split("Keys:", 1)[1]), _named_keys(_without_comments(body))
    assert described == built, f"{name}.lua: header {sorted(described)}, code {sorted(built)}"


def test_every_helper_is_defined_before_it_is_used():
    # A Lua local is seen only by the lines after it: a helper used above its definition would be
    # read as an (absent) global, an error only when that line runs.
    defined = set()
    for name, text in _LIB.blocks:
        if name is None:
            continue
        used = set(re.findall(r"[A-Za-z_]\w*", _code_only(text))) & set(_LIB.uses)
        later = used - defined - {name}
        assert later == set(), f"{name} uses {sorted(later)}, defined after it"
        defined.add(name)


def test_every_key_the_lua_names_is_one_of_the_layout():
    named = set()
    for name, text in _all_lua().items():
        named |= _named_keys(_without_comments(text))
        # Keys built from a variable: the job zsets, iterated
        for zsets in re.findall(r"for _, (\w+) in ipairs\(\{([^}]*)\}\) do.*?\bP \.\. \1\b", text, re.S):
            assert tuple(re.findall(r"'([^']*)'", zsets[1])) == layout.JOB_ZSETS, name
        assert not re.search(r"\bP \.\. (?!'|z\b)", text), f"{name}.lua builds a key the test cannot read"
    defined = set(layout.SINGLE_KEYS) | set(layout.KEY_FAMILIES)
    assert named - defined == set(), "the Lua names keys kickq/layout.py does not define"
    assert defined - named == set(), "kickq/layout.py defines keys no script uses"


def test_the_core_header_gives_each_state_the_structure_of_the_layout():
    header = _header_and_body("_lib_core")[0]
    table = {}
    for states, key in re.findall(r"^\s*([a-z, ]+?)\s*->\s*\w+\s+P\.\.\"([a-z:]+)\"", header, re.M):
        for state in states.split(", "):
            table[state] = layout.QUEUE_STRUCTURE if key == layout.QUEUE else key
    assert table == layout.STRUCTURE_OF_STATE


def test_the_design_doc_lists_the_keys_of_the_layout():
    with open(os.path.join(os.path.dirname(_LUA_DIR), os.pardir, "docs", "design.md"), encoding="utf-8") as f:
        doc = f.read()
    rows = re.findall(r"^\| `\{ns\}:([a-z:]+)(?:<[^>]*>)?` \| ([a-z/ ]+?) \|", doc, re.M)
    assert dict(rows) == {**layout.SINGLE_KEYS, **layout.KEY_FAMILIES}
    assert len(rows) == len(dict(rows))


def _plant(m, job_id, state, name="a", due=T0):
    """A job hash in `state`, held by the structure the layout gives that state (and only it)."""
    m.r.hset(m.keys.job(job_id), mapping={"name": name, "state": state, "create_time": T0, "update_time": T0,
                                           "scheduled_for": due})
    where = layout.structure_of(state, name)
    if where.startswith(layout.QUEUE):
        m.r.rpush(m.keys.queue(name), job_id)
        m.r.rpush(m.keys.wake(name), "1")
    else:
        m.r.zadd(m.keys.prefix + where, {job_id: due})
    m.check()


@pytest.mark.parametrize("state", layout.STATES)
def test_the_scripts_find_put_and_remove_a_job_where_the_layout_says(m, state):
    where = layout.structure_of(state, "a")
    queued = layout.STRUCTURE_OF_STATE[state] == layout.QUEUE_STRUCTURE
    # repair_inspect finds it there; repair_index and repair_state find nothing wrong
    _plant(m, "1", state)
    assert m.s.run("repair_inspect", ([m.keys.id], [m.keys.prefix, "1"])) == [1, state, "a", where, 1]
    assert m.s.run("repair_index", ([m.keys.id], [m.keys.prefix, T0, "1"])) == []
    assert m.s.run("repair_state", ([m.keys.id], [m.keys.prefix, T0, "1"])) == 0
    # repair_index puts it there from anywhere: from no structure, or from all of them
    m.r.lrem(m.keys.queue("a"), 0, "1")
    for zset in layout.JOB_ZSETS:
        m.r.zrem(m.keys.prefix + zset, "1")
    m.s.run("repair_index", ([m.keys.id], [m.keys.prefix, T0, "1"]))
    assert structures_of(m.r, m.ns, "1") == [where]
    m.r.rpush(m.keys.queue("a"), "1")
    for zset in layout.JOB_ZSETS:
        m.r.zadd(m.keys.prefix + zset, {"1": T0})
    m.s.run("repair_index", ([m.keys.id], [m.keys.prefix, T0, "1"]))
    assert structures_of(m.r, m.ns, "1") == [where]
    m.check()
    # delete takes it out of there
    assert m.delete("1") == 1
    assert_gone(m.r, m.ns, "1")
    # claim takes it from its queue only if its state is a queue's; promote from delayed likewise
    _plant(m, "2", state)
    if not queued:
        m.r.rpush(m.keys.queue("a"), "2")  # a stray entry, dropped
    got = m.claim("a", now=T0)
    assert (got is not None and got[0] == "2") == queued
    assert m.r.llen(m.keys.queue("a")) == 0
    _plant(m, "3", state)
    if where != layout.DELAYED:
        m.r.zadd(m.keys.delayed, {"3": T0})  # a stray entry, dropped
    m.promote(now=T0 + 1)
    assert m.state("3") == ("queued" if where == layout.DELAYED else state)
    assert m.r.zcard(m.keys.delayed) == 0


def test_new_jobs_are_packed_and_unpacked_as_the_layout_says(m):
    data, opts = json.dumps({"text": "line 1\nline 2"}), json.dumps({"process_timeout": 7})
    packed_ids = m.create_many([("mail: señor ✓", {"process_timeout": 7}, None, {"text": "line 1\nline 2"}),
                                ("a", None, None, None)])
    assert m.r.hget(m.keys.new_jobs, packed_ids[0]) == layout.pack_new("mail: señor ✓", T0, opts, data)
    assert m.r.hget(m.keys.new_jobs, packed_ids[1]) == layout.pack_new("a", T0, "", "")
    # and the scripts read a record packed as the layout packs it
    job_id = str(m.r.incr(m.keys.id))
    m.r.hset(m.keys.new_jobs, job_id, layout.pack_new("b", T0 - 5, opts, data))
    m.r.rpush(m.keys.queue("b"), job_id)
    m.check()
    got = m.claim("b", now=T0)
    assert got[0] == job_id
    assert {k: v for k, v in got[2].items() if k in layout.PACKED_FIELDS} == {
        "name": "b", "create_time": str(T0 - 5), "opts": opts, "data": data}
    assert m.r.zscore(m.keys.processing, job_id) == T0 + 7000 + LEASE_GRACE_MS


def test_scripts_are_reloaded_after_script_flush(m):
    m.create("a")
    m.r.script_flush()
    assert m.claim("a")[0] == "1"
    pipe = m.r.pipeline(transaction=True)
    m.r.script_flush()
    m.s.run("create", create_args(m.keys, [("a", "", "", None)], T0), client=pipe)
    assert parse_create(pipe.execute()[0])[0][0] == "2"


def test_promote_moves_only_waiting_jobs(m):
    job_id = m.create("a")
    m.run_once(job_id, "success", T0, took=0)
    m.r.zadd(m.keys.delayed, {job_id: T0})  # a stray id of a finished job
    assert m.promote(now=T0 + 1)[0] == 1
    assert m.state(job_id) == "success"
    assert m.r.zscore(m.keys.delayed, job_id) is None
    assert m.r.llen(m.keys.queue("a")) == 0
