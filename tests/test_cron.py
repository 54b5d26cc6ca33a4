"""Schedules: validation, the Lua tick machinery with time moved by argument, and the reaper's refill."""
from __future__ import annotations

import threading

import pytest

import kickq
from kickq import cron as cron_rules
from kickq.keys import Keys
from kickq.scripts import Scripts
from kickq_supervisor.reaper import refill_schedules
from tests.structures import assert_consistent, bookkeeping, namespace_keys


def pending(kq, sid):
    return next(s for s in kq.schedules() if s["id"] == sid)


def jobs_of(kq, name):
    r, keys = kq.redis, kq.keys()
    out = []
    for key in r.scan_iter(keys.prefix + "job:*"):
        fields = r.hgetall(key)
        if fields.get("name") == name:
            out.append(kq.get(key.rsplit(":", 1)[1]))
    return sorted(out, key=lambda j: int(j.id))


@pytest.mark.parametrize("kwargs", [
    dict(cron="not a cron"), dict(cron="* * *"), dict(cron="61 * * * *"), dict(every=0), dict(every=-1),
    dict(every=float("nan")), dict(every=True), dict(cron="* * * * *", every=5), dict(),
    dict(every=1, timezone="Mars/Olympus"), dict(every=1, catch_up="sometimes"),
    dict(every=1, opts={"delay": 3}), dict(every=1, opts={"bogus": 1}), dict(every=1, data={1, 2}),
])
def test_bad_schedules_are_value_errors_and_store_nothing(kq, namespace, kwargs):
    before = namespace_keys(kq.redis, namespace)
    # InvalidPayload (bad data) is a TypeError, like the same data given to create(); the rest are ValueErrors
    with pytest.raises(TypeError if "data" in kwargs else ValueError):
        kq.schedule("report", **kwargs)
    assert namespace_keys(kq.redis, namespace) == before


def test_schedule_creates_a_delayed_tick_job_due_at_the_tick(kq, namespace):
    assert kq.schedule("report", every=60, data={"x": 1}, opts={"retry": True}) == "report"
    [entry] = kq.schedules()
    job = kq.get(entry["pending_job_id"])
    assert (job.state, job.name, job.data, job.retry) == ("delayed", "report", {"x": 1}, True)
    assert job.scheduled_for == entry["next_run"]
    assert entry["every"] == 60 and entry["last_job_id"] is None
    assert_consistent(kq.redis, namespace)


def test_create_with_cron_registers_a_schedule_named_after_the_job(kq):
    job = kq.create("nightly", {"k": 2}, {"cron": "0 3 * * *", "process_timeout": 5})
    assert job.state == "delayed" and job.process_timeout == 5 and job.data == {"k": 2}
    [entry] = kq.schedules()
    assert entry["id"] == "nightly" and entry["cron"] == "0 3 * * *"
    assert entry["pending_job_id"] == job.id and job.scheduled_for == entry["next_run"]
    assert entry["next_run"] % 86_400_000 == 3 * 3_600_000  # 03:00 UTC


def test_cron_ticks_follow_the_timezone():
    # 03:00 in Paris on 2026-11-29 is 02:00 UTC (winter time).
    after = 1_795_996_800_000 - 1  # 2026-11-29T00:00:00Z - 1 ms
    [tick] = cron_rules.ticks_after("0 3 * * *", "Europe/Paris", after, 1)
    assert tick == 1_795_996_800_000 + 2 * 3_600_000


def test_six_field_cron_has_seconds():
    ticks = cron_rules.ticks_after("* * * * * */10", "UTC", 1_795_996_800_000, 3)
    assert [t - 1_795_996_800_000 for t in ticks] == [10_000, 20_000, 30_000]


def test_replacing_a_schedule_replaces_its_pending_job(kq, namespace):
    kq.schedule("report", every=60)
    first = pending(kq, "report")["pending_job_id"]
    kq.schedule("report", every=5)
    entry = pending(kq, "report")
    assert entry["pending_job_id"] != first and entry["every"] == 5
    with pytest.raises(kickq.JobNotFound):
        kq.get(first)
    assert len(kq.schedules()) == 1
    assert_consistent(kq.redis, namespace)


