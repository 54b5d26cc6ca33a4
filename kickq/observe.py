"""Stats and events: reading what the transition scripts record (see note() in lua/_lib_tally.lua).

Pure functions over raw Redis replies, so the sync and asyncio clients share them.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from .job import STATES
from .keys import Keys

BUCKET_MS = 10_000  # as in lua/_lib_tally.lua
WINDOW_EVENTS = ("created", "processed", "success", "fail", "retry", "ghost")


def window_buckets(now_ms: int, window_s: float) -> list[int]:
    """Start times of the 10 s buckets that overlap the last `window_s` seconds."""
    first = int((now_ms - window_s * 1000) // BUCKET_MS * BUCKET_MS)
    return list(range(first, now_ms - now_ms % BUCKET_MS + 1, BUCKET_MS))


def queue_commands(pipe: Any, keys: Keys, buckets: Sequence[int]) -> None:
    """The reads stats() needs, in one pipeline: counts, names, then each bucket's hash and samples."""
    pipe.hgetall(keys.counts)
    pipe.smembers(keys.names)
    for bucket in buckets:
        pipe.hgetall(keys.stats_bucket(bucket))
        pipe.lrange(keys.times_bucket(bucket), 0, -1)


def _percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[index]


def _empty_window() -> dict[str, Any]:
    return {event: 0 for event in WINDOW_EVENTS}


def _finish_window(window: dict[str, Any], total_ms: int, max_ms: int | None, samples: list[float],
                   window_s: float) -> dict[str, Any]:
    samples.sort()
    processed = window["processed"]
    window["throughput"] = processed / window_s
    window["processing_time"] = {
        "mean": total_ms / processed if processed else None,
        "p50": _percentile(samples, 0.50),
        "p95": _percentile(samples, 0.95),
        "max": max_ms,
    }
    return window


def build_stats(replies: Sequence[Any], window_s: float, only: str | None = None) -> dict[str, Any]:
    """The documented stats shape from the replies of queue_commands()."""
    counts, names = replies[0], set(replies[1])
    per_state: dict[str, dict[str, int]] = {}
    for field, value in counts.items():
        state, _, name = field.partition(":")
        names.add(name)
        per_state.setdefault(name, {})[state] = int(value)
    if only is not None:
        names = {only}
    windows = {name: _empty_window() for name in names}
    totals = {name: 0 for name in names}
    maxima: dict[str, int | None] = {name: None for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for bucket_hash, bucket_samples in zip(replies[2::2], replies[3::2], strict=True):
        for field, value in bucket_hash.items():
            kind, _, name = field.partition(":")
            if name not in windows:
                continue
            if kind == "time":
                totals[name] += int(value)
            elif kind == "max":
                maxima[name] = max(int(value), maxima[name] or 0)
            elif kind in windows[name]:
                windows[name][kind] += int(value)
        for sample in bucket_samples:
            ms, _, name = sample.partition(":")
            if name in samples:
                samples[name].append(float(ms))
    out_names = {}
    total_states = {state: 0 for state in STATES}
    total_window = _empty_window()
    all_samples: list[float] = []
    for name in sorted(names):
        states = {state: per_state.get(name, {}).get(state, 0) for state in STATES}
        for state, n in states.items():
            total_states[state] += n
        for event in WINDOW_EVENTS:
            total_window[event] += windows[name][event]
        all_samples += samples[name]
        out_names[name] = {"states": states,
                           "window": _finish_window(windows[name], totals[name], maxima[name],
                                                    samples[name], window_s)}
    known_max = [m for m in maxima.values() if m is not None]
    return {
        "window_seconds": window_s,
        "names": out_names,
        "total": {"states": total_states,
                  "window": _finish_window(total_window, sum(totals.values()),
                                           max(known_max) if known_max else None, all_samples, window_s)},
    }


def event_dict(stream_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    return {"id": fields.get("id"), "name": fields.get("name"), "event": fields.get("event"),
            "state": fields.get("state") or None, "time": int(fields.get("time") or 0),
            "stream_id": stream_id}


def wanted(event: Mapping[str, Any], names: Iterable[str] | None) -> bool:
    return names is None or event["name"] in names


def read_events(reply: Any, names: Iterable[str] | None) -> tuple[list[dict[str, Any]], str | None]:
    """The wanted events of an XREAD reply, and the last stream id it held (None: it held none)."""
    out, last = [], None
    for _, entries in reply or ():
        for stream_id, fields in entries:
            last = stream_id
            event = event_dict(stream_id, fields)
            if wanted(event, names):
                out.append(event)
    return out, last
