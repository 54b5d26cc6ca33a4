"""The Lua scripts: loading, and the arguments and replies of each transition.

Argument builders and reply parsers are plain functions so that the sync and the asyncio client
share them; only `Scripts` (sync) and its async twin touch a connection. Every transition takes
`now` (epoch ms); None lets the script read Redis' own clock, so that every host agrees on time.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from .config import JOB_OPTION_DEFAULTS
from .keys import Keys

#: Extra time past process_timeout before the reaper may recover a run: the supervisor that owns
#: the run kills it at process_timeout and ghosts it itself; the reaper is for lost supervisors.
LEASE_GRACE_MS = 1000
NAMES = ("create", "claim", "finish", "recover", "promote", "purge", "delete", "schedule", "unschedule",
         "extend", "requeue", "purge_state",  # requeue on: admin only (the `kickq` command)
         "repair_inspect", "repair_orphan", "repair_index", "repair_state", "repair_counts")


_LUA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lua")


def _read(name: str) -> str:
    # A plain path, not importlib.resources: the latter trips over some editable installs.
    with open(os.path.join(_LUA_DIR, name + ".lua"), encoding="utf-8") as f:
        return f.read()


def source(name: str) -> str:
    """Full text of one script: the shared helpers, then the transition itself."""
    lib = (_read("_lib")
           .replace("__DEFAULTS__", json.dumps(JOB_OPTION_DEFAULTS).replace("'", "\\'"))
           .replace("__LEASE_GRACE_MS__", str(LEASE_GRACE_MS)))
    return lib + "\n" + _read(name)


SOURCES = {name: source(name) for name in NAMES}


def _now(now: int | None) -> str:
    return "" if now is None else str(int(now))


# --- argument builders: (keys, args) for each script --------------------------------------------

def create_args(keys: Keys, items: Sequence[tuple[str, str, str, int | None]],
                now: int | None = None) -> tuple[list[str], list[Any]]:
    """items: (name, data JSON or "", stored opts JSON or "", delay ms or None)."""
    args: list[Any] = [keys.prefix, _now(now), len(items)]
    for name, data, opts, delay_ms in items:
        args += [name, data, opts, "" if delay_ms is None else delay_ms, ""]
    return [keys.id], args


def claim_args(keys: Keys, names: Sequence[str], now: int | None = None,
               claimer: str = "") -> tuple[list[str], list[Any]]:
    return [keys.id], [keys.prefix, _now(now), claimer, *names]


def finish_args(keys: Keys, job_id: str, token: int | str, outcome: str, payload: str = "",
                claim_names: Sequence[str] = (), now: int | None = None,
                claimer: str = "") -> tuple[list[str], list[Any]]:
    if outcome not in ("success", "fail", "ghost"):
        raise ValueError(f"outcome must be success, fail or ghost, not {outcome!r}")
    return [keys.id], [keys.prefix, _now(now), job_id, str(token), outcome, payload, claimer, *claim_names]


def sweep_args(keys: Keys, limit: int, now: int | None = None, *extra: str) -> tuple[list[str], list[Any]]:
    return [keys.id], [keys.prefix, _now(now), limit, *extra]


def delete_args(keys: Keys, job_id: str) -> tuple[list[str], list[Any]]:
    return [keys.id], [keys.prefix, job_id]


def schedule_args(keys: Keys, schedule_id: str, record_json: str, ticks: Sequence[int] = (),
                  now: int | None = None) -> tuple[list[str], list[Any]]:
    return [keys.id], [keys.prefix, _now(now), schedule_id, record_json, *ticks]


def unschedule_args(keys: Keys, schedule_id: str) -> tuple[list[str], list[Any]]:
    return [keys.id], [keys.prefix, schedule_id]


def extend_args(keys: Keys, schedule_id: str, ticks: Sequence[int],
                now: int | None = None) -> tuple[list[str], list[Any]]:
    return [keys.id], [keys.prefix, _now(now), schedule_id, *ticks]


# --- reply parsers --------------------------------------------------------------------------------

def pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def parse_create(reply: Sequence[Any]) -> list[tuple[str, int]]:
    return [(str(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]


def parse_claim(reply: Any) -> tuple[str, int, dict[str, str]] | None:
    """(job id, attempt token, job hash) or None."""
    if not reply:
        return None
    return str(reply[0]), int(reply[1]), pairs(reply[2:])


def parse_finish(reply: Sequence[Any]) -> tuple[str, str, tuple[str, int, dict[str, str]] | None]:
    """(status, new state, next claim or None); status is ok | stale | missing."""
    return str(reply[0]), str(reply[1]), parse_claim(reply[2])


class Scripts:
    """The scripts registered on one redis-py client. redis-py reloads a script after NOSCRIPT
    (SCRIPT FLUSH, a Redis restart), in plain calls and in pipelines alike."""

    def __init__(self, client: Any) -> None:
        self._scripts = {name: client.register_script(text) for name, text in SOURCES.items()}

    def run(self, name: str, keys_and_args: tuple[list[str], list[Any]], client: Any = None) -> Any:
        keys, args = keys_and_args
        return self._scripts[name](keys=keys, args=args, client=client)

    # Convenience wrappers used by the supervisor, the reaper and tests (time moved by argument).
    def claim(self, keys: Keys, names: Iterable[str], now: int | None = None,
              claimer: str = "") -> tuple[str, int, dict[str, str]] | None:
        return parse_claim(self.run("claim", claim_args(keys, list(names), now, claimer)))

    def finish(self, keys: Keys, job_id: str, token: int | str, outcome: str, payload: str = "",
               claim_names: Sequence[str] = (), now: int | None = None, claimer: str = ""
               ) -> tuple[str, str, tuple[str, int, dict[str, str]] | None]:
        return parse_finish(self.run("finish", finish_args(keys, job_id, token, outcome, payload,
                                                           claim_names, now, claimer)))

    def promote(self, keys: Keys, now: int | None = None, limit: int = 500) -> tuple[int, int, int]:
        count, next_due, at = self.run("promote", sweep_args(keys, limit, now))
        return int(count), int(next_due), int(at)

    def recover(self, keys: Keys, now: int | None = None, limit: int = 500,
                error: str = "lease expired: its worker or supervisor was lost") -> tuple[int, int]:
        count, next_lease = self.run("recover", sweep_args(keys, limit, now, error))
        return int(count), int(next_lease)

    def purge(self, keys: Keys, now: int | None = None, limit: int = 500) -> tuple[int, int]:
        count, next_purge = self.run("purge", sweep_args(keys, limit, now))
        return int(count), int(next_purge)

    def delete(self, keys: Keys, job_id: str) -> bool:
        return bool(self.run("delete", delete_args(keys, job_id)))