def test_unschedule_removes_the_schedule_its_ticks_and_its_pending_job(kq, namespace):
    before = namespace_keys(kq.redis, namespace)
    kq.schedule("report", cron="*/5 * * * *", schedule_id="five")
    job_id = pending(kq, "five")["pending_job_id"]
    assert kq.unschedule("five") is True
    assert kq.unschedule("five") is False
    with pytest.raises(kickq.JobNotFound):
        kq.get(job_id)
    assert kq.schedules() == []
    added = set(namespace_keys(kq.redis, namespace)) - set(before)
    leftover = {k for k in added if not bookkeeping(k, namespace)}
    assert leftover <= {Keys(namespace).id, Keys(namespace).names}


class Ticker:
    """Drives promote with explicit times (ms) on a namespace's schedules."""

    def __init__(self, kq):
        self.kq, self.keys = kq, kq.keys()
        self.scr = Scripts(kq.redis)

    def promote(self, now):
        return self.scr.promote(self.keys, now=now)

    def queued(self, name):
        return [kq_job for kq_job in jobs_of(self.kq, name) if kq_job.state == "queued"]


def test_every_promotes_one_job_per_tick_and_creates_the_next(kq, namespace):
    t = Ticker(kq)
    kq.schedule("beat", every=1)
    entry = pending(kq, "beat")
    due = entry["next_run"]
    t.promote(due - 1)
    assert t.queued("beat") == []
    t.promote(due)
    [ran] = t.queued("beat")
    assert ran.scheduled_for == due
    entry = pending(kq, "beat")
    assert entry["next_run"] == due + 1000 and entry["last_job_id"] == ran.id
    t.promote(due + 1000)
    assert len(t.queued("beat")) == 2
    t.promote(due + 1000)  # promoting again at the same time makes nothing more
    assert len(t.queued("beat")) == 2
    assert_consistent(kq.redis, namespace)


def test_concurrent_promoters_make_exactly_one_job_per_tick(kq, namespace):
    kq.schedule("beat", every=1)
    due = pending(kq, "beat")["next_run"]
    promoters = [Ticker(kickq.Kickq()) for _ in range(5)]
    for step in range(20):
        now = due + step * 1000
        threads = [threading.Thread(target=p.promote, args=(now,)) for p in promoters]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    ticks = sorted(j.scheduled_for for j in jobs_of(kq, "beat") if j.state == "queued")
    assert ticks == [due + step * 1000 for step in range(20)]


@pytest.mark.parametrize("catch_up, expected_runs", [("one", 1), ("skip", 0), ("all", 11)])
def test_missed_ticks_follow_catch_up(kq, catch_up, expected_runs):
    t = Ticker(kq)
    kq.schedule("beat", every=1, catch_up=catch_up)
    due = pending(kq, "beat")["next_run"]
    late = due + 10_000 + 500  # every supervisor was away for ten ticks
    t.promote(late)
    ran = t.queued("beat")
    assert len(ran) == expected_runs
    if catch_up == "all":
        assert sorted(j.scheduled_for for j in ran) == [due + i * 1000 for i in range(11)]
    entry = pending(kq, "beat")
    assert entry["next_run"] == due + 11_000  # the first tick after now, whatever catch_up says


def test_all_is_capped(kq):
    t = Ticker(kq)
    kq.schedule("beat", every=1, catch_up="all")
    due = pending(kq, "beat")["next_run"]
    t.promote(due + 1_000_000)
    assert len(t.queued("beat")) == 1 + cron_rules.CATCH_UP_CAP


def test_a_cron_schedule_consumes_its_precomputed_ticks_and_the_reaper_refills_them(kq, namespace):
    t = Ticker(kq)
    keys = kq.keys()
    kq.schedule("sec", cron="* * * * * *")  # every second
    held = kq.redis.zcard(keys.ticks("sec"))
    assert held == cron_rules.TICKS_AHEAD
    due = pending(kq, "sec")["next_run"]
    for i in range(40):
        t.promote(due + i * 1000)
    assert len(t.queued("sec")) == 40
    assert kq.redis.zcard(keys.ticks("sec")) < cron_rules.REFILL_BELOW
    refill_schedules(kq.redis, t.scr, keys, due + 39_000)
    assert kq.redis.zcard(keys.ticks("sec")) >= cron_rules.TICKS_AHEAD - 1
    t.promote(due + 40_000)
    ticks = sorted(j.scheduled_for for j in t.queued("sec"))
    assert ticks == [due + i * 1000 for i in range(41)]
    assert_consistent(kq.redis, namespace)


