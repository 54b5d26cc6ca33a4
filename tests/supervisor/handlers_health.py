"""Handlers for the health-check tests, run by a real kickq-supervisor: one worker.

With KICKQ_TEST_DIE_AT_FORK set, every process the supervisor forks (workers, reaper) exits at
once with code 3, before running any of its code: a crash loop, as a broken worker start-up
would make one.
"""
from __future__ import annotations

import os
import time
from typing import Any

import kickq
from tests.supervisor.handlers import _redis

WORKERS = 1


def wait_for_release(job: Any, data: dict[str, Any]) -> str:
    """Runs until the test sets data["release"] in Redis (at most data["seconds"])."""
    r = _redis(data)
    deadline = time.monotonic() + data.get("seconds", 30)
    while time.monotonic() < deadline and not r.exists(data["release"]):
        time.sleep(0.02)
    return "released"


def register() -> None:
    kickq.Kickq().process("health.wait", {"concurrent_jobs": WORKERS}, wait_for_release)
    if os.environ.get("KICKQ_TEST_DIE_AT_FORK"):
        os.register_at_fork(after_in_child=lambda: os._exit(3))


if __name__ != "tests.supervisor.handlers_health":
    register()
