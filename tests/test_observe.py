"""Stats and events (issue 5): kq.stats() counts by state after every transition, window figures,
stats(name), and kq.events() from "0", "$" and a stream id, by name, across a killed connection, and
within the stream's MAXLEN.

Transitions run through the real scripts; the window tests pass `now` (Redis' clock minus a few
seconds) so that run times are exact."""
from __future__ import annotations

import json
import random
import threading
from collections import Counter

import pytest
import redis

import kickq
from kickq import scripts
from kickq.job import STATES, unpack_new
from kickq.keys import Keys
from kickq.scripts import Scripts
from tests.helpers import redis_now, wait_until
from tests.structures import assert_consistent, namespace_keys, prefix


def actual_counts(r, ns):
    """{(name, state): n} from the job hashes themselves (SCAN: fine in a test)."""
    p = prefix(ns)
    out: Counter = Counter()
    for key in namespace_keys(r, ns):
        if key.startswith(p + "job:"):
            state, name = r.hmget(key, "state", "name")
            out[(name, state)] += 1
    for packed in r.hvals(p + "newjobs"):  # new jobs not claimed yet
        out[(unpack_new(packed)["name"], "new")] += 1
    return out


def stats_counts(stats):
    return Counter({(name, state): n for name, entry in stats["names"].items()
                    for state, n in entry["states"].items() if n})


class Machine:
    """Every transition script on one namespace; after each step, stats() must match the jobs."""

    def __init__(self, kq, r, ns):
        self.kq, self.r, self.ns = kq, r, ns
        self.keys = Keys(ns)
        self.s = Scripts(r)
        self.steps = 0

    def check(self):
        self.steps += 1
        assert_consistent(self.r, self.ns)
        stats = self.kq.stats()
        actual = actual_counts(self.r, self.ns)
        assert stats_counts(stats) == actual, f"step {self.steps}"
        total: Counter = Counter()
        for (_, state), n in actual.items():
            total[state] += n
        assert {s: n for s, n in stats["total"]["states"].items() if n} == dict(total)
        assert set(stats["total"]["states"]) == set(STATES)

    def create(self, name="a", opts=None, delay_ms=None, now=None):
        item = (name, "", json.dumps(opts) if opts else "", delay_ms)
        (job_id, _), = scripts.parse_create(self.s.run("create", scripts.create_args(self.keys, [item], now)))
        self.check()
        return job_id

    def claim(self, *names, now=None):
        got = self.s.claim(self.keys, names or ("a",), now=now)
        self.check()
        return got

    def finish(self, job_id, token, outcome, now=None):
        status, state, _ = self.s.finish(self.keys, job_id, token, outcome, "x", now=now)
        self.check()
        return status, state

    def promote(self, now=None):
        result = self.s.promote(self.keys, now=now)
        self.check()
        return result

    def recover(self, now=None):
        result = self.s.recover(self.keys, now=now)
        self.check()
        return result

    def purge(self, now=None):
        result = self.s.purge(self.keys, now=now)
        self.check()
        return result

    def delete(self, job_id):
        result = self.s.delete(self.keys, job_id)
        self.check()
        return result

    def requeue(self, job_id):
        result = self.s.run("requeue", (self.keys.script_keys, [self.keys.prefix, "", job_id]))
        self.check()
        return result

    def purge_state(self, state, older_ms, *ids, now=None):
        result = self.s.run("purge_state", (self.keys.script_keys,
                                            [self.keys.prefix, scripts._now(now), state, older_ms, *ids]))
        self.check()
        return result

    def state(self, job_id):
        return self.r.hget(self.keys.job(job_id), "state")


@pytest.fixture
def m(kq, r, namespace):
    return Machine(kq, r, namespace)


# --- counts by state -----------------------------------------------------------------------------------

