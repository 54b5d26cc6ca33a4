"""Handlers registered with `Kickq.process()`. Registration only: running them is the supervisor's job."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import snake_case
from .errors import ConfigError
from .keys import validate_name

#: Each: (default, largest value). jobs_per_worker's bound keeps one worker's threads or tasks, and
#: the jobs a kill of it re-runs, within reason.
PROCESS_OPTIONS = {"concurrent_jobs": (1, 10_000), "jobs_per_worker": (1, 1_000)}


@dataclass(frozen=True)
class Registration:
    """`names` in priority order, served by `concurrent_jobs` worker processes running `handler`,
    each running up to `jobs_per_worker` jobs at once."""
    names: tuple[str, ...]
    concurrent_jobs: int
    handler: Callable[..., Any]
    overrides: Mapping[str, Any]  # the registering client's config overrides (namespace, Redis, ...)
    jobs_per_worker: int = 1

    @property
    def slots(self) -> int:
        """Jobs this registration can run at once."""
        return self.concurrent_jobs * self.jobs_per_worker


_lock = threading.Lock()
_registrations: list[Registration] = []


def normalise_names(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"process() needs a job name (str) or a list of them, not {type(names).__name__}")
    if not names:
        raise ValueError("process() needs a job name or a non-empty list of job names")
    out = tuple(validate_name(name) for name in names)
    if len(set(out)) != len(out):
        raise ValueError(f"job names repeated in {list(out)}")
    return out


def normalise_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {key: default for key, (default, _) in PROCESS_OPTIONS.items()}
    for raw_key, value in (options or {}).items():
        key = snake_case(raw_key)
        if key not in PROCESS_OPTIONS:
            raise ConfigError(f"unknown process option {raw_key!r}; known: {', '.join(PROCESS_OPTIONS)}")
        largest = PROCESS_OPTIONS[key][1]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
            raise ConfigError(f"{key} must be an int from 1 to {largest}, got {value!r}")
        out[key] = value
    return out


def register(registration: Registration) -> None:
    with _lock:
        taken = {name for reg in _registrations for name in reg.names}
        clash = taken.intersection(registration.names)
        if clash:
            raise ConfigError(f"a handler is already registered for {sorted(clash)}")
        _registrations.append(registration)


def registrations() -> list[Registration]:
    with _lock:
        return list(_registrations)


def clear() -> None:
    with _lock:
        _registrations.clear()
