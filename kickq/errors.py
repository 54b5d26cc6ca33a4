"""Every exception kickq raises on purpose. Stdlib only: imported by every other module."""
from __future__ import annotations


class KickqError(Exception):
    """Root of kickq's own errors."""


class ConfigError(KickqError, ValueError):
    """An unknown option, a wrong type, or a value out of range. Nothing was changed or written."""


class RedisModeError(ConfigError):
    """The URL names a single server and the server is a Redis Cluster node, or the reverse: use
    redis:// for one server, redis+cluster:// for a Cluster. Nothing was written."""


class InvalidPayload(KickqError, TypeError):
    """Job data (or a handler's result) that JSON cannot carry: sets, objects, NaN, cycles, deep nesting,
    and text with a lone surrogate (UTF-8, which Redis gets, cannot hold it)."""


class PayloadTooLarge(KickqError, ValueError):
    """Serialised job data larger than `max_payload_bytes`."""


class JobNotFound(KickqError, LookupError):
    """No job with that id (never created, deleted, or purged)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class HotjobTimeout(KickqError, TimeoutError):
    """A hotjob did not complete within its hotjob_timeout."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"hotjob {job_id} did not complete within {timeout:g}s")
        self.job_id = job_id
        self.timeout = timeout


class RedisUnavailable(KickqError, ConnectionError):
    """Redis could not be reached (or did not answer) within the configured redis_timeout.

    An operation that failed this way may or may not have been applied: a create whose
    reply was lost can exist. kickq never retries a create by itself for that reason.
    """


class RedisVersionError(KickqError):
    """The Redis server is older than kickq's minimum version."""
