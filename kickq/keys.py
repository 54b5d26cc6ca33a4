"""Where Python builds Redis key names, from the names kickq/layout.py defines.

Every key of a namespace starts with the hash tag "{ns}:" so that all of them share one Redis
Cluster slot and the Lua scripts may derive keys from the prefix. Job names are validated before
they become part of a key (see validate_name); a name is always the last part of its key, so two
different names can never give the same key.
"""
from __future__ import annotations

import unicodedata

from . import layout

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
        return self.prefix + layout.ID

    @property
    def script_keys(self) -> list[str]:
        """The KEYS of every script call (layout.SCRIPT_KEYS): a new list each time."""
        return [self.prefix + key for key in layout.SCRIPT_KEYS]

    def job(self, job_id: str) -> str:
        return self.prefix + layout.JOB + job_id

    @property
    def new_jobs(self) -> str:
        """Hash: the packed records of jobs created straight into their queue and not claimed
        yet, by id (layout.pack_new; read them with job.queue_reads)."""
        return self.prefix + layout.NEW_JOBS

    def queue(self, name: str) -> str:
        return self.prefix + layout.QUEUE + name

    def wake(self, name: str) -> str:
        return self.prefix + layout.WAKE + name

    def journal(self, claimer: str) -> str:
        """A worker's finished runs not saved yet (see apply_journal in lua/_lib_journal.lua)."""
        return self.prefix + layout.JOURNAL + claimer

    def claim(self, claimer: str) -> str:
        """The last jobs a worker claimed ("<id> <token> ...", attempt tokens), for recovery after a
        lost reply. `claimer` is a worker's own generated hex id, never user input."""
        return self.prefix + layout.CLAIM + claimer

    def inbox(self, claimer: str) -> str:
        """List: jobs claimed for an idle worker by their create (see hand_off in lua/_lib_handoff.lua)."""
        return self.prefix + layout.INBOX + claimer

    def idle(self, name: str) -> str:
        """Zset: the workers waiting for jobs of this name -> when their registration lapses (ms)."""
        return self.prefix + layout.IDLE + name

    def idler(self, claimer: str) -> str:
        """The names an idle worker registered under (JSON), to unregister it from all at once."""
        return self.prefix + layout.IDLER + claimer

    @property
    def schedules(self) -> str:
        """Hash: schedule id -> JSON record (name, cron or every_ms, pending job, next_run, ...)."""
        return self.prefix + layout.SCHEDULES

    def ticks(self, schedule_id: str) -> str:
        """Zset of a cron schedule's upcoming ticks (epoch ms), computed ahead by croniter."""
        return self.prefix + layout.TICKS + schedule_id

    @property
    def counts(self) -> str:
        """Hash "<state>:<name>" -> number of jobs in that state, kept by the transitions."""
        return self.prefix + layout.COUNTS

    @property
    def events(self) -> str:
        """Stream of every transition: id, name, event, state, time."""
        return self.prefix + layout.EVENTS

    @property
    def meta(self) -> str:
        """Hash of namespace settings the scripts read (events_maxlen)."""
        return self.prefix + layout.META

    def stats_bucket(self, bucket_ms: int) -> str:
        return self.prefix + layout.STATS + str(bucket_ms)

    def times_bucket(self, bucket_ms: int) -> str:
        return self.prefix + layout.TIMES + str(bucket_ms)

    @property
    def delayed(self) -> str:
        return self.prefix + layout.DELAYED

    @property
    def processing(self) -> str:
        return self.prefix + layout.PROCESSING

    @property
    def finished(self) -> str:
        return self.prefix + layout.FINISHED

    @property
    def names(self) -> str:
        return self.prefix + layout.NAMES

    @property
    def reaper(self) -> str:
        """Pub/sub channel that wakes sleeping reapers when a job becomes due earlier than they planned."""
        return self.prefix + layout.REAPER

    @property
    def done(self) -> str:
        """Pub/sub channel: ids of hotjobs that reached success or fail, or were deleted."""
        return self.prefix + layout.DONE
