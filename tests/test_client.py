"""The client against a real redis-server: create / get / delete, bad input, hotjobs, connections,
and handler registration. A "worker" here is the test itself calling the claim / finish scripts."""
from __future__ import annotations

import concurrent.futures
import json
import math
import socket
import threading
import time
import traceback

import pytest
import redis

import kickq
from kickq import registry
from kickq.connection import MIN_REDIS_VERSION, check_version
from kickq.hotjob import HotjobWaiter
from kickq.job import FIELDS
from kickq.keys import Keys
from kickq.scripts import Scripts
from tests.helpers import free_port, subscribers, wait_until, with_credentials
from tests.structures import assert_consistent, assert_gone, assert_one_structure, snapshot, structures_of

ALL_FIELDS = {
    "id", "name", "complete", "success", "create_time", "update_time", "finish_time", "total_process_time",
    "state", "delay", "process_timeout", "retry", "retry_count", "retry_interval", "ghost_retry",
    "ghost_count", "ghost_interval", "hotjob", "hotjob_timeout", "hotjob_promise", "data", "result",
    "last_error", "scheduled_for", "runs", "purge_timeout",
    "schedule_id", "tick",  # beyond the issue's list: which schedule and tick made the job
    "attempt",  # beyond it too: the claims so far (the run's attempt token)
}


class Worker:
    """Plays a supervisor's worker with the real scripts (Redis' clock)."""

    def __init__(self, r, ns):
        self.r, self.ns, self.keys, self.scripts = r, ns, Keys(ns), Scripts(r)

    def claim(self, *names):
        got = self.scripts.claim(self.keys, names or ("a",))
        assert got is not None, f"nothing to claim in {names}"
        return got[0], got[1]

    def run(self, outcome="success", payload='"done"', names=("a",)):
        job_id, token = self.claim(*names)
        status, state, _ = self.scripts.finish(self.keys, job_id, token, outcome, payload)
        assert status == "ok"
        return job_id, state


@pytest.fixture
def worker(r, namespace):
    return Worker(r, namespace)


def now_ms():
    return int(time.time() * 1000)


# --- create and get -----------------------------------------------------------------------------------

def test_new_job_has_the_documented_defaults(kq, r, namespace):
    before = now_ms()
    job = kq.create("a", {"x": [1, "é", None, True, 2.5]})
    assert (job.id, job.name, job.state, job.data) == ("1", "a", "new", {"x": [1, "é", None, True, 2.5]})
    assert job.complete is False and job.success is False
    assert job.finish_time is None and job.total_process_time is None
    assert job.result is None and job.last_error is None and job.scheduled_for is None
    assert job.runs == [] and job.hotjob_promise is None
    assert abs(job.create_time - before) < 5000 and job.update_time == job.create_time
    assert (job.delay, job.process_timeout, job.retry, job.retry_count, job.retry_interval) == (
        None, 10, False, 3, 1800)
    assert (job.ghost_retry, job.ghost_count, job.ghost_interval, job.hotjob, job.hotjob_timeout,
            job.purge_timeout) == (True, 1, 1800, False, 10, 86400)
    fetched = kq.get(job.id)
    assert fetched.to_dict() == job.to_dict()
    assert fetched.hotjob_promise is None
    assert_one_structure(r, namespace, job.id)


def test_data_none_and_missing(kq):
    assert kq.create("a").data is None
    assert kq.get("1").data is None
    assert kq.create("a", None).data is None
    assert kq.get(2).id == "2"  # int ids are accepted by get


@pytest.mark.parametrize("data", [0, False, "", [], {}, "null", 2**62, -1.5e300, "\u2028 \x00 \"q\" 🚀",
                                  {"nested": {"list": [None, {"k": "v"}]}}])
def test_data_round_trips_through_json(kq, data):
    job = kq.create("a", data)
    assert job.data == data and kq.get(job.id).data == data
    assert type(kq.get(job.id).data) is type(data)


@pytest.mark.parametrize("delay, state", [(None, "new"), (0, "delayed"), (0.0, "delayed"), (0.25, "delayed"),
                                          (60, "delayed")])
def test_numeric_delay_zero_included_gives_delayed(kq, r, namespace, delay, state):
    job = kq.create("a", {"d": delay}, {"delay": delay})
    assert job.state == state
    assert kq.get(job.id).state == state
    expected = ["queue:a"] if state == "new" else ["delayed"]
    assert structures_of(r, namespace, job.id) == expected
    if delay is not None:
        assert job.scheduled_for == job.create_time + round(delay * 1000)
        assert kq.get(job.id).scheduled_for == job.scheduled_for
        assert job.delay == delay


def test_ids_count_per_namespace(kq, redis_url, namespace):
    other = kickq.Kickq(redis_namespace=namespace + "-other")
    try:
        assert [kq.create("a").id for _ in range(3)] == ["1", "2", "3"]
        assert [other.create("a").id for _ in range(2)] == ["1", "2"]
        assert kq.create("b").id == "4"
    finally:
        other.close()