def test_state_counts_move_with_every_transition(m):
    far = redis_now(m.r) + 10 ** 9  # "much later", for promote / recover / purge
    new = m.create("a")
    delayed = m.create("b", delay_ms=0)
    m.promote()                                           # delayed -> queued
    assert m.state(delayed) == "queued"
    job_id, token, _ = m.claim("a")                       # new -> processing
    assert m.finish(job_id, token, "success") == ("ok", "success")
    flaky = m.create("a", opts={"retry": True, "retry_count": 1, "retry_interval": 0, "ghost_interval": 0})
    job_id, token, _ = m.claim("a")
    assert m.finish(job_id, token, "fail") == ("ok", "retry")
    m.promote()                                           # retry -> queued
    job_id, token, _ = m.claim("a")
    assert (job_id, m.finish(job_id, token, "fail")) == (flaky, ("ok", "fail"))
    assert m.requeue(flaky) == ["ok", "queued"]           # `kickq retry`: fail -> queued
    job_id, token, _ = m.claim("a")
    assert m.finish(job_id, token, "ghost") == ("ok", "ghost")
    m.promote()                                           # ghost -> queued
    job_id, token, _ = m.claim("a")
    assert m.recover(now=far)[0] == 1                     # lease expired: the second ghost run -> fail
    assert m.state(flaky) == "fail"
    job_id, token, _ = m.claim("b")
    assert job_id == delayed
    assert m.delete(delayed)                              # processing -> gone
    done = m.create("d")
    job_id, token, _ = m.claim("d")
    m.finish(job_id, token, "success")
    assert m.delete(done)                                 # success -> gone
    another = m.create("c")
    assert m.delete(another)                              # new -> gone
    m.create("c", delay_ms=60_000)
    assert m.purge_state("fail", 0, flaky, now=far) == 1  # `kickq purge`
    assert m.purge(now=far)[0] == 1                       # success -> purged
    assert m.state(new) is None
    sid = m.kq.schedule("tick", every=3600)               # a schedule's tick job: delayed
    m.check()
    assert m.kq.unschedule(sid)                           # and gone with the schedule
    m.check()


def test_ghosted_run_that_ends_the_job_counts_once_as_fail(m):
    job_id = m.create("g", opts={"ghost_retry": False})
    got_id, token, _ = m.claim("g")
    assert m.finish(got_id, token, "ghost") == ("ok", "fail")
    assert m.kq.stats("g")["names"]["g"]["states"]["fail"] == 1
    assert m.state(job_id) == "fail"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_walk_keeps_counts_exact(m, seed):
    rng = random.Random(seed)
    t = redis_now(m.r)
    tokens: dict[str, int] = {}
    for _ in range(120):
        t += rng.choice([0, 5, 500, 3000])
        action = rng.choice(["create", "create", "delayed", "claim", "finish", "finish", "promote", "recover",
                             "purge", "delete", "requeue", "purge_state"])
        name = rng.choice(["a", "b"])
        if action == "create":
            m.create(name, opts=rng.choice([None, {"retry": True, "retry_count": 1, "retry_interval": 0},
                                            {"process_timeout": 1, "purge_timeout": 2}]), now=t)
        elif action == "delayed":
            m.create(name, delay_ms=rng.choice([0, 1000]), now=t)
        elif action == "claim":
            got = m.claim(name, now=t)
            if got:
                tokens[got[0]] = got[1]
        elif action == "finish" and tokens:
            job_id = rng.choice(sorted(tokens))
            m.finish(job_id, tokens.pop(job_id), rng.choice(["success", "fail", "ghost"]), now=t)
        elif action == "promote":
            m.promote(now=t)
        elif action == "recover":
            m.recover(now=t)
        elif action == "purge":
            m.purge(now=t)
        elif action == "delete":
            m.delete(str(rng.randint(1, 30)))
        elif action == "requeue":
            m.requeue(str(rng.randint(1, 30)))
        elif action == "purge_state":
            m.purge_state(rng.choice(["success", "fail"]), 0, *[str(i) for i in range(1, 31)], now=t)
    assert m.steps > 60


def test_counts_of_a_name_stay_listed_at_zero(m):
    job_id = m.create("once")
    m.delete(job_id)
    entry = m.kq.stats()["names"]["once"]
    assert entry["states"] == {state: 0 for state in STATES}


# --- window figures -------------------------------------------------------------------------------------

