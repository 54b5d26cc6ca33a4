"""`kickq-supervisor --check`: a good module, import errors, bad options, an unreachable Redis, wrong
credentials, ACL users (checked by ACL DRYRUN, or by probes where the user may not run it), and
that nothing is written to Redis."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.supervisor.conftest import REPO


def run_check(*args: Any, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kickq_supervisor", "--check", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def module(tmp_path: Path, body: str, name: str = "check_handlers") -> Path:
    path = tmp_path / f"{name}_{uuid.uuid4().hex[:6]}.py"
    path.write_text("import kickq\n" + textwrap.dedent(body))
    return path


GOOD = """
kq = kickq.Kickq()
kq.process(["resize", "thumbnail"], {"concurrent_jobs": 2, "jobs_per_worker": 3}, lambda job: None)
kq.process("email", lambda job: None)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_calls(client: redis.Redis) -> int:
    """Calls so far of every command flagged `write` (INFO commandstats)."""
    writes = {name.lower() for name, spec in client.command().items() if "write" in spec["flags"]}
    stats = client.info("commandstats")
    return sum(int(value["calls"]) for name, value in stats.items()
               if name.removeprefix("cmdstat_").split("|")[0] in writes)


def footprint(client: redis.Redis) -> tuple[int, int, int]:
    return client.dbsize(), write_calls(client), len(client.function_list())


@pytest.fixture
def admin(redis_server):
    client = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    users: list[str] = []
    client.made_users = users  # type: ignore[attr-defined]
    yield client
    for user in users:
        client.acl_deluser(user)
    client.close()


def acl_user(admin, redis_server, rules: list[str]) -> str:
    """A new ACL user with `rules`; its URL."""
    user, password = f"chk-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", *rules)
    admin.made_users.append(user)
    return f"redis://{user}:{password}@{redis_server.host}:{redis_server.port}/0"


def test_help_lists_check():
    result = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--help"], capture_output=True,
                            text=True, timeout=30)
    assert "--check" in result.stdout and "ACL" in result.stdout


@pytest.mark.single_server("whole-server counters (DBSIZE, commandstats)")
def test_good_module_lists_what_would_run_and_writes_nothing(tmp_path, redis_url, namespace, admin):
    path = module(tmp_path, GOOD)
    before = footprint(admin)
    result = run_check("--redis-url", redis_url, "--redis-namespace", namespace, path)
    assert footprint(admin) == before
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "registration 1: resize, thumbnail: 2 worker(s) x 3 job(s) at once = 6 job slot(s)" in out
    assert "registration 2: email: 1 worker(s) x 1 job(s) at once" in out
    assert f"namespace {namespace}; Redis {redis_url}" in out
    assert "Redis 7" in out or "Redis 6" in out
    assert "commands kickq runs are allowed" in out  # the default user may run ACL DRYRUN
    assert "would run 3 worker(s), 7 job slot(s)" in out
    assert out.rstrip().endswith("--check: OK")
    assert result.stderr == ""


def test_config_cascade_of_each_registration(tmp_path, redis_url, namespace):
    """The namespace comes from the registering client, the config from the module: each registration
    is shown with its own, and the flags win over both."""
    path = module(tmp_path, f"""
    kickq.config(redis_url={redis_url!r})
    kickq.Kickq(redis_namespace="{namespace}-a").process("a", lambda job: None)
    kickq.Kickq(redis_namespace="{namespace}-b").process("b", lambda job: None)
    """)
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert f"a: 1 worker(s) x 1 job(s) at once = 1 job slot(s); namespace {namespace}-a" in result.stdout
    assert f"namespace {namespace}-b; Redis {redis_url}" in result.stdout
    flagged = run_check("--redis-namespace", f"{namespace}-c", path)
    assert flagged.stdout.count(f"namespace {namespace}-c;") == 2


def test_import_errors_are_each_reported(tmp_path, redis_url, namespace):
    broken = module(tmp_path, "raise RuntimeError('no config for you')\n", "broken")
    good = module(tmp_path, GOOD)
    started = time.monotonic()
    result = run_check("--redis-url", redis_url, "--redis-namespace", namespace,
                       broken, "no_such_kickq_handlers", good)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    err = result.stderr
    assert f"problem: cannot import handler module '{broken}': RuntimeError: no config for you" in err
    assert "problem: cannot import handler module 'no_such_kickq_handlers': ModuleNotFoundError" in err
    assert "2 problem(s) found" in result.stderr
    assert "registration 1: resize, thumbnail" in result.stdout  # the good module is still checked


