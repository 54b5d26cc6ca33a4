"""kickq against RQ, Celery, Dramatiq, Huey, arq and SAQ in one run.

    .bench-venv/bin/python -m bench [--jobs 20000] [--runs 3] [--only kickq,rq,...] [--out bench/RESULTS.md]
    make bench BENCH_ARGS="--jobs 2000 --runs 1"

Starts its own redis-server on a free port (no persistence), then runs every case for every queue,
each (case, queue, run) in a fresh driver process of that queue's interpreter (bench/driver.py),
bounded in time, with FLUSHDB before each. Cases: enqueue one by one and in bulk; drain N
pre-enqueued no-op jobs with 2 worker processes (and drain-io: the same with a Redis round trip in
each job); sleep: drain jobs that each sleep 50 ms with 16 in flight in each queue's I/O setup, with
the worker tree's PSS; idle-pool latency (enqueue-to-start, enqueue-to-result) and the worker tree's memory at
rest; Redis memory per queued job; kickq only: deadline precision, orphan recovery after SIGKILL of
a whole supervisor, scaling with 1/2/4 workers and 1/2 supervisors, shards: one namespace against
three on a 3-master Redis Cluster. Enqueue and drain also give Redis' CPU per job (INFO cpu before
and after). Medians of --runs runs. Writes bench/RESULTS.md and bench/results.json.
Every process it starts is stopped; a psutil check at the end proves it. Run from the repo root.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import procs, redis_cpu  # noqa: E402
from bench.peers import PEERS  # noqa: E402

ALL_CASES = ["enqueue", "drain", "drain-io", "sleep", "latency", "memory", "kickq", "scaling", "shards"]
SCALING = [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)]  # (supervisors, workers per supervisor)
IO_SLEEP = 0.05  # seconds each job of the sleep case sleeps (16 in flight: 320 jobs/s at best)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per enqueue / drain run (20000)")
    p.add_argument("--sleep-jobs", type=int, default=2000,
                   help="jobs per sleep-case run, each sleeping 50 ms (2000)")
    p.add_argument("--runs", type=int, default=3, help="runs per case; tables show the median (3)")
    p.add_argument("--only", default="", help="comma-separated queues (default: all): " + ",".join(PEERS))
    p.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated: " + ",".join(ALL_CASES))
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--json", help="default: results.json beside --out")
    p.add_argument("--latency-count", type=int, default=500, help="latency probes per run (500)")
    p.add_argument("--memory-jobs", type=int, default=100_000, help="queued jobs for the Redis memory case")
    p.add_argument("--million", action="store_true", help="the memory case with 1,000,000 jobs")
    p.add_argument("--deadline-trials", type=int, default=50)
    p.add_argument("--deadline-timeout", type=float, default=0.3,
                   help="process_timeout of the deadline trials (0.3 s)")
    p.add_argument("--orphan-trials", type=int, default=5)
    p.add_argument("--orphan-timeout", type=float, default=1.0, help="process_timeout of the orphan job")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every case's time bound")
    p.add_argument("--profile", action="store_true",
                   help="also profile kickq's producer and workers into bench/profiles/ "
                        "(cProfile; py-spy if present)")
    p.add_argument("--arq-python", default=str(REPO / ".bench-venv" / "arq" / "bin" / "python"),
                   help="interpreter with arq installed (arq needs redis-py < 6)")
    p.add_argument("--extra", action="append", default=[], metavar="MODULE",
                   help="also run `python -m MODULE` (e.g. bench.aio) and append its output")
    p.add_argument("--note", default="", help="a line printed at the top of RESULTS.md")
    args = p.parse_args(argv)
    if args.million:
        args.memory_jobs = 1_000_000
    args.peers = [x for x in (args.only.split(",") if args.only else list(PEERS)) if x]
    unknown = [x for x in args.peers if x not in PEERS]
    if unknown:
        p.error(f"unknown queue(s): {', '.join(unknown)}")
    args.case_list = [x for x in args.cases.split(",") if x]
    bad = [x for x in args.case_list if x not in ALL_CASES]
    if bad:
        p.error(f"unknown case(s): {', '.join(bad)}")
    return args


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


class Runner:
    def __init__(self, args: argparse.Namespace, url: str, workdir: Path, keep: set[int]) -> None:
        self.args, self.url, self.workdir, self.keep = args, url, workdir, keep
        self.results: dict[str, Any] = {"peers": {}, "tasks": [], "leaks": [], "extras": []}
        self.seq = 0

    def python_for(self, peer: str) -> str:
        return self.args.arq_python if peer == "arq" else sys.executable

    def drive(self, peer: str, case: str, timeout: float, url: str | None = None,
              **params: Any) -> dict[str, Any]:
        """One driver process; returns its JSON (or an error record). Leftovers are killed and logged."""
        self.seq += 1
        out = self.workdir / f"{self.seq:04d}-{peer}-{case}.json"
        cmd = [self.python_for(peer), "-m", "bench.driver", "--peer", peer, "--case", case,
               "--url", url or self.url,
               "--workdir", str(self.workdir / f"{self.seq:04d}-{peer}-{case}"), "--out", str(out),
               "--timeout", f"{timeout:.0f}"]
        for key, value in params.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        started = time.monotonic()
        log = open(self.workdir / f"{self.seq:04d}-{peer}-{case}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.keep.add(proc.pid)
        try:
            proc.wait(timeout=timeout + 60)
            tail = (self.workdir / f"{self.seq:04d}-{peer}-{case}.log").read_text(errors="replace")[-3000:]
            record = json.loads(out.read_text()) if out.exists() else {
                "error": f"driver exited with code {proc.returncode} without a result:\n{tail}"}
        except subprocess.TimeoutExpired:
            record = {"error": f"timed out after {timeout + 60:.0f} s"}
            procs.kill_all([p for p in procs.descendants(self.keep - {proc.pid})])
            proc.wait()
        finally:
            log.close()
            self.keep.discard(proc.pid)
        left = procs.kill_all(procs.descendants(self.keep))
        if left:
            self.results["leaks"].append({"peer": peer, "case": case, "processes": left})
        if record.get("left_running"):
            self.results["leaks"].append({"peer": peer, "case": case, "processes": record["left_running"],
                                          "killed_by": "driver"})
        self.flush()
        record["wall_seconds"] = time.monotonic() - started
        status = record.get("error", "").splitlines()[0] if record.get("error") else "ok"
        if "result" in record and "skipped" in record["result"]:
            status = "skipped: " + record["result"]["skipped"]
        print(f"[{time.strftime('%H:%M:%S')}] {case:<12} {peer:<9} {params.get('variant') or '':<9} "
              f"{record['wall_seconds']:6.1f}s  {status[:120]}", flush=True)
        return record

    def flush(self) -> None:
        import redis
        try:
            with redis.Redis.from_url(self.url) as r:
                r.flushdb()
        except redis.RedisError:
            pass

    def task(self, case: str, peer: str, variant: str = "default", **params: Any) -> dict[str, Any]:
        for t in self.results["tasks"]:
            if t["case"] == case and t["peer"] == peer and t["variant"] == variant and t["params"] == params:
                return t
        t = {"case": case, "peer": peer, "variant": variant, "params": params, "runs": [], "errors": []}
        self.results["tasks"].append(t)
        return t

    def fastest_peer(self, case: str, key: str) -> tuple[str, str] | None:
        """The (peer, variant) other than kickq with the lowest median `key` in `case` so far."""
        medians = [(statistics.median(r[key] for r in t["runs"]), t["peer"], t["variant"])
                   for t in self.results["tasks"]
                   if t["case"] == case and t["peer"] != "kickq" and t["runs"]]
        return min(medians)[1:] if medians else None

    def record(self, case: str, peer: str, variant: str, params: dict[str, Any], rec: dict[str, Any]) -> None:
        t = self.task(case, peer, variant, **params)
        if "error" in rec:
            t["errors"].append(rec["error"] + ("\n" + rec["traceback"] if rec.get("traceback") else ""))
        elif "skipped" in rec.get("result", {}):
            t["skipped"] = rec["result"]["skipped"]
            detail = {k: v for k, v in rec["result"].items() if k != "skipped"}
            if detail:
                t["skipped_detail"] = detail
        else:
            t["runs"].append(rec["result"])

    # --- the plan ---------------------------------------------------------------------------------

    def probe_peers(self) -> list[str]:
        ok = []
        for peer in self.args.peers:
            py = self.python_for(peer)
            if not Path(py).exists():
                self.results["peers"][peer] = {"status": f"not installed: no {py} (make bench)"}
                print(f"{peer}: not installed ({py} is missing)", flush=True)
                continue
            rec = self.drive(peer, "info", 60)
            if "error" in rec:
                first = rec["error"].strip().splitlines()
                self.results["peers"][peer] = {"status": "does not run here: " + (first[0] if first else "?"),
                                               "detail": rec.get("traceback", rec["error"])[-2000:]}
                continue
            self.results["peers"][peer] = {"status": "ok", **rec["result"]}
            ok.append(peer)
        return ok

    def run(self) -> None:
        a = self.args
        scale = a.timeout_scale
        peers = self.probe_peers()
        info = self.results["peers"]
        profile_dir = str(REPO / "bench" / "profiles") if a.profile else None
        if profile_dir:
            shutil.rmtree(profile_dir, ignore_errors=True)
            Path(profile_dir).mkdir(parents=True)
        if "enqueue" in a.case_list:
            for _ in range(a.runs):
                for peer in peers:
                    for mode in ("one", "bulk"):
                        if mode == "bulk" and not info[peer]["bulk_label"]:
                            self.task("enqueue-bulk", peer).setdefault(
                                "skipped", f"{info[peer]['label']} has no bulk API")
                            continue
                        rec = self.drive(peer, f"enqueue-{mode}", (60 + a.jobs / 100) * scale, jobs=a.jobs)
                        self.record(f"enqueue-{mode}", peer, "default", {}, rec)
        # drain-io: the same drain with a Redis round trip in every job's body
        for case, body in (("drain", "noop"), ("drain-io", "incr")):
            if case not in a.case_list:
                continue
            for _ in range(a.runs):
                for peer in peers:
                    for variant in info[peer]["variants"]:
                        rec = self.drive(peer, "drain", (60 + a.jobs / 30) * scale, jobs=a.jobs, workers=2,
                                         variant=variant, body=body)
                        self.record(case, peer, variant, {}, rec)
        if "sleep" in a.case_list:  # every setup of every queue, 16 jobs in flight in each
            for _ in range(a.runs):
                for peer in peers:
                    for variant in info[peer].get("io_variants", {}):
                        rec = self.drive(peer, "sleep", (60 + a.sleep_jobs * IO_SLEEP) * scale,
                                         jobs=a.sleep_jobs, variant=variant, sleep=IO_SLEEP)
                        self.record("sleep", peer, variant, {}, rec)
        if "latency" in a.case_list:
            for _ in range(a.runs):
                for peer in peers:
                    for variant in info[peer]["variants"]:
                        rec = self.drive(peer, "latency", (120 + a.latency_count * 0.2) * scale,
                                         count=a.latency_count, variant=variant)
                        self.record("latency", peer, variant, {}, rec)
        if "memory" in a.case_list:
            for peer in peers:
                rec = self.drive(peer, "memory", (120 + a.memory_jobs / 300) * scale, jobs=a.memory_jobs)
                self.record("memory", peer, "default", {}, rec)
        if "kickq" in peers and "kickq" in a.case_list:
            rec = self.drive("kickq", "deadline", (60 + a.deadline_trials * (a.deadline_timeout + 3)) * scale,
                             count=a.deadline_trials, process_timeout=a.deadline_timeout)
            self.record("deadline", "kickq", "default", {}, rec)
            rec = self.drive("kickq", "orphan", (60 + a.orphan_trials * (a.orphan_timeout + 15)) * scale,
                             count=a.orphan_trials, process_timeout=a.orphan_timeout)
            self.record("orphan", "kickq", "default", {}, rec)
        if "kickq" in peers and "scaling" in a.case_list:
            for _ in range(a.runs):
                for sups, workers in SCALING:
                    rec = self.drive("kickq", "drain", (60 + a.jobs / 30) * scale, jobs=a.jobs,
                                     workers=workers, supervisors=sups)
                    self.record("scaling", "kickq", f"{sups}x{workers}", {}, rec)
        if "kickq" in peers and a.profile:  # separate runs: profiling slows what it watches
            for mode in ("one", "bulk"):
                rec = self.drive("kickq", f"enqueue-{mode}", (60 + a.jobs / 30) * scale, jobs=a.jobs,
                                 profile=profile_dir)
                self.record(f"profile-enqueue-{mode}", "kickq", "default", {}, rec)
            rec = self.drive("kickq", "drain", (60 + a.jobs / 30) * scale, jobs=a.jobs, workers=2,
                             profile=profile_dir)
            self.record("profile-drain", "kickq", "default", {}, rec)
            rec = self.drive("kickq", "latency", (120 + a.latency_count * 0.2) * scale, count=a.latency_count,
                             profile=profile_dir)
            self.record("profile-latency", "kickq", "default", {}, rec)
            fastest = self.fastest_peer("latency", "start_p50")
            if fastest:  # its Redis side, beside kickq's (<peer>-redis-latency.txt)
                peer, variant = fastest
                rec = self.drive(peer, "latency", (120 + a.latency_count * 0.2) * scale,
                                 count=a.latency_count, variant=variant, profile=profile_dir)
                self.record("profile-latency", peer, variant, {}, rec)
            for leftover in Path(profile_dir).rglob("*.prof"):
                leftover.unlink()
            shutil.rmtree(Path(profile_dir) / "worker", ignore_errors=True)
            for name in ("kickq-worker.pyspy.txt", "kickq-worker.pyspy.log"):  # raw stacks, py-spy's chatter
                if (Path(profile_dir) / name).exists():
                    (Path(profile_dir) / name).unlink()
        if "kickq" in peers and "shards" in a.case_list:
            self.run_shards()
        for module in a.extra:
            self.run_extra(module)

    def run_shards(self) -> None:
        """kickq on a 3-master Redis Cluster started for this case alone (bench/cluster.py), stopped
        after it; every run of every variant (bench/shards.py) against the same cluster."""
        from bench import cluster, shards
        a = self.args
        try:
            nodes = cluster.start_cluster(self.workdir / "cluster", masters=3)
        except Exception as exc:  # noqa: BLE001 - reported; the rest of the bench goes on
            for variant in shards.VARIANTS:
                self.task("shards", "kickq", variant)["errors"].append(
                    f"the cluster did not start: {type(exc).__name__}: {exc}")
            print(f"shards: the cluster did not start: {exc}", flush=True)
            return
        self.keep |= nodes.pids
        print(f"shards: 3-master cluster {nodes.url} up in {nodes.startup_seconds:.1f} s", flush=True)
        try:
            for _ in range(a.runs):
                for variant in shards.VARIANTS:
                    rec = self.drive("kickq", "shards", (90 + a.jobs / 30) * a.timeout_scale, url=nodes.url,
                                     jobs=a.jobs, workers=2, variant=variant)
                    self.record("shards", "kickq", variant, {}, rec)
                    if "skipped" in rec.get("result", {}):
                        return  # the same answer for every variant and run
        finally:
            nodes.stop()
            self.keep -= nodes.pids
            left = procs.kill_all(procs.descendants(self.keep))
            if left:
                self.results["leaks"].append({"peer": "kickq", "case": "shards", "processes": left})

    def run_extra(self, module: str) -> None:
        """Hook for the other kickq benches (bench.create, bench.supervisor, bench.aio): their own output."""
        try:
            done = subprocess.run([sys.executable, "-m", module], cwd=REPO, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=1800 * self.args.timeout_scale)
            text = done.stdout if done.returncode == 0 else f"exit {done.returncode}:\n{done.stderr[-3000:]}"
        except subprocess.TimeoutExpired:
            text = "timed out"
        procs.kill_all(procs.descendants(self.keep))
        self.results["extras"].append({"module": module, "output": text})


def redis_baseline(url: str, idle_seconds: float = 2.0) -> dict[str, float]:
    """What the bench's Redis spends per second with no queue at work (its cron, one idle client):
    a part of every phase's Redis CPU that is not the queue's."""
    import redis
    with redis.Redis.from_url(url) as client:
        time.sleep(0.5)  # past start-up
        before = redis_cpu.sample(client)
        time.sleep(idle_seconds)
        after = redis_cpu.sample(client)
    idle = redis_cpu.per_job(before, after, 1)
    return {"idle_seconds": idle_seconds, "idle_us_per_second": idle["us_per_job"] / idle_seconds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.become_subreaper()
    from tests.helpers import start_redis, stop_redis

    import redis

    from bench import report
    workdir = Path(tempfile.mkdtemp(prefix="kickq-bench-"))
    facts = machine_facts()
    redis_proc, port = start_redis(workdir)
    url = f"redis://127.0.0.1:{port}/0"
    keep = {redis_proc.pid}
    runner = Runner(args, url, workdir, keep)
    started = time.monotonic()
    print(f"redis-server on port {port}; work dir {workdir}", flush=True)
    try:
        with redis.Redis.from_url(url) as probe:
            server = probe.info("server")
        facts["redis"] = server["redis_version"]
        runner.results["redis_baseline"] = redis_baseline(url)
        runner.run()
    except KeyboardInterrupt:
        runner.results["interrupted"] = True
        print("interrupted: writing what was measured", flush=True)
    finally:
        procs.kill_all(procs.descendants(keep))
        stop_redis(redis_proc)
        procs.reap_zombies()
        left = procs.kill_all(procs.descendants())
        facts["loadavg_end"] = os.getloadavg()
    runner.results.update({
        "machine": facts, "elapsed_seconds": time.monotonic() - started,
        "processes_left_at_end": left,
        "config": {k: v for k, v in vars(args).items() if k not in ("peers", "case_list")},
        "command": shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]),
    })
    for task in runner.results["tasks"]:
        task["summary"] = report.summarize(task["runs"])
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_name("results.json")
    json_path.write_text(json.dumps(runner.results, indent=1, default=str) + "\n")
    out.write_text(report.render(runner.results))
    print(f"wrote {out} and {json_path} ({runner.results['elapsed_seconds']:.0f} s); "
          f"processes left at the end: {len(left)}", flush=True)
    if runner.results["leaks"]:
        print(f"warning: {len(runner.results['leaks'])} case(s) left processes behind (killed): "
              "see results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
