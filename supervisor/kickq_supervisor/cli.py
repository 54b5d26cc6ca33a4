"""`kickq-supervisor [options] MODULE [MODULE ...]`: import the handlers, then run the master."""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Sequence

import redis

import kickq
from kickq import acks, logformat, registry
from kickq.config import current, merge_settings, validate_settings
from kickq.connection import check_mode, check_version, client_scope, connect, describe, server_info

from . import embedded, loader, pidfile
from .arbiter import Arbiter, MasterLoop, Slot
from .ghoster import Ghoster
from .osapi import ProcessOps, set_title
from .reaper import Reaper
from .worker import Worker

log = logging.getLogger("kickq.supervisor")

EXIT_USAGE = 2
EXIT_FAILURE = 1
#: The settings that say how the supervisor's saves are confirmed (kickq.acks.wanted).
ACK_SETTINGS = ("wait_replicas", "wait_replicas_timeout", "wait_aof", "redis_timeout")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G, 1048576)")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()[:1]
    return int(number * {"b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, not {text!r}")
    return value


def _whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kickq-supervisor",
        description="Run kickq handlers in a pool of worker processes. Each MODULE (dotted name or "
                    "path to a .py file) registers handlers with Kickq().process(...). Workers whose "
                    "job passes its process_timeout are killed and replaced; a reaper process per "
                    "Redis server promotes delayed jobs, recovers lost ones and purges finished ones.",
        epilog="Signals: TERM/INT graceful stop (a second INT: quick), HUP reload handlers, "
               "QUIT quick stop. Config from kickq.config() in MODULE applies; flags win.")
    p.add_argument("modules", nargs="+", metavar="MODULE", help="handler module or .py file")
    p.add_argument("--redis-url", help="redis://, rediss://, unix://, redis+cluster://host:port,host:port or "
                                       "redis+sentinel://host:port,host:port/SERVICE URL (default: config, "
                                       "then $KICKQ_REDIS_URL, then 127.0.0.1:6379)")
    p.add_argument("--redis-namespace", help="key namespace (default: config, 'kickq')")
    p.add_argument("--wait-replicas", type=_whole_number, metavar="N",
                   help="a finished run counts as saved once N replicas have it (Redis WAIT after each "
                        "batch of saves; config's wait_replicas_timeout bounds the wait); 0: no wait "
                        "(default: config, 0)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                   help="text lines, or one JSON object per line (time, level, logger, pid, role, "
                        "message, job_id/job_name about a job, exc) for journald and log shippers "
                        "(default: text)")
    p.add_argument("--embedded-redis", metavar="DIR",
                   help="start and own a private redis-server with AOF in DIR (single host)")
    p.add_argument("--prefetch", type=_positive_int, default=16, metavar="N",
                   help="a busy worker claims up to N jobs per round trip, fewer when jobs are slow "
                        "(a batch is about 50 ms of work); 1 claims one at a time (default: 16)")
    p.add_argument("--max-jobs-per-worker", type=int, default=0, metavar="N",
                   help="replace a worker after N jobs (0: never)")
    p.add_argument("--max-memory-per-worker", type=parse_size, default=0, metavar="SIZE",
                   help="replace a worker whose RSS passes SIZE after a job (e.g. 512M)")
    p.add_argument("--kill-grace", type=float, default=0.3, metavar="SECONDS",
                   help="after TERM, wait this long before KILL (default 0.3)")
    p.add_argument("--reaper-interval", type=float, default=1.0, metavar="SECONDS",
                   help="longest sleep of the reaper between passes (default 1)")
    p.add_argument("--no-reaper", action="store_true", help="run no reaper in this supervisor")
    p.add_argument("--pidfile", metavar="PATH")
    p.add_argument("--metrics-port", type=port_number, metavar="PORT",
                   help="serve Prometheus metrics on --metrics-host:PORT, path /metrics (needs the extra "
                        "kickq[metrics])")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics server binds, e.g. 0.0.0.0 or :: for every one "
                        "(default: 127.0.0.1)")
    p.add_argument("--health-port", type=port_number, metavar="PORT",
                   help="serve GET /healthz (200: master loop running, pool full, Redis answered within 3 s; "
                        "else 503 with the reasons) and GET /readyz (503 while starting or stopping) on "
                        "--health-host:PORT; the same port as --metrics-port serves both on one server")
    p.add_argument("--health-host", default="127.0.0.1", metavar="HOST",
                   help="address the health server binds, e.g. 0.0.0.0 (default: 127.0.0.1)")
    p.add_argument("--check", action="store_true",
                   help="validate and exit, writing nothing to Redis: import the modules, check every "
                        "registration and its settings, connect to each Redis (version, mode, what the "
                        "ACL user may run), print what would run; exit 0, or 1 with each problem")
    p.add_argument("--check-import", action="store_true", help=argparse.SUPPRESS)
    return p


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gives, which win over every registration's config."""
    out: dict[str, Any] = {}
    if args.redis_url:
        out["redis_url"] = args.redis_url
    if args.redis_namespace:
        out["redis_namespace"] = args.redis_namespace
    if args.wait_replicas is not None:
        out["wait_replicas"] = args.wait_replicas
    return out


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def setup_logging(level: str, log_format: str = "text") -> None:
    logformat.setup(getattr(logging, level), log_format, role="master")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.check:
        from . import check
        return check.run(args)
    if args.metrics_port is not None:
        try:
            from . import metrics  # noqa: F401 - prometheus-client is an optional extra
        except ImportError as exc:
            print(f"kickq-supervisor: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    for target in args.modules:
        try:
            loader.load(target)
        except loader.HandlerImportError as exc:
            print(f"kickq-supervisor: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if args.check_import:
        return 0
    registrations = registry.registrations()
    if not registrations:
        print(f"kickq-supervisor: no handlers registered by {' '.join(args.modules)} "
              "(call Kickq().process(names, handler) at import)", file=sys.stderr)
        return EXIT_USAGE
    cli_settings = flag_settings(args)
    try:
        validate_settings(cli_settings)
    except kickq.ConfigError as exc:
        print(f"kickq-supervisor: {exc}", file=sys.stderr)
        return EXIT_USAGE

    redis_proc_pid = None
    inherited = os.environ.get("KICKQ_EMBEDDED_REDIS")  # set across a HUP re-exec
    if inherited:
        pid_text, url = inherited.split(" ", 1)
        redis_proc_pid = int(pid_text)
        cli_settings["redis_url"] = url
    elif args.embedded_redis:
        try:
            proc, url = embedded.start(args.embedded_redis)
        except embedded.EmbeddedRedisError as exc:
            print(f"kickq-supervisor: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        redis_proc_pid = proc.pid
        cli_settings["redis_url"] = url
        os.environ["KICKQ_EMBEDDED_REDIS"] = f"{proc.pid} {url}"
        log.info("embedded redis-server (pid %d) at %s, AOF in %s", proc.pid, url, args.embedded_redis)

    if args.pidfile:
        try:
            pidfile.create(args.pidfile)
        except pidfile.PidfileError as exc:
            print(f"kickq-supervisor: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    code, reload = EXIT_FAILURE, False
    try:
        code, reload = run_master(args, registrations, cli_settings)
    finally:
        if args.pidfile and not reload:
            pidfile.remove(args.pidfile)
    if reload:
        log.info("re-executing with freshly imported handlers")
        os.execv(sys.executable, [sys.executable, "-m", "kickq_supervisor", *sys.argv[1:]])
    if redis_proc_pid:
        embedded.stop(redis_proc_pid)
    return code


def settings_for(registration: registry.Registration, cli_settings: dict[str, Any]) -> dict[str, Any]:
    """Global config (set by the modules) < the registering client's overrides < command-line flags."""
    settings = merge_settings(current(), registration.overrides)
    return merge_settings(settings, cli_settings)


def check_redis(settings: dict[str, Any]) -> str | None:
    """A reason to refuse to start (bad password, old server), or None; an outage is not one."""
    client = connect(settings)
    try:
        wanted = acks.wanted(settings)
        info = server_info(client)
        check_version(info)
        check_mode(info, settings)
        if wanted is not None:
            acks.check_server(wanted, info, describe(settings))
    except redis.exceptions.AuthenticationError as exc:
        return f"Redis at {describe(settings)} refused the credentials: {exc}"
    except redis.exceptions.ResponseError as exc:
        return f"Redis at {describe(settings)} refused: {exc}"
    except (kickq.RedisVersionError, kickq.ConfigError) as exc:  # RedisModeError, an unknown service...
        return str(exc)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.warning("Redis at %s is unavailable (%s); workers will keep retrying", describe(settings), exc)
    finally:
        client.close()
    return None


def run_master(args: argparse.Namespace, registrations: list[registry.Registration],
               cli_settings: dict[str, Any]) -> tuple[int, bool]:
    per_registration = [settings_for(reg, cli_settings) for reg in registrations]
    # Each Redis once, and once more for each other way its writes are to be confirmed.
    checks = {(describe(s), *(s[key] for key in ACK_SETTINGS)): s for s in per_registration}
    for settings in checks.values():
        problem = check_redis(settings)
        if problem:
            print(f"kickq-supervisor: {problem}", file=sys.stderr)
            return EXIT_FAILURE, False
    namespaces = sorted({s["redis_namespace"] for s in per_registration})
    set_title(f"kickq-supervisor: master [{' '.join(namespaces)}]")
    ops = ProcessOps()
    ghosters = {client_scope(s): Ghoster(s) for s in per_registration}

    def lost_job(slot: Slot, job_id: str, token: str, error: str) -> None:
        settings = per_registration[slot.spec]
        run = slot.runs.get(job_id)
        started = run.started if run is not None and run.started else None
        ghosters[client_scope(settings)].submit(settings["redis_namespace"], job_id, token, error,
                                                slot.claimer, started, name=run.name if run else "")

    def lost_claim(slot: Slot, error: str) -> None:
        settings = per_registration[slot.spec]
        unsaved = [(job_id, token, outcome, payload, int(round(seconds * 1000)), reported_at)
                   for job_id, (token, outcome, payload, seconds, reported_at) in slot.unsaved.items()]
        ghosters[client_scope(settings)].submit_claimed(settings["redis_namespace"], slot.claimer, error,
                                                        unsaved)

    def spawn_worker(slot: Slot) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        registration, settings = registrations[slot.spec], per_registration[slot.spec]
        slot.claimer = uuid.uuid4().hex  # the master knows whose claim record to read if it dies

        def target() -> int:
            os.close(read_fd)
            signal.set_wakeup_fd(-1)
            return Worker(slot.number, registration, settings, write_fd, max_jobs=args.max_jobs_per_worker,
                          max_memory=args.max_memory_per_worker, claimer=slot.claimer,
                          prefetch=args.prefetch).run()
        pid = ops.spawn(target)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        log.info("worker %d (pid %d) serving %s%s", slot.number, pid, ", ".join(registration.names),
                 f" ({slot.jobs} jobs at once)" if slot.jobs > 1 else "")
        return pid, read_fd

    def reaper_spawner(settings: dict[str, Any], served: list[str]) -> Callable[[], int]:
        """Starts the reaper of one Redis (with the settings of its first registration), for
        every namespace this supervisor serves on it; on a Cluster, one reaper per namespace (a
        namespace is one slot, on the master that holds it)."""
        def spawn() -> int:
            def target() -> int:
                signal.set_wakeup_fd(-1)
                return Reaper(settings, served, interval=args.reaper_interval).run()
            pid = ops.spawn(target)
            log.info("reaper (pid %d) for %s on %s", pid, ", ".join(served), describe(settings))
            return pid
        return spawn

    by_redis: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for settings in per_registration:
        by_redis.setdefault(client_scope(settings), (settings, set()))[1].add(settings["redis_namespace"])
    spawn_reapers = [] if args.no_reaper else [reaper_spawner(settings, sorted(served))
                                               for settings, served in by_redis.values()]

    slot_specs = [index for index, reg in enumerate(registrations) for _ in range(reg.concurrent_jobs)]
    spec_jobs = [reg.jobs_per_worker for reg in registrations]
    exporter = None
    if args.metrics_port is not None:
        from .metrics import MetricsError, start_metrics
        try:
            exporter = start_metrics(args.metrics_port, per_registration, args.metrics_host)
        except MetricsError as exc:
            print(f"kickq-supervisor: {exc}", file=sys.stderr)
            return EXIT_FAILURE, False
    health = None
    if args.health_port is not None:
        from .health import HealthError, start_health
        try:
            health = start_health(args.health_host, args.health_port, per_registration,
                                  exporter if args.health_port == args.metrics_port else None)
        except HealthError as exc:
            print(f"kickq-supervisor: {exc}", file=sys.stderr)
            if exporter:
                exporter.stop()
            return EXIT_FAILURE, False
    arbiter = Arbiter(slot_specs, ops, spawn_worker, spawn_reapers,
                      lost_job=lost_job, lost_claim=lost_claim, kill_grace=args.kill_grace,
                      start_reload_check=lambda: ImportCheck(args.modules),
                      observe=exporter.observe if exporter else None, spec_jobs=spec_jobs,
                      heartbeat=health.update if health else None)
    if exporter:
        exporter.watch(arbiter.slots)
    slots = sum(reg.slots for reg in registrations)
    log.info("kickq-supervisor %s: %d worker(s), %d job slot(s) for %s on %s", kickq.__version__,
             len(slot_specs), slots, ", ".join(namespaces), ", ".join(by_redis))
    code = MasterLoop(arbiter).run()
    for ghoster in ghosters.values():
        ghoster.flush(timeout=2.0)
    if exporter:
        exporter.stop()
    if health:
        health.stop()
    log.info("supervisor exiting with code %d", code)
    return code, arbiter.reload_requested and not arbiter.quick


class ImportCheck:
    """Imports the handler modules in a subprocess, so that a HUP never blocks the master."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kickq_supervisor", "--check-import", *modules],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.deadline = time.monotonic() + 60

    def poll(self) -> bool | None:
        code = self.proc.poll()
        if code is None and time.monotonic() < self.deadline:
            return None
        if code is None:
            self.proc.kill()
        _, err = self.proc.communicate()
        if code != 0:
            log.error("handler modules fail to import: %s", (err or "timed out").strip()[-2000:])
        return code == 0