def test_job_is_read_only(kq):
    job = kq.create("a", {"k": "v"})
    for attr in ("id", "state", "data", "hotjob_promise", "anything"):
        with pytest.raises(AttributeError):
            setattr(job, attr, 1)
    with pytest.raises(AttributeError):
        del job.state
    with pytest.raises(AttributeError):
        getattr(job, "no_such_attribute")  # noqa: B009
    job.to_dict()["data"]["k"] = "changed"
    assert job.data == {"k": "v"}
    assert job.state == "new"


def test_to_dict_has_every_field_but_the_promise(kq):
    job = kq.create("a", None, {"hotjob": True, "hotjob_timeout": 1})
    as_dict = job.to_dict()
    assert ALL_FIELDS - {"hotjob_promise"} <= set(as_dict)  # every field of the contract ...
    assert "hotjob_promise" not in as_dict  # ... but the promise
    assert list(as_dict) == list(FIELDS)
    assert all(getattr(job, key) == value for key, value in as_dict.items())
    assert job.hotjob_promise is not None
    json.dumps(as_dict)  # plain values only


def test_get_of_a_missing_id_raises_job_not_found(kq):
    with pytest.raises(kickq.JobNotFound) as info:
        kq.get("12345")
    assert isinstance(info.value, kickq.KickqError) and isinstance(info.value, LookupError)
    assert info.value.job_id == "12345" and "12345" in str(info.value)


def test_cascade_is_stored_with_the_job(kq):
    kickq.config(process_timeout=5, job_flags={"a": {"retry": True, "retry_interval": lambda n: n * 10}})
    a = kq.create("a", None, {"hotjobTimeout": 3})
    b = kq.create("b")
    kickq.config(process_timeout=7, job_flags={"a": {}})  # later config changes do not touch stored jobs
    got_a, got_b = kq.get(a.id), kq.get(b.id)
    assert (got_a.process_timeout, got_a.retry, got_a.retry_interval, got_a.hotjob_timeout) == (
        5, True, [10, 20, 30], 3)
    assert (got_b.process_timeout, got_b.retry, got_b.retry_interval) == (5, False, 1800)
    assert kq.create("a").retry is False and kq.create("a").process_timeout == 7


def test_client_overrides_beat_the_global_config(kq_config, namespace):
    kickq.config(retry=True)
    with kickq.Kickq(retry=False, hotjob_timeout=2) as client:
        job = client.create("a")
    assert (job.retry, job.hotjob_timeout) == (False, 2)


# --- delete -------------------------------------------------------------------------------------------

def test_delete_returns_true_then_false_and_removes_the_job_everywhere(kq, r, namespace, worker):
    new = kq.create("a")
    delayed = kq.create("a", None, {"delay": 100})
    processing = kq.create("b")
    finished = kq.create("c")
    worker.claim("b")
    worker.run(names=("c",))
    for job in (new, delayed, processing, finished):
        assert structures_of(r, namespace, job.id) != []
        assert kq.delete(job.id) is True
        assert_gone(r, namespace, job.id)
        with pytest.raises(kickq.JobNotFound):
            kq.get(job.id)
        assert kq.delete(job.id) is False
    assert kq.delete("999") is False
    assert_consistent(r, namespace)


def test_a_worker_finishing_a_deleted_job_does_not_bring_it_back(kq, r, namespace, worker):
    job = kq.create("a", {"x": 1})
    job_id, token = worker.claim("a")
    assert kq.delete(job.id) is True
    status, _, _ = worker.scripts.finish(worker.keys, job_id, token, "success", '"late"')
    assert status == "missing"
    assert_gone(r, namespace, job.id)
    with pytest.raises(kickq.JobNotFound):
        kq.get(job.id)


# --- callback form ------------------------------------------------------------------------------------

def test_callback_gets_none_job_and_promise(kq):
    calls = []
    returned = kq.create("a", {"x": 1}, {}, lambda *args: calls.append(args))
    assert len(calls) == 1
    err, job, promise = calls[0]
    assert err is None and promise is None and job is returned and job.data == {"x": 1}
    kq.create("a", None, {"hotjob": True, "hotjob_timeout": 1}, lambda *args: calls.append(args))
    assert calls[1][2] is calls[1][1].hotjob_promise and calls[1][2] is not None


def test_callback_gets_the_error_and_create_returns_none(kq, r, namespace):
    kq.create("seed")
    before = snapshot(r, namespace)
    for bad in [(123, None, None), ("a", {1, 2}, None), ("a", None, {"nope": 1})]:
        calls: list = []
        assert kq.create(*bad, lambda *args, calls=calls: calls.append(args)) is None
        assert len(calls) == 1
        err, job, promise = calls[0]
        assert isinstance(err, (TypeError, ValueError)) and job is None and promise is None
    assert snapshot(r, namespace) == before


