"""Redis Sentinel failovers under load (case 14), on a private setup of 1 master, 2 replicas and
3 sentinels (tests/sentinel_topology.py; down-after 1000 ms): the master SIGKILLed (14a) and a planned
SENTINEL FAILOVER (14b), each with wait_replicas 0 and 1; hotjob waiters across a kill (14c); an
`every` schedule across a kill (14d); no master at all for a while (14e). Real supervisors and
producers on the redis+sentinel:// URL; the checks read the master through redis-py's own Sentinel
client (harness.sentinel_client)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

import kickq
from kickq.job import TERMINAL_STATES
from kickq.keys import Keys
from tests.faults.harness import (
    Case,
    Execution,
    Ledger,
    LedgerWatcher,
    Monitor,
    Outcomes,
    Producer,
    ProducerProcess,
    cpu_seconds,
    handler_module,
    log_lines_by_pid,
    outcomes,
    purge_and_find_strays,
    sentinel_client,
    sizes,
    supervisor_pids,
    wait_settled,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.sentinel

RATE = 300  # creates per second
#: A log record about Redis lost or back (kickq.backoff.Outage's, "the master changed" included).
OUTAGE_RECORD = r"Redis (?:unavailable|is back)"
OPTS = {"process_timeout": 5, "ghost_interval": 0}
SETTLE_TIMEOUT = 60.0
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def supervisor_args(wait_replicas: int) -> list[str]:
    args = ["--reaper-interval", "0.2"]
    return args + (["--wait-replicas", str(wait_replicas)] if wait_replicas else [])


def client(url: str, ns: str, wait_replicas: int = 0, timeout: float = 5) -> kickq.Kickq:
    extra = {"wait_replicas": wait_replicas} if wait_replicas else {}
    return kickq.Kickq(redis_url=url, redis_namespace=ns, redis_timeout=timeout, **extra)


def first_ack_after(producer: Producer | ProducerProcess, moment: float, timeout: float) -> float:
    """Seconds from `moment` until the first create called after it returned a job."""
    refs = wait_until(lambda: producer.sent_after(moment), timeout=timeout, interval=0.01,
                      message="a create called after the fault is acknowledged")
    return producer.acked_at[refs[0]] - moment


def first_run_after(watcher: LedgerWatcher, producer: Producer | ProducerProcess, moment: float,
                    timeout: float) -> float:
    """Seconds from `moment` until a worker first ran a job created after it."""
    at: float = wait_until(lambda: watcher.first_run_after(producer.sent_after(moment)) or 0.0,
                           timeout=timeout, interval=0.02, message="a job created after the fault runs")
    return at - moment


def first_kept_ack_after(producer: Producer, by_ref: dict[str, Any], moment: float) -> float | None:
    """Seconds from `moment` until the first create called after it, whose job ran, returned."""
    kept = [ref for ref in producer.sent_after(moment) if ref in by_ref]
    return producer.acked_at[kept[0]] - moment if kept else None


def settle(r: redis.Redis, ns: str, ids: list[str]) -> tuple[float | None, str]:
    """(seconds until every job is terminal and nothing runs or waits, None if not within
    SETTLE_TIMEOUT), and what was left then."""
    try:
        return wait_settled(r, ns, ids, timeout=SETTLE_TIMEOUT), ""
    except AssertionError as exc:
        return None, str(exc)


@dataclass
class Fates:
    """Each acknowledged create, by its ref, from the ledger and the job the final master has under
    its id. A create is lost if the master that acknowledged it lost it with its write: its job
    never ran, or it ran there but the final master has no record of it (no job under its id, or
    another one: the new master hands out again the ids of the writes it did not get)."""

    never_ran: list[str]  # no execution in the ledger
    record_lost: list[str]  # ran, but the final master has no job of this ref under its id
    id_reused: list[str]  # its id names another job (never ran or ran)
    stranded: list[str]  # its job is there and not terminal
    failed: list[str]  # its job ended in fail

    @property
    def lost(self) -> list[str]:
        return self.never_ran + self.record_lost


def fates(out: Outcomes, acked: dict[str, str]) -> Fates:
    never_ran, record_lost, id_reused, stranded, failed = [], [], [], [], []
    for ref in acked:
        job = out.final.get(ref)
        own = job is not None and isinstance(job.data, dict) and job.data.get("ref") == ref
        if ref not in out.by_ref:  # even if its job says success: a run of another job's was saved on it
            never_ran.append(ref)
        elif not own:
            record_lost.append(ref)
        if job is not None and not own:
            id_reused.append(ref)
        elif job is not None and job.state not in TERMINAL_STATES:
            stranded.append(ref)
        elif job is not None and job.state == "fail":
            failed.append(ref)
    return Fates(never_ran, record_lost, id_reused, stranded, failed)


HISTORY = re.compile(r"^(?:final: )?job (\S+): (?:terminal .* changed|attempt went back)")
#: "job 7: terminal ('success', 1, '1796697806970') changed to ('success', 1, '1796697806971')"
TERMINAL_CHANGE = re.compile(r"terminal \('(\w+)', (\d+), '\d*'\) changed to \('(\w+)', (\d+), '\d*'\)")


def saved_again(found: str) -> bool:
    """A terminal record that changed only in its time: the same outcome of the same attempt, saved
    again on the new master by a worker whose save the old master did not get confirmed (its
    attempt token makes the repeat the one record of that run)."""
    m = TERMINAL_CHANGE.search(found)
    return bool(m) and m.group(1) == m.group(3) and m.group(2) == m.group(4)


def end_case(case: Case, pids: set[int], alive_now: set[int], monitor: Monitor, strays: list[str],
             split: set[str] = frozenset()) -> None:
    """The checks every case ends with, then the report. A job id in `split` was written by the old
    master alone after the promotion began (the new master handed the id out again, or ran the job
    again after losing its end): it names one job on one master and another on the other, and the
    monitor, which follows the master, sees its terminal state change. Such changes are counted
    apart; so is a terminal record saved again (saved_again). The invariants must hold in every
    snapshot, and no other history may change. A job's attempt may go back for any id: the new
    master has the job as replicated, and a claim the old master made last and did not replicate
    (claims do not wait for replicas) is undone with it; the job is then claimed again from its
    replicated state."""
    history = [f for f in monitor.found
               if (m := HISTORY.match(f)) and (m.group(1) in split or "attempt went back" in f
                                               or saved_again(f))]
    case.check("invariants hold in every snapshot (a job in exactly one structure); a job's final state "
               "changes only for an id the old master wrote alone",
               len(history) == len(monitor.found), [f for f in monitor.found if f not in history][:5])
    if history:
        ids = {m.group(1) for m in map(HISTORY.match, history) if m}
        case.note(f"the monitor saw the history of {len(ids)} ids change as it moved to the new master "
                  f"(written by the old master alone, or a claim it did not replicate), e.g. {history[0]}")
    case.check(
        "no supervisor process exited or was replaced", alive_now == pids, f"{len(pids - alive_now)} gone"
    )
    case.check("no stray keys after purge", not strays, strays)
    case.done()


def seconds_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:+.3f}s" for v in values) + "]"


# --- 14a, 14b: the master killed, a planned failover -------------------------------------------------------


@dataclass
class FailoverRun:
    """What 14a and 14b measured: the producer and the ledger, and the failover's times (monotonic)."""

    began: float  # SIGKILL or SENTINEL FAILOVER sent
    promoted_at: float  # every sentinel names the new master and it says master
    demoted_at: float | None  # planned: the old master follows the new one
    in_flight: int  # jobs in processing when the fault began
    flow_back: float  # first create called after `began` acknowledged, seconds after `began`
    resumed: float  # first job created after `began` run by a worker, seconds after `began`
    settled: float | None
    settle_left: str
    processing_left: int
    producer: Producer
    out: Outcomes
    fates: Fates
    states: Counter[str]
    alive_now: set[int]
    pids: set[int]
    monitor: Monitor
    strays: list[str]
    old_master_writable: float | None
    events: dict[str, list[float]]  # Sentinel's steps (sentinel_events), monotonic
    first_promoted: Any  # the master Sentinel promoted first, when it failed over twice (else None)

    @property
    def failed_over_twice(self) -> bool:
        """Only the leading sentinel logs +failover-state-send-slaveof-noone, once per failover."""
        return (self.first_promoted is not None
                or len(self.events.get("+failover-state-send-slaveof-noone", [])) > 1)

    @property
    def last_switch(self) -> float:
        """When the last sentinel took up the last new master (+switch-master; else when the setup saw
        the promotion)."""
        return max(self.events.get("+switch-master", []), default=self.promoted_at)


