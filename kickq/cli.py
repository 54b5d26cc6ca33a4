"""`kickq`: the admin command. See docs/observability.md.

    kickq [--redis-url URL] [--redis-namespace NS] COMMAND ...

Exit codes: 0 success; 1 a failed operation, a missing job, or problems found by `doctor`;
2 a usage error (argparse's own, and bad input such as invalid JSON or an invalid job name).
Long operations (purge, doctor) show progress on stderr when it is a terminal, nothing when piped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO, TypeVar

import redis

from . import logformat, scripts
from .client import Kickq
from .config import current, validate_settings
from .connection import connect, describe, redis_errors
from .errors import ConfigError, HotjobTimeout, JobNotFound, KickqError
from .job import STATES, TERMINAL_STATES, unpack_new
from .keys import Keys, validate_name
from .layout import JOB_ZSETS, QUEUE_STRUCTURE, STRUCTURE_OF_STATE, structure_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell tool killed by it reports
PAGE = 500


class UsageError(Exception):
    """Bad input found after parsing (exit 2)."""


class Failed(Exception):
    """The operation failed or the job is missing (exit 1)."""


# --- output helpers ----------------------------------------------------------------------------------

def iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def table(rows: Sequence[Sequence[Any]], out: TextIO, right_from: int = 1) -> None:
    """Aligned columns: the first `right_from` columns left-aligned, the rest right-aligned."""
    text = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    if not text:
        return
    widths = [max(len(row[i]) for row in text) for i in range(len(text[0]))]
    for row in text:
        cells = [cell.ljust(w) if i < right_from else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")


def dump(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


class Progress:
    """A one-line counter on stderr, redrawn at most 10 times a second; silent unless stderr is a tty."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.enabled = self.stream.isatty()
        self.shown = 0.0
        self.drawn = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self.shown >= 0.1:
            self.shown = now
            self.stream.write(f"\r\x1b[K{self.label}: {text}")
            self.stream.flush()
            self.drawn = True

    def done(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- the connection -----------------------------------------------------------------------------------

class Admin:
    """One raw client for reads and the admin scripts, and a Kickq client for what the library does."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.keys = Keys(settings["redis_namespace"])
        self.client: Any = connect(self.settings)
        self.scripts = scripts.Scripts(self.client)
        self._kq: Kickq | None = None

    def kq(self, **extra: Any) -> Kickq:
        if self._kq is None:
            # A client writes its events_maxlen into the namespace's meta hash when it connects; keep
            # the value the application set rather than resetting it to this command's default.
            current = self.client.hget(self.keys.meta, "events_maxlen")
            overrides = {"redis_url": self.settings["redis_url"],
                         "redis_namespace": self.settings["redis_namespace"]}
            if current is not None and current.lstrip("-").isdigit():
                overrides["events_maxlen"] = max(0, int(current))
            self._kq = Kickq(**{k: v for k, v in overrides.items() if v is not None}, **extra)
        return self._kq

    def run(self, name: str, args: Sequence[Any]) -> Any:
        return self.scripts.run(name, (self.keys.script_keys, [self.keys.prefix, *args]))

    def close(self) -> None:
        if self._kq is not None:
            self._kq.close()
        self.client.close()

    def scan(self, pattern: str) -> Iterator[str]:
        yield from self.client.scan_iter(match=self.keys.prefix + pattern, count=1000)

    def names(self) -> list[str]:
        return sorted(self.client.smembers(self.keys.names))


# --- stats ----------------------------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def cmd_stats(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    extra = {"stats_window": args.window} if args.window is not None else {}
    try:
        kq = admin.kq(**extra)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    stats = kq.stats(args.name)
    if args.json:
        dump(stats, out)
        return EXIT_OK
    rows: list[list[Any]] = [["NAME", *(s.upper() for s in STATES)]]
    figures = [("NAME", "CREATED", "PROCESSED", "SUCCESS", "FAIL", "RETRY", "GHOST", "RUNS/S", "MEAN MS",
                "P50 MS", "P95 MS", "MAX MS")]
    entries = list(stats["names"].items())
    if args.name is None:
        entries.append(("TOTAL", stats["total"]))
    for name, entry in entries:
        rows.append([name, *(entry["states"][s] for s in STATES)])
        w, t = entry["window"], entry["window"]["processing_time"]
        figures.append((name, w["created"], w["processed"], w["success"], w["fail"], w["retry"], w["ghost"],
                        f"{w['throughput']:.2f}", _ms(t["mean"]), _ms(t["p50"]), _ms(t["p95"]),
                        _ms(t["max"])))
    out.write(f"namespace {admin.keys.namespace} at {describe(admin.settings)}\n\njobs by state\n")
    table(rows, out)
    out.write(f"\nlast {stats['window_seconds']:g} s\n")
    table(figures, out)
    return EXIT_OK


# --- list and show -----------------------------------------------------------------------------------

def _sources(admin: Admin, state: str | None, name: str | None) -> list[tuple[str, str]]:
    """(kind, key) of the structures that may hold the jobs asked for, in listing order."""
    kinds = [QUEUE_STRUCTURE, *JOB_ZSETS] if state is None else [STRUCTURE_OF_STATE[state]]
    out = []
    for kind in kinds:
        if kind == QUEUE_STRUCTURE:
            for n in ([name] if name is not None else admin.names()):
                out.append(("list", admin.keys.queue(n)))
        else:
            out.append(("zset", admin.keys.prefix + kind))
    return out


def _ids(admin: Admin, kind: str, key: str) -> Iterator[list[str]]:
    start = 0
    while True:
        if kind == "list":
            page = admin.client.lrange(key, start, start + PAGE - 1)
        else:
            page = admin.client.zrange(key, start, start + PAGE - 1)
        if not page:
            return
        yield page
        if len(page) < PAGE:
            return
        start += PAGE


def cmd_list(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    if args.name is not None:
        _check_name(args.name)
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for kind, key in _sources(admin, args.state, args.name):
        for page in _ids(admin, kind, key):
            pipe = admin.client.pipeline(transaction=False)
            for job_id in page:
                pipe.hget(admin.keys.new_jobs, job_id)
                pipe.hmget(admin.keys.job(job_id), "state", "name", "create_time", "update_time",
                           "scheduled_for")
            replies = pipe.execute()
            for job_id, packed, read in zip(page, replies[::2], replies[1::2], strict=True):
                if packed is not None:  # a new job not claimed yet (job.stored_fields)
                    fields = unpack_new(packed)
                    read = ["new", fields["name"], fields["create_time"], None, None]
                state, name, created, updated, due = read
                if state is None or job_id in seen:
                    continue
                if args.state is not None and state != args.state:
                    continue
                if args.name is not None and name != args.name:
                    continue
                seen.add(job_id)
                found.append({"id": job_id, "name": name, "state": state,
                              "create_time": _int(created), "update_time": _int(updated or created),
                              "scheduled_for": _int(due)})
                if len(found) >= args.limit:
                    break
            if len(found) >= args.limit:
                break
        if len(found) >= args.limit:
            break
    if args.json:
        dump(found, out)
        return EXIT_OK
    rows: list[list[Any]] = [["ID", "NAME", "STATE", "CREATED", "UPDATED", "SCHEDULED FOR"]]
    rows += [[j["id"], j["name"], j["state"], iso(j["create_time"]), iso(j["update_time"]),
              iso(j["scheduled_for"])] for j in found]
    table(rows, out, right_from=99)
    return EXIT_OK


def _int(value: str | None) -> int | None:
    return None if value is None else int(float(value))


def _check_name(name: str) -> str:
    try:
        return validate_name(name)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def cmd_show(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    try:
        job = admin.kq().get(args.id)
    except JobNotFound as exc:
        raise Failed(str(exc)) from exc
    dump(job.to_dict(), out)
    return EXIT_OK


# --- create, delete, retry, purge -----------------------------------------------------------------

def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from exc


def cmd_create(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    data = _json_arg(args.data, "--data")
    opts = _json_arg(args.opts, "--opts") or {}
    if not isinstance(opts, dict):
        raise UsageError("--opts must be a JSON object of job options")
    if args.delay is not None:
        opts["delay"] = args.delay
    if args.hotjob:
        opts["hotjob"] = True
    if args.timeout is not None:
        opts["hotjob_timeout"] = args.timeout
    try:
        job = admin.kq().create(args.name, data, opts or None)
    except (ConfigError, TypeError, ValueError) as exc:  # bad name, option or data
        raise UsageError(str(exc)) from exc
    assert job is not None
    out.write(job.id + "\n")
    out.flush()
    if not args.hotjob:
        return EXIT_OK
    try:
        final = job.hotjob_promise.result()
    except HotjobTimeout as exc:
        raise Failed(str(exc)) from exc
    except JobNotFound as exc:
        raise Failed(f"job {job.id} was deleted before it finished") from exc
    dump(final.to_dict(), out)
    return EXIT_OK if final.success else EXIT_FAILED


def cmd_delete(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    if not admin.kq().delete(args.id):
        raise Failed(f"no job with id {args.id!r}")
    out.write(f"deleted job {args.id}\n")
    return EXIT_OK


def cmd_retry(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    status, state = admin.run("requeue", ["", args.id])
    if status == "missing":
        raise Failed(f"no job with id {args.id!r}")
    if status != "ok":
        raise Failed(f"job {args.id} is {state}: only a failed job can be retried")
    out.write(f"job {args.id} queued again\n")
    return EXIT_OK


def cmd_purge(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    if args.older_than < 0:
        raise UsageError("--older-than must be >= 0")
    older_ms = int(round(args.older_than * 1000))
    progress = Progress("purge")
    scanned = purged = 0
    for batch in chunks(admin.client.zscan_iter(admin.keys.finished, count=1000, score_cast_func=str), PAGE):
        ids = [member for member, _ in batch]
        purged += int(admin.run("purge_state", ["", args.state, older_ms, *ids]))
        scanned += len(ids)
        progress.update(f"{scanned} finished jobs looked at, {purged} purged")
    progress.done()
    out.write(f"purged {purged} {args.state} job(s)\n")
    return EXIT_OK


# --- schedules ------------------------------------------------------------------------------------

def cmd_schedules(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    found = admin.kq().schedules()
    if args.json:
        dump(found, out)
        return EXIT_OK
    rows: list[list[Any]] = [["ID", "NAME", "RULE", "TIMEZONE", "CATCH UP", "NEXT RUN", "PENDING JOB",
                              "LAST JOB"]]
    for s in found:
        rule = f"cron {s['cron']}" if "cron" in s else f"every {s['every']:g}s"
        rows.append([s["id"], s["name"], rule, s["timezone"], s["catch_up"], iso(s["next_run"]),
                     s["pending_job_id"], s["last_job_id"]])
    table(rows, out, right_from=99)
    return EXIT_OK


# --- doctor ---------------------------------------------------------------------------------------

class Problem:
    """One job (or id) in an impossible state, confirmed by an atomic look (repair_inspect.lua)."""
    __slots__ = ("kind", "job_id", "state", "name", "where", "names")

    DESCRIPTIONS = {
        "orphan": "index entry without a job hash",
        "bad_state": "job hash with a missing or unknown state, or no name",
        "no_lease": "processing without a lease",
        "two_structures": "in more than one structure",
        "not_indexed": "job hash without an index entry",
        "wrong_structure": "in the wrong structure for its state",
    }

    def __init__(self, kind: str, job_id: str, state: str, name: str, where: list[str]) -> None:
        self.kind, self.job_id, self.state, self.name, self.where = kind, job_id, state, name, where
        self.names = sorted({w[len("queue:"):] for w in where if w.startswith("queue:")})

    def describe(self) -> str:
        where = ", ".join(self.where) if self.where else "no structure"
        what = "no hash" if self.kind == "orphan" else (f"state {self.state!r}" if self.state else "no state")
        return f"job {self.job_id}: {self.DESCRIPTIONS[self.kind]} ({what}; in {where})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.job_id, "state": self.state or None, "name": self.name or None,
                "where": self.where, "description": self.DESCRIPTIONS[self.kind]}


def diagnose(exists: bool, state: str, name: str, where: list[str]) -> str | None:
    """The kind of problem of one id, from whether its hash exists, its state and name, and every
    structure holding it (one entry per occurrence). None when it is where it should be."""
    if not exists:
        return "orphan" if where else None
    expected = structure_of(state, name)
    if expected is None or not name:
        return "bad_state"
    if state == "processing" and "processing" not in where:
        return "no_lease"
    if len(where) > 1:
        return "two_structures"
    if not where:
        return "not_indexed"
    if where != [expected]:
        return "wrong_structure"
    return None


class Scan:
    """Everything doctor reads, by SCAN and pages (admin only: never on a hot path)."""

    def __init__(self, admin: Admin, progress: Progress) -> None:
        self.jobs: dict[str, tuple[str, str]] = {}
        self.where: dict[str, list[str]] = {}
        client, keys = admin.client, admin.keys
        before = self._marks(admin)
        job_prefix = keys.prefix + "job:"
        # New jobs not claimed yet first, then hashes: a job only moves from the first to the
        # second (job.stored_fields), so none is missed.
        for job_id, packed in client.hscan_iter(keys.new_jobs, count=PAGE):
            self.jobs[job_id] = ("new", unpack_new(packed)["name"])
        for batch in chunks(admin.scan("job:*"), PAGE):
            pipe = client.pipeline(transaction=False)
            for key in batch:
                pipe.hmget(key, "state", "name")
            for key, (state, name) in zip(batch, pipe.execute(), strict=True):
                self.jobs[key[len(job_prefix):]] = (state or "", name or "")
            progress.update(f"{len(self.jobs)} jobs read")
        queue_prefix = keys.prefix + "queue:"
        for key in admin.scan("queue:*"):
            if client.type(key) != "list":
                continue
            for page in _ids(admin, "list", key):
                for job_id in page:
                    self.where.setdefault(job_id, []).append("queue:" + key[len(queue_prefix):])
        for kind in JOB_ZSETS:
            for job_id, _ in client.zscan_iter(keys.prefix + kind, count=1000, score_cast_func=str):
                self.where.setdefault(job_id, []).append(kind)
            progress.update(f"{len(self.jobs)} jobs read, {kind} read")
        after = self._marks(admin)
        self.recorded = after[0]
        #: No transition ran while we read: the newest event and every count are as they were.
        self.quiet = before == after
        #: Count fields that did not change while we read.
        self.stable = {f for f in set(before[0]) | set(after[0]) if before[0].get(f) == after[0].get(f)}

    @staticmethod
    def _marks(admin: Admin) -> tuple[dict[str, int], str | None]:
        pipe = admin.client.pipeline(transaction=True)
        pipe.hgetall(admin.keys.counts)
        pipe.xrevrange(admin.keys.events, count=1)
        counts, newest = pipe.execute()
        return ({field: int(value) for field, value in counts.items() if value.lstrip("-").isdigit()},
                newest[0][0] if newest else None)

    def suspects(self) -> list[str]:
        out = [job_id for job_id, (state, name) in self.jobs.items()
               if diagnose(True, state, name, self.where.get(job_id, []))]
        out += [job_id for job_id in self.where if job_id not in self.jobs]
        return sorted(set(out), key=_id_order)

    def actual_counts(self) -> Counter[str]:
        return Counter(f"{state}:{name}" for state, name in self.jobs.values() if state in STRUCTURE_OF_STATE)

    def drift(self) -> dict[str, int]:
        """field -> recorded minus actual, for every field where they differ."""
        actual = self.actual_counts()
        out = {}
        for field in set(actual) | set(self.recorded):
            diff = self.recorded.get(field, 0) - actual.get(field, 0)
            if diff:
                out[field] = diff
        return out


def _id_order(job_id: str) -> tuple[int, int | str]:
    return (0, int(job_id)) if job_id.isdigit() else (1, job_id)


def inspect(admin: Admin, job_id: str, names: Sequence[str]) -> tuple[bool, str, str, list[str]]:
    reply = admin.run("repair_inspect", [job_id, *names])
    exists, state, name, rest = bool(int(reply[0])), reply[1], reply[2], reply[3:]
    where: list[str] = []
    for structure, count in zip(rest[::2], rest[1::2], strict=True):
        where += [structure] * int(count)
    return exists, state, name, where


def find_problems(admin: Admin, scan: Scan) -> list[Problem]:
    problems = []
    for job_id in scan.suspects():
        seen = scan.where.get(job_id, [])
        names = sorted({w[len("queue:"):] for w in seen if w.startswith("queue:")})
        exists, state, name, where = inspect(admin, job_id, names)
        kind = diagnose(exists, state, name, where)
        if kind:
            problems.append(Problem(kind, job_id, state, name, where))
    return problems


def repair(admin: Admin, problem: Problem) -> str:
    names = problem.names
    if problem.kind == "orphan":
        removed = int(admin.run("repair_orphan", ["", problem.job_id, *names]))
        return f"removed {removed} index entr{'y' if removed == 1 else 'ies'}" if removed else "nothing to do"
    if problem.kind == "bad_state":
        fixed = int(admin.run("repair_state", ["", problem.job_id, *names]))
        return "marked fail" if fixed else "nothing to do"
    done = admin.run("repair_index", ["", problem.job_id, *names])
    return "; ".join(done) if done else "nothing to do"


def measure_drift(admin: Admin, progress: Progress, first: Scan | None = None,
                  tries: int = 3) -> dict[str, int] | None:
    """Counts drift, or None when no scan could be made while the namespace stood still.

    A scan during which no transition ran (the newest event and the counts did not change) is
    exact. On a busy namespace counts and jobs move under the scan, and no heuristic over moving
    figures is sound, so nothing is reported rather than a drift that may not exist."""
    scan = first or Scan(admin, progress)
    for _ in range(tries):
        if scan.quiet or not scan.drift():
            return scan.drift()
        scan = Scan(admin, progress)
    return scan.drift() if scan.quiet else None


def cmd_doctor(admin: Admin, args: argparse.Namespace, out: TextIO) -> int:
    progress = Progress("doctor")
    scan = Scan(admin, progress)
    problems = find_problems(admin, scan)
    report: dict[str, Any] = {"problems": [p.to_dict() for p in problems], "counts_drift": {}, "repaired": []}
    if args.repair:
        for problem in problems:
            done = repair(admin, problem)
            report["repaired"].append({"id": problem.job_id, "kind": problem.kind, "done": done})
            progress.update(f"{len(report['repaired'])}/{len(problems)} repaired")
        scan = Scan(admin, progress) if problems else scan
    measured = measure_drift(admin, progress, scan)
    drift = measured or {}
    report["counts_drift"] = drift
    if measured is None:
        report["counts_checked"] = False
    if args.repair and drift:
        pairs: list[Any] = []
        for field, diff in sorted(drift.items()):
            pairs += [field, -diff]
        admin.run("repair_counts", pairs)
        report["repaired"].append({"kind": "counts", "done": f"corrected {len(drift)} count(s)"})
    remaining = 0
    if args.repair and (problems or drift):
        again = Scan(admin, progress)
        remaining = len(find_problems(admin, again)) + len(measure_drift(admin, progress, again) or {})
        report["remaining"] = remaining
    progress.done()
    if args.json:
        dump(report, out)
    else:
        for problem in problems:
            out.write(problem.describe() + "\n")
        for field, diff in sorted(drift.items()):
            state, _, name = field.partition(":")
            out.write(f"counts drift: {state} {name!r} recorded {diff:+d} against the jobs there are\n")
        for item in report["repaired"]:
            out.write(f"repaired {('job ' + item['id']) if 'id' in item else item['kind']}: {item['done']}\n")
        found = len(problems) + len(drift)
        if measured is None:
            out.write("doctor: counts not checked: jobs moved during every scan (run it again when "
                      "the namespace is quiet)\n")
        if not found:
            out.write(f"doctor: no problems in namespace {admin.keys.namespace} ({len(scan.jobs)} jobs)\n")
        elif args.repair:
            out.write(f"doctor: {found} problem(s) found, {found - remaining} repaired, {remaining} remain\n")
        else:
            out.write(f"doctor: {found} problem(s) found; `kickq doctor --repair` mends them\n")
    found = len(problems) + len(drift)
    if args.repair:
        return EXIT_FAILED if remaining else EXIT_OK
    return EXIT_FAILED if found else EXIT_OK


# --- the parser -----------------------------------------------------------------------------------

def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kickq",
        description="Look inside a kickq namespace and act on its jobs.",
        epilog="Global flags go before the command: kickq --redis-url URL --redis-namespace NS stats. "
               "Exit codes: 0 done, 1 failed operation / missing job / problems found, 2 usage error.")
    p.add_argument("--redis-url", default=os.environ.get("KICKQ_REDIS_URL") or None,
                   help="redis://, rediss://, unix://, redis+cluster://host:port[,host:port...] or "
                        "redis+sentinel://host:port[,host:port...]/SERVICE URL "
                        "(default: $KICKQ_REDIS_URL, else 127.0.0.1:6379)")
    p.add_argument("--redis-namespace", default=os.environ.get("KICKQ_NAMESPACE") or "kickq",
                   help="key namespace (default: $KICKQ_NAMESPACE, else 'kickq')")
    p.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                   help="how warnings are written to stderr: text, or one JSON object per line "
                        "(time, level, logger, pid, role, message, exc) (default: text)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("stats", help="jobs by state and recent activity, per job name",
                       description="Jobs by state and name, and created/processed/success/fail/retry/ghost, "
                                   "runs per second and processing time over a recent window.")
    s.add_argument("--json", action="store_true", help="print kq.stats() as JSON")
    s.add_argument("--name", help="only this job name")
    s.add_argument("--window", type=_positive, metavar="SECONDS",
                   help="window of the activity figures, 10..3600 (default: stats_window, 300)")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("list", help="list jobs by state and/or name",
                       description="List jobs, in queue order for new/queued and by due, lease or purge "
                                   "time for the others.")
    s.add_argument("--state", choices=STATES)
    s.add_argument("--name", help="only jobs of this name")
    s.add_argument("--limit", type=_limit, default=100, help="at most this many (default 100)")
    s.add_argument("--json", action="store_true", help="print a JSON list")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="print one job as JSON", description="Print one job as JSON.")
    s.add_argument("id", metavar="ID")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("create", help="create a job; prints its id",
                       description="Create a job and print its id. With --hotjob, wait for it to finish and "
                                   "print the final job as JSON (exit 1 if it failed or timed out).")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--data", metavar="JSON", help="the job's data (default: null)")
    s.add_argument("--opts", metavar="JSON", help="job options as a JSON object, e.g. '{\"retry\": true}'")
    s.add_argument("--delay", type=_positive, metavar="SECONDS", help="run it after this many seconds")
    s.add_argument("--hotjob", action="store_true", help="wait for the outcome and print the final job")
    s.add_argument("--timeout", type=_positive, metavar="SECONDS",
                   help="with --hotjob: give up after this long (hotjob_timeout, default 10)")
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("delete", help="delete a job", description="Delete a job, whatever its state.")
    s.add_argument("id", metavar="ID")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("retry", help="queue a failed job again under the same id",
                       description="Queue a failed job again under the same id. Its runs are kept, and "
                                   "they still count towards retry_count.")
    s.add_argument("id", metavar="ID")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("purge", help="delete finished jobs of one state older than some time",
                       description="Delete success or fail jobs that finished at least SECONDS ago, "
                                   "before their purge_timeout. Shows progress on a terminal.")
    s.add_argument("--state", required=True, choices=sorted(TERMINAL_STATES))
    s.add_argument("--older-than", required=True, type=_positive, metavar="SECONDS")
    s.set_defaults(func=cmd_purge)

    s = sub.add_parser("schedules", help="list cron / every schedules", description="List the schedules.")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_schedules)

    s = sub.add_parser("doctor", help="find (and --repair) jobs in impossible states",
                       description="Find jobs in impossible states: in two structures, processing without "
                                   "a lease, a hash without an index entry or an entry without a hash, an "
                                   "unknown state, and state counts that drifted. Exit 1 when it finds any. "
                                   "Uses SCAN: meant for operators, not for a hot path.")
    s.add_argument("--repair", action="store_true",
                   help="mend what it finds, one atomic script per fix; exit 0 when nothing remains")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format == "json":  # text: Python's default, warnings and above as bare lines
        logformat.setup(logging.WARNING, "json", role="admin")
    settings = current()
    try:
        settings.update(validate_settings({"redis_url": args.redis_url,
                                                   "redis_namespace": args.redis_namespace}))
    except ConfigError as exc:
        parser.error(str(exc))
    command_parser: Callable[[str], Any] = lambda message: parser.exit(  # noqa: E731
        EXIT_USAGE, f"{parser.prog} {args.command}: error: {message}\n")
    admin = None
    try:
        with redis_errors(settings):
            admin = Admin(settings)
            code = int(args.func(admin, args, out))
            out.flush()  # here, so that a reader gone away is met below, not at exit
            return code
    except UsageError as exc:
        command_parser(str(exc))
        return EXIT_USAGE
    except Failed as exc:
        print(f"kickq: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (KickqError, redis.exceptions.RedisError) as exc:
        print(f"kickq: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kickq stats | head`): stop quietly, as shell tools do. Python
        # would fail again flushing stdout at exit, so stdout goes nowhere from here on.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        if admin is not None:
            admin.close()


if __name__ == "__main__":
    raise SystemExit(main())
