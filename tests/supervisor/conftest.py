"""A real kickq-supervisor as a subprocess, for the tests of issue 3.

`start_supervisor(...)` runs `python -m kickq_supervisor` in a new session with its stderr in a file
(attached to the report of a failing test), waits until every worker and the reaper are up, and at
teardown SIGKILLs the master's process group and checks that nothing of that session is left
(workers and the reaper must die with the master: PR_SET_PDEATHSIG). The test process makes itself
a child subreaper so that those orphans are re-parented to it and can be reaped, not left as zombies.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

import kickq
from tests.helpers import wait_until
from tests.supervisor import handlers

HANDLERS = Path(handlers.__file__).resolve()
REPO = HANDLERS.parents[2]
WORKER_TITLE = re.compile(r"^kickq-supervisor: worker (\d+) \[(.*)\]$")
SUPERVISORS = pytest.StashKey[list]()


def _become_subreaper() -> None:
    PR_SET_CHILD_SUBREAPER = 36
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init instead
        pass


_become_subreaper()


def title_of(proc: psutil.Process) -> str:
    """The process title setproctitle wrote (it lands in /proc/PID/cmdline)."""
    try:
        return " ".join(part for part in proc.cmdline() if part)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live (non-zombie) process of session `sid`."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return out


def reap_orphans(sid: int, keep: int) -> None:
    """Reap zombies of session `sid` that were re-parented to us (we are a subreaper)."""
    for proc in psutil.process_iter():
        try:
            if proc.pid != keep and proc.ppid() == os.getpid() and os.getsid(proc.pid) == sid:
                os.waitpid(proc.pid, os.WNOHANG)
        except (ProcessLookupError, PermissionError, ChildProcessError, psutil.NoSuchProcess):
            continue


class Supervisor:
    def __init__(self, proc: subprocess.Popen, log_path: Path, namespace: str, redis_url: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.namespace = namespace
        self.redis_url = redis_url

    # --- looking at it ------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def master(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def children(self) -> list[psutil.Process]:
        try:
            return [p for p in self.master().children() if alive(p)]
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> dict[int, psutil.Process]:
        """Live workers by number, from their titles."""
        out = {}
        for child in self.children():
            match = WORKER_TITLE.match(title_of(child))
            if match:
                out[int(match.group(1))] = child
        return out

    def worker_titles(self) -> dict[int, str]:
        return {n: title_of(p) for n, p in self.workers().items()}

    def reapers(self) -> list[psutil.Process]:
        return [p for p in self.children() if "reaper" in title_of(p)]

    def worker_running(self, job_id: str) -> psutil.Process | None:
        """The worker whose title shows job `job_id`."""
        for proc in self.workers().values():
            if f" #{job_id} " in title_of(proc):
                return proc
        return None

    def wait_running(self, job_id: str, timeout: float = 10.0) -> psutil.Process:
        """The worker running `job_id`, once its title shows it. The title changes after the worker
        told the master ("S ..."), so from then on the master knows the run; a job merely seen as
        `processing` in Redis may still be between its claim and that message."""
        return wait_until(lambda: self.worker_running(job_id), timeout=timeout, interval=0.01,
                          message=f"a worker running job {job_id}")

    def ready(self, workers: int) -> bool:
        titles = self.worker_titles()
        return (len(titles) == workers and all(t.endswith("[idle]") for t in titles.values())
                and len(self.reapers()) == 1)

    def wait_ready(self, workers: int, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: self.proc.poll() is not None or self.ready(workers), timeout=timeout,
                       interval=0.02, message=f"{workers} idle workers and a reaper")
        except AssertionError:
            raise AssertionError(f"supervisor not ready: workers {self.worker_titles()}, "
                                 f"reapers {len(self.reapers())}\n{self.log()[-3000:]}") from None
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")

    # --- acting on it -------------------------------------------------------------------------------

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout}s:\n"
                                 f"{self.log()[-3000:]}") from None

    def destroy(self) -> list[str]:
        """SIGKILL the master's process group; return what of its session is still alive after 5 s."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

        def gone() -> bool:
            reap_orphans(self.pid, keep=self.pid)
            return not session_processes(self.pid)
        try:
            wait_until(gone, timeout=5.0, interval=0.02)
            return []
        except AssertionError:
            left = session_processes(self.pid)
            described = [f"{p.pid} {title_of(p)!r}" for p in left]
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            reap_orphans(self.pid, keep=self.pid)
            return described


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for sup in item.stash.get(SUPERVISORS, []):
            report.sections.append((f"kickq-supervisor {sup.pid} stderr", sup.log()[-20000:]))