def test_callback_may_sit_in_the_data_or_opts_slot(kq):
    calls = []
    kq.create("a", lambda *args: calls.append(args))
    kq.create("a", {"d": 1}, lambda *args: calls.append(args))
    assert [c[1].data for c in calls] == [None, {"d": 1}]
    assert all(c[0] is None for c in calls)


# --- create_many --------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, opts", [
    (None, None), ("text", {"delay": 2.5}),
    ([1, {"a": None}], {"retry": True, "retry_interval": 2.5, "ghost_retry": False}),
    ({"k": "é"}, {"hotjob": True, "hotjob_timeout": 3, "purge_timeout": 0.5}),
    (0, {"delay": 0, "retry": True}),
])
def test_the_job_create_returns_is_the_job_stored(kq, data, opts):
    # create builds its Job without reading the hash back: it must be the one get() reads
    job = kq.create("a", data, opts)
    assert kq.get(job.id).to_dict() == job.to_dict()


def test_create_many_of_mixed_items(kq, r, namespace):
    jobs = kq.create_many([("a",), ("b", {"x": 1}), ("c", None, {"delay": 0}), ["d", [1], {"hotjob": True}],
                           ("a", "s", {"retry": True})])
    assert [j.id for j in jobs] == ["1", "2", "3", "4", "5"]
    assert [j.state for j in jobs] == ["new", "new", "delayed", "new", "new"]
    assert [j.data for j in jobs] == [None, {"x": 1}, None, [1], "s"]
    assert [j.hotjob_promise is not None for j in jobs] == [False, False, False, True, False]
    assert jobs[4].retry is True and jobs[0].retry is False
    for job in jobs:
        assert kq.get(job.id).to_dict() == job.to_dict()
    assert r.lrange(Keys(namespace).queue("a"), 0, -1) == ["1", "5"]
    assert_consistent(r, namespace)
    assert kq.create_many([]) == []


def test_create_many_chunks_still_one_batch(kq, r, namespace):
    jobs = kq.create_many([("bulk", i) for i in range(2500)])
    assert [j.id for j in jobs] == [str(i) for i in range(1, 2501)]
    assert r.llen(Keys(namespace).queue("bulk")) == 2500
    assert kq.get("2500").data == 2499


@pytest.mark.parametrize("items, error", [
    ([("a",), ("b", {1, 2})], kickq.InvalidPayload),
    ([("a",), ("b", {"file": "f\udcff.txt"})], kickq.InvalidPayload),  # UTF-8 cannot hold it
    ([("a",), "b"], TypeError),
    ([("a",), ()], TypeError),
    ([("a",), ("a", 1, {}, "extra")], TypeError),
    ([("a",), (7,)], TypeError),
    ([("a",), ("",)], ValueError),
    ([("a", None, {"hotjob": True}), ("b", None, {"retry_count": -1})], kickq.ConfigError),
    ([("a",), ("b", "x" * 600_000)], kickq.PayloadTooLarge),
])
def test_create_many_with_one_bad_item_writes_nothing(kq, r, namespace, items, error):
    kq.create("seed")
    before = snapshot(r, namespace)
    with pytest.raises(error):
        kq.create_many(items)
    assert snapshot(r, namespace) == before


# --- names --------------------------------------------------------------------------------------------

NAMES = ["job name", "email:send", "email", "email:send:", "émail", "日本語のジョブ", "a" * 256, "queue",
         "delayed", "a:b", "a", "{a}", "*", "a b ", "🚀"]


def test_names_holds_every_name_created_delayed_or_again_after_its_jobs_went(kq, r, namespace):
    # The set is kept by the counts: a name is added when one of its counts rises from zero.
    names = Keys(namespace).names
    kq.create("later", None, {"delay": 60})
    first = kq.create("again")
    assert r.smembers(names) == {"later", "again"}
    r.srem(names, "again")  # as if lost: the next rise from zero adds it back
    assert kq.delete(first.id)
    assert r.hget(Keys(namespace).counts, "new:again") is None
    kq.create("again")
    assert r.smembers(names) == {"later", "again"}


def test_names_work_and_never_collide(kq, r, namespace, worker):
    jobs = {name: kq.create(name, {"for": name}) for name in NAMES}
    assert len({job.id for job in jobs.values()}) == len(NAMES)
    for name, job in jobs.items():
        got = kq.get(job.id)
        assert got.name == name and got.data == {"for": name}
        assert structures_of(r, namespace, job.id) == ["queue:" + name]
    assert r.smembers(Keys(namespace).names) == set(NAMES)
    for name in reversed(NAMES):
        job_id, _ = worker.claim(name)
        assert job_id == jobs[name].id
        assert worker.scripts.claim(worker.keys, [name]) is None  # only its own job was in that queue
    assert_consistent(r, namespace)


# --- bad input: a typed error and the namespace exactly as before --------------------------------------

