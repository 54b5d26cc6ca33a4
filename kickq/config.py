"""Configuration: the defaults, validation, and the cascade global < job_flags[name] < per-job opts.

Pure logic, no I/O. The module-level functions `config()` and `reset()` are re-exported by kickq.
"""
from __future__ import annotations

import copy
import math
import re
import threading
from typing import Any, Callable, Iterable, Mapping

from .errors import ConfigError

#: Options a job carries with it. They are resolved once, at create, and stored with the job.
JOB_OPTION_DEFAULTS: dict[str, Any] = {
    "delay": None,
    "process_timeout": 10,
    "retry": False,
    "retry_count": 3,
    "retry_interval": 1800,
    "ghost_retry": True,
    "ghost_count": 1,
    "ghost_interval": 1800,
    "hotjob": False,
    "hotjob_timeout": 10,
    "purge_timeout": 86400,
}
JOB_OPTIONS = frozenset(JOB_OPTION_DEFAULTS)

GLOBAL_DEFAULTS: dict[str, Any] = {
    "redis_host": "127.0.0.1",
    "redis_port": 6379,
    "redis_password": None,
    "redis_options": None,
    "redis_url": None,
    "redis_namespace": "kickq",
    # Bound on how long one producer call may wait for Redis (connect + reply), in seconds.
    "redis_timeout": 5,
    "max_payload_bytes": 512 * 1024,
    "vitals_interval": 300,
    # Seconds of history in kq.stats()["...]["window"] (10 s resolution, at most 3600).
    "stats_window": 300,
    # Length of the namespace's event stream (approximate, XADD MAXLEN ~); 0 turns events off.
    "events_maxlen": 10000,
    # Replicas that must confirm each write of create, create_many, delete, schedule and unschedule
    # (Redis WAIT on the connection that wrote) before the call returns; 0: none, no WAIT is sent.
    "wait_replicas": 0,
    # Longest wait for those confirmations, in seconds: below redis_timeout (the reply timeout).
    "wait_replicas_timeout": 1.0,
    # With wait_replicas > 0: WAITAOF 1 N instead of WAIT N (the master's own AOF fsync and N
    # replicas' fsync). Needs Redis >= 7.2 with appendonly on.
    "wait_aof": False,
    "job_flags": {},
    **JOB_OPTION_DEFAULTS,
}

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_CAMEL_RE = re.compile(r"(?<!^)(?=[A-Z])")


def snake_case(key: str) -> str:
    """`processTimeout` -> `process_timeout`; snake_case keys pass through."""
    return _CAMEL_RE.sub("_", key).lower() if any(c.isupper() for c in key) else key


# --- value checks -------------------------------------------------------------------------------

def _number(key: str, value: Any, *, positive: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{key} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, not {type(value).__name__}")
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, not {value!r}")
    return value


def _optional_str(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string or None, not {type(value).__name__}")
    return value


def _check_job_option(key: str, value: Any, *, allow_callable: bool) -> Any:
    if key == "delay":
        return None if value is None else _number(key, value)
    if key in ("process_timeout", "hotjob_timeout"):
        return _number(key, value, positive=True)
    if key in ("ghost_interval", "purge_timeout"):
        return _number(key, value)
    if key == "retry_interval":
        if callable(value):
            if not allow_callable:
                raise ConfigError("retry_interval in per-job opts must be a number: jobs are stored in "
                                  "Redis, callables belong in kickq.config() or job_flags")
            return value
        return _number(key, value)
    if key in ("retry_count", "ghost_count"):
        return _count(key, value)
    if key in ("retry", "ghost_retry", "hotjob"):
        return _flag(key, value)
    raise ConfigError(f"unknown job option {key!r}")


def normalise_job_options(opts: Mapping[str, Any] | None, *, allow_callable: bool,
                          where: str = "opts") -> dict[str, Any]:
    """Validate per-job options (camelCase accepted) and return them with snake_case keys."""
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise ConfigError(f"{where} must be a dict, not {type(opts).__name__}")
    out: dict[str, Any] = {}
    for raw_key, value in opts.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{where}: option names must be strings, got {raw_key!r}")
        key = snake_case(raw_key)
        if key not in JOB_OPTIONS:
            raise ConfigError(f"{where}: unknown job option {raw_key!r}; "
                              f"per-job options are {', '.join(sorted(JOB_OPTIONS))}")
        if key in out:
            raise ConfigError(f"{where}: option {key!r} given twice (snake_case and camelCase)")
        out[key] = _check_job_option(key, value, allow_callable=allow_callable)
    return out


def _check_global(key: str, value: Any) -> Any:
    if key in JOB_OPTIONS:
        return _check_job_option(key, value, allow_callable=True)
    if key == "redis_host":
        if not isinstance(value, str) or not value:
            raise ConfigError("redis_host must be a non-empty string")
        return value
    if key == "redis_port":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ConfigError(f"redis_port must be an int in 1..65535, got {value!r}")
        return value
    if key == "redis_password":
        return _optional_str(key, value)
    if key == "redis_url":
        value = _optional_str(key, value)
        if value:
            from .cluster import check_url  # redis-py parses the options: not imported until needed
            check_url(value)
        return value
    if key == "redis_options":
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError("redis_options must be a dict of redis client keyword arguments, or None")
        if value is not None and value.get("decode_responses", True) is not True:
            raise ConfigError("redis_options cannot turn off decode_responses: kickq reads str replies")
        return None if value is None else dict(value)
    if key == "redis_namespace":
        if not isinstance(value, str) or not _NAMESPACE_RE.match(value):
            raise ConfigError("redis_namespace must be 1-64 characters of A-Z a-z 0-9 _ . : - "
                              f"(it becomes part of every key), got {value!r}")
        return value
    if key in ("redis_timeout", "vitals_interval"):
        return _number(key, value, positive=True)
    if key == "stats_window":
        value = _number(key, value, positive=True)
        if not 10 <= value <= 3600:
            raise ConfigError(f"stats_window must be between 10 and 3600 seconds, got {value!r}")
        return value
    if key in ("events_maxlen", "wait_replicas"):
        return _count(key, value)
    if key == "wait_replicas_timeout":
        return _number(key, value, positive=True)
    if key == "wait_aof":
        return _flag(key, value)
    if key == "max_payload_bytes":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"max_payload_bytes must be a positive int, got {value!r}")
        return value
    if key == "job_flags":
        if not isinstance(value, Mapping):
            raise ConfigError("job_flags must be a dict of {job name: {option: value}}")
        flags = {}
        for name, opts in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"job_flags keys must be job names (str), got {name!r}")
            flags[name] = normalise_job_options(opts, allow_callable=True, where=f"job_flags[{name!r}]")
        return flags
    raise ConfigError(f"unknown config option {key!r}")


