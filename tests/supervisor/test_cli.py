"""The command line and the processes it makes: --help, import failures, process titles, pidfile,
config from the handler module, --embedded-redis, and the reaper being restarted."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import kickq
from kickq.job import queue_reads, read_fields
from kickq.keys import Keys
from tests.helpers import wait_until
from tests.supervisor import handlers
from tests.supervisor.conftest import REPO, alive, title_of, wait_job

SUPERVISOR_SCRIPT = Path(sys.executable).parent / "kickq-supervisor"


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "kickq_supervisor", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", [[sys.executable, "-m", "kickq_supervisor"], [str(SUPERVISOR_SCRIPT)]],
                         ids=["python -m", "console script"])
def test_help(command):
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kickq-supervisor")
    for option in ("MODULE", "--redis-url", "--redis-namespace", "--log-level", "--embedded-redis",
                   "--max-jobs-per-worker", "--max-memory-per-worker", "--pidfile", "--wait-replicas"):
        assert option in result.stdout


def test_no_module_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2
    assert "MODULE" in result.stderr


def test_handler_import_failure_exits_fast_naming_the_module(tmp_path, redis_url, namespace):
    module = tmp_path / "broken_handlers.py"
    module.write_text("import kickq\nraise RuntimeError('no config for you')\n")
    started = time.monotonic()
    result = run_cli("--redis-url", redis_url, "--redis-namespace", namespace, module)
    assert time.monotonic() - started < 10
    assert result.returncode != 0
    assert f"cannot import handler module '{module}'" in result.stderr
    assert "RuntimeError: no config for you" in result.stderr
    # It said so once and stopped: no restart loop.
    assert result.stderr.count("cannot import handler module") == 1


def test_missing_dotted_module_is_named(redis_url):
    result = run_cli("--redis-url", redis_url, "no_such_kickq_handlers.sub")
    assert result.returncode != 0
    assert "'no_such_kickq_handlers.sub'" in result.stderr
    assert "ModuleNotFoundError" in result.stderr


def test_module_that_registers_nothing(tmp_path, redis_url):
    module = tmp_path / "empty_handlers.py"
    module.write_text("X = 1\n")
    result = run_cli("--redis-url", redis_url, module)
    assert result.returncode == 2
    assert "no handlers registered" in result.stderr


def test_a_dotted_module_name_works(start_supervisor, kq):
    start_supervisor("tests.supervisor.handlers_by_name", workers=1)
    assert wait_job(kq, kq.create("by-name", {"x": 1}).id).result == {"x": 1}


def test_process_titles(supervisor, kq, namespace):
    assert title_of(supervisor.master()) == f"kickq-supervisor: master [{namespace}]"
    titles = supervisor.worker_titles()
    assert titles == {n: f"kickq-supervisor: worker {n} [idle]" for n in range(1, handlers.WORKERS + 1)}
    [reaper] = supervisor.reapers()
    assert title_of(reaper) == "kickq-supervisor: reaper"

    job = kq.create("chaos", {"do": "hang"}, {"process_timeout": 30, "ghost_interval": 3600})
    busy = supervisor.wait_running(job.id)
    pattern = re.compile(rf"^kickq-supervisor: worker (\d+) \[chaos #{job.id} (\d+\.\d)s\]$")
    match = pattern.match(title_of(busy))
    assert match and int(match.group(1)) in handlers.worker_numbers("chaos"), title_of(busy)
    # The elapsed time keeps moving while the handler runs.
    wait_until(lambda: float(pattern.match(title_of(busy)).group(2)) >= 1.0, timeout=5.0,
               message="the title shows a growing elapsed time")


def test_pidfile(start_supervisor, tmp_path, redis_url, namespace):
    pidfile = tmp_path / "kickq.pid"
    sup = start_supervisor(args=["--pidfile", str(pidfile)])
    assert pidfile.read_text().strip() == str(sup.pid)
    # A second supervisor with the same pidfile refuses to start.
    second = run_cli("--redis-url", redis_url, "--redis-namespace", namespace, "--pidfile", pidfile,
                     handlers.__file__)
    assert second.returncode == 1
    assert f"process {sup.pid} is running" in second.stderr
    sup.send(signal.SIGTERM)
    assert sup.wait_exit(timeout=10) == 0
    assert not pidfile.exists()


CONFIGURED_MODULE = """
import kickq

kickq.config(redis_url={url!r}, redis_namespace={ns!r})


def handler(job, data):
    return "configured"


