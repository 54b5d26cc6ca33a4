"""The worker's decisions (worker_core.py), driven command by command with a fake clock and replies
written by hand: no fork, no Redis. Each test answers the commands the core yields as Redis, the
handler and the pipe would, and checks what it does next."""
from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from kickq.backoff import Backoff
from kickq.keys import Keys
from kickq_supervisor.messages import Finished, Started
from kickq_supervisor.runner import Outcome
from kickq_supervisor.worker_core import (
    MAX_PREFETCH_WAIT,
    AwaitEnd,
    ClaimOne,
    ClaimRecord,
    Ended,
    FinishMany,
    Interrupted,
    JournalPush,
    Lost,
    Pause,
    ReadClaimRecord,
    Refused,
    Settle,
    ShowIdle,
    ShrinkHeap,
    Start,
    Tell,
    WaitForWork,
    Woke,
    WorkerCore,
)

KEYS = Keys("t")
Send = (FinishMany, JournalPush)  # the two calls sent without waiting
RUN_TIME = 2 ** -10  # every handler takes about 1 ms of the fake clock (exact in binary): batches of 4
CREATED = 1699999990000  # the create time (epoch ms) of every job of a fake claim


def token(attempt: int = 1) -> str:
    """The attempt token of a fake claim's job at its `attempt`-th claim (scripts.run_token)."""
    return f"{attempt}:{CREATED}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def no_jitter() -> Backoff:
    """The core's backoff without randomness: 50 ms, then doubling."""
    return Backoff(first=0.05, cap=2.0)


class Steps:
    """A WorkerCore's commands, one at a time: `expect` the pending one, `answer` it."""

    def __init__(self, clock: Clock | None = None, **options: Any) -> None:
        self.clock = clock or Clock()
        options.setdefault("prefetch", 4)
        self.core = WorkerCore(1, ["w"], KEYS, "me", clock=self.clock, backoff=no_jitter(), **options)
        self.gen = self.core.steps()
        self.command: Any = next(self.gen)
        self.told: list[tuple[Any, ...]] = []  # every Tell's messages, in order
        self.started: list[str] = []  # the jobs started, in order

    def expect(self, kind: type) -> Any:
        assert isinstance(self.command, kind), f"expected {kind.__name__}, got {self.command!r}"
        return self.command

    def answer(self, result: Any = None) -> Any:
        try:
            self.command = self.gen.send(result)
        except StopIteration:
            self.command = None
        return self.command

    def step(self, kind: type, result: Any = None) -> Any:
        command = self.expect(kind)
        self.answer(result)
        return command

    def run_job(self, outcome: Outcome | None = None, seconds: float = RUN_TIME, *,
                awaited: bool = False) -> str:
        """Answer the pipe and journal writes up to the handler's start, then end the run: as the
        answer to Start (the handler ran right there), or with `awaited` by AwaitEnd."""
        while isinstance(self.command, (Tell, Send)) and not isinstance(self.command, FinishMany):
            if isinstance(self.command, Tell):
                self.told.append(self.command.messages)
            self.answer(None)
        job = self.expect(Start).job
        self.started.append(job.job_id)
        self.clock.advance(seconds)
        ended = Ended(job.job_id, outcome or Outcome(True, f'"ok {job.job_id}"'))
        if awaited:
            self.answer(None)
            self.step(AwaitEnd, ended)
        else:
            self.answer(ended)
        return job.job_id

    def sends(self) -> list[Any]:
        """Answer the writes pending (each sent fine); their calls."""
        calls = []
        while isinstance(self.command, Send):
            calls.append(self.step(Send))
        return calls

    def settle(self, claimed: list[list[Any]] = (), refuse: dict[int, Exception] | None = None  # type: ignore[assignment]
               ) -> None:
        """Answer a pending Settle as Redis would: each finish_many saved its runs, and the one that
        claims returns `claimed`; call number i in flight (from 0) is refused with `refuse[i]`."""
        replies: list[Any] = []
        for i, call in enumerate(self.core.inflight):
            if refuse and i in refuse:
                replies += [refuse[i]] + [1] * (call.replies - 1)
            elif isinstance(call, FinishMany):
                replies.append(finish_many_reply(len(call.runs), claimed if call.want else []))
            else:
                replies += [1] * call.replies
        self.step(Settle, replies)

    def tell(self) -> tuple[Any, ...]:
        messages = self.step(Tell).messages
        self.told.append(messages)
        return messages


