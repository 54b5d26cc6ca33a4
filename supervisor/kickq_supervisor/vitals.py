"""Vitals: every `vitals_interval` seconds the reaper logs what happened in each namespace since its
last line: created, processed, success, fail, retry, ghost and the average processing time, per job
name and in total.

Read from the 10 s stats buckets the transition scripts keep (see note() in kickq/lua/_lib_tally.lua), so
it costs a few reads whatever the number of jobs. Intervals do not overlap: the bucket a line ended
in is remembered as it was then, and the next line counts only what was added to it afterwards. The
figures are namespace-wide (every supervisor's work), like kq.stats().
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import redis

from kickq.keys import Keys
from kickq.observe import BUCKET_MS

log = logging.getLogger("kickq.vitals")

COUNTS = ("created", "processed", "success", "fail", "retry", "ghost")
#: Buckets live an hour (BUCKET_TTL in _lib_tally.lua); a longer gap only loses what expired.
MAX_BUCKETS = 360


@dataclass
class Mark:
    """Where the last line ended: Redis time (ms) and the counters of that bucket then."""
    at_ms: int
    bucket: int
    seen: dict[str, int] = field(default_factory=dict)


def bucket_of(ms: int) -> int:
    return ms - ms % BUCKET_MS


def buckets_between(start_ms: int, end_ms: int) -> list[int]:
    first, last = bucket_of(start_ms), bucket_of(end_ms)
    first = max(first, last - (MAX_BUCKETS - 1) * BUCKET_MS)
    return list(range(first, last + 1, BUCKET_MS))


def add_up(mark: Mark, buckets: Sequence[int], hashes: Sequence[Mapping[str, str]]
           ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per name {created, ..., ghost, time} over `buckets`, less what `mark` had already counted;
    and the counters of the last bucket (the next mark)."""
    per_name: dict[str, dict[str, int]] = {}
    for bucket, fields in zip(buckets, hashes, strict=True):
        for key, value in fields.items():
            kind, _, name = key.partition(":")
            if kind not in COUNTS and kind != "time":
                continue  # "max:<name>" cannot be split by time
            n = int(value)
            if bucket == mark.bucket:
                n -= mark.seen.get(key, 0)
            if n:
                entry = per_name.setdefault(name, dict.fromkeys((*COUNTS, "time"), 0))
                entry[kind] += n
    return per_name, {k: int(v) for k, v in (hashes[-1] if hashes else {}).items()}


def describe(figures: Mapping[str, int]) -> str:
    processed = figures["processed"]
    avg = f"{figures['time'] / processed:.0f}ms" if processed else "-"
    return " ".join(f"{k}={figures[k]}" for k in COUNTS) + f" avg={avg}"


def lines(namespace: str, seconds: float, per_name: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The log lines of one interval: one per active name (sorted), then the total."""
    total = dict.fromkeys((*COUNTS, "time"), 0)
    out = []
    for name in sorted(per_name):
        figures = per_name[name]
        for key in total:
            total[key] += figures[key]
        out.append(f"vitals [{namespace}] last {seconds:.1f}s {name!r}: {describe(figures)}")
    out.append(f"vitals [{namespace}] last {seconds:.1f}s total: {describe(total)}")
    return out


class Vitals:
    """Used by the reaper: `due(client)` logs when an interval has passed and returns the seconds
    until the next line, so the reaper never sleeps past it."""

    def __init__(self, namespaces: Sequence[str], interval: float,
                 emit: Callable[[str], None] = log.info, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = [Keys(ns) for ns in namespaces]
        self.interval = float(interval)
        self.emit = emit
        self.clock = clock
        self.marks: dict[str, Mark] = {}
        self.next_at = clock() + self.interval

    def due(self, client: Any) -> float:
        if not self.marks:
            self._read(client, emit=False)
        now = self.clock()
        if now >= self.next_at:
            try:
                self._read(client, emit=True)
            except (redis.exceptions.ResponseError, ValueError) as exc:  # never worth a reaper's life
                log.warning("vitals: cannot read the stats buckets: %s", exc)
            # Keep the rhythm; after a long stall (Redis away) start again from now.
            self.next_at = max(self.next_at + self.interval, now + self.interval / 2)
        return max(0.0, self.next_at - self.clock())

    def _read(self, client: Any, emit: bool) -> None:
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for keys in self.keys:
            mark = self.marks.get(keys.namespace) or Mark(now_ms, bucket_of(now_ms))
            buckets = buckets_between(mark.at_ms, now_ms)
            pipe = client.pipeline(transaction=False)
            for bucket in buckets:
                pipe.hgetall(keys.stats_bucket(bucket))
            per_name, last = add_up(mark, buckets, pipe.execute())
            if emit:
                for line in lines(keys.namespace, (now_ms - mark.at_ms) / 1000, per_name):
                    self.emit(line)
            self.marks[keys.namespace] = Mark(now_ms, buckets[-1], last)