kickq.Kickq().process("configured", handler)
"""


def test_config_from_the_module_applies(start_supervisor, tmp_path, kq, redis_url, namespace):
    module = tmp_path / "configured_handlers.py"
    module.write_text(textwrap.dedent(CONFIGURED_MODULE.format(url=redis_url, ns=namespace)))
    sup = start_supervisor(module, workers=1, url=None, ns=None)
    assert title_of(sup.master()) == f"kickq-supervisor: master [{namespace}]"
    assert wait_job(kq, kq.create("configured").id).result == "configured"


def test_command_line_flags_win_over_module_config(start_supervisor, tmp_path, kq, redis_url, namespace):
    module = tmp_path / "configured_handlers.py"
    # The module points at a port where nothing listens and at another namespace.
    module.write_text(textwrap.dedent(CONFIGURED_MODULE.format(url="redis://127.0.0.1:1/0", ns="elsewhere")))
    sup = start_supervisor(module, workers=1)
    assert title_of(sup.master()) == f"kickq-supervisor: master [{namespace}]"
    assert wait_job(kq, kq.create("configured").id).result == "configured"


def test_embedded_redis(start_supervisor, tmp_path, namespace):
    data_dir = tmp_path / "redis-data"
    sup = start_supervisor(args=["--embedded-redis", str(data_dir)], url=None)
    [server] = [p for p in sup.children() if "redis-server" in p.name()]
    url = f"unix://{data_dir / 'redis.sock'}"
    with kickq.Kickq(redis_url=url, redis_namespace=namespace) as kq:
        assert wait_job(kq, kq.create("style.sync", {"value": "embedded"}).id).result["echo"] == "embedded"
    assert (data_dir / "appendonlydir").is_dir() or list(data_dir.glob("*.aof"))
    sup.send(signal.SIGTERM)
    assert sup.wait_exit(timeout=15) == 0
    assert not alive(server)  # the supervisor stops the redis-server it started


def test_the_reaper_is_restarted(supervisor, kq):
    [reaper] = supervisor.reapers()
    reaper.send_signal(signal.SIGKILL)
    new = wait_until(lambda: [p for p in supervisor.reapers() if p.pid != reaper.pid], timeout=5.0,
                     message="a new reaper")
    assert len(new) == 1 and not alive(reaper)
    # It does its job: a delayed job is promoted and run.
    job = kq.create("pid", None, {"delay": 0.1})
    assert wait_job(kq, job.id).state == "success"


def test_workers_and_reaper_die_with_the_master(supervisor):
    children = supervisor.children()
    assert len(children) == handlers.WORKERS + 1
    # Each has its own process group, so the group kill below reaches the master alone.
    assert all(os.getpgid(p.pid) == p.pid for p in children)
    os.killpg(supervisor.pid, signal.SIGKILL)
    supervisor.proc.wait(timeout=5)
    wait_until(lambda: not any(alive(p) for p in children), timeout=5.0,
               message="no orphaned worker or reaper")


# --- --wait-replicas: the supervisor's saves confirmed by replicas ---------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.replica_pair import ReplicaPair

    started = ReplicaPair.start(tmp_path_factory.mktemp("replicas"))
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_wait_replicas_takes_a_whole_number(bad):
    result = run_cli("--wait-replicas", bad, str(handlers.__file__))
    assert result.returncode == 2
    assert "--wait-replicas: must be a whole number, 0 or more" in result.stderr


def test_wait_replicas_reaches_the_settings_and_wins_over_the_module():
    from kickq import registry
    from kickq_supervisor.cli import build_parser, settings_for

    args = build_parser().parse_args(["--wait-replicas", "2", "handlers.py"])
    assert args.wait_replicas == 2
    assert build_parser().parse_args(["handlers.py"]).wait_replicas is None  # config's, then 0
    kickq.reset()
    try:
        kickq.config(wait_replicas=1, wait_replicas_timeout=0.5)  # as a handler module may
        registration = registry.Registration(("a",), 1, lambda job, data: None, {})
        from_module = settings_for(registration, {})
        assert (from_module["wait_replicas"], from_module["wait_replicas_timeout"]) == (1, 0.5)
        assert settings_for(registration, {"wait_replicas": 2})["wait_replicas"] == 2
    finally:
        kickq.reset()


@pytest.mark.replicas
@pytest.mark.parametrize("how", ["flag", "module"])
def test_a_supervisor_with_wait_replicas_waits_after_its_saves(start_supervisor, tmp_path, pair, namespace,
                                                                how):
    module = tmp_path / "configured_handlers.py"
    wait = "wait_replicas=1" if how == "module" else ""
    module.write_text(textwrap.dedent(f"""
        import kickq
        kickq.config({wait})

        kickq.Kickq().process("configured", lambda job, data: "configured")
        """))
    args = ["--wait-replicas", "1"] if how == "flag" else []
    start_supervisor(module, args=args, workers=1, url=pair.master_url)
    with kickq.Kickq(redis_url=pair.master_url, redis_namespace=namespace) as producer:  # no WAIT of its own
        before = pair.waits()
        jobs = producer.create_many([("configured",)] * 20)
        for job in jobs:
            assert wait_job(producer, job.id).result == "configured"
        assert pair.waits() > before  # the worker's settles

        def replicated() -> bool:
            pipe = pair.replica.pipeline(transaction=False)
            queue_reads(pipe, Keys(namespace), [job.id for job in jobs])
            return [fields.get("state") for fields in read_fields(pipe.execute())] == ["success"] * len(jobs)
        wait_until(replicated, timeout=10, message="the replica has every outcome")


@pytest.mark.replicas
@pytest.mark.parametrize("setting, message", [
    ("wait_replicas_timeout=10", "wait_replicas_timeout (10s) must be below redis_timeout"),
    ("wait_aof=True", "wait_aof needs Redis >= 7.2 (WAITAOF)"),  # this machine's Redis is 7.0
])
def test_a_supervisor_refuses_to_start_with_waits_it_cannot_make(tmp_path, pair, namespace, setting, message):
    module = tmp_path / "configured_handlers.py"
    module.write_text(textwrap.dedent(f"""
        import kickq
        kickq.config({setting})

        kickq.Kickq().process("configured", lambda job, data: "configured")
        """))
    result = run_cli("--redis-url", pair.master_url, "--redis-namespace", namespace, "--wait-replicas", "1",
                     module)
    assert result.returncode == 1
    assert message in result.stderr
