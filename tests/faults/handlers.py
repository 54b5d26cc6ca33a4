"""Job handlers for the fault cases, run by real kickq-supervisor processes.

A case writes a small module (see `harness.handler_module`) that sets `LEDGER` and registers these
functions; the supervisor imports it. Every execution first appends one line to the ledger — a file
outside Redis, opened with O_APPEND so that lines from many processes never interleave:

    <job id> <attempt> <pid> <ref>

(`ref` is the producer's own reference from the job data, "-" when there is none: it identifies an
execution of a job whose create raised, whose id the producer never learnt.) The line is the job's
side effect; it is written before the handler does anything else, so a run killed afterwards still
counts as an execution.

`data["do"]` picks a behaviour (default: sleep `ms` milliseconds and return). Paths the handler must
touch (pid files, release files) come in the data.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from typing import Any

LEDGER: str | None = None  # set by the generated module
_fd: tuple[int, int] | None = None  # (pid, fd): reopened after a fork


def _ledger_fd() -> int:
    global _fd
    if _fd is None or _fd[0] != os.getpid():
        assert LEDGER, "the handler module must set handlers.LEDGER"
        _fd = (os.getpid(), os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    return _fd[1]


def record(job: Any, data: dict[str, Any]) -> int:
    """Append this execution to the ledger; returns the attempt number."""
    attempt = job.attempt  # the run's attempt token (a run lost uncounted still took one)
    ref = str(data.get("ref", "-")).replace(" ", "_")
    os.write(_ledger_fd(), f"{job.id} {attempt} {os.getpid()} {ref}\n".encode())
    return attempt


def _write_pid(path: str, pid: int) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(path + ".tmp", path)


def _hang() -> None:
    while True:
        time.sleep(3600)


def work(job: Any, data: Any) -> Any:
    data = data if isinstance(data, dict) else {}
    attempt = record(job, data)
    do = data.get("do", "sleep")
    if "pidfile" in data:
        _write_pid(data["pidfile"], os.getpid())
    if do == "sleep":
        if data.get("ms"):
            time.sleep(data["ms"] / 1000)
    elif do == "hang":  # sleeps in Python until killed
        _hang()
    elif do == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _write_pid(data["ready"], os.getpid())
        _hang()
    elif do == "busy_c":
        # Catastrophic backtracking: the regex engine (C) runs without returning to Python for
        # far longer than any test, so only a signal from outside can end it.
        _write_pid(data["ready"], os.getpid())
        re.fullmatch(r"(x+x+)+y", "x" * 64)
    elif do == "fork":  # a grandchild in the worker's process group, and one that ignores TERM
        plain = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)
        stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 3600"], stdin=subprocess.DEVNULL)
        _write_pid(data["grandchildren"], plain.pid)
        _write_pid(data["grandchildren"] + ".2", stubborn.pid)
        _hang()
    elif do == "poison":  # kills its worker every time
        os.kill(os.getpid(), signal.SIGKILL)
    elif do == "echo":
        return data.get("ref")
    elif do == "wait_file":  # blocks until the test creates data["release"] (or gives up)
        deadline = time.monotonic() + data.get("timeout", 60)
        while not os.path.exists(data["release"]):
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.01)
    elif do == "first_waits":  # attempt 1 blocks until released; later attempts return at once
        if attempt == 1:
            deadline = time.monotonic() + data.get("timeout", 60)
            while not os.path.exists(data["release"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("never released")
                time.sleep(0.01)
    else:
        raise ValueError(f"unknown action {do!r}")
    return {"pid": os.getpid(), "attempt": attempt}


async def work_async(job: Any, data: Any) -> Any:
    """`work` for dense workers' event loops: the same ledger line, then `ms` of asyncio.sleep (the
    only behaviour it has)."""
    data = data if isinstance(data, dict) else {}
    attempt = record(job, data)
    if data.get("ms"):
        await asyncio.sleep(data["ms"] / 1000)
    return {"pid": os.getpid(), "attempt": attempt}