def _deep(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


class Unserialisable:
    pass


BAD_CREATES = [
    ((123,), TypeError),
    ((None,), TypeError),
    ((b"bytes",), TypeError),
    ((["a"],), TypeError),
    (("",), ValueError),
    (("a" * 257,), ValueError),
    (("line\nbreak",), ValueError),
    (("tab\t",), ValueError),
    (("nul\x00",), ValueError),
    (("del\x7f",), ValueError),
    (("a", {1, 2}), kickq.InvalidPayload),
    (("a", Unserialisable()), kickq.InvalidPayload),
    (("a", {"n": math.nan}), kickq.InvalidPayload),
    (("a", [math.inf]), kickq.InvalidPayload),
    (("a", {(1, 2): "tuple key"}), kickq.InvalidPayload),
    (("a", _deep(100_000)), kickq.InvalidPayload),
    (("a", b"bytes"), kickq.InvalidPayload),
    (("a", "x" * (512 * 1024)), kickq.PayloadTooLarge),
    (("a", None, {"no_such_option": 1}), kickq.ConfigError),
    (("a", None, {"concurrent_jobs": 1}), kickq.ConfigError),
    (("a", None, {"retry_interval": lambda n: 1}), kickq.ConfigError),
    (("a", None, {"delay": -1}), kickq.ConfigError),
    (("a", None, {"process_timeout": math.nan}), kickq.ConfigError),
    (("a", None, {"hotjob": True, "hotjob_timeout": 0}), kickq.ConfigError),
    (("a", None, {"processTimeout": 1, "process_timeout": 2}), kickq.ConfigError),
    (("a", None, "not a dict"), kickq.ConfigError),
    (("a", {1, 2}, {"hotjob": True}), kickq.InvalidPayload),
]


@pytest.mark.parametrize("args, error", BAD_CREATES,
                         ids=[f"{i}-{e.__name__}" for i, (_, e) in enumerate(BAD_CREATES)])
def test_bad_input_raises_a_typed_error_and_writes_nothing(kq, r, namespace, args, error):
    kq.create("seed", {"keep": True}, {"delay": 5})
    kq.create("seed")
    before = snapshot(r, namespace)
    assert before  # the namespace is not empty, so "unchanged" means something
    with pytest.raises(error):
        kq.create(*args)
    assert snapshot(r, namespace) == before
    assert kq.create("after").id == "3"  # not even an id was used up


def test_invalid_payload_is_a_type_error_and_too_large_a_value_error():
    assert issubclass(kickq.InvalidPayload, TypeError)
    assert issubclass(kickq.InvalidPayload, kickq.KickqError)
    assert issubclass(kickq.PayloadTooLarge, ValueError)
    assert issubclass(kickq.PayloadTooLarge, kickq.KickqError)


def test_payload_exactly_at_the_limit_is_accepted(kq, r, namespace):
    kickq.config(max_payload_bytes=100)
    assert kq.create("a", "x" * 98).data == "x" * 98  # '"' + 98 + '"' = 100 bytes
    assert kq.create("a", "é" * 49).data == "é" * 49  # bytes of UTF-8, not characters
    before = snapshot(r, namespace)
    for too_big in ("x" * 99, "é" * 49 + "x"):
        with pytest.raises(kickq.PayloadTooLarge):
            kq.create("a", too_big)
    assert snapshot(r, namespace) == before


# --- hotjobs ------------------------------------------------------------------------------------------

HOT = {"hotjob": True, "hotjob_timeout": 10}


def test_promise_is_none_unless_hotjob(kq):
    assert kq.create("a").hotjob_promise is None
    assert kq.create("a", None, {"hotjob": False}).hotjob_promise is None
    hot = kq.create("a", None, HOT)
    assert hot.hotjob_promise is not None and hot.hotjob is True
    assert kq.get(hot.id).hotjob_promise is None


def test_hotjob_result_is_the_final_job(kq, worker):
    job = kq.create("a", {"in": 1}, HOT)
    assert not job.hotjob_promise.done()
    worker.run("success", json.dumps({"out": 2}))
    final = job.hotjob_promise.result(timeout=5)
    assert isinstance(final, kickq.Job)
    assert (final.id, final.state, final.complete, final.success) == (job.id, "success", True, True)
    assert final.result == {"out": 2} and final.data == {"in": 1}
    assert len(final.runs) == 1 and final.runs[0]["state"] == "success"
    assert final.to_dict() == kq.get(job.id).to_dict()


def test_completion_before_anyone_waits_is_not_missed(kq, worker):
    job = kq.create("a", None, HOT)
    worker.run("success", '"early"')
    wait_until(job.hotjob_promise.done, timeout=5, message="future settled without a waiter")
    assert job.hotjob_promise.result(timeout=0).result == "early"


def test_completion_between_create_and_watch_is_kept(kq, worker, monkeypatch):
    """The worker finishes the job before the creator has even made its future."""
    original = HotjobWaiter.watch

    def watch(self, job_id, *args):
        worker.run("success", '"very early"')
        wait_until(lambda: job_id in self._early, timeout=5, message="early completion kept")
        return original(self, job_id, *args)

    monkeypatch.setattr(HotjobWaiter, "watch", watch)
    job = kq.create("a", None, HOT)
    assert job.hotjob_promise.result(timeout=5).result == "very early"


def test_hotjob_fail_after_retries_resolves_with_state_fail(kq, worker):
    job = kq.create("a", None, {**HOT, "retry": True, "retry_count": 1, "retry_interval": 0})
    assert worker.run("fail", "first")[1] == "retry"
    assert worker.scripts.promote(worker.keys)[0] == 1
    assert worker.run("fail", "second")[1] == "fail"
    final = job.hotjob_promise.result(timeout=5)  # a result, not an exception
    assert (final.state, final.complete, final.success, final.last_error) == ("fail", True, False, "second")
    assert [run["state"] for run in final.runs] == ["fail", "fail"]


def test_hotjob_timeout(kq):
    started = time.monotonic()
    job = kq.create("a", None, {"hotjob": True, "hotjob_timeout": 0.5})
    with pytest.raises(kickq.HotjobTimeout) as info:
        job.hotjob_promise.result(timeout=10)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed <= 1.5
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, kickq.KickqError)
    assert info.value.job_id == job.id and info.value.timeout == 0.5


