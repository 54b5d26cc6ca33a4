"""`make demo`: a real kickq-supervisor processing real jobs, start to finish.

Uses the Redis in $KICKQ_REDIS_URL when set; otherwise the supervisor starts a private
redis-server of its own (--embedded-redis) in a temporary directory.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import kickq  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    namespace = f"demo-{os.getpid()}"
    url = os.environ.get("KICKQ_REDIS_URL")
    tmp = tempfile.mkdtemp(prefix="kickq-demo-")
    command = [sys.executable, "-m", "kickq_supervisor", "--redis-namespace", namespace,
               "--kill-grace", "0.2", os.path.join(HERE, "demo_handlers.py")]
    if url:
        say("using Redis at $KICKQ_REDIS_URL")
        command[3:3] = ["--redis-url", url]
    else:
        say(f"no KICKQ_REDIS_URL: the supervisor starts a private redis-server (AOF in {tmp})")
        command[3:3] = ["--embedded-redis", tmp]
        url = "unix://" + os.path.join(tmp, "redis.sock")
    log_path = os.path.join(tmp, "supervisor.log")
    say(f"starting: kickq-supervisor ... (log: {log_path})")
    supervisor = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),
                                  start_new_session=True)
    try:
        return run_jobs(url, namespace, supervisor)
    finally:
        kickq.reset()  # close our connections before the supervisor takes its Redis down
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(supervisor.pid, signal.SIGKILL)
        say(f"supervisor exited with code {supervisor.returncode}")


def run_jobs(url: str, namespace: str, supervisor: subprocess.Popen) -> int:
    wait_for(lambda: url.startswith("redis") or os.path.exists(url[len("unix://"):]), 15, "redis-server")
    kickq.config(redis_url=url, redis_namespace=namespace,
                 job_flags={"flaky": {"retry": True, "retry_count": 3, "retry_interval": 0.5}})
    kq = kickq.Kickq()
    wait_for(lambda: _ping(kq), 15, "Redis")

    jobs = {}
    kq.schedule("heartbeat", every=1)
    say("schedule: 'heartbeat' every second (one job per tick, whatever the number of reapers)")
    say("create: 5 x email:send (2 workers serve them)")
    for i, job in enumerate(kq.create_many([("email:send", {"to": f"user{i}@example.com"}) for i in range(5)])):
        jobs[f"email #{i}"] = job.id
    delayed = kq.create("email:send", {"to": "later@example.com"}, {"delay": 1.5})
    jobs["delayed email (1.5 s)"] = delayed.id
    say(f"create: delayed job #{delayed.id}, state {delayed.state}, due in 1.5 s")
    flaky = kq.create("flaky")
    jobs["flaky (retries)"] = flaky.id
    say(f"create: flaky job #{flaky.id}: fails twice, retried every 0.5 s (job_flags)")
    runaway = kq.create("runaway", None, {"process_timeout": 1, "ghost_count": 1, "ghost_interval": 0.5})
    jobs["runaway (timeout 1 s)"] = runaway.id
    say(f"create: runaway job #{runaway.id}: loops forever, process_timeout 1 s, one ghost re-run")

    hot = kq.create("resize", {"width": 1920, "height": 1080}, {"hotjob": True, "hotjob_timeout": 10})
    jobs["hotjob resize"] = hot.id
    started = time.monotonic()
    final = hot.hotjob_promise.result()
    say(f"hotjob #{hot.id} answered in {(time.monotonic() - started) * 1000:.1f} ms: {final.result}")

    def all_done():
        return all(kq.get(job_id).complete for job_id in jobs.values())
    wait_for(all_done, 30, "every job to complete")
    beats = [kq.get(i) for i in _schedule_runs(kq)]
    kq.unschedule("heartbeat")
    say(f"schedule: {len(beats)} heartbeat ticks ran, at "
        + ", ".join(f"+{(b.runs[0]['start'] - b.tick)} ms" for b in beats if b.runs) + " after their tick; unscheduled")
    if supervisor.poll() is not None:
        raise SystemExit("demo: the supervisor died; see its log")

    print()
    print(f"{'job':<24} {'id':>4} {'state':<8} {'runs':>4}  what happened")
    print("-" * 100)
    for label, job_id in jobs.items():
        job = kq.get(job_id)
        story = " -> ".join(f"{run['state']}" + (f" ({run['error']})" if run.get("error") else "")
                            for run in job.runs)
        waited = ""
        if job.delay is not None:
            waited = f" [started {job.runs[0]['start'] - job.create_time} ms after create]"
        print(f"{label:<24} {job.id:>4} {job.state:<8} {len(job.runs):>4}  {story}{waited}")
    print()
    counts = {}
    for job_id in jobs.values():
        state = kq.get(job_id).state
        counts[state] = counts.get(state, 0) + 1
    say("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    expected_fail = {jobs["runaway (timeout 1 s)"]}
    ok = all((kq.get(i).state == "fail") == (i in expected_fail) for i in jobs.values())
    say("demo finished: every job reached the state it should" if ok else "demo: unexpected states!")
    return 0 if ok else 1


def _schedule_runs(kq: kickq.Kickq) -> list[str]:
    """Ids of the heartbeat jobs that ran: the schedule's last job and the ones before it."""
    entry = next(s for s in kq.schedules() if s["id"] == "heartbeat")
    last = int(entry["last_job_id"] or 0)
    out = []
    for job_id in range(1, last + 1):
        try:
            job = kq.get(str(job_id))
        except kickq.JobNotFound:
            continue
        if job.schedule_id == "heartbeat" and job.complete:
            out.append(job.id)
    return out


def _ping(kq: kickq.Kickq) -> bool:
    try:
        return bool(kq.redis.ping())
    except kickq.KickqError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
