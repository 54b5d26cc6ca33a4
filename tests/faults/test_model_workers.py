"""Case 11b: the workers' protocol (claims ahead, start marks, journals, hand-offs, abandon, recover)
against what the Lua scripts must do."""

from __future__ import annotations

from kickq.scripts import journal_entry
from tests.test_scripts import Machine

T0 = 1_700_000_000_000
ABANDONED = "worker died right after claiming the job: killed by SIGKILL"


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
    m.r.rpush(m.keys.journal("w1"), journal_entry(upcoming, 1, "start", "", 0, 1015.0))
    statuses, _, _ = m.s.finish_many(m.keys, "w1", [(first, 1, "success", "", 5, 0)], claim=1,
                                     claim_names=["a"], now=T0 + 20, mono_ms=1020.0)
    assert statuses == [("ok", "success")]
    assert m.hash(upcoming)["run_start"] == str(T0 + 15)  # the mark, applied
    # the master holds the first run's outcome (its F message) and saw no other start
    assert m.s.abandon(m.keys, "w1", ABANDONED, [(first, 1, "success", "", 5, 10)], now=T0 + 30) == (0, 1, 0)
    m.check()
    assert m.state(upcoming) == "queued" and m.job(upcoming).runs == []
    assert m.r.lrange(m.keys.queue("a"), 0, -1) == [upcoming]
    # a job claimed to start at once that the master never heard of is still ghosted
    _, token, _ = m.s.claim(m.keys, ["a"], now=T0 + 40, claimer="w1")
    assert m.s.abandon(m.keys, "w1", ABANDONED, now=T0 + 50) == (0, 0, 1)
    assert m.state(upcoming) == "fail" and m.job(upcoming).attempt == token
