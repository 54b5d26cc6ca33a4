"""The supervisor's vitals log line and its Prometheus endpoint, from a real `kickq-supervisor`
subprocess scraped over HTTP; and the vitals arithmetic on its own."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from kickq.keys import Keys
from tests.helpers import free_port, start_redis, stop_redis, wait_until

REPO = Path(__file__).resolve().parents[1]

HANDLERS = textwrap.dedent("""
    import time
    import kickq

    kickq.config(vitals_interval={vitals})
    kq = kickq.Kickq()

    def ok(job, data):
        return data

    def bad(job, data):
        raise RuntimeError("no luck")

    def slow(job, data):
        time.sleep(60)

    kq.process("ok", ok)
    kq.process("bad", bad)
    kq.process("slow", slow)
""")
WORKERS = 3
needs_prometheus = pytest.mark.skipif(importlib.util.find_spec("prometheus_client") is None,
                                      reason="the extra kickq[metrics] (prometheus-client) is not installed")


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Supervisor:
    def __init__(self, tmp_path, redis_url, namespace, *flags, vitals=300, metrics=True):
        handlers = tmp_path / "metrics_handlers.py"
        handlers.write_text(HANDLERS.format(vitals=vitals))
        self.port = free_port()
        self.log_path = tmp_path / f"supervisor-{self.port}.log"
        command = [sys.executable, "-m", "kickq_supervisor", "--redis-url", redis_url,
                   "--redis-namespace", namespace, "--kill-grace", "0.1", *flags]
        if metrics:
            command += ["--metrics-port", str(self.port)]
        self.metrics = metrics
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*command, str(handlers)], cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self):
        try:
            return [p for p in psutil.Process(self.proc.pid).children() if alive(p)]
        except psutil.NoSuchProcess:
            return []

    def titled(self, word):
        out = []
        for child in self.children():
            try:
                if word in " ".join(child.cmdline()):
                    out.append(child)
            except psutil.Error:
                continue
        return out

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log()}")
            workers = len(self.titled("worker")) == WORKERS
            return workers and (not self.metrics or self.scrape_text(quiet=True))
        wait_until(ready, timeout=30, interval=0.05, message="workers and the metrics endpoint")

    def scrape_text(self, quiet=False):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as reply:
                return reply.read().decode()
        except OSError:
            if quiet:
                return None
            raise

    def scrape(self):
        """{(metric sample name, frozenset of labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families
        out = {}
        for family in text_string_to_metric_families(self.scrape_text()):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def stop(self):
        kids = []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)

        def gone():
            for kid in kids:  # reap them if they were re-parented to us (a subreaper)
                try:
                    os.waitpid(kid.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            return not any(alive(kid) for kid in kids)
        wait_until(gone, timeout=10, message="workers and reaper die with the master")


@pytest.fixture
def supervisor(tmp_path, redis_url, namespace):
    """start(*flags, vitals=, url=, metrics=) -> a running Supervisor; all are killed at teardown."""
    started = []

    def start(*flags, vitals=300, url=None, metrics=True):
        sup = Supervisor(tmp_path, url or redis_url, namespace, *flags, vitals=vitals, metrics=metrics)
        started.append(sup)
        return sup
    yield start
    for sup in started:
        sup.stop()
        print(f"--- supervisor {sup.proc.pid} log ---\n{sup.log()[-5000:]}")  # shown if the test failed


def value(samples, metric, **labels):
    return samples.get((metric, frozenset(labels.items())))


# --- Prometheus -------------------------------------------------------------------------------------

@needs_prometheus
def test_metrics_over_http(supervisor, kq, namespace):
    sup = supervisor()
    sup.wait_ready()
    for _ in range(2):
        kq.create("ok", {"n": 1})
    kq.create("bad")
    slow = kq.create("slow", opts={"process_timeout": 0.3})

    def counted():
        s = sup.scrape()
        return (value(s, "kickq_runs_total", namespace=namespace, name="ok", outcome="success") == 2
                and value(s, "kickq_runs_total", namespace=namespace, name="bad", outcome="fail") == 1
                and value(s, "kickq_runs_total", namespace=namespace, name="slow", outcome="ghost") == 1
                and value(s, "kickq_jobs", namespace=namespace, name="slow", state="ghost") == 1
                and s)
    s = wait_until(counted, timeout=20, interval=0.1, message="runs counted")
    assert kq.get(slow.id).state == "ghost"
    assert value(s, "kickq_ghosts_total", namespace=namespace, name="slow", reason="timeout") == 1
    assert value(s, "kickq_worker_restarts_total", reason="timeout") == 1
    assert value(s, "kickq_processing_seconds_count", namespace=namespace, name="ok") == 2
    assert value(s, "kickq_processing_seconds_bucket", namespace=namespace, name="ok", le="+Inf") == 2
    assert 0 < value(s, "kickq_processing_seconds_sum", namespace=namespace, name="ok") < 5
    assert value(s, "kickq_jobs", namespace=namespace, name="ok", state="success") == 2
    assert value(s, "kickq_jobs", namespace=namespace, name="bad", state="fail") == 1
    assert value(s, "kickq_jobs", namespace=namespace, name="ok", state="new") == 0
    assert value(s, "kickq_redis_up", namespace=namespace) == 1
    for kind in ("promote", "recover", "purge"):
        assert value(s, "kickq_reaper_lag_seconds", namespace=namespace, kind=kind) == 0
    assert value(s, "kickq_reaper_restarts_total") == 0

    # A worker killed between jobs is replaced: a crash.
    idle = next(w for w in sup.titled("worker") if "[idle]" in " ".join(w.cmdline()))
    idle.kill()
    wait_until(lambda: value(sup.scrape(), "kickq_worker_restarts_total", reason="crash") == 1, timeout=10)
    wait_until(lambda: len(sup.titled("worker")) == WORKERS, timeout=10)
    s = sup.scrape()
    assert value(s, "kickq_workers", state="idle") + value(s, "kickq_workers", state="busy") == WORKERS
    # one job each (jobs_per_worker 1): as many job slots as workers
    assert value(s, "kickq_job_slots", state="free") + value(s, "kickq_job_slots", state="busy") == WORKERS

    # The reaper killed: started again, and counted.
    sup.titled("reaper")[0].kill()
    wait_until(lambda: value(sup.scrape(), "kickq_reaper_restarts_total") == 1, timeout=10)


@needs_prometheus
def test_metrics_listen_on_loopback_only(supervisor):
    sup = supervisor()
    sup.wait_ready()
    def listening(proc):
        connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
        return [c for c in connections(kind="tcp") if c.status == psutil.CONN_LISTEN]

    assert [(c.laddr.ip, c.laddr.port) for c in listening(psutil.Process(sup.proc.pid))] == [
        ("127.0.0.1", sup.port)]
    # Forked workers and the reaper do not hold the listening socket.
    for child in sup.children():
        assert listening(child) == []


@needs_prometheus
def test_reaper_lag_grows_when_no_reaper_runs(supervisor, kq, r, namespace):
    keys = Keys(namespace)
    sup = supervisor("--no-reaper")
    job = kq.create("ok", opts={"delay": 0})
    seconds, _ = r.time()
    r.zadd(keys.delayed, {job.id: (seconds - 120) * 1000})  # due two minutes ago
    sup.wait_ready()
    lag = value(sup.scrape(), "kickq_reaper_lag_seconds", namespace=namespace, kind="promote")
    assert 119 <= lag < 180


@needs_prometheus
def test_metrics_answer_while_redis_hangs_or_is_gone(supervisor, tmp_path, namespace):
    proc, port = start_redis(tmp_path / "redis")
    try:
        sup = supervisor(url=f"redis://127.0.0.1:{port}/0")
        sup.wait_ready()
        assert value(sup.scrape(), "kickq_redis_up", namespace=namespace) == 1
        os.kill(proc.pid, signal.SIGSTOP)  # Redis hangs: reads time out after a second
        try:
            started = time.monotonic()
            s = sup.scrape()
            assert time.monotonic() - started < 4
            assert value(s, "kickq_redis_up", namespace=namespace) == 0
            assert value(s, "kickq_workers", state="idle") is not None
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        stop_redis(proc)
    started = time.monotonic()  # and gone
    assert value(sup.scrape(), "kickq_redis_up", namespace=namespace) == 0
    assert time.monotonic() - started < 4
    assert sup.proc.poll() is None


def test_metrics_port_without_prometheus_client_fails_clearly(tmp_path, redis_url, namespace):
    shim = tmp_path / "shim" / "prometheus_client"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    handlers = tmp_path / "h.py"
    handlers.write_text(HANDLERS.format(vitals=300))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--redis-url", redis_url,
                             "--redis-namespace", namespace, "--metrics-port", str(free_port()),
                             str(handlers)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "--metrics-port needs prometheus-client: pip install 'kickq[metrics]'" in result.stderr
    assert "Traceback" not in result.stderr


@needs_prometheus
def test_metrics_port_in_use_fails_clearly(tmp_path, redis_url, namespace):
    handlers = tmp_path / "h.py"
    handlers.write_text(HANDLERS.format(vitals=300))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--redis-url", redis_url,
                                 "--redis-namespace", namespace, "--metrics-port", str(port), str(handlers)],
                                cwd=REPO, capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_metrics_port_is_a_usage_error(tmp_path, redis_url):
    result = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--metrics-port", "http", "x.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "not a TCP port" in result.stderr


# --- vitals -----------------------------------------------------------------------------------------

VITALS = re.compile(r"vitals \[(?P<ns>[^\]]+)\] last (?P<secs>[\d.]+)s (?P<who>total|'[^']*'): "
                    r"created=(?P<created>\d+) processed=(?P<processed>\d+) success=(?P<success>\d+) "
                    r"fail=(?P<fail>\d+) retry=(?P<retry>\d+) ghost=(?P<ghost>\d+) avg=(?P<avg>-|\d+ms)")


def vitals_sums(log, who):
    sums = dict.fromkeys(("lines", "created", "processed", "success", "fail", "retry", "ghost"), 0)
    for match in VITALS.finditer(log):
        if match["who"] == who:
            sums["lines"] += 1
            for key in ("created", "processed", "success", "fail", "retry", "ghost"):
                sums[key] += int(match[key])
    return sums


def test_vitals_lines_add_up_to_what_happened(supervisor, kq, namespace):
    sup = supervisor(vitals=0.2, metrics=False)
    wait_until(lambda: vitals_sums(sup.log(), "total")["lines"] >= 2, timeout=30,
               message="two vitals lines")
    for _ in range(3):
        kq.create("ok")
    kq.create("bad")
    wait_until(lambda: vitals_sums(sup.log(), "total")["processed"] >= 4, timeout=20)
    # One more interval, so that a line counting anything twice would show.
    lines_now = vitals_sums(sup.log(), "total")["lines"]
    wait_until(lambda: vitals_sums(sup.log(), "total")["lines"] >= lines_now + 2, timeout=20)
    log = sup.log()
    assert {k: v for k, v in vitals_sums(log, "total").items() if k != "lines"} == {
        "created": 4, "processed": 4, "success": 3, "fail": 1, "retry": 0, "ghost": 0}
    ok = vitals_sums(log, "'ok'")
    assert (ok["created"], ok["processed"], ok["success"]) == (3, 3, 3)
    assert vitals_sums(log, "'bad'")["fail"] == 1
    assert all(m["ns"] == namespace for m in VITALS.finditer(log))
    assert "avg=-" in log and re.search(r"'ok': .* avg=\d+ms", log)


def test_vitals_arithmetic_counts_each_run_once():
    from kickq_supervisor.vitals import Mark, add_up, buckets_between, lines
    mark = Mark(at_ms=1_000_005_000, bucket=1_000_000_000,
                seen={"created:a": 2, "processed:a": 1, "time:a": 40})
    buckets = buckets_between(mark.at_ms, 1_000_021_000)
    assert buckets == [1_000_000_000, 1_000_010_000, 1_000_020_000]
    hashes = [{"created:a": "5", "processed:a": "3", "time:a": "100", "max:a": "60", "success:a": "2"},
              {"created:b": "1", "fail:b": "1", "processed:b": "1", "time:b": "7"},
              {"created:a": "1"}]
    per_name, last = add_up(mark, buckets, hashes)
    assert per_name == {
        "a": {"created": 4, "processed": 2, "success": 2, "fail": 0, "retry": 0, "ghost": 0, "time": 60},
        "b": {"created": 1, "processed": 1, "success": 0, "fail": 1, "retry": 0, "ghost": 0, "time": 7}}
    assert last == {"created:a": 1}
    out = lines("ns", 16.0, per_name)
    assert out == [
        "vitals [ns] last 16.0s 'a': created=4 processed=2 success=2 fail=0 retry=0 ghost=0 avg=30ms",
        "vitals [ns] last 16.0s 'b': created=1 processed=1 success=0 fail=1 retry=0 ghost=0 avg=7ms",
        "vitals [ns] last 16.0s total: created=5 processed=3 success=2 fail=1 retry=0 ghost=0 avg=22ms",
    ]
    assert lines("ns", 1.0, {}) == [
        "vitals [ns] last 1.0s total: created=0 processed=0 success=0 fail=0 retry=0 ghost=0 avg=-"]
