"""Prometheus metrics for `kickq-supervisor --metrics-port PORT` (needs the extra `kickq[metrics]`).

Served on 127.0.0.1:PORT (or `--metrics-host HOST`) by a thread of the master. The master never
waits for it: the arbiter's events (a run returned, a run was ghosted, a worker was replaced) are
put on a SimpleQueue, and a thread of this module turns them into counters. What only Redis knows
(jobs by state, reaper lag) is read when Prometheus scrapes, by a collector in the HTTP thread, with
a one-second timeout.

Counters count this supervisor's own work; the gauges read from Redis are namespace-wide, the same
from every supervisor of the namespace (aggregate them with max, not sum).
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from typing import Any, Iterator, Mapping, Sequence
from wsgiref.simple_server import WSGIRequestHandler, make_server

import redis

from kickq.connection import client_scope, connect, describe
from kickq.job import STATES
from kickq.keys import Keys

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import ThreadingWSGIServer
except ImportError as exc:  # the extra is not installed
    raise ImportError("--metrics-port needs prometheus-client: pip install 'kickq[metrics]' "
                      f"(or pip install prometheus-client) [{exc}]") from exc

log = logging.getLogger("kickq.metrics")

if hasattr(prometheus_client, "disable_created_metrics"):  # no *_created series (prometheus-client >= 0.18)
    prometheus_client.disable_created_metrics()

HOST = "127.0.0.1"
SCRAPE_TIMEOUT = 1.0  # seconds, for each Redis read of a scrape
PROCESSING_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
#: Reaper lag by kind: the structure whose scores say when the reaper should act.
LAG_KINDS = {"promote": "delayed", "recover": "processing", "purge": "finished"}


class MetricsError(Exception):
    """The metrics server cannot start (the port is taken, ...)."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


class _ThreadingWSGIServer6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class RedisCollector:
    """Gauges read from Redis at scrape time: kickq_jobs, kickq_reaper_lag_seconds, kickq_redis_up."""

    def __init__(self, targets: Sequence[tuple[Mapping[str, Any], str]]) -> None:
        self.targets = []
        clients: dict[str, Any] = {}
        for settings, namespace in targets:
            settings = {**settings, "redis_namespace": namespace}
            where = client_scope(settings)
            if where not in clients:
                clients[where] = connect(settings, socket_timeout=SCRAPE_TIMEOUT,
                                         socket_connect_timeout=SCRAPE_TIMEOUT, health_check_interval=0)
            self.targets.append((clients[where], Keys(namespace)))

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("kickq_jobs", "Jobs in each state now, by job name (namespace-wide)",
                                 labels=["namespace", "name", "state"])
        lag = GaugeMetricFamily("kickq_reaper_lag_seconds",
                                "How long the most overdue job has waited for a reaper: promote (due "
                                "delayed/retry/ghost jobs), recover (expired leases), purge (finished jobs)",
                                labels=["namespace", "kind"])
        up = GaugeMetricFamily("kickq_redis_up", "1 when this scrape could read the namespace from Redis",
                               labels=["namespace"])
        for client, keys in self.targets:
            try:
                pipe = client.pipeline(transaction=False)
                pipe.time()
                pipe.hgetall(keys.counts)
                pipe.smembers(keys.names)
                for structure in LAG_KINDS.values():
                    pipe.zrange(keys.prefix + structure, 0, 0, withscores=True)
                (seconds, micros), counts, names, *firsts = pipe.execute()
            except redis.exceptions.RedisError as exc:
                log.debug("metrics: cannot read %s: %s", keys.namespace, exc)
                up.add_metric([keys.namespace], 0)
                continue
            up.add_metric([keys.namespace], 1)
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            by_name: dict[str, dict[str, int]] = {name: {} for name in names}
            for field, value in counts.items():
                state, _, name = field.partition(":")
                by_name.setdefault(name, {})[state] = int(value)
            for name in sorted(by_name):
                for state in STATES:
                    jobs.add_metric([keys.namespace, name, state], by_name[name].get(state, 0))
            for kind, first in zip(LAG_KINDS, firsts, strict=True):
                overdue = now_ms - first[0][1] if first else 0
                lag.add_metric([keys.namespace, kind], max(0.0, overdue / 1000))
        yield jobs
        yield lag
        yield up


