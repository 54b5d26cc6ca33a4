"""The recipes in deploy/ (docs/operations.md): what this machine can prove of them. The systemd unit
passes `systemd-analyze verify` (with its paths pointed at this checkout); the container files parse
and agree with each other and with the supervisor's flags; every stop grace period outlasts the
example's longest process_timeout plus the kill grace."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "kickq-supervisor.service"
CONTAINER = DEPLOY / "container"
KILL_GRACE = 0.3  # kickq-supervisor's default --kill-grace


def longest_process_timeout() -> float:
    """The example app's longest process_timeout (its producer sets it per job)."""
    producer = (CONTAINER / "producer.py").read_text()
    found = [float(x) for x in re.findall(r'"process_timeout":\s*([\d.]+)', producer)]
    assert found, "the example producer sets a process_timeout"
    return max(found)


def supervisor_help() -> str:
    done = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--help"], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd; CI installs it)")
    binary = Path(sys.executable).with_name("kickq-supervisor")
    assert binary.exists(), f"{binary}: the venv's console script"
    text = UNIT.read_text().replace("/srv/app/.venv/bin/kickq-supervisor", str(binary))
    text = text.replace("WorkingDirectory=/srv/app", f"WorkingDirectory={tmp_path}")
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify only warns about a bad value (exit 0): no line about the unit may appear at all
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if UNIT.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_the_systemd_unit_stops_gracefully_and_checks_before_it_starts():
    s = unit_settings()
    assert s["KillMode"] == ["mixed"] and s["KillSignal"] == ["SIGTERM"]
    assert float(s["TimeoutStopSec"][0]) > longest_process_timeout() + KILL_GRACE
    pre, start = shlex.split(s["ExecStartPre"][0]), shlex.split(s["ExecStart"][0])
    assert "--check" in pre and pre[-1] == start[-1]  # the same module is checked, then run
    assert "--log-format" in start and start[start.index("--log-format") + 1] == "json"
    text = supervisor_help()
    for flag in flags(pre) + flags(start):
        assert flag in text, f"{flag} is not a kickq-supervisor flag"


def entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT (\[.*\])$", (CONTAINER / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile has an exec-form ENTRYPOINT"
    return list(yaml.safe_load(match.group(1)))


def test_the_container_recipes_agree_with_each_other_and_the_supervisor():
    dockerfile = (CONTAINER / "Dockerfile").read_text()
    args = entrypoint()
    assert args[0] == "kickq-supervisor"
    port = int(args[args.index("--health-port") + 1])
    assert args[args.index("--health-host") + 1] == "0.0.0.0"  # reachable from outside the container
    assert f"EXPOSE {port}" in dockerfile and f"http://127.0.0.1:{port}/healthz" in dockerfile
    assert "STOPSIGNAL SIGTERM" in dockerfile
    text = supervisor_help()
    for flag in flags(args):
        assert flag in text, f"{flag} is not a kickq-supervisor flag"

    compose = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    supervisor = compose["services"]["supervisor"]
    assert int(supervisor["stop_grace_period"].rstrip("s")) > longest_process_timeout() + KILL_GRACE
    assert supervisor["ports"] == [f"{port}:{port}"]
    assert "--appendonly" in compose["services"]["redis"]["command"]

    deployment = yaml.safe_load((CONTAINER / "kubernetes.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > longest_process_timeout() + KILL_GRACE
    [container] = pod["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and named[get["port"]] == port


def test_the_example_handlers_register_what_the_recipes_run():
    done = subprocess.run([sys.executable, "-c", "import runpy, kickq.registry as r; "
                           "runpy.run_path('handlers.py'); print([x.names for x in r.registrations()])"],
                          capture_output=True, text=True, timeout=30, cwd=CONTAINER)
    assert done.returncode == 0 and "('report',)" in done.stdout, done.stderr
    assert entrypoint()[-1] != "handlers"  # the module comes from CMD, so it can be changed at run time
    assert 'CMD ["handlers"]' in (CONTAINER / "Dockerfile").read_text()


def test_the_recipes_check_passes_on_the_example_app(redis_url):
    """What ExecStartPre runs, on the example app, against a real Redis: exit 0, the plan printed."""
    done = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--check", "--redis-url", redis_url,
                           "handlers"], capture_output=True, text=True, timeout=60, cwd=CONTAINER,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{CONTAINER}"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "report" in done.stdout and done.stdout.rstrip().endswith("kickq-supervisor --check: OK")
