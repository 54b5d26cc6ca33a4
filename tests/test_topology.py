"""The Redis Cluster harness (tests/topology.py) against real redis-server processes.

The half-migration tests pin down what Redis replies to a client while a slot moves
(the table in tests/topology.py's docstring); kickq's cluster design relies on it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tests.topology import (
    START_TIMEOUT,
    Cluster,
    ClusterError,
    ClusterFactory,
    ClusterNode,
    ClusterNotOwned,
    SlotMove,
    error_text,
    parse_cluster_url,
)

# A test's budget: the session cluster may start inside it, then its own work.
FIRST_USE = START_TIMEOUT


def keyname(namespace: str, name: str) -> str:
    return "{" + namespace + "}:" + name


def test_parse_cluster_url() -> None:
    assert parse_cluster_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001") == (
        [("127.0.0.1", 7000), ("127.0.0.1", 7001)],
        None,
        None,
    )
    assert parse_cluster_url("redis+cluster://u:secret@10.0.0.1:7000/") == (
        [("10.0.0.1", 7000)],
        "u",
        "secret",
    )
    with pytest.raises(ValueError):
        parse_cluster_url("http://127.0.0.1:7000")


@pytest.mark.cluster
@pytest.mark.timeout(FIRST_USE + 30)
def test_cluster_forms(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    assert cluster.health_problem() is None
    masters = cluster.masters()
    if cluster.owned:
        assert len(cluster.nodes) == 6
        assert len(masters) == 3
        assert all(len(cluster.replicas_of(m)) == 1 for m in masters)
        assert cluster.startup_seconds is not None
    # Every node says ok and all agree on the slot map, which covers every slot.
    maps = {cluster.slot_map(n) for n in cluster.nodes}
    assert len(maps) == 1
    (slot_map,) = maps
    assert sum(r.end - r.start + 1 for r in slot_map) == 16384
    for n in cluster.nodes:
        assert cluster.cluster_info(n)["cluster_state"] == "ok"
        assert cluster.client(n).ping()
    # The URL names two masters as startup nodes.
    assert cluster.url.startswith("redis+cluster://")
    assert len(cluster.startup) == 2
    assert {cluster.node(p) for _, p in cluster.startup} <= set(masters)
    assert cluster.url == "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup)


@pytest.mark.cluster
@pytest.mark.timeout(FIRST_USE + 30)
def test_namespace_on_lands_on_the_asked_master(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    masters = cluster.masters()
    for master in masters:
        ns = cluster.namespace_on(master, "kt")
        assert cluster.owner_of(ns) is master
        key = keyname(ns, "probe")
        assert cluster.slot_of(ns) == int(cluster.client(master).execute_command("CLUSTER", "KEYSLOT", key))
        assert cluster.client(master).set(key, "here")
        other = next(m for m in masters if m is not master)
        with pytest.raises(redis.ResponseError) as moved:
            cluster.client(other).get(key)
        assert error_text(moved.value) == f"MOVED {cluster.slot_of(ns)} {master.host}:{master.port}"
        cluster.client(master).delete(key)


def write_assorted(client: redis.Redis, ns: str, count: int) -> dict[str, Any]:
    """``count`` keys of six types; returns what each should read back as."""
    expected: dict[str, Any] = {}
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        key = keyname(ns, f"k{i}")
        kind = i % 6
        if kind == 0:
            pipe.set(key, f"v{i}")
            expected[key] = ("string", f"v{i}")
        elif kind == 1:
            pipe.hset(key, mapping={"a": str(i), "b": "x"})
            expected[key] = ("hash", {"a": str(i), "b": "x"})
        elif kind == 2:
            pipe.rpush(key, "l1", str(i))
            expected[key] = ("list", ["l1", str(i)])
        elif kind == 3:
            pipe.sadd(key, "s1", str(i))
            expected[key] = ("set", {"s1", str(i)})
        elif kind == 4:
            pipe.zadd(key, {"z": float(i)})
            expected[key] = ("zset", [("z", float(i))])
        else:
            pipe.xadd(key, {"f": str(i)}, id=f"{i + 1}-0")
            expected[key] = ("stream", [(f"{i + 1}-0", {"f": str(i)})])
        if i % 10 == 0:
            pipe.pexpire(key, 3_600_000)
    pipe.execute()
    return expected


def read_back(client: redis.Redis, key: str, kind: str) -> Any:
    if kind == "string":
        return client.get(key)
    if kind == "hash":
        return client.hgetall(key)
    if kind == "list":
        return client.lrange(key, 0, -1)
    if kind == "set":
        return client.smembers(key)
    if kind == "zset":
        return client.zrange(key, 0, -1, withscores=True)
    return [(entry_id, fields) for entry_id, fields in client.xrange(key) or []]


@pytest.mark.cluster
@pytest.mark.timeout(FIRST_USE + 60)
def test_move_slot_moves_every_key(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    source, target = cluster.masters()[:2]
    ns = cluster.namespace_on(source, "kt")
    slot = cluster.slot_of(ns)
    expected = write_assorted(cluster.client(source), ns, 200)
    assert int(cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 200

    split: list[tuple[int, int]] = []

    def on_step(move: SlotMove, keys: list[str]) -> None:
        assert len(keys) <= 10
        split.append((move.count_on(move.source), move.count_on(move.target)))

    move = cluster.move_slot(slot, target, batch=10, on_step=on_step)

    assert move.finished and move.moved_keys == 200
    # Batch by batch the keys were split between the two nodes, none lost or doubled.
    assert len(split) == 20
    assert all(s + t == 200 for s, t in split)
    assert split[0] == (190, 10) and split[-1] == (0, 200)
    # Every node names the new owner.
    for n in cluster.nodes:
        if n.running():
            assert next(r.master_id for r in cluster.slot_map(n) if slot in r) == target.node_id
    assert cluster.owner_of(ns) is target
    assert int(cluster.client(target).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 200
    assert int(cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 0
    assert cluster.client(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000) == []
    dst = cluster.client(target)
    for key, (kind, value) in expected.items():
        assert dst.type(key) == kind, key
        assert read_back(dst, key, kind) == value, key
    # MIGRATE keeps the TTLs.
    ttls = [dst.pttl(keyname(ns, f"k{i}")) for i in range(0, 200, 10)]
    assert all(0 < t <= 3_600_000 for t in ttls)
    with pytest.raises(redis.ResponseError) as moved:
        cluster.client(source).get(keyname(ns, "k0"))
    assert error_text(moved.value) == f"MOVED {slot} {target.host}:{target.port}"
    dst.delete(*expected)


# --- A slot held half migrated ------------------------------------------------

PROBE_LIBRARY = "kq_topology_probe"
PROBE_FUNCTION = "kq_topology_probe_get"
# GET each declared key, then each key named in ARGV (undeclared); nil reads as None.
PROBE_BODY = """
local out = {}
for _, k in ipairs(KEYS) do out[#out + 1] = redis.call('GET', k) end
for _, k in ipairs(ARGV) do out[#out + 1] = redis.call('GET', k) end
return out
"""
PROBE_CODE = (
    f"#!lua name={PROBE_LIBRARY}\n"
    f"redis.register_function('{PROBE_FUNCTION}', function(KEYS, ARGV) {PROBE_BODY} end)"
)
# SET the declared key, then GET the key named in ARGV[1] (undeclared).
WRITE_THEN_READ = "redis.call('SET', KEYS[1], 'written'); return redis.call('GET', ARGV[1])"
WRITE_THEN_READ_CODE = (
    f"#!lua name={PROBE_LIBRARY}_w\n"
    f"redis.register_function('{PROBE_FUNCTION}_w', function(KEYS, ARGV) {WRITE_THEN_READ} end)"
)

NIL = None
ASK, MOVED, TRYAGAIN, NONLOCAL = "ASK", "MOVED", "TRYAGAIN", "NONLOCAL"
NONLOCAL_TEXT = "Script attempted to access a non local key in a cluster node script"


@dataclass
class HalfMigrated:
    """Slot of ``ns`` marked migrating from ``source`` to ``target``; key S still on the
    source, M moved to the target, N on neither."""

    cluster: Cluster
    move: SlotMove
    ns: str

    @property
    def source(self) -> ClusterNode:
        return self.move.source

    @property
    def target(self) -> ClusterNode:
        return self.move.target

    def key(self, symbol: str) -> str:
        return keyname(self.ns, symbol)

    def reply(self, where: str, *args: Any) -> Any:
        """Send one command to "source", "target" or "target+ASKING"; the reply, or the
        error as ASK/MOVED/TRYAGAIN/NONLOCAL (checked to point where Redis should)."""
        node = self.source if where == "source" else self.target
        pipe = self.cluster.client(node).pipeline(transaction=False)
        if where == "target+ASKING":
            pipe.execute_command("ASKING")
        pipe.execute_command(*args)
        result = pipe.execute(raise_on_error=False)[-1]
        if not isinstance(result, redis.ResponseError):
            return result
        text = error_text(result)
        slot = self.move.slot
        symbolic = {
            f"ASK {slot} {self.target.host}:{self.target.port}": ASK,
            f"MOVED {slot} {self.source.host}:{self.source.port}": MOVED,
            "TRYAGAIN Multiple keys request during rehashing of slot": TRYAGAIN,
        }
        if text in symbolic:
            return symbolic[text]
        if text.startswith(NONLOCAL_TEXT):
            return NONLOCAL
        return text  # unexpected: the assertion shows it whole


# Class scope: the move is finished when the class's tests are done, before the tests
# after them (a master killed while its slot migrates leaves the importing node stuck).
@pytest.fixture(scope="class")
def half_migrated(redis_cluster: Cluster) -> Iterator[HalfMigrated]:
    cluster = redis_cluster
    source, target = cluster.masters()[:2]
    ns = cluster.namespace_on(source, "kt")
    src = cluster.client(source)
    src.set(keyname(ns, "S"), "S")
    src.set(keyname(ns, "M"), "M")
    for name in ("S2", "S3"):
        src.set(keyname(ns, name), "before")
    for master in cluster.masters():
        cluster.client(master).execute_command("FUNCTION", "LOAD", "REPLACE", PROBE_CODE)
    with cluster.begin_move(cluster.slot_of(ns), target) as move:
        move.migrate_keys([keyname(ns, "M")])
        assert move.count_on(source) == 3 and move.count_on(target) == 1
        try:
            yield HalfMigrated(cluster, move, ns)
        finally:
            for master in cluster.masters():
                cluster.client(master).execute_command("FUNCTION", "DELETE", PROBE_LIBRARY)
    cluster.client(target).delete(*(keyname(ns, k) for k in ("S", "M", "N2", "S2", "S3")))


# command, then the reply on the source, on the target, on the target after ASKING.
PLAIN_CASES = [
    (("GET", "S"), "S", MOVED, NIL),
    (("GET", "M"), ASK, MOVED, "M"),
    (("GET", "N"), ASK, MOVED, NIL),
    (("MGET", "S", "M"), TRYAGAIN, MOVED, TRYAGAIN),
]

# declared keys, undeclared keys (read by name), then the reply on the source, on the
# target, on the target after ASKING (a list: the values the script read).
SCRIPT_CASES = [
    (["S"], [], ["S"], MOVED, [NIL]),
    (["M"], [], ASK, MOVED, ["M"]),
    (["N"], [], ASK, MOVED, [NIL]),
    (["S", "M"], [], TRYAGAIN, MOVED, TRYAGAIN),
    (["S", "N"], [], TRYAGAIN, MOVED, TRYAGAIN),
    (["M", "N"], [], ASK, MOVED, TRYAGAIN),
    (["S"], ["M"], NONLOCAL, MOVED, [NIL, "M"]),
    (["S"], ["N"], NONLOCAL, MOVED, [NIL, NIL]),
    (["M"], ["S"], ASK, MOVED, ["M", NIL]),
    ([], ["S"], ["S"], NONLOCAL, [NIL]),
    ([], ["M"], NONLOCAL, NONLOCAL, ["M"]),
    ([], ["N"], NONLOCAL, NONLOCAL, [NIL]),
]


@pytest.mark.cluster
@pytest.mark.timeout(FIRST_USE + 30)
class TestHalfMigratedSlot:
    """Replies while a slot is half migrated (see tests/topology.py's docstring)."""

    @pytest.mark.parametrize("command, on_source, on_target, on_target_asking", PLAIN_CASES)
    def test_plain_command(
        self,
        half_migrated: HalfMigrated,
        command: tuple[str, ...],
        on_source: Any,
        on_target: Any,
        on_target_asking: Any,
    ) -> None:
        h = half_migrated
        args = (command[0], *(h.key(k) for k in command[1:]))
        assert h.reply("source", *args) == on_source
        assert h.reply("target", *args) == on_target
        assert h.reply("target+ASKING", *args) == on_target_asking

    @pytest.mark.parametrize("call", ["EVAL", "FCALL"])
    @pytest.mark.parametrize("declared, undeclared, on_source, on_target, on_target_asking", SCRIPT_CASES)
    def test_script(
        self,
        half_migrated: HalfMigrated,
        call: str,
        declared: list[str],
        undeclared: list[str],
        on_source: Any,
        on_target: Any,
        on_target_asking: Any,
    ) -> None:
        h = half_migrated
        head = ("EVAL", PROBE_BODY) if call == "EVAL" else ("FCALL", PROBE_FUNCTION)
        args = (*head, len(declared), *(h.key(k) for k in declared), *(h.key(k) for k in undeclared))
        assert h.reply("source", *args) == on_source
        assert h.reply("target", *args) == on_target
        assert h.reply("target+ASKING", *args) == on_target_asking

    def test_writes(self, half_migrated: HalfMigrated) -> None:
        h = half_migrated
        # A key that does not exist yet is created on the target, and only after ASKING.
        new = h.key("N2")
        assert h.reply("source", "SET", new, "new") == ASK
        assert h.reply("target", "SET", new, "new") == MOVED
        assert h.reply("target+ASKING", "SET", new, "new") is True
        assert h.reply("target+ASKING", "GET", new) == "new"
        assert h.move.count_on(h.target) == 2
        # A script aborted by an undeclared non-local key keeps what it wrote before.
        assert h.reply("source", "EVAL", WRITE_THEN_READ, 1, h.key("S2"), h.key("M")) == NONLOCAL
        assert h.reply("source", "GET", h.key("S2")) == "written"
        src = h.cluster.client(h.source)
        src.execute_command("FUNCTION", "LOAD", "REPLACE", WRITE_THEN_READ_CODE)
        try:
            assert h.reply("source", "FCALL", f"{PROBE_FUNCTION}_w", 1, h.key("S3"), h.key("N")) == NONLOCAL
            assert h.reply("source", "GET", h.key("S3")) == "written"
        finally:
            src.execute_command("FUNCTION", "DELETE", f"{PROBE_LIBRARY}_w")


@pytest.mark.cluster
@pytest.mark.timeout(FIRST_USE + 60)
def test_held_move_then_finish(redis_cluster: Cluster) -> None:
    """Keys move batch by batch while a client changes them; finishing brings every
    change to the target."""
    cluster = redis_cluster
    masters = cluster.masters()
    source, target = masters[1], masters[2]
    ns = cluster.namespace_on(source, "kt")
    slot = cluster.slot_of(ns)
    src, dst = cluster.client(source), cluster.client(target)
    src.rpush(keyname(ns, "list"), "a")
    for i in range(30):
        src.set(keyname(ns, f"k{i}"), str(i))
    with cluster.begin_move(slot, target) as move:
        assert move.count_on(source) == 31 and move.count_on(target) == 0
        moved = move.migrate_batch(10)
        assert len(moved) == 10
        assert move.count_on(source) == 21 and move.count_on(target) == 10
        # Slot half migrated: a key still on the source is changed there...
        still_there = move.keys_on_source(100)
        assert keyname(ns, "list") in still_there
        assert src.rpush(keyname(ns, "list"), "b") == 2
        # ...a new key goes to the target via ASKING.
        pipe = dst.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.set(keyname(ns, "new"), "n")
        pipe.execute()
        assert move.count_on(target) == 11
    assert move.finished
    assert cluster.owner_of(ns) is target
    assert int(dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 32
    assert int(src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 0
    assert dst.lrange(keyname(ns, "list"), 0, -1) == ["a", "b"]
    assert dst.get(keyname(ns, "new")) == "n"
    assert [dst.get(keyname(ns, f"k{i}")) for i in range(30)] == [str(i) for i in range(30)]
    dst.delete(keyname(ns, "list"), keyname(ns, "new"), *(keyname(ns, f"k{i}") for i in range(30)))


@pytest.mark.cluster
# Up to a cluster start, a failover (kill_master waits up to 40 s) and a restart.
@pytest.mark.timeout(FIRST_USE + 40 + START_TIMEOUT + 20)
def test_kill_master_promotes_its_replica(redis_cluster: Cluster) -> None:
    cluster = redis_cluster
    master = cluster.masters()[0]
    ns = cluster.namespace_on(master, "kt")
    replica = cluster.replica_of(master)
    client = cluster.client(master)
    client.set(keyname(ns, "kept"), "yes")
    # The write reached the replica before the kill (else the failover may lose it).
    assert client.execute_command("WAIT", 1, 5000) == 1
    try:
        promoted = cluster.kill_master(master)
        assert promoted is replica
        assert promoted.role == "master"
        assert cluster.owner_of(ns) is promoted
        assert cluster.client(promoted).get(keyname(ns, "kept")) == "yes"
        failover = cluster.failovers[-1]
        assert failover.killed is master and failover.promoted is promoted
        # About node timeout (2 s) plus the election: well under the deadline.
        assert 0 < failover.promotion_seconds <= failover.cluster_ok_seconds < 40
        assert master not in cluster.masters()
    finally:
        if cluster.owned and not master.running():
            cluster.restart(master)
    # The old master came back as the replica of the node that took its slots.
    assert master.role == "replica" and master.master_id == promoted.node_id
    assert cluster.health_problem() is None
    assert cluster.client(master).execute_command("ROLE")[0] == "slave"
    cluster.client(promoted).delete(keyname(ns, "kept"))


@pytest.mark.cluster
@pytest.mark.timeout(FIRST_USE + 30)
def test_attached_cluster_refuses_destructive_helpers(redis_cluster: Cluster) -> None:
    attached = Cluster.attach(redis_cluster.url)
    try:
        assert not attached.owned
        assert {n.node_id for n in attached.nodes} == {n.node_id for n in redis_cluster.nodes if n.running()}
        assert [m.node_id for m in attached.masters()] == [m.node_id for m in redis_cluster.masters()]
        ns = attached.namespace_on(attached.masters()[0])
        assert attached.owner_of(ns).node_id == redis_cluster.owner_of(ns).node_id
        slot = attached.slot_of(ns)
        with pytest.raises(ClusterNotOwned):
            attached.move_slot(slot, attached.masters()[1])
        with pytest.raises(ClusterNotOwned):
            attached.kill_master(attached.masters()[0])
        assert attached.owner_of(ns).node_id == redis_cluster.owner_of(ns).node_id
    finally:
        attached.stop()
    # stop() on an attached cluster only closes its clients.
    assert redis_cluster.health_problem() is None


@pytest.mark.cluster
@pytest.mark.timeout(START_TIMEOUT + 30)
def test_make_cluster_without_replicas(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(masters=3, replicas_per_master=0)
    assert len(cluster.nodes) == 3 and len(cluster.masters()) == 3
    assert cluster.health_problem() is None
    with pytest.raises(ClusterError, match="no healthy replica"):
        cluster.kill_master(cluster.masters()[0])
    assert all(n.running() for n in cluster.nodes)
