"""The `kickq` admin command, run as a subprocess (`python -m kickq.cli`): every subcommand with its
exit codes and a wrong input, the requeue and purge_state scripts behind `retry` and `purge`, progress
on a terminal only, and `doctor` finding and repairing each kind of corruption planted by hand."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kickq
from kickq import scripts
from kickq.job import unpack_new
from kickq.keys import Keys
from kickq.scripts import LEASE_GRACE_MS, Scripts
from tests.helpers import free_port, redis_now, wait_until
from tests.structures import (assert_consistent, assert_one_structure, give_hash, job_exists, namespace_keys,
                              prefix, state_and_name)

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "kickq"


def run(redis_url, namespace, *args, env=None, timeout=60, stderr=None):
    """`kickq --redis-url URL --redis-namespace NS ARGS...`; returns the CompletedProcess."""
    command = [sys.executable, "-m", "kickq.cli"]
    if redis_url is not None:
        command += ["--redis-url", redis_url]
    if namespace is not None:
        command += ["--redis-namespace", namespace]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KICKQ_")}
    full_env.update(env or {})
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=stderr or subprocess.PIPE, text=True,
                          timeout=timeout)


@pytest.fixture
def cli(redis_url, namespace):
    return lambda *args, **kw: run(redis_url, namespace, *args, **kw)


def counts_match(r, ns):
    """The counts hash equals the jobs there are (a test's own scan)."""
    p = prefix(ns)
    actual: dict[str, int] = {}
    for key in namespace_keys(r, ns):
        if key.startswith(p + "job:"):
            state, name = r.hmget(key, "state", "name")
            actual[f"{state}:{name}"] = actual.get(f"{state}:{name}", 0) + 1
    for packed in r.hvals(p + "newjobs"):
        name = unpack_new(packed)["name"]
        actual[f"new:{name}"] = actual.get(f"new:{name}", 0) + 1
    return {f: int(v) for f, v in r.hgetall(p + "counts").items()} == actual


def finish_one(r, ns, name, outcome, at=None, took=10):
    """Claim the first job of `name` and finish it `took` ms after, at `at` (epoch ms; None: now)."""
    s, keys = Scripts(r), Keys(ns)
    start = None if at is None else at - took
    job_id, token, _ = s.claim(keys, [name], now=start)
    payload = '"r"' if outcome == "success" else "boom"
    status, state, _ = s.finish(keys, job_id, token, outcome, payload, now=at)
    assert status == "ok"
    return job_id, state


# --- help, flags, exit codes --------------------------------------------------------------------------

SUBCOMMANDS = {
    "stats": ["--json", "--name", "--window"],
    "list": ["--state", "--name", "--limit", "--json"],
    "show": ["ID"],
    "create": ["NAME", "--data", "--delay", "--hotjob", "--timeout", "--opts"],
    "delete": ["ID"],
    "retry": ["ID"],
    "purge": ["--state", "--older-than"],
    "schedules": ["--json"],
    "doctor": ["--repair", "--json"],
}


def test_help_lists_global_flags_and_every_command():
    result = run(None, None, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kickq")
    for word in ("--redis-url", "--redis-namespace", *SUBCOMMANDS):
        assert word in result.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_of_each_command(command):
    result = run(None, None, command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: kickq {command}")
    for option in SUBCOMMANDS[command]:
        assert option in result.stdout


def test_console_script_is_installed():
    result = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("usage: kickq")


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["list", "--state", "done"], ["list", "--limit", "0"],
                                  ["purge", "--state", "new", "--older-than", "1"],
                                  ["purge", "--state", "fail", "--older-than", "-1"],
                                  ["purge", "--state", "fail"],
                                  ["create"], ["create", "a", "--delay", "soon"],
                                  ["show"], ["delete"], ["retry"],
                                  ["stats", "--window", "soon"], ["schedules", "--all"], ["doctor", "--fix"]])
def test_usage_errors_exit_2(cli, args):
    result = cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: kickq" in result.stderr


def test_global_flags_go_before_the_command(redis_url, namespace):
    result = run(None, None, "stats", "--redis-url", redis_url)
    assert result.returncode == 2
    assert "unrecognized arguments: --redis-url" in result.stderr


def test_invalid_namespace_is_a_usage_error(redis_url):
    result = run(redis_url, "no spaces allowed", "stats")
    assert result.returncode == 2
    assert "redis_namespace" in result.stderr


def test_environment_gives_url_and_namespace(redis_url, namespace, r):
    result = run(None, None, "create", "from-env", env={"KICKQ_REDIS_URL": redis_url,
                                                        "KICKQ_NAMESPACE": namespace})
    assert result.returncode == 0, result.stderr
    assert state_and_name(r, namespace, result.stdout.strip()) == ("new", "from-env")


def test_unreachable_redis_fails_with_exit_1(namespace):
    result = run(f"redis://127.0.0.1:{free_port()}/0", namespace, "stats")
    assert result.returncode == 1
    assert "unavailable" in result.stderr and "Traceback" not in result.stderr


# --- stats ----------------------------------------------------------------------------------------

def test_stats_table_and_json(cli, kq, r, namespace):
    kq.create("email")
    kq.create("email")
    kq.create("sms")
    finish_one(r, namespace, "email", "success")
    result = cli("stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("NAME") and "PROCESSING" in line).split()
    email = next(line for line in lines if line.startswith("email")).split()
    row = dict(zip(header, email, strict=True))
    assert (row["NEW"], row["SUCCESS"], row["FAIL"]) == ("1", "1", "0")
    total = next(line for line in lines if line.startswith("TOTAL")).split()
    assert dict(zip(header, total, strict=True))["NEW"] == "2"
    figures = [line for line in lines if line.startswith("NAME") and "CREATED" in line]
    assert figures and "P95 MS" in figures[0]
    assert "last 300 s" in result.stdout

    as_json = json.loads(cli("stats", "--json").stdout)
    assert as_json["names"]["email"]["states"]["success"] == 1
    assert as_json["names"]["email"]["window"]["created"] == 2
    assert set(as_json) == {"window_seconds", "names", "total"}
    one = json.loads(cli("stats", "--json", "--name", "sms", "--window", "60").stdout)
    assert list(one["names"]) == ["sms"] and one["window_seconds"] == 60


def test_stats_window_out_of_range_is_a_usage_error(cli):
    result = cli("stats", "--window", "5")
    assert result.returncode == 2
    assert "stats_window" in result.stderr


def test_stats_keeps_the_namespace_events_maxlen(cli, kq_config, r, namespace):
    kickq.Kickq(events_maxlen=123).create("a")
    assert cli("stats").returncode == 0
    assert r.hget(Keys(namespace).meta, "events_maxlen") == "123"


# --- list and show --------------------------------------------------------------------------------

def test_list_by_state_name_and_limit(cli, kq, r, namespace):
    a1, _, a2 = kq.create("a"), kq.create("b"), kq.create("a")
    later = kq.create("a", opts={"delay": 60})
    done, _ = finish_one(r, namespace, "b", "success")

    def listed(*args):
        result = cli("list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [(j["id"], j["state"]) for j in json.loads(result.stdout)]

    assert listed("--state", "new") == [(a1.id, "new"), (a2.id, "new")]
    assert listed("--name", "a") == [(a1.id, "new"), (a2.id, "new"), (later.id, "delayed")]
    assert listed("--state", "success") == [(done, "success")]
    assert listed("--state", "delayed", "--name", "b") == []
    assert listed("--limit", "2") == [(a1.id, "new"), (a2.id, "new")]
    assert len(listed()) == 4
    table = cli("list", "--state", "delayed")
    assert table.returncode == 0
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATE"]
    assert row.split()[:3] == [later.id, "a", "delayed"] and "Z" in row


def test_show_prints_the_job_as_json(cli, kq):
    job = kq.create("a", {"to": "x@example.com"})
    result = cli("show", job.id)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown == json.loads(json.dumps(kq.get(job.id).to_dict()))
    assert (shown["id"], shown["state"], shown["data"]) == (job.id, "new", {"to": "x@example.com"})


def test_show_of_a_missing_job_exits_1(cli):
    result = cli("show", "404")
    assert result.returncode == 1
    assert "no job with id '404'" in result.stderr and result.stdout == ""


# --- create -------------------------------------------------------------------------------------------

def test_create_prints_the_new_id(cli, kq):
    result = cli("create", "email:send", "--data", '{"to": "a@b.c", "n": [1, 2]}')
    assert result.returncode == 0, result.stderr
    job = kq.get(result.stdout.strip())
    assert (job.name, job.state, job.data) == ("email:send", "new", {"to": "a@b.c", "n": [1, 2]})


def test_create_with_delay_and_opts(cli, kq, r):
    result = cli("create", "later", "--delay", "30", "--opts", '{"retry": true, "process_timeout": 2}')
    assert result.returncode == 0, result.stderr
    job = kq.get(result.stdout.strip())
    assert job.state == "delayed" and job.retry is True and job.process_timeout == 2
    assert 29_000 <= job.scheduled_for - redis_now(r) <= 30_000


@pytest.mark.parametrize("args, message", [
    (["a", "--data", "{not json"], "--data is not valid JSON"),
    (["a", "--opts", "[1]"], "--opts must be a JSON object"),
    (["a", "--opts", '{"colour": 1}'], "unknown job option"),
    (["", "--data", "1"], "job name must not be empty"),
])
def test_create_with_bad_input_is_a_usage_error_and_writes_nothing(cli, r, namespace, args, message):
    result = cli("create", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not r.exists(Keys(namespace).id)


def _worker_thread(r, namespace, outcome):
    def work():
        s, keys = Scripts(r), Keys(namespace)
        got = wait_until(lambda: s.claim(keys, ["hot"]), timeout=20, interval=0.02)
        s.finish(keys, got[0], got[1], outcome, '{"sent": true}' if outcome == "success" else "smtp down")
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_create_hotjob_waits_and_prints_the_final_job(cli, r, namespace):
    worker = _worker_thread(r, namespace, "success")
    result = cli("create", "hot", "--hotjob", "--data", "1")
    worker.join(timeout=5)
    assert result.returncode == 0, result.stderr
    first, rest = result.stdout.split("\n", 1)
    final = json.loads(rest)
    assert final["id"] == first and final["state"] == "success" and final["result"] == {"sent": True}


def test_create_hotjob_that_fails_exits_1(cli, r, namespace):
    worker = _worker_thread(r, namespace, "fail")
    result = cli("create", "hot", "--hotjob")
    worker.join(timeout=5)
    assert result.returncode == 1
    final = json.loads(result.stdout.split("\n", 1)[1])
    assert final["state"] == "fail" and final["last_error"] == "smtp down"


def test_create_hotjob_timeout_exits_1(cli):
    started = time.monotonic()
    result = cli("create", "nobody-runs-this", "--hotjob", "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stdout.strip().isdigit()
    assert "did not complete within 0.5s" in result.stderr
    assert time.monotonic() - started < 20


# --- delete and retry ---------------------------------------------------------------------------------

def test_delete(cli, kq, r, namespace):
    job = kq.create("a")
    result = cli("delete", job.id)
    assert result.returncode == 0 and f"deleted job {job.id}" in result.stdout
    assert not r.exists(Keys(namespace).job(job.id))
    again = cli("delete", job.id)
    assert again.returncode == 1 and "no job" in again.stderr
    assert_consistent(r, namespace)


def test_retry_requeues_a_failed_job_under_the_same_id(cli, kq, r, namespace):
    job = kq.create("a", opts={"purge_timeout": 60})
    finish_one(r, namespace, "a", "fail")
    failed = kq.get(job.id)
    assert failed.state == "fail" and failed.finish_time is not None
    result = cli("retry", job.id)
    assert result.returncode == 0, result.stderr
    queued = kq.get(job.id)
    assert queued.state == "queued"
    assert queued.runs == failed.runs and queued.last_error == "boom"
    assert queued.finish_time is None and queued.total_process_time is None and queued.scheduled_for is None
    assert assert_one_structure(r, namespace, job.id) == "queued"
    assert r.llen(Keys(namespace).wake("a")) == 1
    # It runs again: a worker claims it with a new attempt, and this time it succeeds.
    job_id, state = finish_one(r, namespace, "a", "success")
    assert (job_id, state) == (job.id, "success")
    assert [run["state"] for run in kq.get(job.id).runs] == ["fail", "success"]
    events = [e for e in kq.events(since="0", timeout=0.2) if e["id"] == job.id]
    assert [e["event"] for e in events] == ["create", "processing", "fail", "queued", "processing", "success"]


def test_retry_refuses_a_job_that_did_not_fail(cli, kq, r, namespace):
    job = kq.create("a")
    before = kq.get(job.id)
    result = cli("retry", job.id)
    assert result.returncode == 1
    assert f"job {job.id} is new: only a failed job can be retried" in result.stderr
    assert kq.get(job.id) == before
    missing = cli("retry", "999")
    assert missing.returncode == 1 and "no job with id '999'" in missing.stderr


def test_retry_of_a_tick_job_gets_its_tick_back(kq, r, namespace):
    s, keys = Scripts(r), Keys(namespace)
    kq.schedule("tick", every=0.001)
    wait_until(lambda: s.promote(keys)[0] >= 1, timeout=5)
    job_id, _ = finish_one(r, namespace, "tick", "fail")
    tick = kq.get(job_id).tick
    assert s.run("requeue", (keys.script_keys, [keys.prefix, "", job_id])) == ["ok", "queued"]
    assert kq.get(job_id).scheduled_for == tick


# --- purge ----------------------------------------------------------------------------------------

def test_purge_only_old_jobs_of_the_state(cli, kq, r, namespace):
    now = redis_now(r)
    old_fail = [kq.create("a").id for _ in range(3)]
    for _ in old_fail:
        finish_one(r, namespace, "a", "fail", at=now - 3_600_000)
    old_success = kq.create("a").id
    finish_one(r, namespace, "a", "success", at=now - 3_600_000)
    young_fail = kq.create("a").id
    finish_one(r, namespace, "a", "fail")
    waiting = kq.create("a").id
    result = cli("purge", "--state", "fail", "--older-than", "600")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "purged 3 fail job(s)"
    assert result.stderr == ""  # piped: no progress
    for job_id in old_fail:
        assert not r.exists(Keys(namespace).job(job_id))
    for job_id in (old_success, young_fail, waiting):
        assert job_exists(r, namespace, job_id)
    assert_consistent(r, namespace)
    assert counts_match(r, namespace)
    purged = [e["id"] for e in kq.events(since="0", timeout=0.2) if e["event"] == "purge"]
    assert sorted(purged) == sorted(old_fail)
    assert cli("purge", "--state", "success", "--older-than", "0").stdout.strip() == "purged 1 success job(s)"


def test_purge_state_script_checks_each_id(kq, r, namespace):
    s, keys = Scripts(r), Keys(namespace)
    job = kq.create("a").id
    finish_one(r, namespace, "a", "fail")
    queued = kq.create("a").id

    def purge_state(state, older_ms, *ids):
        return s.run("purge_state", (keys.script_keys, [keys.prefix, "", state, older_ms, *ids]))

    assert purge_state("fail", 3_600_000, job) == 0          # too young
    assert purge_state("success", 0, job) == 0               # other state
    assert purge_state("new", 0, queued) == 0                 # only success / fail
    assert purge_state("fail", 0, queued, "999", job) == 1   # ids that moved on or are gone are skipped
    assert not job_exists(r, namespace, job) and job_exists(r, namespace, queued)


def run_on_a_terminal(redis_url, namespace, *args):
    """Run the command with stderr on a pseudo-terminal; returns (exit code, stdout, what the tty got)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "kickq.cli", "--redis-url", redis_url,
                                 "--redis-namespace", namespace, *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        stdout = proc.stdout.read()
        proc.wait(timeout=60)
        return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_purge_shows_progress_on_a_terminal(redis_url, kq, r, namespace):
    kq.create_many([("bulk",)] * 1200)
    s, keys = Scripts(r), Keys(namespace)
    now = redis_now(r)
    claimed = []
    while (got := s.claim(keys, ["bulk"], now=now - 10_000)) is not None:
        claimed.append(got[:2])
    assert [job_id for job_id, _ in claimed] == [str(i) for i in range(1, 1201)]
    pipe = r.pipeline(transaction=False)
    for job_id, token in claimed:
        s.run("finish", scripts.finish_args(keys, job_id, token, "fail", "x", now=now - 9000), client=pipe)
    pipe.execute()
    code, stdout, tty = run_on_a_terminal(redis_url, namespace, "purge", "--state", "fail",
                                          "--older-than", "5")
    assert code == 0
    assert stdout.strip() == "purged 1200 fail job(s)"
    assert "purge: " in tty and "finished jobs looked at" in tty


# --- schedules ------------------------------------------------------------------------------------

def test_schedules(cli, kq):
    assert cli("schedules", "--json").stdout.strip() == "[]"
    kq.schedule("report", cron="0 6 * * *", timezone="Europe/Paris")
    kq.schedule("ping", every=90)
    result = cli("schedules")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "RULE"]
    assert any(line.startswith("ping") and "every 90s" in line for line in lines)
    assert any(line.startswith("report") and "cron 0 6 * * *" in line and "Europe/Paris" in line
               for line in lines)
    as_json = json.loads(cli("schedules", "--json").stdout)
    assert [s["id"] for s in as_json] == ["ping", "report"]
    assert as_json[0]["pending_job_id"] and as_json[1]["cron"] == "0 6 * * *"


# --- doctor -------------------------------------------------------------------------------------------

def doctor(cli, *args):
    result = cli("doctor", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_doctor_on_a_healthy_namespace(cli, kq, r, namespace):
    kq.create("a")
    kq.create("b", opts={"delay": 10})
    finish_one(r, namespace, "a", "fail")
    kq.create("a")
    Scripts(r).claim(Keys(namespace), ["a"])
    result = cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"doctor: no problems in namespace {namespace} (3 jobs)"
    assert result.stderr == ""


def plant_two_structures(kq, r, keys, name):
    job = kq.create(name).id
    r.zadd(keys.delayed, {job: 1})
    return job, "two_structures"


def plant_duplicate_in_queue(kq, r, keys, name):
    job = kq.create(name).id
    r.rpush(keys.queue(name), job)
    return job, "two_structures"


def plant_no_lease(kq, r, keys, name):
    job = kq.create(name, opts={"process_timeout": 30}).id
    Scripts(r).claim(keys, [name])
    r.zrem(keys.processing, job)
    return job, "no_lease"


def plant_not_indexed(kq, r, keys, name):
    job = kq.create(name).id
    r.lrem(keys.queue(name), 0, job)
    return job, "not_indexed"


def plant_finished_not_indexed(kq, r, keys, name):
    job = kq.create(name).id
    finish_one(r, keys.namespace, name, "success")
    r.zrem(keys.finished, job)
    return job, "not_indexed"


def plant_wrong_structure(kq, r, keys, name):
    job = kq.create(name, opts={"delay": 30}).id
    r.zrem(keys.delayed, job)
    r.zadd(keys.finished, {job: 1})
    return job, "wrong_structure"


def plant_orphan_in_queue(kq, r, keys, name):
    kq.create(name)
    r.rpush(keys.queue(name), "999")
    return "999", "orphan"


def plant_orphan_in_zset(kq, r, keys, name):
    r.zadd(keys.processing, {"998": 1})
    return "998", "orphan"


def plant_bad_state(kq, r, keys, name):
    job = kq.create(name).id
    give_hash(r, keys.namespace, job)
    r.hset(keys.job(job), "state", "limbo")
    return job, "bad_state"


PLANTS = [plant_two_structures, plant_duplicate_in_queue, plant_no_lease, plant_not_indexed,
          plant_finished_not_indexed, plant_wrong_structure, plant_orphan_in_queue, plant_orphan_in_zset,
          plant_bad_state]


@pytest.mark.parametrize("plant", PLANTS, ids=[p.__name__[len("plant_"):] for p in PLANTS])
def test_doctor_finds_and_repairs(cli, kq, r, namespace, plant):
    keys = Keys(namespace)
    kq.create("bystander")
    job, kind = plant(kq, r, keys, "a")
    code, report = doctor(cli)
    assert code == 1
    assert [(p["id"], p["kind"]) for p in report["problems"]] == [(job, kind)]
    assert report["repaired"] == []
    text = cli("doctor")
    assert text.returncode == 1 and f"job {job}: " in text.stdout and "--repair" in text.stdout

    code, report = doctor(cli, "--repair")
    assert code == 0, report
    assert [(item["id"], item["kind"]) for item in report["repaired"] if "id" in item] == [(job, kind)]
    assert report["remaining"] == 0
    assert doctor(cli) == (0, {"problems": [], "counts_drift": {}, "repaired": []})
    assert_consistent(r, namespace)
    assert counts_match(r, namespace)
    assert kq.stats("bystander")["names"]["bystander"]["states"]["new"] == 1
    repairs = [e for e in kq.events(since="0", timeout=0.2) if e["event"] == "repair"]
    assert [e["id"] for e in repairs] == [job]


def test_repaired_lease_lets_the_reaper_recover_the_run(cli, kq, r, namespace):
    keys = Keys(namespace)
    job, _ = plant_no_lease(kq, r, keys, "a")
    before = redis_now(r)
    assert cli("doctor", "--repair").returncode == 0
    lease = r.zscore(keys.processing, job)
    assert before + 30_000 + LEASE_GRACE_MS <= lease <= redis_now(r) + 30_000 + LEASE_GRACE_MS
    count, _ = Scripts(r).recover(keys, now=int(lease) + 1)
    assert count == 1 and kq.get(job).state == "ghost"


def test_repaired_bad_state_is_a_failed_job(cli, kq, r, namespace):
    job, _ = plant_bad_state(kq, r, Keys(namespace), "a")
    assert cli("doctor", "--repair").returncode == 0
    repaired = kq.get(job)
    assert repaired.state == "fail" and "unknown state \"limbo\"" in repaired.last_error
    assert repaired.finish_time is not None and repaired.scheduled_for > repaired.finish_time


def test_doctor_finds_and_repairs_counts_drift(cli, kq, r, namespace):
    keys = Keys(namespace)
    kq.create("a")
    kq.create("a")
    r.hincrby(keys.counts, "new:a", 3)
    r.hset(keys.counts, "success:ghosts", 2)
    code, report = doctor(cli)
    assert code == 1 and report["problems"] == []
    assert report["counts_drift"] == {"new:a": 3, "success:ghosts": 2}
    assert "counts drift: new 'a' recorded +3" in cli("doctor").stdout
    code, report = doctor(cli, "--repair")
    assert code == 0 and report["remaining"] == 0
    assert counts_match(r, namespace)
    assert kq.stats("a")["names"]["a"]["states"]["new"] == 2
    r.hdel(keys.counts, "new:a")  # drift the other way: recorded too low
    assert doctor(cli)[1]["counts_drift"] == {"new:a": -2}
    assert doctor(cli, "--repair")[0] == 0 and counts_match(r, namespace)


def test_doctor_repairs_everything_at_once(cli, kq, r, namespace):
    keys = Keys(namespace)
    planted = {plant(kq, r, keys, plant.__name__) for plant in PLANTS}
    r.hincrby(keys.counts, "queued:a", 7)
    code, report = doctor(cli)
    assert code == 1
    assert {(p["id"], p["kind"]) for p in report["problems"]} == planted
    assert "queued:a" in report["counts_drift"]
    code, report = doctor(cli, "--repair")
    assert code == 0 and report["remaining"] == 0
    assert doctor(cli)[0] == 0
    assert_consistent(r, namespace)
    assert counts_match(r, namespace)


def test_doctor_sees_no_problem_in_a_busy_namespace(cli, kq, r, namespace):
    """Jobs moving while doctor reads are not corruption: each suspect is confirmed atomically."""
    stop = threading.Event()
    moved = [0]

    def churn():
        s, keys = Scripts(r), Keys(namespace)
        while not stop.is_set():
            kq.create("busy")
            got = s.claim(keys, ["busy"])
            if got:
                s.finish(keys, got[0], got[1], "success")
                moved[0] += 1

    kq.create_many([("busy",)] * 2000)
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        wait_until(lambda: moved[0] > 10, timeout=10)
        for _ in range(3):
            result = cli("doctor")
            assert result.returncode == 0, result.stdout
            assert "counts drift" not in result.stdout
            assert "counts not checked" in result.stdout or "no problems" in result.stdout
    finally:
        stop.set()
        thread.join(timeout=10)
    assert moved[0] > 100


def test_doctor_shows_progress_on_a_terminal_only(redis_url, kq, r, namespace, cli):
    kq.create_many([("bulk",)] * 3000)
    code, stdout, tty = run_on_a_terminal(redis_url, namespace, "doctor")
    assert code == 0, stdout
    assert "doctor: " in tty and "jobs read" in tty
    piped = cli("doctor")
    assert piped.returncode == 0 and piped.stderr == ""


def test_a_reader_that_goes_away_ends_it_quietly(redis_url, namespace):
    """`kickq stats | head -1`: the rest of the output has nowhere to go. No traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a shell runs it
    proc = subprocess.Popen([sys.executable, "-m", "kickq.cli", "--redis-url", redis_url,
                             "--redis-namespace", namespace, "stats"], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes anything: every write fails with EPIPE
    _, err = proc.communicate(timeout=60)
    assert err.decode() == ""
    assert proc.returncode == 141
