"""Handlers registered with `Kickq.process()`. Registration only: running them is the supervisor's job."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import snake_case
from .errors import ConfigError
from .keys import validate_name

PROCESS_OPTIONS = {"concurrent_jobs"}


@dataclass(frozen=True)
class Registration:
    """`names` in priority order, served by `concurrent_jobs` worker processes running `handler`."""
    names: tuple[str, ...]
    concurrent_jobs: int
    handler: Callable[..., Any]
    overrides: Mapping[str, Any]  # the registering client's config overrides (namespace, Redis, ...)


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
    out: dict[str, Any] = {"concurrent_jobs": 1}
    for raw_key, value in (options or {}).items():
        key = snake_case(raw_key)
        if key not in PROCESS_OPTIONS:
            raise ConfigError(f"unknown process option {raw_key!r}; known: concurrent_jobs")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"concurrent_jobs must be an int >= 1, got {value!r}")
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