class Metrics:
    """The registry, the HTTP server thread and the thread that applies the master's events."""

    def __init__(self, port: int, per_registration: Sequence[Mapping[str, Any]], host: str = HOST) -> None:
        self.port = port
        self.host = host
        self.namespaces = [s["redis_namespace"] for s in per_registration]
        self.events: queue.SimpleQueue[tuple[str, int | None, dict[str, Any]] | None] = queue.SimpleQueue()
        self.slots: Sequence[Any] = ()
        r = self.registry = prometheus_client.CollectorRegistry()
        self.runs = prometheus_client.Counter(
            "kickq_runs", "Runs by outcome: success and fail as the handler ended; ghost when the master "
            "killed or lost the run", ["namespace", "name", "outcome"], registry=r)
        self.processing = prometheus_client.Histogram(
            "kickq_processing_seconds", "Handler time of runs that returned (success or fail)",
            ["namespace", "name"], buckets=PROCESSING_BUCKETS, registry=r)
        self.ghosts = prometheus_client.Counter(
            "kickq_ghosts", "Runs ghosted by this supervisor, by reason: timeout (past process_timeout), "
            "worker_killed (another job of its worker passed its deadline), worker_died, quick_stop",
            ["namespace", "name", "reason"], registry=r)
        self.restarts = prometheus_client.Counter(
            "kickq_worker_restarts", "Workers replaced, by reason: timeout (killed at a job's "
            "process_timeout), crash (died or exited non-zero), retired (max jobs or memory)",
            ["reason"], registry=r)
        self.reaper_restarts = prometheus_client.Counter(
            "kickq_reaper_restarts", "Times the reaper process died and was started again", registry=r)
        targets = {(describe(s), s["redis_namespace"]): s for s in per_registration}
        r.register(RedisCollector([(s, ns) for (_, ns), s in sorted(targets.items())]))
        r.register(_WorkerCollector(self))
        prometheus_client.ProcessCollector(registry=r)
        self.server: Any = None
        # Other WSGI apps served on the same port, by path (the health checks, when their port is this one).
        self.routes: dict[str, Any] = {}

    # --- called by the master -------------------------------------------------------------------

    def observe(self, kind: str, slot: Any, **fields: Any) -> None:
        """The arbiter's hook: only a put on an unbounded SimpleQueue, which never blocks."""
        self.events.put((kind, None if slot is None else slot.spec, fields))

    def watch(self, slots: Sequence[Any]) -> None:
        """The arbiter's slots, read (never written) at scrape time for kickq_workers."""
        self.slots = slots

    def start(self) -> None:
        metrics_app = prometheus_client.make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            route = self.routes.get(environ.get("PATH_INFO", ""), metrics_app)
            return route(environ, start_response)
        server_class = _ThreadingWSGIServer6 if ":" in self.host else ThreadingWSGIServer  # :: is IPv6
        try:
            self.server = make_server(self.host, self.port, app, server_class, handler_class=_QuietHandler)
        except (OSError, ValueError) as exc:
            raise MetricsError(f"cannot serve metrics on {self.host}:{self.port}: {exc}") from exc
        server = self.server
        # Forked workers and the reaper must not keep the listening socket open.
        os.register_at_fork(after_in_child=server.socket.close)
        threading.Thread(target=server.serve_forever, name="kickq-metrics-http", daemon=True).start()
        threading.Thread(target=self._apply, name="kickq-metrics", daemon=True).start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        self.events.put(None)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- the metrics thread ---------------------------------------------------------------------

    def _namespace(self, spec: int | None) -> str:
        if spec is None or not 0 <= spec < len(self.namespaces):
            return ""
        return str(self.namespaces[spec])

    def _apply(self) -> None:
        while True:
            item = self.events.get()
            if item is None:
                return
            kind, spec, fields = item
            try:
                self.apply(kind, self._namespace(spec), fields)
            except Exception:
                log.exception("metrics: cannot apply %s %r", kind, fields)

    def apply(self, kind: str, namespace: str, fields: Mapping[str, Any]) -> None:
        if kind == "run":
            self.runs.labels(namespace, fields["name"], fields["outcome"]).inc()
            self.processing.labels(namespace, fields["name"]).observe(fields["seconds"])
        elif kind == "ghost":
            self.runs.labels(namespace, fields["name"], "ghost").inc()
            self.ghosts.labels(namespace, fields["name"], fields["reason"]).inc()
        elif kind == "restart":
            self.restarts.labels(fields["reason"]).inc()
        elif kind == "reaper_restart":
            self.reaper_restarts.inc()


class _WorkerCollector:
    """kickq_workers{state}: this supervisor's worker processes, busy (a handler running) or idle; and
    kickq_job_slots{state}: the jobs they can run at once (jobs_per_worker each), busy or free."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("kickq_workers", "Worker processes of this supervisor", labels=["state"])
        slots = GaugeMetricFamily("kickq_job_slots", "Jobs this supervisor's workers can run at once",
                                  labels=["state"])
        busy = idle = busy_slots = free_slots = 0
        for slot in list(self.metrics.slots):
            if slot.pid is None:
                continue
            running = len(slot.running())
            busy, idle = (busy + 1, idle) if running else (busy, idle + 1)
            busy_slots += running
            free_slots += max(0, slot.jobs - running)
        family.add_metric(["busy"], busy)
        family.add_metric(["idle"], idle)
        slots.add_metric(["busy"], busy_slots)
        slots.add_metric(["free"], free_slots)
        yield family
        yield slots


def start_metrics(port: int, per_registration: Sequence[Mapping[str, Any]], host: str = HOST) -> Metrics:
    metrics = Metrics(port, per_registration, host)
    metrics.start()
    return metrics
