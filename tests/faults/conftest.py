"""Fixtures of the fault-injection cases (issue 7; see docs/reliability.md).

Each case gets private redis-servers with the persistence it needs (`redis_procs`), a ledger file
outside Redis (`ledger`), and real supervisors through tests/supervisor's `start_supervisor` (its
teardown SIGKILLs each supervisor and asserts that none of its processes is left). On top of that,
`no_process_left` checks after every case that nothing this process started is still running.
The report of every case is printed again at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.faults import harness
from tests.helpers import wait_until
from tests.supervisor.conftest import pytest_runtest_makereport, start_supervisor  # noqa: F401


def _live_descendants() -> dict[int, str]:
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = " ".join(proc.cmdline())[:120]
            else:
                import os

                try:
                    os.waitpid(proc.pid, os.WNOHANG)  # an orphan re-parented to us (subreaper)
                except ChildProcessError:
                    pass
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(autouse=True)
def no_process_left(redis_server: object) -> Iterator[None]:
    """Whatever a case starts (supervisors, their workers and grandchildren, redis-servers, reapers)
    must be gone when it ends. (Requests the session's redis-server so that it is not counted.)"""
    before = set(_live_descendants())
    yield
    try:
        wait_until(lambda: not set(_live_descendants()) - before, timeout=10, interval=0.05)
    except AssertionError:
        left = {pid: cmd for pid, cmd in _live_descendants().items() if pid not in before}
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"processes left behind by the case: {left}")


@pytest.fixture
def redis_procs(tmp_path: Path) -> Iterator[Callable[..., harness.RedisProc]]:
    """start(*redis_server_args, name="redis") -> RedisProc in tmp_path/name; all stopped after."""
    started: list[harness.RedisProc] = []

    def start(*args: str, name: str = "redis") -> harness.RedisProc:
        proc = harness.RedisProc(tmp_path / name, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture
def ledger(tmp_path: Path) -> harness.Ledger:
    return harness.Ledger(tmp_path / "ledger.txt")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.RESULTS:
        terminalreporter.section("kickq fault cases: measured outcomes and pass criteria")
        for text in harness.RESULTS:
            terminalreporter.write_line(text)
