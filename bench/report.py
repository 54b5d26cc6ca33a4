"""Turn the runner's results into bench/RESULTS.md (Markdown tables, ratios to kickq, targets)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parent / "profiles"
MiB = 1024 * 1024


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the runs of every numeric field (nested dicts too); lists are left out."""
    if not runs:
        return {}
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, bool):
            continue
        if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
        elif isinstance(first, dict) and all(isinstance(v, dict) for v in values):
            out[key] = summarize(values)  # type: ignore[arg-type]
    return out


class View:
    def __init__(self, results: dict[str, Any]) -> None:
        self.r = results
        self.peers: dict[str, Any] = results.get("peers", {})

    def task(self, case: str, peer: str, variant: str = "default") -> dict[str, Any] | None:
        for t in self.r.get("tasks", []):
            if t["case"] == case and t["peer"] == peer and t["variant"] == variant:
                return t
        return None

    def value(self, case: str, peer: str, variant: str, *path: str) -> float | None:
        t = self.task(case, peer, variant)
        if not t or not t.get("summary"):
            return None
        cur: Any = t["summary"]
        for key in path:
            if not isinstance(cur, dict) or key not in cur:
                return None
            cur = cur[key]
        return cur if isinstance(cur, (int, float)) else None

    def label(self, peer: str, variant: str = "default") -> str:
        info = self.peers.get(peer, {})
        name = info.get("label", peer)
        variants = info.get("variants") or {}
        # a variant the peer's drain rows do not list (a sleep-case setup, a scaling shape) is named too
        named = len(variants) > 1 or (variant != "default" and variant not in variants)
        return f"{name} ({variant})" if named else name

    def rows(self) -> list[tuple[str, str]]:
        """(peer, variant) of every queue that ran, kickq first."""
        out = []
        for peer, info in self.peers.items():
            if info.get("status") == "ok":
                out += [(peer, v) for v in info.get("variants", {"default": ""})]
        return out

    def status(self, case: str, peer: str, variant: str = "default") -> str:
        t = self.task(case, peer, variant)
        if t is None:
            return "not run"
        if t.get("skipped"):
            return "n/a"
        if t["errors"] and not t["runs"]:
            return "failed: " + t["errors"][0].splitlines()[0][:80]
        return ""


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base in (None, 0):
        return "—"
    return f"{value / base:.2f}×"


def runs_text(t: dict[str, Any] | None, key: str, spec: str) -> str:
    if not t or not t["runs"]:
        return "—"
    return ", ".join(f"{r[key]:{spec}}" for r in t["runs"] if isinstance(r.get(key), (int, float)))


def profile_excerpt(name: str, lines: int = 14) -> str | None:
    path = PROFILES / name
    if not path.exists():
        return None
    text = path.read_text(errors="replace").splitlines()
    out, on = [], False
    for line in text:
        if line.startswith("=== by own time") or line.startswith("=== own samples"):
            on = True
            continue
        if on and line.startswith("==="):
            break
        skip = ("Sat", "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Ordered", "List reduced")
        if on and line.strip() and not line.lstrip().startswith(skip):
            out.append(line.rstrip())
    return "\n".join(out[:lines + 2])


def redis_latency_profiles() -> list[str]:
    """The Redis side of the idle round trips (SLOWLOG of every command): kickq's, then the peer's."""
    names = [p.name for p in PROFILES.glob("*-redis-latency.txt")] if PROFILES.exists() else []
    return sorted(names, key=lambda n: (not n.startswith("kickq-"), n))


def redis_side(name: str) -> dict[str, tuple[float, float, float]] | None:
    """A <queue>-redis-latency.txt profile: command -> (calls per probe, median µs, µs per probe)."""
    path = PROFILES / name
    if not path.exists():
        return None
    rows: dict[str, tuple[float, float, float]] = {}
    for line in path.read_text(errors="replace").splitlines()[3:]:
        words = line.split()
        if len(words) < 4:
            continue
        try:
            calls, median, total = (float(x) for x in words[-3:])
        except ValueError:
            continue
        rows[" ".join(words[:-3])] = (calls, median, total)
    return rows


def redis_side_text() -> str:
    """Why an idle round trip is slower, from the Redis side: kickq's script time per probe against
    all of the fastest peer's commands (the --profile run's SLOWLOG)."""
    names = redis_latency_profiles()
    kickq = redis_side("kickq-redis-latency.txt")
    if not kickq:
        return ""
    scripts = {k: row for k, row in kickq.items() if k.startswith(("FCALL ", "EVALSHA "))}
    parts = [f"{k.split(' ', 1)[1]} {row[1]:.0f} µs × {row[0]:.1f}" for k, row in scripts.items()]
    text = (f"Redis' time per round trip (SLOWLOG, --profile run): kickq's scripts "
            f"{sum(row[2] for row in scripts.values()):.0f} µs ({', '.join(parts)})")
    for name in names:
        if not name.startswith("kickq-"):
            peer = redis_side(name) or {}
            text += f", {name.split('-')[0]}'s commands {sum(row[2] for row in peer.values()):.0f} µs in all"
    return text + "; "


