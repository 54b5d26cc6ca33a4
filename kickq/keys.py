"""The only place Redis key names are built.

Every key of a namespace starts with the hash tag "{ns}:" so that all of them share one Redis
Cluster slot and the Lua scripts may derive keys from the prefix. Job names are validated before
they become part of a key (see validate_name); a name is always the last part of its key, so two
different names can never give the same key.
"""
from __future__ import annotations

import unicodedata

MAX_NAME_LENGTH = 256


def validate_name(name: object) -> str:
    """A job name: a non-empty str of at most 256 characters without control characters."""
    if not isinstance(name, str):
        raise TypeError(f"job name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("job name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"job name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise ValueError(f"job name must not contain control characters: {name!r}")
    return name


class Keys:
    __slots__ = ("namespace", "prefix")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = "{" + namespace + "}:"

    @property
    def id(self) -> str:
        return self.prefix + "id"

    def job(self, job_id: str) -> str:
        return self.prefix + "job:" + job_id

    @property
    def new_jobs(self) -> str:
        """Hash: the packed records of jobs created straight into their queue and not claimed
        yet, by id (see new_queued_job in lua/_lib.lua; read them with job.queue_reads)."""
        return self.prefix + "newjobs"

    def queue(self, name: str) -> str:
        return self.prefix + "queue:" + name

    def wake(self, name: str) -> str:
        return self.prefix + "wake:" + name

    def journal(self, claimer: str) -> str:
        """A worker's finished runs not saved yet (see apply_journal in lua/_lib.lua)."""
        return self.prefix + "done:" + claimer

    def claim(self, claimer: str) -> str:
        """The last job a worker claimed ("<id> <attempt>"), for recovery after a lost reply.
        `claimer` is a worker's own generated hex id, never user input."""
        return self.prefix + "claim:" + claimer

    def inbox(self, claimer: str) -> str:
        """List: jobs claimed for an idle worker by their create (see hand_off in lua/_lib.lua)."""
        return self.prefix + "inbox:" + claimer

    def idle(self, name: str) -> str:
        """Zset: the workers waiting for jobs of this name -> when their registration lapses (ms)."""
        return self.prefix + "idle:" + name

    def idler(self, claimer: str) -> str:
        """The names an idle worker registered under (JSON), to unregister it from all at once."""
        return self.prefix + "idler:" + claimer

    @property
    def schedules(self) -> str:
        """Hash: schedule id -> JSON record (name, cron or every_ms, pending job, next_run, ...)."""
        return self.prefix + "schedules"

    def ticks(self, schedule_id: str) -> str:
        """Zset of a cron schedule's upcoming ticks (epoch ms), computed ahead by croniter."""
        return self.prefix + "ticks:" + schedule_id

    @property
    def counts(self) -> str:
        """Hash "<state>:<name>" -> number of jobs in that state, kept by the transitions."""
        return self.prefix + "counts"

    @property
    def events(self) -> str:
        """Stream of every transition: id, name, event, state, time."""
        return self.prefix + "events"

    @property
    def meta(self) -> str:
        """Hash of namespace settings the scripts read (events_maxlen)."""
        return self.prefix + "meta"

    def stats_bucket(self, bucket_ms: int) -> str:
        return self.prefix + "stats:" + str(bucket_ms)

    def times_bucket(self, bucket_ms: int) -> str:
        return self.prefix + "times:" + str(bucket_ms)

    @property
    def delayed(self) -> str:
        return self.prefix + "delayed"

    @property
    def processing(self) -> str:
        return self.prefix + "processing"

    @property
    def finished(self) -> str:
        return self.prefix + "finished"

    @property
    def names(self) -> str:
        return self.prefix + "names"

    @property
    def reaper(self) -> str:
        """Pub/sub channel that wakes sleeping reapers when a job becomes due earlier than they planned."""
        return self.prefix + "reaper"

    @property
    def done(self) -> str:
        """Pub/sub channel: ids of hotjobs that reached success or fail, or were deleted."""
        return self.prefix + "done"
