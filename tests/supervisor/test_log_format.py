"""--log-format json: one JSON object per line from every process of a real supervisor (master,
workers, reaper) with its role and pid, the job's id and name on the lines about a job, an
exception as one field; the text lines unchanged by default; the same option for `kickq`."""
from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kickq import logformat
from kickq.keys import Keys
from tests.helpers import side_key, wait_until
from tests.supervisor import handlers, handlers_logs
from tests.supervisor.conftest import REPO, wait_job

HANDLERS = Path(handlers_logs.__file__).resolve()
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                       r"\[\d+\] [\w.]+: ")
TIMED_OUT = "processing timed out"


def records(text: str) -> list[dict[str, Any]]:
    """Every line parsed on its own (a torn last line, still being written, is left out)."""
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1]]


# --- a real supervisor ------------------------------------------------------------------------------

def test_json_lines_from_every_process_carry_role_pid_and_job(start_supervisor, kq):
    sup = start_supervisor(HANDLERS, args=["--log-format", "json", "--max-jobs-per-worker", "1"], workers=2)
    reaper_pid = sup.reapers()[0].pid
    answered = kq.create("logs.answer", {"x": 1})
    hung = kq.create("logs.hang", None, {"process_timeout": 0.3, "ghost_interval": 3600})
    wait_job(kq, answered.id, "success")
    wait_job(kq, hung.id, "ghost")

    def seen() -> list[dict[str, Any]] | None:
        lines = records(sup.log())
        roles = {line["role"] for line in lines}
        ghosted = any(line.get("job_id") == hung.id and line["logger"] == "kickq.master"
                      and line["message"].endswith("-> ghost") for line in lines)
        return lines if {"master", "reaper"} <= roles and ghosted and any(
            r.startswith("worker ") for r in roles) else None
    lines = wait_until(seen, timeout=10.0, interval=0.05,
                       message="JSON lines from the master, a worker and the reaper")

    for line in lines:
        assert {"time", "level", "logger", "pid", "role", "message"} <= line.keys(), line
        assert TIME.match(line["time"]), line
        assert line["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        if line["role"] == "master":
            assert line["pid"] == sup.pid, line
        elif line["role"] == "reaper":
            assert line["pid"] == reaper_pid, line
        else:
            assert re.fullmatch(r"worker [12]", line["role"]), line
            assert line["pid"] != sup.pid and line["pid"] != reaper_pid, line
    assert any(line["role"] == "reaper" and line["message"].startswith("vitals [") for line in lines)
    # The worker that answered retires after its one job (--max-jobs-per-worker 1) and says so.
    retired = [line for line in lines if "retiring after 1 jobs" in line["message"]]
    assert retired and all(line["role"].startswith("worker ") for line in retired), retired
    master_lines = [line for line in lines if line["role"] == "master"]
    assert any(line["message"].startswith("worker 1 (pid ") for line in master_lines)

    # The master's deadline kill, its ghost and the ghoster's line name the job.
    kill = [line for line in lines if "passed its process_timeout" in line["message"]]
    assert len(kill) == 1, kill
    assert kill[0]["role"] == "master" and kill[0]["level"] == "WARNING"
    assert (kill[0]["job_id"], kill[0]["job_name"]) == (hung.id, "logs.hang")
    died = [line for line in lines if f"during job {hung.id}: {TIMED_OUT}" in line["message"]]
    assert [(d["job_id"], d["job_name"]) for d in died] == [(hung.id, "logs.hang")]
    ghost = [line for line in lines if line["message"].startswith(f"job {hung.id} (token ")]
    assert [(g["job_id"], g["job_name"], g["role"]) for g in ghost] == [(hung.id, "logs.hang", "master")]
    # Lines about no job carry no job fields.
    assert not any("job_id" in line for line in lines if line["message"].startswith("kickq-supervisor "))


def test_a_rejected_finish_names_its_job(start_supervisor, kq, redis_url, namespace):
    # As in test_deaths: attempt 1 answers after the reaper recovered the job and attempt 2 ended it.
    sup = start_supervisor(args=["--log-format", "json"], workers=handlers.WORKERS)
    r = kq.redis
    release, worker_key = side_key(namespace, "release"), side_key(namespace, "worker")
    job = kq.create("chaos", {"do": "block_first", "redis": redis_url, "release": release, "key": worker_key},
                    {"process_timeout": 30, "ghost_interval": 0})
    wait_until(lambda: r.lindex(worker_key, 0), message="attempt 1 running")
    r.zadd(Keys(namespace).processing, {job.id: 1})
    assert wait_job(kq, job.id).result == "attempt 2"
    r.rpush(release, "go")

    def rejected() -> list[dict[str, Any]]:
        return [line for line in records(sup.log()) if "rejected (stale" in line["message"]]
    [line] = wait_until(rejected, message="the late finish logged as rejected")
    assert (line["job_id"], line["job_name"], line["level"]) == (job.id, "chaos", "WARNING")
    assert re.fullmatch(r"worker \d+", line["role"]) and line["pid"] == int(r.lindex(worker_key, 0))


def test_text_lines_are_unchanged_by_default(start_supervisor):
    sup = start_supervisor(HANDLERS, workers=2)
    wait_until(lambda: "reaper (pid" in sup.log(), timeout=5.0, message="the reaper's start line")
    lines = sup.log().splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines
    assert any(re.search(rf"INFO \[{sup.pid}\] kickq.supervisor: kickq-supervisor ", line) for line in lines)


def test_help_lists_the_option():
    out = subprocess.run([sys.executable, "-m", "kickq_supervisor", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=30).stdout
    assert "--log-format {text,json}" in out


# --- the formatter ----------------------------------------------------------------------------------

@pytest.fixture
def json_log():
    """A logger writing JSON lines to a buffer, with role "worker 3"; the role is put back after."""
    was = logformat.current_role()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.JsonFormatter())
    log = logging.getLogger("kickq.test.logformat")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    logformat.set_role("worker 3")
    try:
        yield log, out
    finally:
        log.removeHandler(handler)
        logformat.set_role(was)


def test_an_exception_is_one_field_of_one_line(json_log):
    log, out = json_log
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("handler blew up\nwhile doing %s", "this", extra=logformat.job_extra("42", "mail"))
    text = out.getvalue()
    assert text.count("\n") == 1  # the record's end only
    [line] = records(text)
    assert line["message"] == "handler blew up\nwhile doing this"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("ValueError: bad\nvalue")
    assert (line["level"], line["logger"], line["role"]) == ("ERROR", "kickq.test.logformat", "worker 3")
    assert (line["job_id"], line["job_name"]) == ("42", "mail")
    assert TIME.match(line["time"])


def test_fields_without_a_job_or_an_exception(json_log):
    log, out = json_log
    log.info("plain %d", 7)
    log.warning("about a job of unknown name", extra=logformat.job_extra("43"))
    plain, about = records(out.getvalue())
    assert plain["message"] == "plain 7" and not {"job_id", "job_name", "exc"} & plain.keys()
    assert about["job_id"] == "43" and "job_name" not in about


def test_time_is_utc_with_milliseconds():
    record = logging.LogRecord("kickq.x", logging.INFO, __file__, 1, "m", None, None)
    record.created, record.msecs = 1_700_000_000.0421, 42.1
    assert json.loads(logformat.JsonFormatter().format(record))["time"] == "2023-11-14T22:13:20.042Z"


# --- kickq, the admin command ----------------------------------------------------------------------

def run_admin(redis_url: str, namespace: str, *args: str, warning: str) -> subprocess.CompletedProcess:
    """`kickq ... ARGS`, then a library warning logged in the same process (as kickq.hotjob logs one)."""
    code = ("import logging, sys\n"
            "from kickq import cli\n"
            "code = cli.main(sys.argv[1:])\n"
            f"logging.getLogger('kickq.hotjob').warning({warning!r})\n"
            "sys.exit(code)\n")
    command = [sys.executable, "-c", code, "--redis-url", redis_url, "--redis-namespace", namespace, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30)


def test_kickq_admin_logs_json_lines(redis_url, namespace):
    proc = run_admin(redis_url, namespace, "--log-format", "json", "stats", "--json", warning="two\nlines")
    assert proc.returncode == 0, proc.stderr
    [line] = records(proc.stderr)
    assert (line["role"], line["level"], line["logger"], line["message"]) == (
        "admin", "WARNING", "kickq.hotjob", "two\nlines")
    assert json.loads(proc.stdout)  # the command's own output is untouched


def test_kickq_admin_text_by_default(redis_url, namespace):
    proc = run_admin(redis_url, namespace, "stats", "--json", warning="plain")
    assert (proc.returncode, proc.stderr) == (0, "plain\n")
    helped = subprocess.run([sys.executable, "-m", "kickq.cli", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert "--log-format {text,json}" in helped.stdout