def run_for(s, keys, name, ms, outcome, at, opts=None):
    """Create a job of `name` and run it once for exactly `ms`, ending at `at` (epoch ms)."""
    item = (name, "", json.dumps(opts) if opts else "", None)
    (job_id, _), = scripts.parse_create(s.run("create", scripts.create_args(keys, [item], at - ms - 1)))
    got = s.claim(keys, [name], now=at - ms)
    assert got[0] == job_id
    status, state, _ = s.finish(keys, job_id, got[1], outcome, "x", now=at)
    assert status == "ok"
    return state


def test_window_figures(kq_config, r, namespace):
    kickq.config(stats_window=60)
    kq = kickq.Kickq()
    s, keys = Scripts(r), Keys(namespace)
    now = redis_now(r)
    # Long before the window: counted nowhere (its bucket still exists).
    run_for(s, keys, "w", 5000, "success", now - 200_000)
    at = now - 3000
    states = [run_for(s, keys, "w", ms, outcome, at, opts) for ms, outcome, opts in [
        (100, "success", None), (200, "success", None), (300, "success", None),
        (400, "fail", None),                                      # no retry: fail
        (1000, "fail", {"retry": True, "retry_interval": 60}),    # retry
        (500, "ghost", None),                                     # ghost, re-run later
        (600, "ghost", {"ghost_retry": False}),                   # ghost that ends the job: ghost and fail
    ]]
    assert states == ["success", "success", "success", "fail", "retry", "ghost", "fail"]
    run_for(s, keys, "v", 50, "success", at)
    (job_id, _), = scripts.parse_create(s.run("create", scripts.create_args(keys, [("v", "", "", None)], at)))
    stats = kq.stats()
    assert stats["window_seconds"] == 60
    w = stats["names"]["w"]["window"]
    assert {k: w[k] for k in ("created", "processed", "success", "fail", "retry", "ghost")} == {
        "created": 7, "processed": 7, "success": 3, "fail": 2, "retry": 1, "ghost": 2}
    assert w["throughput"] == pytest.approx(7 / 60)
    times = w["processing_time"]
    assert times["mean"] == pytest.approx(3100 / 7)
    assert (times["p50"], times["p95"], times["max"]) == (400, 1000, 1000)
    v = stats["names"]["v"]["window"]
    assert (v["created"], v["processed"], v["success"]) == (2, 1, 1)
    assert v["processing_time"] == {"mean": 50, "p50": 50, "p95": 50, "max": 50}
    total = stats["total"]["window"]
    assert (total["created"], total["processed"], total["success"], total["fail"]) == (9, 8, 4, 2)
    assert total["processing_time"]["max"] == 1000
    assert total["processing_time"]["p50"] == 300  # of [50, 100, 200, 300, 400, 500, 600, 1000]
    assert total["throughput"] == pytest.approx(8 / 60)
    # A longer window takes in the old run too.
    assert kickq.Kickq(stats_window=300).stats("w")["names"]["w"]["window"]["processed"] == 8


