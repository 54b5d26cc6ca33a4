"""A dense worker's decisions (WorkerCore with slots > 1), driven command by command with a fake
clock and replies written by hand, as in test_worker_core.py: several runs at once, claims for the
free slots, the next event, deadlines, a graceful stop, retiring."""
from __future__ import annotations

import json
from typing import Any

from kickq_supervisor.messages import Finished, Started
from kickq_supervisor.runner import Outcome
from kickq_supervisor.worker_core import (
    MAX_PREFETCH_WAIT,
    TIMED_OUT,
    Arrived,
    Cancel,
    ClaimOne,
    Ended,
    FinishMany,
    Interrupted,
    JournalPush,
    ReturnToken,
    Settle,
    ShowIdle,
    Start,
    TakeArrived,
    WaitForEvent,
    WorkerCore,
)
from tests.supervisor.test_worker_core import (
    KEYS,
    Steps,
    claim,
    journal,
    token,
    tuple_claim,
)


def dense(slots: int = 4, **options: Any) -> Steps:
    options.setdefault("prefetch", 16)
    return Steps(slots=slots, **options)


def start_all(s: Steps) -> list[str]:
    """Answer the start marks, the S message and each Start (None: the run goes on); the jobs started."""
    while isinstance(s.command, JournalPush):
        s.answer(None)
    started = [m.job_id for m in s.tell()]
    assert all(isinstance(m, Started) for m in s.told[-1])
    for job_id in started:
        assert s.step(Start).job.job_id == job_id
        s.started.append(job_id)
    return started


def until_wait(s: Steps) -> WaitForEvent:
    """Answer the calls up to the next WaitForEvent (a renewal of the registration: nothing claimed)."""
    while not isinstance(s.command, WaitForEvent):
        assert isinstance(s.command, (FinishMany, JournalPush, Settle)), s.command
        s.settle() if isinstance(s.command, Settle) else s.answer(None)
    return s.command


def ended(job_id: str, ok: bool = True) -> Ended:
    return Ended(job_id, Outcome(True, f'"ok {job_id}"') if ok else Outcome(False, error="ValueError: no"))


def first_wave(s: Steps, ids: list[str]) -> None:
    """Idle: job 1 claimed alone and started; the claim for the free slots brings `ids`, started at once."""
    s.step(ShowIdle)
    s.step(ClaimOne, tuple_claim(claim("1")))
    assert start_all(s) == ["1"]
    call = s.step(FinishMany)  # claims for the free slots, registering should none come
    assert call.want == s.core.slots - 1 and call.idle_ms > 0 and not call.runs
    s.settle(claimed=[claim(i, ahead=True) for i in ids])
    if ids:
        marks = s.expect(JournalPush)  # their start marks, in one write
        assert [e[0] for e in journal(marks)] == ids and all(e[2] == "start" for e in journal(marks))
        assert start_all(s) == ids


def test_a_dense_worker_starts_jobs_while_slots_are_free_and_then_waits_for_the_next_event():
    s = dense()
    first_wave(s, ["2", "3", "4"])
    wait = s.expect(WaitForEvent)
    assert not wait.want_work  # every slot busy: no hand-off, no wake token taken for it
    assert set(s.core.running) == {"1", "2", "3", "4"}
    assert [m.job_id for m in s.told[-1]] == ["2", "3", "4"]  # the starts told in one write


def test_ends_are_told_in_one_write_and_saved_with_the_claim_for_the_free_slots():
    s = dense()
    first_wave(s, ["2", "3", "4"])
    s.clock.advance(0.01)
    s.step(WaitForEvent, [ended("2"), ended("3", ok=False)])
    told = s.tell()
    assert [(type(m), m.job_id, m.outcome) for m in told] == [(Finished, "2", "success"),
                                                               (Finished, "3", "fail")]
    call = s.step(FinishMany)  # two free slots: the outcomes go with a claim
    assert [d.job_id for d in call.runs] == ["2", "3"] and call.want >= 2 and call.idle_ms > 0
    s.settle(claimed=[claim("5", ahead=True)])
    assert start_all(s) == ["5"]
    # One slot still free: a claim that got some jobs does not register, so it claims again.
    again = s.step(FinishMany)
    assert again.idle_ms > 0 and not again.runs
    s.settle()  # nothing: registered as idle, it waits wanting work
    assert s.core.registered
    wait = s.expect(WaitForEvent)
    assert wait.want_work and wait.timeout <= s.core.wait_timeout
    assert set(s.core.running) == {"1", "4", "5"}