def claim(job_id: str, attempt: int = 1, *, ahead: bool = False, opts: dict[str, Any] | None = None
          ) -> list[Any]:
    """A claim reply (the claim script's, or one entry of finish_many's): id, token, the job's fields.
    A job claimed ahead (a batch, a hand-off) has no run_start."""
    fields = ["name", "w", "state", "processing", "attempt", str(attempt), "create_time", str(CREATED),
              "update_time", "1700000000000"]
    if not ahead:
        fields += ["run_start", "1700000000000"]
    if opts:
        fields += ["opts", json.dumps(opts)]
    return [job_id, token(attempt), *fields]


def finish_many_reply(runs: int, claimed: list[list[Any]] = ()) -> list[Any]:  # type: ignore[assignment]
    return [["ok"] * runs, ["success"] * runs, list(claimed), []]


def journal(call: JournalPush) -> list[list[str]]:
    """The entries of a journal push: [id, token, outcome] each."""
    rpush = call.commands[0]
    assert rpush[:2] == ("RPUSH", KEYS.journal("me"))
    return [json.loads(entry)[:3] for entry in rpush[2:]]


def first_job(s: Steps, opts: dict[str, Any] | None = None) -> None:
    """An idle worker claims job 1 (nothing in flight, nothing in hand)."""
    s.step(ShowIdle)
    s.step(ClaimOne, tuple_claim(claim("1", opts=opts)))


def tuple_claim(reply: list[Any]) -> tuple[str, str, dict[str, str]]:
    from kickq import scripts

    parsed = scripts.parse_claim(reply)
    assert parsed is not None
    return parsed


def batch(s: Steps, ids: list[str], opts: dict[str, Any] | None = None) -> FinishMany:
    """Job 1 runs, and the finish_many that saves it claims `ids` ahead; the reply is read."""
    first_job(s, opts)
    s.run_job()
    s.tell()
    call = s.step(Send)
    assert isinstance(call, FinishMany) and call.want == 4 and [d.job_id for d in call.runs] == ["1"]
    s.step(Settle, [finish_many_reply(1, [claim(i, ahead=True, opts=opts) for i in ids])])
    return call


# --- idle ---------------------------------------------------------------------------------------------

def test_an_idle_worker_claims_then_waits_registered_for_hand_offs():
    s = Steps(wait_timeout=0.5)
    s.step(ShowIdle)
    assert s.step(ClaimOne, None).idle_ms == 1000  # registered as idle for the wait + 0.5 s
    assert s.step(WaitForWork, Woke(None, True)).timeout == 0.5
    s.step(ShrinkHeap)  # a whole wait idle: the heap may shrink
    s.step(ClaimOne, tuple_claim(claim("1")))  # after a timeout it claims again: a lost token
    (started,) = s.tell()
    assert started == Started("1", token(), s.clock.now, 10.0, "w")
    assert s.step(Start).job.job_id == "1"  # a run still going: its end comes by AwaitEnd
    s.expect(AwaitEnd)


def test_a_job_handed_over_starts_without_a_claim_after_its_start_mark():
    s = Steps()
    s.step(ShowIdle)
    s.step(ClaimOne, None)
    handed = json.dumps(claim("7", ahead=True))
    s.step(WaitForWork, Woke(handed, False))
    push = s.step(Send)
    assert isinstance(push, JournalPush) and journal(push) == [["7", token(), "start"]]
    assert push.commands[1] == ("EXPIRE", KEYS.journal("me"), 86400)  # a fresh journal gets its TTL
    assert s.tell()[0].job_id == "7"
    assert s.step(Start).job.job_id == "7"


