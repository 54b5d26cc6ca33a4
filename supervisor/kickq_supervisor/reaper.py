"""The reaper process: promotes due jobs, recovers jobs whose lease expired, purges finished jobs.

It keeps nothing in memory that matters: every step is one atomic script over Redis state, so any
number of reapers on any number of hosts may run at once and a reaper may die at any moment.
A reaper serves the namespaces it is given, all on one Redis. After each pass it sleeps until the
earliest due time the scripts reported (on Redis' clock), at most `interval`, subscribed to each
namespace's `reaper` channel: a script that puts a job at the head of the delayed set (a delayed
create, a retry, a schedule's tick) publishes its due time there, which wakes the reaper at once.
"""
from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from typing import Any, Mapping, Sequence

import redis

from kickq import cron, scripts
from kickq.backoff import Outage
from kickq.cluster import left_behind
from kickq.connection import NOTIFICATION_TYPES, UNSUBSCRIBED_TYPES, connect, subscribe_notifications
from kickq.keys import Keys
from kickq.logformat import set_role

from .osapi import die_with_parent, set_title
from .vitals import Vitals

log = logging.getLogger("kickq.reaper")

BATCH = 500
REFILL_EVERY_MS = 1000
#: A marker each reaper pass sets in the namespace's meta hash if it is missing. Redis losing the
#: namespace's data (a restart without persistence, a flush, a failover to a replica without it)
#: takes the marker along, so a reaper that saw another marker before knows, and says so.
EPOCH_FIELD = "epoch"


def refill_schedules(client: Any, scr: scripts.Scripts, keys: Keys, now: int) -> int:
    """Compute more ticks for every cron schedule running low, or whose pending job is gone."""
    records = client.hgetall(keys.schedules)
    crons = {sid: json.loads(text) for sid, text in records.items()}
    crons = {sid: rec for sid, rec in crons.items() if "cron" in rec}
    if not crons:
        return 0
    pipe = client.pipeline(transaction=False)
    for sid, rec in crons.items():
        pipe.zcard(keys.ticks(sid))
        pipe.zrange(keys.ticks(sid), -1, -1, withscores=True)
        if rec.get("pending"):
            pipe.exists(keys.job(rec["pending"]))
        else:
            pipe.echo("0")
    replies = pipe.execute()
    extended = 0
    for index, (sid, rec) in enumerate(crons.items()):
        held, newest, pending_exists = replies[3 * index: 3 * index + 3]
        if held >= cron.REFILL_BELOW and int(pending_exists):
            continue
        ticks = cron.refill_ticks(rec, held, int(newest[0][1]) if newest else None, now)
        scr.run("extend", scripts.extend_args(keys, sid, ticks))
        extended += 1
    return extended


def _woken(pubsub: Any, timeout: float) -> bool:
    """Wait up to `timeout` for a notification; read every message that is there. True when one
    came. A subscription the server ended (on a cluster, the namespace's slot moved to another
    node) raises ConnectionError, so that the caller subscribes again."""
    if left_behind(pubsub):  # Sentinel named another master: the scripts notify there
        raise redis.exceptions.ConnectionError("the master changed")
    woken = False
    message = pubsub.get_message(timeout=timeout)
    while message is not None:
        kind = message.get("type")
        if kind in UNSUBSCRIBED_TYPES:
            raise redis.exceptions.ConnectionError("the server ended the reaper's subscription")
        woken = woken or kind in NOTIFICATION_TYPES
        message = pubsub.get_message(timeout=0)
    return woken


class Reaper:
    def __init__(self, settings: Mapping[str, Any], namespaces: Sequence[str], *,
                 interval: float = 1.0) -> None:
        self.settings = dict(settings)
        self.keys = [Keys(ns) for ns in namespaces]
        self.interval = interval
        self.client: Any = None
        self.scripts: Any = None
        self._refilled: dict[str, int] = {}
        self._epochs: dict[str, str] = {}

    def tick(self, keys: Keys, now: int | None = None) -> float:
        """One pass over one namespace; returns seconds until something may be due (0 = go again)."""
        assert self.scripts is not None and self.client is not None
        pipe = self.client.pipeline(transaction=False)
        self.scripts.run("promote", scripts.sweep_args(keys, BATCH, now), client=pipe)
        self.scripts.run("recover", scripts.sweep_args(keys, BATCH, now, "lease expired: its worker or "
                                                       "supervisor was lost"), client=pipe)
        self.scripts.run("purge", scripts.sweep_args(keys, BATCH, now), client=pipe)
        pipe.hget(keys.meta, EPOCH_FIELD)
        (promoted, next_due, redis_now), (recovered, next_lease), (purged, next_purge), epoch = pipe.execute()
        self._check_epoch(keys, epoch)
        self._maybe_refill(keys, int(redis_now))
        if recovered:
            log.warning("recovered %d job(s) whose lease expired in %s", recovered, keys.namespace)
        if promoted or purged:
            log.debug("promoted %d, purged %d in %s", promoted, purged, keys.namespace)
        if BATCH in (promoted, recovered, purged):
            return 0.0
        upcoming = [t for t in (next_due, next_lease, next_purge) if t >= 0]
        if not upcoming:
            return self.interval
        return float(max(0.0, min(self.interval, (min(upcoming) - int(redis_now)) / 1000)))

    def _check_epoch(self, keys: Keys, epoch: str | None) -> None:
        if epoch is None:  # a new namespace, or its data was lost: mark it (any reaper's mark wins)
            try:
                self.client.hsetnx(keys.meta, EPOCH_FIELD, uuid.uuid4().hex)
                epoch = self.client.hget(keys.meta, EPOCH_FIELD)
            except redis.exceptions.ResponseError as exc:  # e.g. OOM at maxmemory: mark it next pass
                log.debug("cannot mark namespace %s yet: %s", keys.namespace, exc)
                return
        seen = self._epochs.get(keys.namespace)
        if seen is not None and epoch != seen:
            log.error("Redis lost the data of namespace %s (marker %s replaced by %s): it restarted without "
                      "persistence, was flushed, or failed over to a replica without the data; every job "
                      "created before then is gone", keys.namespace, seen, epoch)
        self._epochs[keys.namespace] = epoch

    def _maybe_refill(self, keys: Keys, now: int) -> None:
        if now - self._refilled.get(keys.namespace, 0) < REFILL_EVERY_MS:
            return
        self._refilled[keys.namespace] = now
        refill_schedules(self.client, self.scripts, keys, now)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        die_with_parent()
        set_title("kickq-supervisor: reaper")
        set_role("reaper")
        self.client = connect(self.settings)
        self.scripts = scripts.Scripts(self.client)
        vitals = Vitals([k.namespace for k in self.keys], float(self.settings.get("vitals_interval", 300)))
        outage = Outage(log, "reaper")
        pubsub = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub()
                    subscribe_notifications(self.client, pubsub, *[k.reaper for k in self.keys])
                wait = min(self.tick(keys) for keys in self.keys)
                wait = min(wait, vitals.due(self.client))  # logs a vitals line when one is due
                outage.ok()
                # Sleep on the subscription: a producer that schedules something earlier wakes us,
                # and the timeout is kept by the client, to the millisecond (a blocking Redis
                # command would only time out on the server's 100 ms cron).
                deadline = time.monotonic() + wait
                while (left := deadline - time.monotonic()) > 0:
                    if _woken(pubsub, left):
                        break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                delay = outage.failed(exc)
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                time.sleep(delay)
