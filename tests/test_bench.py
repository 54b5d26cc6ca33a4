"""The bench harness: kickq's adapter end to end through the driver, and the report.

The peers are not installed in the test venv (they live in .bench-venv), so only kickq's adapter is
driven here; `make bench` exercises the others. The driver runs as a subprocess (it makes itself a
subreaper and kills what it started) against database 9 of the session's server, which it flushes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import cluster, redis_cpu, report

REPO = Path(__file__).resolve().parents[1]


def drive(url: str, tmp_path: Path, case: str, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{case}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "bench.driver", "--peer", "kickq", "--case", case, "--url", url,
           "--workdir", str(tmp_path / case), "--out", str(out), "--timeout", "60", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    record = json.loads(out.read_text())
    assert done.returncode == 0, record.get("traceback") or done.stderr
    assert "left_running" not in record
    return record["result"]


@pytest.mark.slow
def test_kickq_adapter_end_to_end(redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://{redis_server.host}:{redis_server.port}/9"
    one = drive(url, tmp_path, "enqueue-one", "--jobs", "50")
    bulk = drive(url, tmp_path, "enqueue-bulk", "--jobs", "50")
    assert one["rate"] > 0 and bulk["rate"] > 0
    # every create runs a script in Redis: its CPU per job cannot be zero
    assert one["redis_cpu"]["us_per_job"] > 0 and one["redis_cpu"]["jobs"] == 50
    drain = drive(url, tmp_path, "drain", "--jobs", "50", "--workers", "2")
    assert drain["rate"] > 0 and drain["first_completion"] <= drain["seconds"]
    assert (tmp_path / "drain" / "done").stat().st_size == 50  # one byte per no-op job
    assert drain["redis_cpu"]["us_per_job"] > 0
    drain_io = drive(url, tmp_path, "drain", "--jobs", "50", "--workers", "2", "--body", "incr")
    # counted in the file too, so the harness never polls the queue's Redis (the driver checks the INCRs)
    assert drain_io["rate"] > 0 and (tmp_path / "drain" / "done").stat().st_size == 50
    # I/O-bound jobs, 16 in flight: 16 worker processes, each job sleeping 50 ms
    sleep = drive(url, tmp_path, "sleep", "--jobs", "64", "--variant", "16 processes", "--sleep", "0.05")
    assert (tmp_path / "sleep" / "done").stat().st_size == 64
    assert sleep["memory"]["processes"] == 18  # master, 16 workers, reaper; measured before the stop
    assert 0 < sleep["steady_rate"] and sleep["ideal_rate"] == 320 and sleep["per_100mib_pss"] > 0
    # the same with one dense worker (jobs_per_worker 16, async): master, worker, reaper
    (tmp_path / "dense").mkdir()
    dense = drive(url, tmp_path / "dense", "sleep", "--jobs", "64", "--variant", "dense async 1 × 16",
                  "--sleep", "0.05")
    assert (tmp_path / "dense" / "sleep" / "done").stat().st_size == 64 and dense["memory"]["processes"] == 3
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    latency = drive(url, tmp_path, "latency", "--count", "5", "--profile", str(profiles))
    assert 0 < latency["start_p50"] <= latency["result_p99"] + 1000
    assert latency["rest_memory"]["processes"] == 4  # master, 2 workers, reaper
    # the Redis side of the round trips, read as the report reads it: one create per probe, its finish
    monkeypatch.setattr(report, "PROFILES", profiles)
    calls = {command: row[0] for command, row in report.redis_side("kickq-redis-latency.txt").items()}
    assert calls["FCALL create"] == 1 and calls["FCALL finish_many"] >= 1
    memory = drive(url, tmp_path, "memory", "--jobs", "100")
    assert memory["bytes_per_job"] > 0


def fake_results() -> dict[str, Any]:
    def task(case: str, peer: str, runs: list[dict[str, Any]], variant: str = "default") -> dict[str, Any]:
        return {"case": case, "peer": peer, "variant": variant, "params": {}, "runs": runs, "errors": [],
                "summary": report.summarize(runs)}
    rest = {"pss": 40 * 2**20, "rss": 100 * 2**20, "processes": 4,
            "detail": [{"cmd": "kickq-supervisor: master [bench]", "pss": 10 * 2**20, "rss": 25 * 2**20}]}
    return {
        "machine": {"cpu": "test", "cores": 2, "date": "today", "loadavg_start": (0, 0, 0),
                    "loadavg_end": (0, 0, 0)},
        "config": {"jobs": 100, "runs": 2, "latency_count": 5, "memory_jobs": 10},
        "peers": {"kickq": {"status": "ok", "label": "kickq", "variants": {"default": "sup"},
                            "bulk_label": "create_many"},
                  "rq": {"status": "ok", "label": "RQ", "variants": {"fork": "f", "simple": "s"},
                         "bulk_label": "enqueue_many"},
                  "dramatiq": {"status": "ok", "label": "Dramatiq", "bulk_label": "group(...).run()",
                               "variants": {"8 threads": "dramatiq -p n", "1 thread": "dramatiq -p n -t 1"}},
                  "arq": {"status": "does not run here: ImportError"}},
        "tasks": [
            task("enqueue-one", "kickq", [{"rate": 100.0, "seconds": 1.0}, {"rate": 300.0, "seconds": 0.3}]),
            task("enqueue-one", "rq", [{"rate": 150.0, "seconds": 1.0}]),
            task("enqueue-bulk", "kickq", [{"rate": 1000.0, "seconds": 0.1}]),
            task("enqueue-bulk", "rq", [{"rate": 400.0, "seconds": 0.2}]),
            task("drain", "kickq", [{"rate": 900.0, "seconds": 1.0, "steady_rate": 1000.0,
                                     "first_completion": 0.2, "redis_cpu": {"us_per_job": 50.0}}]),
            task("drain", "rq", [{"rate": 100.0, "seconds": 9.0, "steady_rate": 110.0,
                                  "first_completion": 0.5, "redis_cpu": {"us_per_job": 150.0}}], "simple"),
            task("drain", "dramatiq", [{"rate": 400.0, "seconds": 2.0, "steady_rate": 420.0,
                                        "first_completion": 0.3}], "8 threads"),
            task("drain", "dramatiq", [{"rate": 120.0, "seconds": 7.0, "steady_rate": 125.0,
                                        "first_completion": 0.3}], "1 thread"),
            task("drain-io", "kickq", [{"rate": 450.0, "seconds": 2.0, "steady_rate": 500.0,
                                        "first_completion": 0.2}]),
            task("drain-io", "rq", [{"rate": 300.0, "seconds": 3.0, "steady_rate": 310.0,
                                     "first_completion": 0.5}], "simple"),
            task("latency", "kickq", [{"start_p50": 1.0, "start_p99": 3.0, "result_p50": 2.0,
                                       "result_p99": 4.0, "rest_memory": rest}]),
            task("memory", "kickq", [{"bytes_per_job": 200.0, "keys": 11}]),
            task("memory", "rq", [{"bytes_per_job": 150.0, "keys": 12}]),
            task("orphan", "kickq", [{"process_timeout": 1.0, "trials": [{"ghost_error": "lease expired"}],
                                      "kill_to_rerun_ms": {"p50": 2000.0, "max": 2100.0, "n": 1}}]),
            task("scaling", "kickq", [{"rate": 500.0, "seconds": 0.2, "steady_rate": 600.0}], "1x1"),
        ],
        "leaks": [], "processes_left_at_end": [], "extras": [],
        "redis_baseline": {"idle_us_per_second": 1000.0},
    }


def test_summary_is_the_median_of_the_runs() -> None:
    runs = [{"rate": 1.0, "m": {"pss": 10}, "l": [1]}, {"rate": 3.0, "m": {"pss": 30}, "l": [2]},
            {"rate": 2.0, "m": {"pss": 20}, "l": [3]}]
    assert report.summarize(runs) == {"rate": 2.0, "m": {"pss": 20}}


def test_report_renders_ratios_and_targets() -> None:
    text = report.render(fake_results())
    assert "| kickq | 200 | 1.00× | create_many | 1,000 | 1.00× | 100, 300 / 1,000 |" in text
    assert "| RQ | 150 | 0.75× | enqueue_many | 400 | 0.40× | 150 / 400 |" in text
    assert "| RQ (simple) | s | 100 | 0.11× |" in text
    assert "| RQ (fork) | f | not run |" in text
    assert "| RQ (simple) | s | 300 | 0.67× |" in text  # the drain-io table
    assert "does not run here: ImportError" in text
    # a peer run two ways (Dramatiq's default threads and one thread) has a row for each
    assert "| Dramatiq (8 threads) | dramatiq -p n | 400 | 0.44× |" in text
    assert "| Dramatiq (1 thread) | dramatiq -p n -t 1 | 120 | 0.13× |" in text
    assert "8 threads: `dramatiq -p n`; 1 thread: `dramatiq -p n -t 1`." in text  # how each queue runs
    rows = {row[0]: row for row in report.targets(report.View(fake_results()))}
    assert rows["processing ≥ 2× the fastest peer"][2] == "met"
    processing = rows["processing ≥ 2× the fastest peer"][1]
    assert processing.startswith("kickq 900/s, Dramatiq (8 threads) 400/s: 2.25×")
    assert rows["processing ≥ 2× the fastest peer"][1].endswith("RQ (simple) 300/s: 1.50×)")
    assert rows["enqueue one by one ≥ the fastest peer"][2] == "met"
    assert rows["bulk create ≥ 2× RQ enqueue_many"][2] == "met"
    assert rows["Redis memory per job ≤ the leanest peer"][2].startswith("**missed** (+50 B/job)")
    assert rows["a killed supervisor's job recovered ≤ process_timeout + 2 s"][2] == "met"
    assert rows["runaway job dead and ghosted ≤ 100 ms after its deadline (p99)"][1] == "not measured"


def test_the_redis_side_of_a_missed_latency_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target rows say why from the --profile run's SLOWLOG files: kickq's scripts per round
    trip against all of the fastest peer's commands."""
    monkeypatch.setattr(report, "PROFILES", tmp_path)
    header = ["title", "", "=== by own time (Redis) ===", "command  calls/probe  median µs  µs/probe"]
    (tmp_path / "kickq-redis-latency.txt").write_text("\n".join(header + [
        "FCALL finish_many   2.00   184.0   392.6", "FCALL create   1.00   307.0   321.5",
        "XADD   3.00   6.0   25.2"]) + "\n")
    (tmp_path / "huey-redis-latency.txt").write_text("\n".join(header + [
        "LPUSH   2.00   9.5   21.6", "BLPOP   1.00   16.0   16.8"]) + "\n")
    assert report.redis_latency_profiles() == ["kickq-redis-latency.txt", "huey-redis-latency.txt"]
    assert report.redis_side("kickq-redis-latency.txt")["FCALL create"] == (1.0, 307.0, 321.5)
    text = report.redis_side_text()
    assert "kickq's scripts 714 µs (finish_many 184 µs × 2.0, create 307 µs × 1.0)" in text
    assert "huey's commands 38 µs in all" in text
    rows = {row[0]: row for row in report.targets(report.View(fake_results()))}
    why = rows["idle enqueue-to-start p99 ≤ 2 ms"][3]  # missed in the fake results: 3 ms
    assert why.startswith("Redis' time per round trip") and "bench/profiles/huey-redis-latency.txt" in why