def cpu_text(v: View, case: str, peer: str, variant: str = "default", status: bool = False) -> str:
    """Redis CPU µs per job (median), each run's beside it when there are several; without a figure,
    "—" (or with status, why: "n/a", "not run", "failed: ...")."""
    median = v.value(case, peer, variant, "redis_cpu", "us_per_job")
    t = v.task(case, peer, variant)
    runs = [r["redis_cpu"]["us_per_job"] for r in (t or {}).get("runs", []) if "redis_cpu" in r]
    if median is None:
        return (status and v.status(case, peer, variant)) or "—"
    return fmt(median, ",.1f") + (f" ({', '.join(f'{x:,.1f}' for x in runs)})" if len(runs) > 1 else "")


def idle_share(results: dict[str, Any], run: dict[str, Any], jobs: float | None) -> float | None:
    """µs per job, in a run's Redis CPU, of the server's idle work (its cron) over the run's seconds."""
    base = results.get("redis_baseline") or {}
    if "idle_us_per_second" not in base or not run.get("seconds") or not jobs:
        return None
    return float(base["idle_us_per_second"]) * run["seconds"] / jobs


def drain_table(w: Any, v: View, case: str) -> None:
    w("")
    w("| queue | workers | jobs/s | ÷ kickq | steady jobs/s | first completion (s) | runs (s) "
      "| Redis CPU (µs/job), runs | ÷ kickq |")
    w("|---|---|---:|---:|---:|---:|---|---:|---:|")
    k_drain = v.value(case, "kickq", "default", "rate")
    k_cpu = v.value(case, "kickq", "default", "redis_cpu", "us_per_job")
    for peer, variant in v.rows():
        rate = v.value(case, peer, variant, "rate")
        cpu = v.value(case, peer, variant, "redis_cpu", "us_per_job")
        w(f"| {v.label(peer, variant)} | {v.peers[peer]['variants'][variant].replace('|', '/')} | "
          f"{fmt(rate) if rate else v.status(case, peer, variant)} | {ratio(rate, k_drain)} | "
          f"{fmt(v.value(case, peer, variant, 'steady_rate'))} | "
          f"{fmt(v.value(case, peer, variant, 'first_completion'), '.2f')} | "
          f"{runs_text(v.task(case, peer, variant), 'seconds', '.2f')} | "
          f"{cpu_text(v, case, peer, variant)} | {ratio(cpu, k_cpu)} |")


def drain_cpu_note(w: Any, v: View, results: dict[str, Any], case: str) -> None:
    """What the Redis CPU column holds, and how much of it is the server's idle work."""
    jobs = (results.get("config") or {}).get("jobs")
    shares = []
    for peer, variant in v.rows():
        t = v.task(case, peer, variant)
        for run in (t or {}).get("runs", []):
            share = idle_share(results, run, jobs)
            if share is not None:
                shares.append((share, v.label(peer, variant)))
    idle = ""
    if shares:
        high = max(shares)
        idle = (f" (its cron, {results['redis_baseline']['idle_us_per_second']:,.0f} µs per second here: "
                f"{min(shares)[0]:.1f} to {high[0]:.1f} µs per job above, the most in the slowest run, "
                f"{high[1]})")
    w("")
    bodies = ", the bodies' INCRs" if case == "drain-io" else ""
    w("Redis CPU: the server's INFO cpu (used_cpu_sys + used_cpu_user, every thread) from just before the "
      "workers start to the last completion seen, divided by the jobs, each run's in brackets: the queue's "
      f"work{bodies} and the server's idle work{idle}; the harness counts completions in a file. "
      "See bench/README.md, \"Redis CPU per job\".")


def sleep_rows(v: View) -> list[tuple[dict[str, Any], str]]:
    """(task, label) of every sleep-case setup, in the order they ran."""
    return [(t, f"{v.peers.get(t['peer'], {}).get('label', t['peer'])} ({t['variant']})")
            for t in v.r.get("tasks", []) if t["case"] == "sleep"]


