"""`make soak`: a long mixed load on a Redis Sentinel setup, through worker kills and failovers.

    python -m tests.faults.soak [--minutes M] [--wait-replicas N]   (make soak: SOAK_MINUTES, default 20)

Not part of any test run or CI. What runs, for M minutes (fractions allowed; the rates keep a 2-core
machine busy but not saturated):

- tests/sentinel_topology.py's setup: 1 master, 2 replicas, 3 sentinels on loopback ports;
- one kickq-supervisor (`--wait-replicas 1`, the setup's redis+sentinel:// URL) with 4 workers:
  3 for `hot` and `work`, 1 for `flaky` (tests/faults/handlers.py: each execution first appends a
  line to a ledger file outside Redis);
- in this process, one thread per load, each with its own Kickq(wait_replicas=1) (`--wait-replicas N`
  changes it for the producers and the supervisor alike):
      w  work    plain creates, 1-15 ms of work each                         100/s
      d  work    delayed 0.5-3 s                                              20/s
      f  flaky   fail their first attempt, succeed on the retry 1 s later     15/s
      h  hot     hotjobs (hotjob_timeout 5 s), each awaited before the next   10/s
- a SIGKILL of a random worker every 5 s (the supervisor replaces it; its job is a ghost, re-run);
- a failover every 2 minutes (every fifth of the run when that is shorter; none in the last 20 s),
  alternately a SIGKILL of the master followed by a restart of that node (Sentinel makes it a
  replica) and a planned SENTINEL FAILOVER;
- harness.Monitor's invariant snapshots every 5 s (in a process of its own, see RSS below), through a
  client of the master the sentinels name.

Every create carries a unique `ref` (stream letter + sequence number). A create that returned is
acknowledged; one that raised (ReplicationTimeout, RedisUnavailable) is indeterminate: it may or may
not exist, and it is counted, not checked. The outcomes are harness.Outcomes' (lost, duplicated,
unexpected, phantom, stranded), counted as the run goes so that this process's memory stays flat
however long it runs: jobs are purged 60 s after they end (purge_timeout), and a verifier reads each
acknowledged job once it is 10 s old, again every 5 s until it is terminal, and then forgets it but
for two bytes (its status and its execution count from the ledger). A job is looked up by its id and
recognised by its ref: a failover that loses writes makes the new master hand the lost ids out again.
A job absent (or its id holding another job) at two passes 3 s apart is lost, unless it may have been
purged (last seen not terminal more than purge_timeout - 10 s before): then it is unverifiable, a
missed target too. ROLE is checked before each pass (a connection to a demoted master is dropped).
After the load, every job still pending gets SETTLE_SECONDS to end; one still not terminal then is
stranded. The report groups the lost and the indeterminate creates by send time, to set them against
the failovers.

RSS is sampled at the start (load not started), after a warm-up (half the run, at most 2 minutes: the
job population reaches its steady size, connection pools and caches fill) and at the end of the load.
A long-lived kickq process (the supervisor master, its reaper, this process with its producers and
its verifier) must not grow by more than 5 MB from the warm-up sample to the end. The invariant
monitor runs in a process of its own: its snapshots parse the whole namespace every 5 s, and in this
process they left freed pages resident that made its RSS wander by several MB (2026-12-08, 2-core dev
machine, `python -m tests.faults.soak --minutes 8`: +5.7 and +2.6 MB after the warm-up in two runs
with the monitor in this process, +0.4 MB in one with it apart). The monitor, the redis-servers and
the sentinels are shown as context (the servers hold the data; a killed master is a new process
after its restart). Exit status 0 when every target is met, 1 when one is missed (the report says
which), 2 when the run could not be carried out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import redis.sentinel

import kickq
from kickq import payload
from kickq.job import TERMINAL_STATES, queue_reads, read_fields
from kickq.keys import Keys
from tests.faults.harness import Checker, Monitor, Snapshot, handler_module
from tests.sentinel_topology import SentinelSetup, start_sentinel_setup
from tests.supervisor.conftest import REPO, Supervisor

NAMESPACE = "soak"
#: (stream letter, job name, creates per second, runs a job of the stream needs when nothing fails)
STREAMS = {
    "w": ("work", 100.0, 1),
    "d": ("work", 20.0, 1),
    "f": ("flaky", 15.0, 2),
    "h": ("hot", 10.0, 1),
}
WORKERS = {"hot_work": 3, "flaky": 1}
JOB_OPTS = {"process_timeout": 5, "ghost_interval": 0, "ghost_count": 5, "purge_timeout": 60}
FLAKY_OPTS = {"retry": True, "retry_count": 3, "retry_interval": 1}
HOTJOB_TIMEOUT = 5
WORKER_KILL_EVERY = 5.0
FAILOVER_EVERY = 120.0
FAILOVER_QUIET = 20.0
VERIFY_AFTER = 10.0
VERIFY_EVERY = 5.0
MONITOR_EVERY = 5.0
#: A job absent at two passes this far apart is lost (one absence may be a stale connection).
MISSING_CONFIRM = 3.0
PURGE_MARGIN = 10.0
SETTLE_SECONDS = 120.0
RSS_GROWTH_LIMIT = 5 * 1024 * 1024
PROGRESS_EVERY = 60.0
#: The `flaky` handler, written into the generated handler module next to handlers.work.
FLAKY_HANDLER = '''
def fail_once(job, data):
    """Fails the job's first attempt, succeeds on any later one: a job that needs its retry."""
    attempt = handlers.record(job, data)
    if attempt == 1:
        raise RuntimeError("the first attempt of a flaky job fails")
    return {"attempt": attempt}


