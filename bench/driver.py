"""Run one case for one queue, in that queue's interpreter, and write the measurements as JSON.

    python -m bench.driver --peer rq --case drain --variant simple --jobs 2000 --url redis://... \
        --workdir DIR --out result.json

The runner (python -m bench) calls this once per (case, peer, variant, run), so peers never share a
process and each one's imports, connections and memory stay its own. Every case starts with FLUSHDB.
Cases: enqueue-one, enqueue-bulk, drain, sleep (I/O-bound jobs), latency, memory; kickq only:
deadline, orphan (see bench/kickq_cases.py), shards (a Redis Cluster URL, see bench/shards.py).
enqueue and drain read the Redis server's INFO cpu before and after the timed part (bench/redis_cpu.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import procs as bench_procs
from bench import redis_cpu


def load_adapter(peer: str, url: str) -> Any:
    from bench.peers import PEERS
    from bench.peers.base import Adapter
    module = importlib.import_module(f"bench.peers.{PEERS[peer]}")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Adapter) and value.name == peer:
            return value(url)
    raise LookupError(f"no adapter named {peer} in {module.__name__}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))  # nearest rank
    return ordered[index]


def profiled(path: Path | None, fn: Any, *args: Any) -> Any:
    if path is None:
        return fn(*args)
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        return fn(*args)
    finally:
        prof.disable()
        prof.dump_stats(str(path))


def summarize_profiles(files: list[Path], out: Path, title: str) -> None:
    """A text summary (top functions by own time and by cumulative time) of cProfile dumps."""
    import io
    import pstats
    files = [f for f in files if f.exists()]
    if not files:
        out.write_text(f"{title}\n\nno profile data was written\n")
        return
    buf = io.StringIO()
    stats = pstats.Stats(*[str(f) for f in files], stream=buf)
    stats.strip_dirs()
    buf.write(f"{title}\n{len(files)} profile(s): {', '.join(f.name for f in files)}\n\n")
    buf.write("=== by own time (tottime) ===\n")
    stats.sort_stats("tottime").print_stats(30)
    buf.write("=== by cumulative time ===\n")
    stats.sort_stats("cumulative").print_stats(30)
    out.write_text(buf.getvalue())


def slowlog_start(r: Any, room: int) -> None:
    """Log every command Redis runs (SLOWLOG at 0 µs) from now on: a profile of the Redis side."""
    r.config_set("slowlog-max-len", room)
    r.config_set("slowlog-log-slower-than", 0)
    r.slowlog_reset()


def slowlog_summary(r: Any, probes: int, room: int, out: Path, title: str) -> None:
    """What Redis ran since slowlog_start, per command (a script call per function or script): calls
    per probe, the median and total of its execution time. Commands a script calls are logged too;
    their time is part of the script's."""
    entries = r.slowlog_get(room)
    r.config_set("slowlog-log-slower-than", 10000)  # Redis' default
    r.slowlog_reset()
    by_command: dict[str, list[int]] = {}
    for entry in entries:
        words = entry["command"].decode("latin-1").split()
        name = words[0].upper() if words else "?"
        if name in ("FCALL", "FCALL_RO", "EVALSHA", "EVAL") and len(words) > 1:
            # kickq's functions are kickq_<hash>_<script>; a script by its SHA's first 12 digits
            name += " " + (words[1].split("_", 2)[-1] if name.startswith("FCALL") else words[1][:12])
        by_command.setdefault(name, []).append(int(entry["duration"]))
    rows = sorted(by_command.items(), key=lambda kv: -sum(kv[1]))
    lines = [title, "",
             "=== by own time (Redis, µs; a script's commands are listed too, their time inside the "
             "script's) ===",
             f"{'command':<28} {'calls/probe':>11} {'median µs':>10} {'µs/probe':>9}"]
    for name, durations in rows[:20]:
        if name in ("SLOWLOG", "CONFIG"):
            continue
        lines.append(f"{name:<28} {len(durations) / probes:>11.2f} {statistics.median(durations):>10.1f} "
                     f"{sum(durations) / probes:>9.1f}")
    out.write_text("\n".join(lines) + "\n")


# --- cases ------------------------------------------------------------------------------------------

