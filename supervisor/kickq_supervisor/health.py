"""Health and readiness for `kickq-supervisor --health-port PORT [--health-host HOST]`.

`GET /healthz`: 200 while the master loop runs, the pool is full (or a worker is being replaced
within its crash-loop backoff) and every Redis the supervisor serves answered a PING within the
last REDIS_MAX_AGE seconds; 503 with the reasons otherwise (Redis unreachable, a crash-looping
worker or reaper, stopping, a stalled master loop). `GET /readyz`: 503 while starting (until every
worker of the first full pool has outlived the crash window) and while stopping, else 200. Both
answer a small JSON object.

The master never waits here. It hands `update` to the arbiter, which calls it after each tick:
at most every SNAPSHOT_INTERVAL seconds it copies what the answers need (pool, backoffs, stopping)
into an immutable Snapshot and swaps it in with one assignment. The HTTP server (a thread per
request) reads only that snapshot, and a thread of this module PINGs each Redis on its own
connection, with short timeouts, every PING_INTERVAL seconds.

With `--health-port` equal to `--metrics-port` the metrics server answers both paths as well
(`routes` is mounted on it), so one port serves Prometheus and the probes.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable, Mapping, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis

from kickq.connection import client_scope, connect, describe

from .arbiter import CRASH_WINDOW, Arbiter

log = logging.getLogger("kickq.health")

HOST = "127.0.0.1"
PING_INTERVAL = 1.0  # seconds between two PINGs of one Redis
PING_TIMEOUT = 1.0  # connect and read timeout of each PING
REDIS_MAX_AGE = 3.0  # /healthz fails once a Redis has not answered for this long
LOOP_MAX_AGE = 5.0  # /healthz fails once the master loop has not ticked for this long (it ticks every 1 s)
SNAPSHOT_INTERVAL = 0.2  # the master refreshes the snapshot at most this often
CRASH_LOOP = 3  # consecutive early deaths of a worker or reaper that count as a crash loop

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HealthError(Exception):
    """The health server cannot start (the port is taken, a bad host, ...)."""


@dataclass(frozen=True)
class Snapshot:
    """What the master last saw; built in the master, read by the HTTP threads."""
    at: float  # time.monotonic() of the tick
    workers: int  # worker processes alive
    pool: int  # worker processes the pool should have
    slots: int  # jobs the live workers can run at once
    stopping: bool
    ready: bool  # the first full pool outlived the crash window
    crash_looping: tuple[str, ...]  # "worker 2 (5 early deaths)", ...
    missing: tuple[str, ...]  # workers or reapers down and past their respawn time


@dataclass
class RedisState:
    where: str
    client: Any
    answered: float | None = None  # time.monotonic() of the last PONG
    error: str = ""


class Health:
    def __init__(self, per_registration: Sequence[Mapping[str, Any]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.snapshot: Snapshot | None = None
        self.started = False  # the first full pool outlived the crash window
        self.updated = 0.0
        self.redis: dict[str, RedisState] = {}
        for settings in per_registration:
            scope = client_scope(settings)
            if scope not in self.redis:
                client = connect(settings, socket_timeout=PING_TIMEOUT, socket_connect_timeout=PING_TIMEOUT,
                                 health_check_interval=0)
                self.redis[scope] = RedisState(describe(settings), client)
        self.servers: list[Any] = []
        self.done = threading.Event()
        self.pinger: threading.Thread | None = None

    # --- called by the master (must never block) -------------------------------------------------

    def update(self, arbiter: Arbiter) -> None:
        """After each tick of the master loop: a fresh snapshot, at most every SNAPSHOT_INTERVAL."""
        now = arbiter.ops.monotonic()
        last = self.snapshot
        if last is not None and now - self.updated < SNAPSHOT_INTERVAL and arbiter.stopping == last.stopping:
            return
        self.updated = now
        alive = [s for s in arbiter.slots if s.pid is not None]
        looping = [f"worker {s.number} ({s.failures} early deaths)" for s in arbiter.slots
                   if s.failures >= CRASH_LOOP and (s.pid is None or now - s.spawned_at < CRASH_WINDOW)]
        looping += [f"reaper {i + 1} ({r.failures} early deaths)" for i, r in enumerate(arbiter.reapers)
                    if r.failures >= CRASH_LOOP and (r.pid is None or now - r.spawned_at < CRASH_WINDOW)]
        # A process down past its respawn time (plus a second) is one the master failed to replace.
        missing = [f"worker {s.number}" for s in arbiter.slots if s.pid is None and now > s.respawn_at + 1.0]
        missing += [f"reaper {i + 1}" for i, r in enumerate(arbiter.reapers)
                    if r.pid is None and now > r.respawn_at + 1.0]
        if not self.started and len(alive) == len(arbiter.slots) and all(
                now - s.spawned_at >= CRASH_WINDOW for s in alive) and all(
                r.pid is not None for r in arbiter.reapers):
            self.started = True
        self.snapshot = Snapshot(at=self.clock(), workers=len(alive), pool=len(arbiter.slots),
                                 slots=sum(s.jobs for s in alive), stopping=arbiter.stopping,
                                 ready=self.started, crash_looping=tuple(looping),
                                 missing=() if arbiter.stopping else tuple(missing))

    # --- the answers -------------------------------------------------------------------------------

    def healthz(self) -> tuple[int, dict[str, Any]]:
        now = self.clock()
        snap = self.snapshot
        reasons: list[str] = []
        body: dict[str, Any] = {}
        if snap is None:
            reasons.append("starting")
        else:
            body.update(workers=snap.workers, pool=snap.pool, slots=snap.slots)
            if snap.stopping:
                reasons.append("stopping")
            if now - snap.at > LOOP_MAX_AGE:
                reasons.append(f"master loop stalled ({now - snap.at:.1f}s since its last tick)")
            reasons += [f"{what} crash-looping" for what in snap.crash_looping]
            reasons += [f"{what} not running" for what in snap.missing]
        checks = {}
        for state in list(self.redis.values()):
            age = None if state.answered is None else now - state.answered
            checks[state.where] = {"ok": age is not None and age <= REDIS_MAX_AGE,
                                   "answered": None if age is None else round(age, 3)}
            if age is None or age > REDIS_MAX_AGE:
                since = "no answer yet" if age is None else f"no answer for {age:.1f}s"
                reasons.append(f"Redis at {state.where} unreachable ({since}"
                               + (f": {state.error})" if state.error else ")"))
        body["redis"] = checks
        if reasons:
            return 503, {"status": "fail", "reasons": reasons, **body}
        return 200, {"status": "ok", **body}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        snap = self.snapshot
        if snap is None or not snap.ready:
            return 503, {"status": "starting"}
        if snap.stopping:
            return 503, {"status": "stopping"}
        return 200, {"status": "ready"}

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """WSGI: /healthz and /readyz (GET and HEAD); anything else 404."""
        path = environ.get("PATH_INFO", "")
        answer = {"/healthz": self.healthz, "/readyz": self.readyz}.get(path)
        if answer is None:
            code, body = 404, {"status": "not found", "paths": ["/healthz", "/readyz"]}
        else:
            code, body = answer()
        data = (json.dumps(body, sort_keys=True) + "\n").encode()
        reason = {200: "OK", 503: "Service Unavailable"}.get(code, "Not Found")
        start_response(f"{code} {reason}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                        ("Cache-Control", "no-store")])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [data]

    @property
    def routes(self) -> dict[str, WSGIApp]:
        return {"/healthz": self.app, "/readyz": self.app}

    # --- threads -----------------------------------------------------------------------------------

    def ping_all(self) -> None:
        for state in list(self.redis.values()):
            try:
                state.client.ping()
            except redis.exceptions.RedisError as exc:
                state.error = f"{type(exc).__name__}: {exc}"
                log.debug("health: no PONG from %s: %s", state.where, exc)
            except Exception as exc:  # an unexpected reply or bug must not end the thread
                state.error = f"{type(exc).__name__}: {exc}"
                log.exception("health: cannot PING %s", state.where)
            else:
                state.answered, state.error = self.clock(), ""

    def _ping_loop(self) -> None:
        while not self.done.is_set():
            began = self.clock()
            self.ping_all()
            self.done.wait(max(0.0, PING_INTERVAL - (self.clock() - began)))

    def start_pinging(self) -> None:
        self.pinger = threading.Thread(target=self._ping_loop, name="kickq-health-redis", daemon=True)
        self.pinger.start()

    def serve(self, host: str, port: int) -> None:
        try:
            server = make_server(host, port, self.app, server_class(host), handler_class=_QuietHandler)
        except (OSError, ValueError) as exc:
            raise HealthError(f"cannot serve health checks on {host}:{port}: {exc}") from exc
        # Forked workers and the reaper must not keep the listening socket open.
        os.register_at_fork(after_in_child=server.socket.close)
        threading.Thread(target=server.serve_forever, name="kickq-health-http", daemon=True).start()
        self.servers.append(server)
        log.info("health checks on http://%s/healthz and /readyz", _hostport(host, port))

    def stop(self) -> None:
        self.done.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for state in self.redis.values():
            try:
                state.client.close()
            except redis.exceptions.RedisError:
                pass


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


def server_class(host: str) -> type[WSGIServer]:
    """A threading WSGI server for `host`: IPv6 for an address with a colon (e.g. `::`)."""
    return _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_health(host: str, port: int, per_registration: Sequence[Mapping[str, Any]],
                 metrics: Any = None) -> Health:
    """Start the Redis checks and serve /healthz and /readyz on host:port, or, given the metrics
    exporter that already serves that port, on its server."""
    health = Health(per_registration)
    if metrics is not None:
        if (metrics.host, metrics.port) != (host, port):
            raise HealthError(f"--health-port {port} is the metrics port, so it is served on "
                              f"--metrics-host {metrics.host}; --health-host {host} differs")
        metrics.routes.update(health.routes)
        log.info("health checks on http://%s/healthz and /readyz (with the metrics)", _hostport(host, port))
    else:
        health.serve(host, port)
    health.start_pinging()
    return health