kq.process(["flaky"], {"concurrent_jobs": %d}, fail_once)
'''

SENT, ACKED, INDETERMINATE, DONE = 1, 2, 3, 4


# --- the book: what was created, executed and verified -----------------------------------------------


@dataclass
class Pending:
    job_id: str
    sent_at: float
    seen_at: float  # when it was last seen not terminal (sent_at until then)
    missing_since: float | None = None


@dataclass
class Book:
    """Per stream, one status byte and one execution count (capped at 255) per ref; the acknowledged
    jobs not verified yet; the verified outcomes."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    status: dict[str, bytearray] = field(default_factory=lambda: {s: bytearray() for s in STREAMS})
    runs: dict[str, bytearray] = field(default_factory=lambda: {s: bytearray() for s in STREAMS})
    pending: dict[str, Pending] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    final: Counter[str] = field(default_factory=Counter)
    executions: int = 0
    lost: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stranded: list[str] = field(default_factory=list)
    hotjobs: Counter[str] = field(default_factory=Counter)
    ledger_offset: int = 0
    ledger_partial: bytes = b""
    started: float = 0.0  # when the load started (monotonic)
    # creates by the second of the load they were sent in (bounded by the run's length)
    lost_sent: Counter[int] = field(default_factory=Counter)
    indeterminate_sent: Counter[int] = field(default_factory=Counter)

    def send(self, stream: str) -> str:
        with self.lock:
            self.status[stream].append(SENT)
            self.runs[stream].append(0)
            return f"{stream}{len(self.status[stream]) - 1}"

    def ack(self, ref: str, job_id: str, sent_at: float) -> None:
        with self.lock:
            self.status[ref[0]][int(ref[1:])] = ACKED
            self.pending[ref] = Pending(job_id, sent_at, sent_at)

    def indeterminate(self, ref: str, exc: BaseException, sent_at: float) -> None:
        with self.lock:
            self.status[ref[0]][int(ref[1:])] = INDETERMINATE
            self.errors[type(exc).__name__] += 1
            self.indeterminate_sent[int(sent_at - self.started)] += 1

    def count(self, code: int) -> int:
        with self.lock:
            return sum(s.count(code) for s in self.status.values())

    def read_ledger(self, path: Path) -> None:
        """Count the executions appended to the ledger since the last read."""
        try:
            with open(path, "rb") as f:
                f.seek(self.ledger_offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.ledger_offset += len(data)
        *lines, self.ledger_partial = (self.ledger_partial + data).split(b"\n")
        with self.lock:
            for line in lines:
                ref = line.decode(errors="replace").rsplit(" ", 1)[-1]
                self.executions += 1
                stream, number = ref[:1], ref[1:]
                if stream in self.runs and number.isdigit() and int(number) < len(self.runs[stream]):
                    runs = self.runs[stream]
                    runs[int(number)] = min(255, runs[int(number)] + 1)
                else:
                    self.unexpected.append(ref)

    def runs_of(self, ref: str) -> int:
        return self.runs[ref[0]][int(ref[1:])]

    def verify(self, client: redis.Redis, ledger: Path, settling: bool = False) -> bool:
        """One pass over the acknowledged jobs due (all of them when `settling`): terminal ones are
        done, absent ones lost once confirmed. A job is found by its id *and* its ref: after a
        failover that lost writes, the new master hands out the lost ids again to other jobs.
        False when the pass could not read the master."""
        now = time.monotonic()
        with self.lock:
            due = [(ref, p) for ref, p in self.pending.items() if settling or now - p.sent_at >= VERIFY_AFTER]
        found: dict[str, tuple[str, str]] = {}  # job id -> (state, ref) of the job that has the id now
        if due:
            role = client.execute_command("ROLE")
            if str(role[0]) != "master":  # a connection to a demoted master: start afresh
                client.connection_pool.disconnect()
                return False
            ids = [p.job_id for _, p in due]
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                pipe = client.pipeline(transaction=False)
                queue_reads(pipe, Keys(NAMESPACE), chunk)
                for job_id, fields in zip(chunk, read_fields(pipe.execute()), strict=True):
                    if fields:
                        data = payload.decode(fields.get("data"))
                        ref = str(data.get("ref")) if isinstance(data, dict) else "-"
                        found[job_id] = (fields.get("state", ""), ref)
        # After the states: an execution of a job seen `success` is already in the ledger.
        self.read_ledger(ledger)
        with self.lock:
            for ref, p in due:
                state, holder = found.get(p.job_id, ("", ""))
                if holder != ref:  # absent, or its id holds another job
                    if p.missing_since is None:
                        p.missing_since = now
                    elif now - p.missing_since >= MISSING_CONFIRM:
                        purgeable = now - p.seen_at >= JOB_OPTS["purge_timeout"] - PURGE_MARGIN
                        why = f"id {p.job_id} " + (f"holds {holder}" if holder else "absent")
                        (self.unverifiable if purgeable else self.lost).append(f"{ref} ({why})")
                        if not purgeable:
                            self.lost_sent[int(p.sent_at - self.started)] += 1
                        del self.pending[ref]
                elif state in TERMINAL_STATES:
                    self.final[state] += 1
                    self.status[ref[0]][int(ref[1:])] = DONE
                    del self.pending[ref]
                    if state == "success" and not self.runs_of(ref):
                        self.phantom.append(f"{ref} (id {p.job_id}, acknowledged at "
                                            f"{p.sent_at - self.started:.1f}s)")
                else:
                    p.seen_at, p.missing_since = now, None
        return True

    def duplicates(self) -> tuple[int, int, int, int]:
        """(jobs run more than once, runs beyond the first, jobs run more often than their stream
        needs, runs beyond that)."""
        more, extra, beyond, beyond_runs = 0, 0, 0, 0
        with self.lock:
            for stream, runs in self.runs.items():
                needed = STREAMS[stream][2]
                for n in runs:
                    if n > 1:
                        more += 1
                        extra += n - 1
                    if n > needed:
                        beyond += 1
                        beyond_runs += n - needed
        return more, extra, beyond, beyond_runs

    def indeterminate_executed(self) -> int:
        with self.lock:
            return sum(
                1
                for stream, status in self.status.items()
                for i, s in enumerate(status)
                if s == INDETERMINATE and self.runs[stream][i]
            )


# --- load -------------------------------------------------------------------------------------------------


class Load(threading.Thread):
    """Creates one stream's jobs at its rate until stopped; a hotjob is awaited before the next."""

    def __init__(self, book: Book, stream: str, url: str, stopping: threading.Event, seed: int,
                 wait_replicas: int) -> None:
        super().__init__(name=f"load-{stream}", daemon=True)
        self.book, self.stream, self.stopping = book, stream, stopping
        self.job_name, self.rate, _ = STREAMS[stream]
        self.kq = kickq.Kickq(redis_url=url, redis_namespace=NAMESPACE, wait_replicas=wait_replicas)
        self.rng = random.Random(seed)
        self.untyped: Counter[str] = Counter()

    def opts(self) -> dict[str, Any]:
        opts: dict[str, Any] = dict(JOB_OPTS)
        if self.stream == "d":
            opts["delay"] = round(self.rng.uniform(0.5, 3.0), 3)
        elif self.stream == "f":
            opts.update(FLAKY_OPTS)
        elif self.stream == "h":
            opts.update(hotjob=True, hotjob_timeout=HOTJOB_TIMEOUT)
        return opts

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            ref = self.book.send(self.stream)
            sent_at = time.monotonic()
            try:
                job = self.kq.create(self.job_name, {"ref": ref, "ms": self.rng.randint(1, 15)}, self.opts())
            except kickq.KickqError as exc:
                self.book.indeterminate(ref, exc, sent_at)
            except Exception as exc:  # a kickq bug: every failure should be a KickqError
                self.book.indeterminate(ref, exc, sent_at)
                self.untyped[type(exc).__name__] += 1
            else:
                assert job is not None  # create() without a callback returns the job
                self.book.ack(ref, job.id, sent_at)
                if job.hotjob_promise is not None:
                    self.await_hotjob(job.hotjob_promise)
            next_at += 1 / self.rate
            if next_at > time.monotonic():
                self.stopping.wait(next_at - time.monotonic())  # the load's pace
            else:
                next_at = time.monotonic()

    def await_hotjob(self, promise: Future[kickq.Job]) -> None:
        try:
            done = promise.result()
            outcome = f"answered {done.state}"
        except kickq.HotjobTimeout:
            outcome = "timed out"
        except Exception as exc:
            outcome = f"raised {type(exc).__name__}"
        with self.book.lock:
            self.book.hotjobs[outcome] += 1

    def stop(self) -> None:
        self.join(timeout=30)
        self.kq.close()


class Verifier(threading.Thread):
    def __init__(self, book: Book, client: redis.Redis, ledger: Path) -> None:
        super().__init__(name="verifier", daemon=True)
        self.book, self.client, self.ledger = book, client, ledger
        self.stopping = threading.Event()
        self.passes = 0
        self.skipped: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stopping.wait(VERIFY_EVERY):  # the verifier's pace
            try:
                if self.book.verify(self.client, self.ledger):
                    self.passes += 1
                else:
                    self.skipped["not the master"] += 1
            except redis.RedisError as exc:  # the master is away (the fault): next pass
                self.skipped[type(exc).__name__] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


class WorkerKiller(threading.Thread):
    """SIGKILLs a random worker of the supervisor every WORKER_KILL_EVERY seconds."""

    def __init__(self, sup: Supervisor, seed: int) -> None:
        super().__init__(name="worker-killer", daemon=True)
        self.sup, self.rng = sup, random.Random(seed)
        self.stopping = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stopping.wait(WORKER_KILL_EVERY):  # the fault's pace
            workers = list(self.sup.workers().values())
            if not workers:
                continue
            victim = self.rng.choice(workers)
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


@dataclass
class Failover:
    kind: str  # "kill" or "planned"
    at: float  # seconds into the load
    promoted: float = 0.0
    settled: float = 0.0
    restarted: float | None = None  # kill: the old master back as a replica, seconds from the kill
    error: str = ""

    def line(self) -> str:
        if self.error:
            return f"{self.kind:7s} at {self.at:6.1f}s: FAILED {self.error}"
        text = f"{self.kind:7s} at {self.at:6.1f}s: promoted {self.promoted:.2f}s, "
        text += f"settled {self.settled:.2f}s"
        if self.restarted is not None:
            text += f", old master a replica again {self.restarted:.2f}s after the kill"
        return text


class Failovers(threading.Thread):
    """Every `every` seconds until `last` (monotonic), alternately: SIGKILL of the master then a
    restart of that node, and SENTINEL FAILOVER. A failover in progress finishes before the thread
    stops."""

    def __init__(self, setup: SentinelSetup, every: float, started: float, last: float) -> None:
        super().__init__(name="failovers", daemon=True)
        self.setup, self.every, self.started, self.last = setup, every, started, last
        self.stopping = threading.Event()
        self.done: list[Failover] = []

    def run(self) -> None:
        due = self.started + self.every
        while due < self.last and not self.stopping.wait(max(0.0, due - time.monotonic())):  # the pace
            kind = "kill" if len(self.done) % 2 == 0 else "planned"
            began = time.monotonic()
            record = Failover(kind, began - self.started)
            try:
                if kind == "kill":
                    old = self.setup.master()
                    self.setup.kill_master()
                    self.setup.restart(old)
                    record.restarted = time.monotonic() - began
                else:
                    self.setup.failover(probe_writes=False)
                times = self.setup.failovers[-1]
                record.promoted, record.settled = times.promoted_seconds, times.settled_seconds
            except Exception as exc:
                record.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.done.append(record)
            due = max(due + self.every, time.monotonic() + 10)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=180)


class PruningChecker(Checker):
    """harness.Checker whose history forgets the jobs gone from Redis (purged), so that its memory
    follows the job population, not the run's length; it keeps the first 50 violations and counts
    them all, apart: those of one snapshot (a job in the wrong structure, ...) and those across
    snapshots (a terminal state changed, an attempt went back)."""

    KEEP = 50

    def __init__(self) -> None:
        super().__init__()
        self.single = 0
        self.across = 0

    def observe(self, snap: Snapshot, label: str = "") -> list[str]:
        found = super().observe(snap, label)
        for violation in found:
            if "changed to" in violation or "attempt went back" in violation:
                self.across += 1
            else:
                self.single += 1
        del self.found[self.KEEP :]
        for history in (self.terminal, self.attempts):
            for job_id in [j for j in history if j not in snap.jobs]:
                del history[job_id]
        return found


# --- processes --------------------------------------------------------------------------------------------


def start_supervisor(module: Path, url: str, workdir: Path, workers: int, wait_replicas: int) -> Supervisor:
    """A kickq-supervisor subprocess as tests/supervisor/conftest.py's start_supervisor starts one
    (a new session, its output in a file), with `--wait-replicas`; returns once it is ready."""
    cmd = [
        sys.executable, "-m", "kickq_supervisor", "--kill-grace", "0.2", "--redis-url", url,
        "--redis-namespace", NAMESPACE, "--reaper-interval", "0.2", "--wait-replicas", str(wait_replicas),
        str(module),
    ]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    env.pop("KICKQ_EMBEDDED_REDIS", None)
    log_path = workdir / "supervisor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env, start_new_session=True)
    sup = Supervisor(proc, log_path, NAMESPACE, url)
    sup.wait_ready(workers, timeout=60)
    return sup


def master_client(url: str) -> redis.Redis:
    """A redis-py client of the master that the sentinels of a redis+sentinel://host:port,.../SERVICE
    URL name (it asks them again on reconnecting)."""
    hosts, service = url.split("://", 1)[1].split("/")[:2]
    addrs = [(host, int(port)) for host, port in (a.rsplit(":", 1) for a in hosts.split(","))]
    sentinel = redis.sentinel.Sentinel(addrs, socket_timeout=2, socket_connect_timeout=2)
    client: redis.Redis = sentinel.master_for(
        service, decode_responses=True, encoding_errors="replace", socket_timeout=5,
        socket_connect_timeout=2,
    )
    return client


def run_monitor(url: str, out: Path) -> int:
    """The invariant monitor, in a process of its own so that its snapshots (the whole namespace
    parsed every MONITOR_EVERY seconds) weigh on neither the producers' CPU nor their RSS: it runs
    until its stdin says stop or closes (the soak ended, or died), looks once more, and writes its
    counts to `out` as JSON."""
    client = master_client(url)
    host, port = client.connection_pool.get_master_address()  # type: ignore[attr-defined]
    monitor = Monitor(f"redis://{host}:{port}/0", NAMESPACE, interval=MONITOR_EVERY)
    # Its plain client would stay on this node; the sentinel one follows the master.
    monitor.client.close()
    monitor.client = client
    checker = monitor.checker = PruningChecker()
    with monitor:
        sys.stdin.readline()
    monitor.check_now("final: ")
    result = {"snapshots": checker.snapshots, "skipped": monitor.skipped, "single": checker.single,
              "across": checker.across, "found": checker.found}
    out.write_text(json.dumps(result))
    return 0


def start_monitor(url: str, workdir: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
    with open(workdir / "monitor.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.faults.soak", "--monitor", url, "--monitor-out",
             str(workdir / "monitor.json")],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, text=True,
        )


def stop_monitor(proc: subprocess.Popen[str], workdir: Path, run: "Run") -> None:
    """Tell the monitor to stop; its counts go into `run.monitor`."""
    try:
        assert proc.stdin is not None
        proc.stdin.write("stop\n")
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(timeout=10)
    log = (workdir / "monitor.log").read_text(errors="replace")[-2000:]
    try:
        result = json.loads((workdir / "monitor.json").read_text())
    except (OSError, ValueError):
        run.problems.append(f"the invariant monitor ended with status {code} and no counts: {log}")
        return
    run.monitor = (result["snapshots"], result["skipped"], result["single"], result["across"],
                   list(result["found"]))


@dataclass
class Tracked:
    label: str
    target: bool  # the RSS growth limit applies
    pids: dict[str, int | None] = field(default_factory=dict)  # sample -> pid
    rss: dict[str, int | None] = field(default_factory=dict)  # sample -> bytes

    def growth(self) -> int | None:
        pid = self.pids.get("baseline")
        if pid is None or self.pids.get("end") != pid:
            return None
        return (self.rss["end"] or 0) - (self.rss["baseline"] or 0)


def rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return None


class Processes:
    """The long-lived processes whose RSS the report shows, found afresh at each sample (a reaper or
    a redis-server may have been replaced)."""

    def __init__(self, sup: Supervisor, setup: SentinelSetup, monitor: int) -> None:
        self.sup, self.setup, self.monitor = sup, setup, monitor
        self.tracked: dict[str, Tracked] = {}

    def current(self) -> dict[str, tuple[bool, int | None]]:
        reapers = self.sup.reapers()
        out: dict[str, tuple[bool, int | None]] = {
            "supervisor master": (True, self.sup.pid),
            "supervisor reaper": (True, reapers[0].pid if reapers else None),
            "soak process (producers)": (True, os.getpid()),
        }
        out["invariant monitor (harness)"] = (False, self.monitor)
        for node in self.setup.data_nodes + self.setup.sentinels:
            running = node.running() and node.process is not None
            kind = "redis-server" if node.kind == "data" else "redis-sentinel"
            out[f"{kind} :{node.port}"] = (False, node.process.pid if running and node.process else None)
        return out

    def sample(self, name: str) -> None:
        for label, (target, pid) in self.current().items():
            tracked = self.tracked.setdefault(label, Tracked(label, target))
            tracked.pids[name] = pid
            tracked.rss[name] = rss(pid)

    def short(self) -> str:
        now = self.current()
        return " ".join(
            f"{short}={mb(rss(now[label][1]))}"
            for short, label in (("master", "supervisor master"), ("reaper", "supervisor reaper"),
                                 ("soak", "soak process (producers)"))
        )


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1048576:.1f}MB"


# --- the run ------------------------------------------------------------------------------------------------


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    return next((part[2:] for part in out.split() if part.startswith("v=")), out.strip())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def minutes_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"minutes must be a number, not {text!r}") from None
    if not 0 < value <= 24 * 60:
        raise argparse.ArgumentTypeError(f"minutes must be > 0 and <= 1440, not {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=minutes_arg, default=None,
                        help="minutes of load (default: SOAK_MINUTES, else 20; fractions allowed)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random choices (default 1)")
    parser.add_argument("--wait-replicas", type=int, choices=range(3), default=1, metavar="{0,1,2}",
                        help="wait_replicas of the producers and the supervisor (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory even on success")
    parser.add_argument("--monitor", metavar="URL", help=argparse.SUPPRESS)  # the monitor process
    parser.add_argument("--monitor-out", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes is None:
        try:
            args.minutes = minutes_arg(os.environ.get("SOAK_MINUTES", "20"))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"SOAK_MINUTES: {exc}")
    return args


@dataclass
class Run:
    """Everything the report needs."""

    args: argparse.Namespace
    started_at: str = ""
    load_seconds: float = 0.0
    load_started_at: str = ""  # wall clock, to match the times below with the servers' logs
    settle_seconds: float = 0.0
    warmup: float = 0.0
    book: Book = field(default_factory=Book)
    loads: list[Load] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    kills: int = 0
    verifier: Verifier | None = None
    monitor: tuple[int, int, int, int, list[str]] = (0, 0, 0, 0, [])
    processes: Processes | None = None
    supervisor_alive: bool = True
    reaper_same: bool = True
    problems: list[str] = field(default_factory=list)


def soak(args: argparse.Namespace, workdir: Path) -> Run:
    run = Run(args, started_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    book = run.book
    seconds = args.minutes * 60
    run.warmup = min(120.0, seconds / 2)
    failover_every = min(FAILOVER_EVERY, seconds / 5)
    ledger = workdir / "ledger.txt"
    print(f"soak: {args.minutes:g} min of load; work directory {workdir}", flush=True)
    setup = start_sentinel_setup(workdir / "sentinel")
    sup: Supervisor | None = None
    client: redis.Redis | None = None
    monitor: subprocess.Popen[str] | None = None
    try:
        module = handler_module(
            workdir, ledger, [(["hot", "work"], WORKERS["hot_work"])], name="soak_handlers"
        )
        with open(module, "a") as f:
            f.write(FLAKY_HANDLER % WORKERS["flaky"])
        sup = start_supervisor(module, setup.url, workdir, sum(WORKERS.values()), args.wait_replicas)
        reaper = sup.reapers()[0].pid
        client = master_client(setup.url)
        monitor = start_monitor(setup.url, workdir)
        processes = run.processes = Processes(sup, setup, monitor.pid)
        processes.sample("start")
        stopping = threading.Event()
        run.loads = [
            Load(book, stream, setup.url, stopping, args.seed + i, args.wait_replicas)
            for i, stream in enumerate(STREAMS)
        ]
        verifier = run.verifier = Verifier(book, client, ledger)
        killer = WorkerKiller(sup, args.seed)
        started = book.started = time.monotonic()
        run.load_started_at = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        # None starts in the last FAILOVER_QUIET seconds: its effects happen under load.
        failovers = Failovers(setup, failover_every, started, started + seconds - FAILOVER_QUIET)
        threads: list[Any] = [*run.loads, verifier, killer, failovers]
        for thread in threads:
            thread.start()
        end = started + seconds
        baseline_at = started + run.warmup
        next_progress = started + PROGRESS_EVERY
        sampled_baseline = False
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if not sampled_baseline and now >= baseline_at:
                processes.sample("baseline")
                sampled_baseline = True
            if now >= next_progress:
                progress(now - started, book, killer, failovers, processes)
                next_progress += PROGRESS_EVERY
            wake = min(end, next_progress, baseline_at if not sampled_baseline else end)
            time.sleep(max(0.0, wake - time.monotonic()))  # the run's pace
        processes.sample("end")
        run.load_seconds = time.monotonic() - started
        stopping.set()
        for load in run.loads:
            load.stop()
        killer.stop()
        failovers.stop()
        verifier.stop()
        run.kills = killer.kills
        run.failovers = failovers.done
        if failovers.is_alive():
            run.problems.append("a failover was still in progress 180 s after the load stopped")
        settle_from = time.monotonic()
        settle(book, client, ledger, run)
        run.settle_seconds = time.monotonic() - settle_from
        stop_monitor(monitor, workdir, run)
        run.supervisor_alive = sup.proc.poll() is None
        reapers = sup.reapers()
        run.reaper_same = bool(reapers) and reapers[0].pid == reaper
        return run
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait(timeout=10)
        if sup is not None:
            left = sup.destroy()
            if left:
                run.problems.append(f"supervisor processes left behind: {left}")
        if client is not None:
            client.close()
        setup.stop(keep_files=True)


def settle(book: Book, client: redis.Redis, ledger: Path, run: Run) -> None:
    """After the load: verify every pending job until none is left or SETTLE_SECONDS pass; the ones
    still not terminal then are stranded."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            book.verify(client, ledger, settling=True)
        except redis.RedisError as exc:
            run.problems.append(f"settle: {type(exc).__name__}: {exc}")
        with book.lock:
            left = len(book.pending)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)  # between verification passes: the poll's pace
    book.read_ledger(ledger)
    with book.lock:
        book.stranded = sorted(book.pending)


def progress(
    elapsed: float, book: Book, killer: WorkerKiller, failovers: Failovers, processes: Processes
) -> None:
    with book.lock:
        sent = sum(len(s) for s in book.status.values())
        done, executions, pending = sum(book.final.values()), book.executions, len(book.pending)
    kinds = Counter(f.kind for f in failovers.done)
    print(
        f"[{elapsed / 60:5.1f} min] created {sent} (indeterminate {book.count(INDETERMINATE)}), "
        f"verified done {done}, pending {pending}, executions {executions}; failovers {len(failovers.done)} "
        f"(kill {kinds['kill']}, planned {kinds['planned']}); worker kills {killer.kills}; "
        f"rss {processes.short()}",
        flush=True,
    )


# --- the report ------------------------------------------------------------------------------------------


def clusters(by_second: Counter[int], gap: int = 5) -> str:
    """Counts by second of the load, as ranges of seconds less than `gap` apart:
    "48-50s (269), 97s (139)" (a range's end is the start of its last second)."""
    groups: list[list[int]] = []  # [first second, last second, count]
    for second in sorted(by_second):
        if groups and second - groups[-1][1] < gap:
            groups[-1][1] = second
            groups[-1][2] += by_second[second]
        else:
            groups.append([second, second, by_second[second]])
    spans = [(str(first) if first == last else f"{first}-{last}", count) for first, last, count in groups]
    return ", ".join(f"{span}s ({count})" for span, count in spans)


def report(run: Run) -> list[str]:
    """Prints the report block; returns the missed targets."""
    book = run.book
    more, extra, beyond, beyond_runs = book.duplicates()
    sent = sum(len(s) for s in book.status.values())
    acked = book.count(ACKED) + book.count(DONE)
    indeterminate = book.count(INDETERMINATE)
    snapshots, skipped, single, across, found = run.monitor
    untyped = sum((load.untyped for load in run.loads), Counter())
    rates = ", ".join(f"{s} {STREAMS[s][0]} {STREAMS[s][1]:g}/s" for s in STREAMS)
    lines = [
        "=" * 30 + " kickq soak report " + "=" * 30,
        f"date        {run.started_at}",
        f"machine     {platform.machine()}, nproc {len(os.sched_getaffinity(0))}, {cpu_model()}",
        f"software    Redis {redis_version()}, redis-py {redis.__version__}, "
        f"Python {platform.python_version()}",
        f"command     python -m tests.faults.soak --minutes {run.args.minutes:g} --seed {run.args.seed} "
        f"--wait-replicas {run.args.wait_replicas}",
        f"duration    load {run.load_seconds / 60:.2f} min from {run.load_started_at} (local time; the "
        f"times below count from there), then settled in {run.settle_seconds:.1f}s; "
        f"RSS baseline after {run.warmup:.0f}s",
        f"load        {rates}; 4 workers; wait_replicas={run.args.wait_replicas} (producers and supervisor)",
        f"creates     sent {sent} ({sent / max(run.load_seconds, 1e-9):.0f}/s), acknowledged {acked}, "
        f"indeterminate {indeterminate} (executed {book.indeterminate_executed()}) {dict(book.errors)}"
        + (f"; untyped errors {dict(untyped)}" if untyped else ""),
        *([f"    indeterminate creates by send time: {clusters(book.indeterminate_sent)}"]
          if book.indeterminate_sent else []),
        f"executions  {book.executions} (ledger lines); final states of acknowledged jobs {dict(book.final)}",
        f"hotjobs     {dict(book.hotjobs)}",
        f"worker kills {run.kills} (one every {WORKER_KILL_EVERY:g}s)",
        f"failovers   {len(run.failovers)}",
        *(f"    {f.line()}" for f in run.failovers),
        f"verifier    {run.verifier.passes if run.verifier else 0} passes, skipped "
        f"{dict(run.verifier.skipped) if run.verifier else {}}",
        f"invariants  {snapshots} snapshots ({skipped} skipped while Redis was away): {single} violations "
        f"within a snapshot, {across} across snapshots",
        *(f"    {v}" for v in found[:10]),
        f"outcomes    lost {len(book.lost)}, stranded {len(book.stranded)}, unverifiable "
        f"{len(book.unverifiable)}, unexpected {len(book.unexpected)}, phantom {len(book.phantom)}",
        f"duplicated  {more} jobs ran more than once (+{extra} runs); beyond what their stream needs "
        f"(flaky: 2 runs): {beyond} jobs (+{beyond_runs} runs) — at-least-once, no target",
    ]
    if book.lost_sent:
        lines.append(f"    lost creates by send time: {clusters(book.lost_sent)}")
    for name, refs in (("lost", book.lost), ("stranded", book.stranded), ("unverifiable", book.unverifiable),
                       ("unexpected", book.unexpected), ("phantom", book.phantom)):
        if refs:
            lines.append(f"    {name}: {refs[:20]}")
    lines.append("RSS         process                          pid      start   baseline     end   growth")
    tracked = list(run.processes.tracked.values()) if run.processes else []
    for t in tracked:
        pids = sorted({p for p in t.pids.values() if p is not None})
        growth = t.growth()
        lines.append(
            f"    {t.label:36s} {'/'.join(map(str, pids)):>9s} {mb(t.rss.get('start')):>9s} "
            f"{mb(t.rss.get('baseline')):>9s} {mb(t.rss.get('end')):>9s} "
            f"{'-' if growth is None else f'{growth / 1048576:+.1f}MB':>8s}"
            + ("" if t.target else "  (context)")
        )
    checks: list[tuple[str, bool, str]] = [
        ("lost = 0", not book.lost, str(len(book.lost))),
        ("stranded = 0", not book.stranded, str(len(book.stranded))),
        ("unverifiable = 0 (every acknowledged job checked before it could be purged)",
         not book.unverifiable, str(len(book.unverifiable))),
        ("unexpected = 0, phantom = 0", not book.unexpected and not book.phantom,
         f"{len(book.unexpected)}, {len(book.phantom)}"),
        ("no invariant violation within a snapshot", not single, str(single)),
        ("every failover settled", all(not f.error for f in run.failovers),
         str([f.line() for f in run.failovers if f.error])),
        ("the supervisor master and its reaper lived through the run",
         run.supervisor_alive and run.reaper_same, f"master alive {run.supervisor_alive}, "
         f"same reaper {run.reaper_same}"),
        ("the run carried out", not run.problems, "; ".join(run.problems)),
    ]
    for t in tracked:
        if t.target:
            growth = t.growth()
            checks.append((f"{t.label}: RSS growth after warm-up <= {RSS_GROWTH_LIMIT // 1048576} MB",
                           growth is not None and growth <= RSS_GROWTH_LIMIT,
                           "replaced or gone" if growth is None else f"{growth / 1048576:+.1f} MB"))
    lines.append("targets")
    for criterion, ok, observed in checks:
        lines.append(f"    {'PASS' if ok else 'FAIL'}  {criterion}  (observed: {observed})")
    missed = [criterion for criterion, ok, _ in checks if not ok]
    lines.append("verdict     " + ("PASS" if not missed else "FAIL: " + "; ".join(missed)))
    print("\n".join(lines), flush=True)
    return missed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.monitor:
        return run_monitor(args.monitor, Path(args.monitor_out))
    workdir = Path(tempfile.mkdtemp(prefix="kickq-soak-"))
    try:
        run = soak(args, workdir)
    except Exception as exc:
        print(f"soak: the run could not be carried out: {type(exc).__name__}: {exc}\n"
              f"work directory kept: {workdir}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    missed = report(run)
    if missed or args.keep:
        print(f"work directory kept: {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
