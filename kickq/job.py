"""The Job: a read-only snapshot of one job as stored in Redis. No I/O here (queue_reads only
queues commands on a pipeline the caller executes)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from . import payload
from .config import JOB_OPTION_DEFAULTS
from .keys import Keys
from .layout import STATES as STATES  # every state, in the order they are shown
from .layout import unpack_new

TERMINAL_STATES = frozenset({"success", "fail"})

FIELDS = (
    "id", "name", "complete", "success", "create_time", "update_time", "finish_time",
    "total_process_time", "state", *JOB_OPTION_DEFAULTS, "data", "result", "last_error",
    "scheduled_for", "runs", "attempt", "schedule_id", "tick",
)


def stored_fields(packed: str | None, fields: Mapping[str, str]) -> Mapping[str, str]:
    """A job's fields from the two reads of it, in this order: HGET of its packed entry in
    `Keys.new_jobs` (layout.unpack_new), then HGETALL of its hash. A job only ever goes from the
    first to the second (at its first claim), so reading them in that order never misses an
    existing job: empty means gone."""
    return unpack_new(packed) if packed is not None else fields


def queue_reads(pipe: Any, keys: Keys, job_ids: Iterable[str]) -> None:
    """Queue the two reads of each job on `pipe` (sync or asyncio), in the order stored_fields
    needs; read_fields turns the replies into each job's fields."""
    for job_id in job_ids:
        pipe.hget(keys.new_jobs, job_id)
        pipe.hgetall(keys.job(job_id))


def read_fields(replies: Sequence[Any]) -> list[Mapping[str, str]]:
    """Each job's fields (empty: gone) from the replies to queue_reads, in its order."""
    return [stored_fields(packed, fields) for packed, fields in zip(replies[::2], replies[1::2], strict=True)]


def _int(value: str | None) -> int | None:
    return None if value is None else int(float(value))


def _options(stored: str | None) -> dict[str, Any]:
    """A job's options: the defaults, overridden by the differences stored with it (JSON)."""
    opts = dict(JOB_OPTION_DEFAULTS)
    if stored:
        opts.update(payload.decode(stored))
    return opts


def _runs(fields: Mapping[str, str], state: str) -> list[dict[str, Any]]:
    """The finished runs, plus the one in progress (stored as just its start, 'run_start')."""
    runs: list[dict[str, Any]] = payload.decode(fields.get("runs")) or []
    # A prefetched job (claimed in a batch, not started yet) has no run_start: its claim time then.
    start = fields.get("run_start") or fields.get("update_time")
    if start is not None and state == "processing":
        runs.append({"count": len(runs) + 1, "start": int(float(start)), "time": None,
                     "state": "processing", "error": None})
    return runs


class Job:
    """One job. Attributes are read-only; `to_dict()` gives them all but the hotjob promise.

    Timestamps are epoch milliseconds; `runs` lists each processing run as a dict with
    count (1-based), start (ms), time (ms or None), state (processing|success|fail|ghost), error;
    `attempt` counts the claims (a handler sees its own run's attempt token).
    """

    __slots__ = ("_values", "hotjob_promise")

    id: str
    name: str
    complete: bool
    success: bool
    create_time: int
    update_time: int
    finish_time: int | None
    total_process_time: int | None
    state: str
    delay: float | None
    process_timeout: float
    retry: bool
    retry_count: int
    retry_interval: float | list[float]
    ghost_retry: bool
    ghost_count: int
    ghost_interval: float
    hotjob: bool
    hotjob_timeout: float
    purge_timeout: float
    data: Any
    result: Any
    last_error: str | None
    scheduled_for: int | None
    runs: list[dict[str, Any]]
    attempt: int  # claims so far: the current run's attempt token while processing (0: never claimed)
    schedule_id: str | None  # the schedule that made this job, if any
    tick: int | None  # and the tick (epoch ms) it runs for

    def __init__(self, values: Mapping[str, Any], hotjob_promise: Any = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "hotjob_promise", hotjob_promise)

    @classmethod
    def from_fields(cls, job_id: str, fields: Mapping[str, str], hotjob_promise: Any = None) -> "Job":
        """Build a Job from its Redis hash (missing fields take their defaults)."""
        opts = _options(fields.get("opts"))
        state = fields.get("state", "new")
        values: dict[str, Any] = {
            "id": str(job_id),
            "name": fields.get("name", ""),
            "complete": state in TERMINAL_STATES,
            "success": state == "success",
            "create_time": _int(fields.get("create_time")),
            # absent until the job first changes: a new job's hash leaves it out to stay small
            "update_time": _int(fields.get("update_time") or fields.get("create_time")),
            "finish_time": _int(fields.get("finish_time")),
            "total_process_time": _int(fields.get("total_process_time")),
            "state": state,
            **opts,
            "data": payload.decode(fields.get("data")),
            "result": payload.decode(fields.get("result")),
            "last_error": fields.get("last_error"),
            "scheduled_for": _int(fields.get("scheduled_for")),
            "runs": _runs(fields, state),
            # A run lost before Redis knew it began (a job claimed ahead whose supervisor died) is
            # not in runs, but its claim counts here: handlers can tell a repeat by it.
            "attempt": _int(fields.get("attempt")) or 0,
            "schedule_id": fields.get("schedule"),
            "tick": _int(fields.get("tick")),
        }
        job = cls.__new__(cls)  # values is ours: no copy (see __init__)
        object.__setattr__(job, "_values", values)
        object.__setattr__(job, "hotjob_promise", hotjob_promise)
        return job

    @classmethod
    def created(cls, job_id: str, name: str, create_time: int, delay_ms: int | None, stored_opts: str,
                data_json: str, hotjob_promise: Any = None) -> "Job":
        """The job the create script just wrote: from_fields of its hash, without building the hash
        (a create is a producer's hottest call; tests hold the two equal)."""
        return cls.from_draft(cls.draft(name, delay_ms, stored_opts, data_json), job_id, create_time,
                              delay_ms, hotjob_promise)

    @staticmethod
    def draft(name: str, delay_ms: int | None, stored_opts: str, data_json: str) -> dict[str, Any]:
        """What created() knows before Redis answers (all but the id and the times): a producer
        builds it while the create script runs, so that its CPU and Redis' overlap."""
        return {
            "id": "", "name": name, "complete": False, "success": False,
            "create_time": 0, "update_time": 0, "finish_time": None,
            "total_process_time": None, "state": "new" if delay_ms is None else "delayed",
            **_options(stored_opts),
            "data": payload.decode(data_json) if data_json else None, "result": None,
            "last_error": None, "scheduled_for": None,
            "runs": [], "attempt": 0, "schedule_id": None, "tick": None,
        }

    @classmethod
    def from_draft(cls, values: dict[str, Any], job_id: str, create_time: int, delay_ms: int | None,
                   hotjob_promise: Any = None) -> "Job":
        """The Job of a draft (which it takes over) once the create script gave its id and time."""
        values["id"] = job_id
        values["create_time"] = values["update_time"] = create_time
        if delay_ms is not None:
            values["scheduled_for"] = create_time + delay_ms
        job = cls.__new__(cls)
        object.__setattr__(job, "_values", values)
        object.__setattr__(job, "hotjob_promise", hotjob_promise)
        return job

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Job has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Job attributes are read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Job attributes are read-only")

    def to_dict(self) -> dict[str, Any]:
        import copy
        return {key: copy.deepcopy(self._values[key]) for key in FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and self._values == other._values

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.name!r} {self.state}>"
