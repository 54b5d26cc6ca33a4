"""The storage layout of a namespace, defined once: its keys, the structure that holds a job of each
state, and the packed record of a new job.

Python builds keys through `kickq.keys.Keys`, which takes their names from here; the `kickq` command
and the tests take the state -> structure map from here. The Lua scripts (kickq/lua/) spell the same
keys inline (`P .. 'queue:' .. name`, P being the prefix "{ns}:"), where a lookup would cost at every
call: tests/test_scripts.py holds them to this module (every key a script names is one defined here;
each state's job is put in, found in and removed from the structure STRUCTURE_OF_STATE gives; new jobs
are packed and unpacked as pack_new and unpack_new do), and docs/design.md's key table too.
"""
from __future__ import annotations

# --- keys: every key of a namespace is its prefix "{ns}:" followed by one of these ---------------

#: Single keys, with their Redis type.
ID = "id"
NEW_JOBS = "newjobs"
DELAYED = "delayed"
PROCESSING = "processing"
FINISHED = "finished"
NAMES = "names"
SCHEDULES = "schedules"
COUNTS = "counts"
EVENTS = "events"
META = "meta"
REAPER = "reaper"
DONE = "done"

SINGLE_KEYS = {
    ID: "string",  # the last job id (INCR)
    NEW_JOBS: "hash",  # id -> packed record of a new job never claimed (pack_new)
    DELAYED: "zset",  # delayed / retry / ghost jobs -> due time (ms)
    PROCESSING: "zset",  # processing jobs -> lease deadline (ms)
    FINISHED: "zset",  # success / fail jobs -> purge time (ms)
    NAMES: "set",  # every job name created
    SCHEDULES: "hash",  # schedule id -> JSON record
    COUNTS: "hash",  # "<state>:<name>" -> jobs in that state
    EVENTS: "stream",  # every transition
    META: "hash",  # namespace settings the scripts read
    REAPER: "pub/sub channel",  # a due time earlier than every other: wakes sleeping reapers
    DONE: "pub/sub channel",  # hotjobs that finished or were deleted
}

#: A key that is never written (see SCRIPT_KEYS).
ROUTE_GUARD = "route-guard"

#: The KEYS every script declares, in order. ID routes the call to the namespace's node. ROUTE_GUARD
#: never exists: on Redis Cluster, Redis refuses a multi-key call on a slot that is migrating when
#: one of its keys is missing (TRYAGAIN, or ASK then TRYAGAIN), so no script runs while a
#: namespace's keys are split between two nodes, and the keys a script derives from the prefix
#: are all on the node that runs it (kickq/cluster.py).
SCRIPT_KEYS = (ID, ROUTE_GUARD)

#: Families of keys: the prefix, then one of these, then a last part (what each comment names).
JOB = "job:"
QUEUE = "queue:"
WAKE = "wake:"
CLAIM = "claim:"
IDLE = "idle:"
IDLER = "idler:"
INBOX = "inbox:"
JOURNAL = "done:"
TICKS = "ticks:"
STATS = "stats:"
TIMES = "times:"

KEY_FAMILIES = {
    JOB: "hash",  # + job id: the job
    QUEUE: "list",  # + job name: ids of its new / queued jobs, FIFO
    WAKE: "list",  # + job name: one token per id in its queue
    CLAIM: "string",  # + claimer id: "<id> <token> ..." of the jobs it claimed
    IDLE: "zset",  # + job name: idle workers -> registration expiry (ms)
    IDLER: "string",  # + claimer id: the names it registered as idle under (JSON)
    INBOX: "list",  # + claimer id: jobs claimed for it by their create (JSON claim replies)
    JOURNAL: "list",  # + claimer id: runs it finished, not saved yet (JSON entries)
    TICKS: "zset",  # + schedule id: a cron schedule's upcoming ticks (ms)
    STATS: "hash",  # + bucket ms: counts and run times of a 10 s bucket
    TIMES: "list",  # + bucket ms: run-time samples of a 10 s bucket
}

# --- states: which structure holds a job of each state (a job is in exactly one) ---------------

#: The structure of a new or queued job: the list QUEUE + its name.
QUEUE_STRUCTURE = "queue"

#: State -> "queue" (its name's queue) or the zset holding it; in the order states are shown.
STRUCTURE_OF_STATE = {
    "new": QUEUE_STRUCTURE,
    "delayed": DELAYED,
    "queued": QUEUE_STRUCTURE,
    "processing": PROCESSING,
    "retry": DELAYED,
    "ghost": DELAYED,
    "success": FINISHED,
    "fail": FINISHED,
}

STATES = tuple(STRUCTURE_OF_STATE)

#: The zsets that hold jobs by state (a score each: due time, lease deadline, purge time).
JOB_ZSETS = (DELAYED, PROCESSING, FINISHED)


def structure_of(state: str, name: str) -> str | None:
    """The key, after the prefix, of the structure that holds a job of this state and name
    ("queue:<name>", "delayed", "processing" or "finished"); None for an unknown state."""
    kind = STRUCTURE_OF_STATE.get(state)
    if kind is None:
        return None
    return QUEUE + name if kind == QUEUE_STRUCTURE else kind


# --- a new job's packed record -------------------------------------------------------------------

#: A job created straight into its queue and not claimed yet has no hash: it is one field of
#: NEW_JOBS, id -> these fields joined by "\n" (opts and data as its hash would hold them, "" when
#: absent). A name has no control characters and compact JSON no raw newline, so the split is
#: unambiguous. Its state is 'new'; its first claim writes its hash.
PACKED_FIELDS = ("name", "create_time", "opts", "data")


def pack_new(name: str, create_time: int, opts: str, data: str) -> str:
    """A new job's packed record (opts and data: stored JSON, or "" when absent)."""
    return "\n".join((name, str(create_time), opts, data))


def unpack_new(packed: str) -> dict[str, str]:
    """The fields of a packed new job as its hash will hold them once claimed (state 'new')."""
    name, created, opts, data = packed.split("\n", len(PACKED_FIELDS) - 1)
    fields = {"name": name, "create_time": created, "state": "new"}
    if data:
        fields["data"] = data
    if opts:
        fields["opts"] = opts
    return fields