def sleep_section(w: Any, v: View, results: dict[str, Any]) -> None:
    """Section 2c: I/O-bound jobs, 16 in flight: the steady rate, the worker tree's PSS, and the rate
    per 100 MiB of it."""
    rows = sleep_rows(v)
    if not rows:
        return
    cfg = results.get("config") or {}
    w("")
    w(f"### 2c. I/O-bound jobs: drain {fmt(cfg.get('sleep_jobs'))} jobs that each sleep 50 ms, 16 in flight "
      "(sleep)")
    w("")
    w("Each job sleeps 50 ms (time.sleep in a sync handler, asyncio.sleep in an async one) and appends its "
      "byte; the jobs are enqueued first, then each queue runs them in its documented setup for I/O-bound "
      "jobs with 16 in flight, so at best 16 / 0.05 s = 320 jobs/s. *Steady* is the rate from 10 % to 90 % "
      "of the completions (start-up and the tail left out); PSS is summed over the whole worker tree "
      "(every process under the roots the bench started) after the last completion, before it is stopped.")
    w("")
    w("| queue (setup) | how it runs | processes | jobs/s | steady jobs/s | ÷ ideal | PSS (MiB) "
      "| steady jobs/s per 100 MiB PSS | runs (steady jobs/s) |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for t, label in rows:
        peer, variant = t["peer"], t["variant"]
        how = (v.peers.get(peer, {}).get("io_variants") or {}).get(variant, "").replace("|", "/")
        if not t["runs"]:
            why = t["errors"][0].splitlines()[0][:240] if t["errors"] else (t.get("skipped") or "not run")
            w(f"| {label} | {how} | — | failed: {why.replace('|', '/')} | — | — | — | — | — |")
            continue
        med = t.get("summary") or {}  # medians of the runs
        mem = med.get("memory") or {}
        pss = mem.get("pss")
        w(f"| {label} | {how} | {fmt(mem.get('processes'))} | {fmt(med.get('rate'))} | "
          f"{fmt(med.get('steady_rate'))} | {fmt(med.get('to_ideal'), '.2f', '×')} | "
          f"{fmt(pss and pss / MiB, '.1f')} | {fmt(med.get('per_100mib_pss'))} | "
          f"{runs_text(t, 'steady_rate', ',.0f')} |")


def sleep_summary(v: View) -> str | None:
    """kickq's dense setups against the peer setup with the most steady jobs/s per 100 MiB of PSS."""
    rows = sleep_rows(v)
    if not rows:
        return None
    peers = [(v.value("sleep", t["peer"], t["variant"], "per_100mib_pss"), label)
             for t, label in rows if t["peer"] != "kickq"]
    peers = [x for x in peers if x[0] is not None]
    best, who = max(peers) if peers else (None, "—")
    parts = []
    for t, label in rows:
        if t["peer"] != "kickq" or not t["variant"].startswith("dense"):
            continue
        k = v.value("sleep", "kickq", t["variant"], "per_100mib_pss")
        parts.append(f"{label} {fmt(k)}" + (f" ({k / best:.2f}×)" if k and best else "")
                     if k is not None else f"{label} failed (section 2c)")
    if not parts:
        return None
    return ("I/O-bound jobs, dense workers (issue 29, section 2c), steady jobs/s per 100 MiB of the worker "
            f"tree's PSS: {'; '.join(parts)}; the best peer setup, {who}: {fmt(best)}.")


SHARD_LABELS = {"1ns-1sup": "1 namespace, 1 supervisor", "1ns-3sup": "1 namespace, 3 supervisors",
                "3ns-3sup": "3 namespaces (one per master), 1 supervisor each"}


def shards_section(w: Any, v: View, results: dict[str, Any]) -> None:
    """Section 6: kickq on a 3-master Redis Cluster, or why it did not run."""
    tasks = [t for t in results.get("tasks", []) if t["case"] == "shards"]
    if not tasks:
        return
    jobs = (results.get("config") or {}).get("jobs")
    w("")
    w(f"## 6. kickq on a 3-master Redis Cluster: drain {fmt(jobs)} jobs (shards)")
    w("")
    w("One namespace against three, each namespace's slot on its own master (CLUSTER KEYSLOT \"{ns}\"), "
      "2 workers per supervisor, timed as the drain; Redis CPU from INFO cpu on each master, per job of "
      "the run (*own*: per job of that master's namespace).")
    masters = None
    for t in tasks:
        for run in t["runs"]:
            masters = masters or run.get("cluster", {}).get("masters")
        masters = masters or (t.get("skipped_detail") or {}).get("cluster", {}).get("masters")
    if masters:
        w("")
        w("Masters: " + "; ".join(
            f"master{i + 1} {m['address']} slots {', '.join(f'{a}-{b}' for a, b in m['slots'])}, namespace "
            f"`{m['namespace']}` (slot {m['slot']})" for i, m in enumerate(masters))
          + ". Each namespace was checked on its master: a key of it written there without a redirection.")
    skipped = [t for t in tasks if t.get("skipped")]
    if skipped and not any(t["runs"] for t in tasks):
        w("")
        w(f"Not run: {skipped[0]['skipped']}")
        return
    w("")
    w("| namespaces, supervisors | jobs/s | ÷ 1 namespace | steady jobs/s | runs (s) "
      "| Redis CPU, all masters (µs/job) | master1 / 2 / 3 (µs/job) | own (µs/job) |")
    w("|---|---:|---:|---:|---|---:|---|---|")
    base = v.value("shards", "kickq", "1ns-1sup", "rate")
    for t in tasks:
        variant = t["variant"]
        rate = v.value("shards", "kickq", variant, "rate")
        each = [v.value("shards", "kickq", variant, "masters", m, "redis_cpu", "us_per_job")
                for m in ("master1", "master2", "master3")]
        own = [v.value("shards", "kickq", variant, "masters", m, "redis_cpu_own_jobs", "us_per_job")
               for m in ("master1", "master2", "master3")]
        w(f"| {SHARD_LABELS.get(variant, variant)} | "
          f"{fmt(rate) if rate else v.status('shards', 'kickq', variant)} | {ratio(rate, base)} | "
          f"{fmt(v.value('shards', 'kickq', variant, 'steady_rate'))} | "
          f"{runs_text(t, 'seconds', '.2f')} | {cpu_text(v, 'shards', 'kickq', variant)} | "
          f"{' / '.join(fmt(x, ',.1f') for x in each)} | "
          f"{' / '.join(fmt(x, ',.1f') for x in own if x is not None) or '—'} |")


def render(results: dict[str, Any]) -> str:
    v = View(results)
    m = results.get("machine", {})
    cfg = results.get("config", {})
    jobs = cfg.get("jobs")
    out: list[str] = []
    w = out.append
    w("# kickq against RQ, Celery, Dramatiq, Huey, arq and SAQ")
    w("")
    w(f"Generated by `{results.get('command', 'python -m bench')}` on {m.get('date')} in "
      f"{results.get('elapsed_seconds', 0) / 60:.1f} min. Regenerated by every run: do not edit by hand "
      "(`make bench`, see bench/README.md).")
    if cfg.get("note"):
        w("")
        w(f"> **{cfg['note']}**")
    w("")
    w("## Machine and versions")
    w("")
    w("| CPU | cores | memory | OS | Python | Redis server | load average (1/5/15 min) start → end |")
    w("|---|---:|---:|---|---|---|---|")
    la0 = "/".join(f"{x:.1f}" for x in m.get("loadavg_start", ()))
    la1 = "/".join(f"{x:.1f}" for x in m.get("loadavg_end", ()))
    w(f"| {m.get('cpu')} | {m.get('cores')} | {fmt((m.get('memory') or 0) / 2**30, '.0f', ' GiB')} | "
      f"{m.get('platform')} | {m.get('python')} | {m.get('redis')} (loopback, no persistence) | "
      f"{la0} → {la1} |")
    w("")
    w("| queue | version | redis-py | hiredis | status |")
    w("|---|---|---|---|---|")
    for peer, info in v.peers.items():
        w(f"| {info.get('label', peer)} | {info.get('version') or '—'} | {info.get('redis_py') or '—'} | "
          f"{info.get('hiredis') or '—'} | {info.get('status', '?')} |")
    w("")
    w(f"Same job body for every queue (bench/peers/body.py): a no-op job appends one byte to a local file "
      f"(drain-io: one INCR in Redis), a latency probe does one RPUSH of its start time. {cfg.get('runs')} "
      "run(s) per case, medians shown; ratios are *queue ÷ kickq* of the figure in the column before.")

    # 1. enqueue
    w("")
    w(f"## 1. Enqueue {fmt(jobs)} jobs from one process")
    w("")
    w("| queue | one by one (jobs/s) | ÷ kickq | bulk API | bulk (jobs/s) | ÷ kickq "
      "| runs, one / bulk (jobs/s) |")
    w("|---|---:|---:|---|---:|---:|---|")
    k_one = v.value("enqueue-one", "kickq", "default", "rate")
    k_bulk = v.value("enqueue-bulk", "kickq", "default", "rate")
    for peer, info in v.peers.items():
        if info.get("status") != "ok":
            continue
        one = v.value("enqueue-one", peer, "default", "rate")
        bulk = v.value("enqueue-bulk", peer, "default", "rate")
        bulk_label = info.get("bulk_label") or "none"
        w(f"| {info['label']} | {fmt(one) if one else v.status('enqueue-one', peer)} | {ratio(one, k_one)} | "
          f"{bulk_label} | {fmt(bulk) if bulk else v.status('enqueue-bulk', peer)} | {ratio(bulk, k_bulk)} | "
          f"{runs_text(v.task('enqueue-one', peer), 'rate', ',.0f')} / "
          f"{runs_text(v.task('enqueue-bulk', peer), 'rate', ',.0f')} |")
    if any("redis_cpu" in r for t in results.get("tasks", []) if t["case"].startswith("enqueue-")
           for r in t["runs"]):
        w("")
        w("Redis CPU per enqueued job: the server's INFO cpu (used_cpu_sys + used_cpu_user) before and after "
          "the timed calls, divided by the jobs, in µs (each run's in brackets). See bench/README.md, "
          "\"Redis CPU per job\".")
        w("")
        w("| queue | one by one (µs/job), runs | ÷ kickq | bulk (µs/job), runs | ÷ kickq |")
        w("|---|---:|---:|---:|---:|")
        k_one_cpu = v.value("enqueue-one", "kickq", "default", "redis_cpu", "us_per_job")
        k_bulk_cpu = v.value("enqueue-bulk", "kickq", "default", "redis_cpu", "us_per_job")
        for peer, info in v.peers.items():
            if info.get("status") != "ok":
                continue
            one = v.value("enqueue-one", peer, "default", "redis_cpu", "us_per_job")
            bulk = v.value("enqueue-bulk", peer, "default", "redis_cpu", "us_per_job")
            w(f"| {info['label']} | {cpu_text(v, 'enqueue-one', peer, status=True)} | "
              f"{ratio(one, k_one_cpu)} | {cpu_text(v, 'enqueue-bulk', peer, status=True)} | "
              f"{ratio(bulk, k_bulk_cpu)} |")

    # 2. drain
    w("")
    w(f"## 2. Drain {fmt(jobs)} pre-enqueued no-op jobs with 2 worker processes")
    w("")
    w("From starting the workers to the last completion (each job appends one byte to a file whose size is "
      "polled), so start-up is included; *steady* is from the first completion seen to the last.")
    drain_table(w, v, "drain")
    drain_cpu_note(w, v, results, "drain")
    if any(t["case"] == "drain-io" for t in results.get("tasks", [])):
        w("")
        w("### 2b. The same drain with one Redis round trip in each job (drain-io)")
        w("")
        w("The body increments a counter in the queue's Redis (`bench:done`) before it appends its byte: "
          "a job that does a little I/O on the server its queue uses. The processing target is judged on the "
          "no-op drain above; its row gives this ratio beside it.")
        drain_table(w, v, "drain-io")
        drain_cpu_note(w, v, results, "drain-io")
    sleep_section(w, v, results)

    # 3. latency and memory at rest
    count = cfg.get("latency_count")
    w("")
    w(f"## 3. Latency with an idle pool of 2 workers: {count} jobs one at a time")
    w("")
    w("enqueue-to-start: the body's time.time() minus the producer's just before enqueueing (same host); "
      "enqueue-to-result: until the queue's result API returned (kickq: the hotjob promise). Milliseconds.")
    w("")
    w("| queue | start p50 | ÷ kickq | start p99 | result p50 | ÷ kickq | result p99 |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    k_s50 = v.value("latency", "kickq", "default", "start_p50")
    k_r50 = v.value("latency", "kickq", "default", "result_p50")
    for peer, variant in v.rows():
        s50 = v.value("latency", peer, variant, "start_p50")
        r50 = v.value("latency", peer, variant, "result_p50")
        if s50 is None:
            w(f"| {v.label(peer, variant)} | {v.status('latency', peer, variant)} | | | | | |")
            continue
        w(f"| {v.label(peer, variant)} | {fmt(s50, '.2f')} | {ratio(s50, k_s50)} | "
          f"{fmt(v.value('latency', peer, variant, 'start_p99'), '.2f')} | {fmt(r50, '.2f')} | "
          f"{ratio(r50, k_r50)} | {fmt(v.value('latency', peer, variant, 'result_p99'), '.2f')} |")
    w("")
    w("### Memory at rest: the whole worker tree after the latency probes (idle, warm)")
    w("")
    w("PSS (proportional set size: shared pages split between the processes) and RSS summed over the root "
      "processes the bench started and all their descendants (kickq: master, 2 workers and the reaper).")
    w("")
    w("| queue | processes | PSS (MiB) | ÷ kickq | RSS (MiB) |")
    w("|---|---:|---:|---:|---:|")
    k_pss = v.value("latency", "kickq", "default", "rest_memory", "pss")
    for peer, variant in v.rows():
        pss = v.value("latency", peer, variant, "rest_memory", "pss")
        if pss is None:
            continue
        nproc = v.value("latency", peer, variant, "rest_memory", "processes")
        rss = v.value("latency", peer, variant, "rest_memory", "rss") or 0
        w(f"| {v.label(peer, variant)} | {fmt(nproc)} | {pss / MiB:.1f} | {ratio(pss, k_pss)} | "
          f"{rss / MiB:.1f} |")
    kt = v.task("latency", "kickq")
    if kt and kt["runs"]:
        w("")
        detail = kt["runs"][-1]["rest_memory"]["detail"]
        w("kickq's tree, last run: " + "; ".join(
            f"{d['cmd'].split(' [')[0].strip()} {d['pss'] / MiB:.1f} MiB PSS" for d in detail))

    # 4. memory per job, deadline, orphan
    w("")
    w(f"## 4. Redis memory per queued job ({fmt(cfg.get('memory_jobs'))} small jobs, one int argument)")
    w("")
    w("INFO memory used_memory after minus before, divided by the number of jobs (queued, not run).")
    w("")
    w("| queue | bytes per job | ÷ kickq | keys in Redis |")
    w("|---|---:|---:|---:|")
    k_mem = v.value("memory", "kickq", "default", "bytes_per_job")
    for peer, info in v.peers.items():
        if info.get("status") != "ok":
            continue
        b = v.value("memory", peer, "default", "bytes_per_job")
        w(f"| {info['label']} | {fmt(b) if b else v.status('memory', peer)} | {ratio(b, k_mem)} | "
          f"{fmt(v.value('memory', peer, 'default', 'keys'))} |")
    w("")
    w("### kickq: deadline precision and orphan recovery")
    w("")
    dl = v.task("deadline", "kickq")
    if dl and dl["runs"] and "to_fail" in dl["runs"][0]:
        d = dl["runs"][0]
        w(f"{d['trials']} jobs that never return, process_timeout {d['process_timeout']:g} s "
          "(bench/supervisor.py `deadline_trials`); ms after the deadline:")
        w("")
        w("| from the deadline to | p50 | p99 | max | n |")
        w("|---|---:|---:|---:|---:|")
        for key, label in (("to_death", "the worker reaped by the master"),
                           ("to_fail", "the job failed in Redis")):
            if key in d:
                x = d[key]
                w(f"| {label} | {x['p50']:.0f} | {x['p99']:.0f} | {x['max']:.0f} | {x['n']} |")
    else:
        why_not = (dl.get("skipped") or (dl["errors"][0][:300] if dl["errors"] else "?")) if dl else "not run"
        w(f"Deadline precision: {why_not}")
    w("")
    orph = v.task("orphan", "kickq")
    if orph and orph["runs"]:
        o = orph["runs"][0]
        x = o["kill_to_rerun_ms"]
        w(f"Orphan recovery: {x['n']} trials; a job (process_timeout {o['process_timeout']:g} s) claimed "
          "by one of two supervisors, that whole supervisor SIGKILLed (master, worker, reaper) right after "
          "the claim; "
          f"from the kill to the job's second run starting in the other supervisor: p50 {x['p50']:.0f} ms, "
          f"max {x['max']:.0f} ms (the lost run: {o['trials'][0].get('lost_run')}).")
    else:
        w(f"Orphan recovery: {(orph['errors'][0][:300] if orph and orph['errors'] else 'not run')}")

    # 5. scaling
    w("")
    w(f"## 5. kickq scaling: drain {fmt(jobs)} jobs")
    w("")
    w("| supervisors × workers each | jobs/s | ÷ 1 × 1 | steady jobs/s | runs (s) | Redis CPU (µs/job) |")
    w("|---|---:|---:|---:|---|---:|")
    base = v.value("scaling", "kickq", "1x1", "rate")
    for t in results.get("tasks", []):
        if t["case"] != "scaling":
            continue
        s, n = t["variant"].split("x")
        rate = v.value("scaling", "kickq", t["variant"], "rate")
        w(f"| {s} × {n} | {fmt(rate) if rate else v.status('scaling', 'kickq', t['variant'])} | "
          f"{ratio(rate, base)} | {fmt(v.value('scaling', 'kickq', t['variant'], 'steady_rate'))} | "
          f"{runs_text(t, 'seconds', '.2f')} | {cpu_text(v, 'scaling', 'kickq', t['variant'])} |")
    shards_section(w, v, results)

    # targets
    w("")
    w("## Targets (issue 6)")
    w("")
    w("| target | figure | result | where the time goes |")
    w("|---|---|---|---|")
    for row in targets(v):
        w("| " + " | ".join(row) + " |")
    dense = sleep_summary(v)
    if dense:
        w("")
        w(dense)
    w("")
    w("Why the missed ones are missed, measured piece by piece (CPU per job, script time, the idle "
      "path's steps): [bench/README.md](README.md#why-targets-are-missed).")

    # profiles
    excerpts = [(name, profile_excerpt(name)) for name in (
        "kickq-worker.txt", "kickq-worker.pyspy-summary.txt", "kickq-enqueue-one.txt",
        "kickq-enqueue-bulk.txt", "kickq-roundtrip.txt", *redis_latency_profiles())]
    if any(text for _, text in excerpts):
        w("")
        w("## Profiles (`--profile`, separate runs; full text in bench/profiles/)")
        for name, text in excerpts:
            if text:
                w("")
                w(f"`bench/profiles/{name}`, top by own time:")
                w("")
                w("```")
                w(text)
                w("```")

    # notes, errors, processes
    w("")
    w("## How each queue runs")
    w("")
    for peer, info in v.peers.items():
        if info.get("status") == "ok":
            variants = "; ".join(f"{k}: `{d}`" for k, d in info.get("variants", {}).items())
            w(f"- **{info['label']}** ({info.get('python')}, {info.get('executable')}): {variants}. "
              f"{info.get('notes', '')}")
        else:
            w(f"- **{peer}**: {info.get('status')}")
    errors = [(t, e) for t in results.get("tasks", []) for e in t["errors"]]
    if errors:
        w("")
        w("## Errors")
        w("")
        for t, e in errors:
            w(f"- {t['case']} / {v.label(t['peer'], t['variant'])}: `{e.splitlines()[0][:200]}`")
    w("")
    left = results.get("processes_left_at_end", [])
    leaks = results.get("leaks", [])
    w(f"Processes: every process the run started was stopped; the psutil check at the end found "
      f"{len(left)} left{(': ' + '; '.join(left)) if left else ''}. "
      + (f"{len(leaks)} case(s) left processes that the runner then killed (see results.json)."
         if leaks else "No case left a process behind."))
    for extra in results.get("extras", []):
        w("")
        w(f"## `python -m {extra['module']}`")
        w("")
        w(extra["output"].strip())
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Re-render RESULTS.md from results.json (after a change to this file), without measuring again."""
    import argparse
    import json
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("json", nargs="?", default=str(here / "results.json"))
    p.add_argument("--out", default=str(here / "RESULTS.md"))
    args = p.parse_args(argv)
    results = json.loads(Path(args.json).read_text())
    Path(args.out).write_text(render(results))
    return 0


def targets(v: View) -> list[list[str]]:
    rows: list[list[str]] = []
    peers = [(p, var) for p, var in v.rows() if p != "kickq"]

    def best(case: str, key: str, pick: Any, path: tuple[str, ...] = ()) -> tuple[float | None, str]:
        if case in ("drain", "drain-io", "latency"):  # one row per kind of worker
            found = [(v.value(case, p, var, *path, key), v.label(p, var)) for p, var in peers]
        else:
            found = [(v.value(case, p, "default", *path, key), v.peers[p].get("label", p))
                     for p in dict.fromkeys(p for p, _ in peers)]
        found = [f for f in found if f[0] is not None]
        if not found:
            return None, "—"
        return pick(found, key=lambda f: f[0])

    def why(*files: str) -> str:
        have = [f"bench/profiles/{f}" for f in files if (PROFILES / f).exists()]
        return ", ".join(have) if have else "run with --profile"

    def why_latency() -> str:
        return redis_side_text() + why("kickq-roundtrip.txt", *redis_latency_profiles())

    def verdict(ok: bool | None, short: str) -> str:
        return "—" if ok is None else ("met" if ok else f"**missed** ({short})")

    k = v.value("drain", "kickq", "default", "rate")
    b, who = best("drain", "rate", max)
    r = k / b if k and b else None
    k_io = v.value("drain-io", "kickq", "default", "rate")
    b_io, who_io = best("drain-io", "rate", max)
    with_io = (f" (drain-io, a Redis round trip in each job: kickq {fmt(k_io)}/s, {who_io} {fmt(b_io)}/s: "
               f"{k_io / b_io:.2f}×)" if k_io and b_io else "")
    rows.append(["processing ≥ 2× the fastest peer",
                 f"kickq {fmt(k)}/s, {who} {fmt(b)}/s: {fmt(r, '.2f', '×')}{with_io}",
                 verdict(None if r is None else r >= 2, f"needs {2 * b / k:.2f}× its speed" if r else ""),
                 why("kickq-worker.txt", "kickq-worker.pyspy-summary.txt")
                 if r is not None and r < 2 else ""])
    k = v.value("enqueue-one", "kickq", "default", "rate")
    b, who = best("enqueue-one", "rate", max)
    r = k / b if k and b else None
    rows.append(["enqueue one by one ≥ the fastest peer",
                 f"kickq {fmt(k)}/s, {who} {fmt(b)}/s: {fmt(r, '.2f', '×')}",
                 verdict(None if r is None else r >= 1, f"needs {b / k:.2f}× its speed" if r else ""),
                 why("kickq-enqueue-one.txt") if r is not None and r < 1 else ""])
    k = v.value("enqueue-bulk", "kickq", "default", "rate")
    b = v.value("enqueue-bulk", "rq", "default", "rate")
    r = k / b if k and b else None
    rows.append(["bulk create ≥ 2× RQ enqueue_many", f"kickq {fmt(k)}/s, RQ {fmt(b)}/s: {fmt(r, '.2f', '×')}",
                 verdict(None if r is None else r >= 2, f"needs {2 * b / k:.2f}× its speed" if r else ""),
                 why("kickq-enqueue-bulk.txt") if r is not None and r < 2 else ""])
    k = v.value("latency", "kickq", "default", "start_p50")
    b, who = best("latency", "start_p50", min)
    rows.append(["idle enqueue-to-start p50 ≤ the fastest peer's",
                 f"kickq {fmt(k, '.2f')} ms, {who} {fmt(b, '.2f')} ms",
                 verdict(None if k is None or b is None else k <= b, f"+{k - b:.2f} ms" if k and b else ""),
                 why_latency() if k and b and k > b else ""])
    k = v.value("latency", "kickq", "default", "start_p99")
    rows.append(["idle enqueue-to-start p99 ≤ 2 ms", f"kickq {fmt(k, '.2f')} ms",
                 verdict(None if k is None else k <= 2, f"+{k - 2:.2f} ms" if k else ""),
                 why_latency() if k and k > 2 else ""])
    k = v.value("latency", "kickq", "default", "result_p50")
    b, who = best("latency", "result_p50", min)
    rows.append(["hotjob round trip p50 ≤ the fastest peer's enqueue-to-result",
                 f"kickq {fmt(k, '.2f')} ms, {who} {fmt(b, '.2f')} ms",
                 verdict(None if k is None or b is None else k <= b, f"+{k - b:.2f} ms" if k and b else ""),
                 why_latency() if k and b and k > b else ""])
    k = v.value("latency", "kickq", "default", "rest_memory", "pss")
    b, who = best("latency", "pss", min, ("rest_memory",))
    rows.append(["supervisor PSS at rest ≤ the leanest peer's worker PSS",
                 f"kickq {fmt(k and k / MiB, '.1f')} MiB, {who} {fmt(b and b / MiB, '.1f')} MiB",
                 verdict(None if k is None or b is None else k <= b,
                         f"+{(k - b) / MiB:.1f} MiB" if k and b else ""),
                 "per-process PSS under section 3" if k and b and k > b else ""])
    dl = v.task("deadline", "kickq")
    if dl and dl["runs"] and "to_fail" in dl["runs"][0]:
        d = dl["runs"][0]
        worst = max(d["to_fail"]["p99"], d.get("to_death", {}).get("p99", 0))
        rows.append(["runaway job dead and ghosted ≤ 100 ms after its deadline (p99)",
                     f"p99 {worst:.0f} ms over {d['trials']} trials",
                     verdict(worst <= 100, f"+{worst - 100:.0f} ms"), ""])
    else:
        rows.append(["runaway job dead and ghosted ≤ 100 ms after its deadline (p99)", "not measured",
                     "—", ""])
    orph = v.task("orphan", "kickq")
    if orph and orph["runs"]:
        o = orph["runs"][0]
        limit = (o["process_timeout"] + 2) * 1000
        worst = o["kill_to_rerun_ms"]["max"]
        rows.append(["a killed supervisor's job recovered ≤ process_timeout + 2 s",
                     f"max {worst:.0f} ms (limit {limit:.0f} ms)",
                     verdict(worst <= limit, f"+{worst - limit:.0f} ms"), ""])
    else:
        rows.append(["a killed supervisor's job recovered ≤ process_timeout + 2 s", "not measured", "—", ""])
    k = v.value("memory", "kickq", "default", "bytes_per_job")
    b, who = best("memory", "bytes_per_job", min)
    rows.append(["Redis memory per job ≤ the leanest peer", f"kickq {fmt(k)} B, {who} {fmt(b)} B",
                 verdict(None if k is None or b is None else k <= b,
                         f"+{k - b:.0f} B/job" if k and b else ""),
                 "keys per job in section 4" if k and b and k > b else ""])
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
