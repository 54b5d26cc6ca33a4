"""Schedules: validation and cron tick computation (croniter). The transitions are in Lua
(schedule, unschedule, extend, and promote, which creates each next tick's job atomically)."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .config import ConfigError

CATCH_UP = ("one", "skip", "all")
TICKS_AHEAD = 64  # cron ticks kept computed ahead in Redis
REFILL_BELOW = 32  # the reaper computes more when fewer than this remain
CATCH_UP_CAP = 100  # as in lua/_lib_schedule.lua


def validate(cron: Any, every: Any, timezone: Any, catch_up: Any) -> None:
    """Raise ConfigError (a ValueError) for anything a schedule cannot be made of."""
    if (cron is None) == (every is None):
        raise ConfigError("a schedule needs exactly one of cron= and every=")
    if cron is not None:
        if not isinstance(cron, str) or len(cron.split()) not in (5, 6):
            raise ConfigError(f"cron must be a 5-field expression (or 6 with seconds), got {cron!r}")
        from croniter import croniter
        if not croniter.is_valid(cron):
            raise ConfigError(f"invalid cron expression {cron!r}")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every) \
                or every <= 0:
            raise ConfigError(f"every must be a positive number of seconds, got {every!r}")
        if every * 1000 < 1:
            raise ConfigError("every must be at least 1 ms")
    if not isinstance(timezone, str):
        raise ConfigError(f"timezone must be an IANA name like 'Europe/Paris', got {timezone!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"unknown timezone {timezone!r}") from exc
    if catch_up not in CATCH_UP:
        raise ConfigError(f"catch_up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}")


def ticks_after(cron: str, timezone: str, after_ms: int, count: int) -> list[int]:
    """The next `count` ticks strictly after `after_ms` (epoch ms), in the schedule's timezone."""
    from croniter import croniter
    start = datetime.fromtimestamp(after_ms / 1000, ZoneInfo(timezone))
    it = croniter(cron, start)
    out: list[int] = []
    while len(out) < count:
        tick = int(round(it.get_next(float) * 1000))
        if tick > after_ms:
            out.append(tick)
    return out


def last_tick_at_or_before(cron: str, timezone: str, at_ms: int) -> int:
    from croniter import croniter
    it = croniter(cron, datetime.fromtimestamp((at_ms + 1) / 1000, ZoneInfo(timezone)))
    return int(round(it.get_prev(float) * 1000))


def refill_ticks(record: Mapping[str, Any], held: int, newest_held: int | None, now_ms: int) -> list[int]:
    """Ticks to add to a cron schedule whose pending job or upcoming ticks run low.

    After a long absence of every reaper, 'one' restarts from the last tick before now (it runs
    once, late), 'skip' from now, and 'all' from the last tick it ran, at most CATCH_UP_CAP behind.
    """
    cron, tz = record["cron"], record["timezone"]
    if newest_held is not None and newest_held > now_ms:
        return ticks_after(cron, tz, newest_held, max(0, TICKS_AHEAD - held))
    last = int(record.get("last_tick", -1))
    if record.get("catch_up") == "all" and last >= 0:
        ticks = ticks_after(cron, tz, last, CATCH_UP_CAP + TICKS_AHEAD)
        if ticks[-1] <= now_ms:  # more were missed than catch_up 'all' runs: skip the rest
            ticks += ticks_after(cron, tz, now_ms, TICKS_AHEAD)
        return ticks
    if record.get("catch_up") == "one" and last >= 0:
        start = last_tick_at_or_before(cron, tz, now_ms)
        return ([start] if start > last else []) + ticks_after(cron, tz, now_ms, TICKS_AHEAD)
    return ticks_after(cron, tz, now_ms, TICKS_AHEAD)