def test_redis_cpu_per_job_from_two_info_samples() -> None:
    """µs per job from INFO cpu's seconds: the process' sys + user, each, and the main thread's."""
    before = {"used_cpu_sys": 10.0, "used_cpu_user": 20.0,
              "used_cpu_sys_main_thread": 9.0, "used_cpu_user_main_thread": 19.5}
    after = {"used_cpu_sys": 10.4, "used_cpu_user": 20.6,
             "used_cpu_sys_main_thread": 9.3, "used_cpu_user_main_thread": 20.0}
    cpu = redis_cpu.per_job(before, after, 20_000)
    assert cpu["us_per_job"] == pytest.approx(50.0)  # 1.0 s over 20,000 jobs
    assert cpu["sys_us_per_job"] == pytest.approx(20.0) and cpu["user_us_per_job"] == pytest.approx(30.0)
    assert cpu["main_thread_us_per_job"] == pytest.approx(40.0) and cpu["seconds"] == pytest.approx(1.0)
    # a server without the main thread's fields (before Redis 6.0): the process' figures only
    older = redis_cpu.per_job({"used_cpu_sys": 1.0, "used_cpu_user": 1.0},
                              {"used_cpu_sys": 1.001, "used_cpu_user": 1.002}, 100)
    assert older["us_per_job"] == pytest.approx(30.0) and "main_thread_us_per_job" not in older
    with pytest.raises(ValueError):
        redis_cpu.per_job(before, after, 0)
    with pytest.raises(KeyError):
        redis_cpu.per_job({}, after, 1)