StartSupervisor = Callable[..., Supervisor]


@pytest.fixture
def start_supervisor(request: pytest.FixtureRequest, redis_url: str, namespace: str, kq_config: dict,
                     tmp_path: Path) -> Iterator[StartSupervisor]:
    """start_supervisor(*modules, args=(), workers=N, url=..., ns=..., wait=True) -> Supervisor.

    Without modules it runs handlers.py (and waits for its handlers.WORKERS workers). `url` / `ns`
    None leave out --redis-url / --redis-namespace (config from the module applies then).
    """
    started: list[Supervisor] = []
    request.node.stash[SUPERVISORS] = started

    def start(*modules: str | os.PathLike[str], args: Sequence[str] = (), workers: int | None = None,
              url: str | None = redis_url, ns: str | None = namespace, wait: bool = True,
              kill_grace: float = 0.2) -> Supervisor:
        if not modules:
            modules = (HANDLERS,)
            workers = handlers.WORKERS if workers is None else workers
        cmd = [sys.executable, "-m", "kickq_supervisor", "--kill-grace", str(kill_grace)]
        if url is not None:
            cmd += ["--redis-url", url]
        if ns is not None:
            cmd += ["--redis-namespace", ns]
        cmd += [*args, *map(str, modules)]
        log_path = tmp_path / f"supervisor-{len(started) + 1}.log"
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
        env.pop("KICKQ_EMBEDDED_REDIS", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO, env=env, start_new_session=True)
        sup = Supervisor(proc, log_path, ns or "", url or "")
        started.append(sup)
        if wait:
            if workers is None:
                raise ValueError("say how many workers to wait for")
            sup.wait_ready(workers)
        return sup

    yield start
    problems = []
    for sup in started:
        left = sup.destroy()
        if left:
            problems.append(f"supervisor {sup.pid} left processes behind: {left}")
    print("\n".join(f"--- supervisor {s.pid} ---\n{s.log()[-5000:]}" for s in started))
    assert not problems, "\n".join(problems)


@pytest.fixture
def supervisor(start_supervisor: StartSupervisor) -> Supervisor:
    """A supervisor running handlers.py on this test's Redis and namespace, every worker idle."""
    return start_supervisor()


@pytest.fixture
def kq(kq_config: dict) -> Iterator[kickq.Kickq]:
    client = kickq.Kickq()
    try:
        yield client
    finally:
        client.close()


# --- small helpers for the tests ---------------------------------------------------------------------

def wait_job(kq: kickq.Kickq, job_id: str, states: str | Sequence[str] = ("success", "fail"),
             timeout: float = 10.0) -> kickq.Job:
    """Poll until the job is in one of `states`; return it."""
    wanted = (states,) if isinstance(states, str) else tuple(states)
    seen: list[str] = []

    def check() -> kickq.Job | None:
        job = kq.get(job_id)
        if not seen or seen[-1] != job.state:
            seen.append(job.state)
        return job if job.state in wanted else None
    try:
        return wait_until(check, timeout=timeout, interval=0.01)
    except AssertionError:
        raise AssertionError(f"job {job_id} not in {wanted} after {timeout}s; states seen {seen}; "
                             f"job {kq.get(job_id).to_dict()}") from None