def test_registered_an_outcome_goes_at_once_in_a_claim_that_registers_again():
    s = dense()
    first_wave(s, [])  # nothing came: registered as idle with three free slots
    assert s.core.registered
    s.step(WaitForEvent, [ended("1")])
    s.tell()
    call = s.step(FinishMany)  # not to the journal: no finish_many would end it before the renewal
    assert [d.job_id for d in call.runs] == ["1"] and call.want and call.idle_ms > 0


def test_with_jobs_in_hand_an_outcome_goes_to_the_journal():
    s = dense(slots=2)
    first_wave(s, ["2"])
    s.clock.advance(0.01)  # runs take 10 ms: claims go about 50 ms of work ahead
    s.step(WaitForEvent, [ended("1")])
    s.tell()
    call = s.step(FinishMany)
    assert call.want == 1 + 10
    s.settle(claimed=[claim(i, ahead=True) for i in "345"])
    assert start_all(s) == ["3"]
    assert [j.job_id for j in s.core.hand] == ["4", "5"]
    s.expect(WaitForEvent)
    s.answer([ended("2")])
    s.tell()
    push = s.step(JournalPush)  # the next claim ends it
    assert journal(push)[0] == ["2", token(), "success"]


def test_a_wake_token_claims_at_once_and_goes_back_when_the_claim_got_all_it_asked():
    s = dense()
    first_wave(s, [])
    wait = s.step(WaitForEvent, [Arrived(wake="w")])
    assert wait.want_work
    call = s.step(FinishMany)
    assert call.want == 3
    s.settle(claimed=[claim(i, ahead=True) for i in "234"])
    assert s.step(ReturnToken).name == "w"  # more may wait: the token goes back for the others
    assert start_all(s) == ["2", "3", "4"]


def test_a_wake_token_whose_claim_came_back_short_is_used_up():
    s = dense()
    first_wave(s, [])
    s.step(WaitForEvent, [Arrived(wake="w")])
    s.step(FinishMany)
    s.settle(claimed=[claim("2", ahead=True)])
    s.expect(JournalPush)  # job 2's mark: no token returned
    assert start_all(s) == ["2"]


def test_a_hand_off_starts_at_once():
    s = dense()
    first_wave(s, [])
    s.step(WaitForEvent, [Arrived(handoff=json.dumps(claim("9", ahead=True)))])
    assert not s.core.registered  # the hand-off ended it
    assert journal(s.expect(JournalPush)) == [["9", token(), "start"]]
    assert start_all(s) == ["9"]


def test_an_async_run_past_its_deadline_is_cancelled_and_ends_as_a_ghost():
    s = dense()
    s.step(ShowIdle)
    s.step(ClaimOne, tuple_claim(claim("1", opts={"process_timeout": 2})))
    start_all(s)
    s.step(FinishMany)
    s.settle()
    wait = s.expect(WaitForEvent)
    assert wait.timeout <= 1.0  # the registration's renewal, or the deadline
    s.clock.advance(2.0)
    s.answer([])  # timed out: the deadline passed
    assert s.step(Cancel, True).job_id == "1"
    until_wait(s)  # no second cancel; its end is awaited
    s.clock.advance(0.01)
    s.answer([Ended("1", Outcome(False, error="CancelledError"))])
    (finished,) = s.tell()
    assert finished.outcome == "ghost" and finished.payload == TIMED_OUT
    saved = s.command
    runs = saved.runs if isinstance(saved, FinishMany) else []
    if isinstance(saved, JournalPush):
        assert journal(saved) == [["1", token(), "ghost"]]
    else:
        assert [(d.outcome, d.payload) for d in runs] == [("ghost", TIMED_OUT)]


def test_a_thread_run_past_its_deadline_is_left_to_the_master():
    s = dense()
    s.step(ShowIdle)
    s.step(ClaimOne, tuple_claim(claim("1", opts={"process_timeout": 1})))
    start_all(s)
    s.step(FinishMany)
    s.settle()
    s.clock.advance(1.5)
    s.step(WaitForEvent, [])
    s.step(Cancel, False)  # a thread cannot be cancelled: the master kills the worker
    for _ in range(3):
        until_wait(s)  # never cancelled again
        s.clock.advance(0.9)
        s.answer([])
    until_wait(s)
    s.step(WaitForEvent, [Ended("1", Outcome(True))])
    (finished,) = s.tell()
    assert finished.outcome == "success"  # it ended before the master killed: its outcome holds


