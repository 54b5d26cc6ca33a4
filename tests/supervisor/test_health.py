"""`kickq-supervisor --health-port`: /healthz and /readyz of a real supervisor in each state."""
from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kickq_supervisor.arbiter import ReaperProc, Slot
from kickq_supervisor.health import LOOP_MAX_AGE, Health
from tests.helpers import free_port, ping, redis_server_binary, side_key, start_redis, stop_redis, wait_until
from tests.supervisor import handlers_health
from tests.supervisor.conftest import StartSupervisor

HANDLERS = Path(handlers_health.__file__).resolve()
pytestmark = pytest.mark.timeout(60)


def get(port: int, path: str) -> tuple[int, Any] | None:
    """(status, body: JSON where it is JSON), or None while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            status, data = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


def wait_answer(port: int, path: str, status: int, contains: str = "", timeout: float = 10.0) -> Any:
    """Poll until `path` answers `status` with `contains` in its body; return the body."""
    seen: list[Any] = []

    def check() -> Any:
        answer = get(port, path)
        if answer and (not seen or seen[-1] != answer):
            seen.append(answer)
        if answer and answer[0] == status and contains in json.dumps(answer[1]):
            return answer[1]
        return None
    try:
        return wait_until(check, timeout=timeout, interval=0.02)
    except AssertionError:
        raise AssertionError(f"{path} never answered {status} with {contains!r}; seen {seen[-5:]}") from None


def test_healthy_then_redis_down_then_back(start_supervisor: StartSupervisor, tmp_path: Path) -> None:
    proc, redis_port = start_redis(tmp_path / "redis")
    try:
        port = free_port()
        url = f"redis://127.0.0.1:{redis_port}/0"
        start_supervisor(HANDLERS, url=url, args=["--health-port", str(port)],
                         workers=handlers_health.WORKERS)
        body = wait_answer(port, "/healthz", 200)
        assert body["status"] == "ok"
        assert (body["workers"], body["pool"], body["slots"]) == (1, 1, 1)
        assert body["redis"][f"redis://127.0.0.1:{redis_port}/0"]["ok"] is True
        assert wait_answer(port, "/readyz", 200) == {"status": "ready"}
        assert get(port, "/nothing-here")[0] == 404  # type: ignore[index]

        stop_redis(proc)
        body = wait_answer(port, "/healthz", 503, "Redis at redis://127.0.0.1")
        assert body["status"] == "fail"
        assert any("unreachable" in reason for reason in body["reasons"]), body
        assert get(port, "/readyz") == (200, {"status": "ready"})  # readiness is the supervisor's own

        # The same server again, on the same port.
        binary = redis_server_binary()
        assert binary is not None
        proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path / "redis")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_until(lambda: ping("127.0.0.1", redis_port), timeout=10, message="redis-server back")
        assert wait_answer(port, "/healthz", 200)["status"] == "ok"
    finally:
        stop_redis(proc)


def test_stopping_with_a_job_running(start_supervisor: StartSupervisor, kq: Any, redis_url: str,
                                     namespace: str) -> None:
    """After TERM, while a job finishes: both 503 "stopping". Bound to 0.0.0.0, reached on 127.0.0.1."""
    port = free_port()
    sup = start_supervisor(HANDLERS, args=["--health-port", str(port), "--health-host", "0.0.0.0"],
                           workers=handlers_health.WORKERS)
    assert wait_answer(port, "/healthz", 200)["status"] == "ok"
    wait_answer(port, "/readyz", 200)
    release = side_key(namespace, "release")  # in the namespace's slot: a Cluster too
    job = kq.create("health.wait", {"redis": redis_url, "release": release, "seconds": 30},
                    {"process_timeout": 60})
    sup.wait_running(job.id)
    sup.send(signal.SIGTERM)
    assert wait_answer(port, "/readyz", 503) == {"status": "stopping"}
    assert "stopping" in wait_answer(port, "/healthz", 503)["reasons"]
    kq.redis.set(release, 1)
    assert sup.wait_exit(timeout=10) == 0
    assert kq.get(job.id).state == "success"
    assert get(port, "/healthz") is None  # the server stopped with the supervisor


def test_starting_until_the_first_pool_is_up(start_supervisor: StartSupervisor) -> None:
    port = free_port()
    start_supervisor(HANDLERS, args=["--health-port", str(port)], wait=False)
    seen: list[tuple[int, Any]] = []

    def ready() -> bool:
        answer = get(port, "/readyz")
        if answer is not None and (not seen or seen[-1] != answer):
            seen.append(answer)
        return answer is not None and answer[0] == 200
    wait_until(ready, timeout=20, interval=0.01, message="/readyz 200")
    assert seen == [(503, {"status": "starting"}), (200, {"status": "ready"})]


def test_crash_looping_workers(start_supervisor: StartSupervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KICKQ_TEST_DIE_AT_FORK", "1")  # every forked child exits at once
    port = free_port()
    start_supervisor(HANDLERS, args=["--health-port", str(port)], wait=False)
    body = wait_answer(port, "/healthz", 503, "worker 1 (")
    assert any(r.startswith("worker 1 (") and r.endswith("early deaths) crash-looping")
               for r in body["reasons"]), body
    assert get(port, "/readyz") == (503, {"status": "starting"})


def test_one_port_for_metrics_and_health(start_supervisor: StartSupervisor) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    start_supervisor(HANDLERS, args=["--metrics-port", str(port), "--health-port", str(port),
                                     "--metrics-host", "0.0.0.0", "--health-host", "0.0.0.0"],
                     workers=handlers_health.WORKERS)
    assert wait_answer(port, "/healthz", 200)["status"] == "ok"
    status, text = get(port, "/metrics")  # type: ignore[misc]
    assert status == 200 and "kickq_workers" in text


def test_one_port_with_two_hosts_is_refused(start_supervisor: StartSupervisor) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    sup = start_supervisor(HANDLERS, args=["--metrics-port", str(port), "--health-port", str(port),
                                           "--health-host", "0.0.0.0"], wait=False)
    assert sup.wait_exit(timeout=20) == 1
    assert "--health-host 0.0.0.0 differs" in sup.log()


# --- the snapshot's rules, with a fake clock (no Redis configured, so only the pool counts) ----------

class FakeArbiter:
    def __init__(self, clock: list[float], workers: int = 2) -> None:
        self.ops = type("Ops", (), {"monotonic": staticmethod(lambda: clock[0])})()
        self.slots = [Slot(number=i + 1, spec=0, pid=100 + i, spawned_at=0.0) for i in range(workers)]
        self.reapers = [ReaperProc(spawn=lambda: 0, pid=99)]
        self.stopping = False


def test_snapshot_rules() -> None:
    clock = [0.0]
    health = Health([], clock=lambda: clock[0])
    assert health.healthz() == (503, {"status": "fail", "reasons": ["starting"], "redis": {}})
    arbiter: Any = FakeArbiter(clock)
    health.update(arbiter)
    assert health.healthz()[0] == 200
    assert health.readyz() == (503, {"status": "starting"})  # the pool is younger than the crash window
    clock[0] = 1.5
    health.update(arbiter)
    assert health.readyz() == (200, {"status": "ready"})

    # A worker being replaced within its backoff is fine; one left down past it is not.
    slot = arbiter.slots[1]
    slot.pid, slot.failures, slot.respawn_at = None, 1, 1.6
    clock[0] = 1.8
    health.update(arbiter)
    assert health.healthz() == (200, {"status": "ok", "workers": 1, "pool": 2, "slots": 1, "redis": {}})
    clock[0] = 3.0
    health.update(arbiter)
    assert health.healthz()[1]["reasons"] == ["worker 2 not running"]

    # Three early deaths in a row: crash-looping, even while it is briefly alive again.
    slot.pid, slot.failures, slot.spawned_at = 200, 3, 3.0
    clock[0] = 3.5
    health.update(arbiter)
    assert health.healthz()[1]["reasons"] == ["worker 2 (3 early deaths) crash-looping"]
    clock[0] = 4.5  # it outlived the crash window
    health.update(arbiter)
    assert health.healthz()[0] == 200

    # The master loop stopped ticking.
    clock[0] = 4.5 + LOOP_MAX_AGE + 1
    code, body = health.healthz()
    assert code == 503 and body["reasons"][0].startswith("master loop stalled")