def test_a_batch_writes_the_figures_single_finishes_would(kq, r, namespace):
    """finish_many sums counts and stats over the whole call and writes them once: the figures are
    those of one finish per run, across names, outcomes and two 10 s buckets, and every transition
    is still one event, in order."""
    s, keys = Scripts(r), Keys(namespace)
    now = redis_now(r)
    now += 10_000 - now % 10_000 + 2_000  # 2 s into a bucket: a run that ended 5 s ago is in the last one
    items = [("a", "", "", None)] * 4 + [("b", "", "", None)] * 2
    scripts.parse_create(s.run("create", scripts.create_args(keys, items, now - 9_000)))
    _, claimed, _ = s.finish_many(keys, "w", claim=6, claim_names=["a", "b"], now=now - 8_000)
    assert len(claimed) == 6
    # (outcome, run ms, ms ago): in the journal for the first four, sent in the call for the rest
    plan = [("success", 30, 5_000), ("success", 70, 0), ("fail", 20, 0), ("success", 10, 0),
            ("success", 40, 5_000), ("fail", 90, 0)]
    mono = 1_000_000.0
    journal = []
    for (job_id, token, _), (outcome, run_ms, ago) in zip(claimed[:4], plan[:4], strict=True):
        journal.append(scripts.journal_entry(job_id, token, "start", "", 0, mono - ago - run_ms))
        journal.append(scripts.journal_entry(job_id, token, outcome, "", run_ms, mono - ago))
    r.rpush(keys.journal("w"), *journal)
    direct = [(job_id, token, outcome, "", run_ms, ago)
              for (job_id, token, _), (outcome, run_ms, ago) in zip(claimed[4:], plan[4:], strict=True)]
    statuses, _, rejected = s.finish_many(keys, "w", direct, now=now, mono_ms=mono)
    assert statuses == [("ok", "success"), ("ok", "fail")] and rejected == []
    # No run keeps a start mark: ending the run in the same journal made it moot.
    assert all(not r.hexists(keys.job(job_id), "run_start") for job_id, _, _ in claimed)
    pre = prefix(namespace)
    last, this = now - now % 10_000 - 10_000, now - now % 10_000
    assert r.hgetall(f"{pre}stats:{last}") == {
        "created:a": "4", "created:b": "2",
        "processed:a": "1", "success:a": "1", "time:a": "30", "max:a": "30",
        "processed:b": "1", "success:b": "1", "time:b": "40", "max:b": "40"}
    assert r.hgetall(f"{pre}stats:{this}") == {
        "processed:a": "3", "success:a": "2", "fail:a": "1", "time:a": "100",
        "max:a": "70", "processed:b": "1", "fail:b": "1", "time:b": "90", "max:b": "90"}
    assert r.lrange(f"{pre}times:{last}", 0, -1) == ["30:a", "40:b"]
    assert r.lrange(f"{pre}times:{this}", 0, -1) == ["70:a", "20:a", "10:a", "90:b"]
    assert 0 < r.ttl(f"{pre}stats:{this}") <= 3700 and 0 < r.ttl(f"{pre}times:{this}") <= 3700
    assert r.hgetall(f"{pre}counts") == {"success:a": "3", "fail:a": "1", "success:b": "1", "fail:b": "1"}
    events = [(e["id"], e["event"]) for _, e in r.xrange(f"{pre}events")]
    assert [event for _, event in events] == ["create"] * 6 + ["processing"] * 6 + [
        "success", "success", "fail", "success", "success", "fail"]
    assert [job_id for job_id, _ in events[12:]] == [job_id for job_id, _, _ in claimed]


def test_a_script_that_fails_midway_still_counts_what_it_changed(kq, r, namespace):
    """Redis keeps the writes a script made before an error: their counts are written too. Here a
    batch ends a run, then its claim meets a corrupt job record (options that are not JSON)."""
    s, keys = Scripts(r), Keys(namespace)
    job = kq.create("a")
    _, claimed, _ = s.finish_many(keys, "w", claim=1, claim_names=["a"])
    (job_id, token, _), = claimed
    r.hset(keys.job("bad"), mapping={"name": "a", "state": "queued", "opts": "{not json"})
    r.rpush(keys.queue("a"), "bad")
    with pytest.raises(redis.exceptions.ResponseError, match="(?i)json|decode|expect"):
        s.finish_many(keys, "w", [(job_id, token, "success", "", 1, 0)], claim=1, claim_names=["a"])
    assert kq.get(job.id).state == "success"
    assert r.hgetall(prefix(namespace) + "counts") == {"success:a": "1"}  # not processing:a any more
    succeeded = [e for _, e in r.xrange(prefix(namespace) + "events") if e["event"] == "success"]
    assert [e["id"] for e in succeeded] == [job.id]


def test_window_of_an_idle_name_has_no_times(kq):
    kq.create("idle")
    window = kq.stats()["names"]["idle"]["window"]
    assert window["created"] == 1 and window["processed"] == 0 and window["throughput"] == 0
    assert window["processing_time"] == {"mean": None, "p50": None, "p95": None, "max": None}


