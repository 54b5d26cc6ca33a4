"""`Kickq`: the client that web apps and scripts use to create, read and delete jobs."""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import redis

from . import cron as cron_rules
from . import acks, cluster, observe, payload, registry, scripts
from .backoff import Backoff
from .config import (GLOBAL_DEFAULTS, ConfigError, current, merge_settings, on_reset, resolve_job_options,
                     snake_case,
                     stored_options, validate_settings)
from .config import version as config_version
from .connection import (Lane, check_mode, check_version, client_identity, connect, describe, redis_errors,
                         server_info)
from .errors import JobNotFound, KickqError
from .hotjob import HotjobWaiter
from .job import Job, queue_reads, read_fields
from .keys import Keys, validate_name

Callback = Callable[[BaseException | None, "Job | None", Any], Any]
_CREATE_CHUNK = 1000
_clients: "weakref.WeakSet[Kickq]" = weakref.WeakSet()


class _Waiters:
    """Every hotjob waiter with live threads, held strongly: a client dropped without close()
    must not leave threads that reset() cannot reach."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[HotjobWaiter] = set()

    def add_new(self, *args: Any) -> HotjobWaiter:
        waiter = HotjobWaiter(*args)
        with self._lock:
            self._open.add(waiter)
        return waiter

    def close(self, waiter: HotjobWaiter) -> None:
        with self._lock:
            self._open.discard(waiter)
        waiter.close()

    def close_all(self) -> None:
        with self._lock:
            waiters, self._open = self._open, set()
        for waiter in waiters:
            waiter.close()


_open_waiters = _Waiters()


class Prepared:
    """A job checked and encoded, ready for the create script; nothing written yet."""
    __slots__ = ("name", "data", "opts", "stored", "delay_ms")

    def __init__(self, name: str, data: str, opts: dict[str, Any], stored: str, delay_ms: int | None):
        self.name, self.data, self.opts, self.stored, self.delay_ms = name, data, opts, stored, delay_ms

    def script_item(self) -> tuple[str, str, str, int | None]:
        return (self.name, self.data, self.stored, self.delay_ms)


def resolve(settings: Mapping[str, Any], name: Any, opts: Any) -> tuple[str, dict[str, Any], str, int | None]:
    """(name, resolved options, stored options JSON, delay ms) for one job; raises on bad input."""
    name = validate_name(name)
    if opts is not None and not isinstance(opts, Mapping):
        raise ConfigError(f"opts must be a dict of job options, not {type(opts).__name__}")
    resolved = resolve_job_options(settings, name, opts)
    stored = stored_options(resolved)
    delay = resolved["delay"]
    return (name, resolved, payload.encode(stored) if stored else "",
            None if delay is None else int(round(delay * 1000)))


def prepare(settings: Mapping[str, Any], name: Any, data: Any, opts: Any,
            resolved: tuple[str, dict[str, Any], str, int | None] | None = None) -> Prepared:
    """Validate and encode one job: every error a bad input can cause is raised here."""
    name, options, stored, delay_ms = resolved or resolve(settings, name, opts)
    data_json = "" if data is None else payload.encode(data, limit=settings["max_payload_bytes"])
    return Prepared(name, data_json, options, stored, delay_ms)


def schedule_record(settings: Mapping[str, Any], name: Any, cron: Any, every: Any, data: Any, opts: Any,
                    schedule_id: Any, timezone: Any, catch_up: Any) -> tuple[str, dict[str, Any]]:
    """(schedule id, record) of a schedule, every input checked: nothing is written before this."""
    sid = validate_name(name if schedule_id is None else schedule_id)
    cron_rules.validate(cron, every, timezone, catch_up)
    if isinstance(opts, Mapping) and any(snake_case(str(k)) == "delay" for k in opts):
        raise ConfigError("delay does not apply to scheduled jobs: each tick is their due time")
    prepared = prepare(settings, name, data, opts)
    stored = stored_options({**prepared.opts, "delay": None})
    record: dict[str, Any] = {"name": prepared.name, "data": prepared.data,
                              "opts": payload.encode(stored) if stored else "",
                              "timezone": timezone, "catch_up": catch_up}
    if cron is not None:
        record["cron"] = cron
    else:
        record["every"] = every
        record["every_ms"] = max(1, int(round(every * 1000)))
    return sid, record


def schedule_ticks(record: Mapping[str, Any], redis_time: tuple[int, int] | None) -> list[int]:
    """The first cron ticks after Redis' TIME reply (none for `every`: Lua computes those)."""
    if "cron" not in record or redis_time is None:
        return []
    seconds, micros = redis_time
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return cron_rules.ticks_after(record["cron"], record["timezone"], now_ms, cron_rules.TICKS_AHEAD)