@pytest.mark.parametrize(("options", "message"), [
    ('{"jobs_per_worker": 0}', "jobs_per_worker must be an int from 1 to 1000, got 0"),
    ('{"concurrent_jobs": 2, "workers": 3}', "unknown process option 'workers'"),
])
def test_bad_process_option(tmp_path, redis_url, namespace, options, message):
    path = module(tmp_path, f"kickq.Kickq().process('x', {options}, lambda job: None)\n")
    result = run_check("--redis-url", redis_url, "--redis-namespace", namespace, path)
    assert result.returncode == 1
    assert message in result.stderr


def test_bad_settings_and_flags_are_each_reported(tmp_path, redis_url, namespace):
    path = module(tmp_path, """
    kickq.config(wait_replicas=1, wait_replicas_timeout=3, redis_timeout=2)
    kickq.Kickq().process("x", lambda job: None)
    """)
    result = run_check("--redis-url", redis_url, "--redis-namespace", namespace, "--kill-grace", "-1",
                       "--reaper-interval", "0", path)
    assert result.returncode == 1
    assert "wait_replicas_timeout (3s) must be below redis_timeout (2s)" in result.stderr
    assert "--kill-grace must be a number of seconds" in result.stderr
    assert "--reaper-interval must be a number of seconds above 0" in result.stderr
    assert "3 problem(s) found" in result.stderr


def test_unreachable_redis_is_named_within_seconds(tmp_path, namespace):
    where = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    result = run_check("--redis-url", where, "--redis-namespace", namespace, module(tmp_path, GOOD))
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert f"problem: Redis at {where} is unreachable" in result.stderr


@pytest.mark.single_server("ACL users of the session's server")
def test_wrong_password_is_reported_without_the_password(tmp_path, redis_server, namespace, admin):
    url = acl_user(admin, redis_server, ["~*", "&*", "+@all"])
    wrong = url.replace("@", "x-wrong-9f1@")
    wrong_password = wrong.partition("://")[2].rpartition("@")[0].partition(":")[2]
    path = module(tmp_path, GOOD)
    result = run_check("--redis-url", wrong, "--redis-namespace", namespace, path)
    assert result.returncode == 1
    where = f"redis://{redis_server.host}:{redis_server.port}/0"
    assert f"Redis at {where} refused the credentials" in result.stderr
    assert wrong_password not in result.stdout + result.stderr
    good = run_check("--redis-url", url, "--redis-namespace", namespace, path)
    assert good.returncode == 0, good.stderr
    assert url.partition("://")[2].rpartition("@")[0].partition(":")[2] not in good.stdout + good.stderr


@pytest.mark.single_server("ACL users of the session's server")
def test_acl_dryrun_finds_a_denied_command(tmp_path, redis_server, namespace, admin):
    url = acl_user(admin, redis_server, ["~*", "&*", "+@all", "-hset", "-role"])
    result = run_check("--redis-url", url, "--redis-namespace", namespace, "--wait-replicas", "0",
                       module(tmp_path, GOOD))
    assert result.returncode == 1
    assert f"namespace {namespace}: user chk-" in result.stderr
    assert f"may not run HSET on {{{namespace}}}:check" in result.stderr
    assert "1 problem(s) found" in result.stderr


@pytest.mark.single_server("ACL users and whole-server counters of the session's server")
def test_least_privilege_user_is_probed_and_nothing_is_written(tmp_path, redis_server, namespace, admin):
    pattern = "{" + namespace + "}:*"
    url = acl_user(admin, redis_server, [f"~{pattern}", f"&{pattern}", "+@all", "-@dangerous"])
    path = module(tmp_path, GOOD)
    before = footprint(admin)
    result = run_check("--redis-url", url, "--redis-namespace", namespace, path)
    assert footprint(admin) == before
    assert result.returncode == 0, result.stderr
    assert "cannot check ACL on this server: ACL DRYRUN refused" in result.stdout
    assert "probed EVALSHA" in result.stdout
    # Another tenant's namespace: its keys are refused, and the probe says so.
    other = run_check("--redis-url", url, "--redis-namespace", f"{namespace}x", path)
    assert other.returncode == 1
    assert f"may not run EVALSHA on {{{namespace}x}}:check" in other.stderr
    assert footprint(admin) == before
