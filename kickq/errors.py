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


class ReplicationTimeout(KickqError, TimeoutError):
    """The write is on the master, but fewer replicas than `wait_replicas` confirmed it within
    `wait_replicas_timeout` (Redis WAIT; WAITAOF with `wait_aof`, where the master's own fsync counts too).

    Like RedisUnavailable, the outcome is not known: the write will most likely reach the replicas,
    but if the master fails over now it may be lost. `job_ids` are the jobs concerned (the jobs
    created; the job deleted; a schedule's pending tick job; empty for unschedule). What a caller
    can do: read them back with get() later (after a failover, from the new master), which tells
    whether the write survived (JobNotFound after a create: it did not, create again); or create
    again at once, accepting a possible duplicate. kickq never repeats a write by itself.
    """

    def __init__(self, what: str, job_ids: list[str], wanted: int, confirmed: int, timeout: float,
                 local_fsync: bool | None = None, promoted: str | None = None) -> None:
        fsync = "" if local_fsync is None else (
            ", the master's own AOF fsync " + ("done" if local_fsync else "not confirmed"))
        concerned = f" (job ids: {', '.join(job_ids)})" if job_ids else ""
        if promoted is not None:
            why = (f"written on the master, but its replica {promoted} has been promoted to master (a "
                   "failover is under way): the replicas that confirmed it may drop it")
        else:
            why = (f"written on the master, but {confirmed} of {wanted} replicas confirmed it within "
                   f"{timeout:g}s{fsync}")
        super().__init__(f"{what}{concerned}: {why}; it may be lost if the master fails over now: "
                         "check with get(), or write again accepting a duplicate")
        self.promoted = promoted
        self.what = what
        self.job_ids = job_ids
        self.wanted = wanted
        self.confirmed = confirmed
        self.timeout = timeout
        self.local_fsync = local_fsync


class RedisVersionError(KickqError):
    """The Redis server is older than kickq's minimum version."""
