"""Test helpers that look at a namespace's Redis state directly (SCAN is fine here, not in kickq)."""
from __future__ import annotations

from typing import Any

from kickq.job import stored_fields
# The keys, where a job of each state must be (STRUCTURE_OF_STATE, also read from here by
# tests/faults) and the packed new job: kickq/layout.py.
from kickq.layout import (COUNTS, EVENTS, JOB, JOB_ZSETS, META, NEW_JOBS, QUEUE, STATS,
                          STRUCTURE_OF_STATE, TIMES, structure_of, unpack_new)


def prefix(ns: str) -> str:
    return "{" + ns + "}:"


def namespace_keys(r: Any, ns: str) -> list[str]:
    # "{" is not special in SCAN patterns; "[" in a namespace never happens (validated).
    return sorted(r.scan_iter(match=prefix(ns) + "*", count=1000))


def structures_of(r: Any, ns: str, job_id: str) -> list[str]:
    """Every structure that holds `job_id`: "queue:<name>", "delayed", "processing", "finished".

    Queue lists are found by SCAN, not through the names set, so a stray entry cannot hide.
    """
    p = prefix(ns)
    found = []
    for key in namespace_keys(r, ns):
        if key.startswith(p + QUEUE) and r.type(key) == "list":
            count = r.lrange(key, 0, -1).count(job_id)
            found += [key[len(p):]] * count
    for zset in JOB_ZSETS:
        if r.zscore(p + zset, job_id) is not None:
            found.append(zset)
    return found


def state_and_name(r: Any, ns: str, job_id: str) -> tuple[str | None, str | None]:
    """From the job's packed new-job entry, else its hash (see kickq.job.stored_fields)."""
    p = prefix(ns)
    packed = r.hget(p + NEW_JOBS, job_id)
    if packed is not None:
        return "new", unpack_new(packed)["name"]
    state, name = r.hmget(p + JOB + job_id, "state", "name")
    return state, name


def job_exists(r: Any, ns: str, job_id: str) -> bool:
    """The job has a record: its hash, or its packed new-job entry."""
    return bool(r.exists(prefix(ns) + JOB + job_id) or r.hexists(prefix(ns) + NEW_JOBS, job_id))


def stored(r: Any, ns: str, job_id: str) -> dict[str, str]:
    """The job's fields (empty: gone), from its packed new-job entry or its hash."""
    packed = r.hget(prefix(ns) + NEW_JOBS, job_id)
    return dict(stored_fields(packed, r.hgetall(prefix(ns) + JOB + job_id)))


def give_hash(r: Any, ns: str, job_id: str) -> None:
    """Turn a packed new job into its hash, as its first claim does (for tests that then edit the
    hash by hand to plant a fault)."""
    packed = r.hget(prefix(ns) + NEW_JOBS, job_id)
    if packed is not None:
        r.hdel(prefix(ns) + NEW_JOBS, job_id)
        r.hset(prefix(ns) + JOB + job_id, mapping=unpack_new(packed))


def assert_one_structure(r: Any, ns: str, job_id: str) -> str:
    """The job exists, sits in exactly one structure, and that structure matches its state."""
    state, name = state_and_name(r, ns, job_id)
    assert state is not None, f"job {job_id} has no hash"
    where = structures_of(r, ns, job_id)
    expected = structure_of(state, name)
    assert where == [expected], f"job {job_id} in state {state} is in {where}, expected [{expected}]"
    return state


def assert_gone(r: Any, ns: str, job_id: str) -> None:
    assert not r.exists(prefix(ns) + JOB + job_id), f"job {job_id} still has a hash"
    assert not r.hexists(prefix(ns) + NEW_JOBS, job_id), f"job {job_id} still has a new-job entry"
    assert structures_of(r, ns, job_id) == [], f"job {job_id} still in {structures_of(r, ns, job_id)}"


def assert_consistent(r: Any, ns: str) -> None:
    """Every job (hash or new-job entry, never both) is in exactly its state's structure; every
    structure entry has one.

    One SCAN and one pipeline: cheap enough to run after every step of a test."""
    p = prefix(ns)
    keys = namespace_keys(r, ns)
    job_ids = [key[len(p + JOB):] for key in keys if key.startswith(p + JOB)]
    queues = [key for key in keys if key.startswith(p + QUEUE)]
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(p + JOB + job_id, "state", "name")
    for key in queues:
        pipe.lrange(key, 0, -1)
    for zset in JOB_ZSETS:
        pipe.zrange(p + zset, 0, -1)
    pipe.hgetall(p + NEW_JOBS)
    replies = pipe.execute()
    packed = replies.pop()
    twice = set(packed) & set(job_ids)
    assert not twice, f"jobs with both a hash and a new-job entry: {sorted(twice)}"
    where: dict[str, list[str]] = {}
    for key, members in zip(queues, replies[len(job_ids):len(job_ids) + len(queues)], strict=True):
        for member in members:
            where.setdefault(member, []).append(key[len(p):])
    for zset, members in zip(JOB_ZSETS, replies[len(job_ids) + len(queues):], strict=True):
        for member in members:
            where.setdefault(member, []).append(zset)
    records = list(zip(job_ids, replies[:len(job_ids)], strict=True))
    records += [(job_id, ["new", unpack_new(entry)["name"]]) for job_id, entry in packed.items()]
    for job_id, (state, name) in records:
        assert state in STRUCTURE_OF_STATE, f"job {job_id} has state {state!r}"
        expected = structure_of(state, name)
        assert where.get(job_id, []) == [expected], (
            f"job {job_id} in state {state} is in {where.get(job_id, [])}, expected [{expected}]")
    orphans = set(where) - set(job_ids) - set(packed)
    assert not orphans, f"structures hold ids without a hash: {sorted(orphans)}"


def snapshot(r: Any, ns: str) -> dict[str, tuple[str, Any]]:
    """Every key of the namespace with its type and whole content (and whether it expires)."""
    out: dict[str, tuple[str, Any]] = {}
    for key in namespace_keys(r, ns):
        kind = r.type(key)
        if kind == "string":
            content: Any = r.get(key)
        elif kind == "list":
            content = r.lrange(key, 0, -1)
        elif kind == "hash":
            content = r.hgetall(key)
        elif kind == "set":
            content = sorted(r.smembers(key))
        elif kind == "zset":
            content = r.zrange(key, 0, -1, withscores=True)
        else:
            content = None
        out[key] = (kind, content, r.ttl(key) >= 0)
    return out


def bookkeeping(key: str, ns: str) -> bool:
    """Namespace-wide, bounded observability keys (counts, events, stats buckets), not any job's."""
    rest = key[len(prefix(ns)):]
    return rest in (COUNTS, EVENTS, META) or rest.startswith((STATS, TIMES))