def test_a_graceful_stop_lets_the_runs_finish_claims_nothing_and_gives_back_the_hand():
    s = dense(slots=2)
    first_wave(s, ["2"])
    s.core.request_stop()
    wait = s.step(WaitForEvent, [ended("1")])
    s.tell()
    saved = s.step(FinishMany)  # at once, claiming nothing: the other run may take long
    assert [d.job_id for d in saved.runs] == ["1"] and saved.want == 0
    wait = s.expect(WaitForEvent)
    assert not wait.want_work
    s.answer([ended("2")])
    s.tell()
    s.step(FinishMany)
    handed = json.dumps(claim("7", ahead=True))
    s.step(TakeArrived, [handed])  # a hand-off the feed took before the stop
    leaving = s.step(FinishMany)
    assert leaving.want == 0 and leaving.give_back == [("7", token())]
    s.settle()
    assert s.command is None


def test_an_interrupted_wait_is_a_stop_and_the_runs_still_end():
    s = dense(slots=2)
    first_wave(s, ["2"])
    s.step(WaitForEvent, Interrupted())
    assert s.core.stopping
    s.step(WaitForEvent, [ended("1"), ended("2")])
    assert [m.job_id for m in s.tell()] == ["1", "2"]


def test_a_dense_worker_past_max_jobs_starts_no_more_and_leaves_once_its_runs_end():
    s = dense(slots=4, max_jobs=3)
    s.step(ShowIdle)
    s.step(ClaimOne, tuple_claim(claim("1")))
    start_all(s)
    call = s.step(FinishMany)
    assert call.want == 2  # within max_jobs
    s.settle(claimed=[claim(i, ahead=True) for i in "23"])
    assert start_all(s) == ["2", "3"]
    assert s.core.retiring
    s.step(WaitForEvent, [ended("1"), ended("2"), ended("3")])
    s.tell()
    saved = s.step(FinishMany)
    assert [d.job_id for d in saved.runs] == ["1", "2", "3"] and saved.want == 0
    s.step(TakeArrived, [])
    leaving = s.step(FinishMany)
    assert leaving.want == 0
    s.settle()
    assert s.command is None and s.started == ["1", "2", "3"]


def test_a_job_in_hand_that_waits_too_long_for_a_slot_is_given_back():
    s = dense(slots=2)
    first_wave(s, ["2"])
    # Both slots busy; a hand-off comes in anyway (a registration that raced the claim).
    s.step(WaitForEvent, [Arrived(handoff=json.dumps(claim("9", ahead=True)))])
    while isinstance(s.command, (FinishMany, Settle)):
        s.settle() if isinstance(s.command, Settle) else s.answer(None)
    wait = s.expect(WaitForEvent)
    assert wait.timeout <= MAX_PREFETCH_WAIT
    s.clock.advance(MAX_PREFETCH_WAIT + 0.01)
    s.answer([])
    back = s.step(FinishMany)
    assert back.give_back == [("9", token())] and back.want == 0


def test_one_slot_keeps_the_one_job_loop():
    core = WorkerCore(1, ["w"], KEYS, "me", clock=lambda: 0.0)
    assert core.slots == 1
    steps = core.steps()
    assert isinstance(next(steps), ShowIdle)
    assert isinstance(steps.send(None), ClaimOne)


def test_a_stop_ends_the_idle_registration_and_gives_back_the_hand_at_once():
    s = dense(slots=3)
    first_wave(s, [])  # registered as idle, two slots free
    s.core.request_stop()
    s.step(WaitForEvent, [Arrived(handoff=json.dumps(claim("9", ahead=True)))])  # raced the stop
    back = s.step(FinishMany)  # not when the run ends: now
    assert back.give_back == [("9", token())] and back.want == 0 and back.idle_ms == 0
    assert not s.core.registered and not s.core.hand
    wait = s.expect(WaitForEvent)
    assert not wait.want_work and wait.timeout > 0.5  # no renewal to wait for: no busy loop