def test_a_claim_refused_or_lost_backs_off_and_a_lost_one_is_looked_up():
    s = Steps()
    s.step(ShowIdle)
    s.step(ClaimOne, Lost(redis.exceptions.ConnectionError("gone")))
    assert s.step(Pause).seconds == 0.05
    # Back in the loop: the lost claim may have run, so the claim record is read first.
    s.step(ReadClaimRecord, ClaimRecord([], 1700000000000))
    s.step(ShowIdle)
    s.step(ClaimOne, Refused(redis.exceptions.OutOfMemoryError("command not allowed")))
    assert s.step(Pause).seconds == 0.1  # doubled; a refused claim took nothing: no record to read
    s.step(ShowIdle)
    s.step(ClaimOne, tuple_claim(claim("1")))
    s.tell()
    s.step(Start)


def test_a_stop_during_the_wait_leaves_at_once():
    s = Steps()
    s.step(ShowIdle)
    s.step(ClaimOne, None)
    s.step(WaitForWork, Interrupted())
    leaving = s.step(Send)  # ends the idle registration, takes what its inbox holds
    assert isinstance(leaving, FinishMany) and leaving.want == 0 and not leaving.runs
    s.step(Settle, [finish_many_reply(0, [claim("9", ahead=True)])])
    back = s.step(Send)  # a job handed over meanwhile goes back
    assert back.give_back == [("9", token())]
    s.step(Settle, [finish_many_reply(0)])
    assert s.command is None


def test_a_run_whose_end_comes_apart_from_its_start_is_saved_the_same():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job(awaited=True)  # Start answered None: the run went on, its end came by AwaitEnd
    assert [m.job_id for m in s.tell()] == ["2", "3"]
    assert journal(s.sends()[0]) == [["2", token(), "success"], ["3", token(), "start"]]


# --- busy: batches, the journal, start marks ------------------------------------------------------

def test_the_outcome_that_empties_the_hand_claims_the_next_batch():
    s = Steps()
    call = batch(s, ["2", "3", "4", "5"])
    assert call.idle_ms > 0  # holding nothing else, it registers as idle should nothing come back
    assert s.run_job() == "2"


def test_the_next_jobs_start_mark_rides_with_the_previous_outcome():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    first = s.step(Send)  # the first of a batch: a write of its own
    assert journal(first) == [["2", token(), "start"]]
    assert s.run_job() == "2"
    assert [type(m) for m in s.tell()] == [Finished, Started]
    push = s.step(Send)
    assert journal(push) == [["2", token(), "success"], ["3", token(), "start"]]
    assert len(push.commands) == 1  # the journal has its TTL already
    # Job 3 was marked and announced with job 2's end: it starts with no write at all.
    assert s.step(Start).job.job_id == "3"


def test_the_next_start_goes_to_the_master_in_the_same_write_as_the_last_end():
    s = Steps()
    batch(s, ["2", "3", "4", "5"], {"process_timeout": 7})
    s.told.clear()
    for _ in range(4):
        s.run_job()
        s.tell()
        s.sends()  # the outcome: to the journal, or in a finish_many
    assert [[(type(m).__name__[0], m.job_id) for m in told] for told in s.told] == [
        [("S", "2")],
        [("F", "2"), ("S", "3")],  # the next job is in hand: its start rides along
        [("F", "3"), ("S", "4")],
        [("F", "4"), ("S", "5")],
        [("F", "5")]]  # nothing left in hand
    assert s.told[1][1].token == token() and s.told[1][1].timeout == 7.0