def test_stats_of_one_name(kq, r, namespace):
    s, keys = Scripts(r), Keys(namespace)
    now = redis_now(r)
    run_for(s, keys, "a", 10, "success", now - 1000)
    kq.create("b")
    kq.create("b")
    only = kq.stats("b")
    assert list(only["names"]) == ["b"]
    assert only["names"]["b"]["states"]["new"] == 2
    assert only["total"]["states"]["new"] == 2 and only["total"]["states"]["success"] == 0
    assert only["total"]["window"]["processed"] == 0
    assert kq.stats("a")["names"]["a"]["window"]["processed"] == 1
    never = kq.stats("never")
    assert never["names"]["never"]["states"] == {state: 0 for state in STATES}
    with pytest.raises(ValueError):
        kq.stats("")


def test_stats_cost_does_not_grow_with_jobs(kq, r):
    def commands():
        return int(r.info("stats")["total_commands_processed"])

    def cost():  # the least of three: another client of the server could only add to one
        deltas = []
        for _ in range(3):
            before = commands()
            kq.stats()
            deltas.append(commands() - before)
        return min(deltas)

    kq.create("a")
    cost()  # the first call connects and loads nothing else
    small = cost()
    kq.create_many([("a",)] * 3000)
    assert cost() == small


# --- events ------------------------------------------------------------------------------------------

def drain(kq, **kwargs):
    return list(kq.events(timeout=0.3, **kwargs))


def test_events_from_zero_yield_every_transition(m):
    far = redis_now(m.r) + 10 ** 9
    a = m.create("a")
    b = m.create("b", opts={"retry": True, "retry_interval": 0}, delay_ms=0)
    m.promote()
    job_id, token, _ = m.claim("a")
    m.finish(job_id, token, "success")
    job_id, token, _ = m.claim("b")
    m.finish(job_id, token, "fail")
    m.promote()
    job_id, token, _ = m.claim("b")
    m.finish(job_id, token, "ghost")
    m.delete(b)
    m.purge(now=far)
    events = drain(m.kq, since="0")
    assert [(e["id"], e["name"], e["event"], e["state"]) for e in events] == [
        (a, "a", "create", "new"),
        (b, "b", "create", "delayed"),
        (b, "b", "queued", "queued"),
        (a, "a", "processing", "processing"),
        (a, "a", "success", "success"),
        (b, "b", "processing", "processing"),
        (b, "b", "retry", "retry"),
        (b, "b", "queued", "queued"),
        (b, "b", "processing", "processing"),
        (b, "b", "ghost", "ghost"),
        (b, "b", "delete", None),
        (a, "a", "purge", None),
    ]
    now = redis_now(m.r)
    for e in events:
        assert set(e) >= {"id", "name", "event", "state", "time", "stream_id"}
        assert 0 <= now - e["time"] < 60_000 or e["event"] == "purge"
    ids = [e["stream_id"] for e in events]
    assert ids == [entry_id for entry_id, _ in m.r.xrange(m.keys.events)]


def test_events_from_a_stream_id_resume_after_it(kq):
    for _ in range(5):
        kq.create("a")
    events = drain(kq, since="0")
    later = drain(kq, since=events[1]["stream_id"])
    assert [e["stream_id"] for e in later] == [e["stream_id"] for e in events[2:]]


class Consumer(threading.Thread):
    """Iterates kq.events() in a thread until it sees a job named "stop"."""

    def __init__(self, **kwargs):
        super().__init__(daemon=True)
        self.kq = kickq.Kickq()
        self.kwargs = kwargs
        self.events: list[dict] = []
        self.error: BaseException | None = None

    def run(self):
        try:
            for event in self.kq.events(timeout=30, **self.kwargs):
                self.events.append(event)
                if event["name"] == "stop":
                    return
        except BaseException as exc:  # noqa: B036 - reported by the test
            self.error = exc
        finally:
            self.kq.close()

    def names(self):
        return [e["name"] for e in self.events]

    def finish(self, kq):
        kq.create("stop")
        self.join(timeout=30)
        assert not self.is_alive(), "the consumer never saw the stop job"
        assert self.error is None, repr(self.error)


