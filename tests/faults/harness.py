"""The fault-injection harness: private Redis servers, the ledger, the invariant checker, outcome counts.

- `RedisProc`: a private redis-server with a fixed port and data dir, so a case can SIGKILL it,
  restart it on the same files, or freeze it (SIGSTOP/SIGCONT).
- `Ledger`: what the handlers did, written outside Redis (see tests/faults/handlers.py).
- `snapshot` / `Checker` / `Monitor`: one atomic read of a whole namespace (a read-only Lua script),
  checked for the invariants — every job in exactly one structure, the structure its state names,
  every processing job holding a lease, complete hashes, no structure entry without a job — and,
  across observations, terminal states that never change and attempts that never go back.
- `purge_and_find_strays`: after a case, purge and delete every job and report any key left behind.
- `Outcomes`: the producer's view (acknowledged and indeterminate creates) against the ledger and
  Redis' final state, in Jepsen's terms: lost, duplicated, unexpected, recovered (plus stranded).
- `Case`: a case's measurements and its exact pass criteria, printed at the end of the case and again
  in pytest's terminal summary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import psutil
import redis

import kickq
from kickq.cluster import is_cluster_url
from kickq.connection import connect
from kickq.job import TERMINAL_STATES, Job, queue_reads, read_fields
from kickq.keys import Keys
from kickq.scripts import Scripts
from tests.helpers import ping, redis_server_binary, start_redis, stop_redis, wait_until
from tests.structures import STRUCTURE_OF_STATE, prefix

# --- private redis-server ------------------------------------------------------------------------


class RedisProc:
    """A redis-server of our own: `kill()` (SIGKILL), `restart()` on the same port and dir, `freeze()`
    and `thaw()`. `args` are redis-server options (persistence per case); `restart(*args)` may change
    them, e.g. to come back without the AOF."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = Path(workdir)
        self.args = list(args)
        self.proc, self.port = start_redis(self.workdir, *self.args)
        self.frozen = False
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: Any) -> redis.Redis:
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("socket_connect_timeout", 5)
        return redis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, encoding_errors="replace", **kw
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown save, no AOF rewrite."""
        self.thaw()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self, *args: str) -> None:
        """Start again on the same port and data dir (the AOF, if any, is loaded)."""
        if self.alive():
            self.kill()
        if args:
            self.args = list(args)
        cmd = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            *self.args,
        ]
        deadline = time.monotonic() + 15
        while True:  # the port may linger a moment after the kill
            with open(self.workdir / f"redis-{self.port}.log", "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
                )
            wait_until(
                lambda: self.proc.poll() is not None or ping("127.0.0.1", self.port),
                timeout=10,
                message="redis-server back up",
            )
            if self.alive():
                break
            assert time.monotonic() < deadline, f"redis-server could not start again on {self.port}"
            time.sleep(0.1)  # pacing the retry of a failed bind, not waiting for a result
        self.restarts += 1

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def close(self) -> None:
        self.thaw()
        stop_redis(self.proc)


# --- handler modules for the supervisor -------------------------------------------------------------


def handler_module(
    directory: Path,
    ledger: Path,
    registrations: Sequence[tuple[Sequence[str], int] | tuple[Sequence[str], int, int]],
    config: dict[str, Any] | None = None,
    name: str = "fault_handlers",
    handler: str = "work",
) -> Path:
    """Write a module that points tests/faults/handlers.py at `ledger` and registers `handler` (a
    function of that module: `work`, or `work_async`) for each (names, concurrent_jobs[,
    jobs_per_worker]); `config` goes to kickq.config() (the command line still wins)."""
    lines = ["import kickq", "from tests.faults import handlers", f"handlers.LEDGER = {str(ledger)!r}"]
    if config:
        lines.append(f"kickq.config(**{config!r})")
    lines.append("kq = kickq.Kickq()")
    for names, workers, *dense in registrations:
        options = {"concurrent_jobs": workers, **({"jobs_per_worker": dense[0]} if dense else {})}
        lines.append(f"kq.process({list(names)!r}, {options!r}, handlers.{handler})")
    path = Path(directory) / f"{name}.py"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the ledger ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    job_id: str
    attempt: int
    pid: int
    ref: str


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[Execution]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            job_id, attempt, pid, ref = line.split(" ")
            out.append(Execution(job_id, int(attempt), int(pid), ref))
        return out

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
        except FileNotFoundError:
            return 0


# --- invariants -----------------------------------------------------------------------------------------

SNAPSHOT_LUA = r"""
-- One atomic, read-only look at a namespace: every key, every job's state fields, every structure.
local P = ARGV[1]
local keys, seen = {}, {}
local cursor = '0'
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', P .. '*', 'COUNT', 1000)
  cursor = reply[1]
  for _, k in ipairs(reply[2]) do
    if not seen[k] then seen[k] = true; keys[#keys + 1] = k end
  end
until cursor == '0'
local jobs, lists, zsets = {}, {}, {}
local n = #P
for _, k in ipairs(keys) do
  local rest = string.sub(k, n + 1)
  if string.sub(rest, 1, 4) == 'job:' then
    local f = redis.call('HMGET', k, 'state', 'name', 'attempt', 'create_time', 'update_time', 'finish_time')
    jobs[#jobs + 1] = {string.sub(rest, 5), f[1] or '', f[2] or '', f[3] or '', f[4] or '', f[5] or '',
                       f[6] or ''}
  elseif rest == 'newjobs' then
    -- packed new jobs not claimed yet: "name\ncreate_time\nopts\ndata" (kickq.job.unpack_new)
    local flat = redis.call('HGETALL', k)
    for i = 1, #flat, 2 do
      local name, created = string.match(flat[i + 1], '^([^\n]*)\n([^\n]*)\n')
      jobs[#jobs + 1] = {flat[i], 'new', name or '', '', created or '', '', ''}
    end
  elseif string.sub(rest, 1, 6) == 'queue:' and redis.call('TYPE', k).ok == 'list' then
    lists[#lists + 1] = {rest, redis.call('LRANGE', k, 0, -1)}
  elseif rest == 'delayed' or rest == 'processing' or rest == 'finished' then
    zsets[#zsets + 1] = {rest, redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')}
  end
end
local t = redis.call('TIME')
return cjson.encode({keys = keys, jobs = jobs, lists = lists, zsets = zsets,
                     now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)})
"""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # cjson encodes an empty table as {}


@dataclass
class JobRow:
    id: str
    state: str
    name: str
    attempt: int
    create_time: str
    update_time: str
    finish_time: str


@dataclass
class Snapshot:
    keys: list[str]
    jobs: dict[str, JobRow]
    where: dict[str, list[str]]  # id -> every structure holding it (a list may hold it twice)
    leases: dict[str, float]
    now: int
    twice: list[str] = field(default_factory=list)  # ids with both a hash and a packed entry


def snapshot(r: redis.Redis, ns: str) -> Snapshot:
    # The keys every kickq script declares: on a cluster, Redis refuses the look while the
    # namespace's slot migrates rather than let it see half the keys.
    raw = json.loads(r.register_script(SNAPSHOT_LUA)(keys=Keys(ns).script_keys, args=[prefix(ns)]))
    jobs = {}
    twice = []
    for job_id, state, name, attempt, ct, ut, ft in _list(raw["jobs"]):
        if job_id in jobs:
            twice.append(job_id)
        jobs[job_id] = JobRow(job_id, state, name, int(attempt or 0), ct, ut, ft)
    where: dict[str, list[str]] = defaultdict(list)
    for key, members in _list(raw["lists"]):
        for member in _list(members):
            where[member].append(key)
    leases: dict[str, float] = {}
    for zset, flat in _list(raw["zsets"]):
        flat = _list(flat)
        for member, score in zip(flat[::2], flat[1::2], strict=True):
            where[member].append(zset)
            if zset == "processing":
                leases[member] = float(score)
    return Snapshot(_list(raw["keys"]), jobs, dict(where), leases, int(raw["now"]), twice)


def violations(snap: Snapshot) -> list[str]:
    """What is wrong with one snapshot, taken on its own."""
    out = []
    for job in snap.jobs.values():
        # update_time is absent until a job first changes (a new job's hash leaves it out)
        changed = job.update_time or job.state in ("new", "delayed")
        if not (job.state and job.name and job.create_time and changed):
            out.append(
                f"job {job.id}: incomplete hash (state={job.state!r} name={job.name!r} "
                f"create_time={job.create_time!r} update_time={job.update_time!r})"
            )
            continue
        if job.state not in STRUCTURE_OF_STATE:
            out.append(f"job {job.id}: unknown state {job.state!r}")
            continue
        expected = STRUCTURE_OF_STATE[job.state]
        if expected == "queue":
            expected = "queue:" + job.name
        held = snap.where.get(job.id, [])
        if held != [expected]:
            out.append(f"job {job.id} ({job.state}) is in {held}, expected exactly [{expected}]")
        if job.state == "processing" and (job.id not in snap.leases or job.attempt < 1):
            out.append(f"job {job.id} is processing without a lease or attempt token")
        if job.state in TERMINAL_STATES and not job.finish_time:
            out.append(f"job {job.id} is {job.state} without finish_time")
    if snap.twice:
        twice = sorted(snap.twice, key=_id_order)[:20]
        out.append(f"jobs with both a hash and a packed new-job entry: {twice}")
    orphans = sorted(set(snap.where) - set(snap.jobs), key=_id_order)
    if orphans:
        out.append(f"structures hold ids without a job hash: {orphans[:20]}")
    return out


def _id_order(job_id: str) -> tuple[int, str]:
    return (int(job_id), "") if job_id.isdigit() else (1 << 62, job_id)


class Checker:
    """Invariants of each snapshot, and across snapshots: a terminal job keeps its state, attempt and
    finish time until it is purged or deleted, and an attempt token never goes back."""

    def __init__(self) -> None:
        self.terminal: dict[str, tuple[str, int, str]] = {}
        self.attempts: dict[str, int] = {}
        self.found: list[str] = []
        self.snapshots = 0

    def observe(self, snap: Snapshot, label: str = "") -> list[str]:
        found = violations(snap)
        for job in snap.jobs.values():
            was = self.terminal.get(job.id)
            now = (job.state, job.attempt, job.finish_time)
            if was is not None and now != was:
                found.append(f"job {job.id}: terminal {was} changed to {now}")
            if job.state in TERMINAL_STATES and was is None:
                self.terminal[job.id] = now
            if job.attempt < self.attempts.get(job.id, 0):
                found.append(f"job {job.id}: attempt went back from {self.attempts[job.id]} to {job.attempt}")
            self.attempts[job.id] = max(job.attempt, self.attempts.get(job.id, 0))
        self.snapshots += 1
        self.found += [f"{label}{v}" for v in found]
        return found

    def forget(self) -> None:
        """After Redis lost its data: ids start again from 1, so history no longer applies."""
        self.terminal.clear()
        self.attempts.clear()


class Monitor:
    """Snapshots a namespace every `interval` seconds in a thread while a case runs. Redis being
    unreachable (the fault itself) only skips a snapshot."""

    def __init__(self, url: str, ns: str, interval: float = 0.5) -> None:
        self.client = namespace_client(url, ns, timeout=3)
        self.ns = ns
        self.interval = interval
        self.checker = Checker()
        self.skipped = 0
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="invariant-monitor", daemon=True)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._paused.is_set():
                continue
            self.check_now()

    def check_now(self, label: str = "") -> list[str]:
        with self._lock:
            try:
                return self.checker.observe(snapshot(self.client, self.ns), label)
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError,
            ):
                self.skipped += 1
            except redis.exceptions.ResponseError as exc:  # e.g. LOADING after a restart
                if "LOADING" not in str(exc) and "NOSCRIPT" not in str(exc):
                    raise
                self.skipped += 1
            return []

    def pause(self) -> None:
        self._paused.set()

    def resume(self, forget: bool = False) -> None:
        with self._lock:
            if forget:
                self.checker.forget()
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def close(self) -> None:
        self.stop()
        self.client.close()

    @property
    def found(self) -> list[str]:
        return self.checker.found


# --- after a case -------------------------------------------------------------------------------------

#: Keys a namespace may keep once every job is gone: the id counter, the names seen, settings, the
#: bounded observability keys, per-worker claim records and idle registrations (they expire).
KEPT = ("id", "names", "meta", "events")
KEPT_PREFIXES_WITH_TTL = ("stats:", "times:", "claim:", "idle:", "idler:")


def purge_and_find_strays(r: redis.Redis, ns: str, names: Iterable[str] = ()) -> list[str]:
    """Purge every finished job (as the reaper would, later), delete the rest, let a worker's claim
    mend the wake tokens; return the keys that should not be there any more."""
    keys, scr = Keys(ns), Scripts(r)
    seconds, micros = r.time()
    far = (int(seconds) + 10 * 365 * 86400) * 1000
    while scr.purge(keys, now=far, limit=5000)[0]:
        pass
    p = prefix(ns)
    for key in list(r.scan_iter(match=p + "job:*", count=1000)):
        scr.delete(keys, key[len(p) + 4 :])
    for job_id in r.hkeys(keys.new_jobs):
        scr.delete(keys, job_id)
    all_names = set(names) | set(r.smembers(keys.names))
    if all_names:
        assert scr.claim(keys, sorted(all_names)) is None, "a job appeared while purging"
    strays = []
    for key in sorted(r.scan_iter(match=p + "*", count=1000)):
        rest = key[len(p) :]
        if rest in KEPT:
            continue
        if rest.startswith(KEPT_PREFIXES_WITH_TTL) and r.ttl(key) > 0:
            continue
        if rest == "counts" and not any(int(v) for v in r.hvals(key)):
            continue
        strays.append(f"{rest} ({r.type(key)}, ttl {r.ttl(key)})")
    return strays


def job_states(r: redis.Redis, ns: str, ids: Sequence[str]) -> dict[str, str | None]:
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hexists(prefix(ns) + "newjobs", job_id)  # a new job not claimed yet
        pipe.hget(prefix(ns) + "job:" + job_id, "state")
    replies = pipe.execute()
    return {job_id: "new" if packed else state
            for job_id, packed, state in zip(ids, replies[::2], replies[1::2], strict=True)}


def jobs_of(r: redis.Redis, ns: str, ids: Sequence[str]) -> dict[str, Job | None]:
    out: dict[str, Job | None] = {}
    ids = list(ids)
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        pipe = r.pipeline(transaction=False)
        queue_reads(pipe, Keys(ns), chunk)
        for job_id, fields in zip(chunk, read_fields(pipe.execute()), strict=True):
            out[job_id] = Job.from_fields(job_id, fields) if fields else None
    return out


def wait_settled(r: redis.Redis, ns: str, ids: Sequence[str], timeout: float, idle: bool = True) -> float:
    """Poll until every id is terminal (or gone) and, with `idle`, nothing else runs or is delayed
    either; returns the seconds it took."""
    started = time.monotonic()
    keys = Keys(ns)
    ids = list(ids)

    def settled() -> bool:
        try:
            states = job_states(r, ns, ids)
            if any(s is not None and s not in TERMINAL_STATES for s in states.values()):
                return False
            return not idle or (r.zcard(keys.processing) == 0 and r.zcard(keys.delayed) == 0)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    try:
        wait_until(settled, timeout=timeout, interval=0.1, message="every job terminal")
    except AssertionError:
        states = Counter(job_states(r, ns, ids).values())
        raise AssertionError(f"not settled after {timeout}s: states {dict(states)}") from None
    return time.monotonic() - started


# --- outcomes ---------------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    """Jepsen's categories, for jobs identified by the producer's `ref` (unique per create call):

    lost        acknowledged create whose job never completed and is not present either
    duplicated  jobs executed more than once (with `extra` = executions beyond the first)
    unexpected  executions of a ref no create ever sent
    recovered   jobs that had a ghosted run and then completed successfully
    stranded    acknowledged jobs still present but not terminal after the case settled
    phantom     jobs recorded `success` without any execution in the ledger
    """

    acked: int = 0
    indeterminate: int = 0
    indeterminate_executed: int = 0
    executions: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    stranded: list[str] = field(default_factory=list)
    phantom: list[str] = field(default_factory=list)
    final: dict[str, Job | None] = field(default_factory=dict)  # ref -> final job
    by_ref: dict[str, list[Execution]] = field(default_factory=dict)

    @property
    def extra(self) -> int:
        return sum(self.duplicated.values())

    def line(self) -> str:
        return (
            f"acked={self.acked} indeterminate={self.indeterminate} "
            f"(executed {self.indeterminate_executed}) executions={self.executions} | "
            f"lost={len(self.lost)} duplicated={len(self.duplicated)} (+{self.extra} runs) "
            f"unexpected={len(self.unexpected)} recovered={len(self.recovered)} "
            f"stranded={len(self.stranded)} phantom={len(self.phantom)}"
        )


def outcomes(
    r: redis.Redis, ns: str, ledger: Ledger, acked: dict[str, str], indeterminate: Iterable[str] = ()
) -> Outcomes:
    """`acked`: ref -> job id of every create that returned; `indeterminate`: refs of creates that
    raised (they may or may not exist)."""
    indeterminate = set(indeterminate)
    execs = ledger.read()
    by_ref: dict[str, list[Execution]] = defaultdict(list)
    for e in execs:
        by_ref[e.ref].append(e)
    final_by_id = jobs_of(r, ns, list(acked.values()))
    out = Outcomes(
        acked=len(acked), indeterminate=len(indeterminate), executions=len(execs), by_ref=dict(by_ref)
    )
    for ref, job_id in acked.items():
        job = final_by_id[job_id]
        out.final[ref] = job
        if job is None:
            out.lost.append(ref)
        elif job.state not in TERMINAL_STATES:
            out.stranded.append(ref)
        else:
            if job.state == "success" and any(run["state"] == "ghost" for run in job.runs):
                out.recovered.append(ref)
            if job.state == "success" and not by_ref.get(ref):
                out.phantom.append(ref)
    for ref, runs in by_ref.items():
        if len(runs) > 1:
            out.duplicated[ref] = len(runs) - 1
        if ref not in acked and ref not in indeterminate:
            out.unexpected.append(ref)
    out.indeterminate_executed = sum(1 for ref in indeterminate if ref in by_ref)
    return out


# --- load ---------------------------------------------------------------------------------------------


class Producer(threading.Thread):
    """Creates jobs one by one at `rate` per second until stopped. Each job's data carries a unique
    `ref`; a create that returned is *acknowledged* (ref -> id), one that raised is *indeterminate*
    (the reply may have been lost after Redis applied it)."""

    def __init__(self, kq: kickq.Kickq, name: str, rate: float, prefix: str = "p", data=None, opts=None):
        super().__init__(name=f"producer-{prefix}", daemon=True)
        self.kq, self.job_name, self.rate, self.prefix = kq, name, rate, prefix
        self.data, self.opts = dict(data or {}), opts
        self.acked: dict[str, str] = {}
        self.acked_at: dict[str, float] = {}  # ref -> when its create returned (monotonic)
        self.sent_at: dict[str, float] = {}  # ref -> when its create was called
        self.failed: dict[str, str] = {}
        self.calls: list[tuple[float, float, bool]] = []  # (started, seconds, acknowledged)
        self.errors: Counter[str] = Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self.stopping.is_set():
            ref = f"{self.prefix}{i}"
            i += 1
            started = self.sent_at[ref] = time.monotonic()
            try:
                job = self.kq.create(self.job_name, {"ref": ref, **self.data}, self.opts)
                self.acked[ref] = job.id
                self.acked_at[ref] = time.monotonic()
                ok = True
            except kickq.KickqError as exc:
                self.failed[ref] = str(exc)
                self.errors[type(exc).__name__] += 1
                ok = False
            self.calls.append((started, time.monotonic() - started, ok))
            next_at += 1 / self.rate
            if next_at > time.monotonic():
                self.stopping.wait(next_at - time.monotonic())  # the load's pace
            else:
                next_at = time.monotonic()

    @property
    def longest(self) -> float:
        """The longest create call, in seconds."""
        return max((seconds for _, seconds, _ in list(self.calls)), default=0.0)

    def sent_after(self, moment: float) -> list[str]:
        """The acknowledged creates called after `moment` (monotonic), in order."""
        refs = [ref for ref in list(self.acked) if self.sent_at[ref] > moment]
        return sorted(refs, key=lambda ref: int(ref[len(self.prefix):]))

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the producer hangs"



def supervisor_pids(sup: Any) -> set[int]:
    """A supervisor's master and its children (workers, reaper) now."""
    return {sup.pid} | {p.pid for p in sup.children()}


# --- reporting ---------------------------------------------------------------------------------------------

RESULTS: list[str] = []  # every finished case's report, printed again in the terminal summary


class Case:
    """Collects a case's measurements and its pass criteria; `done()` prints them and asserts."""

    def __init__(self, number: str, title: str, size: str = "") -> None:
        self.number, self.title, self.size = number, title, size
        self.started = time.monotonic()
        self.facts: list[str] = []
        self.criteria: list[tuple[str, bool, str]] = []

    def note(self, text: str) -> None:
        self.facts.append(text)

    def check(self, criterion: str, ok: bool, observed: Any = "") -> bool:
        self.criteria.append((criterion, bool(ok), str(observed)))
        return bool(ok)

    def text(self) -> str:
        verdict = "PASS" if all(ok for _, ok, _ in self.criteria) else "FAIL"
        head = f"case {self.number} {self.title}" + (f" [{self.size}]" if self.size else "")
        lines = [f"{head}: {verdict} in {time.monotonic() - self.started:.1f}s"]
        lines += [f"    {fact}" for fact in self.facts]
        for criterion, ok, observed in self.criteria:
            lines.append(
                f"    {'PASS' if ok else 'FAIL'}  {criterion}"
                + (f"  (observed: {observed})" if observed != "" else "")
            )
        return "\n".join(lines)

    def done(self) -> None:
        text = self.text()
        print("\n" + text)
        RESULTS.append(text)
        failed = [f"{c} (observed: {o})" for c, ok, o in self.criteria if not ok]
        assert not failed, "criteria not met:\n" + "\n".join(failed) + "\n" + text


# --- processes ---------------------------------------------------------------------------------------------


def cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_alive(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def read_pid(path: Path, timeout: float = 10.0) -> int:
    return int(
        wait_until(lambda: path.exists() and path.read_text(), timeout=timeout, message=f"a pid in {path}")
    )


def namespace_client(url: str, ns: str, timeout: float = 5) -> redis.Redis:
    """A redis-py client for one namespace's keys: a plain one for a single server; for a
    redis+cluster:// URL, kickq's own client of the namespace (routed to the master of its slot); for
    a redis+sentinel:// URL, redis-py's own client of the master the sentinels name (sentinel_client)."""
    if is_sentinel_url(url):
        return sentinel_client(url, timeout)
    if is_cluster_url(url):
        return connect(kickq.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=timeout).settings())
    return redis.Redis.from_url(
        url, decode_responses=True, encoding_errors="replace", socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


# --- sizes ------------------------------------------------------------------------------------------------


def sizes(quick: Any, full: Any) -> list[Any]:
    """Parameters for a case: `quick` runs in the default suite, `full` only under `-m fault`."""
    import pytest

    return [pytest.param(quick, id="quick"), pytest.param(full, id="full", marks=pytest.mark.fault)]


# --- Redis Sentinel ---------------------------------------------------------------------------------------


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in ("redis+sentinel", "rediss+sentinel")


def sentinel_client(url: str, timeout: float = 5) -> redis.Redis:
    """A redis-py client (decoded replies) of the master the sentinels of a
    `redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]` URL name: redis-py's own
    Sentinel support, not kickq's, so a case checks kickq with a client kickq did not make. It asks
    the sentinels again after a connection error, and after a write refused by a demoted master."""
    from urllib.parse import unquote

    from redis.sentinel import Sentinel

    scheme, _, rest = url.partition("://")
    credentials, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    user, _, password = credentials.partition(":")
    addresses = [(host, int(port)) for host, _, port in (a.rpartition(":") for a in hosts.split(","))]
    options: dict[str, Any] = {
        "decode_responses": True, "encoding_errors": "replace", "socket_timeout": timeout,
        "socket_connect_timeout": timeout, "db": int(db or 0),
        "username": unquote(user) or None, "password": unquote(password) or None,
    }
    if scheme.startswith("rediss"):
        options["ssl"] = True
    sentinels = Sentinel(
        addresses, sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout}
    )
    master: redis.Redis = sentinels.master_for(service, **options)
    return master


# --- a producer in a process of its own -------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]

PRODUCER_SCRIPT = r"""
import json, logging, signal, sys, threading, time
import kickq

spec = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())
kq = kickq.Kickq(**spec["settings"])
with open(spec["path"], "a", buffering=1) as out:
    i, next_at = 0, time.monotonic()
    while not stopping.is_set():
        ref = spec["prefix"] + str(i)
        i += 1
        sent = time.monotonic()
        try:
            outcome = kq.create(spec["name"], {"ref": ref, **spec["data"]}, spec["opts"]).id
        except kickq.KickqError as exc:
            outcome = "!" + type(exc).__name__
        out.write(f"{ref} {outcome} {sent:.6f} {time.monotonic():.6f}\n")
        next_at += 1 / spec["rate"]
        if next_at > time.monotonic():
            stopping.wait(next_at - time.monotonic())  # the load's pace
        else:
            next_at = time.monotonic()
kq.close()
"""


class ProducerProcess:
    """`Producer`'s load from a process of its own, so that its CPU time and its log are its own.
    It appends one line per create to a file, `<ref> <job id or !ErrorName> <sent> <returned>`
    (time.monotonic(), one clock for every process on Linux); `read()` fills the same fields as
    Producer's from it. SIGTERM stops it after the create in progress."""

    def __init__(self, directory: Path, name: str, rate: float, settings: dict[str, Any],
                 prefix: str = "q", data: dict[str, Any] | None = None, opts: dict[str, Any] | None = None):
        self.prefix = prefix
        self.path = Path(directory) / f"producer-{prefix}.txt"
        self.log_path = Path(directory) / f"producer-{prefix}.log"
        self.spec = {"settings": settings, "name": name, "rate": rate, "prefix": prefix,
                     "data": dict(data or {}), "opts": opts, "path": str(self.path)}
        self.proc: subprocess.Popen | None = None
        self.process: psutil.Process | None = None
        self.acked: dict[str, str] = {}
        self.acked_at: dict[str, float] = {}
        self.sent_at: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.calls: list[tuple[float, float, bool]] = []
        self.errors: Counter[str] = Counter()

    def __enter__(self) -> "ProducerProcess":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def start(self) -> None:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
        env.pop("KICKQ_EMBEDDED_REDIS", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", PRODUCER_SCRIPT, json.dumps(self.spec)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            )
        self.process = psutil.Process(self.proc.pid)

    def read(self) -> "ProducerProcess":
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        self.acked, self.acked_at, self.sent_at, self.failed = {}, {}, {}, {}
        self.calls, self.errors = [], Counter()
        for line in lines:
            parts = line.split(" ")
            if len(parts) != 4:
                continue  # a line being written
            ref, outcome, sent, returned = parts[0], parts[1], float(parts[2]), float(parts[3])
            self.sent_at[ref] = sent
            ok = not outcome.startswith("!")
            if ok:
                self.acked[ref], self.acked_at[ref] = outcome, returned
            else:
                self.failed[ref] = outcome[1:]
                self.errors[outcome[1:]] += 1
            self.calls.append((sent, returned - sent, ok))
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def longest(self) -> float:
        return max((seconds for _, seconds, _ in self.calls), default=0.0)

    def sent_after(self, moment: float) -> list[str]:
        """The acknowledged creates called after `moment` (monotonic), in order (read afresh)."""
        self.read()
        refs = [ref for ref in self.acked if self.sent_at[ref] > moment]
        return sorted(refs, key=lambda ref: int(ref[len(self.prefix):]))

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"the producer process hangs:\n{self.log()[-3000:]}") from None
        assert code == 0, f"the producer process exited with {code}:\n{self.log()[-3000:]}"
        self.read()


# --- logs -------------------------------------------------------------------------------------------------

#: A line of the supervisor's log format (and ProducerProcess'): time, level, [pid], logger, message.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) \[(\d+)\] ")


def log_lines_by_pid(text: str, about: str | None = None) -> Counter[int]:
    """How many log records each process wrote in `text` (a traceback's lines count with its record);
    with `about`, only the records in which that regular expression is found."""
    wanted = re.compile(about) if about else None
    return Counter(int(m.group(2)) for line in text.splitlines()
                   if (m := LOG_LINE.match(line)) and (wanted is None or wanted.search(line)))


class LedgerWatcher(threading.Thread):
    """Reads the ledger's new lines every `interval` seconds while a case runs and keeps when each
    ref first appeared in it: when a worker first ran that job, to within `interval`."""

    def __init__(self, ledger: Ledger, interval: float = 0.02) -> None:
        super().__init__(name="ledger-watcher", daemon=True)
        self.ledger, self.interval = ledger, interval
        self.first_run: dict[str, float] = {}  # ref -> when its first execution was seen (monotonic)
        self._offset = 0
        self.stopping = threading.Event()

    def __enter__(self) -> "LedgerWatcher":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _read_new(self) -> None:
        try:
            with open(self.ledger.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        now = time.monotonic()
        for line in complete.decode().splitlines():
            self.first_run.setdefault(line.split(" ")[3], now)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self._read_new()

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=10)
        self._read_new()

    def first_run_after(self, refs: Iterable[str]) -> float | None:
        """When the first of `refs` was first seen run (None: none was yet)."""
        seen = [self.first_run[ref] for ref in refs if ref in self.first_run]
        return min(seen, default=None)