#: The steps of a failover in Sentinel's log: the master is objectively down (each sentinel says so;
#: not for a planned failover), the leader sends the chosen replica REPLICAOF NO ONE, sees it say
#: master, sends the other replicas REPLICAOF the new master (and sees them resynchronised); each
#: sentinel then switches to the new master (the leader first, the others on its hello).
FAILOVER_STEPS = ("+odown", "+failover-state-send-slaveof-noone", "+promoted-slave", "+slave-reconf-sent",
                  "+slave-reconf-done", "+switch-master")
#: Steps every sentinel logs: shown as first..last.
EVERY_SENTINEL = ("+odown", "+switch-master")


def failover_under_load(kind: str, wait_replicas: int, load: float, setup: Any, ledger: Ledger,
                        start_supervisor: Any, ns: str, tmp_path: Path) -> FailoverRun:
    """`load` seconds of creates, the fault (`kill` or `planned`: each returns once the setup is
    settled), `load` seconds more, then everything settles."""
    r = sentinel_client(setup.url, timeout=3)
    module = handler_module(tmp_path, ledger.path, [(["work"], 2)])
    sup = start_supervisor(module, args=supervisor_args(wait_replicas), workers=2, url=setup.url, ns=ns)
    pids = supervisor_pids(sup)
    producer = Producer(client(setup.url, ns, wait_replicas), "work", RATE, data={"ms": 2}, opts=OPTS)
    with Monitor(setup.url, ns, interval=0.3) as monitor, LedgerWatcher(ledger) as watcher:
        producer.start()
        time.sleep(load)  # the load runs: the case's pace, nothing is awaited
        in_flight = r.zcard(Keys(ns).processing)
        if kind == "kill":
            setup.kill_master()
        else:
            setup.failover()
        times = setup.failovers[-1]
        began = time.monotonic() - times.settled_seconds
        flow_back = first_ack_after(producer, began, timeout=30)
        resumed = first_run_after(watcher, producer, began, timeout=30)
        time.sleep(load)  # the load runs on the new master: the case's pace
        producer.stop()
        settled, left = settle(r, ns, list(producer.acked.values()))
        processing_left = r.zcard(Keys(ns).processing)
        monitor.check_now("final: ")
    out = outcomes(r, ns, ledger, producer.acked, producer.failed)
    demoted = times.old_master_demoted_seconds
    run = FailoverRun(
        began=began,
        promoted_at=began + times.promoted_seconds,
        demoted_at=None if demoted is None else began + demoted,
        in_flight=in_flight,
        flow_back=flow_back,
        resumed=resumed,
        settled=settled,
        settle_left=left,
        processing_left=processing_left,
        producer=producer,
        out=out,
        fates=fates(out, producer.acked),
        states=Counter(job.state for job in out.final.values() if job),
        alive_now=supervisor_pids(sup),
        pids=pids,
        monitor=monitor,
        strays=purge_and_find_strays(r, ns, ["work"]),
        old_master_writable=times.old_master_writable_after_promotion_seconds,
        events=sentinel_events(setup, began, FAILOVER_STEPS),
        first_promoted=times.first_promoted,
    )
    r.close()
    return run


