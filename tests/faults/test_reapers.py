"""Case 7: five reapers at once over due delayed jobs, orphaned runs and purge candidates that all
come due at the same instant. Each job must be acted on exactly once, and nothing else touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from kickq.keys import Keys
from kickq.scripts import LEASE_GRACE_MS, Scripts, create_args, claim_args, finish_args
from tests.faults.harness import Case, Monitor, sizes
from tests.helpers import subscribers, wait_until

REPO = Path(__file__).resolve().parents[2]
REAPERS = 5


def start_reapers(url, namespace, tmp_path, count, interval=0.1):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    procs = []
    for i in range(count):
        log = open(tmp_path / f"reaper-{i}.log", "wb")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "tests.faults.reaper_proc", url, namespace, str(interval)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env=env,
                    start_new_session=True,
                ),
                tmp_path / f"reaper-{i}.log",
            )
        )
        log.close()
    return procs


def stop_reapers(procs):
    for proc, _ in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def jobs_in_pipeline(r, scr, keys, items, now):
    """Create jobs with `now` moved by argument: items are (name, data, opts JSON, delay ms or None)."""
    pipe = r.pipeline(transaction=True)
    for start in range(0, len(items), 1000):
        scr.run("create", create_args(keys, items[start : start + 1000], now), client=pipe)
    return [str(reply[i]) for reply in pipe.execute() for i in range(0, len(reply), 2)]


@pytest.mark.parametrize("size", sizes((200, 50, 100), (2_000, 500, 1_000)))
def test_case07_five_reapers_at_once(size, redis_procs, namespace, tmp_path):
    due, orphans, purgeable = size
    case = Case(
        "7",
        "five reapers at once",
        f"{due} delayed jobs due at the same instant, {orphans} orphaned "
        f"runs whose leases expire then, {purgeable} finished jobs purgeable then; 200 of each kind not due",
    )
    rp = redis_procs()
    r = rp.client()
    keys, scr = Keys(namespace), Scripts(r)
    r.hset(keys.meta, "events_maxlen", 10_000_000)  # keep every event: they are the evidence
    reapers = start_reapers(rp.url, namespace, tmp_path, REAPERS)
    try:
        wait_until(
            lambda: subscribers(r, keys.reaper) == REAPERS,
            timeout=20,
            message="every reaper is up and listening",
        )
        with Monitor(rp.url, namespace, interval=0.25) as monitor:
            seconds, micros = r.time()
            now = int(seconds) * 1000 + int(micros) // 1000
            at = now + 3000  # everything comes due at this instant
            later = at + 3_600_000
            # due at `at`, and not due
            due_ids = jobs_in_pipeline(r, scr, keys, [("due", "", "", at - now)] * due, now)
            not_due = jobs_in_pipeline(r, scr, keys, [("due", "", "", later - now)] * 200, now)
            # orphans: claimed with `now` moved back so that their lease ends at `at`; live ones end later
            opts = json.dumps({"process_timeout": 1, "ghost_interval": 3600})
            orphan_ids = jobs_in_pipeline(r, scr, keys, [("orphan", "", opts, None)] * orphans, now)
            live_ids = jobs_in_pipeline(r, scr, keys, [("live", "", opts, None)] * 200, now)
            pipe = r.pipeline(transaction=True)
            for _ in orphan_ids:
                scr.run("claim", claim_args(keys, ["orphan"], at - 1000 - LEASE_GRACE_MS), client=pipe)
            for _ in live_ids:
                scr.run("claim", claim_args(keys, ["live"], later), client=pipe)
            claims = pipe.execute()
            # purge candidates: finished with purge time `at`; the others purge an hour later
            done_ids = jobs_in_pipeline(
                r, scr, keys, [("done", "", json.dumps({"purge_timeout": 1}), None)] * purgeable, now
            )
            kept_ids = jobs_in_pipeline(r, scr, keys, [("kept", "", "", None)] * 200, now)
            pipe = r.pipeline(transaction=True)
            for _ in done_ids:
                scr.run("claim", claim_args(keys, ["done"], at - 1000), client=pipe)
            for _ in kept_ids:
                scr.run("claim", claim_args(keys, ["kept"], now), client=pipe)
            tokens = [(str(c[0]), c[1]) for c in pipe.execute()]
            pipe = r.pipeline(transaction=True)
            for (job_id, token), when in zip(tokens, [at - 1000] * purgeable + [now] * 200, strict=True):
                scr.run("finish", finish_args(keys, job_id, token, "success", "", now=when), client=pipe)
            assert all(reply[0] == "ok" for reply in pipe.execute())
            assert [str(c[0]) for c in claims] == orphan_ids + live_ids
            last_setup_event = r.xrevrange(keys.events, count=1)[0][0]
            seconds, micros = r.time()
            assert int(seconds) * 1000 + int(micros) // 1000 < at, "the set-up took too long"

            def finished():
                return (
                    r.zcount(keys.delayed, "-inf", at) == 0
                    and r.zcount(keys.processing, "-inf", at) == 0
                    and r.zcount(keys.finished, "-inf", at) == 0
                )

            wait_until(finished, timeout=30, interval=0.01, message="every due item dealt with")
            seconds, micros = r.time()
            took_ms = int(seconds) * 1000 + int(micros) // 1000 - at
            monitor.check_now("final: ")
        events = defaultdict(Counter)
        for _, fields in r.xrange(keys.events, "(" + last_setup_event, "+"):  # what the reapers did
            events[fields["id"]][fields["event"]] += 1
        queue = Counter(r.lrange(keys.queue("due"), 0, -1))
        logs = [path.read_text() for _, path in reapers]
    finally:
        stop_reapers(reapers)
    acting = sum(1 for text in logs if "promoted" in text or "recovered" in text)

    def exactly(ids, event):
        return [job_id for job_id in ids if events[job_id] != Counter({event: 1})]

    promoted_wrong = exactly(due_ids, "queued") + [i for i in due_ids if queue[i] != 1]
    recovered_wrong = exactly(orphan_ids, "ghost")
    runs_wrong = [
        i
        for i in orphan_ids
        if [(run["state"], run["error"][:13]) for run in json.loads(r.hget(keys.job(i), "runs") or "[]")]
        != [("ghost", "lease expired")]
    ]
    purged_wrong = exactly(done_ids, "purge") + [i for i in done_ids if r.exists(keys.job(i))]
    untouched = not_due + live_ids + kept_ids
    touched = [i for i in untouched if events[i]]
    states = Counter(r.hget(keys.job(i), "state") for i in untouched)
    total = sum(sum(c.values()) for c in events.values())
    case.note(
        f"all dealt with {took_ms} ms after the instant; {total} transitions; reapers that acted: "
        f"{acting} of {REAPERS}; untouched states {dict(states)}"
    )
    case.check(
        f"each of the {due} due jobs promoted exactly once (one 'queued' event, once in its queue)",
        not promoted_wrong,
        promoted_wrong[:5],
    )
    case.check(
        f"each of the {orphans} orphans recovered exactly once (one 'ghost' event, one ghost run "
        "'lease expired')",
        not recovered_wrong and not runs_wrong,
        (recovered_wrong + runs_wrong)[:5],
    )
    case.check(
        f"each of the {purgeable} purge candidates deleted exactly once (one 'purge' event, hash gone)",
        not purged_wrong,
        purged_wrong[:5],
    )
    case.check(
        "nothing not yet due is touched (no event; delayed, processing and success stay)",
        not touched and states == {"delayed": 200, "processing": 200, "success": 200},
        touched[:5],
    )
    case.check(
        f"no other transition: {due + orphans + purgeable} in all", total == due + orphans + purgeable, total
    )
    case.check("all dealt with within 2 s of the instant", took_ms <= 2000, f"{took_ms} ms")
    case.check("invariants hold in every snapshot", not monitor.found, monitor.found[:5])
    case.done()