def item_triples(items: Iterable[Sequence[Any]]) -> list[tuple[Any, Any, Any]]:
    """create_many's items, (name,), (name, data) or (name, data, opts), as (name, data, opts)."""
    triples = []
    for index, item in enumerate(items):
        if isinstance(item, str) or not isinstance(item, Sequence) or not 1 <= len(item) <= 3:
            raise TypeError(f"item {index}: expected (name,), (name, data) or (name, data, opts), "
                            f"got {item!r}")
        triples.append((item[0], item[1] if len(item) > 1 else None, item[2] if len(item) > 2 else None))
    return triples


def schedule_entry(sid: str, text: str) -> dict[str, Any]:
    """One item of schedules(), from its stored record."""
    record = payload.decode(text)
    entry = {"id": sid, "name": record["name"], "timezone": record["timezone"],
             "catch_up": record["catch_up"],
             "next_run": None if record.get("next_run", -1) < 0 else int(record["next_run"]),
             "last_job_id": record.get("last_job_id") or None,
             "pending_job_id": record.get("pending") or None}
    if "cron" in record:
        entry["cron"] = record["cron"]
    else:
        entry["every"] = record["every"]
    return entry



def events_maxlen_command(settings: Mapping[str, Any]) -> tuple[Any, ...]:
    """The write a client makes when it connects: its events_maxlen into the namespace's meta hash,
    which the scripts read. An explicit setting wins; the default never overwrites another client's."""
    maxlen = int(settings["events_maxlen"])
    verb = "HSETNX" if maxlen == GLOBAL_DEFAULTS["events_maxlen"] else "HSET"
    return (verb, Keys(settings["redis_namespace"]).meta, "events_maxlen", maxlen)