def test_delete_while_waited_on_gives_job_not_found(kq):
    job = kq.create("a", None, HOT)
    assert kq.delete(job.id) is True
    with pytest.raises(kickq.JobNotFound):
        job.hotjob_promise.result(timeout=5)


def test_waiter_survives_a_killed_subscriber_connection(kq, r, worker):
    first = kq.create("a", None, HOT)
    second = kq.create("b", None, HOT)
    assert r.client_kill_filter(_type="pubsub") >= 1
    worker.run("success", '"right after the kill"')  # most likely before the waiter has resubscribed
    assert first.hotjob_promise.result(timeout=5).result == "right after the kill"
    wait_until(lambda: subscribers(r, Keys(worker.ns).done) >= 1, timeout=5, message="resubscribed")
    worker.run("success", '"later"', names=("b",))
    assert second.hotjob_promise.result(timeout=5).result == "later"


def test_many_hotjobs_share_two_threads(kq, worker):
    before = threading.active_count()
    jobs = [kq.create("a", i, HOT) for i in range(100)]
    jobs += kq.create_many([("a", i, HOT) for i in range(100, 200)])
    assert threading.active_count() - before <= 2
    for _ in jobs:
        worker.run("success", "1")
    assert [job.hotjob_promise.result(timeout=10).state for job in jobs] == ["success"] * 200
    assert threading.active_count() - before <= 2


def wait_for_a_reader(kq, namespace):
    """Until a thread waiting in result() reads the hotjob subscription of `namespace`."""
    wait_until(lambda: kq._waiters[namespace]._leader_reads, timeout=5, message="a waiting thread reads")


def test_the_waiting_thread_reads_its_own_answer(kq, worker, monkeypatch):
    """result() reads the subscription in the calling thread: no hand-off from another thread."""
    readers = []
    original = HotjobWaiter._deliver

    def deliver(self, job_id, message):
        readers.append(threading.current_thread())
        return original(self, job_id, message)

    monkeypatch.setattr(HotjobWaiter, "_deliver", deliver)
    for i in range(3):
        job = kq.create("a", None, HOT)

        def finish(i=i):
            wait_for_a_reader(kq, worker.ns)  # the caller is in result(), reading
            worker.run("success", str(i))

        finisher = threading.Thread(target=finish)
        finisher.start()
        assert job.hotjob_promise.result(timeout=5).result == i
        finisher.join()
    assert readers == [threading.current_thread()] * 3


def test_an_answer_the_subscriber_thread_reads_first_reaches_the_waiting_thread_at_once(kq, worker,
                                                                                       monkeypatch):
    """A thread enters result() while the subscriber thread waits for a message: the subscriber
    thread reads the answer and lets go right after it, not when its wait would have ended."""
    readers = []
    original = HotjobWaiter._deliver

    def deliver(self, job_id, message):
        readers.append(threading.current_thread().name)
        return original(self, job_id, message)

    monkeypatch.setattr(HotjobWaiter, "_deliver", deliver)
    monkeypatch.setattr(kickq.hotjob, "POLL_SECONDS", 3.0)
    job = kq.create("a", None, HOT)
    waiter = kq._waiters[worker.ns]
    wait_until(lambda: waiter._reading.locked() and not waiter._leading, timeout=5,
               message="the subscriber thread waits for a message")

    def finish():
        wait_until(lambda: waiter._leading, timeout=5, message="a thread waits to read")
        worker.run("success", '"relayed"')

    finisher = threading.Thread(target=finish)
    finisher.start()
    started = time.monotonic()
    assert job.hotjob_promise.result(timeout=5).result == "relayed"
    assert time.monotonic() - started < 1.5  # the subscriber thread's wait ends 3 s after it began
    finisher.join()
    assert readers == ["kickq-hotjob-listener"]


