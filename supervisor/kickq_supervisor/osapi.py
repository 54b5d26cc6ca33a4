"""Every process-level system call the master makes, behind one object that tests replace."""
from __future__ import annotations

import ctypes
import gc
import os
import signal
import time
from typing import Any, Callable

_setproctitle: Any
try:
    import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - setproctitle is a dependency; titles are a nicety
    _setproctitle = None


def set_title(title: str) -> None:
    if _setproctitle is not None:
        _setproctitle.setproctitle(title)


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


# Loaded once in the master, before any fork: a child that loads it dirties memory of its own.
_LIBC = _libc()
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (no orphaned workers)."""
    try:
        PR_SET_PDEATHSIG = 1
        _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except AttributeError:  # not Linux: workers also watch getppid() between jobs
        pass


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Called by the master before each fork: start-up (imports, argument parsing, loading the handler
    modules and the scripts) leaves freed but resident pages in its heap, and a child would inherit
    them; measured on the bench's idle tree of 4 processes: 44.5-44.7 -> 43.1-43.3 MiB PSS. And by
    a worker that waited a whole second for work (0.2 MiB each once the pool rests)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc (musl, macOS): nothing to give back this way
        pass


def current_rss() -> int:
    """This process' resident set size in bytes. /proc on Linux; psutil, imported only here,
    elsewhere (importing it costs every process of the supervisor 0.8 MiB)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except OSError:  # pragma: no cover - not Linux
        import psutil
        return int(psutil.Process().memory_info().rss)


class ProcessOps:
    """The real thing. `spawn(target)` forks; the child runs target() in its own process group
    and never returns into the master's code."""

    def monotonic(self) -> float:
        return time.monotonic()

    def spawn(self, target: Callable[[], int]) -> int:
        parent = os.getpid()
        release_free_heap()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            # Everything inherited from the master stays out of this child's garbage collections:
            # a full collection writes into each object it visits, which would copy nearly every
            # shared page (measured: +6 MiB per worker after one gc.collect()). Costs no page itself.
            gc.freeze()
            try:
                os.setpgid(0, 0)
                # At once, then check the master is still there: had it died since the fork, no
                # death signal would ever come and the child would outlive it.
                die_with_parent()
                if os.getppid() == parent:
                    code = target()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # both sides set it, so a kill right after fork hits the group
        except OSError:
            pass
        return pid

    def kill_group(self, pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.kill(pid, sig)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> list[tuple[int, int]]:
        """(pid, wait status) of every child that has exited, without blocking."""
        out: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return out
            if pid == 0:
                return out
            out.append((pid, status))


def describe_exit(status: int, hint: bool = True) -> str:
    """'killed by SIGKILL' / 'exited with code 3', from a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        suffix = " (out of memory?)" if hint and sig == signal.SIGKILL else ""
        return f"killed by {name}{suffix}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with status {status}"
