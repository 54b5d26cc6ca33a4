"""The four handler styles, each run by a real worker: result and last_error as stored in Redis."""
from __future__ import annotations

import pytest

from tests.supervisor.conftest import wait_job

pytestmark = pytest.mark.usefixtures("supervisor")


def run(kq, name, data):
    return wait_job(kq, kq.create(name, data).id)


def assert_success(job, result):
    assert job.state == "success", job.to_dict()
    assert job.result == result
    assert job.last_error is None
    assert [run["state"] for run in job.runs] == ["success"]


def assert_failure(job, error):
    """A failure without retry: one failed run whose error is last_error."""
    assert job.state == "fail", job.to_dict()
    assert job.result is None
    assert job.last_error == error
    assert [(run["state"], run["error"]) for run in job.runs] == [("fail", error)]


def test_sync_return_is_the_result(kq):
    job = run(kq, "style.sync", {"value": [1, "two"]})
    assert_success(job, {"echo": [1, "two"], "job": job.id})


def test_sync_raise_is_a_failure(kq):
    assert_failure(run(kq, "style.sync", {"raise": "bad input"}), "ValueError: bad input")


@pytest.mark.parametrize("hotjob", [False, True])  # a hotjob's outcome is saved alone, at once
def test_an_error_text_utf8_cannot_hold_is_saved_escaped(kq, hotjob):
    job = kq.create("style.sync", {"lone_surrogate": "f"}, {"hotjob": hotjob})
    assert_failure(wait_job(kq, job.id), "ValueError: cannot open f\\udcff")


def test_a_result_utf8_cannot_hold_fails_the_job(kq):
    job = run(kq, "style.sync", {"lone_surrogate": "f", "returned": True})
    assert_failure(job, "InvalidPayload: handler result must be valid Unicode text: character 2 of its JSON "
                        "is a lone surrogate ('\\udcff'), which UTF-8 cannot hold")


@pytest.mark.parametrize("mode", ["ok", "ok-none"])
def test_callback_success_and_late_calls_ignored(kq, mode):
    # "ok" calls cb() and then cb("late error after success"): the late call changes nothing.
    assert_success(run(kq, "style.callback", {"mode": mode}), None)


def test_callback_error_and_late_success_ignored(kq):
    assert_failure(run(kq, "style.callback", {"mode": "err", "err": "it broke"}), "it broke")


def test_callback_with_an_exception(kq):
    assert_failure(run(kq, "style.callback", {"mode": "exception"}), "KeyError: 'missing thing'")


def test_callback_from_another_thread(kq):
    assert_success(run(kq, "style.callback", {"mode": "thread"}), None)
    assert_failure(run(kq, "style.callback", {"mode": "thread", "err": "thread says no"}), "thread says no")


def test_async_def(kq):
    assert_success(run(kq, "style.async", {"value": 7}), {"async": 7})
    assert_failure(run(kq, "style.async", {"raise": "async boom"}), "RuntimeError: async boom")


def test_returned_future(kq):
    assert_success(run(kq, "style.promise", {"kind": "future", "value": "v"}), {"future": "v"})
    assert_failure(run(kq, "style.promise", {"kind": "future", "reject": "disk gone"}), "OSError: disk gone")


def test_returned_awaitable(kq):
    assert_success(run(kq, "style.promise", {"kind": "awaitable", "value": 3}), {"awaitable": 3})
    assert_failure(run(kq, "style.promise", {"kind": "awaitable", "reject": "nope"}), "LookupError: nope")
