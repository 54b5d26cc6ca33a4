"""The Redis Sentinel harness (tests/sentinel_topology.py) against real redis-server processes.

Each test prints what it measured (run with ``-s`` to see it).
"""
from __future__ import annotations

import pytest
import redis

from tests.sentinel_topology import START_TIMEOUT, SentinelFactory, SentinelSetup

pytestmark = pytest.mark.sentinel

# A test's budget: its setup starts inside it, then its own work (a restart waits for
# Sentinel's 10 s INFO period plus its 8 s delay before reconfiguring a node).
BUDGET = START_TIMEOUT + 60


def assert_every_sentinel_names(setup: SentinelSetup, port: int) -> None:
    for s in setup.sentinels:
        assert setup.master_addr(s) == ("127.0.0.1", port), s


@pytest.mark.timeout(BUDGET)
def test_setup_forms_and_a_write_reaches_both_replicas(make_sentinel: SentinelFactory) -> None:
    setup = make_sentinel()
    print(f"startup {setup.startup_seconds:.2f}s {setup.startup_phases}")
    ports = ",".join(f"127.0.0.1:{s.port}" for s in setup.sentinels)
    assert setup.url == f"redis+sentinel://{ports}/kq"
    assert len(setup.sentinels) == 3 and len(setup.data_nodes) == 3

    master = setup.master()
    assert master is setup.data_nodes[0]
    assert_every_sentinel_names(setup, master.port)
    replicas = setup.replicas()
    assert sorted(r.port for r in replicas) == sorted(n.port for n in setup.data_nodes[1:])
    for s in setup.sentinels:
        assert setup.sentinel_master(s)["num-slaves"] == "2"
        assert len(setup.sentinel_replicas(s)) == 2
        assert len(setup.sentinel_sentinels(s)) == 2

    m = setup.client(master)
    m.set("written-on-master", "yes")
    assert m.wait(2, 1000) == 2
    for r in replicas:
        assert setup.client(r).get("written-on-master") == "yes"
        with pytest.raises(redis.ReadOnlyError):
            setup.client(r).set("written-on-replica", "no")

    nodes = setup.data_nodes + setup.sentinels
    setup.stop()
    assert all(n.process is not None and n.process.poll() is not None for n in nodes)
    assert not any(n.workdir.exists() for n in nodes)


@pytest.mark.timeout(BUDGET)
def test_kill_master_promotes_a_replica_and_the_killed_one_returns_as_replica(
    make_sentinel: SentinelFactory,
) -> None:
    setup = make_sentinel()
    old = setup.master()
    old_replicas = setup.replicas()
    setup.client(old).set("before-kill", "1")
    assert setup.client(old).wait(2, 1000) == 2

    new = setup.kill_master()
    times = setup.failovers[-1]
    print(
        f"kill -> promotion {times.promoted_seconds:.2f}s, settled {times.settled_seconds:.2f}s"
        + (f" (after a second failover from {times.first_promoted})" if times.first_promoted else "")
    )
    assert times.kind == "kill" and times.old_master is old and times.new_master is new
    assert new in old_replicas
    assert not old.running()
    assert_every_sentinel_names(setup, new.port)
    assert setup.role(new)[0] == "master"
    assert setup.client(new).get("before-kill") == "1"
    setup.client(new).set("after-kill", "1")
    assert setup.client(new).wait(1, 1000) == 1  # the one replica left

    setup.restart(old)
    print(f"restart -> replica of the new master {setup.restart_seconds[-1]:.2f}s")
    # The master Sentinel names now: `new`, unless it failed over once more meanwhile.
    current = setup.master()
    if current is not new:
        print(f"the master changed again after kill_master: {new} -> {current}")
    assert current in old_replicas
    role = setup.role(old)
    assert role[0] == "slave" and int(role[2]) == current.port
    assert setup.client(current).wait(2, 1000) == 2
    assert setup.client(old).get("after-kill") == "1"


@pytest.mark.timeout(BUDGET)
def test_planned_failover_switches_and_the_old_master_becomes_a_replica(
    make_sentinel: SentinelFactory,
) -> None:
    setup = make_sentinel()
    old = setup.master()
    new = setup.failover()
    times = setup.failovers[-1]
    print(
        f"SENTINEL FAILOVER -> promotion {times.promoted_seconds:.2f}s, old master a replica"
        f" {times.old_master_demoted_seconds:.2f}s, old master accepted writes"
        f" {times.old_master_writable_after_promotion_seconds:.2f}s after the promotion"
        + (f" (after a second failover from {times.first_promoted})" if times.first_promoted else "")
    )
    assert times.kind == "planned" and new is not old
    assert_every_sentinel_names(setup, new.port)
    role = setup.role(old)
    assert role[0] == "slave" and int(role[2]) == new.port
    with pytest.raises(redis.ReadOnlyError):
        setup.client(old).set("after-failover", "no")
    setup.wait_settled()
    setup.client(new).set("after-failover", "yes")
    assert setup.client(new).wait(2, 1000) == 2


@pytest.mark.timeout(BUDGET)
def test_freeze_and_thaw_all_data_nodes(make_sentinel: SentinelFactory) -> None:
    setup = make_sentinel()
    master = setup.master()
    setup.freeze_all_data_nodes()
    try:
        with pytest.raises(redis.TimeoutError):
            setup.admin(master).ping()
        setup.wait_until_master_down()
    finally:
        setup.thaw_all_data_nodes()
    settled = setup.wait_settled()
    setup.client(settled).set("after-thaw", "1")
    assert setup.client(settled).wait(2, 1000) == 2