def test_events_since_dollar_yield_only_new_ones(kq):
    kq.create("before")
    consumer = Consumer(since="$")
    consumer.start()
    # The iterator pins "$" when it first reads: probe until it is surely listening.
    wait_until(lambda: kq.create("probe") and "probe" in consumer.names(), timeout=10, interval=0.05)
    for name in ("x", "y"):
        kq.create(name)
    consumer.finish(kq)
    names = consumer.names()
    assert "before" not in names
    assert [n for n in names if n != "probe"] == ["x", "y", "stop"]


def test_events_filtered_by_names(kq):
    for name in ("a", "b", "c", "a", "b"):
        kq.create(name)
    assert [e["name"] for e in drain(kq, since="0", names="b")] == ["b", "b"]
    assert [e["name"] for e in drain(kq, since="0", names=["a", "c"])] == ["a", "c", "a"]
    assert drain(kq, since="0", names=[]) == []


def test_events_survive_a_killed_connection_without_skipping_or_repeating(kq, r, namespace):
    consumer = Consumer(since="0")
    consumer.start()
    created = 0
    kills = 0
    for round_ in range(3):
        for _ in range(20):
            kq.create(f"r{round_}")
            created += 1
        wait_until(lambda n=created: len(consumer.events) >= n, timeout=10, message="consumer caught up")
        # It is blocked in XREAD now: kill every normal connection (ours is spared: SKIPME yes).
        wait_until(lambda: any(c.get("cmd") == "xread" for c in r.client_list()), timeout=5)
        kills += r.client_kill_filter(_type="normal")
        for _ in range(10):  # created while the consumer is reconnecting
            kq.create(f"k{round_}")
            created += 1
    # And one kill while events are being written. The writer's own connection may be killed in
    # the middle of a create (kickq never retries a create): that create may or may not exist, so
    # the stream itself is the reference.
    lost = []

    def write():
        for _ in range(200):
            try:
                kq.create("busy")
            except kickq.RedisUnavailable:
                lost.append(1)

    writer = threading.Thread(target=write)
    writer.start()
    wait_until(lambda: "busy" in consumer.names(), timeout=10)
    kills += r.client_kill_filter(_type="normal")
    writer.join()
    consumer.finish(kq)
    assert kills >= 4
    kept = [entry_id for entry_id, _ in r.xrange(Keys(namespace).events)]
    assert len(kept) >= created + 200 - len(lost) + 1
    assert [e["stream_id"] for e in consumer.events] == kept


def test_events_stop_after_timeout(kq):
    kq.create("a")
    import time
    started = time.monotonic()
    assert len(list(kq.events(since="0", timeout=0.2))) == 1
    assert time.monotonic() - started < 5


def test_events_maxlen_bounds_the_stream(kq_config, r, namespace):
    kickq.config(events_maxlen=50)
    kq = kickq.Kickq()
    kq.create_many([("a",)] * 2000)
    node = int(r.config_get("stream-node-max-entries")["stream-node-max-entries"])
    length = r.xlen(Keys(namespace).events)
    # XADD MAXLEN ~ trims whole stream nodes: at least 50 kept, at most 50 plus one node.
    assert 50 <= length <= 50 + node < 2000
    events = drain(kq, since="0")
    assert len(events) == length
    assert [e["id"] for e in events] == [str(i) for i in range(2001 - length, 2001)]
    kq.close()


def test_events_maxlen_zero_turns_events_off(kq_config, r, namespace):
    kickq.config(events_maxlen=0)
    kq = kickq.Kickq()
    kq.create("a")
    assert not r.exists(Keys(namespace).events)
    assert kq.stats()["names"]["a"]["states"]["new"] == 1  # counts are kept all the same
    kq.close()


def test_events_since_now_is_pinned_when_called_not_when_first_read(kq_config):
    import kickq
    kq = kickq.Kickq()
    stream = kq.events(timeout=0.5)
    job = kq.create("pinned")
    first = next(stream)
    assert (first["id"], first["event"]) == (job.id, "create")


def test_a_default_client_does_not_reset_an_explicit_events_maxlen(kq_config, namespace):
    import kickq
    kickq.Kickq(events_maxlen=7).create("a")
    kickq.Kickq().create("a")
    r = kickq.Kickq().redis
    assert r.hget("{" + namespace + "}:meta", "events_maxlen") == "7"