def test_a_start_told_ahead_is_told_again_when_the_job_starts_late():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job()
    assert [m.job_id for m in s.tell()] == ["2", "3"]
    s.clock.advance(1.0)  # e.g. the save waited on Redis
    s.step(Send)
    (again,) = s.tell()  # its deadline runs from its real start
    assert again == Started("3", token(), s.clock.now, 10.0, "w")
    assert s.step(Start).job.job_id == "3"  # an announced job runs however long it waited


def test_no_start_is_told_ahead_for_a_job_that_may_be_given_back():
    s = Steps()
    batch(s, ["2", "3", "4", "5"], {"ghost_retry": False})  # each starts once Redis has its mark
    s.told.clear()
    for _ in range(3):
        s.sends()  # its start mark, unless it went with the last outcome
        s.settle()  # it starts once Redis has the mark
        if len(s.started) == 3:
            s.core.request_stop()  # a stop is asked while job 4 runs: the next job will not start
        s.run_job()
        s.tell()
    assert [[(type(m).__name__[0], m.job_id) for m in told] for told in s.told] == [
        [("S", "2")], [("F", "2")], [("S", "3")], [("F", "3")], [("S", "4")], [("F", "4")]]


def test_a_job_told_ahead_runs_even_if_a_stop_comes_before_it_starts():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job()
    assert [m.job_id for m in s.tell()] == ["2", "3"]
    s.core.request_stop()  # between the two jobs: the master already holds job 3's start
    s.step(Send)
    assert s.step(Start).job.job_id == "3"
    s.clock.advance(RUN_TIME)
    s.step(AwaitEnd, Ended("3", Outcome(True)))
    assert s.tell() == (Finished("3", "success", RUN_TIME, ""),)
    outcome, leaving = s.sends()  # its outcome, then the two jobs never started go back
    assert journal(outcome) == [["3", token(), "success"]]  # no start mark for a job that will not start
    assert isinstance(leaving, FinishMany) and leaving.give_back == [("4", token()), ("5", token())]
    assert leaving.want == 0 and leaving.journal_ends == 2  # it ends jobs 2 and 3 of the journal


def test_a_hotjobs_outcome_goes_alone_when_nothing_else_is_in_hand():
    s = Steps()
    first_job(s, {"hotjob": True})
    s.run_job()
    s.tell()
    alone = s.step(Send)
    assert isinstance(alone, FinishMany) and [d.job_id for d in alone.runs] == ["1"]
    assert alone.want == 0  # no claim in the script that publishes the outcome
    s.step(Settle, [finish_many_reply(1)])
    refill = s.step(Send)  # the worker was busy a moment ago: it claims at once
    assert isinstance(refill, FinishMany) and refill.want == 4 and not refill.runs
    s.step(Settle, [finish_many_reply(0, [claim("2", ahead=True)])])
    assert journal(s.step(Send)) == [["2", token(), "start"]]


def test_a_large_outcome_is_saved_at_once_and_not_given_to_the_master():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job(Outcome(True, json.dumps("x" * 600)))
    (finished, _) = s.tell()
    assert finished.payload is None  # too big for the pipe: should the worker die, it is ghosted
    call = s.step(Send)  # the mark of job 3
    assert isinstance(call, JournalPush) and journal(call) == [["3", token(), "start"]]
    call = s.step(Send)  # and the outcome, in a finish_many at once
    assert isinstance(call, FinishMany) and [d.job_id for d in call.runs] == ["2"] and call.want == 0


# --- waits and Redis' answers ---------------------------------------------------------------------

def test_a_batch_read_late_counts_its_wait_from_the_claim():
    """A refill's reply is read when the worker runs out, maybe long after Redis claimed the jobs
    (a slow job ran meanwhile): the wait counts from the call, so they are given back, not started."""
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job()
    s.tell()
    s.sends()  # job 2's outcome to the journal, with job 3's mark
    s.run_job()
    s.tell()
    mark, refill = s.sends()  # job 4's mark, and job 3's outcome in a finish_many that claims ahead
    assert isinstance(refill, FinishMany) and refill.want == 4  # its reply is read when the hand is empty
    s.run_job()
    s.tell()
    s.sends()
    s.run_job(seconds=MAX_PREFETCH_WAIT + 0.05)  # job 5 is slow
    s.tell()
    s.sends()
    s.settle(claimed=[claim(i, ahead=True) for i in "6789"])
    back = s.step(Send)  # the four claimed: given back unstarted
    assert isinstance(back, FinishMany) and back.give_back == [(i, token()) for i in "6789"]
    assert s.started == ["1", "2", "3", "4", "5"]