def test_two_threads_waiting_each_get_their_own(kq, worker):
    """One waiting thread reads; the other's answer, read by it, still wakes the other."""
    names = ("a", "b")
    jobs = [kq.create(name, None, HOT) for name in names]
    results: dict[int, object] = {}

    def wait(i):
        results[i] = jobs[i].hotjob_promise.result(timeout=5).result

    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(2)]
    for t in waiters:
        t.start()
    wait_for_a_reader(kq, worker.ns)
    for i in (1, 0):  # the second job first: whichever thread leads, the other's comes first once
        assert worker.run("success", str(i), names=(names[i],))[1] == "success"
        wait_until(jobs[i].hotjob_promise.done, timeout=5, message=f"job {i} settled")
    for t in waiters:
        t.join(timeout=5)
    assert results == {0: 0, 1: 1}


def test_subscription_lost_while_a_thread_waits_on_it(kq, r, worker):
    """The waiting thread was reading when the connection died: the subscriber thread subscribes
    again and re-reads the job, and the waiter gets its answer."""
    job = kq.create("a", None, HOT)

    def kill_then_finish():
        wait_for_a_reader(kq, worker.ns)
        assert r.client_kill_filter(_type="pubsub") >= 1
        worker.run("success", '"after the kill"')

    helper = threading.Thread(target=kill_then_finish)
    helper.start()
    assert job.hotjob_promise.result(timeout=5).result == "after the kill"
    helper.join(timeout=5)
    later = kq.create("a", None, HOT)  # and it goes on working
    worker.run("success", '"later"')
    assert later.hotjob_promise.result(timeout=5).result == "later"


def test_a_connection_redis_py_replaced_on_its_own_is_subscribed_again(kq, worker):
    """redis-py may connect a pub/sub connection again by itself (and subscribe it again): what
    was published in between is lost, so the waiter must notice and re-read the pending jobs."""
    job = kq.create("a", None, HOT)
    waiter = kq._waiters[worker.ns]
    with waiter._reading:  # the subscriber thread is out of its read
        connection = waiter._subscription.pubsub.connection
        connection.disconnect()
        worker.run("success", '"while it was away"')  # published while no one listened
        connection.connect()  # redis-py's on_connect subscribes it again
    assert job.hotjob_promise.result(timeout=5).result == "while it was away"