def test_redis_cpu_meter_reads_info_cpu_as_redis_py_returns_it() -> None:
    class FakeInfo:
        """What redis-py's info("cpu") returns: floats by field name, children fields included."""
        def __init__(self) -> None:
            self.replies = [{"used_cpu_sys": 1.5, "used_cpu_user": 2.25, "used_cpu_sys_children": 0.0},
                            {"used_cpu_sys": 1.75, "used_cpu_user": 2.5, "used_cpu_sys_children": 9.0}]

        def info(self, section: str) -> dict[str, float]:
            assert section == "cpu"
            return self.replies.pop(0)
    meter = redis_cpu.Meter(FakeInfo())
    meter.start()
    meter.stop()
    assert meter.per_job(1000)["us_per_job"] == pytest.approx(500.0)  # children (a save's fork) left out


def test_report_gives_redis_cpu_per_job_and_its_ratio() -> None:
    results = fake_results()
    for t in results["tasks"]:
        if t["case"] == "enqueue-one" and t["peer"] == "kickq":
            for run, cpu in zip(t["runs"], (80.0, 100.0), strict=True):
                run["redis_cpu"] = {"us_per_job": cpu}
            t["summary"] = report.summarize(t["runs"])
    text = report.render(results)
    # the drain table: RQ's 150 µs per job is 3× kickq's 50
    assert "| RQ (simple) | s | 100 | 0.11× | 110 | 0.50 | 9.00 | 150.0 | 3.00× |" in text
    assert "| kickq | sup | 900 | 1.00× | 1,000 | 0.20 | 1.00 | 50.0 | 1.00× |" in text
    # the idle server's CPU (1,000 µs/s) over each run's seconds: 10 µs per job for kickq's 1 s, 100 jobs
    assert ("and the server's idle work (its cron, 1,000 µs per second here: 10.0 to 90.0 µs per job "
            "above, the most in the slowest run, RQ (simple))") in text
    # enqueue: the median of kickq's two runs, each beside it; RQ's runs have no figure
    assert "| kickq | 90.0 (80.0, 100.0) | 1.00× | — | — |" in text
    assert "| RQ | — | — | — | — |" in text