def validate_settings(changes: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Check a batch of global settings; return them with snake_case keys. Raises before any change.

    A key given twice (also as snake_case and camelCase) is an error, not "the last one wins"."""
    out: dict[str, Any] = {}
    for raw_key, value in (changes.items() if isinstance(changes, Mapping) else changes):
        if not isinstance(raw_key, str):
            raise ConfigError(f"config keys must be strings, got {raw_key!r}")
        key = snake_case(raw_key)
        if key not in GLOBAL_DEFAULTS:
            raise ConfigError(f"unknown config option {raw_key!r}")
        if key in out:
            raise ConfigError(f"config option {key!r} given twice (snake_case and camelCase)")
        out[key] = _check_global(key, value)
    return out


def merge_settings(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by already-validated `changes`; job_flags merge by job name."""
    merged = dict(base)
    for key, value in changes.items():
        if key == "job_flags":
            flags = dict(merged.get("job_flags") or {})
            flags.update(value)
            merged[key] = flags
        else:
            merged[key] = value
    return merged


# --- the cascade ------------------------------------------------------------------------------

def resolve_job_options(settings: Mapping[str, Any], name: str,
                        opts: Mapping[str, Any] | None) -> dict[str, Any]:
    """global < job_flags[name] < opts, with a callable retry_interval expanded to one interval per retry.

    The result is what is stored with the job: plain JSON values only.
    """
    resolved = {key: settings[key] for key in JOB_OPTIONS}
    resolved.update(settings["job_flags"].get(name, {}))
    resolved.update(normalise_job_options(opts, allow_callable=False))
    interval = resolved["retry_interval"]
    if callable(interval):
        resolved["retry_interval"] = expand_retry_interval(interval, resolved["retry_count"])
    return resolved


def expand_retry_interval(func: Callable[[int], Any], retry_count: int) -> list[float | int]:
    """Evaluate `func(attempt)` for attempts 1..retry_count, so workers need no local code to know it."""
    intervals = []
    for attempt in range(1, retry_count + 1):
        try:
            value = func(attempt)
        except Exception as exc:
            raise ConfigError(f"retry_interval({attempt}) raised {exc!r}") from exc
        intervals.append(_number(f"retry_interval({attempt})", value))
    return intervals


def stored_options(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """Only the options that differ from the library defaults: a smaller hash for each job."""
    return {k: v for k, v in resolved.items()
            if JOB_OPTION_DEFAULTS[k] != v or type(JOB_OPTION_DEFAULTS[k]) is not type(v)}


# --- module-level global config ---------------------------------------------------------------

_lock = threading.RLock()
_settings: dict[str, Any] = copy.deepcopy(GLOBAL_DEFAULTS)
_reset_hooks: list[Callable[[], None]] = []
_version = 0


def config(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Merge settings into the global config; always return a copy of the result.

    `config(mapping)`, `config(**kw)`, `config("key", value)`; `config()` only reads.
    Any invalid key or value raises ConfigError and changes nothing.
    """
    global _settings
    if len(args) == 2 and isinstance(args[0], str):
        changes: dict[str, Any] = {args[0]: args[1]}
    elif len(args) == 1 and isinstance(args[0], Mapping):
        changes = dict(args[0])
    elif not args:
        changes = {}
    else:
        raise ConfigError("config() takes a mapping, keyword arguments, or a key and a value")
    valid = validate_settings([*changes.items(), *kwargs.items()])
    with _lock:
        if valid:
            _settings = merge_settings(_settings, valid)
            _bump_version()
        return current()


def version() -> int:
    """Changes whenever the global config does: lets clients cache what they derive from it."""
    return _version


def _bump_version() -> None:
    global _version
    _version += 1


def current() -> dict[str, Any]:
    """A copy of the global config (job_flags copied one level deep)."""
    with _lock:
        snapshot = dict(_settings)
        snapshot["job_flags"] = {k: dict(v) for k, v in _settings["job_flags"].items()}
        if snapshot["redis_options"] is not None:
            snapshot["redis_options"] = dict(snapshot["redis_options"])
        return snapshot


def on_reset(hook: Callable[[], None]) -> None:
    """Register cleanup (closing connections) to run on reset()."""
    _reset_hooks.append(hook)


def reset() -> None:
    """Restore the defaults and close every connection kickq opened."""
    global _settings
    with _lock:
        _settings = copy.deepcopy(GLOBAL_DEFAULTS)
        _bump_version()
    for hook in list(_reset_hooks):
        hook()