def split_ids(out: Outcomes, acked: dict[str, str], reused: list[str]) -> set[str]:
    """Ids the old master wrote alone: ids run for two refs (the ledger) or handed out again (`reused`
    refs), and the ids of jobs run twice."""
    refs_of: dict[str, set[str]] = defaultdict(set)
    for ref, runs in out.by_ref.items():
        for execution in runs:
            refs_of[execution.job_id].add(ref)
    twice = {job_id for job_id, refs in refs_of.items() if len(refs) > 1}
    return twice | {acked[ref] for ref in set(reused) | set(out.duplicated) if ref in acked}


#: Sentinel's log line: "<pid>:X 08 Dec 2026 02:20:30.610 * +failover-state-send-slaveof-noone ..."
SENTINEL_EVENT = re.compile(r"^\d+:X (\d\d \w{3} \d{4} \d\d:\d\d:\d\d\.\d{3}) [*#\-.] ([+-][\w-]+) ")


def sentinel_events(setup: Any, since: float, names: tuple[str, ...]) -> dict[str, list[float]]:
    """When the sentinels logged each of `names` at or after `since` (both time.monotonic()), every
    line of every sentinel, in order: from their log files, whose times are the local wall clock to
    the millisecond."""
    from datetime import datetime

    to_monotonic = time.monotonic() - time.time()
    seen: dict[str, list[float]] = defaultdict(list)
    for sentinel in setup.sentinels:
        try:
            text = sentinel.logfile.read_text(errors="replace")
        except OSError:
            continue
        for m in map(SENTINEL_EVENT.match, text.splitlines()):
            if m and m.group(2) in names:
                at = datetime.strptime(m.group(1), "%d %b %Y %H:%M:%S.%f").timestamp() + to_monotonic
                if at >= since - 0.01:
                    seen[m.group(2)].append(at)
    return {name: sorted(times) for name, times in seen.items()}


def describe_steps(events: dict[str, list[float]], began: float) -> str:
    parts = []
    for name, times in events.items():
        if name in EVERY_SENTINEL:
            parts.append((times[0], f"{name} {times[0] - began:.3f}..{times[-1] - began:.3f}"))
        else:
            parts += [(at, f"{name} {at - began:.3f}") for at in times]
    return ", ".join(text for _, text in sorted(parts))