def test_report_gives_the_sleep_case_and_a_failed_dense_row() -> None:
    """Section 2c: each setup's steady rate, PSS and rate per 100 MiB; a setup whose workers did not
    start shows its error in its own row, and the summary under the targets compares kickq's dense
    setups with the densest peer setup."""
    results = fake_results()
    results["config"]["sleep_jobs"] = 2000
    results["peers"]["kickq"]["io_variants"] = {"16 processes": "concurrent_jobs 16",
                                                "dense async": "jobs_per_worker 8 | async"}
    results["peers"]["rq"]["io_variants"] = {"worker-pool 16": "rq worker-pool -n 16"}

    def run(steady: float, pss_mib: float) -> dict[str, Any]:
        return {"rate": steady * 0.8, "seconds": 8.0, "steady_rate": steady, "to_ideal": steady / 320,
                "per_100mib_pss": steady / (pss_mib / 100),
                "memory": {"pss": pss_mib * 2**20, "rss": 3 * pss_mib * 2**20, "processes": 18}}
    failed = ("BenchError: kickq: every worker exited after 0 of 2000 jobs; last log line: "
              "ConfigError: unknown process option 'jobs_per_worker'\n--- kickq-supervisor-0.log")
    for peer, variant, runs, errors in (
            ("kickq", "16 processes", [run(310.0, 200.0), run(300.0, 200.0)], []),
            ("kickq", "dense async", [], [failed]),
            ("rq", "worker-pool 16", [run(80.0, 160.0)], [])):
        results["tasks"].append({"case": "sleep", "peer": peer, "variant": variant, "params": {},
                                 "runs": runs, "errors": errors, "summary": report.summarize(runs)})
    text = report.render(results)
    assert "### 2c. I/O-bound jobs: drain 2,000 jobs that each sleep 50 ms, 16 in flight" in text
    assert ("| kickq (16 processes) | concurrent_jobs 16 | 18 | 244 | 305 | 0.95× | 200.0 | 152 "
            "| 310, 300 |") in text
    assert ("| kickq (dense async) | jobs_per_worker 8 / async | — | failed: BenchError: kickq: every worker "
            "exited after 0 of 2000 jobs; last log line: ConfigError: unknown process option "
            "'jobs_per_worker' | — |") in text
    assert "| RQ (worker-pool 16) | rq worker-pool -n 16 | 18 | 64 | 80 | 0.25× | 160.0 | 50 | 80 |" in text
    assert ("I/O-bound jobs, dense workers (issue 29, section 2c), steady jobs/s per 100 MiB of the worker "
            "tree's PSS: kickq (dense async) failed (section 2c); the best peer setup, RQ (worker-pool 16): "
            "50.") in text


