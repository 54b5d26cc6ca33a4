"""Process bookkeeping for the bench: nothing it starts may outlive it.

Both the runner and each driver make themselves a child subreaper (Linux prctl), so a process
that double-forks or calls setsid() is re-parented to them instead of init, and
``descendants()`` sees everything still alive that the bench started, whatever it did.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(exclude: set[int] = frozenset()) -> list[Any]:  # type: ignore[assignment]
    """Live (non-zombie) descendants of this process, less the pids in exclude."""
    import psutil
    out = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def describe(proc: Any) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:120] or proc.name()}"
    except Exception:  # noqa: BLE001 - it may be gone already
        return f"pid {proc.pid}"


def kill_all(procs: list[Any], grace: float = 1.0) -> list[str]:
    """TERM, then KILL after grace; return a description of each one that was alive."""
    import psutil
    if not procs:
        return []
    described = [describe(p) for p in procs]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    reap_zombies()
    return described


def reap_zombies(keep: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """waitpid the zombie children that no Popen object owns (re-parented orphans)."""
    import psutil
    for child in psutil.Process().children():
        if child.pid in keep:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


def wait_gone(procs: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.01)


def _alive(proc: Any) -> bool:
    import psutil
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