def test_a_short_result_timeout_leaves_the_promise_to_the_subscriber(kq, worker):
    job = kq.create("a", None, HOT)
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):  # the builtin only from Python 3.11
        job.hotjob_promise.result(timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 2
    assert not job.hotjob_promise.done()
    worker.run("success", '"read by the subscriber thread"')
    wait_until(job.hotjob_promise.done, timeout=5, message="settled with nobody waiting")
    assert job.hotjob_promise.result(timeout=0).result == "read by the subscriber thread"


def test_exception_waits_too(kq, worker):
    job = kq.create("a", None, HOT)
    threading.Timer(0.05, kq.delete, (job.id,)).start()
    assert isinstance(job.hotjob_promise.exception(timeout=5), kickq.JobNotFound)


def test_close_while_a_thread_waits_cancels_it_promptly(kq):
    job = kq.create("a", None, HOT)
    outcome = []

    def wait():
        try:
            job.hotjob_promise.result(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - the test looks at which
            outcome.append(exc)

    waiting = threading.Thread(target=wait)
    waiting.start()
    wait_for_a_reader(kq, kq.settings()["redis_namespace"])
    started = time.monotonic()
    kq.close()
    waiting.join(timeout=5)
    assert time.monotonic() - started < 1
    assert len(outcome) == 1 and type(outcome[0]).__name__ == "CancelledError"


def test_an_idle_subscription_is_still_health_checked(kq_config, r, worker):
    """redis-py's health-check PING must still go out while no message comes, or a silently dead
    subscription would go unnoticed."""
    with kickq.Kickq(redis_options={"health_check_interval": 1}) as client:
        job = client.create("a", None, HOT)
        worker.run("success", "1")
        assert job.hotjob_promise.result(timeout=5).result == 1

        def pubsub_pinged():
            return any(c.get("cmd") == "ping" and int(c.get("sub", 0)) + int(c.get("ssub", 0)) >= 1
                       for c in r.client_list())

        wait_until(pubsub_pinged, timeout=5, message="the subscriber's health-check PING")


def test_a_timeout_callback_may_wait_on_another_promise(kq, worker):
    """The timer thread settles a late promise outside the waiter's lock: a done callback that
    then waits on another promise gets its answer (it would hang on the lock)."""
    late = kq.create("a", None, {"hotjob": True, "hotjob_timeout": 0.3})
    other = kq.create("b", None, HOT)
    got = []
    late.hotjob_promise.add_done_callback(
        lambda _: got.append(other.hotjob_promise.result(timeout=5).result))
    wait_until(late.hotjob_promise.done, timeout=5, message="the first timed out")
    worker.run("success", '"other"', names=("b",))
    wait_until(lambda: got, timeout=5, message="the callback had the other's answer")
    assert got == ["other"]


def test_close_cancels_pending_promises_and_is_prompt(kq):
    job = kq.create("a", None, HOT)
    started = time.monotonic()
    kq.close()
    assert time.monotonic() - started < 0.5
    assert job.hotjob_promise.cancelled()
    assert kq.create("a").id == "2"  # usable again


# --- Redis connection ---------------------------------------------------------------------------------

def test_version_check():
    with pytest.raises(kickq.RedisVersionError) as info:
        check_version({"redis_version": "5.0.0"})
    assert "6.0.0" in str(info.value) and "5.0.0" in str(info.value)
    assert isinstance(info.value, kickq.KickqError)
    for ok in ("6.0.0", "7.0.15", "10.0.0"):
        check_version({"redis_version": ok})
    assert MIN_REDIS_VERSION == (6, 0, 0)


def test_an_old_server_is_refused_before_anything_is_written(kq, r, namespace, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(redis.Redis, "info", lambda self, *a, **k: {"redis_version": "5.0.14"})
        with pytest.raises(kickq.RedisVersionError, match="6.0.0"):
            kq.create("a")
    # Read with INFO as it is: on a cluster, redis-py's RedisCluster (of redis-py 5) reads the slot
    # map after checking cluster_enabled in INFO.
    assert snapshot(r, namespace) == {}


@pytest.mark.parametrize("how", ["url", "password"])
def test_wrong_port_gives_redis_unavailable_quickly_without_the_password(kq_config, how):
    port = free_port()
    if how == "url":
        settings = {"redis_url": f"redis://someone:s3cret-pw@127.0.0.1:{port}/0"}
    else:
        settings = {"redis_url": None, "redis_port": port, "redis_password": "s3cret-pw"}
    kickq.config(redis_timeout=1, **settings)
    client = kickq.Kickq()
    started = time.monotonic()
    with pytest.raises(kickq.RedisUnavailable) as info:
        client.create("a")
    assert time.monotonic() - started < 1 + 1
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, kickq.KickqError)
    text = "".join(traceback.format_exception(info.value))
    assert "s3cret-pw" not in text
    assert str(port) in str(info.value)
    calls = []
    assert client.create("a", None, None, lambda *args: calls.append(args)) is None
    assert isinstance(calls[0][0], kickq.RedisUnavailable)


def test_a_server_that_never_answers_is_bounded_by_redis_timeout(kq_config):
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        kickq.config(redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", redis_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(kickq.RedisUnavailable):
            kickq.Kickq().get("1")
        assert time.monotonic() - started < 0.5 + 1


def test_reset_closes_connections(kq, r):
    def connections():
        return len(r.client_list())

    idle = connections()
    kq.create("a")
    kq.create("a", None, HOT)
    assert connections() > idle
    kickq.reset()
    wait_until(lambda: connections() == idle, timeout=5, message="kickq's connections closed")
    assert kickq.config()["redis_namespace"] == "kickq"


# --- process(): registration only ---------------------------------------------------------------------

def handler(job, data):
    return data


def test_process_with_a_str_or_a_list_of_names(kq, r, namespace):
    assert kq.process("a", handler=handler) is None
    kq.process(["b", "c"], {"concurrentJobs": 3}, handler)
    kq.process("d", {"concurrent_jobs": 2}, handler)
    kq.process("e", handler)  # handler in the options slot
    kq.process("f", {"concurrent_jobs": 2, "jobsPerWorker": 8}, handler)
    regs = {reg.names: reg for reg in registry.registrations()}
    assert set(regs) == {("a",), ("b", "c"), ("d",), ("e",), ("f",)}
    names = [("a",), ("b", "c"), ("d",), ("e",), ("f",)]
    assert [regs[n].concurrent_jobs for n in names] == [1, 3, 2, 1, 2]
    assert [regs[n].jobs_per_worker for n in names] == [1, 1, 1, 1, 8]
    assert regs[("f",)].slots == 16
    assert all(reg.handler is handler for reg in regs.values())
    assert snapshot(r, namespace) == {}  # registration touches no Redis


def test_process_as_a_decorator(kq):
    @kq.process("a")
    def plain(job, data):
        return 1

    @kq.process(["b", "c"], {"concurrentJobs": 4})
    def several(job, data):
        return 2

    assert plain(None, None) == 1 and several(None, None) == 2  # the functions are returned unchanged
    regs = registry.registrations()
    assert [(reg.names, reg.concurrent_jobs, reg.handler) for reg in regs] == [
        (("a",), 1, plain), (("b", "c"), 4, several)]


@pytest.mark.parametrize("args, error", [
    (("a", {"no_such": 1}, handler), kickq.ConfigError),
    (("a", {"concurrent_jobs": 0}, handler), kickq.ConfigError),
    (("a", {"concurrent_jobs": 1.5}, handler), kickq.ConfigError),
    (("a", {"concurrent_jobs": True}, handler), kickq.ConfigError),
    (("a", {"jobs_per_worker": 0}, handler), kickq.ConfigError),
    (("a", {"jobs_per_worker": 1001}, handler), kickq.ConfigError),
    (("a", {"jobs_per_worker": "8"}, handler), kickq.ConfigError),
    (("a", None, "not callable"), TypeError),
    ((5, None, handler), TypeError),
    (([5], None, handler), TypeError),
    (([], None, handler), ValueError),
    (("", None, handler), ValueError),
    ((["a", "a"], None, handler), ValueError),
])
def test_process_rejects_bad_registrations(kq, args, error):
    with pytest.raises(error):
        kq.process(*args)
    assert registry.registrations() == []


def test_a_name_can_have_one_handler_only(kq):
    kq.process(["a", "b"], handler=handler)
    with pytest.raises(kickq.ConfigError, match="b"):
        kq.process(["c", "b"], handler=lambda job, data: None)
    with pytest.raises(kickq.ConfigError):
        kickq.Kickq().process("a", handler=handler)
    assert [reg.names for reg in registry.registrations()] == [("a", "b")]


def test_reset_clears_registrations(kq):
    kq.process("a", handler=handler)
    assert registry.registrations()
    kickq.reset()
    assert registry.registrations() == []
    kickq.Kickq().process("a", handler=handler)  # the name is free again
    assert len(registry.registrations()) == 1


# --- AUTH, ACL users, unix sockets, concurrent producers ------------------------------------------------

def test_acl_user_limited_to_its_namespace(kq_config, every_server, namespace, worker):
    user, password = f"user-{namespace}", "acl-pw"
    pattern = "{" + namespace + "}:*"
    for server in every_server:
        server.acl_setuser(user, enabled=True, passwords=["+" + password], keys=[pattern], channels=[pattern],
                           commands=["+@all"])
    try:
        kickq.config(redis_url=with_credentials(kq_config["redis_url"], user, password))
        with kickq.Kickq() as client:
            job = client.create("a", {"x": 1}, HOT)
            worker.run("success", '"via acl"')
            assert job.hotjob_promise.result(timeout=5).result == "via acl"
            assert client.get(job.id).state == "success"
            assert client.delete(job.id) is True
    finally:
        for server in every_server:
            server.acl_deluser(user)


def test_requirepass_and_unix_socket(kq_config, tmp_path, namespace):
    from tests.helpers import start_redis, stop_redis

    sock = tmp_path / "redis.sock"
    proc, port = start_redis(tmp_path, "--unixsocket", str(sock))
    try:
        admin = redis.Redis(port=port)
        admin.config_set("requirepass", "s3cret-pw")
        kickq.config(redis_url=None, redis_port=port, redis_password="s3cret-pw")
        with kickq.Kickq() as client:
            assert client.create("a").id == "1"
        with kickq.Kickq(redis_url=f"unix://:s3cret-pw@{sock}?db=0") as client:
            assert client.create("a").id == "2"
        kickq.config(redis_password="wrong-pw")
        with pytest.raises(kickq.RedisUnavailable) as info:
            kickq.Kickq().create("a")
        assert "wrong-pw" not in "".join(traceback.format_exception(info.value))
        admin.close()
    finally:
        stop_redis(proc)


def test_concurrent_producers_of_hotjobs(kq, r, namespace):
    stop = threading.Event()

    def work():
        w = Worker(r, namespace)
        while not stop.is_set():
            got = w.scripts.claim(w.keys, ["a"])
            if got:
                w.scripts.finish(w.keys, got[0], got[1], "success", json.dumps(got[0]))

    def produce(out):
        out.extend(kq.create("a", None, HOT) for _ in range(50))

    workers = [threading.Thread(target=work) for _ in range(2)]
    results: list[list] = [[] for _ in range(4)]
    producers = [threading.Thread(target=produce, args=(out,)) for out in results]
    for t in workers + producers:
        t.start()
    for t in producers:
        t.join()
    try:
        jobs = [job for out in results for job in out]
        assert len({job.id for job in jobs}) == 200
        assert all(job.hotjob_promise.result(timeout=10).result == job.id for job in jobs)
    finally:
        stop.set()
        for t in workers:
            t.join()
    assert_consistent(r, namespace)


def test_hotjobs_follow_a_change_of_namespace(kq_config, namespace):
    from kickq.scripts import Scripts
    kq = kickq.Kickq()
    first = kq.create("a", None, {"hotjob": True, "hotjob_timeout": 5})
    kickq.config(redis_namespace=namespace + "-b")
    second = kq.create("a", None, {"hotjob": True, "hotjob_timeout": 5})
    for ns, job in ((namespace, first), (namespace + "-b", second)):
        keys = Keys(ns)
        scr = Scripts(kickq.Kickq(redis_namespace=ns).redis)  # on a cluster each has its own master
        job_id, token, _ = scr.claim(keys, ["a"])
        assert job_id == job.id
        scr.finish(keys, job_id, token, "success", '"ok"')
    assert first.hotjob_promise.result(timeout=5).result == "ok"
    assert second.hotjob_promise.result(timeout=5).result == "ok"
