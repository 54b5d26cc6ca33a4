"""kickq-supervisor as PID 1 of its own PID namespace, as in a container without an init shim
(`unshare --pid --fork --mount-proc`, root only): a job's orphaned grandchild is re-parented to the
supervisor, which reaps it (no zombie is left); SIGTERM to PID 1 is a graceful stop that lets a
running job finish, and the exit code is 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.helpers import wait_until
from tests.supervisor.conftest import wait_job

REPO = Path(__file__).resolve().parents[2]


def can_unshare() -> str | None:
    """Why a PID namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid)"
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              text=True, timeout=10)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if done.returncode == 0 else f"unshare --pid fails here: {done.stderr.strip()}"


@pytest.fixture
def pid1_module(tmp_path: Path) -> Path:
    module = tmp_path / "pid1_handlers.py"
    module.write_text(textwrap.dedent(f"""
        import subprocess, time
        import kickq

        kq = kickq.Kickq()

        @kq.process("orphan", {{"concurrent_jobs": 1}})
        def orphan(job, data):
            # sh starts a background sh and exits at once: the background one is orphaned and
            # re-parented to PID 1, the supervisor; it lives a second, then exits.
            subprocess.run(["sh", "-c", "(sh -c 'sleep 1; touch {tmp_path}/orphan-done' &)"], check=True)
            return "started"

        @kq.process("slow", {{"concurrent_jobs": 1}})
        def slow(job, data):
            open("{tmp_path}/slow-started", "w").close()
            time.sleep(2)
            return "finished"
    """))
    return module


def zombies(master: psutil.Process) -> list[int]:
    out = []
    for child in master.children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_the_supervisor_as_pid_1_reaps_orphans_and_stops_gracefully(pid1_module, redis_url, namespace, kq,
                                                                   tmp_path):
    why = can_unshare()
    if why:
        pytest.skip(why)
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "kickq_supervisor",
           "--redis-url", redis_url, "--redis-namespace", namespace, "--kill-grace", "0.2", str(pid1_module)]
    log = open(tmp_path / "supervisor.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 1, message="PID 1 forked by unshare")
        master = psutil.Process(proc.pid).children()[0]
        wait_until(lambda: len(master.children()) >= 3, message="the workers and the reaper")

        # An orphan: re-parented to the supervisor (PID 1 here), then reaped once it exits.
        assert wait_job(kq, kq.create("orphan").id).result == "started"
        wait_until(lambda: any("sleep 1" in " ".join(c.cmdline()) for c in master.children()),
                   message="the orphaned grandchild is the supervisor's child now")
        wait_until(lambda: (tmp_path / "orphan-done").exists(), timeout=10, message="the orphan ended")
        wait_until(lambda: not zombies(master) and not any("sleep 1" in " ".join(c.cmdline())
                                                           for c in master.children()),
                   timeout=5, message="the orphan reaped: no zombie left")

        # SIGTERM to PID 1: the running job finishes, then the supervisor exits 0.
        slow = kq.create("slow")
        wait_until(lambda: (tmp_path / "slow-started").exists(), message="the slow job runs")
        master.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        done = kq.get(slow.id)
        assert done.state == "success" and done.result == "finished"
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children():
                child.kill()  # PID 1 of the namespace: everything in it dies with it
            proc.kill()
            proc.wait(10)
        log.close()