class Kickq:
    """A client. `Kickq(**overrides)` takes any global config key; the global config is read at each
    call, so `kickq.config()` changes made later apply too."""

    def __init__(self, **overrides: Any) -> None:
        self._overrides = validate_settings(overrides)
        self._settings_cache: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        self._fast_connection: tuple[Mapping[str, Any], redis.Redis, scripts.Scripts] | None = None
        self._lock = threading.Lock()
        self._redis: redis.Redis | None = None
        self._redis_key: tuple[tuple[str, ...], str] | None = None
        self._scripts: scripts.Scripts | None = None
        self._server_info: Mapping[str, Any] = {}  # INFO when the client connected
        self._waiters: dict[str, HotjobWaiter] = {}  # one per namespace
        _clients.add(self)

    # --- plumbing ----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The effective config: global, then this client's overrides. Cached until config() changes;
        treat it as read-only."""
        version = config_version()
        cached = self._settings_cache
        if cached is None or cached[0] != version:
            cached = self._settings_cache = (version, merge_settings(current(), self._overrides), {})
        return cached[1]

    def _resolved(self, settings: Mapping[str, Any], name: Any, opts: Any
                  ) -> tuple[str, dict[str, Any], str, int | None]:
        """resolve() with the common case (no per-job opts) cached per job name."""
        cached = self._settings_cache
        if opts or cached is None or cached[1] is not settings or not isinstance(name, str):
            return resolve(settings, name, opts)
        by_name = cached[2]
        hit = by_name.get(name)
        if hit is None:
            hit = by_name[name] = resolve(settings, name, None)
            if len(by_name) > 10_000:
                by_name.clear()
        return hit

    def keys(self, settings: Mapping[str, Any] | None = None) -> Keys:
        return Keys((settings or self.settings())["redis_namespace"])

    def _connection(self, settings: Mapping[str, Any]) -> tuple[Any, scripts.Scripts]:
        fast = self._fast_connection
        if fast is not None and fast[0] is settings:
            return fast[1], fast[2]
        client, scr = self._connect_for(settings)
        self._fast_connection = (settings, client, scr)
        return client, scr

    def _connect_for(self, settings: Mapping[str, Any]) -> tuple[redis.Redis, scripts.Scripts]:
        ident = client_identity(settings)
        with self._lock:
            if self._redis is None or self._redis_key != ident:
                if self._redis_key is not None and self._redis_key[0] == ident[0]:
                    self._close_client_locked()  # another namespace on a Cluster: another master
                else:
                    self._close_locked()
                client = connect(settings)
                with redis_errors(settings):
                    info = server_info(client)
                    check_version(info)
                    check_mode(info, settings)
                    client.execute_command(*events_maxlen_command(settings))
                self._redis, self._redis_key, self._server_info = client, ident, info
                self._scripts = scripts.Scripts(client, Lane(client))
            assert self._scripts is not None
            return self._redis, self._scripts

    @property
    def redis(self) -> redis.Redis:
        """The underlying redis-py client (decode_responses=True)."""
        client: redis.Redis = self._connection(self.settings())[0]
        return client

    def _hotjob_waiter(self, settings: Mapping[str, Any]) -> HotjobWaiter:
        namespace = settings["redis_namespace"]
        with self._lock:
            waiter = self._waiters.get(namespace)
            if waiter is None:
                waiter = self._waiters[namespace] = _open_waiters.add_new(
                    lambda: connect(settings), Keys(namespace), float(settings["redis_timeout"]))
            return waiter

    def _close_locked(self) -> None:
        for waiter in self._waiters.values():
            _open_waiters.close(waiter)
        self._waiters.clear()
        self._close_client_locked()

    def _close_client_locked(self) -> None:
        """Close the client but not the hotjob waiters (one per namespace, each with its own
        connection)."""
        self._fast_connection = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
            self._scripts = None

    def close(self) -> None:
        """Close connections; pending hotjob futures are cancelled. The client can be used again."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> "Kickq":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- create ------------------------------------------------------------------------------------

    def create(self, name: str, data: Any = None, opts: Mapping[str, Any] | None = None,
               callback: Callback | None = None) -> Job | None:
        """Create a job. A numeric `delay` (0 included) makes it `delayed`, else `new`.

        With `callback(err, job, hotjob_promise)`, errors go to the callback and None is returned.
        As in the original, a function in the data or opts slot is taken as the callback.
        """
        if callback is None and callable(opts):
            callback, opts = opts, None
        if callback is None and callable(data) and opts is None:
            callback, data = data, None
        if callback is None:
            return self._create_one(name, data, opts)
        try:
            job = self._create_one(name, data, opts)
        except (KickqError, TypeError, ValueError) as err:
            callback(err, None, None)
            return None
        callback(None, job, job.hotjob_promise)
        return job

    def _create_one(self, name: Any, data: Any, opts: Any) -> Job:
        if isinstance(opts, Mapping) and ("cron" in opts or "every" in opts):
            # The original API sketch: create(name, data, {"cron": ...}) registers a schedule whose
            # id is the job name, and returns its first (delayed) tick job.
            rest = {k: v for k, v in opts.items() if k not in ("cron", "every")}
            _, pending = self._schedule(name, opts.get("cron"), opts.get("every"), data, rest, None,
                                        "UTC", "one")
            return self.get(pending)
        return self._create([(name, data, opts)])[0]

    def create_many(self, items: Iterable[Sequence[Any]]) -> list[Job]:
        """Create many jobs in one round trip: items are (name,), (name, data) or (name, data, opts).

        Every item is checked first: one bad item raises and nothing is written. The batch is
        written atomically (one MULTI of create scripts).
        """
        triples = item_triples(items)
        return self._create(triples) if triples else []

    def _create(self, triples: Sequence[tuple[Any, Any, Any]]) -> list[Job]:
        settings = self.settings()
        prepared = [prepare(settings, name, data, opts, self._resolved(settings, name, opts))
                    for name, data, opts in triples]
        client, scr = self._connection(settings)
        keys = Keys(settings["redis_namespace"])
        hot = [p for p in prepared if p.opts["hotjob"]]
        waiter = self._hotjob_waiter(settings) if hot else None
        generations = [waiter.ensure_subscribed() for _ in hot] if waiter else []
        drafts: list[dict[str, Any]] = []

        def draft_jobs() -> None:  # the Jobs but for their ids and times, built while Redis works
            drafts.extend(Job.draft(p.name, p.delay_ms, p.stored, p.data) for p in prepared)

        started = time.monotonic()
        try:
            with redis_errors(settings):
                if settings["wait_replicas"] or settings["wait_aof"]:
                    created = self._create_acked(settings, client, scr, keys, prepared)
                elif len(prepared) == 1:
                    created = scripts.parse_create(scr.run(
                        "create", scripts.create_args(keys, [prepared[0].script_item()]),
                        meanwhile=draft_jobs))
                else:
                    pipe = client.pipeline(transaction=True)
                    for start in range(0, len(prepared), _CREATE_CHUNK):
                        chunk = [p.script_item() for p in prepared[start:start + _CREATE_CHUNK]]
                        scr.run("create", scripts.create_args(keys, chunk), client=pipe)
                    created = [pair for reply in pipe.execute() for pair in scripts.parse_create(reply)]
        except BaseException:
            for _ in generations:
                assert waiter is not None
                waiter.abandon()
            raise
        if not drafts:
            draft_jobs()
        jobs = []
        for p, draft, (job_id, create_time) in zip(prepared, drafts, created, strict=True):
            promise = None
            if p.opts["hotjob"]:
                assert waiter is not None
                promise = waiter.watch(job_id, float(p.opts["hotjob_timeout"]), started,
                                       generations.pop(), client)
            jobs.append(Job.from_draft(draft, job_id, create_time, p.delay_ms, promise))
        return jobs

    def _create_acked(self, settings: Mapping[str, Any], client: Any, scr: scripts.Scripts, keys: Keys,
                      prepared: Sequence[Prepared]) -> list[tuple[str, int]]:
        """The create of `prepared` (one MULTI), confirmed by wait_replicas replicas (kickq.acks)."""
        wanted = self._acks(settings)
        calls = acks.create_calls(keys, [p.script_item() for p in prepared], _CREATE_CHUNK)
        results, waited = acks.run(client, scr, calls, wanted)
        created = [pair for reply in results for pair in scripts.parse_create(reply)]
        acks.confirm(wanted, waited, "create" if len(prepared) == 1 else "create_many",
                     [job_id for job_id, _ in created], acks.where(client.connection_pool))
        return created

    def _acks(self, settings: Mapping[str, Any]) -> acks.Acks:
        """What a write waits for (settings with wait_replicas > 0), checked against the server
        before anything is written."""
        wanted = acks.wanted(settings)
        assert wanted is not None
        acks.check_server(wanted, self._server_info, describe(settings))
        return wanted

    def _acked_call(self, settings: Mapping[str, Any], client: Any, scr: scripts.Scripts, name: str,
                    keys_and_args: tuple[list[str], list[Any]], job_ids: Callable[[Any], list[str]]) -> Any:
        """One script call confirmed by wait_replicas replicas: its reply; `job_ids(reply)` are the
        jobs a ReplicationTimeout names."""
        wanted = self._acks(settings)
        (reply,), waited = acks.run(client, scr, [(name, keys_and_args)], wanted)
        acks.confirm(wanted, waited, name, job_ids(reply), acks.where(client.connection_pool))
        return reply

    # --- read and delete ---------------------------------------------------------------------------

    def get(self, job_id: str | int) -> Job:
        settings = self.settings()
        client, _ = self._connection(settings)
        job_id = str(job_id)
        keys = Keys(settings["redis_namespace"])
        with redis_errors(settings):
            pipe = client.pipeline(transaction=False)
            queue_reads(pipe, keys, [job_id])
            fields = read_fields(pipe.execute())[0]
        if not fields:
            raise JobNotFound(job_id)
        try:
            return Job.from_fields(job_id, fields)
        except ValueError as exc:  # JSON that is not JSON: written by something other than kickq
            raise KickqError(f"job {job_id} cannot be decoded: {exc}") from exc

    def delete(self, job_id: str | int) -> bool:
        """Remove the job from every structure. True if it existed. A worker still running it
        cannot bring it back: its finish is rejected."""
        settings = self.settings()
        client, scr = self._connection(settings)
        job_id = str(job_id)
        keys = Keys(settings["redis_namespace"])
        with redis_errors(settings):
            if settings["wait_replicas"] or settings["wait_aof"]:
                call = scripts.delete_args(keys, job_id)
                return bool(self._acked_call(settings, client, scr, "delete", call, lambda reply: [job_id]))
            return scr.delete(keys, job_id)

    # --- schedules ---------------------------------------------------------------------------------

    def schedule(self, name: str, cron: str | None = None, every: float | None = None, data: Any = None,
                 opts: Mapping[str, Any] | None = None, schedule_id: str | None = None,
                 timezone: str = "UTC", catch_up: str = "one") -> str:
        """Create or replace a schedule; returns its id (default: the job name).

        Exactly one of `cron` (5 fields, or 6 with seconds as croniter reads them) and `every`
        (seconds). Each tick's job is an ordinary delayed job created ahead, due at the tick, with
        `scheduled_for` = the tick; promoting it creates the next tick's job in the same atomic step,
        so any number of reapers make exactly one job per tick. `catch_up` decides what happens to
        ticks missed while no reaper ran: "one" (run once, late), "skip", or "all" (at most 100).
        """
        return self._schedule(name, cron, every, data, opts, schedule_id, timezone, catch_up)[0]

    def _schedule(self, name: Any, cron: Any, every: Any, data: Any, opts: Any, schedule_id: Any,
                  timezone: Any, catch_up: Any) -> tuple[str, str]:
        settings = self.settings()
        sid, record = schedule_record(settings, name, cron, every, data, opts, schedule_id, timezone,
                                      catch_up)
        client, scr = self._connection(settings)
        keys = Keys(settings["redis_namespace"])
        with redis_errors(settings):
            # Cron ticks from Redis' clock: every host computes the same ones.
            ticks = schedule_ticks(record, client.time() if cron is not None else None)
            call = scripts.schedule_args(keys, sid, payload.encode(record), ticks)
            if settings["wait_replicas"] or settings["wait_aof"]:
                pending, _ = self._acked_call(settings, client, scr, "schedule", call,
                                              lambda reply: [str(reply[0])])
            else:
                pending, _ = scr.run("schedule", call)
        return sid, str(pending)

    def unschedule(self, schedule_id: str) -> bool:
        """Remove a schedule and its pending tick job. True if it existed."""
        settings = self.settings()
        call = scripts.unschedule_args(Keys(settings["redis_namespace"]), validate_name(schedule_id))
        client, scr = self._connection(settings)
        with redis_errors(settings):
            if settings["wait_replicas"] or settings["wait_aof"]:
                return bool(self._acked_call(settings, client, scr, "unschedule", call, lambda reply: []))
            return bool(scr.run("unschedule", call))

    def schedules(self) -> list[dict[str, Any]]:
        """Every schedule: id, name, cron or every, timezone, catch_up, next_run (epoch ms, None when
        the reaper has yet to compute it), last_job_id, pending_job_id."""
        settings = self.settings()
        client, _ = self._connection(settings)
        with redis_errors(settings):
            raw = client.hgetall(Keys(settings["redis_namespace"]).schedules)
        return [schedule_entry(sid, text) for sid, text in sorted(raw.items())]

    # --- seeing inside ------------------------------------------------------------------------------

    def stats(self, name: str | None = None) -> dict[str, Any]:
        """Counts by state and a recent window of activity, per job name and in total.

        Shape: {"window_seconds": s, "names": {name: {"states": {state: n, ...}, "window": {...}}},
        "total": {"states": ..., "window": ...}}; a window holds created, processed, success, fail,
        retry, ghost (counts), throughput (runs per second) and processing_time {mean, p50, p95,
        max} in ms. Cheap: no job is read, only counters the transitions keep.
        """
        settings = self.settings()
        client, _ = self._connection(settings)
        keys = Keys(settings["redis_namespace"])
        if name is not None:
            validate_name(name)
        window = float(settings["stats_window"])
        with redis_errors(settings):
            seconds, micros = client.time()
            buckets = observe.window_buckets(seconds * 1000 + micros // 1000, window)
            pipe = client.pipeline(transaction=False)
            observe.queue_commands(pipe, keys, buckets)
            replies = pipe.execute()
        return observe.build_stats(replies, window, only=name)

    def events(self, names: str | Iterable[str] | None = None, since: str = "$",
               timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Iterate transitions as they happen: dicts with id, name, event, state, time (epoch ms)
        and stream_id. `since` is a stream id, "0" for everything kept, or "$" for new ones only.
        Survives reconnects (it resumes after the last id it yielded). With `timeout`, stops after
        that many seconds without an event."""
        settings = self.settings()
        if since == "$":  # pinned now, at the call, not at the first next()
            client, _ = self._connection(settings)
            with redis_errors(settings):
                newest = client.xrevrange(Keys(settings["redis_namespace"]).events, count=1)
            since = newest[0][0] if newest else "0-0"
        return self._events(settings, names, since, timeout)

    def _events(self, settings: Mapping[str, Any], names: str | Iterable[str] | None, since: str,
                timeout: float | None) -> Iterator[dict[str, Any]]:
        wanted_names = {names} if isinstance(names, str) else (set(names) if names is not None else None)
        keys = Keys(settings["redis_namespace"])
        block_ms = int(max(0.05, min(1.0, float(settings["redis_timeout"]) / 2)) * 1000)
        last = since
        idle_since = time.monotonic()
        backoff = Backoff()
        while True:
            try:
                client, _ = self._connection(settings)
                reply = client.xread({keys.events: last}, count=500, block=block_ms)
                backoff.reset()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                time.sleep(backoff.next_delay())
                reply = None
            events, newest = observe.read_events(reply, wanted_names)
            last = newest or last
            if events:
                idle_since = time.monotonic()
            for event in events:
                yield event
            if timeout is not None and time.monotonic() - idle_since > timeout:
                return

    # --- handlers ----------------------------------------------------------------------------------

    def process(self, names: str | list[str], options: Mapping[str, Any] | Callable[..., Any] | None = None,
                handler: Callable[..., Any] | None = None) -> Any:
        """Register `handler` for `names` (priority order). Without a handler, returns a decorator.

        options: {"concurrent_jobs": N} (alias concurrentJobs): N worker processes for these names;
        {"jobs_per_worker": M} (alias jobsPerWorker, default 1): each runs up to M jobs at once, an
        `async def` handler as tasks on the worker's event loop, any other in a pool of M threads
        (docs/supervisor.md says when to choose it).
        """
        if handler is None and callable(options):
            handler, options = options, None
        job_names = registry.normalise_names(names)
        opts = registry.normalise_options(options)  # type: ignore[arg-type]

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(func):
                raise TypeError("process() needs a callable handler")
            registry.register(registry.Registration(job_names, opts["concurrent_jobs"], func,
                                                    dict(self._overrides), opts["jobs_per_worker"]))
            return func

        if handler is None:
            return register
        register(handler)
        return None


def close_all() -> None:
    for client in list(_clients):
        client.close()
    _open_waiters.close_all()
    cluster.close_discoveries()
    registry.clear()


on_reset(close_all)