def test_no_start_mark_goes_for_a_job_that_waited_too_long_to_start():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job(seconds=MAX_PREFETCH_WAIT + 0.05)  # job 2 is slow: the rest of the batch is too old
    assert [m.job_id for m in s.tell()] == ["2"]  # no start told ahead
    (push,) = s.sends()
    assert journal(push) == [["2", token(), "success"]]  # and no start mark: job 3 will not start
    s.settle()
    back = s.step(Send)
    assert isinstance(back, FinishMany) and back.give_back == [(i, token()) for i in "345"]


def test_a_lost_claim_found_again_counts_its_wait_from_the_claim():
    s = Steps()
    s.step(ShowIdle)
    s.step(ClaimOne, Lost(redis.exceptions.ConnectionError("reply lost")))
    s.step(Pause)
    read = s.step(ReadClaimRecord, ClaimRecord(
        [("1", token(), {"state": "processing", "attempt": "1", "owner": "me", "name": "w",
                         "create_time": str(CREATED), "update_time": str(1700000000000 - 60_000)})],
        1700000000000))
    assert read.held == frozenset()
    # Claimed a minute ago by Redis' clock: too old to start, so it goes back at once.
    back = s.step(Send)
    assert isinstance(back, FinishMany) and back.give_back == [("1", token())] and s.started == []


def test_a_claim_record_is_read_only_once_nothing_is_in_flight_and_takes_each_job_once():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    s.run_job()
    s.tell()
    s.step(Send)  # job 2's outcome and job 3's mark
    s.run_job()
    s.tell()
    s.step(Send)  # job 4's mark
    s.step(Send)  # job 3's outcome in a finish_many that claims ahead
    s.run_job()
    s.tell()
    s.step(Send, Lost(redis.exceptions.ConnectionError("gone")))  # job 4's outcome: the connection fails
    s.step(Pause)
    s.run_job()
    s.tell()
    resend = s.step(Send)  # job 5 was the last in hand: every outcome in hand goes
    assert isinstance(resend, FinishMany) and [d.job_id for d in resend.runs] == ["2", "3", "4", "5"]
    # The lost finish_many claimed 6-9 and this one 10-13; its reply is read first, then the record.
    s.settle(claimed=[claim(i, ahead=True) for i in ("10", "11", "12", "13")])
    read = s.expect(ReadClaimRecord)
    assert read.held >= {(i, token()) for i in ("10", "11", "12", "13")}
    fields = {"state": "processing", "attempt": "1", "owner": "me", "name": "w",
              "create_time": str(CREATED), "update_time": "1700000000000"}
    s.answer(ClaimRecord([(i, token(), fields) for i in ("6", "7", "8", "9")], 1700000000000))
    assert journal(s.expect(Send)) == [["10", token(), "start"]]  # the first in hand starts
    assert [j.job_id for j in s.core.hand] == ["11", "12", "13", "6", "7", "8", "9"]  # each once


def test_outcomes_refused_at_maxmemory_are_sent_again():
    s = Steps()
    batch(s, ["2", "3", "4", "5"])
    pushes = []
    for _ in range(4):
        s.run_job()
        s.tell()
        pushes.append(s.sends())
    assert journal(pushes[0][0]) == [["2", token(), "success"], ["3", token(), "start"]]
    oom = redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    s.settle(refuse={1: oom})  # in flight: job 2's mark, then job 2's outcome (refused), ...
    assert s.step(Pause).seconds == 0.05
    again = s.step(Send)  # job 2's outcome again (no claim: the last one came back empty)
    assert isinstance(again, FinishMany) and [d.job_id for d in again.runs] == ["2"] and again.want == 0