def test_namespaces_are_picked_one_per_master() -> None:
    masters = [{"address": "a:1", "slots": [(0, 5460)]}, {"address": "b:2", "slots": [(5461, 10922)]},
               {"address": "c:3", "slots": [(10923, 16383)]}]
    slots = {"ns0": 9000, "ns1": 100, "ns2": 200, "ns3": 16000}
    picked = cluster.pick_namespaces(lambda ns: slots[ns], masters, prefix="ns")
    assert picked == [("ns1", 100), ("ns0", 9000), ("ns3", 16000)]  # in the masters' order
    assert cluster.owner(10922, masters)["address"] == "b:2"
    assert cluster.parse_url("redis+cluster://127.0.0.1:7001,127.0.0.1:7002") == [
        ("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    with pytest.raises(RuntimeError):
        cluster.pick_namespaces(lambda ns: 1, masters, prefix="ns", tries=50)


def test_report_says_why_the_shards_case_did_not_run() -> None:
    results = fake_results()
    masters = [{"address": f"127.0.0.1:700{i}", "id": "x", "slots": [[a, b]], "namespace": f"n{i}", "slot": a}
               for i, (a, b) in enumerate([(0, 5460), (5461, 10922), (10923, 16383)])]
    results["tasks"].append({"case": "shards", "peer": "kickq", "variant": "1ns-1sup", "params": {},
                             "runs": [], "errors": [],
                             "skipped": "not supported by this kickq: ValueError: scheme",
                             "skipped_detail": {"cluster": {"masters": masters}}, "summary": {}})
    text = report.render(results)
    assert "## 6. kickq on a 3-master Redis Cluster" in text
    assert "master2 127.0.0.1:7001 slots 5461-10922, namespace `n1` (slot 5461)" in text
    assert "Not run: not supported by this kickq: ValueError: scheme" in text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shards_case_on_a_real_cluster(tmp_path: Path) -> None:
    """A 3-master cluster starts, each namespace lands on its own master, and the driver's shards case
    either drains through kickq's cluster URL or says cleanly that this kickq does not take it; the
    cluster's processes are all gone after stop()."""
    import psutil
    import redis
    nodes = cluster.start_cluster(tmp_path / "cluster", masters=3)
    try:
        assert all(psutil.pid_exists(pid) for pid in nodes.pids)
        result = drive(nodes.url, tmp_path, "shards", "--jobs", "30", "--variant", "3ns-3sup")
        masters = (result.get("cluster") or {}).get("masters")
        assert masters and len(masters) == 3
        for master in masters:
            host, _, port = master["address"].rpartition(":")
            with redis.Redis(host=host, port=int(port)) as client:
                assert client.execute_command("CLUSTER", "KEYSLOT", "{" + master["namespace"] + "}") \
                    == master["slot"]
                assert any(a <= master["slot"] <= b for a, b in master["slots"])
                client.set("{" + master["namespace"] + "}:t", "1")  # served here: no MOVED
        if "skipped" in result:
            assert result["skipped"].startswith("not supported by this kickq")
        else:
            assert result["rate"] > 0 and result["namespaces"] == 3
            assert all(result["masters"][m]["redis_cpu_own_jobs"]["jobs"] == 10 for m in result["masters"])
    finally:
        nodes.stop()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in nodes.pids)