def describe(run: FailoverRun, case: Case) -> list[float]:
    """Notes of the figures 14a and 14b share; returns when each lost create was acknowledged,
    relative to the promotion."""
    p = run.producer
    lost_at = [p.acked_at[ref] - run.promoted_at for ref in run.fates.lost]
    reused_at = [p.acked_at[ref] - run.promoted_at for ref in run.fates.id_reused]
    case.note(run.out.line())
    case.note(
        f"promoted {run.promoted_at - run.began:.2f}s after the fault began"
        + (f", old master demoted {run.demoted_at - run.began:.2f}s after it (writable "
           f"{run.old_master_writable:.2f}s after the promotion)" if run.demoted_at is not None else "")
        + f"; first create called after it acknowledged {run.flow_back:.2f}s after it, the first whose "
        f"job ran {_fmt(first_kept_ack_after(p, run.out.by_ref, run.began))}; first job created after it "
        f"run {run.resumed:.2f}s after it; longest create {p.longest:.2f}s; producer errors "
        f"{dict(p.errors)}"
    )
    case.note("Sentinel's steps, seconds after the fault began: " + describe_steps(run.events, run.began)
              + ("; Sentinel FAILED OVER TWICE" + (f" (first to {run.first_promoted})"
                                                    if run.first_promoted is not None else "")
                 if run.failed_over_twice else ""))
    noone = min(run.events.get("+failover-state-send-slaveof-noone", []), default=None)
    reconf = min(run.events.get("+slave-reconf-sent", []), default=None)
    if lost_at and noone is not None and reconf is not None:
        lost_acks = [p.acked_at[ref] for ref in run.fates.lost]
        inside = sum(1 for at in lost_acks if noone <= at <= reconf)
        case.note(f"the lost creates were acknowledged {min(lost_acks) - noone:+.3f}s.."
                  f"{max(lost_acks) - noone:+.3f}s after the promoted replica was sent REPLICAOF NO ONE, "
                  f"{max(lost_acks) - reconf:+.3f}s at the latest after the other replica was sent REPLICAOF "
                  f"the new master; {inside} of {len(lost_acks)} between the two")
    case.note(
        f"acknowledged {len(p.acked)}, lost {len(run.fates.lost)} (never ran {len(run.fates.never_ran)}"
        f", ran but the final master has no record {len(run.fates.record_lost)})"
        + (f" {sorted(run.fates.lost, key=_ref_order)[:6]}..., acknowledged {min(lost_at):+.3f}s.."
           f"{max(lost_at):+.3f}s relative to the promotion" if lost_at else "")
        + f"; id handed out again {len(run.fates.id_reused)}"
        + (f" (acknowledged {min(reused_at):+.2f}s..{max(reused_at):+.2f}s relative to the promotion)"
           if reused_at else "")
        + f"; in processing when the fault began "
        f"{run.in_flight}; final states {dict(run.states)}; "
        + (f"settled {run.settled:.2f}s after the load" if run.settled is not None
           else f"NOT settled within {SETTLE_TIMEOUT:g}s ({run.settle_left})")
        + f"; {run.monitor.checker.snapshots} snapshots ({run.monitor.skipped} skipped without a master)"
    )
    return lost_at


def _fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f}s"


def _ref_order(ref: str) -> int:
    return int(ref.lstrip("p") or 0)


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["wait0", "wait1"])
@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case14a_the_master_killed_under_load(
    size, wait_replicas, make_sentinel, ledger, start_supervisor, namespace, tmp_path
):
    load = 1.5 if size == "quick" else 5.0
    case = Case(
        "14a",
        f"the master SIGKILLed under load; Sentinel promotes a replica (wait_replicas={wait_replicas})",
        f"{RATE} creates/s, {load:g}s before the kill and {load:g}s after the setup settled; 2 workers; "
        f"producer and supervisor wait_replicas {wait_replicas}; down-after 1000 ms",
    )
    setup = make_sentinel()
    run = failover_under_load("kill", wait_replicas, load, setup, ledger, start_supervisor, namespace,
                              tmp_path)
    describe(run, case)
    killed = run.began
    lost_acks = [run.producer.acked_at[ref] for ref in run.fates.lost]
    in_last_second = sum(1 for at in run.producer.acked_at.values() if killed - 1 <= at <= killed)
    if wait_replicas:
        case.check("no acknowledged create lost (each ran, and the new master has its job)",
                   not run.fates.lost, f"{len(run.fates.never_ran)} never ran, "
                   f"{len(run.fates.record_lost)} ran without a record")
    else:
        # The replication window: the last second before the kill; if Sentinel failed over twice, also
        # the time the first promoted master served, until the clients follow the last one (they ask
        # the sentinels every second).
        end = run.last_switch + 1.5 if run.failed_over_twice else killed + 0.05
        case.check(
            "a lost acknowledgement is one of the replication window only: acknowledged < 1 s before the "
            "kill (or, Sentinel failing over twice, before its last switch + 1.5 s)",
            all(killed - 1 <= at <= end for at in lost_acks),
            f"{len(lost_acks)} lost, acknowledged "
            + (f"{min(lost_acks) - killed:+.3f}s..{max(lost_acks) - killed:+.3f}s after the kill (window "
               f"-1s..{end - killed:+.3f}s)" if lost_acks else "-"),
        )
    case.check(
        "every job that exists ends (settled, stranded = 0); none failed",
        run.settled is not None and not run.fates.stranded and not run.fates.failed,
        f"{_fmt(run.settled)}, {len(run.fates.stranded)}, {len(run.fates.failed)}",
    )
    case.check("unexpected = 0", not run.out.unexpected, len(run.out.unexpected))
    case.check(
        "duplicated executions <= jobs in processing at the kill + jobs acknowledged in its last second",
        run.out.extra <= run.in_flight + in_last_second,
        f"{run.out.extra} <= {run.in_flight} + {in_last_second}",
    )
    promotion = run.promoted_at - killed
    case.check(
        "producers and supervisors carry on without restart: creates acknowledged and jobs run within "
        "3 s of the promotion",
        run.flow_back <= promotion + 3 and run.resumed <= promotion + 3,
        f"{run.flow_back:.2f}s, {run.resumed:.2f}s",
    )
    end_case(case, run.pids, run.alive_now, run.monitor, run.strays,
             split_ids(run.out, run.producer.acked, run.fates.id_reused))


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["wait0", "wait1"])
@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case14b_a_planned_failover_under_load(
    size, wait_replicas, make_sentinel, ledger, start_supervisor, namespace, tmp_path
):
    load = 1.5 if size == "quick" else 5.0
    case = Case(
        "14b",
        f"a planned SENTINEL FAILOVER under load (wait_replicas={wait_replicas})",
        f"{RATE} creates/s, {load:g}s before the failover and {load:g}s after the old master follows the "
        f"new one; 2 workers; producer and supervisor wait_replicas {wait_replicas}",
    )
    setup = make_sentinel()
    run = failover_under_load("planned", wait_replicas, load, setup, ledger, start_supervisor, namespace,
                              tmp_path)
    lost_at = describe(run, case)
    assert run.demoted_at is not None
    demoted = run.demoted_at - run.promoted_at
    if wait_replicas:
        case.check("no acknowledged create lost (each ran, and the new master has its job)",
                   not run.fates.lost, f"{len(run.fates.never_ran)} never ran, "
                   f"{len(run.fates.record_lost)} ran without a record; acknowledged "
                   + (f"{min(lost_at):+.3f}s..{max(lost_at):+.3f}s relative to the promotion"
                      if lost_at else "-"))
    else:
        case.check(
            "a lost acknowledgement is one of the switch: acknowledged between 1 s before the SENTINEL "
            "FAILOVER and the old master's demotion",
            all(run.began - 1 - run.promoted_at <= at <= demoted for at in lost_at),
            f"{seconds_list(sorted(lost_at))[:200]} (window {run.began - 1 - run.promoted_at:+.2f}s.."
            f"{demoted:+.2f}s)",
        )
    case.check(
        "every job that exists ends: settled, none left in processing, stranded = 0, none failed",
        run.settled is not None and run.processing_left == 0 and not run.fates.stranded
        and not run.fates.failed,
        f"{_fmt(run.settled)}, {run.processing_left} processing, {len(run.fates.stranded)}, "
        f"{len(run.fates.failed)}",
    )
    case.check("unexpected = 0", not run.out.unexpected, len(run.out.unexpected))
    # A job run twice was run once on each master: created (or claimed) no later than the demotion.
    late = [ref for ref in run.out.duplicated if run.producer.sent_at[ref] > run.demoted_at + 1]
    case.check(
        "a duplicated execution is one of the switch: its create called before the old master's "
        "demotion (+1 s)",
        not late, f"{len(run.out.duplicated)} duplicated, {len(late)} created later",
    )
    case.check(
        "producers and supervisors carry on without restart: creates acknowledged and jobs run within "
        "3 s of the old master's demotion",
        run.flow_back <= run.demoted_at - run.began + 3 and run.resumed <= run.demoted_at - run.began + 3,
        f"{run.flow_back:.2f}s, {run.resumed:.2f}s",
    )
    end_case(case, run.pids, run.alive_now, run.monitor, run.strays,
             split_ids(run.out, run.producer.acked, run.fates.id_reused))