def case_enqueue(ad: Any, args: argparse.Namespace, bulk: bool) -> dict[str, Any]:
    method = ad.enqueue_bulk if bulk else ad.enqueue_one
    if method is None:
        return {"skipped": f"{ad.label} has no bulk enqueue API"}
    ad.enqueue_one(1)  # warm up: connection, scripts, queue declarations
    kind = "bulk" if bulk else "one"
    prof = Path(args.profile) / f"{ad.name}-enqueue-{kind}.prof" if args.profile else None
    meter = redis_cpu.Meter(ad.redis)
    meter.start()
    started = time.perf_counter()
    profiled(prof, method, args.jobs)
    elapsed = time.perf_counter() - started
    meter.stop()
    queued = ad.queued()
    if queued != args.jobs + 1:
        raise RuntimeError(f"{ad.name}: {queued} jobs queued, expected {args.jobs + 1}")
    if prof:
        summarize_profiles([prof], prof.with_suffix(".txt"),
                           f"{ad.label}: enqueue {args.jobs} jobs {'in bulk' if bulk else 'one by one'}")
    return {"seconds": elapsed, "rate": args.jobs / elapsed, "redis_cpu": meter.per_job(args.jobs)}


def py_spy_start(ad: Any, roots: list[Any], out: Path) -> Any:
    """Sample one kickq worker with py-spy (if it is installed) until stopped; None if not possible."""
    import shutil
    import subprocess
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        return None
    from bench.peers.base import tree
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = [p for p in tree(roots) if "worker" in " ".join(p.cmdline())]
        if workers:
            break
        time.sleep(0.01)
    else:
        return None
    log = open(out.with_suffix(".log"), "wb")
    return subprocess.Popen([spy, "record", "--pid", str(workers[0].pid), "--rate", "1000", "--format", "raw",
                             "--output", str(out), "--nonblocking"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def summarize_py_spy(raw: Path, out: Path) -> None:
    """Top functions by own samples and by inclusive samples from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count
    lines = [f"py-spy, one kickq worker during the drain: {total} samples", "", "=== own samples ==="]
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:30]]
    lines += ["", "=== inclusive samples ==="]
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:30]]
    out.write_text("\n".join(lines) + "\n")


def case_drain(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    from bench.peers import body
    from bench.peers.base import stop
    logdir = Path(args.workdir)
    fill_started = time.perf_counter()
    ad.fill(args.jobs)
    fill_seconds = time.perf_counter() - fill_started
    queued = ad.queued()
    if queued != args.jobs:
        raise RuntimeError(f"{ad.name}: {queued} jobs queued before the workers start, expected {args.jobs}")
    extra: dict[str, Any] = {}
    profile_dir = Path(args.profile) if args.profile and ad.name == "kickq" else None
    if profile_dir:
        (profile_dir / "worker").mkdir(parents=True, exist_ok=True)
        extra["extra_env"] = {"BENCH_PROFILE_DIR": str(profile_dir / "worker")}
    meter = redis_cpu.Meter(ad.redis)  # from the workers' start to the last completion, as the time
    meter.start()
    started = time.perf_counter()
    roots = ad.start_workers(args.workers, args.variant, logdir, supervisors=args.supervisors, **extra)
    spy = None
    try:
        if profile_dir:
            spy = py_spy_start(ad, roots, profile_dir / "kickq-worker.pyspy.txt")
        times = ad.wait_done(args.jobs, roots, args.timeout, logdir)
        meter.stop()
        if args.body == "incr":  # every completion counted in the file came after its INCR
            incremented = int(ad.redis.get(body.DONE) or 0)
            if incremented < args.jobs:
                raise RuntimeError(f"{ad.name}: {incremented} INCRs for {args.jobs} completions")
        if profile_dir:
            time.sleep(1.1)  # the workers dump their profile on the next job after a second
            ad.enqueue_one(args.workers * args.supervisors * 4)
            time.sleep(0.5)
    finally:
        if spy is not None:
            import signal
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=20)
            except Exception:  # noqa: BLE001
                spy.kill()
        stop(roots)
    elapsed = times["last"] - started
    result = {"seconds": elapsed, "rate": args.jobs / elapsed, "fill_seconds": fill_seconds,
              "first_completion": times["first"] - started,
              "steady_rate": (args.jobs - times["first_count"]) / max(1e-9, times["last"] - times["first"]),
              "redis_cpu": meter.per_job(args.jobs)}
    if profile_dir:
        summarize_profiles(sorted((profile_dir / "worker").glob("worker-*.prof")),
                           profile_dir / "kickq-worker.txt",
                           f"kickq workers (cProfile from each one's first job), drain of {args.jobs} jobs")
        raw = profile_dir / "kickq-worker.pyspy.txt"
        if raw.exists() and raw.stat().st_size:
            summarize_py_spy(raw, profile_dir / "kickq-worker.pyspy-summary.txt")
    return result


IO_IN_FLIGHT = 16  # jobs in flight in every setup of the sleep case (the adapters' io_variants)


def case_sleep(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Drain args.jobs pre-enqueued jobs that each sleep args.sleep s, with 16 in flight in one of the
    peer's I/O setups; the steady rate runs from 10 % to 90 % of the completions (start-up and the
    last jobs' tail left out), the PSS of the worker tree is taken after the last completion."""
    from bench.peers.base import stop, tree_memory
    logdir = Path(args.workdir)
    ad.fill(args.jobs)
    queued = ad.queued()
    if queued != args.jobs:
        raise RuntimeError(f"{ad.name}: {queued} jobs queued before the workers start, expected {args.jobs}")
    marks = (max(1, args.jobs // 10), max(1, args.jobs * 9 // 10))
    started = time.perf_counter()
    roots = ad.start_io_workers(args.variant, logdir)
    try:
        times = ad.wait_done(args.jobs, roots, args.timeout, logdir, marks=marks)
        memory = tree_memory(roots)  # the whole tree, before it is stopped
    finally:
        stop(roots)
    (n10, t10), (n90, t90) = times["marks"]
    steady = (n90 - n10) / max(1e-9, t90 - t10)
    ideal = IO_IN_FLIGHT / args.sleep
    elapsed = times["last"] - started
    return {"seconds": elapsed, "rate": args.jobs / elapsed, "first_completion": times["first"] - started,
            "steady_rate": steady, "ideal_rate": ideal, "to_ideal": steady / ideal,
            "memory": memory, "per_100mib_pss": steady / (memory["pss"] / (100 * 2**20))}


def case_latency(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    from bench.peers import body
    from bench.peers.base import stop, tree_memory
    logdir = Path(args.workdir)
    roots = ad.start_workers(2, args.variant, logdir)
    try:
        started = time.perf_counter()
        ready = False
        while not ready:  # the first probe waits for the pool to come up
            try:
                ad.roundtrip(time.time())
                ready = True
            except Exception:  # noqa: BLE001 - timed out: workers still starting
                if time.perf_counter() - started > args.timeout / 2 or all(p.poll() is not None
                                                                          for p in roots):
                    raise
        startup = time.perf_counter() - started
        for _ in range(10):
            ad.roundtrip(time.time())
        time.sleep(0.5)
        rest_before = tree_memory(roots)
        ad.redis.delete(body.STARTS)
        prof_path = None
        if args.profile and ad.name == "kickq":
            prof_path = Path(args.profile) / f"{ad.name}-roundtrip.prof"
        prof = None
        if prof_path:
            import cProfile
            prof = cProfile.Profile()
        redis_log = args.profile and Path(args.profile) / f"{ad.name}-redis-latency.txt"
        room = args.count * 60
        if redis_log:
            slowlog_start(ad.redis, room)
        to_result: list[float] = []
        for _ in range(args.count):
            time.sleep(args.gap)  # the pool is idle again when the next job comes
            if prof:
                prof.enable()
            t0 = time.time()
            ad.roundtrip(t0)
            to_result.append((time.time() - t0) * 1000)
            if prof:
                prof.disable()
        if redis_log:
            slowlog_summary(ad.redis, args.count, room, redis_log,
                            f"{ad.label}: Redis' own time per command over {args.count} idle round trips")
        if prof and prof_path:
            prof.dump_stats(str(prof_path))
            summarize_profiles([prof_path], prof_path.with_suffix(".txt"),
                               f"{ad.label}: {args.count} round trips (producer side, idle gaps left out)")
        time.sleep(0.5)
        rest_after = tree_memory(roots)
    finally:
        stop(roots)
    to_start = []
    for item in ad.redis.lrange(body.STARTS, 0, -1):
        t0, start = item.decode().split()
        to_start.append((float(start) - float(t0)) * 1000)
    if len(to_start) != args.count:
        raise RuntimeError(f"{ad.name}: {len(to_start)} start stamps for {args.count} probes")
    return {
        "count": args.count, "startup_seconds": startup,
        "start_p50": percentile(to_start, 50), "start_p99": percentile(to_start, 99),
        "start_mean": statistics.fmean(to_start), "start_max": max(to_start),
        "result_p50": percentile(to_result, 50), "result_p99": percentile(to_result, 99),
        "result_mean": statistics.fmean(to_result), "result_max": max(to_result),
        "rest_memory": rest_after, "rest_memory_before_probes": rest_before,
    }


def case_memory(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    return ad.memory_probe(args.jobs)


def run_case(ad: Any, args: argparse.Namespace) -> dict[str, Any]:
    if args.case == "info":
        return info(ad)
    if args.case in ("enqueue-one", "enqueue-bulk"):
        return case_enqueue(ad, args, bulk=args.case == "enqueue-bulk")
    if args.case == "drain":
        return case_drain(ad, args)
    if args.case == "sleep":
        return case_sleep(ad, args)
    if args.case == "latency":
        return case_latency(ad, args)
    if args.case == "memory":
        return case_memory(ad, args)
    from bench import kickq_cases
    return kickq_cases.run(args.case, ad, args)


def info(ad: Any) -> dict[str, Any]:
    """What the runner needs to know about a peer before running it: versions and capabilities."""
    import platform
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {"label": ad.label, "version": version(ad.package), "redis_py": version("redis"),
            "hiredis": version("hiredis"), "python": platform.python_version(), "executable": sys.executable,
            "variants": ad.variants, "io_variants": ad.io_variants, "bulk_label": ad.bulk_label,
            "notes": ad.notes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True)
    p.add_argument("--case", required=True,
                   choices=["info", "enqueue-one", "enqueue-bulk", "drain", "sleep", "latency", "memory",
                            "deadline", "orphan", "shards"])
    p.add_argument("--variant", default="default")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--body", choices=["noop", "incr"], default="noop",
                   help="drain: how a no-op job marks its completion (bench/peers/body.py)")
    p.add_argument("--sleep", type=float, default=0.05, help="sleep case: seconds each job sleeps (0.05)")
    p.add_argument("--supervisors", type=int, default=1)
    p.add_argument("--count", type=int, default=500, help="latency probes / deadline or orphan trials")
    p.add_argument("--gap", type=float, default=0.005, help="idle time before each latency probe (s)")
    p.add_argument("--process-timeout", type=float, default=1.0, help="deadline / orphan cases (s)")
    p.add_argument("--timeout", type=float, default=300, help="bound of the case (s)")
    p.add_argument("--url", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--profile", help="write cProfile / py-spy summaries of kickq here")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    bench_procs.become_subreaper()
    os.environ["BENCH_REDIS_URL"] = args.url
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_BODY"] = "sleep" if args.case == "sleep" else args.body
    os.environ["BENCH_SLEEP"] = repr(args.sleep)
    os.environ["BENCH_DONE_FILE"] = str(Path(args.workdir) / "done")
    Path(os.environ["BENCH_DONE_FILE"]).write_bytes(b"")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"peer": args.peer, "case": args.case, "variant": args.variant}
    code = 0
    ad = None
    try:
        import redis
        if args.case == "shards":  # a cluster URL: no adapter; the case flushes each master itself
            from bench import shards
            out["result"] = shards.run(args)
        else:
            if args.case != "info":
                redis.Redis.from_url(args.url).flushdb()
            ad = load_adapter(args.peer, args.url)
            out["result"] = run_case(ad, args)
    except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-4000:]
        code = 1
    finally:
        if ad is not None:
            try:
                ad.close()
            except Exception:  # noqa: BLE001
                pass
        left = bench_procs.kill_all(bench_procs.descendants())
        if left:
            out["left_running"] = left
    Path(args.out).write_text(json.dumps(out, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