def test_a_cron_schedule_whose_ticks_ran_out_restarts_from_the_refill(kq, namespace):
    t = Ticker(kq)
    keys = kq.keys()
    kq.schedule("sec", cron="* * * * * *")
    due = pending(kq, "sec")["next_run"]
    t.promote(due + 3_600_000)  # an hour without reapers: far past the 64 precomputed ticks
    entry = pending(kq, "sec")
    assert entry["pending_job_id"] is None and entry["next_run"] is None
    assert len(t.queued("sec")) == 1  # catch_up "one": the late run
    refill_schedules(kq.redis, t.scr, keys, due + 3_600_000)
    entry = pending(kq, "sec")
    assert entry["pending_job_id"] is not None and entry["next_run"] is not None
    t.promote(entry["next_run"])
    assert len(t.queued("sec")) >= 2
    assert_consistent(kq.redis, namespace)


def test_a_deleted_pending_job_is_replaced_by_the_refill(kq):
    t = Ticker(kq)
    kq.schedule("sec", cron="*/5 * * * *")
    entry = pending(kq, "sec")
    kq.delete(entry["pending_job_id"])
    refill_schedules(kq.redis, t.scr, kq.keys(), entry["next_run"] - 1000)
    again = pending(kq, "sec")
    assert again["pending_job_id"] not in (None, entry["pending_job_id"])
    assert kq.get(again["pending_job_id"]).scheduled_for == entry["next_run"]


def test_a_failed_tick_job_retried_later_does_not_advance_the_schedule_twice(kq):
    t = Ticker(kq)
    kq.schedule("beat", every=10, opts={"retry": True, "retry_interval": 1})
    due = pending(kq, "beat")["next_run"]
    t.promote(due)
    claimed = t.scr.claim(t.keys, ["beat"], now=due)
    assert claimed is not None
    t.scr.finish(t.keys, claimed[0], claimed[1], "fail", "boom", now=due + 10)
    t.promote(due + 1010)  # the retry is due; the schedule's next tick is at due + 10 s
    entry = pending(kq, "beat")
    assert entry["next_run"] == due + 10_000
    assert kq.get(claimed[0]).state == "queued"


def test_ticks_come_from_redis_time_not_the_local_clock(kq, monkeypatch):
    import time as time_module
    seconds, micros = kq.redis.time()
    redis_now = seconds * 1000 + micros // 1000
    monkeypatch.setattr(time_module, "time", lambda: 4_000_000_000.0)  # this host's clock jumped
    kq.schedule("sec", cron="* * * * * *")
    kq.schedule("beat", every=1)
    for entry in kq.schedules():
        assert redis_now < entry["next_run"] <= redis_now + 2_500


@pytest.mark.slow
def test_three_supervisors_make_exactly_one_job_per_tick(kq, namespace, redis_url, tmp_path):
    import os
    import signal
    import subprocess
    import sys


    from tests.helpers import wait_until

    (tmp_path / "beat_handlers.py").write_text(
        "import kickq\nkickq.Kickq().process('beat', lambda job, data: job.tick)\n")
    procs = [subprocess.Popen([sys.executable, "-m", "kickq_supervisor", "--redis-url", redis_url,
                               "--redis-namespace", namespace, str(tmp_path / "beat_handlers.py")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for _ in range(3)]
    try:
        kq.schedule("beat", every=1)
        first = pending(kq, "beat")["next_run"]
        wait_until(lambda: pending(kq, "beat")["next_run"] >= first + 20_000, timeout=40,
                   message="20 ticks did not pass")
        wait_until(lambda: all(j.state == "success" for j in jobs_of(kq, "beat")
                               if j.scheduled_for < first + 20_000), timeout=10)
        ran = [j for j in jobs_of(kq, "beat") if j.state == "success"]
        ticks = sorted(j.tick for j in ran)
        assert ticks[:20] == [first + i * 1000 for i in range(20)]  # none twice, none missed
        assert all(j.result == j.tick and j.schedule_id == "beat" for j in ran)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