# --- 14c: hotjob waiters ------------------------------------------------------------------------------------


class HotjobLoad(threading.Thread):
    """Creates hotjobs at `rate` per second until stopped and notes when each one settles: its
    result, a KickqError of the create or of the wait, or nothing yet (a waiter that hangs)."""

    def __init__(self, kq: kickq.Kickq, rate: float, timeout: float) -> None:
        super().__init__(name="hotjob-load", daemon=True)
        self.kq, self.rate, self.opts = kq, rate, {"hotjob": True, "hotjob_timeout": timeout}
        self.started: dict[str, float] = {}  # ref -> when its create was called
        self.settled: dict[str, float] = {}  # ref -> when its create raised or its wait ended
        self.outcome: dict[str, str] = {}  # ref -> "result", "wrong result", "create: <Error>" or "<Error>"
        self.promises: list[tuple[str, Any]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def _note(self, ref: str, outcome: str) -> None:
        with self._lock:
            self.settled.setdefault(ref, time.monotonic())
            self.outcome.setdefault(ref, outcome)

    def _done(self, ref: str, future: Any) -> None:
        error = future.exception()  # settled already: no wait
        if error is None:
            self._note(ref, "result" if future.result().result == ref else "wrong result")
        else:
            self._note(ref, type(error).__name__ if isinstance(error, kickq.KickqError)
                       else f"not a KickqError: {type(error).__name__}")

    def run(self) -> None:
        i, next_at = 0, time.monotonic()
        while not self.stopping.is_set():
            ref = f"h{i}"
            i += 1
            self.started[ref] = time.monotonic()
            try:
                job = self.kq.create("hot", {"ref": ref, "do": "echo"}, self.opts)
            except kickq.KickqError as exc:
                self._note(ref, f"create: {type(exc).__name__}")
            else:
                assert job is not None  # a hotjob's create returns its job
                self.promises.append((ref, job.hotjob_promise))
                job.hotjob_promise.add_done_callback(lambda future, ref=ref: self._done(ref, future))
            next_at += 1 / self.rate
            if next_at > time.monotonic():
                self.stopping.wait(next_at - time.monotonic())  # the load's pace
            else:
                next_at = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the hotjob producer hangs"

    def wait_all(self, limit: float) -> None:
        """Wait on each promise in turn (the waiting thread reads the subscription) until it settles
        or `limit` seconds after its create was called."""
        for ref, promise in list(self.promises):
            left = self.started[ref] + limit - time.monotonic()
            try:
                promise.exception(timeout=max(0.0, left))
            except Exception:  # noqa: BLE001 - a wait that outlives `limit`: counted as a hang below
                pass

    def waits(self) -> dict[str, float]:
        return {ref: self.settled[ref] - self.started[ref] for ref in list(self.settled)}


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case14c_hotjob_waiters_across_a_failover(size, make_sentinel, ledger, start_supervisor, namespace,
                                                 tmp_path):
    quick = size == "quick"
    rate, before, after, timeout, margin = (20, 1.5, 1.0, 10, 1.0) if quick else (50, 5.0, 5.0, 10, 1.0)
    case = Case(
        "14c",
        "hotjob waiters across a failover (the master SIGKILLed)",
        f"hotjobs (hotjob_timeout {timeout}s) created at {rate}/s from {before:g}s before the kill until "
        f"{after:g}s after the setup settled; a supervisor's 2 workers return their ref",
    )
    setup = make_sentinel()
    module = handler_module(tmp_path, ledger.path, [(["hot"], 2)])
    sup = start_supervisor(module, args=supervisor_args(0), workers=2, url=setup.url, ns=namespace)
    pids = supervisor_pids(sup)
    kq = client(setup.url, namespace)
    load = HotjobLoad(kq, rate, timeout)
    with Monitor(setup.url, namespace, interval=0.3) as monitor:
        load.start()
        time.sleep(before)  # the load runs: the case's pace, nothing is awaited
        setup.kill_master()
        times = setup.failovers[-1]
        killed = time.monotonic() - times.settled_seconds
        time.sleep(after)  # the load runs on the new master: the case's pace
        load.stop()
        load.wait_all(timeout + margin)
        r = sentinel_client(setup.url, timeout=3)
        settled, left = settle(r, namespace, [])
        monitor.check_now("final: ")
    kq.close()
    waits = load.waits()
    hung = [ref for ref in load.started if ref not in load.settled]
    slow = [ref for ref, wait in waits.items() if wait > timeout + margin]
    outcomes_seen = Counter(load.outcome.values())
    settled_at = killed + times.settled_seconds
    around = [ref for ref in load.started if killed - 1 <= load.started[ref] <= settled_at]
    longest = max(waits.values(), default=0.0)
    longest_result = max((waits[ref] for ref, o in load.outcome.items() if o == "result"), default=0.0)
    executions = ledger.read()
    alive_now = supervisor_pids(sup)
    strays = purge_and_find_strays(r, namespace, ["hot"])
    r.close()
    case.note(
        ("Sentinel FAILED OVER TWICE; " if times.first_promoted is not None else "")
        + f"{len(load.started)} hotjobs, {len(around)} created from 1 s before the kill until the setup "
        f"settled ({times.settled_seconds:.2f}s after it; promoted after {times.promoted_seconds:.2f}s); "
        f"outcomes {dict(outcomes_seen)}; longest wait {longest:.2f}s (longest that got its result "
        f"{longest_result:.2f}s); executions {len(executions)}; "
        + (f"settled {settled:.2f}s after the waits" if settled is not None else f"NOT settled ({left})")
    )
    case.check(
        f"every waiter gets its result or a KickqError within hotjob_timeout + {margin:g}s; none hangs",
        not hung and not slow and not any(o.startswith("not a KickqError") for o in outcomes_seen),
        f"{len(hung)} hang, {len(slow)} slower, longest {longest:.2f}s",
    )
    case.check("every result is the job's own", not outcomes_seen.get("wrong result"),
               outcomes_seen.get("wrong result", 0))
    case.check(
        "hotjobs created over 1 s before the kill or after the setup settled get their results",
        all(load.outcome.get(ref) == "result" for ref in load.started
            if load.started[ref] < killed - 1 or load.started[ref] > settled_at),
        {ref: load.outcome.get(ref) for ref in load.started
         if (load.started[ref] < killed - 1 or load.started[ref] > settled_at)
         and load.outcome.get(ref) != "result"},
    )
    case.check("settled: nothing left running or waiting", settled is not None, left)
    end_case(case, pids, alive_now, monitor, strays)


# --- 14d: cron ---------------------------------------------------------------------------------------------


def tick_module(directory: Path, ledger: Path) -> Path:
    """A handler module whose ledger line names the tick a job is for (epoch ms, `job.tick`)."""
    path = Path(directory) / "tick_handlers.py"
    path.write_text(
        "import kickq\n"
        "from tests.faults import handlers\n"
        f"handlers.LEDGER = {str(ledger)!r}\n"
        "kq = kickq.Kickq()\n\n\n"
        "def tick(job, data):\n"
        "    return handlers.work(job, {**(data or {}), 'ref': 'tick' + str(job.tick)})\n\n\n"
        "kq.process(['tick'], {'concurrent_jobs': 2}, tick)\n"
    )
    return path


@pytest.mark.parametrize("size", sizes("quick", "full"))
def test_case14d_a_schedule_across_a_failover(size, make_sentinel, ledger, start_supervisor, namespace,
                                             tmp_path):
    every, before, after = (0.5, 3.0, 3.0) if size == "quick" else (0.5, 10.0, 10.0)
    every_ms = int(every * 1000)
    case = Case(
        "14d",
        "an `every` schedule (catch_up all) across a failover (the master SIGKILLed)",
        f"every {every:g}s; {before:g}s before the kill, {after:g}s after the setup settled; a supervisor "
        "(reaper interval 0.2 s) runs the ticks with 2 workers",
    )
    setup = make_sentinel()
    module = tick_module(tmp_path, ledger.path)
    sup = start_supervisor(module, args=supervisor_args(0), workers=2, url=setup.url, ns=namespace)
    pids = supervisor_pids(sup)
    kq = client(setup.url, namespace)
    r = sentinel_client(setup.url, timeout=3)
    keys = Keys(namespace)
    with Monitor(setup.url, namespace, interval=0.3) as monitor, LedgerWatcher(ledger) as watcher:
        kq.schedule("tick", every=every, catch_up="all", data={"ms": 1})
        time.sleep(before)  # the schedule runs: the case's pace
        killed_wall = time.time()
        setup.kill_master()
        times = setup.failovers[-1]
        time.sleep(after)  # the schedule runs on the new master: the case's pace
        wait_until(lambda: kq.unschedule("tick"), timeout=10, message="the schedule is removed")

        def idle() -> bool:
            try:
                return not (r.llen(keys.queue("tick")) or r.hlen(keys.new_jobs) or r.zcard(keys.processing)
                            or r.zcard(keys.delayed))
            except REDIS_ERRORS:
                return False

        wait_until(idle, timeout=SETTLE_TIMEOUT, interval=0.1, message="every tick job ran")
        monitor.check_now("final: ")
    kq.close()
    runs: dict[int, list[Execution]] = defaultdict(list)
    for execution in ledger.read():
        runs[int(execution.ref[len("tick"):])].append(execution)
    ticks = sorted(runs)
    expected = set(range(ticks[0], ticks[-1] + 1, every_ms)) if ticks else set()
    skipped = sorted(expected - set(ticks))
    off_grid = sorted(set(ticks) - expected)
    twice = {tick: [(e.job_id, e.attempt) for e in execs] for tick, execs in runs.items() if len(execs) > 1}
    kill_ms = int(killed_wall * 1000)
    missed = [t for t in ticks if kill_ms <= t <= kill_ms + times.promoted_seconds * 1000]
    wall = time.time() - time.monotonic()
    # how late each tick first ran: the watcher's monotonic time on the wall clock, against the tick
    late = {t: watcher.first_run[f"tick{t}"] + wall - t / 1000
            for t in ticks if f"tick{t}" in watcher.first_run}
    usual = sorted(v for t, v in late.items() if t not in missed)
    alive_now = supervisor_pids(sup)
    strays = purge_and_find_strays(r, namespace, ["tick"])
    r.close()
    case.note(
        ("Sentinel FAILED OVER TWICE; " if times.first_promoted is not None else "")
        + f"{len(ticks)} ticks run ({len(missed)} of them due between the kill and the promotion, "
        f"{times.promoted_seconds:.2f}s later, ran {max((late.get(t, 0) for t in missed), default=0):.2f}s "
        f"late at most; the others ran {usual[len(usual) // 2] if usual else 0:.2f}s late (median), "
        f"{max(usual, default=0):.2f}s at most); executions {sum(len(e) for e in runs.values())}; ticks run "
        f"more than once {twice}; skipped {skipped[:10]}"
    )
    case.check("ticks ran on both masters (before the kill and after the promotion)",
               bool(ticks) and ticks[0] < kill_ms and ticks[-1] > kill_ms + times.settled_seconds * 1000,
               f"{len(ticks)} ticks")
    case.check("no tick fires twice: each tick runs once", not twice, twice)
    case.check("no tick between the first and the last is skipped", not skipped and not off_grid,
               f"skipped {skipped[:10]}, off the grid {off_grid[:10]}")
    end_case(case, pids, alive_now, monitor, strays)


# --- 14e: no master -------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", sizes(6.0, 20.0))
@pytest.mark.timeout(180)
def test_case14e_no_master_for_a_while(outage, make_sentinel, ledger, start_supervisor, namespace, tmp_path):
    rate, before, after = 50, 2.5, 3.0
    case = Case(
        "14e",
        f"no master for {outage:g}s (every data node SIGSTOPped), then SIGCONT",
        f"a producer process at {rate} creates/s (redis_timeout 5 s), a supervisor with 2 workers; "
        f"{before:g}s of load before, {after:g}s after the flow is back",
    )
    setup = make_sentinel()
    module = handler_module(tmp_path, ledger.path, [(["work"], 2)])
    sup = start_supervisor(module, args=supervisor_args(0), workers=2, url=setup.url, ns=namespace)
    pids = supervisor_pids(sup)
    master_before = setup.master()
    producer = ProducerProcess(tmp_path, "work", rate, {"redis_url": setup.url, "redis_namespace": namespace,
                                                        "redis_timeout": 5}, data={"ms": 2}, opts=OPTS)
    with producer, Monitor(setup.url, namespace, interval=0.5) as monitor, LedgerWatcher(ledger) as watcher:
        time.sleep(before)  # the load runs: the case's pace
        assert producer.process is not None
        procs = {"supervisor": sup.master(), "reaper": sup.reapers()[0], "producer": producer.process}
        procs.update({f"worker {n}": p for n, p in sup.workers().items()})
        cpu_before = {name: cpu_seconds([p]) for name, p in procs.items()}
        log_mark, producer_log_mark = len(sup.log()), len(producer.log())
        monitor.pause()
        setup.freeze_all_data_nodes()
        frozen = time.monotonic()
        time.sleep(outage)  # no master: the fault
        busy = {name: (cpu_seconds([p]) - cpu_before[name]) / (time.monotonic() - frozen)
                for name, p in procs.items()}
        setup.thaw_all_data_nodes()
        thawed = time.monotonic()
        flow_back = first_ack_after(producer, thawed, timeout=30)
        resumed = first_run_after(watcher, producer, thawed, timeout=30)
        time.sleep(after)  # the load runs again: the case's pace
        producer.stop()
        master_after = setup.wait_settled()
        monitor.resume()
        r = sentinel_client(setup.url, timeout=3)
        settled, left = settle(r, namespace, list(producer.acked.values()))
        monitor.check_now("final: ")
    out = outcomes(r, namespace, ledger, producer.acked, producer.failed)
    fate = fates(out, producer.acked)
    pid_names = {p.pid: name for name, p in procs.items()}
    logs = sup.log()[log_mark:] + producer.log()[producer_log_mark:]
    lines = log_lines_by_pid(logs, OUTAGE_RECORD)
    per_process = {name: lines.get(pid, 0) for pid, name in pid_names.items()}
    others = {pid: n for pid, n in lines.items() if pid not in pid_names}
    other_records = {pid_names.get(pid, pid): n for pid, n in (log_lines_by_pid(logs) - lines).items()}
    lost_acks = [producer.acked_at[ref] - thawed for ref in fate.lost]
    during = [(took, ok) for at, took, ok in producer.calls if frozen <= at and at + took <= thawed]
    failed_over = master_after is not master_before
    alive_now = supervisor_pids(sup)
    strays = purge_and_find_strays(r, namespace, ["work"])
    r.close()
    case.note(out.line())
    case.note(
        "CPU during the outage (share of a core): "
        + ", ".join(f"{name} {share:.1%}" for name, share in busy.items())
        + f"; records of a lost or returning Redis from the freeze to the end: {per_process}"
        + (f", other processes {others}" if others else "")
        + f"; other records {other_records}"
    )
    case.note(
        f"producer calls during the outage {len(during)} (acknowledged {sum(ok for _, ok in during)}), "
        f"errors {dict(producer.errors)}, longest {producer.longest:.2f}s; after SIGCONT the first create "
        f"called was acknowledged {flow_back:.2f}s and the first job created ran {resumed:.2f}s later; "
        + ("Sentinel failed over after the thaw" if failed_over else "Sentinel kept the master")
        + f"; acknowledged creates lost {len(fate.lost)} (never ran {len(fate.never_ran)})"
        + (f", acknowledged {min(lost_acks):+.2f}s..{max(lost_acks):+.2f}s after SIGCONT"
           if lost_acks else "")
        + "; "
        + (f"settled {settled:.2f}s after the load" if settled is not None else f"NOT settled ({left})")
    )
    case.check("nothing spins without a master: each process uses < 5 % of a core",
               all(share < 0.05 for share in busy.values()),
               ", ".join(f"{name} {share:.1%}" for name, share in busy.items()))
    # Each process logs a lost Redis once and its return once; a failover after the thaw is a second
    # change of master, which a process may log the same way. (Other records, such as a finish
    # rejected because the job moved on meanwhile, are about jobs, not the outage.)
    bound = 2 * (1 + failed_over)
    case.check(f"each process logs the outage a bounded number of times (<= {bound} records from the "
               "freeze on: Redis lost, Redis back"
               + (", for each of the two masters)" if failed_over else ")"),
               all(n <= bound for n in list(per_process.values()) + list(others.values())),
               per_process)
    case.check("no producer call hangs: each returns within redis_timeout + 1 s",
               producer.longest <= 6, f"{producer.longest:.2f}s")
    case.check("throughput back within 5 s of SIGCONT: a create acknowledged and a new job run",
               flow_back <= 5 and resumed <= 5, f"{flow_back:.2f}s, {resumed:.2f}s")
    case.check("every job that exists ends (settled, stranded = 0); none failed",
               settled is not None and not fate.stranded and not fate.failed,
               f"{_fmt(settled)}, {len(fate.stranded)}, {len(fate.failed)}")
    case.check("unexpected = 0", not out.unexpected, len(out.unexpected))
    case.check("an acknowledged create is lost only if Sentinel failed over after the thaw, and was "
               "acknowledged after it (by the thawed old master)",
               not lost_acks or (failed_over and min(lost_acks) >= 0),
               f"{len(lost_acks)} lost" + (f", {min(lost_acks):+.2f}s..{max(lost_acks):+.2f}s after SIGCONT"
                                           if lost_acks else ""))
    end_case(case, pids, alive_now, monitor, strays)