def test_a_job_that_must_not_run_twice_is_given_back_when_its_mark_is_refused():
    s = Steps()
    batch(s, ["2", "3"], {"ghost_retry": False})
    s.step(Send)  # job 2's start mark
    oom = redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    s.step(Settle, [oom, 1])  # Redis has not got it: job 2 must not start
    s.step(Pause)
    s.step(Send)  # job 3's mark
    s.step(Settle, [1])
    s.run_job()
    assert s.started == ["1", "3"]
    s.tell()
    call = s.step(Send)  # job 3's outcome, and job 2 given back
    assert isinstance(call, FinishMany) and call.give_back == [("2", token())]
    assert [d.job_id for d in call.runs] == ["3"]


def test_a_job_that_must_not_run_twice_is_given_back_when_redis_cannot_be_reached():
    s = Steps()
    batch(s, ["2", "3"], {"ghost_retry": False})
    s.step(Send)
    s.step(Settle, [1, 1])
    s.run_job()  # job 2: Redis has its mark
    s.tell()
    s.step(Send, Lost(redis.exceptions.ConnectionError("gone")))  # job 3's mark, ahead of job 2's outcome
    s.step(Pause)
    saving = s.step(Send)  # job 2's outcome, in a finish_many that claims ahead
    assert isinstance(saving, FinishMany) and [d.job_id for d in saving.runs] == ["2"]
    s.step(Send)  # job 3's mark again
    s.step(Settle, Lost(redis.exceptions.ConnectionError("gone again")))  # not known to be in Redis
    s.step(Pause)
    s.step(ReadClaimRecord, ClaimRecord([], 1700000000000))  # what the lost finish_many claimed
    call = s.step(Send)  # job 3 is not started but given back, with job 2's outcome again
    assert isinstance(call, FinishMany) and call.give_back == [("3", token())]
    assert [d.job_id for d in call.runs] == ["2"] and s.started == ["1", "2"]


# --- retiring -------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [{"max_jobs": 1}, {"max_memory": 100}])
def test_a_worker_past_its_limit_retires_after_the_job_and_claims_nothing(limit):
    s = Steps(memory=lambda: 200, **limit)
    first_job(s)
    s.run_job()
    assert s.tell() == (Finished("1", "success", RUN_TIME, '"ok 1"'),)
    outcome, leaving = s.sends()  # the outcome to the journal, then a finish_many that ends it
    assert journal(outcome) == [["1", token(), "success"]]
    assert isinstance(leaving, FinishMany) and leaving.journal_ends == 1 and leaving.want == 0
    s.settle()
    assert s.command is None


def test_the_master_gone_ends_the_worker_once_the_running_job_is_saved():
    s = Steps()
    first_job(s)
    s.tell()
    s.core.parent_gone()
    s.run_job()
    assert s.tell() == (Finished("1", "success", RUN_TIME, '"ok 1"'),)
    assert len(s.sends()) == 2  # saved, and nothing claimed
    s.settle()
    assert s.command is None


def test_outcomes_sent_again_on_a_connection_that_fails_again_are_held_once():
    s = Steps()
    first_job(s)
    s.run_job()
    s.tell()
    s.step(FinishMany, Lost(redis.exceptions.ConnectionError("gone")))  # job 1's outcome, and a claim
    s.step(Pause)
    s.step(ReadClaimRecord, ClaimRecord([], 1700000000000))
    resend = s.step(FinishMany, Lost(redis.exceptions.ConnectionError("gone again")))
    assert [d.job_id for d in resend.runs] == ["1"]
    s.step(Pause)
    assert [d.job_id for d in s.core.unsaved] == ["1"]  # once: it goes once with the next call
